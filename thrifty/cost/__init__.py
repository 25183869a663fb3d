"""The cost model: the formula, the price table, the capacity planner and device estimates.

Plain Python (no torch), so the server, the benchmarks and the CLI can all use it cheaply.
"""

from thrifty.cost.estimate import (
    DeviceScaling,
    device_scaling,
    estimate_lines,
    estimate_result,
)
from thrifty.cost.formula import (
    CostPerToken,
    DailyInferenceCost,
    TrainingVsInference,
    cost_per_token,
    daily_inference_cost,
    training_vs_inference,
)
from thrifty.cost.planner import (
    Plan,
    Sweep,
    Workload,
    load_sweep,
    parse_sweep,
    plan_capacity,
)
from thrifty.cost.prices import (
    PriceChoice,
    PriceEntry,
    PriceTable,
    load_prices,
    merge_prices,
    price_for_cpu,
    price_for_device,
    server_price,
)

__all__ = [
    "CostPerToken", "DailyInferenceCost", "TrainingVsInference", "cost_per_token", "daily_inference_cost",
    "training_vs_inference",
    "PriceChoice", "PriceEntry", "PriceTable", "load_prices", "merge_prices", "price_for_cpu", "price_for_device",
    "server_price",
    "Plan", "Sweep", "Workload", "load_sweep", "parse_sweep", "plan_capacity",
    "DeviceScaling", "device_scaling", "estimate_lines", "estimate_result",
]
