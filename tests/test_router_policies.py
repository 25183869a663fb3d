"""The router's pure parts: policies, escalation, configuration, load accounting (no servers)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest

from thrifty.router.config import build_config, parse_tier, read_file
from thrifty.router.escalation import EscalationPolicy, GatheredChoice, add_stream_chunk, gather_response
from thrifty.router.policies import LeastLoaded, PrefixAware, RoundRobin, RouteKey, Session, prefix_hashes
from thrifty.router.pool import Backend


@dataclass
class Replica:
    url: str
    load: float = 0.0


def replicas(n: int) -> list[Replica]:
    return [Replica(f"http://10.0.0.{i}:8000") for i in range(n)]


def test_round_robin_cycles_in_url_order():
    rs = replicas(3)
    rr = RoundRobin()
    assert [rr.choose(rs[::-1], RouteKey()).url for _ in range(6)] == [r.url for r in rs] * 2


def test_least_loaded_picks_the_least_and_rotates_ties():
    rs = replicas(3)
    rs[0].load, rs[1].load, rs[2].load = 3, 1, 1
    ll = LeastLoaded()
    assert {ll.choose(rs, RouteKey()).url for _ in range(4)} == {rs[1].url, rs[2].url}
    rs[2].load = 5
    assert ll.choose(rs, RouteKey()).url == rs[1].url


def test_prefix_hashes_chain_so_equal_hashes_mean_equal_prefixes():
    a = prefix_hashes("x" * 10 + "y" * 10, 5)
    b = prefix_hashes("x" * 10 + "z" * 10, 5)
    assert len(a) == 4 and a[:2] == b[:2] and a[2] != b[2]
    assert prefix_hashes("abc", 5) == []  # no whole block


def test_prefix_aware_keeps_a_prefix_on_its_replica_while_loads_are_even():
    rs = replicas(3)
    pa = PrefixAware(block_chars=8)
    prompts = {p: p * 40 for p in "abcd"}
    first = {p: pa.choose(rs, RouteKey(text + " question 1")).url for p, text in prompts.items()}
    for i in range(5):
        for p, text in prompts.items():
            assert pa.choose(rs, RouteKey(text + f" question {i}")).url == first[p]
    assert len(set(first.values())) == 3  # new prefixes went to the least loaded (rotating) replicas


def test_prefix_aware_load_guard_spreads_a_hot_prefix_then_both_own_it():
    rs = replicas(2)
    pa = PrefixAware(block_chars=8, balance_abs=2, balance_rel=1.5)
    hot = "system prompt " * 20
    owner = pa.choose(rs, RouteKey(hot + "q0"))
    owner.load = 2  # within 2 of the idle replica: still eligible
    assert pa.choose(rs, RouteKey(hot + "q1")) is owner
    owner.load = 3  # beyond the guard: the other replica takes it...
    other = pa.choose(rs, RouteKey(hot + "q2"))
    assert other is not owner
    owner.load = other.load = 0  # ...and from then on both hold the prefix
    assert pa.matched_blocks(owner.url, prefix_hashes(hot, 8)) == pa.matched_blocks(other.url, prefix_hashes(hot, 8))
    pa.forget(other.url)
    assert pa.matched_blocks(other.url, prefix_hashes(hot, 8)) == 0


def test_prefix_aware_lru_bound():
    pa = PrefixAware(block_chars=4, max_blocks=10)
    rs = replicas(1)
    for i in range(20):
        pa.choose(rs, RouteKey(f"{i:04d}" * 3))
    assert len(pa._owners) == 10


def test_session_is_sticky_and_moves_only_the_lost_replicas_sessions():
    rs = replicas(4)
    s = Session()
    where = {u: s.choose(rs, RouteKey(session=f"user-{u}")).url for u in range(200)}
    assert all(s.choose(rs, RouteKey(session=f"user-{u}")).url == url for u, url in where.items())
    assert len(set(where.values())) == 4
    gone = rs[1].url
    after = {u: s.choose([r for r in rs if r.url != gone], RouteKey(session=f"user-{u}")).url for u in where}
    assert all(after[u] == where[u] for u in where if where[u] != gone)


def test_backend_load_counts_requests_sent_since_the_last_scrape():
    b = Backend("http://x:1")
    t1 = b.dispatched()
    assert b.load == 1  # no scrape yet: the router's own count
    b.running, b.waiting = 1.0, 0.0
    b.scrape_epoch += 1
    b.sent_since_scrape = 0  # what a scrape does: it has seen t1
    t2 = b.dispatched()
    assert b.load == 2
    b.finished(t1)  # counted by the scrape, not by sent_since_scrape
    assert (b.in_flight, b.sent_since_scrape) == (1, 1)
    b.finished(t2)
    assert (b.in_flight, b.sent_since_scrape) == (0, 0)


def _choice(text="", finish="stop", lps=()):
    return GatheredChoice(text, finish, list(lps))


def test_escalation_reasons():
    policy = EscalationPolicy(min_mean_logprob=-1.0)
    plain, wants_json = {}, {"response_format": {"type": "json_object"}}
    assert policy.judge(plain, [_choice("hi", lps=[-0.5, -1.4])]) is None  # mean -0.95
    assert policy.judge(plain, [_choice("hi", lps=[-0.5, -1.6])]) == "low_logprob"  # mean -1.05
    assert policy.judge(plain, [_choice("hi", "length", [-0.1])]) == "length"
    assert policy.judge(plain, [_choice("{oops")]) is None
    assert policy.judge(wants_json, [_choice("{oops")]) == "invalid_json"
    assert policy.judge(wants_json, [_choice('{"a": 1}')]) is None
    assert policy.judge(plain, [_choice("a"), _choice("b", "length")]) == "length"  # any choice
    only_length = EscalationPolicy(frozenset({"length"}))
    assert not only_length.needs_logprobs
    assert only_length.judge(wants_json, [_choice("{oops", lps=[-9.0])]) is None
    with pytest.raises(ValueError, match="unknown reason"):
        EscalationPolicy(frozenset({"vibes"}))


def test_gather_whole_and_streamed_answers_alike():
    chat = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop",
                         "logprobs": {"content": [{"token": "Paris", "logprob": -0.25, "top_logprobs": []}]}}]}
    comp = {"choices": [{"index": 0, "text": " Paris", "finish_reason": "length",
                         "logprobs": {"tokens": [" Paris"], "token_logprobs": [-0.5], "top_logprobs": [None]}}]}
    assert gather_response(chat) == [GatheredChoice("Paris", "stop", [-0.25])]
    assert gather_response(comp) == [GatheredChoice(" Paris", "length", [-0.5])]
    by_index: dict = {}
    for chunk in ({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}]},
                  {"choices": [{"index": 0, "delta": {"content": "Par"}, "finish_reason": None,
                                "logprobs": {"content": [{"token": "Par", "logprob": -0.5}]}}]},
                  {"choices": [{"index": 0, "delta": {"content": "is"}, "finish_reason": "stop",
                                "logprobs": {"content": [{"token": "is", "logprob": -1.5}]}}]},
                  {"choices": [], "usage": {"cost_usd": 1.0}}):
        add_stream_chunk(by_index, chunk)
    assert by_index == {0: GatheredChoice("Paris", "stop", [-0.5, -1.5])}


def test_config_from_flags_and_file(tmp_path):
    assert parse_tier("small=http://a:1/v1/, http://b:2").urls == ("http://a:1", "http://b:2")
    for bad in ("small", "=http://a:1", "small=", "small=ftp://a"):
        with pytest.raises(ValueError, match="tier|backend"):
            parse_tier(bad)
    f = tmp_path / "router.yaml"
    f.write_text("policy: session\nbackends: [http://a:1]\ntiers:\n  - {name: s, urls: [http://b:2]}\n"
                 "escalation: {reasons: [length], min_mean_logprob: -2}\n")
    cfg = build_config(read_file(f), backends=["http://c:3"], tiers=["l=http://d:4"])
    assert cfg.policy == "session" and cfg.backends == ("http://a:1", "http://c:3")
    assert [t.name for t in cfg.tiers] == ["s", "l"] and cfg.static_urls[-1] == "http://d:4"
    assert cfg.escalation.reasons == {"length"} and cfg.escalation.min_mean_logprob == -2
    assert build_config(read_file(f), policy="round_robin").policy == "round_robin"  # flags win
    j = tmp_path / "router.json"
    j.write_text(json.dumps({"backends": ["http://a:1"], "colour": "blue"}))
    with pytest.raises(ValueError, match="unknown key.*colour"):
        read_file(j)
    j.write_text("{not json")
    with pytest.raises(ValueError, match="router.json"):
        read_file(j)
    with pytest.raises(ValueError, match="no backends"):
        build_config({})
    with pytest.raises(ValueError, match="root URL"):
        build_config(backends=["http://a:1/v1/completions"])
    with pytest.raises(ValueError, match="unique"):
        build_config(tiers=["s=http://a:1", "s=http://b:2"])


def test_router_does_not_import_torch():
    code = ("import sys; import thrifty.entrypoints.cli, thrifty.router.app, thrifty.router.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backend_dns_expands_a_name_into_one_backend_per_address():
    import asyncio

    from thrifty.router.pool import BackendPool

    async def resolve():
        pool = BackendPool([], ["http://localhost:8123"])
        try:
            pool._keep(await pool._resolve())
            return set(pool.backends)
        finally:
            await pool.aclose()

    urls = asyncio.run(resolve())
    assert "http://127.0.0.1:8123" in urls and all(u.endswith(":8123") for u in urls)
