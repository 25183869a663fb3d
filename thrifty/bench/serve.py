"""`thrifty bench serve`: an asyncio load generator for any OpenAI-compatible server.

Metric definitions follow `vllm bench serve`: TTFT = arrival to first content chunk; ITL = gaps
between content chunks; TPOT = (E2EL - TTFT) / (output tokens - 1); E2EL = send to last byte.
Token counts come from the server's own `usage` (streamed with include_usage), so they equal
its counters; a server that sends no usage gets counted with the local tokenizer instead.
Every request failure (HTTP error, refused connection, timeout) is counted, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field

import httpx2 as httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from thrifty.bench.datasets import ServePrompt
from thrifty.cpuinfo import cpu_name

_PERCENTILES = (50, 90, 99)


@dataclass
class ServeConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None
    endpoint: str = "completions"  # or "chat"
    request_rate: float = math.inf  # requests/s; inf sends everything at once
    burstiness: float = 1.0  # gamma shape of inter-arrival times: 1 = Poisson, < 1 burstier
    max_concurrency: int | None = None
    seed: int = 0
    api_key: str | None = None
    goodput: dict[str, float] = field(default_factory=dict)  # {"ttft"|"tpot"|"e2el": ms}
    price_per_hour: float | None = None
    timeout_s: float = 600.0
    label: str | None = None
    ignore_eos: bool = False
    priority: int | None = None  # vLLM's extra field, for servers with priority scheduling
    # Servers whose /metrics counters the result reports (summed): through a router, its backends.
    metrics_urls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be 'completions' or 'chat', got {self.endpoint!r}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (or inf), got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        bad = set(self.goodput) - {"ttft", "tpot", "e2el"}
        if bad:
            raise ValueError(f"goodput: unknown SLO(s) {sorted(bad)}; use ttft, tpot, e2el")
        if self.price_per_hour is not None and self.price_per_hour < 0:
            raise ValueError(f"price_per_hour must be >= 0, got {self.price_per_hour}")


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        try:
            slos[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or slos[name] <= 0:
            raise ValueError(f"goodput: expected NAME:MS with a positive number, got {item!r}")
    return slos


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""  # what was generated

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


# -- one request --------------------------------------------------------------------------------
def _payload(cfg: ServeConfig, model: str | None, p: ServePrompt) -> tuple[str, dict]:
    body: dict = {"max_tokens": p.output_len, "temperature": 0.0, "stream": True,
                  "stream_options": {"include_usage": True}}
    if model is not None:
        body["model"] = model
    if cfg.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extra field; other servers ignore it
    if cfg.priority is not None:
        body["priority"] = cfg.priority
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": p.prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = p.prompt
    return "/v1/completions", body


def _content(chunk: dict) -> str:
    texts = []
    for c in chunk.get("choices") or []:
        if isinstance(c, dict):
            delta = c.get("delta") if isinstance(c.get("delta"), dict) else {}
            piece = c.get("text") or delta.get("content") or ""
            texts.append(piece if isinstance(piece, str) else "")
    return "".join(texts)


def _error_message(error) -> str:
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


def _int(value) -> int:
    return value if isinstance(value, int) else 0


async def _send(client: httpx.AsyncClient, cfg: ServeConfig, model: str | None, p: ServePrompt,
                count_tokens) -> RequestResult:
    """One request, whatever the server does: any failure is returned as a result, never raised.
    The timeout is for the whole request (httpx's own only bounds each read)."""
    try:
        return await asyncio.wait_for(_stream_one(client, cfg, model, p, count_tokens), cfg.timeout_s)
    except asyncio.TimeoutError:
        return RequestResult(error=f"TimeoutError: no complete answer within {cfg.timeout_s:g} s")
    except Exception as e:  # noqa: BLE001 - an odd server must not end the run
        return RequestResult(error=f"{type(e).__name__}: {e}")


async def _stream_one(client: httpx.AsyncClient, cfg: ServeConfig, model: str | None, p: ServePrompt,
                      count_tokens) -> RequestResult:
    path, body = _payload(cfg, model, p)
    r = RequestResult()
    start = last = time.perf_counter()
    text = []
    usage = None
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:200]
                r.error = f"HTTP {resp.status_code}: {detail}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    r.error = f"unexpected stream data: {data[:100]}"
                    return r
                if "error" in chunk:
                    r.error = f"in-stream error: {_error_message(chunk['error'])}"
                    return r
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                piece = _content(chunk)
                if piece:
                    now = time.perf_counter()
                    if not text:
                        r.ttft = now - start
                    else:
                        r.itl.append(now - last)
                    last = now
                    text.append(piece)
    except (httpx.HTTPError, OSError, json.JSONDecodeError) as e:
        r.error = f"{type(e).__name__}: {e}"
        return r
    r.e2el = time.perf_counter() - start
    r.text = "".join(text)
    if usage:
        r.prompt_tokens, r.output_tokens = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
        cost = usage.get("cost_usd")
        r.cost_usd = float(cost) if isinstance(cost, (int, float)) else None
    else:  # a server without usage in streams: count locally
        r.prompt_tokens, r.output_tokens = count_tokens(p.prompt), count_tokens(r.text)
    if not text and r.output_tokens == 0:
        r.error = "no output"
        return r
    r.ok = True
    return r


# -- the run ------------------------------------------------------------------------------------
async def _arrivals(n: int, rate: float, burstiness: float, rng: random.Random):
    """Yields request indices at Poisson (burstiness 1) or gamma-distributed intervals."""
    for i in range(n):
        yield i
        if math.isfinite(rate) and i < n - 1:
            await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (rate * burstiness)))


async def _server_counters(client: httpx.AsyncClient, urls: list[str]) -> dict[str, float] | None:
    """vllm:prompt_tokens_total etc. from /metrics (of the server, or of each of `urls`), summed
    over labels and servers; None if any is unavailable."""
    wanted = {"vllm:prompt_tokens_total": "prompt_tokens", "vllm:generation_tokens_total": "generation_tokens",
              "vllm:prefix_cache_queries_total": "prefix_cache_queries",
              "vllm:prefix_cache_hits_total": "prefix_cache_hits", "thrifty:cost_usd_total": "cost_usd"}
    out: dict[str, float] = {}
    for url in [f"{u.rstrip('/')}/metrics" for u in urls] or ["/metrics"]:
        try:
            resp = await client.get(url)
            if resp.status_code != 200:
                return None
            families = list(text_string_to_metric_families(resp.text))
        except (httpx.HTTPError, ValueError):  # unreachable, or not Prometheus text
            return None
        for sample in (s for family in families for s in family.samples if s.name in wanted):
            out[wanted[sample.name]] = out.get(wanted[sample.name], 0.0) + sample.value
    return out or None


async def warm_up(cfg: ServeConfig, prompts: list[ServePrompt], count_tokens) -> None:
    """Requests sent before measuring (results dropped), so the run sees a warm server."""
    if not prompts:
        return
    async with _client(cfg) as client:
        model = cfg.model or await _discover_model(client)
        for p in prompts:
            await _send(client, cfg, model, p, count_tokens)


def _client(cfg: ServeConfig, max_connections: int | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=100)
    return httpx.AsyncClient(base_url=cfg.base_url, headers=headers, timeout=cfg.timeout_s, limits=limits)


async def _discover_model(client: httpx.AsyncClient) -> str | None:
    try:
        resp = await client.get("/v1/models")
        return str(resp.json()["data"][0]["id"]) if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return None


async def run_serve(cfg: ServeConfig, prompts: list[ServePrompt], count_tokens, dataset: str,
                    progress: bool = True) -> dict:
    async with _client(cfg, cfg.max_concurrency or 10_000) as client:
        model = cfg.model or await _discover_model(client)
        before = await _server_counters(client, cfg.metrics_urls)
        rng = random.Random(cfg.seed)
        gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else contextlib.nullcontext()
        bar = _progress(len(prompts), progress)

        async def one(p: ServePrompt) -> RequestResult:
            async with gate:
                result = await _send(client, cfg, model, p, count_tokens)
            if bar is not None:
                bar.update(1)
            return result

        start = time.perf_counter()
        tasks = [asyncio.create_task(one(prompts[i]))
                 async for i in _arrivals(len(prompts), cfg.request_rate, cfg.burstiness, rng)]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if bar is not None:
            bar.close()
        after = await _server_counters(client, cfg.metrics_urls)
    result = summarize(cfg, results, duration, model, dataset)
    if before is not None and after is not None:
        result["server_counters_delta"] = {k: round(after[k] - before.get(k, 0.0), 9) for k in after}
    return result


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", dynamic_ncols=True)


def _stats_ms(values: list[float]) -> dict[str, float | None]:
    if not values:  # nothing measured (no completed request; TPOT: only 1-token outputs) is null, not 0
        return {"mean": None, **{f"p{q}": None for q in _PERCENTILES}}
    arr = np.asarray(values) * 1000.0
    return {"mean": round(float(arr.mean()), 3),
            **{f"p{q}": round(float(np.percentile(arr, q)), 3) for q in _PERCENTILES}}


def _meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    measured = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.e2el}
    return all(measured[k] * 1000.0 <= ms for k, ms in slos.items())


def summarize(cfg: ServeConfig, results: list[RequestResult], duration: float, model: str | None,
              dataset: str) -> dict:
    ok = [r for r in results if r.ok]
    n_in = sum(r.prompt_tokens for r in ok)
    n_out = sum(r.output_tokens for r in ok)
    price = cfg.price_per_hour
    cost = None if price is None else price * duration / 3600.0
    request_costs = [r.cost_usd for r in ok if r.cost_usd is not None]
    return {
        "kind": "bench_serve",
        "label": cfg.label or f"{model or 'model'} @ {_load_name(cfg)}",
        "base_url": cfg.base_url,
        "model": model,
        "endpoint": cfg.endpoint,
        "dataset": dataset,
        "num_prompts": len(results),
        "request_rate": cfg.request_rate if math.isfinite(cfg.request_rate) else "inf",
        "burstiness": cfg.burstiness,
        "max_concurrency": cfg.max_concurrency,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": round(duration, 3),
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "request_throughput": round(len(ok) / duration, 4) if duration else 0.0,
        "output_throughput": round(n_out / duration, 3) if duration else 0.0,
        "total_token_throughput": round((n_in + n_out) / duration, 3) if duration else 0.0,
        "ttft_ms": _stats_ms([r.ttft for r in ok]),
        "tpot_ms": _stats_ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _stats_ms([x for r in ok for x in r.itl]),
        "e2el_ms": _stats_ms([r.e2el for r in ok]),
        "slos": dict(cfg.goodput),
        "goodput": (round(sum(_meets_slos(r, cfg.goodput) for r in ok) / duration, 4)
                    if cfg.goodput and duration else None),
        "price_per_hour_usd": price,
        "cost_usd": None if cost is None else round(cost, 9),
        "cost_per_million_output_tokens_usd": round(cost / n_out * 1e6, 6) if cost is not None and n_out else None,
        "cost_per_million_tokens_usd": (round(cost / (n_in + n_out) * 1e6, 6)
                                        if cost is not None and n_in + n_out else None),
        "server_reported_cost_usd": round(sum(request_costs), 9) if request_costs else None,
        "machine": cpu_name(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _load_name(cfg: ServeConfig) -> str:
    if cfg.max_concurrency and not math.isfinite(cfg.request_rate):
        return f"concurrency {cfg.max_concurrency}"
    return f"rate {cfg.request_rate:g}/s"


def print_table(result: dict) -> None:
    print("=" * 18 + " thrifty bench serve " + "=" * 18)
    rows = [("label", result["label"]), ("completed", result["completed"]), ("failed", result["failed"]),
            ("duration (s)", result["duration_s"]), ("input tokens", result["total_input_tokens"]),
            ("output tokens", result["total_output_tokens"]),
            ("request throughput (req/s)", result["request_throughput"]),
            ("output throughput (tok/s)", result["output_throughput"]),
            ("total throughput (tok/s)", result["total_token_throughput"])]
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        s = result[metric]
        values = " / ".join("-" if s[k] is None else f"{s[k]:.1f}" for k in ("mean", "p50", "p90", "p99"))
        rows.append((f"{metric.split('_')[0].upper()} ms mean/p50/p90/p99", values))
    if result["goodput"] is not None:
        rows.append((f"goodput (req/s, {result['slos']})", result["goodput"]))
    if result["cost_per_million_output_tokens_usd"] is not None:
        rows.append(("$ per 1M output tokens", result["cost_per_million_output_tokens_usd"]))
    for error in result["errors"]:
        rows.append(("error", error))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
