"""What one engine step costs by its content: a step of D decodes only, and a step of D decodes plus
one prompt chunk of P tokens (median of --repeats steps each). Under priority scheduling an urgent
request arriving mid-step waits for the step in flight, so this is what --max-num-batched-tokens
bounds (docs/server.md, "Priority scheduling").

    .venv/bin/python benchmarks/step_costs.py [--dtype float32] [--json docs/results/step_costs.json]

One JSON line per D: {"decodes": D, "decode_step_ms": ..., "prefill_step_ms": {P: ...}, "cpu", ...}.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--decodes", default="0,3,7", help="running requests decoding in each step")
    ap.add_argument("--chunks", default="16,32,64,128", help="prompt chunk sizes")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from thrifty import SamplingParams
    from thrifty.bench.output import emit_json_line
    from thrifty.config import EngineConfig
    from thrifty.engine.llm_engine import LLMEngine

    chunks = [int(c) for c in args.chunks.split(",")]
    engine = LLMEngine(EngineConfig(dtype=args.dtype, kv_cache_memory=0.25, max_model_len=512, max_num_seqs=64,
                                    max_num_batched_tokens=max(chunks) + 64, enable_prefix_caching=False))
    rng = random.Random(0)
    ids = iter(range(1 << 30))

    def add(prompt_len: int, max_tokens: int) -> None:
        prompt = [rng.randrange(100, 40000) for _ in range(prompt_len)]
        engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), f"r{next(ids)}")

    def step_ms() -> float:
        start = time.perf_counter()
        engine.step()
        return (time.perf_counter() - start) * 1000

    def median_ms(before_step) -> float:
        samples = []
        for _ in range(args.repeats):
            before_step()
            samples.append(step_ms())
        return statistics.median(samples)

    add(64, 2)  # warm-up
    while engine.has_unfinished_requests():
        step_ms()
    for decodes in (int(d) for d in args.decodes.split(",")):
        for _ in range(decodes):  # long enough to keep decoding through every measured step
            add(16, 1000)
        if decodes:
            step_ms()  # their prompts
        emit_json_line({"benchmark": "step_costs", "dtype": args.dtype, "decodes": decodes,
                        "decode_step_ms": median_ms(lambda: None) if decodes else None,
                        # a one-token request: its prompt is computed in one step, then it finishes
                        "prefill_step_ms": {chunk: median_ms(lambda c=chunk: add(c, 1)) for chunk in chunks}},
                       args.json)
        for request_id in list(engine.unfinished_request_ids()):
            engine.abort_request(request_id)


if __name__ == "__main__":
    main()
