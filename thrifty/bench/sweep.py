"""`thrifty bench sweep`: bench serve at each of several request rates or concurrencies.

One JSON with the curve: each point is a full bench serve result (throughput, latency
percentiles, goodput, $ per 1M tokens), which `thrifty report` plots and `thrifty cost plan`
reads to size a deployment.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

from thrifty.bench.datasets import ServePrompt
from thrifty.bench.serve import ServeConfig, run_serve
from thrifty.cpuinfo import cpu_name


def check_sweep_values(by: str, values: list[float]) -> None:
    """Before anything runs, so a bad value cannot throw away points already measured."""
    if not values:
        raise ValueError("sweep: no values given")
    for v in values:
        if by == "request_rate" and not v > 0:
            raise ValueError(f"request_rates: {v:g} is not > 0 (use inf for all at once)")
        if by == "max_concurrency" and not (math.isfinite(v) and v >= 1 and v == int(v)):
            raise ValueError(f"max_concurrencies: {v:g} is not a positive integer")


async def run_sweep(cfg: ServeConfig, by: str, values: list[float], prompts: list[ServePrompt], count_tokens,
                    dataset: str, progress: bool = True) -> dict:
    if by not in ("request_rate", "max_concurrency"):
        raise ValueError(f"sweep must be over request_rate or max_concurrency, got {by!r}")
    check_sweep_values(by, values)
    points = []
    for value in values:
        point_cfg = replace(cfg, request_rate=value) if by == "request_rate" else replace(cfg, max_concurrency=int(value))
        point_cfg.label = cfg.label or "default"
        result = await run_serve(point_cfg, prompts, count_tokens, dataset, progress)
        ttft, tpot = result["ttft_ms"]["p99"], result["tpot_ms"]["p99"]
        print(f"{by}={value:g}: {result['completed']} ok, {result['failed']} failed, "
              f"{result['output_throughput']:.1f} output tok/s, TTFT p99 {ttft if ttft is None else round(ttft)} ms, "
              f"TPOT p99 {tpot if tpot is None else round(tpot)} ms", flush=True)
        points.append(result)
    return {
        "kind": "bench_sweep",
        "label": cfg.label or "default",
        "model": points[0]["model"],
        "base_url": cfg.base_url,
        "sweep": by,
        "values": [int(v) if by == "max_concurrency" else v if math.isfinite(v) else "inf" for v in values],
        "price_per_hour_usd": cfg.price_per_hour,
        "machine": cpu_name(),
        "date": time.strftime("%Y-%m-%d"),
        "points": points,
    }
