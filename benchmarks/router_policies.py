"""Routing policies compared through `thrifty router`: prefix-cache hits summed over the replicas,
throughput and TTFT, on a shared-prefix workload.

    python benchmarks/router_policies.py [--replicas 2] [--rounds 2] [--json FILE]

Starts the replicas (`thrifty serve`, the default model) and, per policy and round, a router
in front of them, then runs `thrifty bench serve --dataset shared-prefix` through the router
with `--metrics-url` on every replica. The policies run interleaved, their order reversed each
round, each run on fresh prefixes (its own seed), so no run inherits another's cache. Prints
one JSON line per run and a summary line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from thrifty.bench.processes import free_port, start_thrifty
from thrifty.cpuinfo import cpu_flags_line, cpu_name

CLI = [sys.executable, "-m", "thrifty.entrypoints.cli"]


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--policies", default="round_robin,least_loaded,prefix_aware")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--num-prefixes", type=int, default=3)
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--max-concurrency", type=int, default=4)
    ap.add_argument("--server-args", default="--kv-cache-memory 0.5 --max-model-len 4096",
                    help="extra `thrifty serve` flags for every replica")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(args.replicas)]
    replicas = [start_thrifty(["serve", "--port", url.rsplit(":", 1)[1], "--disable-uvicorn-access-log",
                               "--log-level", "warning", *args.server_args.split()], url, 180,
                              stdout=subprocess.DEVNULL) for url in urls]
    policies = args.policies.split(",")
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for rnd in range(args.rounds):
                for i, policy in enumerate(policies if rnd % 2 == 0 else policies[::-1]):
                    url = f"http://127.0.0.1:{free_port()}"
                    router = start_thrifty(["router", "--port", url.rsplit(":", 1)[1], "--policy", policy,
                                            "--log-level", "warning", *[a for u in urls for a in ("--backend", u)]],
                                           url, 30, stdout=subprocess.DEVNULL)
                    try:
                        out = Path(tmp) / f"{rnd}-{policy}.json"
                        subprocess.run(CLI + [
                            "bench", "serve", "--base-url", url, "--dataset", "shared-prefix",
                            "--num-prefixes", str(args.num_prefixes), "--prefix-len", str(args.prefix_len),
                            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                            "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency),
                            "--ignore-eos", "--seed", str(1000 * rnd + i), "--no-progress", "--json", str(out),
                            *[a for u in urls for a in ("--metrics-url", u)]], check=True, capture_output=True)
                    finally:
                        router.terminate()
                        router.wait(30)
                    r = json.loads(out.read_text())
                    delta = r["server_counters_delta"]
                    row = {"kind": "router_policy", "round": rnd, "policy": policy, "replicas": args.replicas,
                           "completed": r["completed"], "failed": r["failed"],
                           "prefix_hit_rate": round(delta["prefix_cache_hits"] / delta["prefix_cache_queries"], 4),
                           "prompt_tokens_computed": delta["prompt_tokens"] - delta["prefix_cache_hits"],
                           "request_throughput": r["request_throughput"], "ttft_ms_mean": r["ttft_ms"]["mean"],
                           "ttft_ms_p50": r["ttft_ms"]["p50"], "e2el_ms_mean": r["e2el_ms"]["mean"]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        for p in replicas:
            p.terminate()
        for p in replicas:
            p.wait(60)
    summary = {"kind": "router_policies_summary", "machine": cpu_name(), "cpu_flags": cpu_flags_line(),
               "date": time.strftime("%Y-%m-%d"), "commit": _commit(),
               "workload": {k: getattr(args, k) for k in ("num_prompts", "num_prefixes", "prefix_len", "input_len",
                                                           "output_len", "max_concurrency", "server_args")},
               "rows": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
