"""ModelRunner: owns the model over its KV cache (paged_model.py: the native or the torch
backend) and a drafter if it speculates; keeps each request's state between steps (tokens,
block-table row, sampling generator) and updates it from what each SchedulerOutput says changed;
turns the step into one flat batch, runs the model, samples.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from thrifty.core.kv_cache_manager import cdiv
from thrifty.core.request import DRAFT_PENDING
from thrifty.core.scheduler import SchedulerOutput
from thrifty.layers.rejection_sampler import num_accepted_greedy, verify
from thrifty.layers.sampler import (Sampler, SamplerOutput, SamplingInput, greedy_output, mask_greedy_picks,
                                    only_argmax)
from thrifty.machine import proc_kib_bytes
from thrifty.model.llama import LlamaForCausalLM
from thrifty.sampling_params import SamplingParams
from thrifty.structured_output import ConstrainedRows, StructuredOutputManager
from thrifty.worker.drafter import Drafter, DraftTimes
from thrifty.worker.paged_model import PagedModel, StepBatch, kv_bytes_per_token

GiB = 1 << 30


@dataclass
class SampledToken:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None


PROMPT_LOGPROB_ROWS = 256  # rows of logits turned into prompt logprobs at a time


@dataclass
class PromptRows:
    """A step's rows whose logits predict prompt tokens: positions [start, start + count) of a
    request asking for prompt logprobs, at flat rows [first_row, first_row + count)."""

    state: CachedRequestState
    start: int
    first_row: int
    count: int


@dataclass
class CachedRequestState:
    """What the runner keeps of a request between steps."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    row: int  # the request's row in the persistent block table
    num_blocks: int
    num_computed_tokens: int

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def tokens(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]


def num_kv_blocks(bytes_per_token: int, block_size: int, budget_bytes: int) -> int:
    return int(budget_bytes // (bytes_per_token * block_size))


def available_host_bytes() -> int | None:
    """Memory the kernel says can still be had without swapping (MemAvailable), if it says."""
    return proc_kib_bytes("/proc/meminfo", "MemAvailable")


def kv_budget_bytes(device: torch.device, kv_cache_memory: float | None, utilization: float) -> int:
    if kv_cache_memory is not None:
        budget = int(kv_cache_memory * GiB)
        available = available_host_bytes() if device.type == "cpu" else None
        # Over-committed memory is handed out and then killed for when the cache is touched:
        # say so before, not with a SIGKILL.
        if available is not None and budget > available:
            raise ValueError(f"kv_cache_memory is {kv_cache_memory:.4g} GiB but this machine has "
                             f"{available / GiB:.4g} GiB available (kv_cache_memory is in GiB)")
        return budget
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # Leave (1 - utilization) of the card to others, and room for activations.
        return int(max(0, free - (1 - utilization) * total) * 0.9)
    return 2 * GiB


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype, block_size: int,
                 num_blocks: int, max_model_len: int, max_num_reqs: int, seed: int = 0, backend: str = "auto",
                 kv_cache_dtype: str = "auto", draft_model: LlamaForCausalLM | None = None,
                 draft_layers: list[int] | None = None, max_batched_tokens: int = 8192,
                 structured: StructuredOutputManager | None = None):
        """`draft_model` (its own KV cache) or `draft_layers` (some of the target's layers) make
        the proposals of speculative decoding left pending by the scheduler (see drafter.py).
        `structured` holds the grammars of requests with structured_outputs."""
        self.model = model
        self.device = device
        self.block_size = block_size
        # One block more than the pool hands out: the null block pads block tables.
        self.null_block = num_blocks
        self.paged = PagedModel(model, device, dtype, block_size, num_blocks, backend, kv_cache_dtype)
        self.backend = self.paged.backend
        self.kv_bytes_per_token = kv_bytes_per_token(model, dtype, kv_cache_dtype)
        self.weight_bytes = self.paged.weight_bytes
        self.drafter: Drafter | None = None
        if draft_layers is not None:
            self.drafter = Drafter(self.paged, draft_layers, max_batched_tokens)
        elif draft_model is not None:
            draft = PagedModel(draft_model, device, dtype, block_size, num_blocks, backend, kv_cache_dtype)
            self.drafter = Drafter(draft, None, max_batched_tokens)
            self.kv_bytes_per_token += kv_bytes_per_token(draft_model, dtype, kv_cache_dtype)
            self.weight_bytes += draft.weight_bytes
        # Block tables of every request the runner holds, one row each, updated as blocks come.
        # The step's small host arrays are numpy: torch.tensor costs several times more per call
        # at this size, and a batch-1 step makes a handful of them.
        self.block_table = np.full((max_num_reqs, cdiv(max_model_len, block_size)), self.null_block, dtype=np.int32)
        self.free_rows = list(range(max_num_reqs - 1, -1, -1))
        self.requests: dict[str, CachedRequestState] = {}
        self.sampler = Sampler(seed)
        # Seeded requests' generators outlive a preemption: a resumed request goes on sampling
        # from where its stream was, so its output does not depend on being preempted.
        self.generators: dict[str, torch.Generator] = {}
        self.prompt_logprobs: dict[str, list] = {}  # the last step's, see execute
        # Like the generators, a request's grammar state outlives a preemption.
        self.structured = structured

    # -- sleep mode ---------------------------------------------------------------------------
    def _paged_models(self) -> list[PagedModel]:
        """The models with a KV cache of their own: the target, and a draft model's."""
        own = self.drafter is not None and self.drafter.own_cache
        return [self.paged, self.drafter.model] if own else [self.paged]

    def sleep(self) -> None:
        """Level 1: frees the KV caches; on CUDA the weights also move to host memory (on a CPU
        they already are host memory, and stay). Only with no request in flight."""
        for paged in self._paged_models():
            paged.release_kv_caches()
            if self.device.type == "cuda":
                paged.model.to("cpu")

    def wake_up(self) -> None:
        for paged in self._paged_models():
            if self.device.type == "cuda":
                paged.model.to(self.device)
            paged.restore_kv_caches()

    # -- request states ---------------------------------------------------------------------
    def _update_states(self, out: SchedulerOutput) -> None:
        for req_id in out.finished_req_ids:
            self._remove(req_id)
            self.generators.pop(req_id, None)
            if self.structured is not None:
                self.structured.finish(req_id)
        for req_id in out.preempted_req_ids:
            self._remove(req_id)
        for new in out.scheduled_new_reqs:
            self._remove(new.req_id)
            row = self._take_row()
            self.block_table[row] = self.null_block
            self.block_table[row, : len(new.block_ids)] = new.block_ids
            self.requests[new.req_id] = CachedRequestState(
                new.req_id, new.prompt_token_ids, list(new.output_token_ids), new.sampling_params, row,
                len(new.block_ids), new.num_computed_tokens)
            seed = new.sampling_params.seed
            if seed is not None and new.req_id not in self.generators:
                self.generators[new.req_id] = torch.Generator(device=self.device).manual_seed(seed)
            if new.sampling_params.structured_outputs is not None:
                self.structured.start(new.req_id, new.sampling_params.structured_outputs, new.output_token_ids)
        for cached in out.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            state.num_computed_tokens = cached.num_computed_tokens
            if cached.new_block_ids:
                n = state.num_blocks
                self.block_table[state.row, n: n + len(cached.new_block_ids)] = cached.new_block_ids
                state.num_blocks += len(cached.new_block_ids)

    def _take_row(self) -> int:
        if not self.free_rows:  # more requests at once than max_num_seqs (padding rows): grow
            old = self.block_table.shape[0]
            self.block_table = np.concatenate([self.block_table, np.full_like(self.block_table, self.null_block)])
            self.free_rows = list(range(2 * old - 1, old - 1, -1))
        return self.free_rows.pop()

    def _remove(self, req_id: str) -> None:
        state = self.requests.pop(req_id, None)
        if state is not None:
            self.free_rows.append(state.row)
        if self.drafter is not None:
            self.drafter.forget(req_id)

    # -- the step -----------------------------------------------------------------------------
    def _proposals(self, out: SchedulerOutput) -> dict[str, list[int]]:
        """The step's proposals by request: the scheduler's, with the pending ones drafted now."""
        spec = out.scheduled_spec_decode_tokens
        if self.drafter is not None:
            self.drafter.last = DraftTimes()
        pending = [(self.requests[rid], len(d)) for rid, d in spec.items() if d and d[0] == DRAFT_PENDING]
        if not pending:
            return spec
        return {**spec, **self.drafter.propose(pending, self.block_table)}

    def _prepare(self, out: SchedulerOutput, spec: dict[str, list[int]]
                 ) -> tuple[StepBatch, list[tuple[CachedRequestState, list[int]]], list[PromptRows]]:
        """The flat batch, the requests that sample (with the proposals each verifies: one
        logits row per proposal, plus one), and the rows that predict prompt tokens."""
        seqs: list[tuple[CachedRequestState, int, int]] = []  # state, first position, new tokens
        for req_id, n in out.num_scheduled_tokens.items():
            state = self.requests[req_id]
            seqs.append((state, state.num_computed_tokens, n))
        for req_id in out.padding_req_ids:  # a finished static member recomputes its last position
            state = self.requests[req_id]
            seqs.append((state, state.num_tokens - 1, 1))
        # One-token sequences first; fresh prefills of equal length side by side (the torch
        # path runs them as one attention call).
        seqs.sort(key=lambda s: (s[2] > 1, s[1] > 0, s[2]))
        ids: list[int] = []
        q_lens, seq_lens, rows, logits_indices = [], [], [], []
        sampled: list[tuple[CachedRequestState, list[int]]] = []
        prompt_rows: list[PromptRows] = []  # their logits go after the sampled rows'
        padding = set(out.padding_req_ids)
        for state, start, n in seqs:
            first_row = len(ids)
            drafts = spec.get(state.req_id, [])
            n_real = n - len(drafts)
            ids.extend([state.token_at(start)] if n_real == 1 else state.tokens(start, start + n_real))
            ids.extend(drafts)
            q_lens.append(n)
            seq_lens.append(start + n)
            rows.append(state.row)
            if start + n_real == state.num_tokens and state.req_id not in padding:
                logits_indices.extend(range(len(ids) - len(drafts) - 1, len(ids)))
                sampled.append((state, drafts))
            # Position p's logits predict prompt token p + 1 (the last one's, the first output).
            end = min(start + n, len(state.prompt_token_ids) - 1)
            if state.sampling_params.prompt_logprobs is not None and start < end:
                prompt_rows.append(PromptRows(state, start, first_row, end - start))
        logits_indices += [r.first_row + i for r in prompt_rows for i in range(r.count)]
        batch = StepBatch.build(ids, q_lens, seq_lens, self.block_table[rows], logits_indices, self.block_size)
        return batch, sampled, prompt_rows

    def _forward_and_sample(self, batch: StepBatch, inputs: list[SamplingInput],
                            drafts: list[list[int]]) -> tuple[list[SamplerOutput], torch.Tensor]:
        """Each sampling request's tokens (one, or 1 to k + 1 when it verifies k proposals), and
        the logits of the rows after the sampling ones (prompt logprobs). `inputs` has a row per
        logits row of the sampling requests, in order."""
        n = len(inputs)
        # When every row only needs its argmax, the native forward itself picks it, with no
        # second pass (and a step that samples no row asks for no pick).
        logits, token_ids, logprobs = self.paged.forward(batch, greedy=bool(inputs) and only_argmax(inputs))
        if token_ids is not None:
            picks, pick_logprobs = token_ids[:n].tolist(), logprobs[:n].tolist()
            mask_greedy_picks(logits[:n], picks, pick_logprobs, inputs)
            return _accept_argmax(picks, pick_logprobs, inputs, drafts), logits[n:]
        if not any(drafts):
            whole = self.sampler(logits[:n], inputs)
            return [SamplerOutput([t], [lp], [top]) for t, lp, top in
                    zip(whole.token_ids, whole.logprobs, whole.top_logprobs)], logits[n:]
        return verify(logits[:n], inputs, drafts, self.sampler.default_generator(logits.device)), logits[n:]

    def _prompt_logprobs(self, prompt_rows: list[PromptRows], logits: torch.Tensor) -> dict[str, list]:
        """Per request, (position, token, logprob, rank, top logprobs) of the prompt tokens this
        step predicted; a few hundred rows at a time, so the temporaries stay small."""
        result: dict[str, list] = {}
        row = 0
        for r in prompt_rows:
            k = min(r.state.sampling_params.prompt_logprobs, logits.shape[-1])  # as the sampler caps logprobs
            for first in range(0, r.count, PROMPT_LOGPROB_ROWS):
                n = min(PROMPT_LOGPROB_ROWS, r.count - first)
                logprobs = torch.log_softmax(logits[row + first: row + first + n].float(), dim=-1)
                start = r.start + 1 + first  # the first predicted position
                targets = torch.tensor(r.state.prompt_token_ids[start: start + n])
                chosen = logprobs.gather(1, targets[:, None])
                ranks = ((logprobs > chosen).sum(dim=1) + 1).tolist()
                chosen = chosen[:, 0].tolist()
                top = torch.topk(logprobs, k, dim=-1) if k else None
                result.setdefault(r.state.req_id, []).extend(
                    (start + i, int(targets[i]), chosen[i], ranks[i],
                     list(zip(top.indices[i].tolist(), top.values[i].tolist())) if top is not None else None)
                    for i in range(n))
            row += r.count
        return result

    def time_forward(self, batch_size: int, q: int, context: int, draft: bool = False, logits: bool = True,
                     repeats: int = 3) -> float | None:
        """The median seconds of a forward of batch_size sequences computing q tokens each after
        `context` cached ones (the draft's, with `draft`; each token's greedy pick, or with
        logits=False none, as a draft catching up), on scratch KV blocks: for the cost-aware
        switch's table, before any request runs (None if the blocks do not hold it)."""
        per_seq = cdiv(context + q, self.block_size)
        if batch_size * per_seq > self.null_block:
            return None
        paged, layers = (self.drafter.model, self.drafter.layers) if draft else (self.paged, None)
        table = np.arange(batch_size * per_seq, dtype=np.int32).reshape(batch_size, per_seq)
        n = batch_size * q
        batch = StepBatch.build([int(t) for t in np.random.default_rng(0).integers(0, self.model.config.vocab_size, n)],
                                [q] * batch_size, [context + q] * batch_size, table,
                                list(range(n)) if logits else [], self.block_size)
        times = []
        for _ in range(repeats + 1):  # the first warms up
            start = time.perf_counter()
            paged.forward(batch, greedy=logits, layers=layers)
            if self.device.type == "cuda":  # (the kernels run after the call returns)
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    def execute(self, out: SchedulerOutput) -> dict[str, list[SampledToken]]:
        """Runs the step; returns each sampling request's tokens. The prompt logprobs the step
        computed are left in `self.prompt_logprobs` (request id -> entries) for the engine."""
        self._update_states(out)
        batch, sampled, prompt_rows = self._prepare(out, self._proposals(out))
        inputs = []
        for s, drafts in sampled:  # a proposal's row samples as if the proposals before it were output
            generator = self.generators.get(s.req_id)
            inputs.append(SamplingInput(s.sampling_params, s.prompt_token_ids, s.output_token_ids, generator))
            inputs += [SamplingInput(s.sampling_params, s.prompt_token_ids, s.output_token_ids + drafts[:i + 1],
                                     generator) for i in range(len(drafts))]
        constrained = self._grammar_masks(sampled, inputs)
        results, prompt_logits = self._forward_and_sample(batch, inputs, [d for _, d in sampled])
        self.prompt_logprobs = self._prompt_logprobs(prompt_rows, prompt_logits) if prompt_rows else {}
        tokens = {}
        for (state, _), result in zip(sampled, results):
            if state.req_id in constrained:
                self.structured.accept(state.req_id, result.token_ids)
            state.output_token_ids.extend(result.token_ids)
            tokens[state.req_id] = [SampledToken(t, lp, top) for t, lp, top in
                                    zip(result.token_ids, result.logprobs, result.top_logprobs)]
        return tokens

    def _grammar_masks(self, sampled: list[tuple[CachedRequestState, list[int]]],
                       inputs: list[SamplingInput]) -> set[str]:
        """Gives the rows of constrained requests their grammar's mask; returns those requests."""
        if self.structured is None or not self.structured.matchers:
            return set()
        rows, first_row = [], 0
        for state, drafts in sampled:
            if state.req_id in self.structured.matchers:
                rows.append(ConstrainedRows(state.req_id, first_row, drafts))
            first_row += len(drafts) + 1
        if rows:
            mask = self.structured.bitmask(rows, len(inputs))
            for r in rows:
                for i in range(r.first_row, r.first_row + len(r.drafts) + 1):
                    inputs[i].allowed = mask[i]
        return {r.req_id for r in rows}


def _accept_argmax(token_ids: list[int], logprobs: list[float], inputs: list[SamplingInput],
                   drafts: list[list[int]]) -> list[SamplerOutput]:
    """Greedy rows' tokens from the forward's own argmax: each proposal is accepted while it is
    the argmax of its row, then the argmax of the first row it is not (rejection_sampler.py)."""
    results, row = [], 0
    for d in drafts:
        n = num_accepted_greedy(d, token_ids[row: row + len(d) + 1])
        results.append(greedy_output(d[:n] + [token_ids[row + n]], logprobs[row: row + n + 1],
                                     inputs[row: row + n + 1]))
        row += len(d) + 1
    return results
