"""thrifty.cost: the formula, the price table, the planner, estimates and the `thrifty cost` commands.

No model is loaded. Where the code prints a computation, the test reads the printed inputs back and
recomputes the result by hand, so the printout is checked to be enough to redo the sums.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest

from thrifty.cost import (
    Workload,
    cost_per_token,
    daily_inference_cost,
    device_scaling,
    estimate_result,
    load_prices,
    merge_prices,
    parse_sweep,
    plan_capacity,
    price_for_device,
    training_vs_inference,
)
from thrifty.cost.cli import register
from thrifty.cost.prices import PRICES_ENV, builtin_prices

# ---- helpers -----------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    """The tiny harness the main CLI will be: a parser with `cost` registered, then the handler."""
    parser = argparse.ArgumentParser(prog="thrifty")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def printed(capsys, argv: list[str]) -> str:
    assert run_cli(argv) == 0
    return capsys.readouterr().out


def line_starting(text: str, start: str) -> str:
    hits = [ln.strip() for ln in text.splitlines() if ln.strip().startswith(start)]
    assert hits, f"no line starts with {start!r} in:\n{text}"
    return hits[0]


def result_of(text: str, start: str) -> float:
    """The number after the last ' = ' of the first line that starts with `start`."""
    return float(line_starting(text, start).rsplit(" = ", 1)[1].split()[0])


def serve_point(rate, req_s, out_per_req, ttft_p99, tpot_p99, completed=100, failed=0, in_per_req=500,
                price=2.0, machine="NVIDIA H100 80GB HBM3") -> dict:
    """A `bench serve` result with the fields the schema names."""
    stats = lambda p99: {"mean": p99 / 2, "p50": p99 / 2, "p90": p99 * 0.8, "p99": p99}  # noqa: E731
    return {
        "kind": "bench_serve", "label": f"rate {rate}", "base_url": "http://x", "model": "m",
        "endpoint": "completions", "dataset": "random", "num_prompts": completed + failed,
        "request_rate": rate, "max_concurrency": None, "completed": completed, "failed": failed,
        "duration_s": completed / req_s, "total_input_tokens": completed * in_per_req,
        "total_output_tokens": int(completed * out_per_req), "request_throughput": req_s,
        "output_throughput": req_s * out_per_req, "total_token_throughput": req_s * (in_per_req + out_per_req),
        "ttft_ms": stats(ttft_p99), "tpot_ms": stats(tpot_p99), "itl_ms": stats(tpot_p99),
        "e2el_ms": {"mean": 2000.0, "p50": 1900.0, "p90": 2500.0, "p99": 3000.0},
        "goodput": None, "slos": {}, "price_per_hour_usd": price,
        "cost_per_million_output_tokens_usd": None, "cost_per_million_tokens_usd": None,
        "machine": machine, "date": "2026-11-21",
    }


def sweep(label: str, points: list[dict], price=2.0) -> dict:
    return {"kind": "bench_sweep", "label": label, "model": "m", "base_url": "http://x", "sweep": "request_rate",
            "values": [p["request_rate"] for p in points], "price_per_hour_usd": price,
            "machine": "NVIDIA H100 80GB HBM3", "date": "2026-11-21", "points": points}


@pytest.fixture
def sweep_files(tmp_path):
    good = sweep("continuous", [
        serve_point(2, 1.98, 180, 100, 20),
        serve_point(4, 3.9, 180, 150, 30),
        serve_point(6, 5.8, 180, 200, 40, failed=2),  # fastest within the SLOs, but requests failed
        serve_point(8, 5.5, 180, 300, 45),  # the answer: 5.5 x 180 / 200 = 4.95 req/s per replica
        serve_point(16, 9.1, 180, 900, 70),  # faster still, but misses both SLOs
    ])
    bad = sweep("static", [serve_point(2, 1.9, 180, 600, 20), serve_point(4, 3.0, 180, 800, 60)])
    a, b = tmp_path / "continuous.json", tmp_path / "static.json"
    a.write_text(json.dumps(good))
    b.write_text(json.dumps(bad))
    return str(a), str(b)


WORKLOAD = ["--daily-requests", "1e6", "--mean-input-tokens", "500", "--mean-output-tokens", "200",
            "--peak-factor", "3", "--slo-ttft-ms", "500", "--slo-tpot-ms", "50"]

# ---- formula -----------------------------------------------------------------------------------


def test_formula_recomputed_from_printed_inputs(capsys):
    out = printed(capsys, ["cost", "formula", "--gpus", "2", "--price-per-hour", "2.5",
                           "--tokens-per-second", "1200", "--utilization", "0.6"])
    gpus, price = result_of(out, "num_gpus"), result_of(out, "price_per_gpu_hour")
    tps, util = result_of(out, "tokens_per_second"), result_of(out, "utilization")
    by_hand = (gpus * price) / (tps * 3600 * util)
    assert by_hand == pytest.approx(2 * 2.5 / (1200 * 3600 * 0.6))
    assert result_of(out, "$ per token") == pytest.approx(by_hand, rel=1e-5)
    assert result_of(out, "$ per 1M tokens") == pytest.approx(by_hand * 1e6, rel=1e-5)
    assert result_of(out, "effective tokens per hour") == pytest.approx(1200 * 3600 * 0.6)


def test_formula_dataclass_holds_every_intermediate():
    r = cost_per_token(1, 3.0, 1000, 0.5)
    assert (r.tokens_per_hour, r.effective_tokens_per_hour, r.dollars_per_hour) == (3_600_000, 1_800_000, 3.0)
    assert r.dollars_per_token == pytest.approx(3.0 / 1_800_000)
    assert r.dollars_per_million_tokens == pytest.approx(3.0 / 1.8)
    assert r.to_dict()["dollars_per_million_tokens"] == r.dollars_per_million_tokens


@pytest.mark.parametrize("kwargs, field", [
    (dict(utilization=1.5), "utilization"), (dict(utilization=0), "utilization"),
    (dict(num_gpus=0), "num_gpus"), (dict(price_per_gpu_hour=-1), "price_per_gpu_hour"),
    (dict(tokens_per_second=float("nan")), "tokens_per_second"), (dict(num_gpus=True), "num_gpus"),
])
def test_formula_rejects_bad_values_by_name(kwargs, field):
    args = dict(num_gpus=1, price_per_gpu_hour=2.0, tokens_per_second=100.0, utilization=0.5) | kwargs
    with pytest.raises(ValueError, match=field):
        cost_per_token(**args)


def test_training_vs_inference():
    r = training_vs_inference(64, 2.0, 100, daily_inference_cost(8, 2.0), horizon_days=365)
    assert r.training_cost_usd == 64 * 2.0 * 100
    assert r.inference.daily_cost_usd == 8 * 2.0 * 24
    assert r.inference_cost_usd == 8 * 2.0 * 24 * 365
    assert r.inference_to_training_ratio == pytest.approx(140160 / 12800)
    assert r.crossover_days == pytest.approx(12800 / 384)
    assert r.first_day_inference_exceeds == 34  # after 33.3 days they are equal
    text = "\n".join(r.lines())
    assert "12800" in text and "140160" in text and "day 34" in text
    # Exactly equal after 10 days: inference passes training on day 11.
    assert training_vs_inference(1, 10.0, 24, 24.0, 30).first_day_inference_exceeds == 11
    free = training_vs_inference(1, 1.0, 1, 0.0, 30)
    assert free.crossover_days is None and "never" in "\n".join(free.lines())


def test_cli_training_vs_inference(capsys):
    out = printed(capsys, ["cost", "training-vs-inference", "--training-gpus", "8", "--training-price-per-hour",
                           "3", "--training-hours", "48", "--inference-daily-cost", "100", "--horizon-days", "30"])
    assert result_of(out, "training cost") == 8 * 3 * 48
    assert result_of(out, "inference cost over the horizon") == 3000
    with pytest.raises(ValueError, match="inference_daily_cost"):
        run_cli(["cost", "training-vs-inference", "--training-gpus", "8", "--training-price-per-hour", "3",
                 "--training-hours", "48"])

# ---- price table -------------------------------------------------------------------------------


def test_builtin_table_is_dated_sourced_and_complete():
    table = builtin_prices()
    names = {e.name for e in table.entries}
    for needed in ("NVIDIA H100 SXM", "NVIDIA H200", "NVIDIA A100 80GB", "NVIDIA L4", "NVIDIA L40S",
                   "NVIDIA A10G", "NVIDIA T4", "AMD Instinct MI300X", "AWS c7i.xlarge", "AWS c7a.xlarge"):
        assert needed in names
    for e in table.entries:
        assert e.source and e.date[:4].isdigit() and e.price_per_hour_usd > 0
        assert e.kind in ("gpu", "cpu", "instance")
    assert "list prices" in table.note.lower() and "not quotes" in table.note.lower()


@pytest.mark.parametrize("device, entry", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),
    ("NVIDIA H200", "NVIDIA H200"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB"),
    ("NVIDIA A100 80GB PCIe", "NVIDIA A100 80GB"),
    ("NVIDIA L4", "NVIDIA L4"),
    ("NVIDIA L40S", "NVIDIA L40S"),
    ("NVIDIA A10G", "NVIDIA A10G"),
    ("Tesla T4", "NVIDIA T4"),
    ("AMD Instinct MI300X", "AMD Instinct MI300X"),
    ("nvidia h200", "NVIDIA H200"),
    ("NVIDIA H100 PCIe", None),  # a different product at a different price: better no answer
    ("NVIDIA A100-SXM4-40GB", None),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_price_for_device(device, entry, monkeypatch):
    monkeypatch.delenv(PRICES_ENV, raising=False)
    found = price_for_device(device)
    assert (found.name if found else None) == entry


def test_user_prices_merge_by_name(tmp_path, monkeypatch):
    monkeypatch.delenv(PRICES_ENV, raising=False)
    builtin = builtin_prices()
    user = tmp_path / "mine.json"
    user.write_text(json.dumps({"entries": [
        {"name": "nvidia h100 sxm", "price_per_hour_usd": 1.5},  # override: price only
        {"name": "AWS c7i.xlarge", "memory_bandwidth_gbps": 25, "peak_bf16_tflops": 10},  # measured figures
        {"name": "NVIDIA H100 PCIe", "kind": "gpu", "price_per_hour_usd": 2.2, "memory_bandwidth_gbps": 2000,
         "peak_bf16_tflops": 756, "source": "our contract", "date": "2026-11-01"},
    ]}))
    table = load_prices(str(user))
    assert len(table.entries) == len(builtin.entries) + 1
    h100 = table.get("NVIDIA H100 SXM")
    assert h100.price_per_hour_usd == 1.5
    assert h100.memory_bandwidth_gbps == builtin.get("NVIDIA H100 SXM").memory_bandwidth_gbps  # kept
    assert str(user) in h100.source and h100.date == "unknown"  # a new price does not keep the old source
    c7i = table.get("AWS c7i.xlarge")
    assert c7i.memory_bandwidth_gbps == 25
    assert c7i.price_per_hour_usd == builtin.get("AWS c7i.xlarge").price_per_hour_usd
    assert c7i.source == builtin.get("AWS c7i.xlarge").source
    assert price_for_device("NVIDIA H100 PCIe", table).price_per_hour_usd == 2.2
    assert str(user) in table.files


def test_prices_env_and_flag(tmp_path, monkeypatch, capsys):
    env_file, flag_file = tmp_path / "env.json", tmp_path / "flag.json"
    env_file.write_text(json.dumps([{"name": "NVIDIA L4", "price_per_hour_usd": 0.5, "source": "env",
                                     "date": "2026-11"}]))
    flag_file.write_text(json.dumps([{"name": "NVIDIA L4", "price_per_hour_usd": 0.4}]))
    monkeypatch.setenv(PRICES_ENV, str(env_file))
    assert price_for_device("NVIDIA L4").price_per_hour_usd == 0.5
    assert load_prices(str(flag_file)).get("NVIDIA L4").price_per_hour_usd == 0.4  # the flag wins
    out = printed(capsys, ["cost", "prices", "--prices", str(flag_file)])
    assert "0.4" in line_starting(out, "NVIDIA L4 ") and "2025-06" in out


def test_bad_price_entries_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="price_per_hour_usd"):
        merge_prices(builtin_prices(), [{"name": "NVIDIA L4", "price_per_hour_usd": "cheap"}], "x.json")
    with pytest.raises(ValueError, match="kind"):
        merge_prices(builtin_prices(), [{"name": "New", "price_per_hour_usd": 1, "kind": "tpu"}], "x.json")
    with pytest.raises(ValueError, match="price_per_hour"):  # a typo'd field is reported, not ignored
        merge_prices(builtin_prices(), [{"name": "NVIDIA L4", "price_per_hour": 1}], "x.json")

# ---- planner -----------------------------------------------------------------------------------


def test_plan_recomputed_from_printed_numbers(sweep_files, capsys, tmp_path):
    good, bad = sweep_files
    out_json = tmp_path / "plan.json"
    out = printed(capsys, ["cost", "plan", "--sweep", good, "--sweep", bad, *WORKLOAD, "--json", str(out_json)])
    section = out.split("[continuous]")[1].split("[static]")[0]

    # Everything below is read back from the printout and recomputed by hand.
    daily, inp, outp = (result_of(out, k) for k in ("daily requests", "mean input tokens", "mean output tokens"))
    peak_factor = result_of(out, "peak factor")
    average = daily / 86400
    peak = average * peak_factor
    assert result_of(out, "peak demand (req/s)") == pytest.approx(peak, rel=1e-4)
    assert "request_rate = 8" in section  # the failed and the too-slow points were passed over
    measured_rps = float(line_starting(section, "capacity (req/s)").split(" = ")[2].split(" x ")[0])
    measured_out = float(line_starting(section, "output scale").split(" = ")[2].split(" / ")[0])
    capacity = measured_rps * measured_out / outp
    assert result_of(section, "capacity (req/s)") == pytest.approx(capacity, rel=1e-4)
    assert capacity == pytest.approx(5.5 * 180 / 200)
    price = result_of(section, "price per hour")
    replicas = math.ceil(peak / capacity)
    assert result_of(section, "replicas") == replicas == 8
    per_day = replicas * price * 24
    assert result_of(section, "$/day") == pytest.approx(per_day, rel=1e-4)
    assert result_of(section, "$/month") == pytest.approx(per_day * 30, rel=1e-4)
    assert result_of(section, "$/1M tokens") == pytest.approx(per_day / (daily * (inp + outp) / 1e6), rel=1e-4)
    assert result_of(section, "utilization") == pytest.approx(average / (replicas * capacity), rel=1e-3)

    # The configuration whose points all miss the SLOs says so and gets no numbers.
    assert "NO POINT MEETS BOTH SLOs" in out.split("[static]")[1]
    table = out.split("configurations side by side")[1].split("[continuous]")[0]
    assert line_starting(table, "meets SLOs").split()[-3:] == ["yes", "NO", "POINT"]

    data = json.loads(out_json.read_text())
    good_cfg, bad_cfg = data["configurations"]
    assert (good_cfg["meets_slos"], bad_cfg["meets_slos"]) == (True, False)
    assert good_cfg["replicas"] == 8 and good_cfg["chosen"]["value"] == 8
    assert good_cfg["cost_per_day_usd"] == pytest.approx(8 * 2.0 * 24)
    assert "replicas" not in bad_cfg and "reason" in bad_cfg
    assert [p["meets_slos"] for p in good_cfg["points"]] == [True, True, False, True, False]


def test_plan_scales_capacity_by_output_length():
    s = parse_sweep(sweep("x", [serve_point(4, 4.0, 100, 100, 10)]), "x.json")
    w = Workload(86400 * 10, 500, 200, 1, 500, 50)  # 10 req/s, twice the measured output length
    cfg = plan_capacity(w, [s]).configs[0]
    assert cfg.sizing.output_scale == 0.5 and cfg.sizing.capacity_rps == 2.0
    assert cfg.sizing.replicas == 5  # exactly 10 / 2: no extra replica from float rounding
    assert cfg.sizing.utilization == pytest.approx(1.0)


def test_plan_price_override_and_missing_price():
    s = parse_sweep(sweep("x", [serve_point(4, 4.0, 200, 100, 10)], price=None), "x.json")
    w = Workload(86400, 500, 200, 1, 500, 50)
    with pytest.raises(ValueError, match="price_per_hour"):
        plan_capacity(w, [s])
    cfg = plan_capacity(w, [s], price_per_hour=3.0).configs[0]
    assert cfg.price_from == "--price-per-hour" and cfg.sizing.cost_per_day_usd == 3.0 * 24


def test_plan_accepts_one_bench_serve_result_and_dedups_labels():
    one = parse_sweep(serve_point(4, 4.0, 200, 100, 10), "serve.json")
    plan = plan_capacity(Workload(86400, 500, 200, 1, 500, 50), [one, one])
    assert [c.title for c in plan.configs] == ["rate 4", "rate 4 #2"]


@pytest.mark.parametrize("flag, value, field", [
    ("--peak-factor", "0.5", "peak_factor"), ("--daily-requests", "0", "daily_requests"),
    ("--slo-tpot-ms", "-1", "slo_tpot_ms"), ("--mean-output-tokens", "0", "mean_output_tokens"),
])
def test_cli_plan_bad_value_names_field(sweep_files, flag, value, field):
    argv = ["cost", "plan", "--sweep", sweep_files[0], *WORKLOAD]
    argv[argv.index(flag) + 1] = value
    with pytest.raises(ValueError, match=field):
        run_cli(argv)


def test_cli_plan_bad_sweep_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"kind": "bench_sweep", "label": "x", "price_per_hour_usd": 1.0,
                                  "points": [{"completed": 1}]}))
    with pytest.raises(ValueError, match=r"points\[0\]\.failed"):
        run_cli(["cost", "plan", "--sweep", str(broken), *WORKLOAD])
    with pytest.raises(ValueError, match="sweep"):
        run_cli(["cost", "plan", "--sweep", str(tmp_path / "missing.json"), *WORKLOAD])

# ---- estimates ---------------------------------------------------------------------------------


def test_estimate_scales_by_bandwidth_and_flops(monkeypatch):
    monkeypatch.delenv(PRICES_ENV, raising=False)
    sc = device_scaling("NVIDIA H100 80GB HBM3", "NVIDIA A100 80GB", load_prices())
    assert sc.bandwidth_ratio == pytest.approx(2039 / 3350) and sc.flops_ratio == pytest.approx(312 / 989.4)
    point = serve_point("inf", 4.0, 200, 100, 20)
    est = estimate_result(point, sc)
    assert est["estimate"] is True and est["estimate_assumptions"] and "ESTIMATE" in est["label"]
    assert est["request_throughput"] == pytest.approx(4.0 * 2039 / 3350)
    assert est["tpot_ms"]["p99"] == pytest.approx(20 * 3350 / 2039)
    assert est["ttft_ms"]["p99"] == pytest.approx(100 * 989.4 / 312)
    assert est["price_per_hour_usd"] == 1.79 and est["goodput"] is None
    by_hand = 1.79 / (est["output_throughput"] * 3600) * 1e6
    assert est["cost_per_million_output_tokens_usd"] == pytest.approx(by_hand)
    assert point["request_throughput"] == 4.0  # the measured result is left alone
    # A faster device cannot serve more requests than an open-loop client sends.
    faster = device_scaling("NVIDIA A100 80GB", "NVIDIA H200", load_prices())
    assert estimate_result(serve_point(4, 3.9, 200, 100, 20), faster)["request_throughput"] == 4


def test_cli_estimate_is_labelled_and_plannable(sweep_files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(PRICES_ENV, raising=False)
    out_json = tmp_path / "est.json"
    # --from-device defaults to the result's machine ("NVIDIA H100 80GB HBM3").
    out = printed(capsys, ["cost", "estimate", "--result", sweep_files[0], "--to-device", "NVIDIA H200",
                           "--json", str(out_json)])
    assert out.startswith("ESTIMATE") and "ESTIMATE on NVIDIA H200" in out
    est = json.loads(out_json.read_text())
    assert est["estimate"] is True and all(p["estimate"] for p in est["points"])
    assert est["estimated_from"]["from_device"] == "NVIDIA H100 SXM"
    plan = printed(capsys, ["cost", "plan", "--sweep", str(out_json), *WORKLOAD])
    assert "ESTIMATE" in line_starting(plan, "configuration ")


def test_cli_estimate_bad_devices(sweep_files, monkeypatch):
    monkeypatch.delenv(PRICES_ENV, raising=False)
    base = ["cost", "estimate", "--result", sweep_files[0]]
    with pytest.raises(ValueError, match="to_device"):
        run_cli(base + ["--to-device", "NVIDIA B300"])
    with pytest.raises(ValueError, match="to_device.*memory_bandwidth_gbps"):
        run_cli(base + ["--to-device", "AWS c7i.xlarge"])


def test_estimate_bench_throughput_result(monkeypatch):
    monkeypatch.delenv(PRICES_ENV, raising=False)
    result = {"model": "m", "requests_per_s": 2.0, "output_tokens_per_s": 256.0, "total_tokens_per_s": 512.0,
              "elapsed_s": 32.0, "device": "cuda"}
    est = estimate_result(result, device_scaling("NVIDIA L4", "NVIDIA L40S", load_prices()))
    assert est["estimate"] is True and est["output_tokens_per_s"] == pytest.approx(256 * 864 / 300)
    assert est["elapsed_s"] == pytest.approx(32 * 300 / 864)


def test_cli_formula_with_device_price(capsys, monkeypatch):
    monkeypatch.delenv(PRICES_ENV, raising=False)
    out = printed(capsys, ["cost", "formula", "--device", "Tesla T4", "--tokens-per-second", "500"])
    assert result_of(out, "price_per_gpu_hour") == 0.526 and "NVIDIA T4" in out
    with pytest.raises(ValueError, match="price_per_hour"):
        run_cli(["cost", "formula", "--tokens-per-second", "500"])
    with pytest.raises(ValueError, match="utilization"):
        run_cli(["cost", "formula", "--price-per-hour", "1", "--tokens-per-second", "5", "--utilization", "2"])
