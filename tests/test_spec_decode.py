"""Speculative decoding: the configuration, the n-gram proposer, the cost-aware switch, the
rejection sampler's distribution, and the real default model giving the same greedy tokens with
and without speculation (LLM.generate and a real server). The scheduler's side (rollback, no
leaked blocks, budgets) is in test_core.py's simulations."""

from __future__ import annotations

import math

import openai
import pytest
import torch
from conftest import MAX_NEW, PROMPTS, Server

from thrifty import SamplingParams
from thrifty.config import EngineConfig, SpeculativeConfig
from thrifty.core.ngram_proposer import NgramProposer
from thrifty.core.request import Request
from thrifty.core.spec_controller import SpecController
from thrifty.layers.rejection_sampler import verify
from thrifty.layers.sampler import SamplingInput

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5,
         "switch": "always"}


# -- configuration -----------------------------------------------------------------------------
def test_config_follows_vllm_and_rejects_bad_input():
    c = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3}')
    assert (c.prompt_lookup_min, c.prompt_lookup_max, c.switch) == (5, 5, "cost")  # vLLM's defaults
    c = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (4, 4)
    for bad, words in (
        ({"method": "eagle", "num_speculative_tokens": 3}, "unknown method 'eagle'"),
        ({"method": "draft_model", "num_speculative_tokens": 3, "model": "x"}, "unknown key"),
        ({"method": "draft_model", "num_speculative_tokens": 3}, "not available in thrifty yet"),
        ({"method": "ngram", "num_speculative_tokens": 0}, r"\[1, 32\]"),
        ({"method": "ngram", "num_speculative_tokens": 33}, r"\[1, 32\]"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
         "prompt_lookup_min <= prompt_lookup_max"),
        ({"method": "ngram", "num_speculative_tokens": 2, "switch": "sometimes"}, "switch"),
        ("{not json", "not JSON"),
    ):
        with pytest.raises(ValueError, match=words):
            SpeculativeConfig.parse(bad)
    with pytest.raises(ValueError, match="continuous scheduler"):
        EngineConfig(speculative_config=NGRAM, scheduler_policy="static")


# -- the proposer --------------------------------------------------------------------------------
def _request(tokens: list[int], num_prompt: int) -> Request:
    r = Request("r", tokens[:num_prompt], SamplingParams())
    r.output_token_ids = tokens[num_prompt:]
    return r


def test_ngram_proposes_what_followed_the_longest_latest_match():
    p = NgramProposer(2, 3)
    #        0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [1, 2, 3, 4, 9, 2, 3, 5, 7, 7, 2, 3]
    # suffix [7, 2, 3] never occurred; [2, 3] did, latest at 5-6, followed by 5, 7, 7, 2
    assert p.propose(_request(tokens, 6), 4) == [5, 7, 7, 2]
    r = _request(tokens + [4], 6)  # suffix [3, 4]: at 2-3, followed by 9, 2, 3
    assert p.propose(r, 2) == [9, 2]
    r.output_token_ids.append(8)  # [4, 8] never occurred, nor did [3, 4, 8]
    assert p.propose(r, 4) == []
    p.forget("r")  # as the engine does when a request ends
    assert p.propose(_request([5, 6, 5, 6], 4), 8) == [5, 6]  # no further than the context
    assert NgramProposer(2, 2).propose(_request([1, 2, 1], 3), 0) == []


# -- the cost-aware switch -----------------------------------------------------------------------
@pytest.mark.parametrize("spec_cheaper", [True, False])
def test_switch_uses_the_measured_cheaper_mode_and_keeps_measuring_the_other(spec_cheaper):
    c = SpecController()
    on_cost, off_cost = (0.5, 1.0) if spec_cheaper else (1.5, 1.0)  # seconds per token
    choices = []
    for _ in range(400):
        on = c.decide(1)
        choices.append(on)
        c.observe(1, on, (on_cost if on else off_cost) * 3, 3)
    late = choices[50:]
    share_on = sum(late) / len(late)
    assert share_on == pytest.approx(1 - 1 / 16, abs=0.01) if spec_cheaper else share_on == pytest.approx(1 / 16,
                                                                                                           abs=0.01)
    assert (c.saved_seconds > 0) == spec_cheaper
    # Batch sizes are measured apart: at 32 the other mode may win.
    assert c.bucket(1) != c.bucket(32) and c.decide(32) in (True, False)
    assert SpecController(always=True).decide(64)


# -- the rejection sampler ------------------------------------------------------------------------
def _chi2(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs) if p > 0)


def test_rejection_sampling_keeps_the_target_distribution():
    """Whatever is proposed, each emitted token is distributed as the target says: the first as
    p_0, the second (given the first was the proposal) as p_1."""
    torch.manual_seed(0)
    vocab = 6
    logits = torch.randn(3, vocab) * 1.5
    params = SamplingParams(temperature=1.0, seed=None)
    p = logits.softmax(-1)
    drafts = [int(p[0].argsort()[-2]), int(p[1].argmin())]  # the second likeliest, then the least likely
    first, second = [0] * vocab, [0] * vocab
    trials = 6000
    gen = torch.Generator().manual_seed(1)
    for _ in range(trials):
        inputs = [SamplingInput(params, [0], [], None) for _ in range(3)]
        out = verify(logits, inputs, [drafts], gen)[0]
        first[out.token_ids[0]] += 1
        if out.token_ids[0] == drafts[0] and len(out.token_ids) > 1:
            second[out.token_ids[1]] += 1
    # chi-square with 5 degrees of freedom: P(> 25.7) = 1e-4
    assert _chi2(first, p[0].tolist()) < 25.7, (first, p[0])
    assert sum(second) > 300 and _chi2(second, p[1].tolist()) < 25.7, (second, p[1])


def test_greedy_verification_and_seeded_reproducibility():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    greedy = [SamplingInput(SamplingParams(temperature=0), [0], [], None) for _ in range(3)]
    gen = torch.Generator().manual_seed(0)
    assert verify(logits, greedy, [[1, 0]], gen)[0].token_ids == [1, 0, 2]  # both right, then the bonus
    assert verify(logits, greedy, [[1, 2]], gen)[0].token_ids == [1, 0]  # the second is wrong
    assert verify(logits, greedy, [[2, 0]], gen)[0].token_ids == [1]

    def seeded() -> list[int]:
        g = torch.Generator().manual_seed(7)
        inputs = [SamplingInput(SamplingParams(temperature=1.0, seed=7), [0], [], g) for _ in range(3)]
        return verify(logits, inputs, [[2, 2]], torch.Generator().manual_seed(99))[0].token_ids

    assert seeded() == seeded()


# -- the real model -------------------------------------------------------------------------------
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def spec_llms():
    """(plain, speculative) engines per dtype and backend, built on first use."""
    from thrifty import LLM

    cache = {}

    def get(dtype: str, backend: str, spec: bool, **kw):
        key = (dtype, backend, spec, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = LLM(dtype=dtype, backend=backend, seed=0, max_model_len=1024, kv_cache_memory=0.1,
                             speculative_config=NGRAM if spec else None, **kw)
        return cache[key]

    return get


# bf16 with the default model's 4-bit weights is not batch-invariant even without speculation (a
# request's tokens can depend on how many rows the step has: from 8 rows the quantized kernels
# compute with weights rounded to bf16, docs/speculative.md), so bf16 is checked on dense weights.
@pytest.mark.slow
@pytest.mark.parametrize("dtype,backend,quantization", [("float32", "auto", "auto"), ("float32", "torch", "auto"),
                                                        ("bfloat16", "auto", "none")])
def test_greedy_tokens_identical_with_and_without_ngram(spec_llms, dtype, backend, quantization):
    plain = spec_llms(dtype, backend, False, quantization=quantization).generate(PROMPTS, GREEDY, use_tqdm=False)
    spec_llm = spec_llms(dtype, backend, True, quantization=quantization)
    spec = spec_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    assert [o.outputs[0].text for o in spec] == [o.outputs[0].text for o in plain]
    stats = spec_llm.llm_engine.scheduler.spec_stats
    assert stats.num_accepted_tokens > 0  # the repetitive prompts did get right proposals
    # One at a time too (batch 1: every step a proposal step).
    one = spec_llm.generate(PROMPTS[3], GREEDY, use_tqdm=False)[0]
    assert one.outputs[0].token_ids == plain[3].outputs[0].token_ids


@pytest.mark.slow
def test_speculation_with_stops_logprobs_n_seeds_and_preemption(spec_llms):
    plain, spec = spec_llms("float32", "auto", False), spec_llms("float32", "auto", True)
    cases = [
        SamplingParams(temperature=0, max_tokens=40, stop=["5,"], include_stop_str_in_output=True),
        SamplingParams(temperature=0, max_tokens=40, logprobs=2),
        SamplingParams(temperature=0, max_tokens=7),
    ]
    for params in cases:
        a = plain.generate(PROMPTS[3], params, use_tqdm=False)[0].outputs[0]
        b = spec.generate(PROMPTS[3], params, use_tqdm=False)[0].outputs[0]
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason), params
        if params.logprobs:
            for x, y in zip(a.logprobs, b.logprobs):
                assert list(x) == list(y)  # same tokens, same top-2
                assert all(math.isclose(x[t].logprob, y[t].logprob, abs_tol=1e-3) for t in x)
    sampled = SamplingParams(temperature=0.8, max_tokens=32, n=2, seed=11)
    runs = [[c.token_ids for c in spec.generate(PROMPTS[7], sampled, use_tqdm=False)[0].outputs] for _ in range(2)]
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1]
    # A cache of 24 blocks forces preemptions; proposals ride along and outputs do not change.
    tight = spec_llms("float32", "auto", True, max_num_seqs=8)
    tight_small = __import__("thrifty").LLM(dtype="float32", seed=0, max_model_len=256,
                                            kv_cache_memory=24 * 16 * 46080 / 2**30, speculative_config=NGRAM)
    outs = tight_small.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert tight_small.llm_engine.scheduler.num_preemptions > 0
    want = tight.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in want]
    assert tight_small.llm_engine.kv_cache_manager.pool.num_free_blocks == 24  # nothing leaked


@pytest.mark.slow
def test_server_with_speculation_answers_as_without_and_reports_metrics(spec_llms):
    import json

    import httpx2 as httpx
    from prometheus_client.parser import text_string_to_metric_families

    plain = spec_llms("float32", "auto", False)
    srv = Server("--kv-cache-memory", "0.1", "--max-model-len", "1024", "--speculative-config", json.dumps(NGRAM))
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        got = client.completions.create(model=model, prompt=PROMPTS[3], max_tokens=MAX_NEW, temperature=0)
        want = plain.generate(PROMPTS[3], GREEDY, use_tqdm=False)[0].outputs[0].text
        assert got.choices[0].text == want
        chunks = client.completions.create(model=model, prompt=PROMPTS[3], max_tokens=MAX_NEW, temperature=0,
                                           stream=True)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        samples = {s.name: s for f in text_string_to_metric_families(httpx.get(f"{srv.url}/metrics").text)
                   for s in f.samples}
        assert samples["vllm:spec_decode_num_draft_tokens_total"].value > 0
        assert 0 < samples["vllm:spec_decode_num_accepted_tokens_total"].value <= \
            samples["vllm:spec_decode_num_draft_tokens_total"].value
        assert samples["thrifty:spec_decode_enabled"].value == 1.0
        assert "vllm:spec_decode_num_accepted_tokens_per_pos_total" in samples
    finally:
        srv.stop()
