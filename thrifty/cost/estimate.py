"""ESTIMATE another device's numbers from a result measured on one device, with the price table.

The model is the roofline's first-order one, and it is labelled ESTIMATE wherever it appears:
decode reads every weight (and the KV cache) once per step, so decode throughput, TPOT and ITL scale
with memory bandwidth (B / A); prefill is matrix multiplies over the whole prompt, so TTFT scales with
peak dense FLOP/s (A / B). The output keeps the input's JSON shape (so `thrifty cost plan` can read an
estimated sweep) and adds `"estimate": true`, the assumptions and the ratios.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from thrifty.cost.formula import (
    PER_MILLION,
    SECONDS_PER_HOUR,
    check_number,
    num,
    table_lines,
)
from thrifty.cost.prices import PriceEntry, PriceTable

ESTIMATE = "ESTIMATE"


@dataclass(frozen=True)
class DeviceScaling:
    from_device: PriceEntry
    to_device: PriceEntry
    bandwidth_ratio: float  # B / A
    flops_ratio: float  # B / A
    price_per_hour_usd: float  # of the estimated machine
    price_from: str

    def assumptions(self) -> list[str]:
        return [
            f"{ESTIMATE}, not a measurement: the result was measured on {self.from_device.name} and scaled "
            f"to {self.to_device.name} with datasheet peaks.",
            "Decode is memory-bound: request and token throughputs scale by the bandwidth ratio, TPOT and "
            "ITL by its inverse.",
            "Prefill is compute-bound: TTFT scales by the inverse FLOP/s ratio.",
            "E2E latency = scaled TTFT + (E2E - TTFT) / bandwidth ratio, per statistic (approximate for "
            "percentiles).",
            "Queueing is assumed unchanged; near or beyond a device's capacity real latencies grow faster. "
            "At a finite request rate the throughput cannot exceed the offered rate.",
            "One device replaces one device; the model and engine settings are the same, and the model "
            "must fit the new device's memory (not checked).",
            "Goodput needs per-request latencies and is not estimated: rerun the benchmark on the device.",
        ]

    def lines(self) -> list[str]:
        a, b = self.from_device, self.to_device
        return [
            f"{ESTIMATE} (not a measurement): {b.name}, scaled from a result measured on {a.name}",
            f"  bandwidth ratio = {num(b.memory_bandwidth_gbps)} / {num(a.memory_bandwidth_gbps)} GB/s = "
            f"{num(self.bandwidth_ratio)}   (decode throughput x ratio; TPOT, ITL / ratio)",
            f"  FLOP/s ratio    = {num(b.peak_bf16_tflops)} / {num(a.peak_bf16_tflops)} TFLOP/s = "
            f"{num(self.flops_ratio)}   (TTFT / ratio)",
            f"  price per hour  = {num(self.price_per_hour_usd)} USD ({self.price_from})",
        ]

    def to_dict(self) -> dict:
        return {"from_device": self.from_device.name, "to_device": self.to_device.name,
                "bandwidth_ratio": self.bandwidth_ratio, "flops_ratio": self.flops_ratio,
                "from_memory_bandwidth_gbps": self.from_device.memory_bandwidth_gbps,
                "to_memory_bandwidth_gbps": self.to_device.memory_bandwidth_gbps,
                "from_peak_bf16_tflops": self.from_device.peak_bf16_tflops,
                "to_peak_bf16_tflops": self.to_device.peak_bf16_tflops,
                "price_per_hour_usd": self.price_per_hour_usd, "price_from": self.price_from}


def _needs(entry: PriceEntry, field_name: str) -> None:
    for key in ("memory_bandwidth_gbps", "peak_bf16_tflops"):
        if getattr(entry, key) is None:
            raise ValueError(f"{field_name}: {entry.name!r} has no {key} in the price table; add a measured "
                             "figure with --prices FILE")


def device_scaling(from_device: str, to_device: str, table: PriceTable,
                   price_per_hour: float | None = None) -> DeviceScaling:
    a = table.lookup(from_device, "from_device")
    b = table.lookup(to_device, "to_device")
    _needs(a, "from_device")
    _needs(b, "to_device")
    if price_per_hour is None:
        price, price_from = b.price_per_hour_usd, f"price table: {b.name}, {b.date}"
    else:
        price, price_from = check_number("price_per_hour", price_per_hour, allow_equal=True), "--price-per-hour"
    return DeviceScaling(a, b, b.memory_bandwidth_gbps / a.memory_bandwidth_gbps,
                         b.peak_bf16_tflops / a.peak_bf16_tflops, price, price_from)


# ---- scaling results ---------------------------------------------------------------------------

def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _divided(stats: dict | None, by: float) -> dict | None:
    if not isinstance(stats, dict):
        return stats
    return {k: (v / by if _is_number(v) else v) for k, v in stats.items()}


def _cost_per_million(price: float, tokens_per_s: float | None) -> float | None:
    if not tokens_per_s:
        return None
    return price / (tokens_per_s * SECONDS_PER_HOUR) * PER_MILLION


def _mark(result: dict, sc: DeviceScaling) -> None:
    result["estimate"] = True
    result["estimate_assumptions"] = sc.assumptions()
    result["estimated_from"] = sc.to_dict()


def _estimate_serve(point: dict, sc: DeviceScaling) -> dict:
    r, f = sc.bandwidth_ratio, sc.flops_ratio
    out = copy.deepcopy(point)
    measured = check_number("result.request_throughput", point.get("request_throughput"), allow_equal=True)
    throughput = measured * r
    rate = point.get("request_rate")
    if _is_number(rate) and math.isfinite(rate) and rate > 0:
        throughput = min(throughput, rate)  # an open-loop client never sends faster than its rate
    k = throughput / measured if measured else r
    out["request_throughput"] = throughput
    for key in ("output_throughput", "total_token_throughput"):
        if _is_number(point.get(key)):
            out[key] = point[key] * k
    if _is_number(point.get("duration_s")) and k:
        out["duration_s"] = point["duration_s"] / k
    out["ttft_ms"] = _divided(point.get("ttft_ms"), f)
    out["tpot_ms"] = _divided(point.get("tpot_ms"), r)
    out["itl_ms"] = _divided(point.get("itl_ms"), r)
    ttft, e2el = point.get("ttft_ms"), point.get("e2el_ms")
    if isinstance(ttft, dict) and isinstance(e2el, dict):
        out["e2el_ms"] = {k2: (out["ttft_ms"][k2] + (v - ttft[k2]) / r
                               if _is_number(v) and _is_number(ttft.get(k2)) else None)
                          for k2, v in e2el.items()}
    out["goodput"] = None
    price = sc.price_per_hour_usd
    out["price_per_hour_usd"] = price
    out["cost_per_million_output_tokens_usd"] = _cost_per_million(price, out.get("output_throughput"))
    out["cost_per_million_tokens_usd"] = _cost_per_million(price, out.get("total_token_throughput"))
    duration = out.get("duration_s")
    out["cost_usd"] = price * duration / 3600 if _is_number(price) and _is_number(duration) else None
    for measured_only in ("server_reported_cost_usd", "server_counters_delta"):
        out.pop(measured_only, None)  # what the measured server said does not carry over
    out["machine"] = sc.to_device.name
    out["label"] = f"{ESTIMATE} {sc.to_device.name} from {point.get('label') or 'result'}"
    _mark(out, sc)
    return out


def _estimate_throughput(result: dict, sc: DeviceScaling) -> dict:
    # `thrifty bench throughput` has no latencies: everything is throughput, dominated by decode.
    r = sc.bandwidth_ratio
    out = copy.deepcopy(result)
    for key in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s"):
        if _is_number(result.get(key)):
            out[key] = result[key] * r
    if _is_number(result.get("elapsed_s")):
        out["elapsed_s"] = result["elapsed_s"] / r
    out["device"] = sc.to_device.name
    out["price_per_hour_usd"] = sc.price_per_hour_usd
    out["cost_per_million_output_tokens_usd"] = _cost_per_million(sc.price_per_hour_usd,
                                                                  out.get("output_tokens_per_s"))
    _mark(out, sc)
    return out


def result_kind(result: object) -> str:
    if isinstance(result, dict):
        if result.get("kind") in ("bench_serve", "bench_sweep"):
            return result["kind"]
        if "output_tokens_per_s" in result:
            return "bench_throughput"
    raise ValueError("result: expected a bench_serve, bench_sweep or bench throughput JSON object")


def estimate_result(result: dict, sc: DeviceScaling) -> dict:
    kind = result_kind(result)
    if kind == "bench_serve":
        return _estimate_serve(result, sc)
    if kind == "bench_throughput":
        return _estimate_throughput(result, sc)
    points = result.get("points")
    if not isinstance(points, list):
        raise ValueError("result.points must be a list")
    out = copy.deepcopy(result)
    out["points"] = [_estimate_serve(p, sc) for p in points]
    out["price_per_hour_usd"] = sc.price_per_hour_usd
    out["machine"] = sc.to_device.name
    out["label"] = f"{ESTIMATE} {sc.to_device.name} from {result.get('label') or 'sweep'}"
    _mark(out, sc)
    return out


# ---- text --------------------------------------------------------------------------------------

def _p(stats: object, key: str) -> float | None:
    return stats.get(key) if isinstance(stats, dict) else None


_SERVE_ROWS = (
    ("req/s", lambda d: d.get("request_throughput")),
    ("output tok/s", lambda d: d.get("output_throughput")),
    ("p50 TTFT ms", lambda d: _p(d.get("ttft_ms"), "p50")),
    ("p99 TTFT ms", lambda d: _p(d.get("ttft_ms"), "p99")),
    ("p50 TPOT ms", lambda d: _p(d.get("tpot_ms"), "p50")),
    ("p99 TPOT ms", lambda d: _p(d.get("tpot_ms"), "p99")),
    ("p99 E2E ms", lambda d: _p(d.get("e2el_ms"), "p99")),
    ("$/hour", lambda d: d.get("price_per_hour_usd")),
    ("$/1M output tokens", lambda d: d.get("cost_per_million_output_tokens_usd")),
)
_THROUGHPUT_ROWS = (
    ("req/s", lambda d: d.get("requests_per_s")),
    ("output tok/s", lambda d: d.get("output_tokens_per_s")),
    ("total tok/s", lambda d: d.get("total_tokens_per_s")),
    ("elapsed s", lambda d: d.get("elapsed_s")),
    ("$/hour", lambda d: d.get("price_per_hour_usd")),
    ("$/1M output tokens", lambda d: d.get("cost_per_million_output_tokens_usd")),
)


def _compare(measured: dict, estimated: dict, rows, sc: DeviceScaling, indent: str) -> list[str]:
    head = ["", f"measured on {sc.from_device.name}", f"{ESTIMATE} on {sc.to_device.name}"]
    body = [[label, num(get(measured)), num(get(estimated))] for label, get in rows]
    return table_lines([head, *body], indent=indent)


def estimate_lines(measured: dict, estimated: dict, sc: DeviceScaling) -> list[str]:
    out = sc.lines()
    kind = result_kind(measured)
    if kind == "bench_sweep":
        points = measured["points"]
        values = measured.get("values")
        swept = measured.get("sweep", "value")
        if not isinstance(values, list) or len(values) != len(points):
            values, swept = list(range(len(points))), "point"
        for value, m, e in zip(values, points, estimated["points"]):
            out.append(f"  {swept} = {value}")
            out += _compare(m, e, _SERVE_ROWS, sc, "    ")
    else:
        out += _compare(measured, estimated, _SERVE_ROWS if kind == "bench_serve" else _THROUGHPUT_ROWS, sc, "  ")
    out.append("  assumptions")
    out += [f"    - {a}" for a in sc.assumptions()]
    return out
