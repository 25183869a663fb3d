"""Sampling at temperature 1: the sampler's draw (one uniform per row, inverted through the
cumulative distribution) against the exponential race it replaced (one exponential per
vocabulary entry, which torch draws one at a time on the CPU).

    python benchmarks/sampler_draw.py [--rounds 2] [--batch 32] [--json FILE]

Two engines, identical but for the draw (the race is defined here, as the sampler had it), run
the same seeded requests (random prompts, temperature 1, exactly --output-len tokens) in lockstep
(spec_decode.py's), one step of each in turn, twice; then the sampler alone on a batch of
random logits of the model's vocabulary, interleaved. Prints JSON lines and the ratios.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from spec_decode import lockstep, workload_requests

from thrifty import LLM, SamplingParams
from thrifty.cpuinfo import cpu_flags_line, cpu_name
from thrifty.layers import sampler as sampler_module
from thrifty.layers.sampler import Sampler, SamplingInput


def race(weights: torch.Tensor, generators: list, default: torch.Generator) -> torch.Tensor:
    """The exponential race: argmax of weight / Exp(1) per entry, each seeded row its own draws."""
    noise = torch.empty(weights.shape, dtype=torch.float32, device=weights.device)
    for i, gen in enumerate(generators):
        noise[i].exponential_(generator=gen or default)
    return (weights / noise.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(dim=-1)


def _with_draw(fn, step, default):
    def run():
        sampler_module.draw_from = fn
        try:
            return step()
        finally:
            sampler_module.draw_from = default
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    llms = {"draw": LLM(max_model_len=2048, kv_cache_memory=1.0), "race": LLM(max_model_len=2048, kv_cache_memory=1.0)}
    draw = sampler_module.draw_from
    for name, llm in llms.items():  # the race only while the race engine steps
        llm.llm_engine.step = _with_draw(race if name == "race" else draw, llm.llm_engine.step, draw)
    rows = []
    for rnd in range(args.rounds):
        prompts, params = workload_requests(llms["draw"], "sampled", args.batch, rnd, args)
        order = ["draw", "race"] if rnd % 2 == 0 else ["race", "draw"]
        runs = lockstep({name: llms[name] for name in order}, prompts, params)
        for name in order:
            run = runs[name]
            rows.append({"kind": "sampler_draw", "round": rnd, "config": name, "batch": args.batch,
                         "output_tokens": run["total_output_tokens"], "elapsed_s": round(run["elapsed_s"], 3),
                         "output_tokens_per_s": round(run["total_output_tokens"] / run["elapsed_s"], 2)})
            print(json.dumps(rows[-1]), flush=True)
    vocab = llms["draw"].llm_engine.vocab_size
    logits = torch.randn(args.batch, vocab)
    inputs = [SamplingInput(SamplingParams(temperature=1.0, seed=i), [0], [], torch.Generator().manual_seed(i))
              for i in range(args.batch)]
    sampler = Sampler()
    op_ms: dict[str, list[float]] = {"draw": [], "race": []}
    for _ in range(2 * args.rounds):
        for name in ("draw", "race"):
            sampler_module.draw_from = race if name == "race" else draw
            start = time.perf_counter()
            for _ in range(10):
                sampler(logits, inputs)
            op_ms[name].append(round((time.perf_counter() - start) / 10 * 1e3, 3))
    sampler_module.draw_from = draw
    summary = {"kind": "sampler_draw_summary", "machine": cpu_name(), "cpu_flags": cpu_flags_line(),
               "date": time.strftime("%Y-%m-%d"), "batch": args.batch, "vocab": vocab, "threads": torch.get_num_threads(),
               "engine_ratio_draw_over_race": [
                   round(next(r for r in rows if r["round"] == rnd and r["config"] == "draw")["output_tokens_per_s"]
                         / next(r for r in rows if r["round"] == rnd and r["config"] == "race")["output_tokens_per_s"], 3)
                   for rnd in range(args.rounds)],
               "sampler_ms": op_ms}
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**summary, "rows": rows}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
