"""`thrifty cost ...`: formula, prices, plan, estimate, training-vs-inference.

`register(subparsers)` adds the `cost` command to the main parser. Each handler returns an exit code;
bad input raises ValueError naming the field (the main CLI turns it into exit code 2).
"""

from __future__ import annotations

import argparse
import json

from thrifty.cost.estimate import (
    device_scaling,
    estimate_lines,
    estimate_result,
    result_kind,
)
from thrifty.cost.formula import (
    cost_per_token,
    daily_inference_cost,
    training_vs_inference,
)
from thrifty.cost.planner import Workload, load_sweep, plan_capacity
from thrifty.cost.prices import PRICES_ENV, load_prices
from thrifty.jsonio import read_json


def _print(lines: list[str]) -> None:
    print("\n".join(lines))


def _write_json(obj: dict, path: str | None) -> None:
    """`--json OUT`: the JSON form to a file, or to stdout with "-"."""
    if not path:
        return
    text = json.dumps(obj, indent=2)
    if path == "-":
        print(text)
        return
    with open(path, "w") as f:
        f.write(text + "\n")
    print(f"wrote {path}")


def cmd_formula(args: argparse.Namespace) -> int:
    lines = []
    price = args.price_per_hour
    if price is None:
        if not args.device:
            raise ValueError("price_per_hour: give --price-per-hour, or --device to take it from the price table")
        entry = load_prices(args.prices).lookup(args.device, "device")
        price = entry.price_per_hour_usd
        lines.append(f"price from the price table: {entry.name}, {entry.source}, {entry.date} (list price)")
        if entry.kind == "instance" and entry.accelerators > 1:
            # The formula's price is per GPU; an instance's price covers all of its accelerators.
            price /= entry.accelerators
            lines.append(f"per GPU: instance price / {entry.accelerators} accelerators = {price:g} USD")
    result = cost_per_token(args.num_gpus, price, args.tokens_per_second, args.utilization)
    _print(result.lines() + lines)
    _write_json(result.to_dict(), args.json)
    return 0


def cmd_prices(args: argparse.Namespace) -> int:
    table = load_prices(args.prices)
    _print(table.lines())
    _write_json(table.to_dict(), args.json)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    workload = Workload(args.daily_requests, args.mean_input_tokens, args.mean_output_tokens, args.peak_factor,
                        args.slo_ttft_ms, args.slo_tpot_ms)
    plan = plan_capacity(workload, [load_sweep(p) for p in args.sweep], args.price_per_hour)
    _print(plan.lines())
    _write_json(plan.to_dict(), args.json)
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    result = read_json(args.result, "result")
    result_kind(result)
    from_device = args.from_device or (result.get("machine") if isinstance(result, dict) else None)
    if not from_device:
        raise ValueError("from_device: not given, and the result names no machine; give --from-device")
    scaling = device_scaling(from_device, args.to_device, load_prices(args.prices), args.price_per_hour)
    estimated = estimate_result(result, scaling)
    _print(estimate_lines(result, estimated, scaling))
    _write_json(estimated, args.json)
    return 0


def cmd_training_vs_inference(args: argparse.Namespace) -> int:
    per_gpu = (args.inference_gpus, args.inference_price_per_hour)
    if args.inference_daily_cost is not None:
        if any(v is not None for v in per_gpu):
            raise ValueError("inference_daily_cost: give it, or --inference-gpus and --inference-price-per-hour, "
                             "not both")
        inference = args.inference_daily_cost
    elif all(v is not None for v in per_gpu):
        inference = daily_inference_cost(args.inference_gpus, args.inference_price_per_hour,
                                         args.inference_hours_per_day)
    else:
        raise ValueError("inference_daily_cost: give --inference-daily-cost, or both --inference-gpus and "
                         "--inference-price-per-hour")
    result = training_vs_inference(args.training_gpus, args.training_price_per_hour, args.training_hours,
                                   inference, args.horizon_days)
    _print(result.lines())
    _write_json(result.to_dict(), args.json)
    return 0


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, metavar="OUT", help="also write the JSON form to OUT ('-': stdout)")


def _prices_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prices", default=None, metavar="FILE",
                   help=f"your own price entries, merged by name over the built-in table (also: ${PRICES_ENV})")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `cost` and its sub-commands to the main `thrifty` parser's subparsers."""
    cost = subparsers.add_parser("cost", help="the cost model: formula, price table, capacity plan, estimates",
                                 description="What serving costs: (GPUs x $/GPU-hour) / (tokens per hour x "
                                             "utilization), and the replicas a workload needs.")
    sub = cost.add_subparsers(dest="cost_command", required=True)

    p = sub.add_parser("formula", help="$ per token from GPUs, price, throughput and utilization")
    p.add_argument("--gpus", "--num-gpus", dest="num_gpus", type=float, default=1.0)
    p.add_argument("--price-per-hour", type=float, default=None, help="USD per GPU-hour (or per instance-hour)")
    p.add_argument("--device", default=None, help="take the price from the price table (name or CUDA device name)")
    p.add_argument("--tokens-per-second", type=float, required=True, help="measured throughput while busy")
    p.add_argument("--utilization", type=float, default=1.0, help="share of paid hours doing work, in (0, 1]")
    _prices_arg(p)
    _json_arg(p)
    p.set_defaults(func=cmd_formula)

    p = sub.add_parser("prices", help="show the price table (built-in, merged with yours)")
    _prices_arg(p)
    _json_arg(p)
    p.set_defaults(func=cmd_prices)

    p = sub.add_parser("plan", help="replicas and $ for a workload, from measured sweeps (one per configuration)")
    p.add_argument("--sweep", action="append", required=True, metavar="FILE",
                   help="a bench sweep (or bench serve) JSON file; repeat to compare configurations")
    p.add_argument("--daily-requests", type=float, required=True)
    p.add_argument("--mean-input-tokens", type=float, required=True)
    p.add_argument("--mean-output-tokens", type=float, required=True)
    p.add_argument("--peak-factor", type=float, default=1.0, help="peak request rate / average (>= 1)")
    p.add_argument("--slo-ttft-ms", type=float, required=True, help="p99 time to first token")
    p.add_argument("--slo-tpot-ms", type=float, required=True, help="p99 time per output token")
    p.add_argument("--price-per-hour", type=float, default=None,
                   help="USD per replica-hour for every sweep (default: each sweep file's price_per_hour_usd)")
    _json_arg(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("estimate", help="ESTIMATE a result on another device (bandwidth and FLOP/s ratios)")
    p.add_argument("--result", required=True, metavar="FILE",
                   help="a bench serve, bench sweep or bench throughput JSON file")
    p.add_argument("--from-device", default=None, help="where it was measured (default: the result's machine)")
    p.add_argument("--to-device", required=True)
    p.add_argument("--price-per-hour", type=float, default=None, help="default: the to-device's table price")
    _prices_arg(p)
    _json_arg(p)
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("training-vs-inference", help="one-off training cost vs inference cost over a horizon")
    p.add_argument("--training-gpus", type=float, required=True)
    p.add_argument("--training-price-per-hour", type=float, required=True, help="USD per GPU-hour")
    p.add_argument("--training-hours", type=float, required=True)
    p.add_argument("--inference-daily-cost", type=float, default=None, help="USD per day (e.g. from cost plan)")
    p.add_argument("--inference-gpus", type=float, default=None)
    p.add_argument("--inference-price-per-hour", type=float, default=None, help="USD per GPU-hour")
    p.add_argument("--inference-hours-per-day", type=float, default=24.0)
    p.add_argument("--horizon-days", type=float, default=365.0)
    _json_arg(p)
    p.set_defaults(func=cmd_training_vs_inference)
    return cost
