"""Verifying proposed tokens (speculative decoding) so the output is what the target gives alone.

A request that proposed k tokens d_1..d_k computes k + 1 positions in one step; row i's logits
are the target's distribution p_i after the request's tokens and d_1..d_i. Going along the rows
(Leviathan et al., arXiv 2211.17192, with a one-hot proposal q = [d_i] as n-gram proposals are):
- greedy: d_i is accepted while it is argmax p_i; the first mismatch yields argmax p_i instead;
- random: d_i is accepted with probability min(1, p_i(d_i) / q(d_i)) = p_i(d_i); on rejection
  the token is drawn from the residual max(p_i - q, 0), i.e. p_i without d_i, renormalized.
  Each emitted token is then distributed exactly as p_i.
If all k are accepted, a bonus token is drawn from p_{k+1}. Each row is processed as the sampler
would process it at that position (penalties and min_tokens see the accepted tokens before it,
a grammar masks what it allows after them: a proposal it does not allow has p_i(d_i) = 0),
and a seeded request draws from its own generator, so its output is reproducible.
"""

from __future__ import annotations

import torch

from thrifty.layers.sampler import (
    SamplerOutput,
    SamplingInput,
    draw_from,
    process_logits,
    random_probs,
    top_logprobs,
)


def verify(logits: torch.Tensor, inputs: list[SamplingInput], drafts: list[list[int]],
           default: torch.Generator) -> list[SamplerOutput]:
    """`logits` has len(d) + 1 rows per request (in order), `inputs` one per row (row i's
    output_token_ids include d_1..d_i). Returns each request's emitted tokens (1 to len(d) + 1)."""
    raw = logits.float()
    processed = process_logits(raw, inputs)
    logprobs = raw.log_softmax(dim=-1)
    results, row = [], 0
    for d in drafts:
        rows = slice(row, row + len(d) + 1)
        inp = inputs[row]
        if inp.params.greedy:
            targets = processed[rows].argmax(dim=-1).tolist()
            n = num_accepted_greedy(d, targets)
            tokens = d[:n] + [targets[n]]
        else:
            tokens = _verify_random(random_probs(processed[rows], inputs[rows]), d, inp.generator or default)
        chosen = torch.tensor(tokens, device=raw.device)
        mine = logprobs[row: row + len(tokens)]
        results.append(SamplerOutput(tokens, mine.gather(1, chosen[:, None])[:, 0].tolist(),
                                     top_logprobs(mine, inputs[row: row + len(tokens)])))
        row += len(d) + 1
    return results


def num_accepted_greedy(drafts: list[int], targets: list[int]) -> int:
    """How many proposals a greedy request keeps: while each is its row's argmax (`targets`,
    one per proposal and one more); it then emits targets[n]."""
    return next((i for i, t in enumerate(drafts) if t != targets[i]), len(drafts))


def _verify_random(probs: torch.Tensor, drafts: list[int], gen: torch.Generator) -> list[int]:
    accepted = []
    for i, d in enumerate(drafts):
        u = torch.rand((), generator=gen, device=probs.device)
        if u < probs[i, d]:
            accepted.append(d)
            continue
        residual = probs[i].clone()
        residual[d] = 0.0
        return accepted + [_draw(residual, gen)]
    return accepted + [_draw(probs[len(drafts)], gen)]


def _draw(p: torch.Tensor, gen: torch.Generator) -> int:
    """One token from the (unnormalized) weights p, as the sampler draws."""
    return int(draw_from(p[None], [gen], gen)[0])
