"""Speed and memory by weight precision, in one run: batch 1 (B1) and 64 requests (W64) of the
default model for each precision of weights and KV cache, interleaved over two rounds (the second in reverse order), each
figure as a ratio to the dense bf16 engine of the same round.

    .venv/bin/python benchmarks/precisions.py --json docs/results/precisions_<cpu>.json

Workloads as `thrifty bench throughput --workload B1|W64` (greedy, ignore_eos, random token
prompts): B1 = 1 x 128 in / 128 out, run --b1-repeats times per round with the median taken (a
batch-1 run is short and the machines are noisy); W64 = 64 x 128 / 128, once per round. Every
engine is built once, before the rounds, and all stay loaded; the figure is output tokens per
second of the whole generate call. Also recorded per engine: the bytes of its packed weights and
of one cached token's K and V.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = {
    "bf16": dict(quantization="none"),
    "Q4_1 (file)": dict(quantization="auto"),
    "int8": dict(quantization="int8"),
    "int4 g32": dict(quantization="int4", quantization_group_size=32),
    "int4 g64": dict(quantization="int4", quantization_group_size=64),
    "bf16, KV int8": dict(quantization="none", kv_cache_dtype="int8"),
    "Q4_1 (file), KV int8": dict(quantization="auto", kv_cache_dtype="int8"),
    "Q4_1 (file), KV fp8": dict(quantization="auto", kv_cache_dtype="fp8_e4m3"),
}
WORKLOADS = {"B1": (1, 128, 128), "W64": (64, 128, 128)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--b1-repeats", type=int, default=3)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--json", help="write the result rows here (JSON lines)")
    args = ap.parse_args()

    from thrifty import LLM
    from thrifty.bench.throughput import run_throughput
    from thrifty.cpuinfo import cpu_flags_line, cpu_name

    engines = {name: LLM(dtype=args.dtype, max_model_len=2048, kv_cache_memory=1.0, **CONFIGS[name])
               for name in args.configs}
    rows = []
    for rnd in range(args.rounds):
        order = args.configs if rnd % 2 == 0 else args.configs[::-1]
        figures: dict[str, dict[str, float]] = {}
        for name in order:
            llm = engines[name]
            figures[name] = {}
            for workload, (n, inp, out) in WORKLOADS.items():
                repeats = args.b1_repeats if workload == "B1" else 1
                # Each repeat its own prompt (seed): a repeated prompt would hit the prefix cache.
                runs = [run_throughput(llm, "random", n, inp, out, seed=1000 * rnd + r, use_tqdm=False)
                        ["output_tokens_per_s"] for r in range(repeats)]
                figures[name][workload] = statistics.median(runs)
                figures[name][workload + "_runs"] = runs
        for name in args.configs:
            runner = engines[name].llm_engine.runner
            row = {"round": rnd + 1, "config": name, **CONFIGS[name], "dtype": args.dtype,
                   "backend": runner.backend, "weight_bytes": runner.weight_bytes,
                   "kv_bytes_per_token": runner.kv_bytes_per_token, **figures[name],
                   **{f"{w}_vs_bf16": round(figures[name][w] / figures["bf16"][w], 3)
                      for w in WORKLOADS if "bf16" in figures},
                   "cpu": cpu_name(), "cpu_flags": cpu_flags_line(), "date": time.strftime("%Y-%m-%d")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| config | weights MB | round | B1 tok/s | B1 vs bf16 | W64 tok/s | W64 vs bf16 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['config']} | {r['weight_bytes'] / 1e6:.1f} | {r['round']} | {r['B1']:.1f} | "
              f"{r.get('B1_vs_bf16', '')} | {r['W64']:.1f} | {r.get('W64_vs_bf16', '')} |")
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
