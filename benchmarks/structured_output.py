"""The cost of structured output at batch 32: the same requests unconstrained and constrained by a
JSON schema, on two identical engines in lockstep (spec_decode.py's), greedy and at temperature 1.

    .venv/bin/python benchmarks/structured_output.py --json docs/results/structured_output_zen4.json

Each run is --batch requests of random prompt tokens, every one generating exactly --output-len
tokens: the unconstrained ones ignore EOS, the constrained ones follow a schema (a list of 40
records) that cannot end sooner, so both batches stay full and differ only by the grammar: its
mask filled per row, applied to the logits, and (greedy) the full logits the mask needs where an
unconstrained greedy batch has the forward pick its tokens. Prints JSON lines: decoding tokens per
second of each, their ratio, the engine's mask seconds per step, and the CPU time of the first
compile (a one-line regex: it builds llguidance's view of the tokenizer) and of the schema's.
"""

from __future__ import annotations

import argparse
import json

from spec_decode import lockstep

from thrifty import LLM, SamplingParams
from thrifty.bench.throughput import make_requests
from thrifty.cpuinfo import cpu_flags_line, cpu_name
from thrifty.sampling_params import StructuredOutputsParams

RECORDS = {"type": "object", "properties": {"records": {
    "type": "array", "minItems": 40, "maxItems": 40, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                         "qty": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "kind": {"enum": ["tool", "part", "food"]}},
        "required": ["name", "qty", "kind"], "additionalProperties": False}}},
    "required": ["records"], "additionalProperties": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=96)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    llms = {name: LLM(max_model_len=1024, kv_cache_memory=1.0) for name in ("free", "json")}
    constrained = llms["json"].llm_engine.structured
    _, tokenizer_s = constrained.compile(StructuredOutputsParams(regex="a"))  # builds llguidance's tokenizer
    _, compile_s = constrained.compile(StructuredOutputsParams(json=RECORDS))
    rows = []
    for rnd in range(args.rounds):
        for temperature in (0.0, 1.0):
            prompts, free = make_requests(llms["free"], "random", args.batch, args.input_len, args.output_len,
                                          ignore_eos=True, seed=rnd, temperature=temperature)
            json_params = [SamplingParams(temperature=temperature, seed=p.seed, max_tokens=args.output_len,
                                          structured_outputs={"json": RECORDS}) for p in free]
            order = ["free", "json"] if rnd % 2 == 0 else ["json", "free"]
            mask_s = constrained.mask_seconds
            runs = lockstep({name: llms[name] for name in order}, prompts, {"free": free, "json": json_params})
            steps = llms["json"].llm_engine.stats.num_steps  # (warm_up resets the counters)
            row = {"kind": "structured_output", "round": rnd, "batch": args.batch, "temperature": temperature,
                   "output_len": args.output_len, "cpu": cpu_name(), "cpu_flags": cpu_flags_line(),
                   "first_compile_ms": round(tokenizer_s * 1e3, 2), "compile_ms": round(compile_s * 1e3, 2),
                   "steps": steps,
                   "mask_ms_per_step": round((constrained.mask_seconds - mask_s) / steps * 1e3, 3)}
            for name in order:
                run = runs[name]
                decode_s = run["elapsed_s"] - run["prefill_s"]
                row[f"{name}_output_tokens"] = run["total_output_tokens"]
                row[f"{name}_decode_tokens_per_s"] = round((run["total_output_tokens"] - args.batch) / decode_s, 2)
                row[f"{name}_elapsed_s"] = round(run["elapsed_s"], 3)
            row["json_vs_free"] = round(row["json_decode_tokens_per_s"] / row["free_decode_tokens_per_s"], 3)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "cpu_flags"}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
