"""Attention over the paged KV cache, in plain torch (runs on CPU and CUDA).

Each layer's cache is a pair of tensors [num_blocks, block_size, num_kv_heads, head_dim].
A step's tokens are flat: the decode tokens (one per request) come first, then the tokens of
requests computing more than one (prefill chunks). The step writes its new K/V into their slots,
then:
- decodes: one batched call over the requests' gathered blocks, with a padding mask;
- prefills: one call per request over its context, causal within the new tokens.
Masks and gather indices are built once per step (AttentionMetadata) and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSeq:
    query_start: int  # offset in the flat token batch
    query_len: int
    block_ids: torch.Tensor  # blocks covering the context [num_blocks_used]
    context_len: int  # tokens in the cache after this step, new ones included
    mask: torch.Tensor | None  # [query_len, context_len] bool; None = plain causal (no cached prefix)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] slot of each new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks]
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size] bool
    prefills: list[PrefillSeq]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k.index_copy_(0, slot_mapping, k.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(flat_v.dtype))


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks -> [..., num_kv_heads, tokens, head_dim] contiguous run of a request's context."""
    blocks = cache[block_ids]  # [..., nb, bs, H, D]
    shape = blocks.shape
    return blocks.reshape(*shape[:-4], shape[-4] * shape[-3], shape[-2], shape[-1]).transpose(-3, -2)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [num_tokens, Hq, D] -> [num_tokens, Hq, D]."""
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if nd:
        k = _gather(k_cache, meta.decode_block_tables).to(q.dtype)  # [B, Hkv, L, D]
        v = _gather(v_cache, meta.decode_block_tables).to(q.dtype)
        qd = q[:nd].unsqueeze(2)  # [B, Hq, 1, D]
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True)
        out[:nd] = o.squeeze(2)
    for p in meta.prefills:
        k = _gather(k_cache, p.block_ids)[:, : p.context_len].to(q.dtype)  # [Hkv, L, D]
        v = _gather(v_cache, p.block_ids)[:, : p.context_len].to(q.dtype)
        qp = q[p.query_start: p.query_start + p.query_len].transpose(0, 1)  # [Hq, Lq, D]
        o = F.scaled_dot_product_attention(
            qp, k, v, attn_mask=p.mask, is_causal=p.mask is None, scale=scale, enable_gqa=True
        )
        out[p.query_start: p.query_start + p.query_len] = o.transpose(0, 1)
    return out
