"""Where the time of a step goes, with the native backend: the engine step's wall time, split
into the native forward's kernels (timed inside the forward, see LlamaModel.profile) and
everything outside the forward (scheduler, batch preparation, sampler, detokenizer, outputs).

    .venv/bin/python benchmarks/step_profile.py --num-prompts 1      # batch 1 (B1)
    .venv/bin/python benchmarks/step_profile.py --num-prompts 64     # W64's decode steps
    .venv/bin/python benchmarks/step_profile.py --num-prompts 8 --input-len 1024 --prefill

Runs `--input-len` random prompt tokens per request, then profiles `--steps` decode steps (every
request decoding one token per step), or with --prefill the prompts' prefill steps instead, and
prints one JSON line: milliseconds per step for each part, and "outside_matmuls_ms", the step's
wall time minus the matmul kernels (q/k/v, o, gate/up, down projections and the LM head).
"""

from __future__ import annotations

import argparse
import json
import time

MATMULS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=1)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", action="store_true", help="profile the prefill steps instead")
    ap.add_argument("--quantization", default="none", help="weights (EngineConfig.quantization)")
    args = ap.parse_args()

    from thrifty import LLM, SamplingParams
    from thrifty.bench.datasets import make_dataset
    from thrifty.cpuinfo import cpu_flags_line, cpu_name

    llm = LLM(dtype=args.dtype, num_threads=args.threads, backend="native", quantization=args.quantization)
    engine = llm.llm_engine
    special = set(engine.tokenizer.all_special_ids) | set(engine.eos_token_ids)
    reqs = make_dataset("random", args.num_prompts, args.input_len, args.steps + 2, engine.vocab_size, special,
                        engine.max_model_len)
    params = SamplingParams(temperature=0, max_tokens=args.steps + 2, ignore_eos=True)
    native = engine.runner.paged.native
    llm.generate(reqs[0].prompt_token_ids[:16], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    for r in reqs:
        engine.add_request({"prompt_token_ids": r.prompt_token_ids}, params)
    if args.prefill:
        native.set_profiling(True)
    start = time.perf_counter()
    steps = 0
    engine.reset_stats()  # the warm-up's tokens are not the prefills'
    while engine.stats.num_generation_tokens < args.num_prompts:  # the prefills
        engine.step()
        steps += 1
    if not args.prefill:
        engine.step()  # one decode step to warm up
        native.set_profiling(True)
        start = time.perf_counter()
        for steps in range(1, args.steps + 1):
            engine.step()
    wall = time.perf_counter() - start
    args.steps = steps
    prof = dict(native.profile())
    native.set_profiling(False)

    def ms(seconds: float) -> float:
        return round(seconds / args.steps * 1e3, 3)

    matmuls = sum(prof[k] for k in MATMULS)
    kernels = {k: ms(v) for k, v in prof.items() if k != "forward"}
    result = {
        "phase": "prefill" if args.prefill else "decode", "batch": args.num_prompts, "context": args.input_len,
        "steps": args.steps, "dtype": args.dtype, "quantization": args.quantization,
        "threads": args.threads, "step_ms": ms(wall), "forward_ms": ms(prof["forward"]),
        "matmuls_ms": ms(matmuls), "outside_matmuls_ms": ms(wall - matmuls),
        "outside_forward_ms": ms(wall - prof["forward"]),
        "forward_outside_kernels_ms": ms(prof["forward"] - sum(prof[k] for k in kernels)),
        "kernels_ms": kernels, "tokens_per_s": round(args.num_prompts * (args.input_len if args.prefill else args.steps) / wall, 2),
        "cpu": cpu_name(), "cpu_flags": cpu_flags_line(), "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
