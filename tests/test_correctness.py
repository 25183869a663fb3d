"""The engine against HuggingFace transformers on the same weights (the default model, fp32)."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, MAX_NEW, PROMPTS

from thrifty import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_prefill_logprobs_match_transformers(any_llm, hf_model):
    tok = any_llm.get_tokenizer()
    outs = any_llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=1, logprobs=10), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([tok.encode(prompt)])
        with torch.inference_mode():
            ref = torch.log_softmax(hf_model(ids).logits[0, -1].float(), -1)
        top = out.outputs[0].logprobs[0]
        assert len(top) == 10
        for token_id, lp in top.items():
            assert lp.logprob == pytest.approx(ref[token_id].item(), abs=2e-4)
        assert out.outputs[0].token_ids[0] == int(ref.argmax())


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_logprobs_match_transformers(backend, hf_model):
    """Every prompt position's logprob (of the actual next token, its rank, the top 3), with the
    prompt chunked over several steps beside another request, and asked twice: a request with
    prompt logprobs never takes prefix-cache hits, which would leave positions uncomputed."""
    llm = LLM(dtype="float32", backend=backend, max_model_len=512, max_num_batched_tokens=16, kv_cache_memory=0.05)
    tok = llm.get_tokenizer()
    prompt = PROMPTS[-1]
    ids = tok.encode(prompt)
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), -1)
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3)
    for out in llm.generate([prompt, PROMPTS[0], prompt], [params, SamplingParams(max_tokens=4), params],
                            use_tqdm=False)[::2]:
        assert out.num_cached_tokens == 0 and len(out.prompt_logprobs) == len(ids) > 16
        assert out.prompt_logprobs[0] is None
        for pos in range(1, len(ids)):
            entry, expected = out.prompt_logprobs[pos], ref[pos - 1]
            actual = entry[ids[pos]]
            assert actual.logprob == pytest.approx(expected[ids[pos]].item(), abs=2e-4)
            assert actual.rank == int((expected > expected[ids[pos]]).sum()) + 1
            top3 = set(expected.topk(3).indices.tolist())
            assert top3 <= set(entry) and len(entry) in (3, 4)
    # n > 1: the leader computes them once (its siblings then hit its prompt in the prefix cache).
    two = llm.generate(prompt, SamplingParams(n=2, temperature=1.0, max_tokens=2, prompt_logprobs=0),
                       use_tqdm=False)[0]
    assert [e and {t: round(lp.logprob, 4) for t, lp in e.items()} for e in two.prompt_logprobs] == \
        [e and {ids[i]: round(e[ids[i]].logprob, 4)} for i, e in enumerate(out.prompt_logprobs)]
    assert two.num_cached_tokens == 0
    with pytest.raises(ValueError, match="prompt_logprobs must be >= 0"):
        SamplingParams(prompt_logprobs=-1)


def test_greedy_matches_transformers_in_a_mixed_batch(any_llm, hf_greedy):
    outs = any_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert _tokens(outs) == hf_greedy
    assert all(len(t) >= 16 for t in hf_greedy)  # the check covers real continuations
    tok = any_llm.get_tokenizer()
    for out, ref in zip(outs, hf_greedy):
        assert out.outputs[0].text == tok.decode(ref, skip_special_tokens=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_matches_with_forced_preemption(hf_greedy, backend):
    # 24 blocks of 16 tokens: far less than 8 requests need, so requests are preempted and recomputed.
    tiny = LLM(dtype="float32", max_model_len=256, kv_cache_memory=24 * 16 * 46080 / 2**30,
               enable_prefix_caching=False, backend=backend)
    assert tiny.llm_engine.kv_cache_manager.num_blocks == 24
    outs = tiny.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert tiny.llm_engine.scheduler.num_preemptions > 0
    assert _tokens(outs) == hf_greedy


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_matches_with_chunked_prefill(hf_greedy, backend):
    chunked = LLM(dtype="float32", max_num_batched_tokens=7, backend=backend)  # prompts split into many chunks
    outs = chunked.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert chunked.llm_engine.stats.max_step_tokens <= 7
    assert _tokens(outs) == hf_greedy


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_matches_with_static_batches(hf_greedy, backend):
    # Batches of 4 run until their slowest member ends; members that end first on EOS stay in
    # the batch as padding rows, which must not disturb their batch mates.
    assert any(len({len(t) for t in hf_greedy[i:i + 4]}) > 1 for i in (0, 4))
    static = LLM(dtype="float32", scheduler_policy="static", max_num_seqs=4, backend=backend)
    outs = static.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert _tokens(outs) == hf_greedy
    assert static.llm_engine.kv_cache_manager.pool.num_free_blocks == static.llm_engine.kv_cache_manager.num_blocks


def test_greedy_matches_with_prefix_cache_hits(any_llm, hf_greedy):
    first = any_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    again = any_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    long_prompt = PROMPTS[-1]
    assert again[-1].num_cached_tokens >= 16 * (len(any_llm.get_tokenizer().encode(long_prompt)) // 16 - 1)
    assert _tokens(again) == _tokens(first) == hf_greedy


def test_shared_prefix_is_computed_once(llm):
    engine = llm.llm_engine
    system = "You are a careful assistant. Answer briefly and precisely. " * 8
    prompts = [system + q for q in ("What is 2+2?", "Name a color.", "Say hi.")]
    llm.generate(prompts[:1], SamplingParams(max_tokens=1), use_tqdm=False)
    engine.reset_stats()
    outs = llm.generate(prompts[1:], SamplingParams(max_tokens=1), use_tqdm=False)
    shared = len(llm.get_tokenizer().encode(system)) // 16 * 16
    assert all(o.num_cached_tokens >= shared - 16 for o in outs)
    total = sum(len(o.prompt_token_ids) for o in outs)
    assert engine.stats.num_prompt_tokens <= total - 2 * (shared - 16)
    assert llm.reset_prefix_cache()  # as vLLM's: the cached blocks no request holds are forgotten
    assert llm.generate(prompts[1], SamplingParams(max_tokens=1), use_tqdm=False)[0].num_cached_tokens == 0


def test_seeded_sampling_repeats_regardless_of_batch_mates(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24)
    alone = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids
    mates = [PROMPTS[3], PROMPTS[0], PROMPTS[5]]
    mixed = llm.generate(mates, [SamplingParams(temperature=0.8, max_tokens=30), params,
                                 SamplingParams(temperature=1.0, seed=7, max_tokens=10)], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=24),
                              use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_samples_share_prompt_blocks(llm):
    engine = llm.llm_engine
    prompt = PROMPTS[-1]
    n_prompt = len(llm.get_tokenizer().encode(prompt))
    assert llm.reset_prefix_cache()
    engine.reset_stats()
    out = llm.generate(prompt, SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=8), use_tqdm=False)[0]
    assert len(out.outputs) == 4 and [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # siblings are not copies of each other
    # The prompt was computed once; the 3 followers only recomputed the partial last block.
    assert engine.stats.num_prompt_tokens <= n_prompt + 3 * 16


def test_failed_step_leaves_no_prefix_cache_entry_for_kv_it_did_not_compute(hf_greedy):
    """A step that fails after scheduling registered the prompt's full blocks in the prefix
    cache, but never wrote their KV: the same prompt afterwards must not hit them."""
    from thrifty.engine.llm_engine import StepFailed

    llm = LLM(dtype="float32", max_model_len=512, kv_cache_memory=0.05)
    engine = llm.llm_engine
    prompt = PROMPTS[-1]  # several full blocks
    assert len(llm.get_tokenizer().encode(prompt)) >= 4 * 16
    real_execute = engine.runner.execute

    def fail(out):
        raise RuntimeError("injected failure")

    engine.runner.execute = fail
    engine.add_request(prompt, GREEDY)
    with pytest.raises(StepFailed):
        engine.step()
    engine.runner.execute = real_execute
    out = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    assert out.outputs[0].token_ids == hf_greedy[-1]
