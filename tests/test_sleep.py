"""Sleep mode (issue 15): the cost meter's asleep state, the engine's sleep and wake (offline LLM,
both backends), and a real `thrifty serve --enable-sleep-mode` on loopback: memory released as
measured, the same greedy answer after waking, the 503 contract under load, idle sleeps."""

from __future__ import annotations

import json
import threading
import time

import httpx2 as httpx
import pytest
from conftest import PROMPTS, Server
from test_server import API_KEY, http, metrics

from thrifty import SamplingParams
from thrifty.engine.cost_meter import CostMeter
from thrifty.engine.sleep import EngineSleepingError, SleepConfig

GiB = 1 << 30
KV_GIB = 0.25  # the servers' KV cache: what level 1 must release, at least most of it
PRICE = 3600.0  # a dollar a second
TENANT_KEY = "sk-tenant"
SERVE_ARGS = ("--kv-cache-memory", str(KV_GIB), "--max-model-len", "2048", "--price-per-hour", str(PRICE))


# -- no model ---------------------------------------------------------------------------------
def test_cost_meter_busy_idle_asleep_add_up_to_elapsed():
    meter = CostMeter(3600.0, now=0.0)  # a dollar a second
    meter.work_arrived(1.0)  # 0-1 idle
    meter.step(3.0, {"a": 10})  # 1-3 busy
    meter.went_idle()
    meter.went_to_sleep(4.0)  # 3-4 idle
    meter.went_idle()  # (the loop says so while asleep: it stays asleep)
    assert meter.asleep_seconds(6.0) == 2.0 and meter.idle_seconds(6.0) == 2.0
    meter.woke(7.5)  # 4-7.5 asleep, the wake included
    meter.work_arrived(8.0)  # 7.5-8 idle
    meter.step(9.0, {"b": 5})  # 8-9 busy
    meter.went_idle()
    now = 10.0  # 9-10 idle
    assert (meter.busy_s, meter.idle_seconds(now), meter.asleep_seconds(now)) == (3.0, 3.5, 3.5)
    assert meter.busy_s + meter.idle_seconds(now) + meter.asleep_seconds(now) == now - meter.start
    assert meter.asleep_cost_usd(now) == 3.5 and meter.idle_cost_usd(now) == 3.5
    meter.woke(11.0)  # awake already: nothing changes
    assert meter.asleep_seconds(11.0) == 3.5


def test_sleep_config_checks_and_idle_sleep_implies_wake_on_request():
    assert SleepConfig(sleep_when_idle=5).wake_on_request
    assert not SleepConfig().wake_on_request
    for bad in ({"sleep_level": 3}, {"sleep_when_idle": 0}, {"drain_timeout": -1}):
        with pytest.raises(ValueError):
            SleepConfig(**bad)
    assert EngineSleepingError("x", 0.2).retry_after == 1 and EngineSleepingError("x", 2.1).retry_after == 3


# -- the engine (offline LLM) -----------------------------------------------------------------
def _kv_bytes(engine) -> int:
    paged = engine.runner.paged
    return sum(t.numel() * t.element_size() for t in paged.k_caches + paged.v_caches)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_llm_sleep_and_wake_keep_the_greedy_output(backend):
    from thrifty import LLM

    llm = LLM(dtype="float32", seed=0, backend=backend, kv_cache_memory=KV_GIB, max_model_len=2048,
              enable_sleep_mode=True)
    params = SamplingParams(temperature=0, max_tokens=24)
    prompts = [PROMPTS[5], PROMPTS[7]]  # more than a block each: the prefix cache keeps them
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert all(o.num_cached_tokens > 0 for o in llm.generate(prompts, params, use_tqdm=False))
    engine = llm.llm_engine
    kv = _kv_bytes(engine)
    assert kv >= 0.95 * KV_GIB * GiB
    for level in (1, 2, 1):
        result = llm.sleep(level)
        assert result.level == level and engine.is_sleeping
        assert result.released_bytes >= 0.8 * kv  # measured: the resident set went down by the KV cache
        with pytest.raises(RuntimeError, match="asleep"):
            llm.generate(PROMPTS[0], params, use_tqdm=False)
        assert llm.wake_up() > 0 and not engine.is_sleeping
        assert _kv_bytes(engine) == kv
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == ref
        assert all(o.num_cached_tokens == 0 for o in outs)  # the prefix cache went with the KV it pointed at
    assert llm.wake_up() == 0.0  # awake already
    engine.add_request(PROMPTS[0], params)
    with pytest.raises(RuntimeError, match="unfinished"):
        llm.sleep(1)
    while engine.has_unfinished_requests():
        engine.step()
    with pytest.raises(ValueError, match="level"):
        llm.sleep(3)


@pytest.mark.slow
def test_sleep_needs_sleep_mode(llm):
    with pytest.raises(ValueError, match="enable_sleep_mode"):
        llm.sleep(1)


@pytest.mark.slow
def test_async_llm_drain_timeout_aborts_then_a_request_wakes_it():
    """mode=wait past sleep_config.drain_timeout: the request still running gets
    EngineSleepingError; with wake_on_request the next request wakes the engine and is served."""
    import asyncio

    from thrifty.config import EngineConfig
    from thrifty.engine.async_llm import AsyncLLM

    config = EngineConfig(dtype="float32", seed=0, kv_cache_memory=KV_GIB, max_model_len=2048,
                          enable_sleep_mode=True)

    async def main():
        llm = AsyncLLM(config, sleep_config=SleepConfig(wake_on_request=True, drain_timeout=0.3))
        llm.start()
        ids = llm.engine.tokenizer.encode(PROMPTS[0])
        outputs = llm.generate(ids, SamplingParams(max_tokens=1500, ignore_eos=True), "long")
        await outputs.__anext__()  # running
        start = time.monotonic()
        result = await llm.sleep(1, mode="wait")
        assert 0.3 <= time.monotonic() - start and result.level == 1 and llm.sleep_state == "asleep"
        with pytest.raises(EngineSleepingError):
            async for _ in outputs:
                pass
        tokens = []
        async for out in llm.generate(ids, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), "next"):
            tokens += out.outputs[0].token_ids
        assert len(tokens) == 5 and llm.sleep_state == "awake" and llm.last_wake_seconds > 0
        assert llm.num_refused_asleep == 0
        with pytest.raises(ValueError, match="mode"):
            await llm.sleep(1, mode="later")
        await llm.shutdown()

    asyncio.run(main())


# -- the server -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    # API_KEY is the operator's: once a key is admin, only admin keys may sleep and wake the server
    srv = Server("--enable-sleep-mode", "--api-key", f"ops={API_KEY}:admin=true", "--api-key", f"tenant={TENANT_KEY}",
                 *SERVE_ARGS)
    yield srv
    assert srv.stop() == 0


def _greedy(server) -> str:
    r = http(server, "POST", "/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.slow
@pytest.mark.parametrize("level", [1, 2])
def test_sleep_refuses_with_503_then_wakes_to_the_same_answer(server, level):
    before_text = _greedy(server)
    m0, t0 = metrics(server), time.monotonic()
    assert http(server, "GET", "/is_sleeping").json() == {"is_sleeping": False}
    r = http(server, "POST", f"/sleep?level={level}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["status"], body["level"]) == ("sleeping", level) and body["seconds"] > 0
    assert body["released_bytes"] >= 0.8 * KV_GIB * GiB
    m1 = metrics(server)
    assert m1["process_resident_memory_bytes"] <= m0["process_resident_memory_bytes"] - 0.8 * KV_GIB * GiB
    assert m1["thrifty:sleeping"] == level and m1["thrifty:sleep_released_bytes"] == body["released_bytes"]
    state = {1: "weights_offloaded", 2: "discard_all"}[level]
    assert m1[f"vllm:engine_sleep_state{{sleep_state={state}}}"] == 1
    assert m1["vllm:engine_sleep_state{sleep_state=awake}"] == 0
    assert http(server, "GET", "/is_sleeping").json() == {"is_sleeping": True}
    assert http(server, "GET", "/health", key=None).status_code == 200
    for stream in (False, True):
        r = http(server, "POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stream": stream})
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "service_unavailable"
    r = http(server, "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 503
    assert http(server, "POST", f"/sleep?level={level}").json()["released_bytes"] == 0  # asleep already
    r = http(server, "POST", "/wake_up")
    assert r.status_code == 200 and r.json()["status"] == "awake" and r.json()["seconds"] > 0
    assert http(server, "GET", "/is_sleeping").json() == {"is_sleeping": False}
    assert _greedy(server) == before_text
    time.sleep(0.2)
    m2, t2 = metrics(server), time.monotonic()
    d = {k: m2[k] - m0.get(k, 0) for k in m2}
    assert m2["thrifty:sleeping"] == 0
    assert d["thrifty:requests_refused_asleep_total"] == 3
    assert (d["thrifty:sleep_seconds_count"], d["thrifty:wake_seconds_count"]) == (1, 1)
    assert d["thrifty:wake_seconds_sum"] == pytest.approx(r.json()["seconds"], abs=1e-3)
    assert d["thrifty:asleep_seconds_total"] > 0
    assert m2["thrifty:asleep_cost_usd_total"] == pytest.approx(m2["thrifty:asleep_seconds_total"] * PRICE / 3600)
    parts = sum(d[f"thrifty:{k}_seconds_total"] for k in ("busy", "idle", "asleep"))
    assert parts == pytest.approx(t2 - t0, abs=0.05)  # every second of the server is one of the three


@pytest.mark.slow
def test_sleep_routes_check_their_input_and_the_key(server):
    for query in ("level=3", "level=x", "level=0", "mode=later"):
        r = http(server, "POST", f"/sleep?{query}")
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == query.split("=")[0]
    assert http(server, "POST", "/sleep", key=None).status_code == 401
    assert http(server, "POST", "/wake_up", key="sk-wrong").status_code == 401
    for path in ("/sleep", "/wake_up"):  # a tenant's key is valid, but not an operator's
        r = http(server, "POST", path, key=TENANT_KEY)
        assert r.status_code == 403, r.text
        assert (r.json()["error"]["type"], r.json()["error"]["code"]) == ("permission_error", "admin_key_required")
    assert http(server, "GET", "/is_sleeping", key=TENANT_KEY).json() == {"is_sleeping": False}
    r = http(server, "POST", "/v1/completions", key=TENANT_KEY, json={"prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert http(server, "GET", "/is_sleeping").json() == {"is_sleeping": False}


@pytest.mark.slow
def test_mode_wait_lets_a_request_in_flight_finish(server):
    result = {}

    def ask():
        result["r"] = http(server, "POST", "/v1/completions",
                           json={"prompt": PROMPTS[0], "max_tokens": 48, "ignore_eos": True, "temperature": 0})

    t = threading.Thread(target=ask)
    t.start()
    deadline = time.monotonic() + 20
    while metrics(server)["vllm:num_requests_running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    r = http(server, "POST", "/sleep?level=1&mode=wait")
    t.join()
    assert r.status_code == 200
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 48
    assert http(server, "POST", "/wake_up").status_code == 200


@pytest.mark.slow
def test_sleep_aborts_requests_in_flight_each_with_an_answer(server):
    """mode=abort: a non-streamed request in flight gets the 503, a stream under way an in-band
    error then [DONE]; their blocks are freed."""
    before = metrics(server).get("vllm:request_success_total{finished_reason=abort}", 0)
    long = {"prompt": PROMPTS[1], "max_tokens": 1500, "ignore_eos": True}
    plain = {}
    t = threading.Thread(target=lambda: plain.setdefault("r", http(server, "POST", "/v1/completions", json=long)))
    with httpx.stream("POST", f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={**long, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")  # under way
        t.start()
        deadline = time.monotonic() + 20
        while metrics(server)["vllm:num_requests_running"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert http(server, "POST", "/sleep").status_code == 200
        rest = [line for line in lines if line.startswith("data: ")]
    t.join()
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][len("data: "):])["error"]
    assert error["type"] == "service_unavailable" and "sleep" in error["message"]
    assert plain["r"].status_code == 503 and int(plain["r"].headers["Retry-After"]) >= 1
    assert http(server, "POST", "/wake_up").status_code == 200
    m = metrics(server)
    assert m["vllm:request_success_total{finished_reason=abort}"] == before + 2
    assert (m["vllm:num_requests_running"], m["vllm:kv_cache_usage_perc"]) == (0, 0)


def _client_loop(url: str, stop: threading.Event, seen: list, problems: list, index: int) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=120) as client:
        i = 0
        while not stop.is_set():
            stream = (i + index) % 2 == 0
            body = {"prompt": PROMPTS[(i + index) % len(PROMPTS)], "max_tokens": 12 + i % 8, "stream": stream}
            i += 1
            if not stream:
                r = client.post(f"{url}/v1/completions", json=body, headers=headers)
                seen.append(r.status_code)
                if r.status_code == 503 and int(r.headers.get("Retry-After", "0")) < 1:
                    problems.append(f"503 without Retry-After: {r.headers}")
                continue
            with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
                seen.append(r.status_code)
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                if r.status_code == 200 and (not lines or lines[-1] != "data: [DONE]"):
                    problems.append(f"a stream ended without [DONE]: {lines[-2:]}")
                if r.status_code == 200 and any('"error"' in line and "service_unavailable" not in line
                                                for line in lines):
                    problems.append(f"an in-band error other than the 503: {lines}")


@pytest.mark.slow
def test_load_during_sleep_and_wake_storm_sees_only_200_or_503(server):
    before_text = _greedy(server)
    stop, seen, problems = threading.Event(), [], []
    clients = [threading.Thread(target=_client_loop, args=(server.url, stop, seen, problems, i)) for i in range(8)]
    for t in clients:
        t.start()
    controls: list[int] = []

    def control(path: str) -> None:
        controls.append(http(server, "POST", path).status_code)

    try:
        for cycle in range(3):
            time.sleep(1.0)
            # Two sleeps at once and a wake racing them: one sleep, then the wake, in that order.
            racers = [threading.Thread(target=control, args=(p,)) for p in
                      (f"/sleep?level={1 + cycle % 2}", "/sleep?level=1", "/wake_up")]
            for t in racers:
                t.start()
            for t in racers:
                t.join()
            time.sleep(0.3)
            control(f"/sleep?level={1 + cycle % 2}")
            time.sleep(0.5)
            control("/wake_up")
    finally:
        stop.set()
        for t in clients:
            t.join()
    assert not problems, problems[:3]
    assert set(seen) <= {200, 503} and 200 in seen and 503 in seen, sorted(set(seen))
    assert controls == [200] * len(controls)
    assert http(server, "GET", "/is_sleeping").json() == {"is_sleeping": False}
    assert _greedy(server) == before_text
    m = metrics(server)
    assert (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"], m["vllm:kv_cache_usage_perc"]) == (0, 0, 0)


@pytest.mark.slow
def test_sleep_when_idle_then_a_request_wakes_it():
    srv = Server("--enable-sleep-mode", "--sleep-when-idle", "1", *SERVE_ARGS)
    try:
        assert http(srv, "GET", "/is_sleeping", key=None).json() == {"is_sleeping": False}
        deadline = time.monotonic() + 20
        while metrics(srv)["thrifty:sleeping"] != 1:  # (is_sleeping says so from the moment it starts)
            assert time.monotonic() < deadline, "not asleep after 20 s idle"
            time.sleep(0.2)
        assert http(srv, "GET", "/is_sleeping", key=None).json() == {"is_sleeping": True}
        m0 = metrics(srv)
        assert m0.get("thrifty:wake_seconds_count", 0) == 0
        r = http(srv, "POST", "/v1/completions", key=None,
                 json={"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        m1 = metrics(srv)
        assert m1["thrifty:wake_seconds_count"] == 1 and m1["thrifty:requests_refused_asleep_total"] == 0
        assert m1["thrifty:asleep_seconds_total"] > 0
    finally:
        assert srv.stop() == 0


@pytest.mark.slow
def test_without_the_flag_the_sleep_routes_are_absent():
    srv = Server(*SERVE_ARGS)
    try:
        for method, path in (("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping")):
            assert http(srv, method, path, key=None).status_code == 404
        assert "thrifty:sleeping" not in metrics(srv)
    finally:
        assert srv.stop() == 0
