"""Priority scheduling under overload: does a trickle of urgent requests keep its TTFT while
low-priority work arrives at about three times what the server can sustain?

Starts `thrifty serve --scheduling-policy priority ...` and, in one run:
  0. answers every distinct prompt once on the idle server (the greedy reference outputs);
  1. measures the sustainable rate mu (requests/s; a closed loop of low-priority requests);
  2. sends the urgent trickle alone (priority -1, Poisson at mu / trickle_div; the same arrival
     times in all three phases);
  3. sends low-priority requests (priority 1, Poisson at overload x mu) for as long as the trickle
     lasts, with the same trickle again, and waits for every low request to finish;
  4. sends the trickle alone again.
Pass: the trickle's p99 TTFT under overload is within 2x of the larger idle p99 (phases 2 and 4),
every low request completes, and every output equals its prompt's reference (greedy).
With --scheduling-policy fcfs the same load runs with no priorities sent: the baseline.

    python benchmarks/priority_overload.py [--runs 2] [--json docs/results/priority_overload.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import random
import subprocess
import time

import numpy as np

from thrifty.bench.datasets import make_serve_prompts
from thrifty.bench.output import emit_json_line
from thrifty.bench.processes import free_port, start_thrifty
from thrifty.bench.serve import RequestResult, ServeConfig, _arrivals, _client, _discover_model, _send
from thrifty.model.loader import load_tokenizer, resolve_model

URGENT, LOW = -1, 1


def _no_count(_: str) -> int:
    return 0  # (thrifty streams usage, so nothing is counted locally)


class Load:
    def __init__(self, url: str, model: str | None, client, prompts: list, by_priority: bool):
        self.client, self.model, self.prompts = client, model, prompts
        self.cfg = {p: ServeConfig(base_url=url, ignore_eos=True, priority=p if by_priority else None, timeout_s=3600)
                    for p in (0, URGENT, LOW)}

    async def send(self, index: int, priority: int) -> tuple[int, RequestResult]:
        return index, await _send(self.client, self.cfg[priority], self.model, self.prompts[index], _no_count)

    async def poisson(self, indices: list[int], rate: float, priority: int, seed: int) -> list[tuple[int, RequestResult]]:
        tasks = [asyncio.create_task(self.send(indices[i], priority))
                 async for i in _arrivals(len(indices), rate, 1.0, random.Random(seed))]
        return list(await asyncio.gather(*tasks))

    async def closed_loop(self, indices: list[int], concurrency: int, seconds: float) -> float:
        """Requests per second completed with `concurrency` low-priority requests always in flight."""
        done = 0
        end = time.perf_counter() + seconds

        async def worker(k: int) -> None:
            nonlocal done
            i = k
            while time.perf_counter() < end:
                _, r = await self.send(indices[i % len(indices)], LOW)
                done += r.ok
                i += concurrency

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return done / (time.perf_counter() - start)


def _ttft_ms(results: list[tuple[int, RequestResult]]) -> dict:
    ttfts = [r.ttft * 1000 for _, r in results if r.ok]
    if not ttfts:
        return {"n": 0}
    return {"n": len(ttfts), "p50": float(np.percentile(ttfts, 50)), "p95": float(np.percentile(ttfts, 95)),
            "p99": float(np.percentile(ttfts, 99)), "max": max(ttfts)}


def _mismatches(results: list[tuple[int, RequestResult]], reference: dict[int, str]) -> int:
    return sum(1 for i, r in results if r.ok and r.text != reference[i])


async def one_run(url: str, prompts: list, num_urgent_prompts: int, args, seed: int) -> dict:
    async with _client(ServeConfig(base_url=url, timeout_s=3600), 100_000) as client:
        load = Load(url, await _discover_model(client), client, prompts, args.scheduling_policy == "priority")
        urgent_ids = list(range(num_urgent_prompts))
        low_ids = list(range(num_urgent_prompts, len(prompts)))
        reference = {}
        for i in range(len(prompts)):  # 0: one at a time on the idle server
            _, r = await load.send(i, 0)
            assert r.ok, r.error
            reference[i] = r.text
        mu = await load.closed_loop(low_ids, 2 * args.max_num_seqs, args.mu_seconds)  # 1
        rate = mu / args.trickle_div
        rng = random.Random(seed)
        trickle = [rng.choice(urgent_ids) for _ in range(args.num_urgent)]
        server = [_server_histograms(url)]
        idle_before = await load.poisson(trickle, rate, URGENT, seed)  # 2
        server.append(_server_histograms(url))
        span = args.num_urgent / rate
        num_low = round(args.overload * mu * span)
        lows = [rng.choice(low_ids) for _ in range(num_low)]
        start = time.perf_counter()
        loaded, low = await asyncio.gather(load.poisson(trickle, rate, URGENT, seed),  # 3
                                           load.poisson(lows, args.overload * mu, LOW, seed + 2))
        loaded_s = time.perf_counter() - start
        server.append(_server_histograms(url))
        idle_after = await load.poisson(trickle, rate, URGENT, seed)  # 4
        server.append(_server_histograms(url))
    p99_idle = max(_ttft_ms(idle_before).get("p99", math.inf), _ttft_ms(idle_after).get("p99", math.inf))
    p99_loaded = _ttft_ms(loaded).get("p99", math.inf)
    failed_low = [r.error for _, r in low if not r.ok]
    mismatches = {name: _mismatches(res, reference) for name, res in
                  (("urgent_idle_before", idle_before), ("urgent_loaded", loaded), ("urgent_idle_after", idle_after),
                   ("low", low))}
    return {
        "sustainable_requests_per_s": mu, "urgent_rate_per_s": rate, "low_rate_per_s": args.overload * mu,
        "num_low": num_low, "loaded_phase_s": loaded_s,
        "urgent_ttft_ms": {"idle_before": _ttft_ms(idle_before), "loaded": _ttft_ms(loaded),
                           "idle_after": _ttft_ms(idle_after)},
        "urgent_p99_ratio": p99_loaded / p99_idle,
        "urgent_server_side": {phase: _server_side(a, b) for phase, a, b in
                               zip(("idle_before", "loaded", "idle_after"), server, server[1:])},
        "low_completed": len(low) - len(failed_low), "low_failed": len(failed_low), "low_errors": failed_low[:5],
        "low_e2el_max_s": max((r.e2el for _, r in low if r.ok), default=None),
        "output_mismatches": mismatches,
        "pass": p99_loaded <= 2 * p99_idle and not failed_low and not any(mismatches.values()),
    }


def _samples(url: str):
    import httpx2 as httpx
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        yield from family.samples


def _metrics(url: str) -> dict[str, float]:
    return {s.name: s.value for s in _samples(url) if s.name in (
        "vllm:num_preemptions_total", "thrifty:priority_preemptions_total",
        "thrifty:preemption_recovered_tokens_total", "vllm:prompt_tokens_total")}


SERVER_HISTOGRAMS = {"ttft": "thrifty:time_to_first_token_seconds_by_priority",
                     "queue": "thrifty:request_queue_time_seconds_by_priority"}


def _server_histograms(url: str) -> dict[tuple[str, str], float]:
    """The urgent class's server-side TTFT and queue-time histograms: (name, le or sum/count) -> value."""
    out = {}
    for s in _samples(url):
        for short, name in SERVER_HISTOGRAMS.items():
            if s.labels.get("priority_class") != str(URGENT):
                continue
            if s.name == f"{name}_bucket":
                out[(short, s.labels["le"])] = s.value
            elif s.name in (f"{name}_sum", f"{name}_count"):
                out[(short, s.name.rsplit("_", 1)[1])] = s.value
    return out


def _server_side(before: dict, after: dict) -> dict:
    """What the server measured for one urgent phase (from its arrival in the engine, so without HTTP
    and the client): the mean, and the p99 as the upper bound of its histogram bucket, in ms."""
    out = {}
    for short in SERVER_HISTOGRAMS:
        count = after.get((short, "count"), 0) - before.get((short, "count"), 0)
        if not count:
            continue
        total = after[(short, "sum")] - before.get((short, "sum"), 0)
        bounds = sorted((float(le), after[(s, le)] - before.get((s, le), 0))
                        for s, le in after if s == short and le not in ("sum", "count"))
        p99 = next(le for le, n in bounds if n >= 0.99 * count)
        out[short] = {"mean_ms": 1000 * total / count, "p99_bucket_ms": 1000 * p99}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--scheduling-policy", default="priority", choices=["priority", "fcfs"])
    ap.add_argument("--max-num-seqs", type=int, default=4)
    # The urgent request waits for the step in flight, and the token budget bounds that step:
    # half the prompt length keeps it at about half the urgent prompt's own prefill, prefill time
    # being about linear in tokens on a CPU (benchmarks/step_costs.py measures it).
    ap.add_argument("--max-num-batched-tokens", type=int, default=32)
    # float32: its kernels give a row the same result whatever else is in the batch, so "unchanged
    # outputs" tests the scheduler; bf16's do not (greedy outputs move with batch composition, fcfs too).
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--num-urgent", type=int, default=40, help="urgent requests per trickle")
    ap.add_argument("--trickle-div", type=float, default=6.0, help="the trickle's rate is mu / this")
    ap.add_argument("--overload", type=float, default=3.0, help="low-priority rate as a multiple of mu")
    ap.add_argument("--mu-seconds", type=float, default=20.0)
    ap.add_argument("--serve-args", default="", help="more `thrifty serve` flags")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tok = load_tokenizer(resolve_model(None))
    # 8 urgent prompts, 16 low ones; prefix caching off, so repeats are computed like new prompts.
    prompts = make_serve_prompts("random", tok, 24, args.input_len, args.output_len, seed=0)
    gc.collect()
    gc.freeze()  # the client's own collections (the tokenizer is loaded here too) must not add to its TTFTs
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = ["serve", "--port", str(port), "--scheduling-policy", args.scheduling_policy, "--max-num-seqs", str(args.max_num_seqs),
             "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--dtype", args.dtype,
             "--no-enable-prefix-caching", "--max-waiting-requests", "0", "--disable-uvicorn-access-log",
             "--log-level", "warning", *args.serve_args.split()]
    proc = start_thrifty(serve, url, 300, stdout=subprocess.DEVNULL)
    try:
        for run in range(args.runs):
            result = asyncio.run(one_run(url, prompts, 8, args, seed=1000 * run))
            emit_json_line({"benchmark": "priority_overload", "run": run, "serve_args": serve[3:],
                            "input_len": args.input_len, "output_len": args.output_len, "num_urgent": args.num_urgent,
                            "overload": args.overload, **result, "server_counters": _metrics(url)}, args.json)
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
