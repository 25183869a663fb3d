"""thrifty on Ray Serve (thrifty/deploy/ray.py): a local Ray cluster, 1 replica behind Serve's HTTP
proxy, concurrent load through the official openai client until the autoscaler adds a second
replica, then no load until it is back to 1. No request may fail, every greedy output must equal
the in-process engine's, and the cost ledger must count both replicas' lifetimes.

The first tests need no cluster: the options, the application builder as `serve run` calls it,
and the ledger's arithmetic.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings

import httpx2 as httpx
import openai
import pytest
from conftest import PROMPTS, free_port

from thrifty import SamplingParams

try:  # not a skip: `make test` installs Ray Serve (scripts/install_ray.sh), so its absence is an error
    with warnings.catch_warnings():  # Ray's own modules use deprecated pydantic features
        warnings.simplefilter("ignore", DeprecationWarning)
        import ray
        from ray import serve
        from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
except ImportError as e:
    raise ImportError(f"Ray Serve is not installed ({e}): run `bash scripts/install_ray.sh`") from e

from thrifty.deploy import ray as thrifty_ray  # noqa: E402

APP = "thrifty-test"
PRICE = 3600.0  # USD per hour: one dollar per replica-second
MAX_TOKENS = 24
CLIENTS = 6  # concurrent requests, 3x the replicas' target of 2: the autoscaler wants 3, gets max 2
OPTIONS = {  # as `serve run thrifty.deploy.ray:build_app key=value ...` passes them: strings
    "dtype": "float32", "kv_cache_memory": "0.05", "max_model_len": "1024",
    "min_replicas": "1", "max_replicas": "2", "target_ongoing_requests": "2", "max_ongoing_requests": "8",
    "upscale_delay_s": "2", "downscale_delay_s": "5", "look_back_period_s": "2",
    "num_cpus": "1", "price_per_hour": str(PRICE), "cost_report_interval_s": "1",
    "graceful_shutdown_timeout_s": "20",
}
# Inherited by Ray's processes: no usage report (and no network try) from a test.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
# Ray 2.60 warns that look_back_period_s should exceed metrics_interval_s (10 s, a deprecated
# field that still sets how often request counts reach the controller): a 2 s window here only
# makes the autoscaler react to the last pushed counts, which is what a short test wants.
pytestmark = pytest.mark.filterwarnings("ignore:`look_back_period_s`:FutureWarning")


# -- no cluster -------------------------------------------------------------------------------
def test_options_from_key_value_strings():
    opts = thrifty_ray.DeploymentOptions.model_validate(OPTIONS | {"api_key": "a=sk-a,sk-b"})
    assert opts.autoscaling_config() == {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2.0,
                                         "upscale_delay_s": 2.0, "downscale_delay_s": 5.0, "look_back_period_s": 2.0}
    config = opts.engine_config()
    assert (config.dtype, config.kv_cache_memory, config.max_model_len) == ("float32", 0.05, 1024)
    assert config.num_threads == 1  # a replica's CPUs, not the machine's
    assert opts.api_key == ["a=sk-a", "sk-b"]
    with pytest.raises(ValueError, match="max_replica\n"):
        thrifty_ray.DeploymentOptions.model_validate({"max_replica": "2"})  # a typo is an error
    with pytest.raises(ValueError, match="min_replicas"):
        thrifty_ray.DeploymentOptions.model_validate({"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ValueError, match="dtype"):
        thrifty_ray.build_app({"dtype": "float64"})  # engine options are checked before deploying


def test_builder_as_serve_run_calls_it():
    app = call_user_app_builder_with_args_if_necessary(thrifty_ray.build_app, dict(OPTIONS))
    deployment = app._bound_deployment
    assert deployment.name == "thrifty"
    auto = deployment._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 2, 2.0)
    assert (auto.upscale_delay_s, auto.downscale_delay_s) == (2.0, 5.0)
    assert deployment.ray_actor_options["num_cpus"] == 1.0
    assert isinstance(thrifty_ray.app, serve.Application)


def test_options_from_thrifty_serve_flags():
    import argparse

    from thrifty.entrypoints.cli import add_serve_args, engine_kwargs

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = parser.parse_args(["--ray", "--dtype", "float32", "--max-replicas", "4", "--target-ongoing-requests", "16",
                              "--num-cpus-per-replica", "2", "--price-per-hour", "1.2", "--shutdown-timeout", "9",
                              "--api-key", "team-a=sk-a"])
    options = thrifty_ray.options_from_cli(args, thrifty_ray.EngineConfig(model=args.model, **engine_kwargs(args)))
    opts = thrifty_ray.DeploymentOptions.model_validate(options)
    assert (opts.max_replicas, opts.min_replicas, opts.target_ongoing_requests) == (4, 1, 16.0)
    assert (opts.num_cpus, opts.price_per_hour, opts.graceful_shutdown_timeout_s) == (2.0, 1.2, 9.0)
    assert opts.api_key == ["team-a=sk-a"] and opts.engine_config().num_threads == 2
    assert opts.upscale_delay_s == 30.0  # not given: DeploymentOptions' default


def _record(replica: str, lifetime: float, stopped: bool, seq: int, **kw) -> dict:
    return {"replica": replica, "price_per_hour": PRICE, "lifetime_s": lifetime, "startup_s": 1.0,
            "busy_s": kw.get("busy_s", 0.0), "idle_s": lifetime - 1.0 - kw.get("busy_s", 0.0), "in_step_s": 0.0,
            "busy_cost_usd": 0.0, "unbilled_cost_usd": 0.0, "generation_tokens": kw.get("tokens", 0),
            "requests": 0, "stopped": stopped, "seq": seq, "report_interval_s": 1.0}


def test_ledger_sums_live_and_departed_replicas():
    ledger = thrifty_ray.CostLedger()
    ledger.report(_record("a", 10.0, False, 1))
    ledger.report(_record("b", 4.0, False, 1, tokens=100))
    ledger.report(_record("b", 6.0, True, 2, tokens=200))
    ledger.report(_record("b", 5.0, False, 3))  # a periodic report that crossed b's last: ignored
    ledger.report(_record("a", 9.0, False, 0))  # an older report of a: ignored
    s = ledger.summary()
    assert (s["replicas_live"], s["replicas_stopped"], s["replicas_lost"]) == (1, 1, 0)
    # a: 10 s reported + the time since its report arrived; b: its 6 s, no more.
    assert 16.0 < s["replica_seconds"] < 16.5
    assert s["cost_usd"] == pytest.approx(s["replica_seconds"] * PRICE / 3600)
    assert s["startup_seconds"] == 2.0 and s["generation_tokens"] == 200
    assert s["unreported_seconds"] == pytest.approx(s["replica_seconds"] - 16.0)
    # A replica silent for longer than max(30 s, 3 report intervals) is lost: counted to its last report.
    ledger._live["a"]["received"] -= 31
    s = ledger.summary()
    assert (s["replicas_live"], s["replicas_lost"]) == (0, 1) and s["replica_seconds"] == 16.0


# -- a local cluster ------------------------------------------------------------------------
def _replica_states() -> dict[str, int]:
    app = serve.status().applications.get(APP)
    if app is None or "thrifty" not in app.deployments:
        return {}
    return {str(getattr(k, "value", k)): v for k, v in app.deployments["thrifty"].replica_states.items() if v}


def _wait_for(states: dict[str, int], timeout: float, timeline: list) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _replica_states()
        if not timeline or timeline[-1][1] != now:
            timeline.append((time.monotonic(), now))
        if now == states:
            return time.monotonic()
        time.sleep(0.25)
    raise AssertionError(f"replicas never reached {states}; timeline: {timeline}")


@pytest.fixture
def ray_cluster(monkeypatch):
    for k, v in RAY_ENV.items():
        monkeypatch.setenv(k, v)
    # 3 logical CPUs: a replica reserves 1, Serve's controller and proxy 0, the ledger 0.
    ray.init(address="local", num_cpus=3, object_store_memory=200 * 2**20, include_dashboard=False,
             log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
    try:
        yield
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.mark.slow
def test_autoscales_1_to_2_to_1_with_no_failed_request_and_counts_cost(llm, ray_cluster):
    refs = [o.outputs[0].text for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                                                    use_tqdm=False)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(thrifty_ray.build_app(dict(OPTIONS)), name=APP, route_prefix="/")
    t_ready = time.monotonic()
    assert _replica_states() == {"RUNNING": 1}
    first = httpx.get(f"{url}/cost", timeout=30).json()
    assert first["replicas_live"] == 1 and first["replicas"][0]["startup_s"] > 0

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    results: list[tuple[int, str, str]] = []  # (prompt index, text, replica)
    errors: list[str] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        i = worker
        while not stop.is_set():
            try:
                raw = client.completions.with_raw_response.create(
                    model=model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=MAX_TOKENS, temperature=0)
                results.append((i % len(PROMPTS), raw.parse().choices[0].text, raw.headers["x-thrifty-replica"]))
            except Exception as e:  # noqa: BLE001 - every failure is the test's finding
                errors.append(repr(e))
            i += CLIENTS

    timeline: list = []
    threads = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(CLIENTS)]
    t_load = time.monotonic()
    for t in threads:
        t.start()
    try:
        t_two = _wait_for({"RUNNING": 2}, 150, timeline)
        # Keep the load on until the new replica has answered a few requests too.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            by_replica = {r[2] for r in results}
            if len(by_replica) == 2 and min(sum(r[2] == x for r in results) for x in by_replica) >= 5:
                break
            time.sleep(0.25)
    finally:
        stop.set()
        for t in threads:
            t.join(150)
    t_unload = time.monotonic()
    t_one = _wait_for({"RUNNING": 1}, 150, timeline)
    cost = httpx.get(f"{url}/cost", timeout=30).json()
    t_end = time.monotonic()

    print(f"\nray serve: deployed in {t_ready - t0:.1f} s; 2 replicas {t_two - t_load:.1f} s after the load "
          f"began; load stopped after {t_unload - t_load:.1f} s ({len(results)} requests, "
          f"{len({r[2] for r in results})} replicas answered); back to 1 replica {t_one - t_unload:.1f} s later; "
          f"ledger: {cost['replica_seconds']:.1f} replica-s over {t_end - t0:.1f} s wall "
          f"(startup {cost['startup_seconds']:.1f}, busy {cost['busy_seconds']:.1f}, idle {cost['idle_seconds']:.1f})")
    print("replica states:", [(round(t - t0, 1), s) for t, s in timeline])

    assert not errors, errors[:5]
    replicas = {r[2] for r in results}
    assert len(replicas) == 2, "the second replica served no request"
    for i, text, replica in results:
        assert text == refs[i], (replica, PROMPTS[i], text, refs[i])

    # The ledger: both replicas, one departed (its last report made at its end), one live.
    assert (cost["replicas_live"], cost["replicas_stopped"], cost["replicas_lost"]) == (1, 1, 0)
    by_id = {r["replica"]: r for r in cost["replicas"]}
    assert set(by_id) == replicas
    live = next(r for r in cost["replicas"] if r["state"] == "live")
    gone = next(r for r in cost["replicas"] if r["state"] == "stopped")
    # Replica-seconds cover both lifetimes. Whichever replica Serve stopped, one ran from before
    # t_ready to t_end, the other from before t_two (both RUNNING) until after t_down (one left).
    t_down = next(t for t, s in timeline if t > t_two and s.get("RUNNING", 0) < 2)
    assert live["seconds"] <= t_end - t0
    assert t_down - t_two - 1 < gone["seconds"] < t_one - t0
    assert cost["replica_seconds"] == pytest.approx(live["seconds"] + gone["seconds"])
    assert cost["replica_seconds"] > (t_end - t_ready) + (t_down - t_two) - 1
    assert cost["replica_seconds"] > live["seconds"] + 2
    for r in (live, gone):
        assert r["busy_s"] > 0 and r["requests"] > 0
        parts = r["startup_s"] + r["busy_s"] + r["idle_s"] + r["asleep_s"] + r["in_step_s"]
        assert parts == pytest.approx(r["lifetime_s"], abs=1e-6)
    assert cost["requests"] >= len(results)
    assert cost["cost_usd"] == pytest.approx(cost["replica_seconds"] * PRICE / 3600)
