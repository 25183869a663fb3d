"""The seeds' serving comparisons, measured with `thrifty bench` against real `thrifty serve` processes.

1. Continuous vs static batching on mixed traffic: a request-rate sweep against a server of each
   policy (same max_num_seqs), -> batching_continuous.json, batching_static.json.
2. Prefix caching on a shared-system-prompt workload (shared-prefix dataset): one bench serve
   against a server with caching on and one with it off, -> prefix_on.json, prefix_off.json
   (TTFT, throughput, and the hit rate from the server's counters).
Then `thrifty report` draws them into report.html / report.md in the output folder.

    python benchmarks/serve_comparisons.py --out docs/results [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from thrifty.bench.processes import free_port, start_thrifty

THRIFTY = [sys.executable, "-m", "thrifty.entrypoints.cli"]
PRICE = "1.0"  # USD per hour; $/1M tokens scale linearly with the real price


def with_server(server_args: list[str], bench_args: list[str]) -> None:
    port = free_port()
    proc = start_thrifty(["serve", "--port", str(port), "--disable-uvicorn-access-log", "--log-level", "warning",
                          "--price-per-hour", PRICE, *server_args], f"http://127.0.0.1:{port}", 120, stdout=None)
    try:
        subprocess.run([*THRIFTY, "bench", *bench_args, "--base-url", f"http://127.0.0.1:{port}",
                        "--price-per-hour", PRICE, "--no-progress"], check=True)
    finally:
        proc.terminate()
        proc.wait(120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/results")
    p.add_argument("--quick", action="store_true", help="fewer prompts (a smoke run)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = "12" if args.quick else "48"

    for policy in ("continuous", "static"):
        with_server(["--scheduler", policy, "--max-num-seqs", "16"],
                    ["sweep", "--request-rates", "1,2,4,inf", "--dataset", "mixed", "--input-len", "64",
                     "--output-len", "64", "--ignore-eos", "--num-prompts", n, "--seed", "0", "--label", policy,
                     "--json", str(out / f"batching_{policy}.json")])

    for flag, name in (("--enable-prefix-caching", "on"), ("--no-enable-prefix-caching", "off")):
        with_server([flag],
                    ["serve", "--dataset", "shared-prefix", "--num-prefixes", "2", "--prefix-len", "512",
                     "--input-len", "32", "--output-len", "16", "--ignore-eos", "--num-prompts", n,
                     "--max-concurrency", "4", "--num-warmups", "2", "--seed", "0", "--label", f"prefix caching {name}",
                     "--json", str(out / f"prefix_{name}.json")])

    for name in ("on", "off"):
        r = json.loads((out / f"prefix_{name}.json").read_text())
        d = r["server_counters_delta"]
        hit = d["prefix_cache_hits"] / d["prefix_cache_queries"] if d.get("prefix_cache_queries") else 0.0
        print(f"prefix caching {name}: hit rate {hit:.3f}, TTFT p50 {r['ttft_ms']['p50']:.0f} ms, "
              f"{r['total_token_throughput']:.0f} tok/s")

    files = [str(out / f) for f in ("batching_continuous.json", "batching_static.json", "prefix_on.json",
                                    "prefix_off.json")]
    subprocess.run([*THRIFTY, "report", *files, "--out", str(out / "report.html"), "--markdown",
                    str(out / "report.md"), "--title", "thrifty: the seeds' comparisons, measured"], check=True)


if __name__ == "__main__":
    main()
