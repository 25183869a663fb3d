"""How fast can batch-1 decode be on this CPU? The matmuls alone, with the default model's shapes.

One decode step reads every weight once: 30 layers of qkv (576 -> 960), o (576 -> 576), gate_up
(576 -> 3072) and down (1536 -> 576), plus the 49152 x 576 LM head. Each layer gets its own
random weights, so they stream from DRAM as in a real step (a single reused matrix would sit in
cache and flatter the result). Prints ms per token and the tok/s ceiling for fp32, bf16 and
weight-only int8 (torch._weight_int8pack_mm with bf16 activations). Everything else a step does
(attention, norms, sampling, Python) comes on top.

    python benchmarks/batch1_gemm_ceiling.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

LAYERS = 30
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (in, out) per layer
VOCAB, HIDDEN = 49152, 576


def make(kind: str):
    def weight(k: int, n: int):
        if kind == "int8":
            return torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, dtype=torch.bfloat16)
        return torch.randn(n, k, dtype=torch.float32 if kind == "fp32" else torch.bfloat16), None

    layers = [[weight(k, n) for k, n in SHAPES] for _ in range(LAYERS)]
    head = weight(HIDDEN, VOCAB)
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    inputs = {k: torch.randn(1, k, dtype=dtype) for k, _ in SHAPES}

    def matmul(x, w):
        weight_, scales = w
        return torch._weight_int8pack_mm(x, weight_, scales) if scales is not None else F.linear(x, weight_)

    def token():
        for layer in layers:
            for (k, _), w in zip(SHAPES, layer):
                matmul(inputs[k], w)
        matmul(inputs[HIDDEN], head)

    return token


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = {"benchmark": "batch1_gemm_ceiling", "threads": args.threads}
    for kind in ("fp32", "bf16", "int8"):
        token = make(kind)
        token()  # warm up
        start = time.perf_counter()
        for _ in range(args.repeats):
            token()
        ms = (time.perf_counter() - start) / args.repeats * 1e3
        result[f"{kind}_ms_per_token"] = round(ms, 2)
        result[f"{kind}_tok_per_s_ceiling"] = round(1e3 / ms, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
