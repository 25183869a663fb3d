"""Per-key limits (thrifty/entrypoints/openai/limits.py): key syntax and key files, the limiter on
a fake clock (sliding window, Retry-After, the UTC day), the SQLite store across two instances;
then a real server: a USD budget that refuses the next request, survives a restart and shows in
/metrics, and an rpm limit."""

from __future__ import annotations

import calendar
import json

import httpx2 as httpx
import openai
import pytest
from conftest import Server
from prometheus_client.parser import text_string_to_metric_families

from thrifty.entrypoints.openai.errors import APIError
from thrifty.entrypoints.openai.limits import (
    KeyLimitsCollector,
    KeyPolicy,
    Limiter,
    UsageStore,
    check_priced,
    parse_api_key,
    parse_api_keys,
    utc_day,
)

NOON = calendar.timegm((2026, 12, 4, 12, 0, 0))  # a UTC noon, in wall-clock seconds


# -- key syntax ---------------------------------------------------------------------------------
def test_plain_and_named_keys_keep_working():
    assert parse_api_key("sk-1") == KeyPolicy(None, "sk-1")
    assert parse_api_key("team=sk-1") == KeyPolicy("team", "sk-1")
    # A ':' whose suffix is not all known options stays part of the key.
    assert parse_api_key("team=sk:abc") == KeyPolicy("team", "sk:abc")
    assert parse_api_key("a:b:c") == KeyPolicy(None, "a:b:c")
    assert parse_api_key("team=sk:rpm=5,colour=red").key == "sk:rpm=5,colour=red"
    assert parse_api_key("team=sk:x=1").key == "sk:x=1"


def test_key_options():
    p = parse_api_key("vip=sk:v:priority=-1,rpm=60,tpm=100000,usd_per_day=5,admin=true")
    assert p == KeyPolicy("vip", "sk:v", priority=-1, rpm=60, tpm=100000, usd_per_day=5.0, admin=True)
    assert p.limits == {"rpm": 60, "tpm": 100000, "usd_per_day": 5.0}
    assert parse_api_key("b=sk:usd_per_day=0.25").limits == {"usd_per_day": 0.25}
    assert "sk:v" not in repr(p)  # the secret stays out of logs


@pytest.mark.parametrize("value, match", [
    ("", "key is empty"), ("team=", "key is empty"), ("=sk", "name is empty"),
    ("sk:rpm=5", "need a key name"),  # usage is stored by name
    ("a=sk:rpm=0", "rpm must be a positive integer"), ("a=sk:rpm=1.5", "rpm must be an integer"),
    ("a=sk:tpm=-3", "tpm must be a positive"), ("a=sk:usd_per_day=0", "usd_per_day must be a positive"),
    ("a=sk:usd_per_day=nan", "usd_per_day"), ("a=sk:priority=high", "priority must be an integer"),
    ("a=sk:admin=maybe", "admin must be true or false"), ("a=sk:rpm=1,rpm=2", "'rpm' is given twice"),
])
def test_bad_keys_are_errors_naming_the_field(value, match):
    with pytest.raises(ValueError, match=match):
        parse_api_key(value)


def test_key_file_yaml_and_json(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCH_KEY", "sk-batch")
    f = tmp_path / "keys.yaml"
    f.write_text("keys:\n  - {name: vip, key: sk-vip, priority: -1, admin: true}\n"
                 "  - {name: batch, key_env: BATCH_KEY, priority: 5, rpm: 120, tpm: 200000, usd_per_day: 2.0}\n"
                 "  - {key: sk-anon}\n")
    keys = parse_api_keys(["cli=sk-cli:rpm=3"], str(f))
    assert keys == {"sk-cli": KeyPolicy("cli", "sk-cli", rpm=3),
                    "sk-vip": KeyPolicy("vip", "sk-vip", priority=-1, admin=True),
                    "sk-batch": KeyPolicy("batch", "sk-batch", priority=5, rpm=120, tpm=200000, usd_per_day=2.0),
                    "sk-anon": KeyPolicy(None, "sk-anon")}
    j = tmp_path / "keys.json"
    j.write_text(json.dumps({"keys": [{"name": "a", "key": "k1", "usd_per_day": 1}]}))
    assert parse_api_keys(None, str(j))["k1"].usd_per_day == 1.0


@pytest.mark.parametrize("content, match", [
    ({"keys": [{"name": "a", "key": "k", "colour": "red"}]}, r"keys\[0\].*unknown field.*colour"),
    ({"keys": [{"name": "a", "key": "k"}], "extra": 1}, "unknown field.*extra"),
    ({"keys": []}, "non-empty list"),
    ({"keys": ["k"]}, r"keys\[0\]: expected a mapping"),
    ({"keys": [{"name": "a"}]}, "exactly one of 'key' or 'key_env'"),
    ({"keys": [{"name": "a", "key": "k", "key_env": "E"}]}, "exactly one"),
    ({"keys": [{"name": "a", "key_env": "THRIFTY_NO_SUCH_VARIABLE"}]}, "THRIFTY_NO_SUCH_VARIABLE.*not set"),
    ({"keys": [{"name": "a", "key": "k", "rpm": True}]}, r"keys\[0\] \(a\): rpm must be an integer"),
    ({"keys": [{"name": "a", "key": "k", "rpm": 2.5}]}, "rpm must be an integer"),
    ({"keys": [{"name": "a", "key": "k", "usd_per_day": "lots"}]}, "usd_per_day must be a positive"),
    ({"keys": [{"name": "a", "key": "k", "admin": "yes please"}]}, "admin must be true or false"),
    ({"keys": [{"key": "k", "tpm": 5}]}, "need a key name"),
    ({"keys": [{"name": "", "key": "k"}]}, "name must be a non-empty string"),
])
def test_bad_key_files_are_start_up_errors(tmp_path, content, match):
    f = tmp_path / "keys.json"
    f.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match):
        parse_api_keys(None, str(f))


def test_bad_key_file_syntax_and_path(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text("keys: [unclosed\n")
    with pytest.raises(ValueError, match="api_key_file"):
        parse_api_keys(None, str(f))
    with pytest.raises(ValueError, match="cannot read"):
        parse_api_keys(None, str(tmp_path / "missing.yaml"))


def test_keys_sharing_a_name_share_limits():
    keys = parse_api_keys(["team=old:rpm=5", "team=new:rpm=5"])  # a key rotated: one budget
    assert {p.name for p in keys.values()} == {"team"}
    with pytest.raises(ValueError, match="keys named 'team' set different limits"):
        parse_api_keys(["team=old:rpm=5", "team=new:rpm=6"])
    with pytest.raises(ValueError, match="given twice"):
        parse_api_keys(["a=k", "b=k"])
    assert parse_api_keys(["a=k", "a=k"]) == {"k": KeyPolicy("a", "k")}


def test_a_usd_budget_needs_a_price():
    budgeted = [KeyPolicy("a", "k", usd_per_day=1.0)]
    with pytest.raises(ValueError, match="usd_per_day.*'a'.*price"):
        check_priced(budgeted, 0.0)
    check_priced(budgeted, 0.5)
    check_priced([KeyPolicy("a", "k", rpm=3)], 0.0)


# -- the limiter on a fake clock ----------------------------------------------------------------
class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def limiter(policies: list[KeyPolicy], path: str = ":memory:", t: float = NOON) -> tuple[Limiter, Clock]:
    clock = Clock(t)
    return Limiter(policies, UsageStore(path, clock.t), clock), clock


def refusal_of(lim: Limiter, policy: KeyPolicy) -> APIError:
    with pytest.raises(APIError) as e:
        lim.enforce(policy)
    return e.value


def test_rpm_sliding_window_and_retry_after():
    p = KeyPolicy("a", "k", rpm=3)
    lim, clock = limiter([p])
    for dt in (0.2, 10.5, 30.9):  # three requests at seconds 0, 10, 30
        clock.t = NOON + dt
        lim.enforce(p)
        lim.record_start("a", 5)
    clock.t = NOON + 40
    err = refusal_of(lim, p)
    assert err.status == 429 and err.code == "rate_limit_exceeded" and err.type == "rate_limit_error"
    assert "rpm" in err.message and "3 requests of 3" in err.message
    # The oldest request (second 0) leaves the window at second 60: 20 s from now.
    assert err.headers["Retry-After"] == "20" and err.headers["x-ratelimit-limit-requests"] == "3"
    clock.t = NOON + 59.99
    assert lim.check(p).retry_after == 1
    clock.t = NOON + 60
    assert lim.check(p) is None
    assert lim.refused == {("a", "rpm"): 1}  # check() alone counts nothing


def test_tpm_counts_prompt_at_start_and_output_at_end():
    p = KeyPolicy("a", "k", tpm=100)
    lim, clock = limiter([p])
    lim.record_start("a", 40)
    clock.t += 5
    lim.record_end("a", 50, 0.0)
    assert lim.check(p) is None  # 90 < 100
    clock.t += 5
    lim.record_start("a", 20)
    r = lim.check(p)
    assert (r.limit, r.used, r.allowed) == ("tpm", 110, 100)
    assert r.retry_after == 50  # at second 60 the first 40 leave: 70 < 100
    lim.record_end("a", 100, 0.0)  # in flight when the limit was reached: overshoot is allowed
    assert lim.check(p).retry_after == 60  # only the newest bucket's drop brings it under
    assert "tpm" in r.error().message and r.error().headers["x-ratelimit-limit-tokens"] == "100"


def test_usd_per_day_resets_at_utc_midnight():
    p = KeyPolicy("a", "k", usd_per_day=0.5)
    other = KeyPolicy("b", "k2", usd_per_day=0.5)
    lim, clock = limiter([p, other])
    clock.t = NOON + 11 * 3600 + 1800  # 23:30 UTC
    lim.record_start("a", 3)
    lim.record_end("a", 7, 0.6)
    err = refusal_of(lim, p)
    assert err.code == "budget_exceeded" and err.headers["Retry-After"] == "1800"
    assert "usd_per_day" in err.message and "$0.6000 of $0.50" in err.message and "0h 30m" in err.message
    assert lim.check(other) is None  # another name is unaffected
    clock.t = NOON + 12 * 3600  # 00:00 UTC the next day
    assert lim.check(p) is None and lim.usage("a", "usd_per_day") == 0.0


def test_the_longest_wait_is_reported():
    p = KeyPolicy("a", "k", rpm=1, usd_per_day=0.1)
    lim, clock = limiter([p])
    lim.record_start("a", 1)
    lim.record_end("a", 1, 0.2)
    assert lim.check(p).limit == "usd_per_day"


def test_store_persists_across_instances(tmp_path):
    db = str(tmp_path / "sub" / "usage.db")
    p = KeyPolicy("a", "k", rpm=2, tpm=1000, usd_per_day=1.0)
    lim, clock = limiter([p], db)
    lim.record_start("a", 10)
    lim.record_end("a", 20, 0.75)
    clock.t += 30
    lim.record_start("a", 1)
    lim.close()
    again, clock2 = limiter([p], db, NOON + 45)
    assert again.usage("a", "rpm") == 2 and again.usage("a", "tpm") == 31
    assert again.usage("a", "usd_per_day") == pytest.approx(0.75)
    assert again.check(p).limit == "rpm"
    clock2.t = NOON + 60  # the first request left the window; the day's cost stays
    assert again.check(p) is None and again.usage("a", "tpm") == 1
    again.record_end("a", 0, 0.5)
    again.store.flush()
    third, _ = limiter([p], db, NOON + 61)
    assert third.check(p).limit == "usd_per_day"
    assert third.store._db.execute("SELECT day, requests, tokens FROM usage_day WHERE key_name = 'a'").fetchall() \
        == [(utc_day(NOON), 2, 31)]
    again.close()
    third.close()


def test_unusable_usage_db_is_a_clean_error(tmp_path):
    with pytest.raises(ValueError, match="usage_db"):
        UsageStore(str(tmp_path), NOON)  # a directory


def test_no_limits_no_store(tmp_path):
    assert Limiter.open([KeyPolicy("a", "k"), KeyPolicy(None, "k2")], str(tmp_path / "u.db")) is None
    assert not (tmp_path / "u.db").exists()


def test_collector_reads_limits_usage_and_refusals():
    p = KeyPolicy("a", "k", rpm=1, usd_per_day=2.0)
    lim, _ = limiter([p, KeyPolicy("free", "k2")])
    lim.record_start("a", 4)
    lim.record_end("a", 0, 0.25)
    with pytest.raises(APIError):
        lim.enforce(p)
    samples = {(s.name, s.labels["key_name"], s.labels["limit"]): s.value
               for family in KeyLimitsCollector(lim, "m").collect() for s in family.samples}
    assert samples == {
        ("thrifty:key_limit", "a", "rpm"): 1, ("thrifty:key_limit", "a", "usd_per_day"): 2.0,
        ("thrifty:key_usage", "a", "rpm"): 1, ("thrifty:key_usage", "a", "usd_per_day"): 0.25,
        ("thrifty:key_limited_requests_total", "a", "rpm"): 1,
        ("thrifty:key_limited_requests_total", "a", "usd_per_day"): 0}


# -- a real server --------------------------------------------------------------------------------
def test_bad_key_options_fail_before_the_model_loads(tmp_path):
    import subprocess
    import sys

    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "thrifty.entrypoints.cli", "serve", *args],
                              capture_output=True, text=True, timeout=120)

    unpriced = serve("--api-key", "a=sk:usd_per_day=1", "--price-per-hour", "0")
    assert unpriced.returncode == 2 and "usd_per_day" in unpriced.stderr and "price" in unpriced.stderr
    f = tmp_path / "keys.yaml"
    f.write_text("keys:\n  - {name: a, key: sk, rpm: 10, colour: red}\n")
    bad_file = serve("--api-key-file", str(f))
    assert bad_file.returncode == 2 and "colour" in bad_file.stderr


PRICE = "3600"  # USD per hour: a dollar a second, so any request costs cents at least
KEYS = {"keys": [{"name": "a", "key": "sk-a", "usd_per_day": 0.5}, {"name": "b", "key": "sk-b", "usd_per_day": 1000},
                 {"name": "c", "key": "sk-c", "rpm": 2}]}


def post(srv: Server, key: str, **body) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                      json={"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0, **body})


def key_metrics(srv: Server) -> dict[tuple[str, str, str], float]:
    text = httpx.get(f"{srv.url}/metrics", timeout=30).text
    return {(s.name, s.labels["key_name"], s.labels["limit"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith(("thrifty:key_limit", "thrifty:key_usage"))}


@pytest.mark.slow
def test_budgets_and_rate_limits_on_a_real_server_and_across_a_restart(tmp_path):
    import time

    key_file, db = tmp_path / "keys.json", str(tmp_path / "usage.db")
    key_file.write_text(json.dumps(KEYS))
    args = ("--api-key-file", str(key_file), "--usage-db", db, "--price-per-hour", PRICE,
            "--kv-cache-memory", "0.1", "--max-model-len", "1024")
    srv = Server(*args)
    try:
        # Key a: 200s until what it spent reaches $0.50, then the next request is a 429.
        spent = 0.0
        for _ in range(50):
            r = post(srv, "sk-a", max_tokens=32, ignore_eos=True)
            if spent >= 0.5:
                break
            assert r.status_code == 200, r.text
            spent += r.json()["usage"]["cost_usd"]
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["code"] == "budget_exceeded" and err["type"] == "rate_limit_error"
        assert "usd_per_day" in err["message"] and f"${spent:.4f} of $0.50" in err["message"]
        assert 1 <= int(r.headers["Retry-After"]) <= 86400
        # Key b is unaffected; the official client sees a RateLimitError for a.
        assert post(srv, "sk-b").status_code == 200
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sk-a", max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=client.models.list().data[0].id,
                                           messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert "usd_per_day" in str(e.value) and e.value.response.headers["retry-after"]
        # Key c: rpm=2; the third request in the minute is a 429, before any other check
        # (logit_bias alone would be a 400).
        c_start = time.monotonic()
        assert [post(srv, "sk-c", max_tokens=1).status_code for _ in range(2)] == [200, 200]
        r = post(srv, "sk-c", max_tokens=1, logit_bias={"1": 1})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert "rpm" in r.json()["error"]["message"] and 1 <= int(r.headers["Retry-After"]) <= 60
        m = key_metrics(srv)
        assert m[("thrifty:key_limit", "a", "usd_per_day")] == 0.5 and m[("thrifty:key_limit", "c", "rpm")] == 2
        assert m[("thrifty:key_usage", "a", "usd_per_day")] == pytest.approx(spent)
        assert m[("thrifty:key_usage", "c", "rpm")] == 2
        assert m[("thrifty:key_limited_requests_total", "a", "usd_per_day")] == 2
        assert m[("thrifty:key_limited_requests_total", "c", "rpm")] == 1
    finally:
        assert srv.stop() == 0
    # The same database after a restart: a is still over its budget, and /metrics says by how much.
    srv = Server(*args)
    try:
        r = post(srv, "sk-a")
        assert r.status_code == 429 and "usd_per_day" in r.json()["error"]["message"] and r.headers["Retry-After"]
        m = key_metrics(srv)
        assert m[("thrifty:key_usage", "a", "usd_per_day")] == pytest.approx(spent)
        if time.monotonic() - c_start < 50:  # (c's two requests are still within their minute)
            assert m[("thrifty:key_usage", "c", "rpm")] == 2 and post(srv, "sk-c").status_code == 429
        assert post(srv, "sk-b").status_code == 200
    finally:
        assert srv.stop() == 0


def test_a_key_priority_needs_the_priority_scheduler():
    from thrifty.entrypoints.openai.limits import check_priorities

    keys = parse_api_keys(["vip=sk-1:priority=-1", "plain=sk-2", "zero=sk-3:priority=0"])
    check_priorities(keys.values(), "priority")
    with pytest.raises(ValueError, match=r"\(key 'vip'\) but the scheduling policy is fcfs; give --scheduling-policy"):
        check_priorities(keys.values(), "fcfs")
    check_priorities([keys["sk-2"], keys["sk-3"]], "fcfs")
