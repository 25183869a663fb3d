"""Weight-only quantization: a matmul weight stored as small integers q with per-group scales d
(and optional mins m), worth d * q + m. One representation holds:

- `int8`: thrifty's own, symmetric, one scale per output row (q in [-127, 127]);
- `int4`: thrifty's own, asymmetric, a scale and a min per group of inputs (q in [0, 15]);
- GGUF's Q8_0 (int8, groups of 32), Q4_0 and Q4_1 (int4, groups of 32), kept as the file has
  them: Q4_0's d * (q - 8) is d * q + m with m = -8 d.

Scales and mins are fp16, as llama.cpp stores them. Activations are never quantized: the
kernels (csrc/cpu/gemm.h) decode q in registers and multiply in fp32 or bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from thrifty.config import GROUP_SIZES


@dataclass
class QuantizedWeight:
    """A [N, K] matmul weight: row n, input k is d[n, k // group_size] * q[n, k] + m[n, k // group_size]."""

    bits: int  # 8: q is int8; 4: q is uint8 in [0, 15], one value per element
    q: torch.Tensor  # [N, K]
    d: torch.Tensor  # [N, K / group_size] float16
    m: torch.Tensor | None  # [N, K / group_size] float16, or None: no min
    group_size: int
    kind: str  # what it came from: "int8", "int4", "Q8_0", "Q4_0", "Q4_1"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def format(self) -> tuple[int, int, bool]:
        """What the kernels need to know: two weights with one format can be concatenated."""
        return self.bits, self.group_size, self.m is not None

    def dequantize(self) -> torch.Tensor:
        """fp32 values, rounded as llama.cpp rounds them (q * d, then + m)."""
        n, k = self.q.shape
        x = self.q.float().view(n, -1, self.group_size) * self.d.float()[:, :, None]
        if self.m is not None:
            x += self.m.float()[:, :, None]
        return x.view(n, k)

    def map_rows(self, fn) -> QuantizedWeight:
        """The same weight with `fn` (a row permutation, padding, ...) applied to every per-row tensor."""
        return QuantizedWeight(self.bits, fn(self.q), fn(self.d), None if self.m is None else fn(self.m),
                               self.group_size, self.kind)


def cat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight | None:
    """The weights stacked by rows (q, k, v into qkv), or None when their formats differ."""
    if len({p.format() for p in parts}) != 1:
        return None
    first = parts[0]
    return QuantizedWeight(first.bits, torch.cat([p.q for p in parts]), torch.cat([p.d for p in parts]),
                           None if first.m is None else torch.cat([p.m for p in parts]), first.group_size,
                           "+".join(sorted({p.kind for p in parts})))


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric int8 with one fp16 scale per output row: d = max |w| / 127."""
    w = weight.detach().float()
    d = (w.abs().amax(dim=1, keepdim=True) / 127).half()
    scale = d.float()
    q = torch.where(scale > 0, w / torch.where(scale > 0, scale, 1), 0).round().clamp(-127, 127).to(torch.int8)
    return QuantizedWeight(8, q, d, None, w.shape[1], "int8")


def quantize_int4(weight: torch.Tensor, group_size: int, name: str = "the layer") -> QuantizedWeight:
    """Asymmetric int4 per group of `group_size` inputs: m = min, d = (max - min) / 15 (Q4_1's rule)."""
    n, k = weight.shape
    if group_size not in GROUP_SIZES or k % group_size:
        raise ValueError(f"quantization_group_size: {group_size} must be one of {GROUP_SIZES} and divide the "
                         f"input size of {name}, {k}")
    w = weight.detach().float().view(n, k // group_size, group_size)
    lo, hi = w.amin(dim=2), w.amax(dim=2)
    d, m = ((hi - lo) / 15).half(), lo.half()
    scale = d.float()[:, :, None]
    inv = torch.where(scale > 0, 1 / torch.where(scale > 0, scale, 1), 0)
    q = ((w - m.float()[:, :, None]) * inv).round().clamp(0, 15).to(torch.uint8)
    return QuantizedWeight(4, q.view(n, k), d, m, group_size, "int4")


def quantize(weight: torch.Tensor, method: str, group_size: int, name: str = "the layer") -> QuantizedWeight:
    return quantize_int8(weight) if method == "int8" else quantize_int4(weight, group_size, name)


def quantize_model(model, method: str, group_size: int) -> None:
    """Quantize every matmul of a float model into `model.quantized` (int8 or int4; the LM head
    is int8 either way, as llama.cpp's 4-bit files keep theirs at 6 or 8 bits), and set the float
    weights to the dequantized values, which the reference path computes with."""
    for name, linear in model.quantized_linears():
        weight = linear.weight.detach().float()
        w = quantize(weight, "int8" if name == "lm_head" else method, group_size, name)
        model.quantized[name] = w
        with torch.no_grad():
            linear.weight.copy_(w.dequantize())


# -- the native kernels' layout (csrc/cpu/gemm.h) ------------------------------------------
PANEL = 16
_MAGIC = 0x51485454
_HEADER_BYTES = 64


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype)
    out[: t.shape[0]] = t
    return out


def interleave_gate_up(w: QuantizedWeight, intermediate: int) -> QuantizedWeight:
    """A [2 I, K] gate/up weight reordered as the gate/up kernel reads it: gate panel i, then up
    panel i, each half padded to whole panels (gemm.h's pack_gate_up_weight, for quantized rows)."""
    padded = -(-intermediate // PANEL) * PANEL

    def reorder(t: torch.Tensor) -> torch.Tensor:
        halves = [pad_rows(t[:intermediate], padded), pad_rows(t[intermediate:], padded)]
        pairs = torch.stack([h.view(padded // PANEL, PANEL, *t.shape[1:]) for h in halves], dim=1)
        return pairs.reshape(2 * padded, *t.shape[1:])

    return w.map_rows(reorder)


def pack_quantized(w: QuantizedWeight) -> torch.Tensor:
    """The uint8 tensor the native kernels take: a header, then per panel of 16 rows and per
    group its quants (int8: k-major; int4: chunks of 4 k, see gemm.h), 16 fp16 scales, 16 mins."""
    n, k = w.shape
    g = w.group_size
    groups, panels = k // g, -(-n // PANEL)
    w = w.map_rows(lambda t: pad_rows(t, panels * PANEL))
    if w.bits == 8:
        quants = w.q.view(torch.uint8).view(panels, PANEL, groups, g).permute(0, 2, 3, 1)
    else:  # element k = 4c + 2h + e of row o goes to byte 2o + e of chunk c, nibble h
        q = w.q.view(panels, PANEL, groups, g // 4, 2, 2)
        quants = (q[..., 0, :] | (q[..., 1, :] << 4)).permute(0, 2, 3, 1, 4)
    parts = [quants.reshape(panels, groups, -1)]
    for scales in (w.d, w.m):
        if scales is not None:
            parts.append(scales.view(panels, PANEL, groups).permute(0, 2, 1).contiguous().view(torch.uint8))
    header = np.zeros(_HEADER_BYTES, np.uint8)
    header[:16] = np.array([_MAGIC, w.bits, g, int(w.m is not None)], np.int32).view(np.uint8)
    header[16:32] = np.array([n, k], np.int64).view(np.uint8)
    return torch.cat([torch.from_numpy(header), torch.cat(parts, dim=2).reshape(-1)])
