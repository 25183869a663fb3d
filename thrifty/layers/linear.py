"""Linear layers that run bf16 weights at fp32 speed on CPUs without native bf16.

On a CPU with AVX512-BF16 or AMX, torch's bf16 matmuls use them. Without those instructions
torch emulates bf16 GEMMs, measured on an AVX2 EPYC at about 17 GFLOP/s against about 110
in fp32 (a 64 x 576 x 3072 matmul). A batch of more than a few rows is therefore computed in
fp32: the weight is widened to fp32 a slice of rows at a time, so each slice stays in cache
while it is used and the weight still streams from memory at bf16's half size. The products
of two bf16 numbers are exact in fp32 and the sums run in fp32 either way, so the result
matches the bf16 GEMM up to summation order; it is rounded to bf16 once, at the end.

A batch of one to four rows (batch-1 decode) is bound by streaming the weights, not by FLOPs:
there the bf16 GEMM reads half the bytes and wins, so it is kept.

fp32 weights on CPU also get a copy in oneDNN's blocked layout, made once at load (`prepack`):
torch's F.linear goes to MKL, whose small-batch GEMMs are slow on the AVX2 EPYC. With all 30
layers of the default model streamed from DRAM, the packed matmuls took 22.5 ms against 33-34
at 1 row, 29 against 62 at 4, 52 against 71 at 16, 125 against 139-144 at 64, and the same at
128; the 49152-row head 5.9 ms against 12.6 at 1 row. From 256 rows up (prefill) MKL is the
faster one, by up to 1.36x, so batches of more than PACKED_MAX_ROWS rows keep F.linear. The two
agree to fp32 rounding (summation order). The price is a second copy of the fp32 weights in
memory. oneDNN packs bf16 only on CPUs with native bf16, where F.linear already reaches oneDNN,
so bf16 weights are not packed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.config import cpu_has_native_bf16

# Measured on the AVX2 EPYC, all 30 layers' weights streamed from DRAM: at 4 rows bf16 and the
# widened fp32 path take about the same time (64 vs 69 ms per step), at 8 rows fp32 wins 1.6x,
# at 64 rows 5.9x. Slices of 1024 output rows (2.25 MiB of fp32 for the default model) beat
# widening the whole weight (1.6x at 8 rows, 1.4x at 64): the widened copy never leaves cache.
UPCAST_MIN_ROWS = 5
UPCAST_SLICE_ROWS = 1024
# oneDNN picks its blocked layout for this many rows; the packed matmul serves batches of up to
# PACKED_MAX_ROWS rows (decode steps), where it beat MKL.
PACK_BATCH_HINT = 64
PACKED_MAX_ROWS = 64


def widen_for_matmul(t: torch.Tensor) -> bool:
    """Whether a bf16 tensor on this device computes faster widened to fp32."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu" and not cpu_has_native_bf16()


def packs_for_onednn(weight: torch.Tensor) -> bool:
    """Whether `prepack` hands this weight to oneDNN: fp32 on a CPU build with oneDNN."""
    return (weight.dtype == torch.float32 and weight.device.type == "cpu"
            and torch.backends.mkldnn.is_available())


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out, in) in oneDNN's blocked layout, for `packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           widen: bool = False) -> torch.Tensor:
    """F.linear over 2-D x; with `widen`, batches of UPCAST_MIN_ROWS rows or more run in fp32."""
    if not widen or x.shape[0] < UPCAST_MIN_ROWS:
        return F.linear(x, weight, bias)
    x32 = x.float()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, weight.shape[0], UPCAST_SLICE_ROWS):
        end = start + UPCAST_SLICE_ROWS
        b = None if bias is None else bias[start:end].float()
        out[:, start:end] = F.linear(x32, weight[start:end].float(), b)
    return out


class Linear(nn.Linear):
    """nn.Linear whose matmul takes the fastest path this CPU has: oneDNN's packed layout for
    fp32 weights (after `prepack`), the widened fp32 path for bf16 weights without native bf16."""

    packed: torch.Tensor | None = None

    def prepack(self) -> None:
        """Add a oneDNN-packed copy of the weight if oneDNN takes it. Call once, after the
        weights are loaded and on their device."""
        if self.packed is None and packs_for_onednn(self.weight):
            self.packed = pack_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] <= PACKED_MAX_ROWS:
            return packed_linear(x, self.packed, self.bias)
        return linear(x, self.weight, self.bias, widen_for_matmul(self.weight))
