"""Sleep mode on a real server: what each sleep releases and how long sleeping and waking take.

Starts `thrifty serve --enable-sleep-mode` (the default model and KV cache unless --serve-args says
otherwise), asks one greedy question, then for each level in --levels: sleeps, reads the resident
set from /metrics, wakes and asks the same question again. One JSON line per cycle:

    .venv/bin/python benchmarks/sleep_wake.py [--levels 1,2,1,2] [--json docs/results/sleep_wake.json]
"""

from __future__ import annotations

import argparse
import subprocess

import httpx2 as httpx

from thrifty.bench.output import emit_json_line
from thrifty.bench.processes import free_port, start_thrifty

MiB = 1 << 20
QUESTION = {"prompt": "The three primary colours are", "max_tokens": 24, "temperature": 0}


def rss_bytes(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1])
    raise RuntimeError("no process_resident_memory_bytes on /metrics")


def answer(url: str) -> str:
    r = httpx.post(f"{url}/v1/completions", json=QUESTION, timeout=120)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,2,1,2")
    ap.add_argument("--serve-args", default="", help="more `thrifty serve` flags")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = ["serve", "--port", str(port), "--enable-sleep-mode", "--log-level", "warning", *args.serve_args.split()]
    proc = start_thrifty(serve, url, 300, stdout=subprocess.DEVNULL)
    try:
        before = answer(url)
        for cycle, level in enumerate(int(v) for v in args.levels.split(",")):
            awake = rss_bytes(url)
            slept = httpx.post(f"{url}/sleep", params={"level": level}, timeout=300).json()
            asleep = rss_bytes(url)
            woke = httpx.post(f"{url}/wake_up", timeout=300).json()
            emit_json_line({"benchmark": "sleep_wake", "cycle": cycle, "level": level, "rss_awake_mib": awake / MiB,
                            "rss_asleep_mib": asleep / MiB, "released_mib": slept["released_bytes"] / MiB,
                            "sleep_s": slept["seconds"], "wake_s": woke["seconds"],
                            "same_answer": answer(url) == before, "serve_args": serve[3:]}, args.json)
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
