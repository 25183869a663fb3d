"""Attention over the paged KV cache, in plain torch (runs on CPU and CUDA).

Each layer's cache is a pair of tensors [num_blocks, block_size, num_kv_heads, head_dim].
A step's tokens are flat: the decode tokens (one per request) come first, then the tokens of
requests computing more than one (prefill chunks). The step writes its new K/V into their slots,
then:
- decodes: one batched call over the requests' gathered blocks, with a padding mask;
- prefills with nothing cached: over their own new K/V, one causal call per group of equal length;
- other prefill chunks: one call per request over its cached context, causal within the new tokens.
Masks and gather indices are built once per step (AttentionMetadata) and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from thrifty.layers.linear import widen_for_matmul


@dataclass
class PrefillSeq:
    """A request computing several tokens on top of ones already cached (a chunk or a prefix hit)."""

    query_start: int  # offset in the flat token batch
    query_len: int
    block_ids: torch.Tensor  # blocks covering the context [num_blocks_used]
    context_len: int  # tokens in the cache after this step, new ones included
    mask: torch.Tensor  # [query_len, context_len] bool: causal, offset by the cached tokens


@dataclass
class FreshPrefillGroup:
    """`num_seqs` requests with nothing cached and `query_len` new tokens each, adjacent in the
    batch: they attend over their own new K/V in one causal call, no cache read needed."""

    query_start: int
    num_seqs: int
    query_len: int


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] slot of each new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks]
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size] bool
    fresh_prefills: list[FreshPrefillGroup]
    prefills: list[PrefillSeq]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k.index_copy_(0, slot_mapping, k.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(flat_v.dtype))


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks -> [..., num_kv_heads, tokens, head_dim]: a request's context, contiguous per block.
    index_select over whole flattened blocks is a few times faster than advanced indexing."""
    nb, bs, h, d = cache.shape
    rows = cache.view(nb, bs * h * d).index_select(0, block_ids.reshape(-1))
    return rows.view(*block_ids.shape[:-1], block_ids.shape[-1] * bs, h, d).transpose(-3, -2)


def _sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), enable_gqa=True, **kw)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [num_tokens, Hq, D], k/v: this step's [num_tokens, Hkv, D] (already in the cache)."""
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if nd:
        kd = _gather(k_cache, meta.decode_block_tables)  # [B, Hkv, L, D]
        vd = _gather(v_cache, meta.decode_block_tables)
        qd = q[:nd].unsqueeze(2)
        if widen_for_matmul(qd):
            # Emulated bf16 makes one-token attention 3.6x slower than fp32 (64 requests x 256
            # tokens on the AVX2 EPYC); prefills keep bf16, where widening costs more than it saves.
            qd, kd, vd = qd.float(), kd.float(), vd.float()
        o = _sdpa(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale)
        out[:nd] = o.squeeze(2)
    for g in meta.fresh_prefills:
        start, end, n, L = g.query_start, g.query_start + g.num_seqs * g.query_len, g.num_seqs, g.query_len
        qf = q[start:end].view(n, L, *q.shape[1:]).transpose(1, 2)
        kf = k[start:end].view(n, L, *k.shape[1:]).transpose(1, 2)
        vf = v[start:end].view(n, L, *v.shape[1:]).transpose(1, 2)
        out[start:end] = _sdpa(qf, kf, vf, is_causal=True, scale=scale).transpose(1, 2).reshape(end - start, *q.shape[1:])
    for p in meta.prefills:
        kp = _gather(k_cache, p.block_ids)[:, : p.context_len]  # [Hkv, L, D]
        vp = _gather(v_cache, p.block_ids)[:, : p.context_len]
        qp = q[p.query_start: p.query_start + p.query_len].transpose(0, 1)  # [Hq, Lq, D]
        o = _sdpa(qp, kp, vp, attn_mask=p.mask, scale=scale)
        out[p.query_start: p.query_start + p.query_len] = o.transpose(0, 1)
    return out
