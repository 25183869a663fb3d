"""Drafter: proposals from a model, made inside the step that verifies them.

The scheduler reserves k slots after a speculating request's last token (its proposals are
DRAFT_PENDING until the step runs), so the draft can write its KV there: from the last token x
at position p it decodes k times, writing positions p .. p + k - 1, and its k picks are the
proposals the target computes at p + 1 .. p + k in the same step.

Two kinds:
- layer_skip (a self-draft): the target's first N layers and its head, over the target's own KV
  cache. The target computed every position before p with those same layers, so there is nothing
  to catch up on; the target's pass of the step then rewrites p .. p + k - 1 itself.
- draft_model: a smaller model with its own KV cache, over the same block ids. Before decoding it
  catches up on the positions it has not computed: the prompt, the tokens of steps that did not
  speculate, and the positions of the last round whose proposal was rejected (found by comparing
  what it fed with what was kept).

Proposals are the draft's argmax: a proposal that is a function of the context keeps the
target's distribution under the rejection sampler (thrifty/layers/rejection_sampler.py), so
sampled requests are served exactly too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from thrifty.worker.paged_model import PagedModel, StepBatch

if TYPE_CHECKING:
    from thrifty.worker.model_runner import CachedRequestState


@dataclass
class DraftTimes:
    """What the last propose() took: all of it, and its decoding forwards (the rest caught up)."""

    seconds: float = 0.0
    decode_seconds: float = 0.0
    forwards: int = 0


class Drafter:
    def __init__(self, model: PagedModel, layers: list[int] | None, max_batched_tokens: int):
        self.model = model
        self.layers = layers  # layer_skip: the target's layers that draft; None: the draft model's all
        self.own_cache = layers is None
        self.max_batched_tokens = max_batched_tokens  # the catch-up's tokens per forward
        self._computed: dict[str, int] = {}  # draft_model: positions with the draft's KV, per request
        self._fed: dict[str, tuple[int, list[int]]] = {}  # draft_model: last round's first position and tokens
        self.last = DraftTimes()

    def forget(self, req_id: str) -> None:
        self._computed.pop(req_id, None)
        self._fed.pop(req_id, None)

    def propose(self, requests: list[tuple[CachedRequestState, int]], block_table: np.ndarray
                ) -> dict[str, list[int]]:
        """k proposals for each (request, k); each request's last token is its only one
        without KV (its position is its num_computed_tokens)."""
        start = time.perf_counter()
        if self.own_cache:
            self._catch_up([s for s, _ in requests], block_table)
        decode_start = time.perf_counter()
        last = {s.req_id: s.token_at(s.num_computed_tokens) for s, _ in requests}
        drafts: dict[str, list[int]] = {s.req_id: [] for s, _ in requests}
        bs = self.model.block_size
        forwards = max(k for _, k in requests)
        for j in range(forwards):
            active = [s for s, k in requests if k > j]
            n = len(active)
            ids = [drafts[s.req_id][-1] if j else last[s.req_id] for s in active]
            seq_lens = [s.num_computed_tokens + j + 1 for s in active]
            batch = StepBatch.build(ids, [1] * n, seq_lens, block_table[[s.row for s in active]], list(range(n)), bs)
            logits, token_ids, _ = self.model.forward(batch, greedy=True, layers=self.layers)
            picks = (token_ids[:n] if token_ids is not None else logits.argmax(dim=-1)).tolist()
            for s, t in zip(active, picks):
                drafts[s.req_id].append(t)
        if self.own_cache:
            for s, k in requests:
                p = s.num_computed_tokens
                self._computed[s.req_id] = p
                self._fed[s.req_id] = (p, [last[s.req_id]] + drafts[s.req_id][:k - 1])
        end = time.perf_counter()
        self.last = DraftTimes(end - start, end - decode_start, forwards)
        return drafts

    def tokens_behind(self, positions: dict[str, int]) -> int:
        """About how many tokens the draft would catch up on before proposing for these
        requests (request id -> num_computed_tokens): those past what it computed, counting
        the last round's positions as kept (the accepted ones are those it fed)."""
        if not self.own_cache:
            return 0
        behind = 0
        for rid, n in positions.items():
            computed = self._computed.get(rid, 0)
            fed = self._fed.get(rid)
            if fed is not None:
                computed = max(computed, fed[0] + len(fed[1]))
            behind += max(0, n - computed)
        return behind

    def _valid_prefix(self, s: CachedRequestState) -> int:
        """Positions whose draft KV holds the request's own tokens: all it computed, plus those of
        the last round's that were kept."""
        computed = self._computed.get(s.req_id, 0)
        fed = self._fed.pop(s.req_id, None)
        if fed is not None:
            start, tokens = fed
            kept = s.tokens(start, min(start + len(tokens), s.num_tokens))
            m = 0
            while m < len(kept) and kept[m] == tokens[m]:
                m += 1
            computed = start + m
        return min(computed, s.num_computed_tokens)

    def _catch_up(self, states: list[CachedRequestState], block_table: np.ndarray) -> None:
        """The draft's KV for every position before each request's last token, a bounded number
        of tokens per forward (these compute no logits)."""
        todo = {s.req_id: [s, self._valid_prefix(s)] for s in states}
        todo = {rid: v for rid, v in todo.items() if v[1] < v[0].num_computed_tokens}
        while todo:
            budget = self.max_batched_tokens
            chunk: list[tuple[CachedRequestState, int, int]] = []  # state, first position, count
            for s, start in todo.values():
                n = min(s.num_computed_tokens - start, budget)
                if n <= 0:
                    break
                chunk.append((s, start, n))
                budget -= n
            chunk.sort(key=lambda c: c[2] > 1)  # one-token sequences first
            ids: list[int] = []
            for s, start, n in chunk:
                ids.extend(s.tokens(start, start + n))
            batch = StepBatch.build(ids, [n for _, _, n in chunk], [start + n for _, start, n in chunk],
                                    block_table[[s.row for s, _, _ in chunk]], [], self.model.block_size)
            self.model.forward(batch)
            for s, start, n in chunk:
                todo[s.req_id][1] = start + n
                if start + n == s.num_computed_tokens:
                    del todo[s.req_id]
