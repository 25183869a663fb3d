"""ModelRunner: owns the weights and the KV cache; turns a SchedulerOutput into one flat batch,
runs the model and samples the next token of every request that caught up."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thrifty.core.kv_cache_manager import cdiv
from thrifty.core.scheduler import ScheduledRequest, SchedulerOutput
from thrifty.layers.attention import AttentionMetadata, FreshPrefillGroup, PrefillSeq
from thrifty.layers.sampler import Sampler, SamplingInput
from thrifty.model.llama import LlamaForCausalLM

GiB = 1 << 30


@dataclass
class SampledToken:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None


def num_kv_blocks(model: LlamaForCausalLM, dtype: torch.dtype, block_size: int, budget_bytes: int) -> int:
    per_block = model.config.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size()) * block_size
    return int(budget_bytes // per_block)


def kv_budget_bytes(device: torch.device, kv_cache_memory: float | None, utilization: float) -> int:
    if kv_cache_memory is not None:
        return int(kv_cache_memory * GiB)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # Leave (1 - utilization) of the card to others, and room for activations.
        return int(max(0, free - (1 - utilization) * total) * 0.9)
    return 2 * GiB


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype,
                 block_size: int, num_blocks: int, seed: int = 0):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        cfg = model.config
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        # Zeroed, not empty: padded slots of a block are read (with zero weight) by attention,
        # and 0 * NaN garbage would poison the output.
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_hidden_layers)
        ]
        self.sampler = Sampler(seed)
        self.generators: dict[str, torch.Generator] = {}

    # -- batch preparation ----------------------------------------------------------------
    def _prepare(self, scheduled: list[ScheduledRequest]):
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for s in scheduled:
            start = s.request.num_computed_tokens
            end = start + s.num_new_tokens
            if s.num_new_tokens == 1:
                ids.append(s.request.token_at(start))
            else:
                ids.extend(s.request.all_token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(s.block_ids[p // bs] * bs + p % bs for p in range(start, end))
        to = dict(device=self.device, dtype=torch.long)
        return torch.tensor(ids, **to), torch.tensor(positions, **to), torch.tensor(slots, **to)

    def _attention_metadata(self, decodes: list[ScheduledRequest], prefills: list[ScheduledRequest],
                            slot_mapping: torch.Tensor) -> AttentionMetadata:
        bs, dev = self.block_size, self.device
        block_tables = mask = None
        if decodes:
            ctx = [s.request.num_computed_tokens + 1 for s in decodes]
            max_blocks = cdiv(max(ctx), bs)
            table = [s.block_ids[:max_blocks] + [0] * (max_blocks - min(len(s.block_ids), max_blocks))
                     for s in decodes]
            block_tables = torch.tensor(table, dtype=torch.long, device=dev)
            lens = torch.tensor(ctx, device=dev)
            mask = (torch.arange(max_blocks * bs, device=dev)[None, :] < lens[:, None])[:, None, None, :]
        fresh, seqs = [], []
        start = len(decodes)
        for s in prefills:
            done = s.request.num_computed_tokens
            n = s.num_new_tokens
            if done == 0:
                last = fresh[-1] if fresh else None
                if last is not None and last.query_len == n and last.query_start + last.num_seqs * n == start:
                    last.num_seqs += 1
                else:
                    fresh.append(FreshPrefillGroup(start, 1, n))
            else:  # a cached prefix or an earlier chunk: causal, offset by `done`
                ctx = done + n
                q_pos = torch.arange(done, ctx, device=dev)[:, None]
                causal = torch.arange(ctx, device=dev)[None, :] <= q_pos
                blocks = torch.tensor(s.block_ids[: cdiv(ctx, bs)], dtype=torch.long, device=dev)
                seqs.append(PrefillSeq(start, n, blocks, ctx, causal))
            start += n
        return AttentionMetadata(slot_mapping, len(decodes), block_tables, mask, fresh, seqs)

    # -- the step -------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput) -> dict[str, SampledToken]:
        decodes = [s for s in out.scheduled if s.num_new_tokens == 1] + out.padding
        # Fresh prefills of equal length side by side, so they share one attention call.
        prefills = sorted((s for s in out.scheduled if s.num_new_tokens > 1),
                          key=lambda s: (s.request.num_computed_tokens > 0, s.num_new_tokens))
        batch = decodes + prefills
        input_ids, positions, slot_mapping = self._prepare(batch)
        meta = self._attention_metadata(decodes, prefills, slot_mapping)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)

        rows, sampling = [], []
        offset = 0
        for s in batch:
            offset += s.num_new_tokens
            if s.samples:
                rows.append(offset - 1)
                sampling.append(s)
        if not sampling:
            return {}
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        inputs = [SamplingInput(s.request.sampling_params, s.request.prompt_token_ids,
                                s.request.output_token_ids, self._generator(s.request)) for s in sampling]
        result = self.sampler(logits, inputs)
        return {
            s.request.request_id: SampledToken(result.token_ids[i], result.logprobs[i], result.top_logprobs[i])
            for i, s in enumerate(sampling)
        }

    def _generator(self, request) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None:
            return None
        gen = self.generators.get(request.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self.generators[request.request_id] = gen
        return gen

    def free_request(self, request_id: str) -> None:
        self.generators.pop(request_id, None)
