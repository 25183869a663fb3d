"""Turns one step's logits into next tokens, following vLLM's order of operations.

Order: min_tokens masking -> penalties -> the grammar's mask (structured output) -> greedy
argmax | (temperature -> top_k -> top_p -> min_p -> a draw from the cumulative distribution).
Logprobs are always taken from the raw logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from thrifty.sampling_params import SamplingParams


@dataclass
class SamplingInput:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # Set when params.seed is given, so the request's samples do not depend on its batch mates.
    generator: torch.Generator | None
    # Structured output: the row's allowed tokens, bit t of the int32 words (structured_output.py).
    allowed: np.ndarray | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]] | None]


# ---------------------------------------------------------------------------
# Logit processing shared by greedy and random rows


def _below_min_tokens(inp: SamplingInput) -> bool:
    return len(inp.output_token_ids) < inp.params.min_tokens


def apply_min_tokens(logits: torch.Tensor, inputs: list[SamplingInput]) -> torch.Tensor:
    """Return logits with stop tokens masked for rows that have not reached min_tokens."""
    vocab = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    for i, inp in enumerate(inputs):
        params = inp.params
        if not _below_min_tokens(inp):
            continue
        for tok in set(params.all_stop_token_ids) | set(params.stop_token_ids or ()):
            if 0 <= tok < vocab:
                rows.append(i)
                cols.append(tok)
    if not rows:
        return logits
    out = logits.clone()
    out[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = -math.inf
    return out


def uses_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
    )


def _token_counts(seqs: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(seqs), vocab] float counts of each token per sequence."""
    # Pad with an extra "vocab" column that is dropped afterwards, so ragged rows need no mask.
    width = max(1, max(len(s) for s in seqs))
    padded = [s + [vocab] * (width - len(s)) for s in seqs]
    ids = torch.tensor(padded, dtype=torch.long, device=device)
    counts = torch.zeros(len(seqs), vocab + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, inputs: list[SamplingInput]) -> torch.Tensor:
    """Return logits with repetition/frequency/presence penalties applied (out of place)."""
    rows = [i for i, inp in enumerate(inputs) if uses_penalties(inp.params)]
    if not rows:
        return logits
    device = logits.device
    vocab = logits.shape[1]
    picked = [inputs[i] for i in rows]
    row_idx = torch.tensor(rows, device=device)
    sub = logits.index_select(0, row_idx)

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

    out_counts = _token_counts([inp.output_token_ids for inp in picked], vocab, device)
    in_output = out_counts > 0

    rep = [inp.params.repetition_penalty for inp in picked]
    if any(r != 1.0 for r in rep):
        # Prompts can be long; only scan them when a row actually has a repetition penalty.
        prompt_seen = _token_counts([inp.prompt_token_ids for inp in picked], vocab, device) > 0
        rep_t = column(rep)
        penalized = torch.where(sub > 0, sub / rep_t, sub * rep_t)
        sub = torch.where(prompt_seen | in_output, penalized, sub)

    freq_t = column([inp.params.frequency_penalty for inp in picked])
    pres_t = column([inp.params.presence_penalty for inp in picked])
    sub = sub - freq_t * out_counts - pres_t * in_output.float()
    return logits.index_copy(0, row_idx, sub)


def apply_grammar(logits: torch.Tensor, processed: torch.Tensor, inputs: list[SamplingInput]) -> torch.Tensor:
    """Return `processed` with the tokens each constrained row's grammar does not allow at -inf
    (out of place). A row left with no token (min_tokens holds back EOS where the grammar allows
    only EOS) is masked from its raw `logits` instead: the grammar wins."""
    rows = [i for i, inp in enumerate(inputs) if inp.allowed is not None]
    if not rows:
        return processed
    device, vocab = processed.device, processed.shape[1]
    # int32 words, little-endian: token t is bit t % 8 of byte t // 8; the inverted words give
    # the forbidden tokens in one unpacking.
    forbidden_words = ~np.stack([inputs[i].allowed for i in rows])
    forbidden = torch.from_numpy(np.unpackbits(forbidden_words.view(np.uint8), axis=1, count=vocab,
                                               bitorder="little")).to(device=device, dtype=torch.bool)
    if len(rows) == len(inputs):
        out = processed.masked_fill(forbidden, -math.inf)
    else:
        row_idx = torch.tensor(rows, device=device)
        out = processed.index_copy(0, row_idx, processed.index_select(0, row_idx).masked_fill_(forbidden, -math.inf))
    for j, i in enumerate(rows):  # only min_tokens can have taken every allowed token away
        if _below_min_tokens(inputs[i]) and bool(torch.isneginf(out[i]).all()):
            out[i] = logits[i].masked_fill(forbidden[j], -math.inf)
    return out


def process_logits(raw: torch.Tensor, inputs: list[SamplingInput]) -> torch.Tensor:
    """The logits the tokens are picked from: min_tokens, penalties, then the grammar."""
    return apply_grammar(raw, apply_penalties(apply_min_tokens(raw, inputs), inputs), inputs)


# ---------------------------------------------------------------------------
# Random sampling


# A top-p row looks for its nucleus among its this-many most likely tokens first (torch.topk),
# instead of sorting the whole vocabulary; only a row whose nucleus is wider (a very flat
# distribution) is sorted in full.
TOP_P_CANDIDATES = 1024


def _apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask tokens outside top-k, then outside the top-p nucleus, by rank: the candidates are
    the rows' largest logits from one torch.topk, not a sort of the vocabulary. Rows with
    neither filter (top_k = vocab, top_p = inf) pass through."""
    rows, vocab = logits.shape
    no_filter = torch.zeros(rows, dtype=torch.bool, device=logits.device)
    has_k = top_k < vocab if top_k is not None else no_filter
    has_p = top_p < math.inf if top_p is not None else no_filter
    k_max = int(top_k[has_k].max()) if bool(has_k.any()) else 0
    num = min(vocab, max(k_max, TOP_P_CANDIDATES if bool(has_p.any()) else 0))
    values, order = logits.topk(num, dim=-1)  # sorted, largest first
    ranks = torch.arange(num, device=logits.device)
    keep = ranks < top_k.unsqueeze(1) if top_k is not None else torch.ones_like(values, dtype=torch.bool)
    wider = no_filter
    if top_p is not None:
        kept = values.masked_fill(~keep, -math.inf)
        # Normalized over every token top-k keeps: the candidates when a row has top-k (it keeps
        # no more than `num`), the whole vocabulary when it has not.
        norm = torch.where(has_k.unsqueeze(1), kept.logsumexp(dim=-1, keepdim=True),
                           logits.logsumexp(dim=-1, keepdim=True))
        probs = (kept - norm).exp()
        # Mass strictly before each token: a token stays while the set before it is still short
        # of top_p. The first token's mass_before is exactly 0, so it is always kept.
        mass_before = probs.cumsum(dim=-1) - probs
        keep &= mass_before < top_p.unsqueeze(1)
        # A row whose nucleus may reach past the candidates: they hold less than top_p.
        wider = has_p & ~has_k & (probs.sum(dim=-1) < top_p)
    filtered = torch.full_like(logits, -math.inf).scatter(1, order, values.masked_fill(~keep, -math.inf))
    filtered = torch.where((has_k | has_p).unsqueeze(1), filtered, logits)
    if bool(wider.any()):
        filtered = torch.where(wider.unsqueeze(1), _sorted_top_k_top_p(logits, top_k, top_p), filtered)
    return filtered


def _sorted_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor
) -> torch.Tensor:
    """The same filter with one sort of the whole vocabulary (rows with a very wide nucleus)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        ranks = torch.arange(logits.shape[1], device=logits.device)
        sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), -math.inf)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p.unsqueeze(1), -math.inf)
    return logits.scatter(1, order, sorted_logits)


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    # prob < min_p * max_prob  <=>  logit - max_logit < log(min_p): no softmax needed, and
    # earlier top-k/top-p masking keeps the max token, so the threshold is unchanged by it.
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p).unsqueeze(1)
    return logits.masked_fill(logits < threshold, -math.inf)


def draw_from(
    weights: torch.Tensor,
    generators: list[torch.Generator | None],
    default: torch.Generator,
) -> torch.Tensor:
    """One index per row of `weights` (non-negative, not necessarily normalized), each with
    probability proportional to its weight: the row's cumulative sum inverted at a uniform draw
    (as torch.multinomial does, in float32), with no device sync. A row draws one number from
    its own generator, or the unseeded rows one each from `default`, so a seeded row's stream
    is independent of batch size and row position. (One number per row, not an exponential
    per vocabulary entry, which torch draws one at a time on the CPU: that race took about 1
    ms a row of 49152, a third of a 32-request step.)"""
    rows = weights.shape[0]
    device = weights.device
    if all(g is None for g in generators):
        u = torch.rand(rows, 1, dtype=torch.float32, generator=default, device=device)
    else:
        u = torch.cat([torch.rand(1, dtype=torch.float32, generator=g or default, device=device)
                       for g in generators]).unsqueeze(1)
    cdf = weights.float().cumsum(dim=-1)
    # The first index whose cumulative weight exceeds the draw: zero weights are never picked.
    picks = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    return picks.clamp_max_(weights.shape[1] - 1)


def _sample_random(
    logits: torch.Tensor, inputs: list[SamplingInput], default: torch.Generator
) -> torch.Tensor:
    probs = random_probs(logits, inputs)
    return draw_from(probs, [inp.generator for inp in inputs], default)


def random_probs(logits: torch.Tensor, inputs: list[SamplingInput]) -> torch.Tensor:
    """The distribution each random row samples from: temperature, top-k, top-p, min-p applied."""
    device = logits.device
    vocab = logits.shape[1]
    params = [inp.params for inp in inputs]

    def vector(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    logits = logits / vector([p.temperature for p in params]).unsqueeze(1)

    use_top_k = any(0 < p.top_k < vocab for p in params)
    use_top_p = any(p.top_p < 1.0 for p in params)
    if use_top_k or use_top_p:
        top_k = vector([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.long)
        # inf, not 1.0, for rows without top_p: float32 cumsum can exceed 1.0 before the tail.
        top_p = vector([p.top_p if p.top_p < 1.0 else math.inf for p in params])
        logits = _apply_top_k_top_p(
            logits, top_k if use_top_k else None, top_p if use_top_p else None
        )
    if any(p.min_p > 0.0 for p in params):
        logits = _apply_min_p(logits, vector([p.min_p for p in params]))
    return logits.softmax(dim=-1)


# ---------------------------------------------------------------------------
# Logprobs


def top_logprobs(
    logprobs: torch.Tensor, inputs: list[SamplingInput]
) -> list[list[tuple[int, float]] | None]:
    result: list[list[tuple[int, float]] | None] = [
        None if inp.params.logprobs is None else [] for inp in inputs
    ]
    rows = [i for i, inp in enumerate(inputs) if inp.params.logprobs]
    if not rows:
        return result
    k_max = min(max(inputs[i].params.logprobs for i in rows), logprobs.shape[1])
    row_idx = torch.tensor(rows, device=logprobs.device)
    values, ids = logprobs.index_select(0, row_idx).topk(k_max, dim=-1)
    values_l, ids_l = values.tolist(), ids.tolist()
    for j, i in enumerate(rows):
        k = min(inputs[i].params.logprobs, k_max)
        result[i] = list(zip(ids_l[j][:k], values_l[j][:k]))
    return result


# ---------------------------------------------------------------------------


def only_argmax(inputs: list[SamplingInput]) -> bool:
    """True when every row's token is its raw logits' argmax, unless its grammar forbids it, and
    nothing else is asked of them (no penalties, no min_tokens masking, no top logprobs): a greedy
    pass suffices, with constrained rows checked after (mask_greedy_picks)."""
    return all(inp.params.greedy and not inp.params.logprobs and not uses_penalties(inp.params)
               and not _below_min_tokens(inp) for inp in inputs)


def allows(row: np.ndarray, token: int) -> bool:
    """Whether a grammar's mask row allows the token."""
    return bool((int(row[token >> 5]) >> (token & 31)) & 1)


def mask_greedy_picks(logits: torch.Tensor, token_ids: list[int], logprobs: list[float],
                      inputs: list[SamplingInput]) -> None:
    """Greedy rows' picks (their raw argmax) made to follow their grammars: the few a grammar
    forbids become the argmax of what it allows, with that token's raw logprob (in place)."""
    rows = [i for i, inp in enumerate(inputs) if inp.allowed is not None and not allows(inp.allowed, token_ids[i])]
    if not rows:
        return
    raw = logits[rows].float()
    picks = apply_grammar(raw, raw, [inputs[i] for i in rows]).argmax(dim=-1)
    chosen = raw.log_softmax(dim=-1).gather(1, picks[:, None])[:, 0]
    for j, i in enumerate(rows):
        token_ids[i], logprobs[i] = int(picks[j]), float(chosen[j])


def greedy_output(token_ids: list[int], logprobs: list[float], inputs: list[SamplingInput]) -> "SamplerOutput":
    """The sampler's output for rows that only_argmax() passed: tokens and their logprobs."""
    return SamplerOutput(token_ids, logprobs, [None if inp.params.logprobs is None else [] for inp in inputs])


def _native_greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """argmax and its log-softmax in one native pass per row (CPU, library built), else None. A
    batch of 64 rows x 49152 took 2.7 ms in torch's argmax + log_softmax on the Zen 5 EPYC."""
    if logits.device.type != "cpu":
        return None
    from thrifty import native

    return torch.ops.thrifty.argmax_logprob(logits) if native.load() else None


class Sampler:
    def __init__(self, seed: int | None = None):
        self._seed = seed
        # One generator per device: a torch.Generator can only feed tensors on its own device.
        self._generators: dict[torch.device, torch.Generator] = {}

    def default_generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._seed)
            self._generators[device] = gen
        return gen

    def __call__(self, logits: torch.Tensor, inputs: list[SamplingInput]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(inputs):
            raise ValueError(f"logits shape {tuple(logits.shape)} does not match {len(inputs)} inputs")
        if not inputs:
            return SamplerOutput([], [], [])
        raw = logits.float()  # no copy for float32 input, so nothing below may write in place

        random_rows = [i for i, inp in enumerate(inputs) if not inp.params.greedy]
        if only_argmax(inputs):
            fast = _native_greedy(raw)
            if fast is not None:
                tokens, token_logprobs = fast[0].tolist(), fast[1].tolist()
                mask_greedy_picks(raw, tokens, token_logprobs, inputs)
                return greedy_output(tokens, token_logprobs, inputs)
        processed = process_logits(raw, inputs)  # (not before: the native pick needs none of it)
        if len(random_rows) == len(inputs):
            tokens = _sample_random(processed, inputs, self.default_generator(raw.device))
        else:
            tokens = processed.argmax(dim=-1)
            if random_rows:
                idx = torch.tensor(random_rows, device=raw.device)
                sampled = _sample_random(
                    processed.index_select(0, idx),
                    [inputs[i] for i in random_rows],
                    self.default_generator(raw.device),
                )
                tokens = tokens.index_copy(0, idx, sampled)

        # log_softmax is one fused kernel on CPU and CUDA, whereas torch.logsumexp runs several
        # passes, so gathering from it is the cheaper way to get the sampled token's logprob.
        logprobs = raw.log_softmax(dim=-1)
        token_logprobs = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        return SamplerOutput(
            token_ids=tokens.tolist(),
            logprobs=token_logprobs.tolist(),
            top_logprobs=top_logprobs(logprobs, inputs),
        )
