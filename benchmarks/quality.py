"""What quantization costs in quality, measured: perplexity, greedy agreement and a few answers
by precision, on the default model.

    .venv/bin/python benchmarks/quality.py --json docs/results/quality_<cpu>.json

- Perplexity over the first --tokens tokens of Python's own reference documentation
  (pydoc_data.topics, which ships with every CPython: nothing to download), in windows of
  --window tokens, from the engine's prompt logprobs.
- Greedy agreement with bf16 over 50 prompts (the opening 24 tokens of 50 of those topics):
  how many of 32 generated tokens match before the first divergence.
- Answers to a handful of factual chat questions.
The KV rows quantize the cache (int8, fp8_e4m3); perplexity's prefills read it back too.

The default model is itself a Q4_1 file, so "fp32" and "bf16" are its dequantized Q4_1 values,
and int8/int4 quantize those again; the GGUF rows re-encode them with gguf-py (Q8_0, Q4_0) and
Q5_0, a type thrifty has no kernel for (dequantized at load). See docs/quantization.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUESTIONS = [
    "What is the capital of France?",
    "How many days are there in a week?",
    "What is the largest planet in the solar system?",
    "Who wrote Romeo and Juliet?",
    "What is 12 times 12?",
]


def corpus_text() -> list[str]:
    import pydoc_data.topics

    return [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]


def reencode_gguf(src: str, dst: str, qtype_name: str) -> None:
    """The default model's file with every Q4_1 matrix decoded and re-encoded as `qtype_name`
    by gguf-py (the Q8_0 embedding as well for Q8_0; kept as it is otherwise, as llama.cpp's
    4- and 5-bit files keep theirs); metadata and tokenizer copied."""
    import gguf
    from gguf import GGMLQuantizationType as T

    target = T[qtype_name]
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        reencode = t.tensor_type == T.Q4_1 or (t.tensor_type == T.Q8_0 and target == T.Q8_0)
        if reencode:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            writer.add_tensor(t.name, gguf.quants.quantize(values, target), raw_dtype=target)
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def configs(tmp: str) -> list[tuple[str, dict]]:
    from thrifty.model.loader import default_model_path

    ggufs = {}
    for qtype in ("Q8_0", "Q4_0", "Q5_0"):
        ggufs[qtype] = os.path.join(tmp, f"SmolLM2-135M-Instruct.{qtype}.gguf")
        reencode_gguf(default_model_path(), ggufs[qtype], qtype)
    return [
        ("bf16", dict(dtype="bfloat16", quantization="none")),  # first: the others' greedy reference
        ("fp32", dict(dtype="float32", quantization="none")),
        ("Q4_1 (file, kept)", dict(dtype="bfloat16", quantization="auto")),
        ("int8", dict(dtype="bfloat16", quantization="int8")),
        ("int4 g32", dict(dtype="bfloat16", quantization="int4", quantization_group_size=32)),
        ("int4 g64", dict(dtype="bfloat16", quantization="int4", quantization_group_size=64)),
        ("GGUF Q8_0 (kept)", dict(model=ggufs["Q8_0"], dtype="bfloat16")),
        ("GGUF Q4_0 (kept)", dict(model=ggufs["Q4_0"], dtype="bfloat16")),
        ("GGUF Q5_0 (no kernel: dequantized)", dict(model=ggufs["Q5_0"], dtype="bfloat16")),
        ("bf16, KV int8", dict(dtype="bfloat16", quantization="none", kv_cache_dtype="int8")),
        ("bf16, KV fp8_e4m3", dict(dtype="bfloat16", quantization="none", kv_cache_dtype="fp8_e4m3")),
        ("Q4_1 (file), KV int8", dict(dtype="bfloat16", quantization="auto", kv_cache_dtype="int8")),
    ]


def perplexity(llm, ids: list[int], window: int) -> tuple[float, int]:
    from thrifty import SamplingParams

    windows = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    logprobs = [e[tok].logprob for o, w in zip(outs, windows) for e, tok in zip(o.prompt_logprobs[1:], w[1:])]
    return math.exp(-sum(logprobs) / len(logprobs)), len(logprobs)


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    firsts = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), min(len(p), len(q))) for p, q in zip(a, b)]
    return {"identical": sum(p == q for p, q in zip(a, b)), "mean_first_divergence": sum(firsts) / len(firsts),
            "min_first_divergence": min(firsts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=24576, help="perplexity tokens (whole windows)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--json", help="write the results here (JSON lines)")
    ap.add_argument("--only", nargs="*", help="config names to run (default: all; bf16 always runs first)")
    args = ap.parse_args()

    from thrifty import LLM, SamplingParams
    from thrifty.cpuinfo import cpu_flags_line, cpu_name

    texts = corpus_text()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        greedy_ref = None
        for name, kwargs in configs(tmp):
            if args.only and name not in args.only and name != "bf16":
                continue
            start = time.perf_counter()
            llm = LLM(max_model_len=2048, kv_cache_memory=0.5, max_num_batched_tokens=2048, **kwargs)
            tok = llm.get_tokenizer()
            ids = tok.encode("\n\n".join(texts), add_special_tokens=False)[: args.tokens]
            ppl, n = perplexity(llm, ids, args.window)
            prompts = [{"prompt_token_ids": tok.encode(t, add_special_tokens=False)[:24]} for t in texts[:50]]
            greedy = [o.outputs[0].token_ids for o in
                      llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
                                   use_tqdm=False)]
            if name == "bf16":
                greedy_ref = greedy
            answers = [o.outputs[0].text.strip() for o in llm.chat(
                [[{"role": "user", "content": q}] for q in QUESTIONS],
                SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)]
            engine = llm.llm_engine
            row = {"config": name, "perplexity": round(ppl, 4), "tokens": n,
                   "weight_bytes": engine.runner.weight_bytes, "kv_bytes_per_token": engine.runner.kv_bytes_per_token,
                   "backend": engine.runner.backend, "dtype": str(engine.dtype).removeprefix("torch."),
                   "agreement_with_bf16": agreement(greedy, greedy_ref), "answers": dict(zip(QUESTIONS, answers)),
                   "seconds": round(time.perf_counter() - start, 1), "cpu": cpu_name(), "cpu_flags": cpu_flags_line()}
            results.append(row)
            print(json.dumps(row), flush=True)
            del llm
    base = next(r["perplexity"] for r in results if r["config"] == "bf16")
    print("\n| config | perplexity | vs bf16 | weights MB | greedy identical /50 | mean first divergence /32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        a = r["agreement_with_bf16"]
        print(f"| {r['config']} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.2f}% | "
              f"{r['weight_bytes'] / 1e6:.1f} | {a['identical']} | {a['mean_first_divergence']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
