"""`thrifty router` in front of real `thrifty serve` processes on loopback, driven with the official
openai client: same answers as a direct call, prefix-aware routing and its load guard, sessions,
retries when a replica is SIGKILLed, health, tiers with escalation and their summed cost."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest
from conftest import Server, free_port
from prometheus_client.parser import text_string_to_metric_families

from thrifty.bench.processes import start_thrifty

pytestmark = pytest.mark.slow
PRICE = "3600"  # USD per hour: a dollar a second
SERVER_ARGS = ("--kv-cache-memory", "0.2", "--max-model-len", "2048", "--price-per-hour", PRICE)


class Router:
    """A real `thrifty router` process on a free localhost port."""

    def __init__(self, *args: str, wait_healthy: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start_thrifty(["router", "--port", str(self.port), "--health-interval", "0.5", "--log-level",
                                   "warning", *args], self.url, 30, any_answer=not wait_healthy)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def metrics(url: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def start_servers(n: int, *extra: str) -> list[Server]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: Server(*SERVER_ARGS, *extra), range(n)))


@pytest.fixture(scope="module")
def servers():
    srvs = start_servers(2)
    yield srvs
    for s in srvs:
        s.stop()


@pytest.fixture(scope="module")
def model(servers):
    return openai.OpenAI(base_url=f"{servers[0].url}/v1", api_key="none").models.list().data[0].id


def backend_args(servers) -> list[str]:
    return [a for s in servers for a in ("--backend", s.url)]


def test_same_greedy_answers_as_a_direct_call(servers, model):
    direct = openai.OpenAI(base_url=f"{servers[0].url}/v1", api_key="none", max_retries=0)
    with Router(*backend_args(servers)) as router:
        client = router.client()
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        for api in ("chat", "completions"):
            kw = dict(model=model, max_tokens=24, temperature=0, seed=1)
            if api == "chat":
                want = direct.chat.completions.create(messages=messages, **kw).choices[0].message.content
                got = client.chat.completions.create(messages=messages, **kw).choices[0].message.content
                chunks = client.chat.completions.create(messages=messages, stream=True, **kw)
                streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                want = direct.completions.create(prompt="The capital of France is", **kw).choices[0].text
                got = client.completions.create(prompt="The capital of France is", **kw).choices[0].text
                chunks = client.completions.create(prompt="The capital of France is", stream=True, **kw)
                streamed = "".join(c.choices[0].text for c in chunks if c.choices)
            assert got == want == streamed, api
        # usage in a stream only when asked, as from the server itself
        chunks = list(client.completions.create(model=model, prompt="Hi", max_tokens=3, stream=True,
                                                stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].usage.cost_usd > 0
        assert all(c.usage is None for c in chunks[:-1])
        chunks = list(client.completions.create(model=model, prompt="Hi", max_tokens=3, stream=True))
        assert all(c.choices and c.usage is None for c in chunks)

        listed = [m.id for m in client.models.list().data]
        assert listed == [model]
        bad = httpx.post(f"{router.url}/v1/completions", content=b"{not json", timeout=10)
        assert bad.status_code == 400 and "Malformed JSON" in bad.json()["error"]["message"]
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
        m = metrics(router.url)
        assert sum(v for k, v in m.items() if k.startswith("thrifty:router_requests_total")) == 6
        assert sum(v for k, v in m.items() if k.startswith("thrifty:router_cost_usd_total")) > 0


def _backend_of(client: openai.OpenAI, **kw) -> str:
    raw = client.completions.with_raw_response.create(**kw)
    return raw.headers["x-thrifty-backend"]


def test_prefix_aware_keeps_each_prefix_on_one_replica(servers, model):
    prefixes = [f"Document {i}: " + " ".join(f"word{i}x{j}" for j in range(60)) for i in range(4)]
    with Router(*backend_args(servers), "--policy", "prefix_aware") as router:
        client = router.client()
        where = {i: {_backend_of(client, model=model, prompt=p + f"\nQuestion {q}:", max_tokens=2)
                     for q in range(4)} for i, p in enumerate(prefixes)}
    assert all(len(urls) == 1 for urls in where.values()), where
    assert len({u for urls in where.values() for u in urls}) == 2  # new prefixes go to the least loaded


def test_prefix_aware_load_guard_spreads_a_hot_prefix(servers, model):
    hot = "You are a helpful assistant. " * 20

    async def main(url: str) -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i: int) -> str:
                body = {"model": model, "prompt": hot + f"Question {i}:", "max_tokens": 48, "ignore_eos": True,
                        "stream": True}
                async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                    backend = r.headers["x-thrifty-backend"]
                    async for _ in r.aiter_lines():
                        pass
                return backend

            return await asyncio.gather(*(one(i) for i in range(6)))

    with Router(*backend_args(servers), "--policy", "prefix_aware", "--balance-abs", "1",
                "--balance-rel", "1") as router:
        used = asyncio.run(main(router.url))
    assert len(set(used)) == 2, used


def test_prefix_hit_rate_through_the_router_beats_round_robin(servers, tmp_path):
    hits = {}
    for seed, policy in enumerate(("round_robin", "prefix_aware")):
        with Router(*backend_args(servers), "--policy", policy) as router:
            out = tmp_path / f"{policy}.json"
            subprocess.run(
                [sys.executable, "-m", "thrifty.entrypoints.cli", "bench", "serve", "--base-url", router.url,
                 "--dataset", "shared-prefix", "--num-prefixes", "3", "--prefix-len", "128", "--input-len", "16",
                 "--output-len", "2", "--num-prompts", "12", "--max-concurrency", "1", "--seed", str(seed + 7),
                 "--no-progress", "--json", str(out), *[a for s in servers for a in ("--metrics-url", s.url)]],
                check=True, capture_output=True, timeout=300)
            result = json.loads(out.read_text())
            assert result["completed"] == 12
            delta = result["server_counters_delta"]
            hits[policy] = delta["prefix_cache_hits"] / delta["prefix_cache_queries"]
    # Three prefixes in turn over two replicas: round robin computes each prefix on both replicas,
    # prefix_aware on one.
    assert hits["prefix_aware"] > hits["round_robin"], hits


def test_session_policy_is_sticky(servers, model):
    with Router(*backend_args(servers), "--policy", "session") as router:
        client = router.client()
        first = {u: _backend_of(client, model=model, prompt="Hi", max_tokens=1, user=f"user-{u}") for u in range(16)}
        again = {u: _backend_of(client, model=model, prompt="Hello", max_tokens=1, user=f"user-{u}")
                 for u in range(16)}
        by_header = {_backend_of(client, model=model, prompt="Hi", max_tokens=1,
                                 extra_headers={"X-Session-Id": "s-1"}) for _ in range(4)}
    assert first == again and len(set(first.values())) == 2
    assert len(by_header) == 1


def test_a_replica_killed_mid_run_loses_no_request_and_comes_back(servers, model):
    victim = start_servers(1)[0]
    try:
        with Router("--backend", servers[0].url, "--backend", victim.url, "--policy", "round_robin") as router:
            async def main() -> list[str]:
                client = openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key="none", max_retries=0)

                async def one(i: int) -> str:
                    r = await client.completions.create(model=model, prompt=f"Count to {i}:", max_tokens=64,
                                                        temperature=0, extra_body={"ignore_eos": True})
                    return r.choices[0].text

                async def kill_when_busy() -> None:
                    while metrics(router.url).get(f"thrifty:router_backend_in_flight{{backend={victim.url}}}",
                                                  0) < 2:
                        await asyncio.sleep(0.05)
                    victim.proc.kill()

                results = await asyncio.gather(*(one(i) for i in range(10)), kill_when_busy())
                return results[:10]

            texts = asyncio.run(main())
            assert all(texts), texts
            m = metrics(router.url)
            assert m[f"thrifty:router_backend_healthy{{backend={victim.url}}}"] == 0
            assert m[f"thrifty:router_retries_total{{backend={victim.url}}}"] >= 2
            # Another server on the same port: the router takes it back once /health passes.
            back = start_thrifty(["serve", "--port", str(victim.port), "--dtype", "float32", "--log-level",
                                  "warning", *SERVER_ARGS], victim.url, 120)
            try:
                deadline = time.monotonic() + 30
                while metrics(router.url)[f"thrifty:router_backend_healthy{{backend={victim.url}}}"] != 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
                assert len({_backend_of(router.client(), model=model, prompt="Hi", max_tokens=1)
                            for _ in range(4)}) == 2
            finally:
                back.terminate()
                back.wait(60)
    finally:
        if victim.proc.poll() is None:
            victim.proc.kill()


def test_no_healthy_backend_is_a_503(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    with Router("--backend", dead, wait_healthy=False) as router:
        assert httpx.get(f"{router.url}/health", timeout=5).status_code == 503
        r = httpx.post(f"{router.url}/v1/completions", json={"model": "m", "prompt": "Hi"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    bad = subprocess.run([sys.executable, "-m", "thrifty.entrypoints.cli", "router", "--backend", "ftp://x"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "not an http(s) URL" in bad.stderr


# -- tiers -------------------------------------------------------------------------------------
def cost_total(servers) -> float:
    return sum(metrics(s.url)["thrifty:cost_usd_total"] for s in servers)


def tier_args(servers) -> list[str]:
    return ["--tier", f"small={servers[0].url}", "--tier", f"large={servers[1].url}"]


def test_escalation_on_length_sums_the_cost_of_both_tiers(servers, model):
    with Router(*tier_args(servers), "--escalate-on", "length") as router:
        client = router.client()
        assert "auto" in [m.id for m in client.models.list().data]
        before = cost_total(servers)
        raw = client.completions.with_raw_response.create(model="auto", prompt="Once upon a time", max_tokens=4,
                                                          temperature=0, extra_body={"ignore_eos": True})
        spent = cost_total(servers) - before
        r = raw.parse()
        assert raw.headers["x-thrifty-tier"] == "large" and r.model_extra["tier"] == "large"
        assert raw.headers["x-thrifty-tiers-tried"] == "small,large"
        assert r.usage.cost_usd == pytest.approx(spent, rel=1e-9, abs=1e-12) and spent > 0
        # An answer that ends by itself stays on the cheap tier.
        chat = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "Say hi."}], max_tokens=200, temperature=0)
        assert chat.parse().choices[0].finish_reason == "stop" and chat.headers["x-thrifty-tier"] == "small"
        # Streamed: the answering tier's chunks, with the summed cost in the usage chunk.
        before = cost_total(servers)
        chunks = list(client.completions.create(model="auto", prompt="Once upon a time", max_tokens=4,
                                                temperature=0, stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        spent = cost_total(servers) - before
        assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
        assert {c.model_extra["tier"] for c in chunks} == {"large"}
        assert chunks[-1].usage.cost_usd == pytest.approx(spent, rel=1e-9, abs=1e-12)
        m = metrics(router.url)
    assert m["thrifty:router_escalations_total{from_tier=small,reason=length,to_tier=large}"] == 2


def test_escalation_on_mean_logprob_exactly_at_the_threshold(servers, model):
    messages = [{"role": "user", "content": "Name a colour."}]
    direct = openai.OpenAI(base_url=f"{servers[0].url}/v1", api_key="none", max_retries=0)
    answer = direct.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0,
                                            logprobs=True)
    lps = [t.logprob for t in answer.choices[0].logprobs.content]
    mean = sum(lps) / len(lps)
    for threshold, tier in ((mean + 0.01, "large"), (mean - 0.01, "small")):
        with Router(*tier_args(servers), "--escalate-on", "low_logprob", "--escalate-min-logprob",
                    str(threshold)) as router:
            raw = router.client().chat.completions.with_raw_response.create(
                model="auto", messages=messages, max_tokens=32, temperature=0)
            r = raw.parse()
            assert raw.headers["x-thrifty-tier"] == tier, (threshold, mean)
            assert r.choices[0].logprobs is None  # the router asked for them, the client did not
            assert r.choices[0].message.content == answer.choices[0].message.content
            reason = metrics(router.url).get(
                "thrifty:router_escalations_total{from_tier=small,reason=low_logprob,to_tier=large}", 0)
            assert reason == (1 if tier == "large" else 0)


def test_least_loaded_spreads_and_a_config_file_reloads(servers, model, tmp_path):
    config = tmp_path / "router.yaml"
    config.write_text(f"policy: least_loaded\nbackends: [{servers[0].url}]\n")
    with Router("--config", str(config)) as router:
        client = router.client()
        assert {_backend_of(client, model=model, prompt="Hi", max_tokens=1) for _ in range(3)} == {servers[0].url}
        config.write_text(f"policy: least_loaded\nbackends: [{servers[0].url}, {servers[1].url}]\n")
        deadline = time.monotonic() + 30
        while metrics(router.url).get(f"thrifty:router_backend_healthy{{backend={servers[1].url}}}") != 1:
            assert time.monotonic() < deadline, "the new backend never joined"
            time.sleep(0.2)

        async def main() -> list[str]:
            async with httpx.AsyncClient(timeout=120) as http:
                async def one(i: int) -> str:
                    body = {"model": model, "prompt": f"Story {i}:", "max_tokens": 32, "ignore_eos": True}
                    return (await http.post(f"{router.url}/v1/completions", json=body)).headers["x-thrifty-backend"]

                return await asyncio.gather(*(one(i) for i in range(4)))

        used = asyncio.run(main())
        assert sorted(used.count(s.url) for s in servers) == [2, 2], used
        config.write_text("backends: 5\n")  # a bad edit keeps the running configuration
        time.sleep(1.5)
        assert router.proc.poll() is None
        assert _backend_of(client, model=model, prompt="Hi", max_tokens=1) in {s.url for s in servers}
