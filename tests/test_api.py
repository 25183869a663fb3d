"""The offline API and CLI: validation before any work, stop strings, detokenizing, bench JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import PROMPTS

from thrifty import LLM, SamplingParams
from thrifty.engine.detokenizer import IncrementalDetokenizer


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.1), "temperature"),
    (dict(n=0), "n"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(seed=1 << 70), "seed"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_rejected_before_any_work(llm):
    engine = llm.llm_engine
    steps = engine.stats.num_steps
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["fine prompt", ""], use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(["fine prompt", {"prompt_token_ids": [5] * engine.max_model_len}], use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate({"prompt_token_ids": [10**9]}, use_tqdm=False)
    assert engine.stats.num_steps == steps and not engine.has_unfinished_requests()


def test_bad_engine_config_is_a_clear_error():
    with pytest.raises(ValueError, match="model"):
        LLM("/no/such/model")
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLM(kv_cache_memory=0.001)  # far less than one 8192-token request
    with pytest.raises(ValueError, match="available"):
        LLM(kv_cache_memory=float(1 << 30))  # a byte count passed where GiB are meant
    with pytest.raises(ValueError, match="dtype"):
        LLM(dtype="float8")


def test_stop_strings_cut_cleanly(llm):
    greedy = SamplingParams(temperature=0, max_tokens=40)
    full = llm.generate(PROMPTS[3], greedy, use_tqdm=False)[0].outputs[0].text  # " 5, 6, 7, ..."
    assert "7," in full
    cut = llm.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=40, stop=["7,"]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.text == full[: full.index("7,")] and cut.finish_reason == "stop" and cut.stop_reason == "7,"
    kept = llm.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=40, stop=["7,"],
                                                   include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == full[: full.index("7,") + 2]
    either = llm.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=40, stop=["9,", "7,"]),
                          use_tqdm=False)[0].outputs[0]
    assert either.text == cut.text and either.stop_reason == "7,"  # the earliest match, not the first listed


def test_stop_token_ids_min_tokens_and_length(llm):
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ids = llm.generate(PROMPTS[0], greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert len(ids) == 20
    stopped = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                      stop_token_ids=[ids[3]]), use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == ids[: ids.index(ids[3]) + 1] and stopped.finish_reason == "stop"
    eos = sorted(llm.llm_engine.eos_token_ids)[0]
    held = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, min_tokens=12,
                                                   stop_token_ids=[eos]), use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) == 12 and held.finish_reason == "length"


def test_request_output_fields(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, logprobs=2), use_tqdm=False)[0]
    c = out.outputs[0]
    assert out.prompt == PROMPTS[0] and out.prompt_token_ids == llm.get_tokenizer().encode(PROMPTS[0])
    assert out.finished and len(c.logprobs) == len(c.token_ids)
    assert c.cumulative_logprob == pytest.approx(sum(lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)))
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time


def test_chat_uses_the_template(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert llm.get_tokenizer().decode(out.prompt_token_ids).count("<|im_start|>") >= 2


def test_detokenizer_never_splits_multibyte_characters(llm):
    tok = llm.get_tokenizer()
    text = "naïve café — 東京 🙂 done"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [], True, [], False)
    for t in ids:
        detok.add_token(t)
        assert "\ufffd" not in detok.output_text
    assert detok.output_text == text


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thrifty.entrypoints.cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_generate_and_bench_throughput(tmp_path):
    gen = _cli("generate", "--prompt", "The capital of France is", "--max-tokens", "8")
    assert gen.returncode == 0, gen.stderr
    assert "Paris" in gen.stdout
    path = tmp_path / "bench.json"
    bench = _cli("bench", "throughput", "--num-prompts", "4", "--input-len", "16", "--output-len", "8",
                 "--dataset", "mixed", "--no-progress", "--json", str(path))
    assert bench.returncode == 0, bench.stderr
    result = json.loads(path.read_text())
    for key in ("model", "scheduler", "num_prompts", "input_len", "output_len", "elapsed_s", "requests_per_s",
                "output_tokens_per_s", "total_tokens_per_s", "kv_blocks_total", "kv_blocks_peak", "kv_waste_frac"):
        assert key in result
    assert result["num_prompts"] == 4 and 0 <= result["kv_waste_frac"] < 1 and result["kv_blocks_peak"] > 0
    bad = _cli("generate", "--model", "/no/such/model")
    assert bad.returncode == 2 and "model" in bad.stderr


@pytest.mark.parametrize("args", [["--help"], ["bench", "serve", "--help"], ["cost", "prices"], ["serve", "--help"]])
def test_cli_help_and_cost_tools_do_not_import_torch(args):
    code = ("import sys; from thrifty.entrypoints.cli import main\n"
            f"sys.argv = ['thrifty'] + {args!r}\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
