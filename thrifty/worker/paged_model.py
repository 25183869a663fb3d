"""PagedModel: one model's weights and its paged KV cache, run on a flat batch of tokens by either
backend:
- "native": the C++ kernels (csrc/cpu), the whole forward in one call (CPU);
- "torch": the pure-torch reference (thrifty/model/llama.py), on CPU or CUDA.

The target model has one; a draft model (speculative decoding) has its own, over the same block
ids. A self-draft runs the target's own, over its first layers only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from thrifty.layers.attention import AttentionMetadata, kv_cache_element_dtype, kv_cache_shapes
from thrifty.model.llama import LlamaForCausalLM

logger = logging.getLogger("thrifty")


@dataclass
class StepBatch:
    """One forward as one flat batch: sequences computing one token first, then the others."""

    input_ids: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: tokens cached after the step
    block_table: torch.Tensor  # [num_seqs, max_blocks] int32, padded with the null block
    logits_indices: torch.Tensor  # [num_rows] int64: rows whose logits are computed
    q_lens: list[int]
    seq_lens_list: list[int]

    @classmethod
    def build(cls, ids: list[int], q_lens: list[int], seq_lens: list[int], block_table: np.ndarray,
              logits_indices: list[int], block_size: int) -> StepBatch:
        """From the tokens, each sequence's new and cached-after counts, and the persistent block
        table's rows of the sequences (in order)."""
        max_blocks = -(-max(seq_lens) // block_size)
        return cls(input_ids=torch.from_numpy(np.array(ids, dtype=np.int64)),
                   query_start_loc=torch.from_numpy(np.cumsum([0] + q_lens, dtype=np.int32)),
                   seq_lens=torch.from_numpy(np.array(seq_lens, dtype=np.int32)),
                   block_table=torch.from_numpy(np.ascontiguousarray(block_table[:, :max_blocks])),
                   logits_indices=torch.from_numpy(np.array(logits_indices, dtype=np.int64)),
                   q_lens=q_lens, seq_lens_list=seq_lens)


def kv_bytes_per_token(model: LlamaForCausalLM, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    return model.config.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size(), kv_cache_dtype != "auto")


def resolve_backend(backend: str, model: LlamaForCausalLM, dtype: torch.dtype, device: torch.device,
                    block_size: int) -> str:
    """"native" where the kernels are built and take this model, else "torch" (said in the log)."""
    if backend == "torch" or (backend == "auto" and device.type != "cpu"):
        return "torch"
    from thrifty import native
    from thrifty.native.model import native_unsupported_reason

    reason = native_unsupported_reason(model, dtype, device, block_size)
    if reason is None and not native.load():
        reason = "the library is unavailable (see the log line above)"
    if reason is None:
        return "native"
    if backend == "native":
        raise ValueError(f"backend 'native' cannot run this model: {reason}")
    logger.warning("thrifty: the native CPU kernels do not run this model (%s); using the pure-torch path", reason)
    return "torch"


class PagedModel:
    def __init__(self, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype, block_size: int,
                 num_blocks: int, backend: str = "auto", kv_cache_dtype: str = "auto"):
        self.model = model
        self.device = device
        self.block_size = block_size
        self.kv_cache_dtype = kv_cache_dtype
        self.backend = resolve_backend(backend, model, dtype, device, block_size)
        self.dtype = dtype
        # One block more than the pool hands out: the null block pads block tables.
        self.num_cache_blocks = num_blocks + 1
        self.k_caches, self.v_caches = self._kv_caches(self.num_cache_blocks)
        if self.backend == "native":
            from thrifty.native.model import build_native_model

            self.native, self.weight_bytes = build_native_model(model, block_size, self.k_caches, self.v_caches,
                                                                kv_cache_dtype)
        else:
            self.native = None
            if model.quantized:
                # A documented fallback; a warning where the user asked for int8/int4 themselves.
                asked = any(w.kind in ("int8", "int4") for w in model.quantized.values())
                logger.log(logging.WARNING if asked else logging.INFO,
                           "thrifty: the %s backend has no quantized kernels: it computes with the %d quantized "
                           "matmuls' dequantized values (same results, no memory or time saved)",
                           self.backend, len(model.quantized))
                model.quantized = {}
            model.prepack()
            params = {id(p): p for p in model.parameters()}.values()  # a tied head counts once
            self.weight_bytes = sum(p.numel() * p.element_size() for p in params)

    def _kv_caches(self, num_blocks: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cfg = self.model.config
        k_shape, v_shape = kv_cache_shapes(num_blocks, cfg.num_key_value_heads, cfg.head_dim, self.block_size,
                                           self.dtype, self.kv_cache_dtype)
        # Zeroed, not empty: slots past a sequence's end are read (with zero weight) by the
        # reference attention, and 0 * NaN garbage would poison the output.
        cache_dtype = kv_cache_element_dtype(self.dtype, self.kv_cache_dtype)
        layers = range(cfg.num_hidden_layers)
        return ([torch.zeros(k_shape, dtype=cache_dtype, device=self.device) for _ in layers],
                [torch.zeros(v_shape, dtype=cache_dtype, device=self.device) for _ in layers])

    def release_kv_caches(self) -> None:
        """Sleep: drop the KV cache, and the native model's references to it (caches of no
        blocks) and its workspaces. The weights stay."""
        self.k_caches, self.v_caches = self._kv_caches(0)
        if self.native is not None:
            self.native.set_kv_caches(self.k_caches, self.v_caches, self.kv_cache_dtype)
            self.native.release_buffers()

    def restore_kv_caches(self) -> None:
        """Wake: a fresh (zeroed) KV cache of the size it had."""
        self.k_caches, self.v_caches = self._kv_caches(self.num_cache_blocks)
        if self.native is not None:
            self.native.set_kv_caches(self.k_caches, self.v_caches, self.kv_cache_dtype)

    def forward(self, batch: StepBatch, greedy: bool = False, layers: list[int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Writes the batch's K/V into the cache; returns the fp32 logits of the rows in
        `logits_indices` and, with `greedy` on the native backend, each row's argmax and its
        logprob (else None, None). `layers` runs only those (None: all)."""
        if self.backend == "native":
            logits, token_ids, logprobs = self.native.forward(
                batch.input_ids, batch.query_start_loc, batch.seq_lens, batch.block_table, batch.logits_indices,
                greedy, layers or [])
            return (logits, token_ids, logprobs) if greedy else (logits, None, None)
        dev = self.device
        positions = torch.cat([torch.arange(s - n, s) for n, s in zip(batch.q_lens, batch.seq_lens_list)]).to(dev)
        meta = AttentionMetadata.build(batch.q_lens, batch.seq_lens_list, batch.block_table.to(dev), positions,
                                       self.block_size, self.kv_cache_dtype)
        hidden = self.model(batch.input_ids.to(dev), positions, list(zip(self.k_caches, self.v_caches)), meta,
                            layers)
        return self.model.compute_logits(hidden[batch.logits_indices.to(dev)]), None, None
