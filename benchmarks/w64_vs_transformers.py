"""W64 (64 prompts x 128 random tokens in, exactly 128 out, greedy): thrifty vs transformers
`generate` (one static batch of 64), same weights, same dtype, same threads, one run.

    .venv/bin/python benchmarks/w64_vs_transformers.py --dtype bfloat16 --threads 2

Prints one JSON line with both figures and their ratio. End-to-end output tok/s includes prefill.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def transformers_w64(prompts: list[list[int]], output_len: int, dtype: torch.dtype) -> float:
    from transformers import AutoModelForCausalLM

    from thrifty.model.loader import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=dtype).eval()
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        warm = ids[:1, :8]
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, **kw)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                             min_new_tokens=output_len, **kw)
        elapsed = time.perf_counter() - start
    generated = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return generated / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from thrifty import LLM
    from thrifty.bench.throughput import run_throughput
    from thrifty.cpuinfo import cpu_name

    llm = LLM(dtype=args.dtype, num_threads=args.threads, quantization="none")  # transformers' dense weights
    thrifty = run_throughput(llm, "random", args.num_prompts, args.input_len, args.output_len, use_tqdm=False)
    result = {"workload": f"{args.num_prompts}x{args.input_len}in/{args.output_len}out greedy",
              "dtype": args.dtype, "threads": args.threads, "cpu": cpu_name(),
              "thrifty_output_tokens_per_s": thrifty["output_tokens_per_s"]}
    print(json.dumps(thrifty), flush=True)
    if not args.skip_transformers:
        # The same random prompts thrifty just ran (the dataset is seeded).
        from thrifty.bench.datasets import make_dataset

        engine = llm.llm_engine
        special = set(engine.tokenizer.all_special_ids) | set(engine.eos_token_ids)
        reqs = make_dataset("random", args.num_prompts, args.input_len, args.output_len, engine.vocab_size,
                            special, engine.max_model_len)
        del llm, engine
        hf = transformers_w64([r.prompt_token_ids for r in reqs], args.output_len, getattr(torch, args.dtype))
        result["transformers_output_tokens_per_s"] = round(hf, 2)
        result["ratio"] = round(thrifty["output_tokens_per_s"] / hf, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
