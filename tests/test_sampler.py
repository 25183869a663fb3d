"""Tests for thrifty.layers.sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.layers.sampler import (
    Sampler,
    SamplingInput,
    apply_min_tokens,
    apply_penalties,
)
from thrifty.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def row(
    params: SamplingParams,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> SamplingInput:
    return SamplingInput(params, list(prompt or [0]), list(output or []), generator)


def seeded_generator(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------------------
# Reference implementations (float64, plain Python/numpy)


def reference_filtered_probs(logits: list[float], p: SamplingParams) -> np.ndarray:
    """Expected sampling distribution after temperature/top_k/top_p/min_p (ties not handled)."""
    x = np.asarray(logits, dtype=np.float64) / p.temperature
    order = np.argsort(-x, kind="stable")
    keep = np.isfinite(x)
    if p.top_k > 0:
        keep[order[p.top_k:]] = False
    probs = _softmax_masked(x, keep)
    if p.top_p < 1.0:
        mass_before = 0.0
        for tok in order:
            if mass_before >= p.top_p:
                keep[tok] = False
            mass_before += probs[tok]
        probs = _softmax_masked(x, keep)
    if p.min_p > 0.0:
        keep &= probs >= p.min_p * probs.max()
        probs = _softmax_masked(x, keep)
    return probs


def _softmax_masked(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    e = np.where(keep, np.exp(np.where(keep, x, 0.0) - x[keep].max()), 0.0)
    return e / e.sum()


def reference_penalties(logits: list[float], inp: SamplingInput) -> list[float]:
    p = inp.params
    out = list(logits)
    seen = set(inp.prompt_token_ids) | set(inp.output_token_ids)
    for tok in range(len(out)):
        if tok in seen:
            out[tok] = out[tok] / p.repetition_penalty if out[tok] > 0 else out[tok] * p.repetition_penalty
        count = inp.output_token_ids.count(tok)
        out[tok] -= p.frequency_penalty * count
        if count:
            out[tok] -= p.presence_penalty
    return out


# ---------------------------------------------------------------------------
# Greedy and logprobs


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_with_raw_logprobs(device: str) -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 32, device=device) * 3
    inputs = [
        row(SamplingParams(temperature=0.0)),
        row(SamplingParams(temperature=0.0, logprobs=5)),
        row(SamplingParams(temperature=0.0, logprobs=0)),
        row(SamplingParams(temperature=0.0, logprobs=40)),  # more than the vocab
    ]
    out = Sampler(seed=0)(logits, inputs)

    expected_logprobs = logits.float().log_softmax(-1).cpu()
    assert out.token_ids == logits.argmax(-1).tolist()
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(expected_logprobs[i, tok].item(), abs=1e-5)

    assert out.top_logprobs[0] is None
    assert out.top_logprobs[2] == []
    for i, k in [(1, 5), (3, 32)]:
        top = out.top_logprobs[i]
        assert top is not None and len(top) == k
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        ref_vals, ref_ids = expected_logprobs[i].topk(k)
        assert [t for t, _ in top] == ref_ids.tolist()
        assert values == pytest.approx(ref_vals.tolist(), abs=1e-5)
        assert top[0][0] == out.token_ids[i]


def test_logprobs_come_from_raw_logits() -> None:
    # Penalties and temperature change which token wins, but not the reported logprobs.
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, logprobs=2)
    out = Sampler()(logits, [row(params, prompt=[0])])
    raw = logits.log_softmax(-1)[0]
    assert out.token_ids == [1]
    assert out.logprobs[0] == pytest.approx(raw[1].item(), abs=1e-6)
    assert out.top_logprobs[0] == [
        (0, pytest.approx(raw[0].item(), abs=1e-6)),
        (1, pytest.approx(raw[1].item(), abs=1e-6)),
    ]

    sampled = Sampler(seed=1)(logits, [row(SamplingParams(temperature=0.3, top_k=2))])
    tok = sampled.token_ids[0]
    assert sampled.logprobs[0] == pytest.approx(raw[tok].item(), abs=1e-6)


def test_half_precision_input_and_no_in_place_writes() -> None:
    logits = torch.tensor([[0.5, 3.0, 1.0, 2.0]], dtype=torch.bfloat16)
    out = Sampler()(logits, [row(SamplingParams(temperature=0.0))])
    assert out.token_ids == [1]

    logits32 = torch.tensor([[0.5, 3.0, 1.0, 2.0]])
    before = logits32.clone()
    params = SamplingParams(temperature=0.8, min_tokens=3, repetition_penalty=1.5, top_k=2)
    params.all_stop_token_ids = {1}
    Sampler(seed=0)(logits32, [row(params, prompt=[3], output=[2])])
    assert torch.equal(logits32, before)


def test_empty_batch() -> None:
    out = Sampler()(torch.empty(0, 10), [])
    assert out.token_ids == [] and out.logprobs == [] and out.top_logprobs == []


# ---------------------------------------------------------------------------
# Seeding


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_ignore_batch_mates(device: str) -> None:
    torch.manual_seed(1)
    vocab = 64
    target = torch.randn(vocab, device=device)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)

    def run(layout: str, steps: int = 6) -> list[int]:
        gen = seeded_generator(1234, device)
        other_gen = seeded_generator(99, device)
        sampler = Sampler()  # unseeded: batch mates draw fresh noise every run
        tokens = []
        for step in range(steps):
            mates = torch.randn(3, vocab, device=device)
            if layout == "alone":
                logits, pos = target.unsqueeze(0), 0
                inputs = [row(params, generator=gen)]
            else:
                # Batch size and position change from step to step.
                n_mates = 1 + step % 3
                logits = torch.cat([mates[:n_mates], target.unsqueeze(0)])
                pos = n_mates
                inputs = [row(SamplingParams(temperature=1.0, top_k=5))] * (n_mates - 1)
                inputs += [row(SamplingParams(temperature=0.7, seed=99), generator=other_gen)]
                inputs += [row(params, generator=gen)]
            tokens.append(sampler(logits, inputs).token_ids[pos])
        return tokens

    alone = run("alone")
    assert run("mixed") == alone
    assert run("alone") == alone
    assert len(set(alone)) > 1  # it really samples


def test_sampler_seed_reproduces_unseeded_rows() -> None:
    logits = torch.randn(16, 50)
    inputs = [row(SamplingParams(temperature=1.0))] * 16
    first = Sampler(seed=7)(logits, inputs).token_ids
    assert Sampler(seed=7)(logits, inputs).token_ids == first


# ---------------------------------------------------------------------------
# Distribution

SMALL_LOGITS = [2.0, 1.5, 1.2, 0.8, 0.3, 0.0, -0.5, -1.0]
DIST_CONFIGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=4),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.2),  # keeps logit 0.8, drops 0.3 (margin 0.09 in log space)
    SamplingParams(temperature=0.8, top_k=6, top_p=0.9, min_p=0.1),
]


def assert_matches_distribution(tokens: list[int], expected: np.ndarray) -> None:
    n = len(tokens)
    counts = np.bincount(np.asarray(tokens), minlength=len(expected))
    for tok, p in enumerate(expected):
        if p == 0.0:
            assert counts[tok] == 0, f"filtered token {tok} was sampled {counts[tok]} times"
        else:
            sigma = math.sqrt(n * p * (1 - p))
            assert abs(counts[tok] - n * p) <= 5 * sigma + 1, (tok, counts[tok], n * p)


@pytest.mark.parametrize("params", DIST_CONFIGS, ids=["plain", "top_k", "top_p", "min_p", "all"])
def test_sampled_frequencies_match_filtered_softmax(params: SamplingParams) -> None:
    n = 20000
    logits = torch.tensor(SMALL_LOGITS).expand(n, -1)
    out = Sampler(seed=3)(logits, [row(params)] * n)
    assert_matches_distribution(out.token_ids, reference_filtered_probs(SMALL_LOGITS, params))


def test_mixed_params_in_one_batch() -> None:
    # Per-row parameters must not leak between interleaved rows.
    n = 20000
    configs = [DIST_CONFIGS[1], DIST_CONFIGS[3], DIST_CONFIGS[4], SamplingParams(temperature=0.0)]
    inputs = [row(configs[i % len(configs)]) for i in range(n)]
    logits = torch.tensor(SMALL_LOGITS).expand(n, -1)
    tokens = Sampler(seed=4)(logits, inputs).token_ids
    for c, params in enumerate(configs[:3]):
        expected = reference_filtered_probs(SMALL_LOGITS, params)
        assert_matches_distribution(tokens[c :: len(configs)], expected)
    assert set(tokens[3 :: len(configs)]) == {0}


# ---------------------------------------------------------------------------
# Penalties and min_tokens


def greedy_token(
    logits: list[float], prompt: list[int] | None = None, output: list[int] | None = None, **penalties: float
) -> int:
    inp = row(SamplingParams(temperature=0.0, **penalties), prompt, output)
    return Sampler()(torch.tensor([logits]), [inp]).token_ids[0]


def test_repetition_penalty_flips_greedy_choice() -> None:
    logits = [2.0, -1.0, 1.5, 0.5]
    inp = row(SamplingParams(repetition_penalty=2.0), prompt=[0], output=[1])
    got = apply_penalties(torch.tensor([logits]), [inp])[0].tolist()
    assert got == pytest.approx([1.0, -2.0, 1.5, 0.5])  # positive divided, negative multiplied
    assert greedy_token(logits) == 0
    assert greedy_token(logits, repetition_penalty=2.0, prompt=[0], output=[1]) == 2


def test_frequency_and_presence_use_output_counts_only() -> None:
    logits = [3.0, 2.5, 0.0]
    # Prompt occurrences do not count for frequency/presence.
    assert greedy_token(logits, frequency_penalty=2.0, presence_penalty=2.0, prompt=[0, 0, 0]) == 0
    # 3.0 - 0.5 * 2 = 2.0 < 2.5
    assert greedy_token(logits, frequency_penalty=0.5, output=[0, 0]) == 1
    # 3.0 - 0.2 * 2 = 2.6 > 2.5
    assert greedy_token(logits, frequency_penalty=0.2, output=[0, 0]) == 0
    # presence is independent of the count: 3.0 - 0.6 = 2.4 < 2.5
    assert greedy_token(logits, presence_penalty=0.6, output=[0, 0, 0, 0]) == 1
    inp = row(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), output=[0, 0, 2])
    got = apply_penalties(torch.tensor([logits]), [inp])[0].tolist()
    assert got == pytest.approx([3.0 - 1.0 - 0.25, 2.5, 0.0 - 0.5 - 0.25])


def test_penalties_match_reference_on_random_batch() -> None:
    rng = np.random.default_rng(0)
    vocab = 20
    inputs = []
    for i in range(6):
        params = SamplingParams(
            repetition_penalty=float(rng.uniform(0.5, 2.0)) if i % 3 else 1.0,
            frequency_penalty=float(rng.uniform(-2, 2)) if i % 2 else 0.0,
            presence_penalty=float(rng.uniform(-2, 2)) if i % 4 else 0.0,
        )
        prompt = rng.integers(0, vocab, size=int(rng.integers(1, 12))).tolist()
        output = rng.integers(0, vocab, size=int(rng.integers(0, 15))).tolist()
        inputs.append(row(params, prompt, output))
    inputs.append(row(SamplingParams(), [1, 2], [3, 3]))  # no penalties: untouched
    logits = torch.randn(len(inputs), vocab, generator=torch.Generator().manual_seed(0))
    got = apply_penalties(logits, inputs)
    for i, inp in enumerate(inputs):
        assert got[i].tolist() == pytest.approx(reference_penalties(logits[i].tolist(), inp), abs=1e-5)
    assert torch.equal(got[-1], logits[-1])


def test_no_penalties_is_a_no_op() -> None:
    logits = torch.randn(3, 10)
    inputs = [row(SamplingParams(), [1, 2], [3])] * 3
    assert apply_penalties(logits, inputs) is logits
    assert apply_min_tokens(logits, inputs) is logits


def test_min_tokens_blocks_stop_tokens_until_reached() -> None:
    eos, stop = 3, 5
    logits = torch.tensor([[0.0, 1.0, 0.5, 9.0, 0.2, 8.0, 0.1]])
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[stop])
    params.all_stop_token_ids = {eos}
    sampler = Sampler()
    assert sampler(logits, [row(params, output=[])]).token_ids == [1]
    assert sampler(logits, [row(params, output=[1])]).token_ids == [1]
    assert sampler(logits, [row(params, output=[1, 1])]).token_ids == [eos]
    masked = apply_min_tokens(logits, [row(params, output=[1])])
    assert masked[0, eos] == -math.inf and masked[0, stop] == -math.inf
    assert torch.isfinite(masked[0, [0, 1, 2, 4, 6]]).all()

    # Random rows are blocked too.
    random_params = SamplingParams(temperature=1.0, min_tokens=1)
    random_params.all_stop_token_ids = {eos}
    out = Sampler(seed=0)(logits.expand(2000, -1), [row(random_params)] * 2000)
    assert eos not in out.token_ids


# ---------------------------------------------------------------------------
# Property: the sampled token is always allowed


def allowed_tokens(logits: list[float], p: SamplingParams, tol: float = 1e-4) -> set[int]:
    """Tokens any correct sampler may return; float32 boundary cases are let through via tol."""
    finite = [t for t, v in enumerate(logits) if v != -math.inf]
    if p.greedy:
        best = max(logits[t] for t in finite)
        return {t for t in finite if logits[t] == best}
    x = np.asarray(logits, dtype=np.float64) / p.temperature
    order = sorted(finite, key=lambda t: -x[t])
    if p.top_k > 0:
        order = order[: p.top_k]
    probs = np.exp(x[order] - x[order[0]])
    probs /= probs.sum()
    mass_before = np.cumsum(probs) - probs
    kept = [t for t, m in zip(order, mass_before) if m < p.top_p + tol]
    kept_probs = np.exp(np.array([x[t] for t in kept]) - x[kept[0]])
    kept_probs /= kept_probs.sum()
    return {t for t, q in zip(kept, kept_probs) if q >= p.min_p * kept_probs.max() - tol}


@st.composite
def sampling_rows(draw: st.DrawFn) -> tuple[list[float], SamplingParams]:
    vocab = draw(st.integers(2, 40))
    # Distinct quarter-integers are exact in float32, so ranks have no ties.
    values = draw(st.lists(st.integers(-60, 60), min_size=vocab, max_size=vocab, unique=True))
    logits = [v / 4 for v in values]
    n_masked = draw(st.integers(0, vocab - 1))
    for t in draw(st.permutations(range(vocab)))[:n_masked]:
        logits[t] = -math.inf
    params = SamplingParams(
        temperature=draw(st.sampled_from([0.0, 0.05, 0.5, 1.0, 2.5])),
        top_k=draw(st.integers(0, vocab + 2)),
        top_p=draw(st.floats(0.01, 1.0)),
        min_p=draw(st.floats(0.0, 1.0)),
    )
    return logits, params


@settings(max_examples=150, deadline=None)
@given(batch=st.lists(sampling_rows(), min_size=1, max_size=4), seed=st.integers(0, 2**31))
def test_sampled_token_always_allowed(batch: list[tuple[list[float], SamplingParams]], seed: int) -> None:
    vocab = max(len(logits) for logits, _ in batch)
    # Pad rows to one vocab with -inf so they can share a batch.
    padded = [logits + [-math.inf] * (vocab - len(logits)) for logits, _ in batch]
    inputs = [row(p) for _, p in batch]
    out = Sampler(seed=seed)(torch.tensor(padded), inputs)
    for (logits, params), tok, lp in zip(batch, out.token_ids, out.logprobs):
        assert tok in allowed_tokens(logits, params), (tok, logits, params)
        assert math.isfinite(lp)
