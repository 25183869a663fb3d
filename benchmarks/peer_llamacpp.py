"""thrifty against llama.cpp at batch 1 on quantized GGUF files: same machine, same run, same
prompts (token ids), the files each engine serves as they are.

    .venv/bin/python benchmarks/peer_llamacpp.py --llamacpp-python /tmp/lcpp-venv/bin/python \\
        --json docs/results/peer_llamacpp_zen4.json

llama.cpp is llama-cpp-python (0.3.36 builds llama.cpp from source; install it in a venv of its own:
`python3 -m venv /tmp/lcpp-venv && CMAKE_ARGS=-DGGML_NATIVE=ON /tmp/lcpp-venv/bin/pip install
llama-cpp-python==0.3.36`). Files: the default model's Q4_1 GGUF, and a Q8_0 one re-encoded from
it by gguf-py (benchmarks/quality.py's reencode_gguf). Workload B1: one prompt of 128 random token
ids, 128 greedy tokens whatever they are (llama.cpp: `Llama.generate` with top_k 1, which does not
stop at EOS; thrifty: ignore_eos), --repeats prompts per round and engine, each its own (no cache
reuse), the median taken; figure: output tokens over the wall time of the whole call, prefill
included. Each round runs a worker process per engine (llama.cpp, then thrifty; the next round the
other way round), 2 threads each. thrifty also runs the dense bf16 weights, for scale.

llama.cpp multiplies Q4_1/Q8_0 weights with activations quantized to 8 bits (its Q8 paths); thrifty
keeps activations in bf16 (docs/quantization.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def worker_llamacpp(spec: dict) -> list[dict]:
    from llama_cpp import Llama

    rows = []
    for name, path in spec["files"].items():
        llm = Llama(model_path=path, n_threads=spec["threads"], n_threads_batch=spec["threads"], n_ctx=512,
                    n_batch=512, verbose=False)
        llm.eval(spec["warmup"])  # warm-up
        for ids in spec["prompts"]:
            start = time.perf_counter()
            n = 0
            for _ in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
                n += 1
                if n == spec["output_len"]:
                    break
            rows.append({"engine": "llama.cpp", "config": name, "tok_s": n / (time.perf_counter() - start)})
        del llm
    return rows


def worker_thrifty(spec: dict) -> list[dict]:
    sys.path.insert(0, os.path.dirname(HERE))
    from thrifty import LLM, SamplingParams

    rows = []
    params = SamplingParams(temperature=0, max_tokens=spec["output_len"], ignore_eos=True)
    for name, kwargs in spec["thrifty"].items():
        llm = LLM(num_threads=spec["threads"], max_model_len=512, kv_cache_memory=0.25, dtype="bfloat16", **kwargs)
        llm.generate([{"prompt_token_ids": spec["warmup"]}], SamplingParams(max_tokens=2), use_tqdm=False)
        for ids in spec["prompts"]:
            start = time.perf_counter()
            out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
            rows.append({"engine": "thrifty", "config": name,
                         "tok_s": len(out.outputs[0].token_ids) / (time.perf_counter() - start)})
        del llm
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llamacpp-python", default="/tmp/lcpp-venv/bin/python")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--worker", choices=["llamacpp", "thrifty"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        with open(args.spec) as f:
            spec = json.load(f)
        rows = (worker_llamacpp if args.worker == "llamacpp" else worker_thrifty)(spec)
        print(json.dumps(rows))
        return

    sys.path.insert(0, os.path.dirname(HERE))
    sys.path.insert(0, HERE)
    from quality import reencode_gguf

    from thrifty.bench.datasets import make_dataset
    from thrifty.cpuinfo import cpu_flags_line, cpu_name
    from thrifty.model.loader import default_model_path, load_tokenizer, resolve_model

    tmp = tempfile.mkdtemp()
    q4_1 = default_model_path()
    q8_0 = os.path.join(tmp, "SmolLM2-135M-Instruct.Q8_0.gguf")
    reencode_gguf(q4_1, q8_0, "Q8_0")
    tok = load_tokenizer(resolve_model(None))
    special = set(tok.all_special_ids)
    results = []
    for rnd in range(args.rounds):
        requests = make_dataset("random", args.repeats + 1, 128, 128, tok.vocab_size, special, 512, seed=100 + rnd)
        prompts = [r.prompt_token_ids for r in requests]
        spec = {"threads": args.threads, "output_len": 128, "warmup": prompts[0][:16], "prompts": prompts[1:],
                "files": {"Q4_1": q4_1, "Q8_0": q8_0},
                "thrifty": {"Q4_1": {"model": q4_1}, "Q8_0": {"model": q8_0}, "bf16 (dense)": {"quantization": "none"}}}
        path = os.path.join(tmp, f"spec{rnd}.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        order = ["llamacpp", "thrifty"] if rnd % 2 == 0 else ["thrifty", "llamacpp"]
        for engine in order:
            python = args.llamacpp_python if engine == "llamacpp" else sys.executable
            out = subprocess.run([python, __file__, "--worker", engine, "--spec", path], check=True,
                                 capture_output=True, text=True).stdout
            for row in json.loads(out.strip().splitlines()[-1]):
                results.append({"round": rnd + 1, **row})
    summary = {}
    for r in results:
        summary.setdefault((r["round"], r["engine"], r["config"]), []).append(r["tok_s"])
    lines = []
    for (rnd, engine, config), runs in summary.items():
        line = {"round": rnd, "engine": engine, "config": config, "B1_tok_s": round(statistics.median(runs), 2),
                "runs": [round(x, 2) for x in runs], "threads": args.threads, "cpu": cpu_name(),
                "cpu_flags": cpu_flags_line(), "date": time.strftime("%Y-%m-%d")}
        lines.append(line)
        print(json.dumps({k: v for k, v in line.items() if k != "cpu_flags"}))
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)


if __name__ == "__main__":
    main()
