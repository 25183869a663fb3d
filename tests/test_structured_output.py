"""Structured output: vLLM's StructuredOutputsParams (and OpenAI's response_format, in
test_server.py) compiled by llguidance into a token mask per logits row, which the sampler and the
speculative verifier apply; the grammar manager on the default model's tokenizer, the sampler on
random logits, and the real default model end to end."""

from __future__ import annotations

import re

import jsonschema
import numpy as np
import pytest
import torch
from conftest import PROMPTS

from thrifty import SamplingParams, StructuredOutputsParams
from thrifty.layers.rejection_sampler import verify
from thrifty.layers.sampler import Sampler, SamplingInput
from thrifty.structured_output import ConstrainedRows, StructuredOutputManager

VOCAB, EOS = 49152, 2

# Every string, array and integer bounded, so that even a greedy (or looping) model must end.
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user", "guest"]}},
    "required": ["name", "age", "role"], "additionalProperties": False}
ORDER = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 1, "maximum": 99999},
    "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "maxLength": 12},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}},
    "paid": {"type": "boolean"}},
    "required": ["id", "items", "paid"], "additionalProperties": False}
SCHEMAS = [PERSON, ORDER]


def bits(mask_row: np.ndarray) -> set[int]:
    """The tokens a mask row allows."""
    row = mask_row.view(np.uint32)
    return {t for t in range(VOCAB) if (int(row[t >> 5]) >> (t & 31)) & 1}


@pytest.fixture(scope="module")
def tokenizer():
    from thrifty.model.loader import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(None))


@pytest.fixture(scope="module")
def manager(tokenizer):
    return StructuredOutputManager(tokenizer, VOCAB, frozenset({EOS}))


def test_params_follow_vllm_and_reject_bad_input():
    p = SamplingParams(structured_outputs={"choice": ["a", "b"]})
    assert p.structured_outputs == StructuredOutputsParams(choice=["a", "b"])
    for bad, words in [({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"),
                       ({"choice": []}, "non-empty list"), ({"choice": ["a", 1]}, "non-empty list"),
                       ({"regex": ""}, "non-empty string"), ({"json": 3}, "JSON schema"),
                       ({"jsn": {}}, "unknown field")]:
        with pytest.raises(ValueError, match=words):
            SamplingParams(structured_outputs=bad)
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(structured_outputs={"regex": "a+"}, ignore_eos=True)


def test_grammars_compile_once_and_bad_ones_say_why(manager):
    params = StructuredOutputsParams(json=PERSON)
    template, seconds = manager.compile(params)
    again, seconds_again = manager.compile(StructuredOutputsParams(json=dict(PERSON)))
    assert again is template and seconds_again == 0.0  # cached by the grammar's text
    for bad, words in [(StructuredOutputsParams(json={"type": "objectx"}), "objectx"),
                       (StructuredOutputsParams(json="{not json"), "not valid JSON"),
                       (StructuredOutputsParams(regex="[a-"), "regex"),
                       (StructuredOutputsParams(grammar="root ::= ("), "grammar")]:
        with pytest.raises(ValueError, match=words):
            manager.compile(bad)


def test_masks_follow_the_grammar_through_proposals_and_leave_its_state_alone(manager, tokenizer):
    yes, no = tokenizer.encode("yes"), tokenizer.encode("no")
    manager.start("r", StructuredOutputsParams(choice=["yes", "no"]), [])
    try:
        first = manager.bitmask([ConstrainedRows("r", 0, [])], 1)[0]
        assert {yes[0], no[0]} <= bits(first) and EOS not in bits(first) and len(bits(first)) < 50
        # Proposals "yes", EOS: the row after "yes" allows only EOS; an unconstrained row (1) all.
        mask = manager.bitmask([ConstrainedRows("r", 2, yes + [EOS])], 3 + len(yes) + 1)
        assert (mask[:2] == -1).all() and np.array_equal(mask[2], first)
        assert bits(mask[2 + len(yes)]) == {EOS}
        # A proposal the grammar does not allow: rows after it are never used and allow all.
        mask = manager.bitmask([ConstrainedRows("r", 0, [tokenizer.encode(" maybe")[0], yes[0]])], 3)
        assert np.array_equal(mask[0], first) and (mask[1:] == -1).all()
        assert np.array_equal(manager.bitmask([ConstrainedRows("r", 0, [])], 1)[0], first)  # rolled back
        manager.accept("r", yes + [EOS])  # EOS after the grammar's end is taken as the end
        assert manager.matchers["r"].is_stopped() and not manager.matchers["r"].is_error()
        manager.start("r", StructuredOutputsParams(choice=["yes", "no"]), yes)  # a resumed request keeps its state
        assert manager.matchers["r"].is_stopped()
    finally:
        manager.finish("r")
    assert "r" not in manager.matchers
    manager.start("r2", StructuredOutputsParams(choice=["yes", "no"]), no)  # resumed in a fresh runner
    assert bits(manager.bitmask([ConstrainedRows("r2", 0, [])], 1)[0]) == {EOS}
    manager.finish("r2")


def _choice_inputs(manager, tokenizer, params_list):
    """Sampling inputs for rows constrained to "yes" / "no", one per params."""
    manager.start("c", StructuredOutputsParams(choice=["yes", "no"]), [])
    try:
        row = manager.bitmask([ConstrainedRows("c", 0, [])], 1)[0]
    finally:
        manager.finish("c")
    allowed = bits(row)
    return [SamplingInput(p, [0], [], torch.Generator().manual_seed(i), row) for i, p in enumerate(params_list)], allowed


def test_sampler_picks_only_allowed_tokens_and_the_grammar_beats_min_tokens(manager, tokenizer):
    torch.manual_seed(0)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=2), SamplingParams(temperature=0, logprobs=2)]
    inputs, allowed = _choice_inputs(manager, tokenizer, params)
    free = SamplingInput(SamplingParams(temperature=0), [0], [], None)  # an unconstrained row beside them
    for _ in range(20):
        logits = torch.randn(len(inputs) + 1, VOCAB) * 3
        out = Sampler(0)(logits, inputs + [free])
        assert all(t in allowed for t in out.token_ids[:-1])
        assert out.token_ids[-1] == int(logits[-1].argmax())
        assert out.logprobs[0] == pytest.approx(float(logits[0].log_softmax(-1)[out.token_ids[0]]), abs=1e-5)
    # All rows greedy (the native pick, then checked): a forbidden argmax gives way to the
    # allowed one, with its raw logprob; an allowed argmax stands.
    row = inputs[0].allowed
    greedy_rows = [SamplingInput(SamplingParams(temperature=0), [0], [], None, row) for _ in range(3)]
    logits = torch.randn(3, VOCAB)
    logits[:2, 100] = 50.0  # forbidden
    best = sorted(allowed)[1]
    logits[2, best] = 60.0
    out = Sampler(0)(logits, greedy_rows)
    allowed_idx = torch.tensor(sorted(allowed))
    want = [int(allowed_idx[logits[i, allowed_idx].argmax()]) for i in range(3)]
    assert out.token_ids == want and want[2] == best
    assert out.logprobs == pytest.approx([float(logits[i].log_softmax(-1)[want[i]]) for i in range(3)], abs=1e-5)
    # Only EOS allowed, but min_tokens holds EOS back: the grammar wins (no NaN, no other token).
    eos_only = np.zeros(VOCAB // 32, dtype=np.int32)
    eos_only[EOS >> 5] = 1 << (EOS & 31)
    rows = [SamplingInput(SamplingParams(temperature=t, min_tokens=5, seed=3), [0], [],
                          torch.Generator().manual_seed(3), eos_only) for t in (0, 1.0)]
    assert Sampler(0)(torch.randn(2, VOCAB), rows).token_ids == [EOS, EOS]


def test_verifier_rejects_proposals_the_grammar_does_not_allow(manager, tokenizer):
    """A proposal outside the grammar has p(d) = 0 under the mask: always rejected, and the token
    drawn instead is one the grammar allows."""
    bad = tokenizer.encode(" maybe")[0]
    for temperature in (0, 1.0):
        inputs, allowed = _choice_inputs(manager, tokenizer, [SamplingParams(temperature=temperature, seed=4)] * 2)
        inputs[1].allowed = np.full_like(inputs[0].allowed, -1)
        logits = torch.randn(2, VOCAB)
        logits[0, bad] = 50.0  # the unconstrained target would take it
        for _ in range(10):
            (out,) = verify(logits, inputs, [[bad]], torch.Generator().manual_seed(0))
            assert len(out.token_ids) == 1 and out.token_ids[0] in allowed


def test_compile_time_is_charged_to_its_request_and_busy_plus_idle_is_still_elapsed():
    from thrifty.engine.cost_meter import CostMeter

    meter = CostMeter(3600.0, now=0.0)  # a dollar a second
    meter.charge("a", 0.25)  # compiled while idle
    meter.work_arrived(1.0)
    meter.step(2.0, {"a": 1, "b": 3})
    meter.charge("b", 0.5)  # compiled during the next step
    meter.step(3.0, {"b": 1})
    meter.went_idle()
    assert meter.request_cost("a") == pytest.approx(0.25 + 0.25)
    assert meter.request_cost("b") == pytest.approx(0.75 + 0.5 + 0.5)
    assert meter.busy_s == pytest.approx(2.25) and meter.idle_seconds(3.0) == pytest.approx(0.75)
    assert meter.busy_s + meter.idle_seconds(3.0) == pytest.approx(3.0)
    assert meter.busy_cost_usd == pytest.approx(meter.request_cost("a") + meter.request_cost("b"))


# -- the real model -------------------------------------------------------------------------------
@pytest.mark.slow
def test_sampled_json_validates_against_its_schema(llm):
    """Temperature 1, several schemas and prompts, n samples each: every output parses, validates
    and ended by EOS (not max_tokens)."""
    prompts = ["Describe a person as JSON.", "Write a record for an online order.", PROMPTS[0]]
    count = 0
    for schema in SCHEMAS:
        params = SamplingParams(temperature=1.0, seed=5, n=8, max_tokens=200, structured_outputs={"json": schema})
        for out in llm.generate(prompts, params, use_tqdm=False):
            for c in out.outputs:
                jsonschema.validate(__import__("json").loads(c.text), schema)
                assert c.finish_reason == "stop", c.text
                count += 1
    assert count == 2 * 3 * 8


@pytest.mark.slow
def test_regex_choice_and_grammar_outputs_match(llm):
    cases = [({"regex": r"\d{3}-[a-z]{2,8}"}, lambda t: re.fullmatch(r"\d{3}-[a-z]{2,8}", t)),
             ({"choice": ["positive", "negative", "neutral"]}, lambda t: t in ("positive", "negative", "neutral")),
             ({"grammar": 'root ::= "The answer is " ("yes" | "no") "."'},
              lambda t: t in ("The answer is yes.", "The answer is no.")),
             ({"json_object": True}, lambda t: isinstance(__import__("json").loads(t), dict))]
    for constraint, ok in cases:
        for params in (SamplingParams(temperature=0, max_tokens=60, structured_outputs=constraint),
                       SamplingParams(temperature=1.0, n=4, seed=6, max_tokens=60, structured_outputs=constraint)):
            for out in llm.generate(PROMPTS[:3], params, use_tqdm=False):
                for c in out.outputs:
                    if constraint.get("json_object") and c.finish_reason == "length":
                        continue  # any object: a greedy small model may run on; it is cut, not wrong
                    assert ok(c.text) and c.finish_reason == "stop", (constraint, c.text)


@pytest.mark.slow
def test_constrained_requests_with_stops_logprobs_seeds_prefix_cache_and_preemption(llm):
    from thrifty import LLM

    person = {"json": PERSON}
    greedy = SamplingParams(temperature=0, max_tokens=120, structured_outputs=person)
    want = [o.outputs[0] for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    assert all(jsonschema.validate(__import__("json").loads(c.text), PERSON) is None for c in want)
    # Stop strings cut the constrained output where they appear (the user's choice, as in vLLM).
    cut = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=120, structured_outputs=person,
                                                  stop=['"age"']), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and want[0].text.startswith(cut.text) and '"age"' not in cut.text
    # Logprobs come from the raw logits, for the tokens the grammar let through.
    lp = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=120, structured_outputs=person,
                                                 logprobs=2), use_tqdm=False)[0].outputs[0]
    assert lp.token_ids == want[0].token_ids and len(lp.logprobs) == len(lp.token_ids)
    # Seeded sampling reproduces (n > 1: each sample its own matcher).
    sampled = SamplingParams(temperature=1.0, seed=9, n=2, max_tokens=200, structured_outputs=person)
    runs = [llm.generate(PROMPTS[1], sampled, use_tqdm=False)[0] for _ in range(2)]
    assert [c.token_ids for c in runs[0].outputs] == [c.token_ids for c in runs[1].outputs]
    # A prompt of several blocks, twice: the second hits the prefix cache and answers the same.
    prompt = "Here are the people in the company, with their names, ages and roles, one by one. " * 3
    cached = [llm.generate(prompt, greedy, use_tqdm=False)[0] for _ in range(2)]
    assert cached[1].num_cached_tokens > 0 and cached[1].outputs[0].token_ids == cached[0].outputs[0].token_ids
    # A cache of 10 blocks forces preemptions: the grammar state survives them.
    tight = LLM(dtype="float32", seed=0, max_model_len=160, kv_cache_memory=10 * 16 * 46080 / 2**30)
    outs = tight.generate(PROMPTS, greedy, use_tqdm=False)
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [c.token_ids for c in want]
    assert tight.llm_engine.kv_cache_manager.pool.num_free_blocks == 10
    # The runner hears of the last step's finished requests with the next step: then every
    # finished request's matcher is freed.
    tight.generate(PROMPTS[0], SamplingParams(max_tokens=1), use_tqdm=False)
    assert not tight.llm_engine.structured.matchers
