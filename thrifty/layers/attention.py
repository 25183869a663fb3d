"""Attention over the paged KV cache in plain torch: the reference path (and the CUDA path).

The cache layout is the native kernels' (csrc/cpu/attention.h), so either path can run over the
same cache. Per layer (kv_cache_shapes):
- fp32 K: [num_blocks, num_kv_heads, head_dim, block_size]  (each block's keys transposed)
       V: [num_blocks, num_kv_heads, block_size, head_dim]
- bf16 K: [num_blocks, num_kv_heads, head_dim / 2, block_size, 2]  (dimension pairs per key)
       V: [num_blocks, num_kv_heads, block_size / 2, head_dim, 2]  (key pairs per dimension)
- quantized (kv_cache_dtype int8 or fp8_e4m3), K and V: [num_blocks, num_kv_heads,
  (head_dim + 4) * block_size] uint8: the fp32 layout's elements as one-byte codes, then one fp32
  scale per key (element = code * scale; the scale maps the head's largest |element| to the
  code's largest value, 127 or 448). Attention reads the dequantized values.
The runner reserves one extra block, the null block, that pads block tables and is never handed
out. A step's tokens are flat: the sequences computing one token (decodes) come first, then the
ones computing several (prefill chunks). The step writes its new K/V into their slots, then:
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
    block_size: int = 16
    kv_cache_dtype: str = "auto"

    @classmethod
    def build(cls, q_lens: list[int], seq_lens: list[int], block_table: torch.Tensor, positions: torch.Tensor,
              block_size: int, kv_cache_dtype: str = "auto") -> AttentionMetadata:
        """From a step's sequences (decodes first): new tokens, tokens cached after the step, and
        their block-table rows (padded with the null block)."""
        dev = block_table.device
        bs = block_size
        seq_of_token = torch.repeat_interleave(torch.arange(len(q_lens), device=dev),
                                               torch.tensor(q_lens, device=dev))
        slot_mapping = block_table[seq_of_token, positions // bs].long() * bs + positions % bs
        nd = 0
        while nd < len(q_lens) and q_lens[nd] == 1:
            nd += 1
        block_tables = mask = None
        if nd:
            max_blocks = -(-max(seq_lens[:nd]) // bs)
            block_tables = block_table[:nd, :max_blocks].long()
            lens = torch.tensor(seq_lens[:nd], device=dev)
            mask = (torch.arange(max_blocks * bs, device=dev)[None, :] < lens[:, None])[:, None, None, :]
        fresh: list[FreshPrefillGroup] = []
        seqs: list[PrefillSeq] = []
        start = nd
        for i in range(nd, len(q_lens)):
            n, ctx = q_lens[i], seq_lens[i]
            if n == ctx:
                last = fresh[-1] if fresh else None
                if last is not None and last.query_len == n and last.query_start + last.num_seqs * n == start:
                    last.num_seqs += 1
                else:
                    fresh.append(FreshPrefillGroup(start, 1, n))
            else:  # a cached prefix or an earlier chunk: causal, offset by the cached tokens
                q_pos = torch.arange(ctx - n, ctx, device=dev)[:, None]
                causal = torch.arange(ctx, device=dev)[None, :] <= q_pos
                seqs.append(PrefillSeq(start, n, block_table[i, : -(-ctx // bs)].long(), ctx, causal))
            start += n
        return cls(slot_mapping, nd, block_tables, mask, fresh, seqs, block_size, kv_cache_dtype)


# Quantized caches: the torch dtype of the codes and their largest value.
_KV_CODES = {"int8": (torch.int8, 127.0), "fp8_e4m3": (torch.float8_e4m3fn, 448.0)}


def kv_cache_shapes(num_blocks: int, num_kv_heads: int, head_dim: int, block_size: int,
                    dtype: torch.dtype, kv_cache_dtype: str = "auto") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of one layer's K and V caches (the layout above)."""
    if kv_cache_dtype != "auto":
        shape = (num_blocks, num_kv_heads, (head_dim + 4) * block_size)
        return shape, shape
    if dtype == torch.bfloat16:
        return ((num_blocks, num_kv_heads, head_dim // 2, block_size, 2),
                (num_blocks, num_kv_heads, block_size // 2, head_dim, 2))
    return (num_blocks, num_kv_heads, head_dim, block_size), (num_blocks, num_kv_heads, block_size, head_dim)


def kv_cache_element_dtype(dtype: torch.dtype, kv_cache_dtype: str) -> torch.dtype:
    return torch.uint8 if kv_cache_dtype != "auto" else dtype


def quantize_kv(x: torch.Tensor, kv_cache_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] as uint8 codes [..., D] and fp32 scales [...], rounded as the native kernels
    round them (csrc/cpu/attention.cpp, encode_head)."""
    code_dtype, largest = _KV_CODES[kv_cache_dtype]
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    inv = torch.where(amax > 0, largest / torch.where(amax > 0, amax, 1), 0)
    scaled = xf * inv[..., None]
    codes = scaled.clamp(-largest, largest).round().to(code_dtype) if code_dtype == torch.int8 else \
        scaled.to(code_dtype)
    return codes.view(torch.uint8), amax / largest


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor, kv_cache_dtype: str) -> torch.Tensor:
    return codes.view(_KV_CODES[kv_cache_dtype][0]).float() * scales[..., None]


def _quantized_views(cache: torch.Tensor, block_size: int | None, keys_first: bool):
    """A quantized cache's codes as the fp32 layout's [blocks, H, D, bs] (K, keys_first False)
    or [blocks, H, bs, D] (V), and its scales [blocks, H, bs] (views: writes go to the cache)."""
    if block_size is None or cache.dim() != 3 or cache.shape[-1] % block_size:
        raise ValueError(f"a quantized KV cache [blocks, kv_heads, (head_dim + 4) x block_size] needs its block_size, "
                         f"got shape {tuple(cache.shape)} and block_size {block_size}")
    head_dim = cache.shape[-1] // block_size - 4
    codes = cache[..., : head_dim * block_size]
    codes = codes.unflatten(-1, (block_size, head_dim) if keys_first else (head_dim, block_size))
    return codes, cache[..., head_dim * block_size:].view(torch.float32)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, block_size: int | None = None, kv_cache_dtype: str = "auto") -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim] into their slots (block_size: a quantized
    cache's; the others' is in their shape)."""
    if kv_cache_dtype != "auto":
        views = [(_quantized_views(k_cache, block_size, False), k, False),
                 (_quantized_views(v_cache, block_size, True), v, True)]
        blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
        for (codes, scales), x, keys_first in views:
            x_codes, x_scales = quantize_kv(x, kv_cache_dtype)
            if keys_first:
                codes[blocks, :, offsets] = x_codes
            else:
                codes[blocks, :, :, offsets] = x_codes
            scales[blocks, :, offsets] = x_scales
        return
    bs = k_cache.shape[3]
    blocks, offsets = slot_mapping // bs, slot_mapping % bs
    k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    if k_cache.dim() == 5:  # pairs
        k_cache[blocks, :, :, offsets] = k.view(*k.shape[:2], -1, 2)
        v_cache[blocks, :, offsets // 2, :, offsets % 2] = v
    else:
        k_cache[blocks, :, :, offsets] = k
        v_cache[blocks, :, offsets] = v


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor, block_size: int | None = None,
              kv_cache_dtype: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks' keys and values as [..., num_kv_heads, tokens, head_dim] (block_ids [..., n]);
    a quantized cache's dequantized, in fp32."""
    if kv_cache_dtype != "auto":  # codes [D, bs] and [bs, D] -> [bs, D], times each key's scale
        (k_codes, k_scales), (v_codes, v_scales) = (_quantized_views(k_cache, block_size, False),
                                                    _quantized_views(v_cache, block_size, True))
        k = dequantize_kv(k_codes[block_ids].transpose(-1, -2), k_scales[block_ids], kv_cache_dtype)
        v = dequantize_kv(v_codes[block_ids], v_scales[block_ids], kv_cache_dtype)
    else:
        k, v = k_cache[block_ids], v_cache[block_ids]  # [..., n, H, <block in the layout>]
        if k_cache.dim() == 5:  # pairs: [D/2, bs, 2] and [bs/2, D, 2] -> [bs, D]
            k = k.transpose(-2, -3).flatten(-2)
            v = v.transpose(-1, -2).flatten(-3, -2)
        else:  # [D, bs] and [bs, D] -> [bs, D]
            k = k.transpose(-1, -2)
    lead = block_ids.dim() - 1  # batch dims before the block dim

    def merge(t: torch.Tensor) -> torch.Tensor:
        t = t.movedim(lead, lead + 1)  # [..., H, n, bs, D]
        return t.reshape(*t.shape[: lead + 1], -1, t.shape[-1])

    return merge(k), merge(v)


def _sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), enable_gqa=True, **kw)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [num_tokens, Hq, D], k/v: this step's [num_tokens, Hkv, D] (already in the cache)."""
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if meta.kv_cache_dtype != "auto" and meta.fresh_prefills:  # they read this step's K/V as the cache holds them
        k = dequantize_kv(*quantize_kv(k, meta.kv_cache_dtype), meta.kv_cache_dtype).to(k.dtype)
        v = dequantize_kv(*quantize_kv(v, meta.kv_cache_dtype), meta.kv_cache_dtype).to(v.dtype)
    if nd:
        kd, vd = gather_kv(k_cache, v_cache, meta.decode_block_tables, meta.block_size, meta.kv_cache_dtype)
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
        kp, vp = gather_kv(k_cache, v_cache, p.block_ids, meta.block_size, meta.kv_cache_dtype)  # [Hkv, L, D]
        qp = q[p.query_start: p.query_start + p.query_len].transpose(0, 1)  # [Hq, Lq, D]
        o = _sdpa(qp, kp[:, : p.context_len], vp[:, : p.context_len], attn_mask=p.mask, scale=scale)
        out[p.query_start: p.query_start + p.query_len] = o.transpose(0, 1)
    return out
