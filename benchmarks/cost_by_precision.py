"""Precisions as configurations of `thrifty cost plan`: a concurrency sweep against a real `thrifty
serve` of each precision (weights and KV cache), then one plan comparing them ($ per 1M tokens at
the SLO, replicas needed).

    .venv/bin/python benchmarks/cost_by_precision.py --out docs/results

Writes cost_sweep_<name>.json per precision and cost_plan_precisions.{txt,json}. The price is
--price-per-hour for every configuration (one machine; a precision changes what it serves, not
what it costs per hour).
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from serve_comparisons import THRIFTY, with_server

PRECISIONS = {
    "bf16": ["--quantization", "none"],
    "q4_1_file": ["--quantization", "auto"],
    "int8": ["--quantization", "int8"],
    "int4_g32": ["--quantization", "int4"],
    "q4_1_file_kv_int8": ["--quantization", "auto", "--kv-cache-dtype", "int8"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/results")
    p.add_argument("--price-per-hour", default="0.10", help="USD per hour of the 2-vCPU machine")
    p.add_argument("--concurrencies", default="4,16,64")
    p.add_argument("--num-prompts", default="64")
    p.add_argument("--daily-requests", default="1000000")
    p.add_argument("--peak-factor", default="3")
    p.add_argument("--slo-ttft-ms", default="3000")
    p.add_argument("--slo-tpot-ms", default="250")
    p.add_argument("--plan-only", action="store_true", help="plan from the sweep files already in --out")
    args = p.parse_args()
    out = Path(args.out)
    sweeps = []
    for name, server_args in PRECISIONS.items():
        path = out / f"cost_sweep_{name}.json"
        sweeps += ["--sweep", str(path)]
        if args.plan_only:
            continue
        # No prefix caching: the sweep sends the same prompts at every point, which later points
        # would find cached.
        with_server([*server_args, "--dtype", "bfloat16", "--max-model-len", "2048", "--no-enable-prefix-caching"],
                    ["sweep", "--max-concurrencies", args.concurrencies, "--dataset", "random", "--input-len", "128",
                     "--output-len", "64", "--ignore-eos", "--num-prompts", args.num_prompts, "--label", name,
                     "--json", str(path)])
    plan = [*THRIFTY, "cost", "plan", *sweeps, "--daily-requests", args.daily_requests, "--peak-factor",
            args.peak_factor, "--mean-input-tokens", "128", "--mean-output-tokens", "64", "--slo-ttft-ms",
            args.slo_ttft_ms, "--slo-tpot-ms", args.slo_tpot_ms, "--price-per-hour", args.price_per_hour,
            "--json", str(out / "cost_plan_precisions.json")]
    text = subprocess.run(plan, check=True, capture_output=True, text=True).stdout
    (out / "cost_plan_precisions.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
