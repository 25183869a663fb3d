"""KV memory reserved vs used: contiguous per-request preallocation against the paged cache.

One continuous-batching run of the mixed dataset (lengths like real traffic). At every step,
for the requests in the batch, we sum the tokens whose K/V really exist and what three
allocation schemes would hold for the same batch:
- contiguous, max_model_len per request (the classic preallocation of a fixed-size cache);
- contiguous, prompt + max_tokens per request (preallocation that knows each request's limit);
- paged: the blocks thrifty really held (16-token blocks, allocated as tokens arrive).
waste = 1 - used / reserved, summed over steps (a time average). Prints one JSON line.

    python benchmarks/kv_waste.py [--num-prompts 64] [--max-model-len 2048] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

from thrifty import LLM, SamplingParams
from thrifty.bench.datasets import make_dataset
from thrifty.cpuinfo import cpu_name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    llm = LLM(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, seed=0)
    engine = llm.llm_engine
    special = set(engine.tokenizer.all_special_ids) | set(engine.eos_token_ids)
    requests = make_dataset("mixed", args.num_prompts, args.input_len, args.output_len, engine.vocab_size, special,
                            engine.max_model_len, seed=0)
    for r in requests:
        engine.add_request({"prompt_token_ids": r.prompt_token_ids},
                           SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True))
    kv = engine.kv_cache_manager
    used = paged = exact = full = 0
    while engine.has_unfinished_requests():
        engine.step()
        for req in engine.scheduler.running:
            used += req.num_computed_tokens
            paged += len(kv.req_to_blocks.get(req.request_id, ())) * kv.block_size
            exact += req.num_prompt_tokens + req.max_tokens
            full += engine.max_model_len
    result = {
        "benchmark": "kv_waste",
        "dataset": "mixed", "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len, "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
        "block_size": kv.block_size,
        "waste_contiguous_max_model_len": round(1 - used / full, 4),
        "waste_contiguous_prompt_plus_max_tokens": round(1 - used / exact, 4),
        "waste_paged": round(1 - used / paged, 4),
        "engine_kv_waste_frac": round(engine.stats.kv_waste_frac, 4),
        "machine": cpu_name(), "date": time.strftime("%Y-%m-%d"),
    }
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
