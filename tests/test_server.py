"""The OpenAI-compatible server: a real `thrifty serve` process on localhost, the official
openai client (sync and async, streaming and not), raw HTTP for the error cases."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import signal
import threading
import time
from pathlib import Path
from typing import Literal

import httpx2 as httpx
import jsonschema
import openai
import pytest
from conftest import PROMPTS, Server
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field

from thrifty import SamplingParams

pytestmark = pytest.mark.slow
API_KEY = "sk-test"
PRICE = 3600.0  # USD per hour: one dollar per second makes costs easy to read
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server():
    srv = Server("--api-key", f"tenant={API_KEY}", "--api-key", "other=sk-other", "--served-model-name",
                 "thrifty-test", "smol", "--price-per-hour", str(PRICE), "--enable-auto-tool-choice",
                 "--tool-call-parser", "smollm2")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def http(server, method: str, path: str, key: str | None = API_KEY, **kw) -> httpx.Response:
    headers = kw.pop("headers", {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    kw.setdefault("timeout", 60)
    return httpx.request(method, f"{server.url}{path}", headers=headers, **kw)


def metrics(server) -> dict[str, float]:
    """name{label=value,...} -> value, labels sorted."""
    out = {}
    for family in text_string_to_metric_families(http(server, "GET", "/metrics", key=None).text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_idle(server, timeout: float = 15) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        idle = (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"], m["vllm:kv_cache_usage_perc"])
        if idle == (0, 0, 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def stream_text(stream) -> tuple[dict[int, str], dict[int, str]]:
    texts, reasons = {}, {}
    for chunk in stream:
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons


# -- parity with the offline engine ------------------------------------------------------------
def test_completions_equal_llm_generate_streamed_and_not(client, model, llm):
    for prompt in PROMPTS[:4]:
        ref = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
        r = client.completions.create(model=model, prompt=prompt, max_tokens=32, temperature=0)
        assert r.choices[0].text == ref.text
        assert r.choices[0].finish_reason == ref.finish_reason
        assert r.usage.completion_tokens == len(ref.token_ids)
        assert r.usage.prompt_tokens == len(llm.get_tokenizer().encode(prompt))
        texts, reasons = stream_text(client.completions.create(model=model, prompt=prompt, max_tokens=32,
                                                               temperature=0, stream=True))
        assert texts == {0: ref.text} and reasons == {0: ref.finish_reason}


def test_chat_equals_llm_chat_streamed_and_not(client, model, llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ref = llm.chat(messages, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    r = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=40, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text and "Paris" in ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_stop_strings_cut_the_same_streamed_and_not(client, model, llm):
    prompt = PROMPTS[2]
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)[0].outputs[0].text
    words = full.split()
    stop = words[len(words) // 2] + " " + words[len(words) // 2 + 1]  # spans two tokens, mid-output
    cut = full[: full.index(stop)]
    for include in (False, True):
        kw = dict(model=model, prompt=prompt, max_tokens=48, temperature=0, stop=[stop, "zzz-never"],
                  extra_body={"include_stop_str_in_output": include})
        r = client.completions.create(**kw)
        expected = cut + stop if include else cut
        assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
        texts, reasons = stream_text(client.completions.create(stream=True, **kw))
        assert texts == {0: expected} and reasons == {0: "stop"}


def test_n_seed_and_list_and_token_prompts(client, model, llm):
    kw = dict(model=model, max_tokens=12, temperature=1.0, seed=7)
    a = client.completions.create(prompt="Tell me a story:", n=3, **kw)
    b = client.completions.create(prompt="Tell me a story:", n=3, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: repeats exactly
    assert len({c.text for c in a.choices}) > 1  # siblings differ
    texts, _ = stream_text(client.completions.create(prompt="Tell me a story:", n=3, stream=True, **kw))
    assert texts == {c.index: c.text for c in a.choices}
    assert 3 <= a.usage.completion_tokens <= 36

    ids = llm.get_tokenizer().encode(PROMPTS[0])
    r = client.completions.create(model=model, prompt=[PROMPTS[0], PROMPTS[3]], n=2, max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy siblings agree
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    many = client.completions.create(model=model, prompt=[ids, ids], max_tokens=8, temperature=0)
    assert [c.text for c in many.choices] == [r.choices[0].text] * 2
    assert many.usage.prompt_tokens == 2 * len(ids)


def test_echo_and_logprobs(client, model):
    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0, echo=True)
    plain = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert r.choices[0].text == PROMPTS[0] + plain.choices[0].text
    texts, _ = stream_text(client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                                     echo=True, stream=True))
    assert texts[0] == r.choices[0].text

    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and value <= 0
        assert abs(max(top.values()) - value) < 1e-4  # greedy: the chosen token is the top one

    c = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert all(t.bytes == list(t.token.encode()) for t in content)


def test_usage_in_stream_and_cached_tokens(client, model):
    prompt = "A unique preamble for the cache test. " * 8  # several full blocks
    first = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0)
    again = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= 32 and cached % 16 == 0 and cached < again.usage.prompt_tokens
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 4
    assert last.usage.prompt_tokens == first.usage.prompt_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + 4
    assert last.usage.prompt_tokens_details.cached_tokens == cached


def test_async_client_streams_concurrently(server, model):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)

        async def one(prompt):
            r = await aclient.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
            s = await aclient.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0,
                                                 stream=True)
            text = "".join([c.choices[0].text async for c in s if c.choices])
            return r.choices[0].text, text

        results = await asyncio.gather(*(one(p) for p in PROMPTS))
        await aclient.close()
        return results

    for whole, streamed in asyncio.run(main()):
        assert whole == streamed


# -- endpoints and errors ----------------------------------------------------------------------
def test_open_and_protected_routes(server, model):
    assert http(server, "GET", "/health", key=None).status_code == 200
    assert http(server, "GET", "/metrics", key=None).status_code == 200
    assert http(server, "GET", "/version", key=None).json()["version"]
    for key in (None, "wrong"):
        r = http(server, "GET", "/v1/models", key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = http(server, "POST", "/v1/completions", key=key, json={"prompt": "hi"})
        assert r.status_code == 401
    data = http(server, "GET", "/v1/models").json()["data"]
    assert [d["id"] for d in data] == ["thrifty-test", "smol"] == [model, "smol"]
    assert data[0]["object"] == "model" and data[0]["max_model_len"] > 0
    r = http(server, "POST", "/v1/completions", json={"model": "smol", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "smol"  # any served name, echoed back


def test_tokenize_detokenize(server, llm):
    r = http(server, "POST", "/tokenize", json={"prompt": PROMPTS[2]}).json()
    assert r["tokens"] == llm.get_tokenizer().encode(PROMPTS[2]) and r["count"] == len(r["tokens"])
    assert http(server, "POST", "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == PROMPTS[2]
    chat = http(server, "POST", "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 3
    assert http(server, "POST", "/detokenize", json={"tokens": [-1]}).status_code == 400
    # The default model's template renders no tools: they go into a system prompt, in the parser's format.
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    r = http(server, "POST", "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}], "tools": tools})
    text = llm.get_tokenizer().decode(r.json()["tokens"])
    assert '<tools>[{"type": "function", "function": {"name": "get_weather"' in text and "<tool_call>[" in text
    assert text.index("<tools>") < text.index("Hi")


@pytest.mark.parametrize("path,body,status,param,words", [
    ("/v1/completions", b"{oops", 400, None, "Malformed JSON"),
    ("/v1/completions", b"[1]", 400, None, "dictionary"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "x"}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "greater"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature", "greater"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", "greater"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", "greater"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs", "less"),
    ("/v1/completions", {"prompt": "hi", "top_k": -5}, 400, "top_k", "top_k"),
    ("/v1/completions", {"prompt": "hi", "seed": 1 << 70}, 400, "seed", "64-bit"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 9, "max_tokens": 3}, 400, "min_tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 9000}, 400, "max_tokens", "8192 tokens"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": [10 ** 7]}, 400, "prompt", "vocabulary"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "required"),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "xml"}}, 400, "response_format",
     "unknown type 'xml'"),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "json_schema"}}, 400, "response_format",
     "needs a json_schema"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}}, 400, "response_format",
     "objectx"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"regex": "[a-"}}, 400, "structured_outputs",
     "regex"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"choice": []}}, 400, "structured_outputs",
     "non-empty list"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"jsn": {}}}, 400, "structured_outputs",
     "unknown field"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"regex": "a", "choice": ["a"]}}, 400,
     "structured_outputs", "exactly one"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"grammar": "root ::= ("}}, 400,
     "structured_outputs", "grammar"),
    ("/v1/completions", {"prompt": "hi", "guided_regex": "a+", "response_format": {"type": "json_object"}}, 400,
     "guided_regex", "structured_outputs is the current field"),
    ("/v1/completions", {"prompt": "hi", "guided_choice": ["a"], "ignore_eos": True}, 400, "ignore_eos",
     "structured_outputs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "tools", "expected"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": "x"}}]}, 400, "tools", "JSON schema"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {
            "name": "g"}}}, 400, "tool_choice", "not among the tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, 400,
     "tool_choice", "needs tools"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model", "does not exist"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "list"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages", "only text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 8190},
     400, "max_completion_tokens", "in the completion"),
    ("/v1/completions", b'{"prompt": "\\ud800"}', 400, "prompt", "tokenized"),  # a lone surrogate
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options",
     "stream=true"),
    ("/v1/completions", {"prompt": ["hi"] * 2000}, 429, None, "limit is 1024"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs", "logprobs=true"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ 1 }}"}, 400,
     "chat_template", "--trust-request-chat-template"),
    ("/tokenize", {"messages": []}, 400, "messages", "at least 1"),
    ("/tokenize", b'{"prompt": "\\ud800"}', 400, "prompt", "tokenized"),
    ("/v1/nowhere", {}, 404, None, "Not Found"),
    ("/v1/completions", {"prompt": "hi", "priority": 1}, 400, "priority", "--scheduling-policy priority"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "priority": -2}, 400, "priority",
     "under fcfs every request has priority 0"),
    ("/v1/completions", {"prompt": "hi", "priority": True}, 400, "priority", "integer"),
    ("/v1/completions", {"prompt": "hi", "priority": 1 << 63}, 400, "priority", "less than or equal"),
])
def test_errors_are_openai_error_objects(server, path, body, status, param, words):
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = http(server, "POST", path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and words in err["message"]


def test_max_tokens_over_context_message_gives_the_numbers(server):
    r = http(server, "POST", "/v1/completions", json={"prompt": "hi there", "max_tokens": 8191})
    msg = r.json()["error"]["message"]
    assert r.status_code == 400 and "8192" in msg and "8193" in msg and "8191 in the completion" in msg


def test_disconnect_mid_stream_aborts_and_frees_blocks(server, model):
    before = metrics(server).get('vllm:request_success_total{finished_reason=abort}', 0)
    with httpx.stream("POST", f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": model, "prompt": PROMPTS[7], "max_tokens": 2000, "ignore_eos": True,
                            "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
        assert metrics(server)["vllm:kv_cache_usage_perc"] > 0
    m = wait_idle(server, timeout=10)
    assert (m["vllm:num_requests_running"], m["vllm:kv_cache_usage_perc"]) == (0, 0)
    assert m['vllm:request_success_total{finished_reason=abort}'] == before + 1


def test_disconnect_before_a_non_streamed_answer_aborts(server, model):
    before = metrics(server).get('vllm:request_success_total{finished_reason=abort}', 0)
    with pytest.raises(httpx.TimeoutException):
        http(server, "POST", "/v1/completions", timeout=1.5,
             json={"model": model, "prompt": PROMPTS[0], "max_tokens": 3000, "ignore_eos": True})
    m = wait_idle(server, timeout=10)  # 3000 tokens would take minutes: it was aborted
    assert (m["vllm:num_requests_running"], m["vllm:kv_cache_usage_perc"]) == (0, 0)
    assert m['vllm:request_success_total{finished_reason=abort}'] == before + 1


def test_metrics_names_and_counts(server, client, model):
    before = metrics(server)
    r = client.completions.create(model=model, prompt="Count these prompt tokens exactly.", max_tokens=7,
                                  temperature=0, extra_body={"ignore_eos": True})
    after = metrics(server)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["vllm:prompt_tokens_total"] == r.usage.prompt_tokens
    assert delta["vllm:generation_tokens_total"] == 7
    assert delta["vllm:request_success_total{finished_reason=length}"] == 1
    assert delta["vllm:time_to_first_token_seconds_count"] == 1
    assert delta["vllm:e2e_request_latency_seconds_count"] == 1
    assert delta["vllm:request_queue_time_seconds_count"] == 1
    assert delta["vllm:inter_token_latency_seconds_count"] >= 1
    assert delta["vllm:iteration_tokens_total_sum"] == r.usage.prompt_tokens + 6  # the last token is not fed back
    assert delta["vllm:prefix_cache_queries_total"] == r.usage.prompt_tokens
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_cached_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total"):
        assert name in after
    text = http(server, "GET", "/metrics", key=None).text
    assert f'vllm:num_requests_running{{model_name="{model}"}}' in text


def test_cost_charged_to_requests_idle_and_per_key(server, model):
    """Per-request cost_usd sums to the growth of thrifty:cost_usd_total; busy + idle cost is
    elapsed time x price (with grammars compiled outside the steps, which their requests pay);
    tokens and cost are counted per API key name."""
    def clients(key):
        return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)

    tenant, other = clients(API_KEY), clients("sk-other")
    wait_idle(server)
    m0, t0 = metrics(server), time.monotonic()

    def one(i):
        c = tenant if i % 2 else other
        if i % 3 == 0:  # streamed: the cost arrives in the usage chunk
            chunks = list(c.completions.create(model=model, prompt=f"Item {i}:", max_tokens=4 + i, temperature=0,
                                               stream=True, stream_options={"include_usage": True}))
            return i % 2, chunks[-1].usage
        grammar = {"structured_outputs": {"regex": f"item {time.time_ns()}-[0-9]{{2}}"}} if i % 4 == 1 else None
        return i % 2, c.completions.create(model=model, prompt=f"Item {i}:", max_tokens=4 + i, temperature=0,
                                           extra_body=grammar).usage

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        usages = list(pool.map(one, range(12)))
    m1 = wait_idle(server)
    time.sleep(0.3)
    m2, t2 = metrics(server), time.monotonic()
    assert m2["thrifty:structured_output_compile_seconds_total"] > m0["thrifty:structured_output_compile_seconds_total"]
    costs = [u.cost_usd for _, u in usages]
    assert all(c > 0 for c in costs)
    assert sum(costs) == pytest.approx(m1["thrifty:cost_usd_total"] - m0["thrifty:cost_usd_total"], rel=1e-9)
    seconds = lambda m: m["thrifty:busy_seconds_total"] + m["thrifty:idle_seconds_total"]  # noqa: E731
    assert seconds(m2) - seconds(m0) == pytest.approx(t2 - t0, abs=0.05)  # scrapes take a few ms
    for m in (m0, m2):
        assert m["thrifty:cost_usd_total"] == pytest.approx(m["thrifty:busy_seconds_total"] * PRICE / 3600)
        assert m["thrifty:idle_cost_usd_total"] == pytest.approx(m["thrifty:idle_seconds_total"] * PRICE / 3600)
    assert 0 < m2["thrifty:busy_ratio"] <= 1 and m2["thrifty:cost_per_million_tokens_usd"] > 0
    for flag, name in ((1, "tenant"), (0, "other")):
        mine = [u for f, u in usages if f == flag]
        d = lambda k: m2[f"thrifty:{k}{{key_name={name}}}"] - m0.get(f"thrifty:{k}{{key_name={name}}}", 0)  # noqa: E731
        assert d("key_generation_tokens_total") == sum(u.completion_tokens for u in mine)
        assert d("key_prompt_tokens_total") == sum(u.prompt_tokens for u in mine)
        assert d("key_cost_usd_total") == pytest.approx(sum(u.cost_usd for u in mine), rel=1e-9)


def _load_module():
    spec = importlib.util.spec_from_file_location("server_load", ROOT / "benchmarks" / "server_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_load_200_streams_with_disconnects_and_malformed_bursts(server):
    result = asyncio.run(_load_module().run_load(server.url, API_KEY, num_requests=200, disconnect_frac=0.2))
    assert result["failures"] == 0 and result["status_5xx"] == 0, result["errors"]
    assert result["usage_mismatches"] == 0, result["errors"]
    assert result["completed"] == 160 and result["disconnected"] == 40
    assert result["malformed_4xx"] == result["malformed_sent"] > 0
    assert result["health_checks"] > 0 and result["health_not_200"] == 0
    m = wait_idle(server)
    assert (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"], m["vllm:kv_cache_usage_perc"]) == (0, 0, 0)


# -- structured output ---------------------------------------------------------------------------
class Strict(BaseModel):
    # additionalProperties: false, as parse() sends every model (a schema that allows other keys
    # lets a sampled answer run on with keys of its own)
    model_config = ConfigDict(extra="forbid")


class Person(Strict):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]


class Item(Strict):
    sku: str = Field(max_length=12)
    qty: int = Field(ge=1, le=9)


class Order(Strict):
    id: int = Field(ge=1, le=99999)
    items: list[Item] = Field(min_length=1, max_length=3)
    total: float = Field(ge=0, le=1000)
    paid: bool


class Team(Strict):
    name: str = Field(max_length=20)
    members: list[Person] = Field(min_length=1, max_length=2)
    score: float = Field(ge=-1, le=1)


class Event(Strict):
    title: str = Field(max_length=30)
    day: int = Field(ge=1, le=31)
    month: Literal["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    tags: list[Literal["work", "family", "sport", "music"]] = Field(max_length=3)
    online: bool


STRUCTURED_CASES = [(Person, "Make up a person: their name, age and role."),
                    (Order, "Write an online order with one or two items."),
                    (Team, "Describe a small team and its score."),
                    (Event, "Plan an event for next month.")]


def test_parse_returns_the_pydantic_object_and_sampled_outputs_all_validate(client, model):
    """client.chat.completions.parse with a Pydantic response_format, greedy; then 200 samples at
    temperature 1 across the schemas (nested objects, arrays, enums, required fields, bounded
    numbers): every one validates and ended by EOS; and any JSON object."""
    for cls, question in STRUCTURED_CASES:
        r = client.chat.completions.parse(model=model, messages=[{"role": "user", "content": question}],
                                          response_format=cls, temperature=0, max_completion_tokens=300)
        assert isinstance(r.choices[0].message.parsed, cls), r.choices[0].message.content
    count = 0
    for cls, question in STRUCTURED_CASES:
        fmt = {"type": "json_schema", "json_schema": {"name": cls.__name__, "schema": cls.model_json_schema(),
                                                      "strict": True}}
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], n=50,
                                           temperature=1.0, seed=count, response_format=fmt, max_completion_tokens=400)
        for c in r.choices:
            assert c.finish_reason == "stop", c.message.content
            value = json.loads(c.message.content)
            jsonschema.validate(value, cls.model_json_schema())
            cls.model_validate(value)
            count += 1
    assert count == 200
    # Any JSON object (json_object): every sample that ends parses to an object (one with no schema
    # to bound it may run on to max_tokens: a cut answer, not a wrong one).
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A JSON object about cats."}],
                                       n=8, seed=1, temperature=1.0, response_format={"type": "json_object"},
                                       max_completion_tokens=150)
    ended = [c for c in r.choices if c.finish_reason == "stop"]
    assert ended and all(isinstance(json.loads(c.message.content), dict) for c in ended)
    assert all(c.message.content.startswith("{") for c in r.choices)


def test_regex_choice_legacy_fields_and_streaming_match(client, model):
    messages = [{"role": "user", "content": "Is the sky blue? Then give a code."}]
    choice = client.chat.completions.create(model=model, messages=messages, temperature=1.0, n=6, seed=1,
                                            extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert {c.message.content for c in choice.choices} <= {"yes", "no"}
    code = client.completions.create(model=model, prompt="Code: ", temperature=1.0, n=6, seed=2, max_tokens=20,
                                     extra_body={"structured_outputs": {"regex": r"[A-Z]{2}-\d{4}"}})
    assert all(re.fullmatch(r"[A-Z]{2}-\d{4}", c.text) for c in code.choices)
    legacy = client.completions.create(model=model, prompt="Answer: ", temperature=0, max_tokens=20,
                                       extra_body={"guided_choice": ["left", "right"]})
    assert legacy.choices[0].text in ("left", "right")  # vLLM's old field still constrains
    # Streamed deltas concatenate to the non-streamed answer (greedy).
    fmt = {"type": "json_schema", "json_schema": {"name": "Person", "schema": Person.model_json_schema()}}
    whole = client.chat.completions.create(model=model, messages=messages, temperature=0, response_format=fmt,
                                           max_completion_tokens=200)
    texts, reasons = stream_text(client.chat.completions.create(
        model=model, messages=messages, temperature=0, response_format=fmt, max_completion_tokens=200, stream=True))
    assert texts[0] == whole.choices[0].message.content and reasons[0] == whole.choices[0].finish_reason == "stop"
    Person.model_validate_json(texts[0])


# -- tool calling ------------------------------------------------------------------------------
WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city.",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone.",
                                           "parameters": {"type": "object", "properties": {
                                               "zone": {"enum": ["UTC", "CET", "EST"]}}, "required": ["zone"],
                                               "additionalProperties": False}}}]


def _streamed_calls(stream) -> tuple[dict[int, dict], str | None, str]:
    """The tool calls a stream's deltas add up to (by index), its finish_reason and content."""
    calls: dict[int, dict] = {}
    reason, content = None, ""
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                call["name"] += (d.function.name or "") if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
            reason = c.finish_reason or reason
    return calls, reason, content


def test_tool_round_trip_with_forced_required_and_auto_choices(client, model):
    """The model is made to call get_weather (a named tool_choice, enforced by a grammar); the
    call's arguments follow the function's parameters; streamed deltas reassemble to the same
    call; the tool's result goes back and the model answers in text."""
    messages = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice=named,
                                       temperature=0, max_completion_tokens=100)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)
    calls, reason, content = _streamed_calls(client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, tool_choice=named, temperature=0, max_completion_tokens=100,
        stream=True))
    assert reason == "tool_calls" and content == "" and list(calls) == [0]
    assert (calls[0]["name"], calls[0]["arguments"]) == (call.function.name, call.function.arguments)
    # The result goes back; with tool_choice "none" the model answers in text.
    history = messages + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "18 degrees celsius and sunny"}]
    answer = client.chat.completions.create(model=model, messages=history, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_completion_tokens=60)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    # required: one call or more, of either tool, each valid; sampled, several choices.
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What time is it in UTC?"}],
                                       tools=TOOLS, tool_choice="required", n=4, seed=3, temperature=1.0,
                                       max_completion_tokens=200)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls
        for tc in c.message.tool_calls:
            params = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == tc.function.name)
            jsonschema.validate(json.loads(tc.function.arguments), params)
    # auto (the server runs with --enable-auto-tool-choice): text or calls, whichever the model writes.
    r = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, temperature=0,
                                       max_completion_tokens=100)
    c = r.choices[0]
    assert (c.finish_reason == "tool_calls") == bool(c.message.tool_calls)
    assert c.message.tool_calls or c.message.content


# -- a second server: queue limit and graceful shutdown ----------------------------------------
def test_chat_template_flag_429_when_queue_full_then_graceful_shutdown(tmp_path, llm):
    template = ("{% if tools %}<tools>{{ tools | map(attribute='function.name') | join(',') }}</tools>\n{% endif %}"
                "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>")
    (tmp_path / "template.jinja").write_text(template)
    srv = Server("--max-num-seqs", "1", "--max-waiting-requests", "1", "--shutdown-timeout", "60",
                 "--chat-template", str(tmp_path / "template.jinja"))
    try:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        r = httpx.post(f"{srv.url}/tokenize", json={"messages": messages}).json()
        expected = "<system>Be brief.\n<user>Hi\n<assistant>"
        assert r["tokens"] == llm.get_tokenizer().encode(expected, add_special_tokens=False)
        # A template that renders tools gets them (and no system prompt of thrifty's).
        r = httpx.post(f"{srv.url}/tokenize", json={"messages": messages, "tools": TOOLS}).json()
        with_tools = "<tools>get_weather,get_time</tools>\n" + expected
        assert r["tokens"] == llm.get_tokenizer().encode(with_tools, add_special_tokens=False)
        # Without --enable-auto-tool-choice, tools with the default choice ("auto") are refused, as in vLLM.
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": messages, "tools": TOOLS})
        assert r.status_code == 400 and "--enable-auto-tool-choice" in r.json()["error"]["message"]

        body = {"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True, "temperature": 0}
        results: list[httpx.Response] = []

        def post():
            results.append(httpx.post(f"{srv.url}/v1/completions", json=body, timeout=120))

        threads = [threading.Thread(target=post) for _ in range(6)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
        limited = next(r for r in results if r.status_code == 429)
        assert limited.headers["Retry-After"] == "1"
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert all(r.json()["usage"]["completion_tokens"] == 24 for r in results if r.status_code == 200)

        # SIGTERM mid-stream: the running request still finishes, new connections are refused.
        got: list[str] = []
        with httpx.stream("POST", f"{srv.url}/v1/completions", json={**body, "max_tokens": 60, "stream": True},
                          timeout=120) as r:
            lines = r.iter_lines()
            got.append(next(lines))
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{srv.url}/health", timeout=2)
            got.extend(lines)
        data = [line for line in got if line.startswith("data: {")]
        assert "data: [DONE]" in got
        assert '"finish_reason": "length"' in data[-1]
        assert srv.proc.wait(60) == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
