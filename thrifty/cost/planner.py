"""Capacity planning from measured sweeps: how many replicas, and what they cost, for a workload.

Each sweep file (from `thrifty bench sweep`, or one `thrifty bench serve` result) is one configuration
(e.g. static vs continuous batching, prefix caching on or off). For each, the highest-throughput point
that meets both latency SLOs gives one replica's capacity; the workload's peak demand then gives the
number of replicas, and the replicas' price gives $/day, $/month and $ per 1M tokens. Every input and
intermediate is printed so that the answer can be recomputed by hand.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

from thrifty.cost.formula import (
    DAYS_PER_MONTH,
    HOURS_PER_DAY,
    PER_MILLION,
    check_number,
    num,
    table_lines,
)
from thrifty.jsonio import read_json

SECONDS_PER_DAY = 86400

ASSUMPTIONS = (
    "One replica is the machine a sweep ran on, billed at the price per hour shown; load spreads evenly "
    "over the replicas, which run 24 hours a day (no autoscaling); a month is 30 days.",
    "A replica's capacity is the request throughput of the sweep point with the highest (scaled) throughput "
    "whose p99 TTFT and p99 TPOT both meet the SLOs and which had no failed request.",
    "Capacity is scaled by measured / asked output tokens per request, because decode dominates a "
    "request's service time: a request with twice the output tokens occupies a replica about twice as "
    "long. The prefill cost of a different input length is not rescaled.",
    "Replicas are sized for the peak (peak demand = daily requests / 86400 x peak factor); the p99 "
    "latencies measured at the chosen point are assumed to hold at that load or below.",
)


@dataclass(frozen=True)
class Workload:
    daily_requests: float
    mean_input_tokens: float
    mean_output_tokens: float
    peak_factor: float  # peak request rate / average request rate
    slo_ttft_ms: float  # p99 time to first token
    slo_tpot_ms: float  # p99 time per output token

    def __post_init__(self) -> None:
        check_number("daily_requests", self.daily_requests)
        check_number("mean_input_tokens", self.mean_input_tokens, allow_equal=True)
        check_number("mean_output_tokens", self.mean_output_tokens)
        check_number("peak_factor", self.peak_factor, minimum=1.0, allow_equal=True)
        check_number("slo_ttft_ms", self.slo_ttft_ms)
        check_number("slo_tpot_ms", self.slo_tpot_ms)

    @property
    def average_demand_rps(self) -> float:
        return self.daily_requests / SECONDS_PER_DAY

    @property
    def peak_demand_rps(self) -> float:
        return self.average_demand_rps * self.peak_factor

    @property
    def daily_tokens(self) -> float:
        return self.daily_requests * (self.mean_input_tokens + self.mean_output_tokens)

    @property
    def daily_output_tokens(self) -> float:
        return self.daily_requests * self.mean_output_tokens

    def lines(self) -> list[str]:
        return [
            "workload",
            f"  daily requests          = {num(self.daily_requests)}",
            f"  mean input tokens       = {num(self.mean_input_tokens)}",
            f"  mean output tokens      = {num(self.mean_output_tokens)}",
            f"  peak factor             = {num(self.peak_factor)}",
            f"  SLO p99 TTFT            = {num(self.slo_ttft_ms)} ms",
            f"  SLO p99 TPOT            = {num(self.slo_tpot_ms)} ms",
            f"  average demand (req/s)  = daily requests / 86400 = {num(self.daily_requests)} / 86400 = "
            f"{num(self.average_demand_rps)}",
            f"  peak demand (req/s)     = average demand x peak factor = {num(self.average_demand_rps)} x "
            f"{num(self.peak_factor)} = {num(self.peak_demand_rps)}",
            f"  daily tokens            = daily requests x (input + output) = {num(self.daily_requests)} x "
            f"({num(self.mean_input_tokens)} + {num(self.mean_output_tokens)}) = {num(self.daily_tokens)}",
            f"  daily output tokens     = daily requests x output = {num(self.daily_requests)} x "
            f"{num(self.mean_output_tokens)} = {num(self.daily_output_tokens)}",
        ]

    def to_dict(self) -> dict:
        return {"daily_requests": self.daily_requests, "mean_input_tokens": self.mean_input_tokens,
                "mean_output_tokens": self.mean_output_tokens, "peak_factor": self.peak_factor,
                "slo_ttft_ms": self.slo_ttft_ms, "slo_tpot_ms": self.slo_tpot_ms,
                "average_demand_rps": self.average_demand_rps, "peak_demand_rps": self.peak_demand_rps,
                "daily_tokens": self.daily_tokens, "daily_output_tokens": self.daily_output_tokens}


# ---- reading sweeps ----------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepPoint:
    value: object  # the swept value: a request rate (or "inf") or a max concurrency
    completed: int
    failed: int
    request_throughput: float  # req/s
    total_input_tokens: int
    total_output_tokens: int
    ttft_p99_ms: float | None
    tpot_p99_ms: float | None

    @property
    def mean_output_tokens(self) -> float | None:
        return self.total_output_tokens / self.completed if self.completed else None

    @property
    def mean_input_tokens(self) -> float | None:
        return self.total_input_tokens / self.completed if self.completed else None

    def to_dict(self) -> dict:
        return {"value": self.value, "completed": self.completed, "failed": self.failed,
                "request_throughput": self.request_throughput, "total_input_tokens": self.total_input_tokens,
                "total_output_tokens": self.total_output_tokens, "mean_input_tokens": self.mean_input_tokens,
                "mean_output_tokens": self.mean_output_tokens, "ttft_p99_ms": self.ttft_p99_ms,
                "tpot_p99_ms": self.tpot_p99_ms}


@dataclass(frozen=True)
class Sweep:
    label: str
    source: str  # the file it came from
    swept: str  # "request_rate" or "max_concurrency"
    price_per_hour_usd: float | None
    machine: str
    date: str
    estimate: bool  # True when the file is an estimate for another device (thrifty cost estimate)
    points: tuple[SweepPoint, ...]


def _field(obj: dict, key: str, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{where}.{key} is missing")
    return obj[key]


def _p99(obj: dict, key: str, where: str) -> float | None:
    stats = obj.get(key)
    if stats is None:
        return None
    p99 = _field(stats, "p99", f"{where}.{key}")
    # No completed request (or single-token outputs for TPOT) leaves a null percentile.
    return None if p99 is None else check_number(f"{where}.{key}.p99", p99, allow_equal=True)


def _point(obj: dict, value: object, where: str) -> SweepPoint:
    def count(key: str) -> int:
        v = _field(obj, key, where)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{where}.{key} must be an integer >= 0, got {v!r}")
        return v

    return SweepPoint(
        value=value, completed=count("completed"), failed=count("failed"),
        request_throughput=check_number(f"{where}.request_throughput", _field(obj, "request_throughput", where),
                                        allow_equal=True),
        total_input_tokens=count("total_input_tokens"), total_output_tokens=count("total_output_tokens"),
        ttft_p99_ms=_p99(obj, "ttft_ms", where), tpot_p99_ms=_p99(obj, "tpot_ms", where))


def parse_sweep(data: object, source: str) -> Sweep:
    """A sweep from a `bench_sweep` object, or a one-point sweep from a `bench_serve` object."""
    if not isinstance(data, dict) or data.get("kind") not in ("bench_sweep", "bench_serve"):
        kind = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"sweep: {source} is not a bench_sweep or bench_serve result (kind {kind!r})")
    if data["kind"] == "bench_serve":
        # A lone result run with a concurrency cap and no rate limit was loaded by its concurrency.
        capped = data.get("max_concurrency") is not None and str(data.get("request_rate")) in ("inf", "Infinity")
        swept = "max_concurrency" if capped else "request_rate"
        points = (_point(data, data.get(swept), source),)
    else:
        swept = str(data.get("sweep") or "value")
        raw = _field(data, "points", source)
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{source}.points must be a non-empty list")
        values = data.get("values")
        if not isinstance(values, list) or len(values) != len(raw):
            values = [p.get(swept) if isinstance(p, dict) else None for p in raw]
        points = tuple(_point(p, v, f"{source}.points[{i}]") for i, (p, v) in enumerate(zip(raw, values)))
    price = data.get("price_per_hour_usd")
    if price is not None:
        price = check_number(f"{source}.price_per_hour_usd", price, allow_equal=True)
    label = str(data.get("label") or os.path.splitext(os.path.basename(source))[0])
    return Sweep(label, source, swept, price, str(data.get("machine", "")), str(data.get("date", "")),
                 bool(data.get("estimate", False)), points)


def load_sweep(path: str) -> Sweep:
    return parse_sweep(read_json(path, "sweep"), path)


# ---- planning ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PointCheck:
    point: SweepPoint
    reasons: tuple[str, ...]  # why the point misses; empty when it meets the SLOs

    @property
    def meets_slos(self) -> bool:
        return not self.reasons


def check_point(point: SweepPoint, w: Workload) -> PointCheck:
    why = []
    if point.completed == 0:
        why.append("no completed request")
    if point.failed:
        why.append(f"{point.failed} failed")
    if point.completed and (point.total_output_tokens == 0 or point.request_throughput == 0):
        why.append("no output tokens or no throughput measured")
    if point.ttft_p99_ms is None:
        why.append("no TTFT measured")
    elif point.ttft_p99_ms > w.slo_ttft_ms:
        why.append(f"p99 TTFT {num(point.ttft_p99_ms)} > {num(w.slo_ttft_ms)} ms")
    if point.tpot_p99_ms is None:
        why.append("no TPOT measured")
    elif point.tpot_p99_ms > w.slo_tpot_ms:
        why.append(f"p99 TPOT {num(point.tpot_p99_ms)} > {num(w.slo_tpot_ms)} ms")
    return PointCheck(point, tuple(why))


@dataclass(frozen=True)
class Sizing:
    """The replicas for one configuration, from its chosen point, and every intermediate."""

    point: SweepPoint
    output_scale: float  # measured output tokens per request / asked
    capacity_rps: float  # one replica, at the workload's output length
    replicas: int
    cost_per_day_usd: float
    cost_per_month_usd: float
    cost_per_million_tokens_usd: float
    cost_per_million_output_tokens_usd: float
    utilization: float  # average demand / (replicas x capacity)


def size_replicas(w: Workload, point: SweepPoint, price_per_hour: float) -> Sizing:
    scale = point.mean_output_tokens / w.mean_output_tokens
    capacity = point.request_throughput * scale
    # The relative slack keeps a ratio that is an integer on paper (e.g. 3.0000000000000004 after
    # float rounding) from buying one replica too many.
    replicas = math.ceil(w.peak_demand_rps / capacity * (1 - 1e-12))
    per_day = replicas * price_per_hour * HOURS_PER_DAY
    return Sizing(point, scale, capacity, replicas, per_day, per_day * DAYS_PER_MONTH,
                  per_day / (w.daily_tokens / PER_MILLION), per_day / (w.daily_output_tokens / PER_MILLION),
                  w.average_demand_rps / (replicas * capacity))


@dataclass(frozen=True)
class ConfigPlan:
    sweep: Sweep
    price_per_hour_usd: float
    price_from: str  # "sweep file" or "--price-per-hour"
    checks: tuple[PointCheck, ...]
    sizing: Sizing | None  # None: no point meets both SLOs

    @property
    def title(self) -> str:
        estimate = self.sweep.estimate and "ESTIMATE" not in self.sweep.label
        return self.sweep.label + (" (ESTIMATE)" if estimate else "")


def plan_config(w: Workload, sweep: Sweep, price_per_hour: float | None = None) -> ConfigPlan:
    if price_per_hour is not None:
        price, price_from = check_number("price_per_hour", price_per_hour, allow_equal=True), "--price-per-hour"
    elif sweep.price_per_hour_usd is not None:
        price, price_from = sweep.price_per_hour_usd, "sweep file"
    else:
        raise ValueError(f"price_per_hour: {sweep.source} has no price_per_hour_usd; give --price-per-hour")
    checks = tuple(check_point(p, w) for p in sweep.points)
    meeting = [c.point for c in checks if c.meets_slos]
    sizing = None
    if meeting:
        # Highest capacity at the workload's output length; the first such point on a tie.
        best = max(meeting, key=lambda p: p.request_throughput * p.mean_output_tokens / w.mean_output_tokens)
        sizing = size_replicas(w, best, price)
    return ConfigPlan(sweep, price, price_from, checks, sizing)


@dataclass(frozen=True)
class Plan:
    workload: Workload
    configs: tuple[ConfigPlan, ...]

    def lines(self) -> list[str]:
        w = self.workload
        out = ["thrifty cost plan", *w.lines(), "", "configurations side by side", *self._side_by_side(), ""]
        for c in self.configs:
            out += self._detail(c) + [""]
        out.append("assumptions")
        out += [f"  - {a}" for a in ASSUMPTIONS]
        return out

    def _side_by_side(self) -> list[str]:
        def row(label: str, get) -> list[str]:
            return [label] + [get(c) for c in self.configs]

        def sized(get):
            return lambda c: get(c.sizing) if c.sizing else "-"

        rows = [
            row("configuration", lambda c: c.title),
            row("machine", lambda c: c.sweep.machine or "-"),
            row("$/hour per replica", lambda c: num(c.price_per_hour_usd)),
            row("meets SLOs", lambda c: "yes" if c.sizing else "NO POINT"),
            row(f"chosen point ({self._swept_names()})", sized(lambda s: _value_text(s.point.value))),
            row("measured req/s", sized(lambda s: num(s.point.request_throughput))),
            row("measured p99 TTFT ms", sized(lambda s: num(s.point.ttft_p99_ms))),
            row("measured p99 TPOT ms", sized(lambda s: num(s.point.tpot_p99_ms))),
            row("measured out tok/req", sized(lambda s: num(s.point.mean_output_tokens))),
            row("output scale", sized(lambda s: num(s.output_scale))),
            row("capacity req/s/replica", sized(lambda s: num(s.capacity_rps))),
            row("peak demand req/s", lambda c: num(self.workload.peak_demand_rps)),
            row("replicas", sized(lambda s: str(s.replicas))),
            row("$/day", sized(lambda s: num(s.cost_per_day_usd))),
            row("$/month (30 days)", sized(lambda s: num(s.cost_per_month_usd))),
            row("$/1M tokens", sized(lambda s: num(s.cost_per_million_tokens_usd))),
            row("$/1M output tokens", sized(lambda s: num(s.cost_per_million_output_tokens_usd))),
            row("utilization", sized(lambda s: num(s.utilization))),
        ]
        return table_lines(rows, indent="  ")

    def _swept_names(self) -> str:
        return "/".join(dict.fromkeys(c.sweep.swept for c in self.configs))

    def _detail(self, c: ConfigPlan) -> list[str]:
        w, sw = self.workload, c.sweep
        out = [f"[{c.title}] {sw.source}" + (f" (machine {sw.machine}, {sw.date})" if sw.machine else "")]
        if sw.estimate:
            out.append("  ESTIMATE: these points were estimated for another device, not measured")
        out.append(f"  price per hour = {num(c.price_per_hour_usd)} USD (from the {c.price_from})")
        out.append(f"  points (SLOs: p99 TTFT <= {num(w.slo_ttft_ms)} ms, p99 TPOT <= {num(w.slo_tpot_ms)} ms)")
        head = [sw.swept, "req/s", "out tok/req", "p99 TTFT ms", "p99 TPOT ms", "meets SLOs"]
        rows = [[_value_text(ch.point.value), num(ch.point.request_throughput), num(ch.point.mean_output_tokens),
                 num(ch.point.ttft_p99_ms), num(ch.point.tpot_p99_ms),
                 "yes" if ch.meets_slos else "no: " + "; ".join(ch.reasons)] for ch in c.checks]
        out += table_lines([head, *rows], align="rrrrrl", indent="    ")
        for ch in c.checks:
            rate = ch.point.value if sw.swept == "request_rate" else None
            if isinstance(rate, (int, float)) and math.isfinite(rate) and ch.point.request_throughput < 0.9 * rate:
                out.append(f"    note: at {_value_text(rate)} req/s offered it served {num(ch.point.request_throughput)}: "
                           "saturated, so its latencies grow with the length of the run")
        s = c.sizing
        if s is None:
            out.append("  NO POINT MEETS BOTH SLOs: this configuration cannot serve the workload as measured; "
                       "sweep lower loads or relax the SLOs")
            return out
        p = s.point
        out += [
            f"  chosen: {sw.swept} = {_value_text(p.value)} (highest throughput meeting both SLOs)",
            f"  output scale       = measured out tok/req / asked out tok/req = {num(p.mean_output_tokens)} / "
            f"{num(w.mean_output_tokens)} = {num(s.output_scale)}   (decode dominates a request's time)",
            f"  capacity (req/s)   = measured req/s x output scale = {num(p.request_throughput)} x "
            f"{num(s.output_scale)} = {num(s.capacity_rps)}",
            f"  replicas           = ceil(peak demand / capacity) = ceil({num(w.peak_demand_rps)} / "
            f"{num(s.capacity_rps)}) = {s.replicas}",
            f"  $/day              = replicas x $/hour x 24 = {s.replicas} x {num(c.price_per_hour_usd)} x 24 = "
            f"{num(s.cost_per_day_usd)}",
            f"  $/month            = $/day x 30 = {num(s.cost_per_day_usd)} x 30 = {num(s.cost_per_month_usd)}",
            f"  $/1M tokens        = $/day / (daily tokens / 1e6) = {num(s.cost_per_day_usd)} / "
            f"({num(w.daily_tokens)} / 1e6) = {num(s.cost_per_million_tokens_usd)}",
            f"  $/1M output tokens = $/day / (daily output tokens / 1e6) = {num(s.cost_per_day_usd)} / "
            f"({num(w.daily_output_tokens)} / 1e6) = {num(s.cost_per_million_output_tokens_usd)}",
            f"  utilization        = average demand / (replicas x capacity) = {num(w.average_demand_rps)} / "
            f"({s.replicas} x {num(s.capacity_rps)}) = {num(s.utilization)}",
        ]
        measured_in = p.mean_input_tokens
        if w.mean_input_tokens and measured_in is not None and not 0.5 <= measured_in / w.mean_input_tokens <= 2:
            out.append(f"  note: measured mean input tokens {num(measured_in)} differ from the workload's "
                       f"{num(w.mean_input_tokens)} by more than 2x and prefill is not rescaled: re-measure "
                       "with the workload's lengths")
        return out

    def to_dict(self) -> dict:
        return {"kind": "cost_plan", "workload": self.workload.to_dict(), "assumptions": list(ASSUMPTIONS),
                "configurations": [_config_dict(c) for c in self.configs]}


def _value_text(x: object) -> str:
    return num(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _config_dict(c: ConfigPlan) -> dict:
    s = c.sizing
    d = {"label": c.sweep.label, "source": c.sweep.source, "estimate": c.sweep.estimate,
         "machine": c.sweep.machine, "date": c.sweep.date, "swept": c.sweep.swept,
         "price_per_hour_usd": c.price_per_hour_usd, "price_from": c.price_from, "meets_slos": s is not None,
         "points": [{**ch.point.to_dict(), "meets_slos": ch.meets_slos, "reasons": list(ch.reasons)}
                    for ch in c.checks]}
    if s is None:
        d["reason"] = "no point meets both SLOs"
        return d
    d.update(chosen=s.point.to_dict(), output_scale=s.output_scale, capacity_rps=s.capacity_rps,
             replicas=s.replicas, cost_per_day_usd=s.cost_per_day_usd, cost_per_month_usd=s.cost_per_month_usd,
             cost_per_million_tokens_usd=s.cost_per_million_tokens_usd,
             cost_per_million_output_tokens_usd=s.cost_per_million_output_tokens_usd, utilization=s.utilization)
    return d


def plan_capacity(workload: Workload, sweeps: list[Sweep], price_per_hour: float | None = None) -> Plan:
    if not sweeps:
        raise ValueError("sweep: give at least one sweep file")
    # Columns are titled by label: two files with the same label (say, two "continuous" runs) get "#2".
    seen: dict[str, int] = {}
    unique = []
    for s in sweeps:
        seen[s.label] = seen.get(s.label, 0) + 1
        unique.append(s if seen[s.label] == 1 else replace(s, label=f"{s.label} #{seen[s.label]}"))
    return Plan(workload, tuple(plan_config(workload, s, price_per_hour) for s in unique))
