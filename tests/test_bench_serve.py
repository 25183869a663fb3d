"""`thrifty bench serve` / `bench sweep`: against a real thrifty server (counts must equal its
/metrics), and against servers that fail or stall (failures counted, normal exit)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import Server

from thrifty.bench.serve import RequestResult, ServeConfig, parse_goodput, summarize

PRICE = 7.2  # USD per hour


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thrifty.entrypoints.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


# -- unit: definitions ---------------------------------------------------------------------------
def test_summary_follows_vllm_definitions():
    ok = RequestResult(ok=True, prompt_tokens=10, output_tokens=5, ttft=0.1, e2el=0.5, itl=[0.1] * 4)
    slow = RequestResult(ok=True, prompt_tokens=20, output_tokens=3, ttft=0.9, e2el=1.3, itl=[0.2, 0.2])
    failed = RequestResult(error="HTTP 500: boom")
    cfg = ServeConfig(goodput={"ttft": 500, "tpot": 150}, price_per_hour=PRICE)
    r = summarize(cfg, [ok, slow, failed], duration=2.0, model="m", dataset="random")
    assert (r["completed"], r["failed"], r["errors"]) == (2, 1, ["HTTP 500: boom"])
    assert (r["total_input_tokens"], r["total_output_tokens"]) == (30, 8)
    assert r["tpot_ms"]["mean"] == pytest.approx((100 + 200) / 2)  # (E2EL - TTFT) / (out - 1): 100 and 200 ms
    assert r["goodput"] == 0.5  # only `ok` meets both SLOs, over 2 s
    assert r["cost_per_million_output_tokens_usd"] == pytest.approx(PRICE * 2 / 3600 / 8 * 1e6, rel=1e-6)
    assert r["itl_ms"]["p50"] == pytest.approx(100)


def test_bad_load_options_name_the_field():
    with pytest.raises(ValueError, match="goodput"):
        parse_goodput(["ttft=5"])
    with pytest.raises(ValueError, match="goodput"):
        parse_goodput(["ttft:-1"])
    with pytest.raises(ValueError, match="request_rate"):
        ServeConfig(request_rate=0)
    with pytest.raises(ValueError, match="endpoint"):
        ServeConfig(endpoint="embeddings")
    r = _cli("bench", "sweep", "--base-url", "http://127.0.0.1:9")
    assert r.returncode == 2 and "request-rates" in r.stderr
    r = _cli("bench", "sweep", "--base-url", "http://127.0.0.1:9", "--max-concurrencies", "1,inf")
    assert r.returncode == 2 and "max_concurrencies" in r.stderr


# -- against thrifty -------------------------------------------------------------------------------
@pytest.mark.slow
def test_payload_carries_vllm_extra_fields_only_when_asked():
    from thrifty.bench.datasets import ServePrompt
    from thrifty.bench.serve import _payload

    prompt = ServePrompt("hi", 4)
    _, plain = _payload(ServeConfig(), None, prompt)
    assert "priority" not in plain and "ignore_eos" not in plain
    path, body = _payload(ServeConfig(priority=-1, ignore_eos=True), "m", prompt)
    assert path == "/v1/completions" and body["priority"] == -1 and body["ignore_eos"] is True


def test_bench_serve_and_sweep_against_thrifty(tmp_path):
    srv = Server("--price-per-hour", str(PRICE))
    try:
        out = tmp_path / "serve.json"
        r = _cli("bench", "serve", "--base-url", srv.url, "--dataset", "shared-prefix", "--num-prefixes", "2",
                 "--prefix-len", "48", "--input-len", "8", "--output-len", "6", "--num-prompts", "12",
                 "--request-rate", "20", "--num-warmups", "1", "--goodput", "ttft:60000", "--price-per-hour",
                 str(PRICE), "--no-progress", "--json", str(out), "--label", "thrifty")
        assert r.returncode == 0, r.stderr
        res = json.loads(out.read_text())
        assert (res["kind"], res["completed"], res["failed"], res["label"]) == ("bench_serve", 12, 0, "thrifty")
        # The same run, counted by the server: exactly equal.
        delta = res["server_counters_delta"]
        assert delta["prompt_tokens"] == res["total_input_tokens"]
        assert delta["generation_tokens"] == res["total_output_tokens"]
        assert delta["cost_usd"] == pytest.approx(res["server_reported_cost_usd"], abs=1e-8)
        assert res["goodput"] == pytest.approx(12 / res["duration_s"], rel=0.01)
        assert res["cost_per_million_output_tokens_usd"] == pytest.approx(
            PRICE * res["duration_s"] / 3600 / res["total_output_tokens"] * 1e6, rel=1e-3)
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            s = res[key]
            assert 0 < s["p50"] <= s["p90"] <= s["p99"]

        sweep = tmp_path / "sweep.json"
        r = _cli("bench", "sweep", "--base-url", srv.url, "--max-concurrencies", "1,4", "--num-prompts", "6",
                 "--input-len", "16", "--output-len", "4", "--ignore-eos", "--price-per-hour", str(PRICE),
                 "--no-progress", "--json", str(sweep), "--label", "continuous")
        assert r.returncode == 0, r.stderr
        sw = json.loads(sweep.read_text())
        assert sw["kind"] == "bench_sweep" and sw["sweep"] == "max_concurrency" and sw["values"] == [1, 4]
        assert [p["max_concurrency"] for p in sw["points"]] == [1, 4]
        assert all(p["completed"] == 6 and p["total_output_tokens"] == 24 for p in sw["points"])

        # The sweep feeds the planner and the report.
        r = _cli("cost", "plan", "--sweep", str(sweep), "--daily-requests", "10000", "--mean-input-tokens", "20",
                 "--mean-output-tokens", "4", "--peak-factor", "2", "--slo-ttft-ms", "60000", "--slo-tpot-ms",
                 "60000")
        assert r.returncode == 0, r.stderr
        assert "replicas" in r.stdout
        r = _cli("report", str(sweep), str(out), "--out", str(tmp_path / "report.html"))
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "report.html").stat().st_size > 10_000
    finally:
        assert srv.stop() == 0


# -- against servers that fail or stall ------------------------------------------------------------
class _Failing(BaseHTTPRequestHandler):
    def do_GET(self):
        self._fail()

    def do_POST(self):
        self._fail()

    def _fail(self):
        body = b'{"error": {"message": "overloaded", "type": "server_error", "param": null, "code": null}}'
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Odd(_Failing):
    """Answers 200 with streams no OpenAI server sends: a bare error string, null, a number."""

    bodies = [b'data: {"error": "overloaded"}\n\n', b"data: null\n\n", b"data: 5\n\n",
              b'data: {"choices": [{"text": 7}], "usage": {"completion_tokens": null}}\n\ndata: [DONE]\n\n']
    count = 0

    def _fail(self):
        body = self.bodies[_Odd.count % len(self.bodies)]
        _Odd.count += 1
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _stalling_listener() -> tuple[socket.socket, int]:
    """Accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s, s.getsockname()[1]


@pytest.mark.parametrize("kind", ["failing", "odd", "stalling"])
def test_bench_serve_counts_failures_and_exits_normally(tmp_path, kind):
    if kind in ("failing", "odd"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing if kind == "failing" else _Odd)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url, cleanup = f"http://127.0.0.1:{server.server_address[1]}", server.shutdown
    else:
        sock, port = _stalling_listener()
        url, cleanup = f"http://127.0.0.1:{port}", sock.close
    try:
        out = tmp_path / "r.json"
        r = _cli("bench", "serve", "--base-url", url, "--num-prompts", "8", "--input-len", "8", "--output-len", "4",
                 "--timeout", "1", "--no-progress", "--json", str(out), "--price-per-hour", "1", timeout=120)
        assert r.returncode == 0, r.stderr
        res = json.loads(out.read_text())
        assert (res["completed"], res["failed"]) == (0, 8)
        expected = {"failing": "HTTP 500", "odd": "overloaded", "stalling": "Timeout"}[kind]
        assert any(expected in e for e in res["errors"]), res["errors"]
        assert res["cost_per_million_output_tokens_usd"] is None  # nothing produced, nothing to divide by
    finally:
        cleanup()


def test_serve_datasets(tmp_path, llm):
    from thrifty.bench.datasets import make_serve_prompts

    tok = llm.get_tokenizer()
    random_ = make_serve_prompts("random", tok, 20, 40, 10, range_ratio=0.5, seed=1)
    assert len(random_) == 20 and all(5 <= p.output_len <= 15 for p in random_)
    assert len({p.output_len for p in random_}) > 1
    assert make_serve_prompts("random", tok, 20, 40, 10, range_ratio=0.5, seed=1) == random_  # seeded

    shared = make_serve_prompts("shared-prefix", tok, 6, 8, 4, num_prefixes=2, prefix_len=64, seed=0)
    firsts = {p.prompt[:40] for p in shared}
    assert len(firsts) == 2 and shared[0].prompt[:40] == shared[2].prompt[:40] != shared[1].prompt[:40]
    assert len(tok.encode(shared[0].prompt)) > 64

    mixed = make_serve_prompts("mixed", tok, 50, 64, 64, seed=0)
    outs = sorted(p.output_len for p in mixed)
    assert outs[0] >= 1 and outs[-1] <= 512 and outs[-1] > 2 * outs[len(outs) // 2]  # a long tail

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hello", "output_len": 3}\n\n{"prompt": "World"}\n')
    rows = make_serve_prompts(str(path), tok, 3, 1, 7)
    assert [(p.prompt, p.output_len) for p in rows] == [("Hello", 3), ("World", 7), ("Hello", 3)]
    path.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="prompts.jsonl:1"):
        make_serve_prompts(str(path), tok, 3, 1, 7)
    with pytest.raises(ValueError, match="dataset"):
        make_serve_prompts("sharegpt", tok, 3, 1, 7)
