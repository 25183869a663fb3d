"""The cost formula, spelled out so that a user can recompute every number by hand.

    $ per token = (num GPUs x $ per GPU-hour) / (tokens per hour x utilization)

`cost_per_token` keeps every input and every intermediate in a dataclass; `lines()` prints the
formula with the numbers substituted. `training_vs_inference` compares a one-off training run with
the running cost of serving over a horizon.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

SECONDS_PER_HOUR = 3600
HOURS_PER_DAY = 24
DAYS_PER_MONTH = 30  # a billing month, as cloud price pages count it (730 h is ~30.4 days)
PER_MILLION = 1_000_000

FORMULA = "$ per token = (num GPUs x $ per GPU-hour) / (tokens per hour x utilization)"


def num(x: float | int | None) -> str:
    """A number as printed everywhere in thrifty.cost: short, without thousands separators,
    so that a printed value can be pasted back into a calculator (or parsed by a test)."""
    if x is None:
        return "-"
    x = float(x)
    if math.isinf(x) or math.isnan(x):
        return str(x)
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    if abs(x) >= 1:
        return f"{x:.4f}".rstrip("0").rstrip(".")
    return f"{x:.6g}"


def table_lines(rows: list[list[str]], align: str = "", indent: str = "") -> list[str]:
    """Rows of cells as aligned columns; `align` has one letter per column, "l" or "r"
    (default: the first column left, the others right, as labels and then numbers)."""
    ncol = max(len(r) for r in rows)
    rows = [list(r) + [""] * (ncol - len(r)) for r in rows]
    align = align or "l" + "r" * (ncol - 1)
    widths = [max(len(r[i]) for r in rows) for i in range(ncol)]
    return [(indent + "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                for c, w, a in zip(r, widths, align))).rstrip() for r in rows]


def check_number(name: str, value: object, *, minimum: float = 0.0, allow_equal: bool = False,
                 maximum: float | None = None) -> float:
    """`value` as a float, or a ValueError that names the field (the CLI turns it into exit code 2)."""
    # bool is an int subclass: True would silently mean 1 GPU.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if v < minimum or (v == minimum and not allow_equal):
        bound = ">=" if allow_equal else ">"
        raise ValueError(f"{name} must be {bound} {num(minimum)}, got {value!r}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be <= {num(maximum)}, got {value!r}")
    return v


@dataclass(frozen=True)
class CostPerToken:
    """Every input and intermediate of the formula (all money in USD)."""

    num_gpus: float
    price_per_gpu_hour: float
    tokens_per_second: float  # measured throughput of the num_gpus together, while busy
    utilization: float  # share of the hours paid for that do useful work
    tokens_per_hour: float
    effective_tokens_per_hour: float
    dollars_per_hour: float
    dollars_per_token: float
    dollars_per_million_tokens: float

    def lines(self) -> list[str]:
        return [
            "formula: " + FORMULA,
            "inputs",
            f"  num_gpus           = {num(self.num_gpus)}",
            f"  price_per_gpu_hour = {num(self.price_per_gpu_hour)} USD",
            f"  tokens_per_second  = {num(self.tokens_per_second)}",
            f"  utilization        = {num(self.utilization)}",
            "steps",
            f"  tokens per hour           = tokens_per_second x 3600 = {num(self.tokens_per_second)} x 3600"
            f" = {num(self.tokens_per_hour)}",
            f"  effective tokens per hour = tokens per hour x utilization = {num(self.tokens_per_hour)} x "
            f"{num(self.utilization)} = {num(self.effective_tokens_per_hour)}",
            f"  $ per hour                = num_gpus x price_per_gpu_hour = {num(self.num_gpus)} x "
            f"{num(self.price_per_gpu_hour)} = {num(self.dollars_per_hour)}",
            f"  $ per token               = $ per hour / effective tokens per hour = {num(self.dollars_per_hour)}"
            f" / {num(self.effective_tokens_per_hour)} = {num(self.dollars_per_token)}",
            f"  $ per 1M tokens           = $ per token x 1000000 = {num(self.dollars_per_token)} x 1000000 = "
            f"{num(self.dollars_per_million_tokens)}",
            "all at once",
            f"  $ per token = ({num(self.num_gpus)} x {num(self.price_per_gpu_hour)}) / "
            f"({num(self.tokens_per_hour)} x {num(self.utilization)}) = {num(self.dollars_per_token)} USD; "
            f"{num(self.dollars_per_million_tokens)} USD per 1M tokens",
        ]

    def to_dict(self) -> dict:
        return {"kind": "cost_formula", "formula": FORMULA, **asdict(self)}


def cost_per_token(num_gpus: float, price_per_gpu_hour: float, tokens_per_second: float,
                   utilization: float = 1.0) -> CostPerToken:
    num_gpus = check_number("num_gpus", num_gpus)
    price = check_number("price_per_gpu_hour", price_per_gpu_hour, allow_equal=True)
    tps = check_number("tokens_per_second", tokens_per_second)
    util = check_number("utilization", utilization, maximum=1.0)
    tokens_per_hour = tps * SECONDS_PER_HOUR
    effective = tokens_per_hour * util
    per_hour = num_gpus * price
    per_token = per_hour / effective
    return CostPerToken(num_gpus, price, tps, util, tokens_per_hour, effective, per_hour, per_token,
                        per_token * PER_MILLION)


@dataclass(frozen=True)
class DailyInferenceCost:
    """What serving costs per day: given directly (e.g. the planner's $/day), or GPUs x $/GPU-h x hours."""

    daily_cost_usd: float
    gpus: float | None = None
    price_per_gpu_hour: float | None = None
    hours_per_day: float | None = None

    def line(self) -> str:
        if self.gpus is None:
            return f"inference $ per day = {num(self.daily_cost_usd)} (given)"
        return (f"inference $ per day = gpus x $/GPU-h x hours per day = {num(self.gpus)} x "
                f"{num(self.price_per_gpu_hour)} x {num(self.hours_per_day)} = {num(self.daily_cost_usd)}")


def daily_inference_cost(gpus: float, price_per_gpu_hour: float,
                         hours_per_day: float = HOURS_PER_DAY) -> DailyInferenceCost:
    gpus = check_number("inference_gpus", gpus)
    price = check_number("inference_price_per_gpu_hour", price_per_gpu_hour, allow_equal=True)
    hours = check_number("inference_hours_per_day", hours_per_day, maximum=HOURS_PER_DAY)
    return DailyInferenceCost(gpus * price * hours, gpus, price, hours)


@dataclass(frozen=True)
class TrainingVsInference:
    training_gpus: float
    training_price_per_gpu_hour: float
    training_hours: float
    inference: DailyInferenceCost
    horizon_days: float
    training_cost_usd: float  # one-off
    inference_cost_usd: float  # over the horizon
    inference_to_training_ratio: float | None  # None when training is free
    crossover_days: float | None  # cumulative inference == training; None if inference costs nothing
    first_day_inference_exceeds: int | None

    def lines(self) -> list[str]:
        out = [
            "training cost (one-off)  = gpus x $/GPU-h x hours = "
            f"{num(self.training_gpus)} x {num(self.training_price_per_gpu_hour)} x {num(self.training_hours)}"
            f" = {num(self.training_cost_usd)} USD",
            self.inference.line() + " USD",
            f"inference cost over the horizon = $ per day x days = {num(self.inference.daily_cost_usd)} x "
            f"{num(self.horizon_days)} = {num(self.inference_cost_usd)} USD",
        ]
        if self.inference_to_training_ratio is None:
            out.append("ratio inference / training = undefined (training costs 0)")
        else:
            out.append(f"ratio inference / training = {num(self.inference_cost_usd)} / "
                       f"{num(self.training_cost_usd)} = {num(self.inference_to_training_ratio)}")
        if self.crossover_days is None:
            out.append("cumulative inference never passes training (inference costs 0 per day)")
        else:
            within = "within" if self.first_day_inference_exceeds <= self.horizon_days else "after"
            out.append(f"cumulative inference = training after training cost / $ per day = "
                       f"{num(self.training_cost_usd)} / {num(self.inference.daily_cost_usd)} = "
                       f"{num(self.crossover_days)} days; it passes training on day "
                       f"{self.first_day_inference_exceeds} ({within} the {num(self.horizon_days)}-day horizon)")
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = "cost_training_vs_inference"
        return d


def training_vs_inference(training_gpus: float, training_price_per_gpu_hour: float, training_hours: float,
                          inference: DailyInferenceCost | float, horizon_days: float) -> TrainingVsInference:
    gpus = check_number("training_gpus", training_gpus)
    price = check_number("training_price_per_gpu_hour", training_price_per_gpu_hour, allow_equal=True)
    hours = check_number("training_hours", training_hours)
    days = check_number("horizon_days", horizon_days)
    if not isinstance(inference, DailyInferenceCost):
        inference = DailyInferenceCost(check_number("inference_daily_cost", inference, allow_equal=True))
    training = gpus * price * hours
    serving = inference.daily_cost_usd * days
    ratio = serving / training if training > 0 else None
    if inference.daily_cost_usd > 0:
        crossover = training / inference.daily_cost_usd
        # Cumulative inference after d whole days is d x daily; it exceeds training strictly
        # from the first whole day past the crossover (day 1 when training is free).
        first_day = math.floor(crossover) + 1
    else:
        crossover, first_day = None, None
    return TrainingVsInference(gpus, price, hours, inference, days, training, serving, ratio, crossover, first_day)
