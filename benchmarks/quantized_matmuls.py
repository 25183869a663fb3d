"""The quantized matmul kernels alone at one row (batch-1 decode): the default model's 30 layers of
matmuls (qkv, o, gate/up with SiLU, down; random weights of its shapes) and its LM head, each
precision's packed weights streamed from memory, best of 5 passes, repeated rounds.

    .venv/bin/python benchmarks/quantized_matmuls.py --json docs/results/quantized_matmuls_zen4.json

--rows 1,4,5 measures those row counts too (a speculative verify step of k = 4 is 5 rows);
THRIFTY_NATIVE_LIB=PATH runs another build of the kernels, for an A/B of two builds.

Separates the kernels' speed from the rest of a step (attention, norms, the runner) that
benchmarks/precisions.py measures with them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HIDDEN, INTER, VOCAB, LAYERS = 576, 1536, 49152, 30
SHAPES = [("qkv", 960, HIDDEN), ("o", HIDDEN, HIDDEN), ("gate_up", 2 * INTER, HIDDEN), ("down", HIDDEN, INTER)]
KINDS = ("bf16", "int8", "int4 g32", "int4 g64")


def pack(kind: str, w, gate_up: bool):
    import torch

    from thrifty.model.quantization import interleave_gate_up, pack_quantized, quantize

    if kind == "bf16":
        op = torch.ops.thrifty.pack_gate_up_weight if gate_up else torch.ops.thrifty.pack_linear_weight
        return op(w.bfloat16())
    method, group = (kind.split()[0], int(kind.split()[1][1:])) if " " in kind else (kind, 32)
    q = quantize(w, method, group)
    return pack_quantized(interleave_gate_up(q, INTER) if gate_up else q)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--rows", default="1", help="comma-separated row counts")
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    from thrifty import native
    from thrifty.cpuinfo import cpu_flags_line, cpu_name

    if not native.load():
        raise SystemExit(f"native kernels unavailable: {native.unavailable_reason()}")
    torch.manual_seed(0)
    layers = {k: [] for k in KINDS}
    for _ in range(LAYERS):
        for name, n, k in SHAPES:
            w = torch.randn(n, k) * 0.05
            for kind in KINDS:
                layers[kind].append((name, n, k, pack(kind, w, name == "gate_up")))
    head_w = torch.randn(VOCAB, HIDDEN) * 0.05
    heads = {"bf16": pack("bf16", head_w, False), "int8": pack("int8", head_w, False)}

    def layer_pass(kind: str, x, xi) -> float:
        start = time.perf_counter()
        for name, n, k, p in layers[kind]:
            if name == "gate_up":
                torch.ops.thrifty.linear_silu_mul(x, p, INTER)
            else:
                torch.ops.thrifty.linear(x if k == HIDDEN else xi, p, None, n)
        return time.perf_counter() - start

    def head_pass(kind: str, x) -> float:
        start = time.perf_counter()
        torch.ops.thrifty.linear(x, heads[kind], None, VOCAB, True)
        return time.perf_counter() - start

    nbytes = {k: sum(p.numel() * p.element_size() for *_, p in layers[k]) for k in KINDS}
    rows = []
    for rnd in range(args.rounds):
        for m in (int(r) for r in args.rows.split(",")):
            x, xi = torch.randn(m, HIDDEN).bfloat16(), torch.randn(m, INTER).bfloat16()
            order = KINDS if rnd % 2 == 0 else KINDS[::-1]
            ms = {k: min(layer_pass(k, x, xi) for _ in range(5)) * 1e3 for k in order}
            head_ms = {k: min(head_pass(k, x) for _ in range(5)) * 1e3 for k in heads}
            row = {"round": rnd + 1, "rows": m, "layers_ms": {k: round(v, 3) for k, v in ms.items()},
                   "layers_vs_bf16": {k: round(ms["bf16"] / v, 3) for k, v in ms.items()},
                   "layers_gb_per_s": {k: round(nbytes[k] / ms[k] / 1e6, 1) for k in KINDS},
                   "head_ms": {k: round(v, 3) for k, v in head_ms.items()}, "layer_bytes": nbytes,
                   "threads": torch.get_num_threads(), "cpu": cpu_name(), "cpu_flags": cpu_flags_line()}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "cpu_flags"}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
