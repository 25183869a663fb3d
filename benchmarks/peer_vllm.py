"""thrifty against vLLM-CPU, side by side: same machine, same prompts (token ids), same run.

Full benchmark (roughly 15 minutes on 2 idle cores; each vLLM start compiles the model for 1-2
minutes, outside the timed calls):

    .venv/bin/python benchmarks/peer_vllm.py --json peer_vllm.json

Smoke run (one round, batch-1 only, quarter lengths):

    .venv/bin/python benchmarks/peer_vllm.py --workloads B1 --rounds 1 --scale 0.25

Workloads (greedy, ignore_eos: every request makes exactly its max_tokens):
    W64      64 prompts x 128 tokens in, 128 out
    B1        1 prompt  x 128 in, 128 out
    long     16 prompts x 1024 in, 256 out
    prefill   8 prompts x 1024 in, 1 out
Figure: output tokens / wall time of one whole generate call (prefill included); for prefill the
ratio thrifty/vLLM is taken on total (input + output) tokens/s. `--scale` multiplies prompt
counts and lengths, for smoke runs only.

Prompts come from thrifty's seeded "random" dataset (thrifty.bench.datasets.make_dataset, as
`thrifty bench throughput` builds it: vocabulary ids minus the special and EOS ids), one seed
per workload so no two workloads share a prompt (a shared prefix would hit one engine's prefix
cache and not the other's, their block sizes differ). They are made once here and handed to
both engines as token ids in a JSON file.

Each round runs the vLLM worker process, then the thrifty worker process (benchmarks/peer_worker.py,
each in its own virtual environment, model loaded once per process, one small warm-up generate
before the timed calls). vLLM runs under the `vllm-env` wrapper of /work/shared/peers/install_vllm_cpu.sh:
vLLM-CPU's documented best configuration on 2 cores (no reserved core, tcmalloc + libiomp5 preloaded,
VLLM_CPU_KVCACHE_SPACE 4 GiB unless set); its other settings are its own defaults (block size 128
on CPU, max_num_batched_tokens 4096, chunked prefill, prefix caching, torch.compile) apart from
dtype and max_model_len. `--vllm-args` / `--thrifty-args` pass extra LLM(...) keywords as JSON.

Also measured in the same run: the machine's memory read bandwidth (torch sum over a 1 GiB
tensor of random values on the benchmark's thread count, best of 5: before and after the rounds,
and by each worker right before and right after each of its B1 runs) and the bytes of weights
one decode token reads (every linear weight + the LM head, from the safetensors header of the
model's HF folder), which give each B1 run's "fraction of the bandwidth limit" = B1 tok/s /
(bandwidth measured right before it / bytes per token), and the same against the bandwidth
measured right after it; and whether both engines produce the same first 16 greedy tokens for
the first W64 prompt. B1 runs `--b1-repeats` times per round and engine (each between two
measurements and with a prompt of its own; the median run is the round's figure, every run is in
the JSON), because one measurement a few seconds from the run can be 2x off the rate the run then
gets.

vLLM needs a HuggingFace folder; it is made once (--hf-dir, default /tmp/smollm2-hf) with
/work/shared/peers/make_hf_folder.py run by this Python. That script leaves transformers'
`quantization_config: gguf` in config.json, which vLLM rejects; it is removed here (the saved
weights are plain dequantized fp32, the same values thrifty loads from the GGUF).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# The workers' environment is the one this script was started with: importing thrifty (for the
# dataset) sets OMP_WAIT_POLICY in os.environ, which must not leak into the vLLM worker.
LAUNCH_ENV = dict(os.environ)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peer_worker import read_bandwidth_gbs  # noqa: E402  (the standard library only, at import)
REPO = HERE.parent
WORKER = HERE / "peer_worker.py"
ENGINES = ("vllm", "thrifty")  # the order within a round
BYTES_PER_ELEMENT = {"bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class Workload:
    name: str
    num_prompts: int
    input_len: int
    output_len: int
    ratio_metric: str = "output_tokens_per_s"

    def scaled(self, scale: float) -> Workload:
        def s(n: int) -> int:
            return max(1, round(n * scale))

        return Workload(self.name, s(self.num_prompts), s(self.input_len), s(self.output_len), self.ratio_metric)


def _workloads() -> tuple[Workload, ...]:
    """thrifty's own workload table (`thrifty bench throughput --workload`), in its order: the
    index is the workload's dataset seed offset, so prompts do not depend on the selection."""
    from thrifty.bench.throughput import WORKLOADS as TABLE

    return tuple(Workload(name, n, i, o, "total_tokens_per_s" if name == "prefill" else "output_tokens_per_s")
                 for name, (n, i, o) in TABLE.items())


WORKLOADS = _workloads()
WARMUP = Workload("warmup", 1, 16, 4)  # one small untimed generate per worker, its own prompt


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS),
                    help="comma-separated subset of %(default)s")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--b1-repeats", type=int, default=3,
                    help="B1 runs per round and engine, each between two bandwidth measurements (the median run "
                         "is the round's figure)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(BYTES_PER_ELEMENT))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply prompt counts and lengths (smoke runs; prefill keeps 1 output token)")
    ap.add_argument("--max-model-len", type=int, default=2048, help="vLLM's max_model_len; also the dataset's cap")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed of the first workload (W64)")
    ap.add_argument("--check-tokens", type=int, default=16, help="greedy tokens compared on the first W64 prompt")
    # Both engines on the same dense weights: thrifty would otherwise serve the default model's
    # own Q4_1 matrices (quantization "auto"); benchmarks/precisions.py compares those.
    ap.add_argument("--thrifty-args", type=json.loads, default={"quantization": "none"},
                    help="JSON dict of extra thrifty LLM(...) keywords, e.g. '{\"max_num_seqs\": 64}'")
    ap.add_argument("--vllm-args", type=json.loads, default={},
                    help="JSON dict of extra vLLM LLM(...) keywords, e.g. '{\"max_num_batched_tokens\": 8192}'")
    ap.add_argument("--vllm-venv", type=Path, default=Path("/tmp/vllm-cpu-venv"),
                    help="made by /work/shared/peers/install_vllm_cpu.sh (has bin/vllm-env)")
    ap.add_argument("--hf-dir", type=Path, default=Path("/tmp/smollm2-hf"),
                    help="vLLM's model folder (made if missing)")
    ap.add_argument("--make-hf-script", type=Path, default=Path("/work/shared/peers/make_hf_folder.py"))
    ap.add_argument("--json", type=Path, help="write the result here too")
    args = ap.parse_args()
    known = {w.name for w in WORKLOADS}
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workloads or set(args.workloads) - known:
        ap.error(f"--workloads: choose from {sorted(known)}, got {args.workloads}")
    if args.rounds < 1 or args.threads < 1 or args.scale <= 0:
        ap.error("--rounds and --threads must be >= 1, --scale > 0")
    for flag in ("thrifty_args", "vllm_args"):
        if not isinstance(getattr(args, flag), dict):
            ap.error(f"--{flag.replace('_', '-')} must be a JSON object")
    return args


def log(msg: str) -> None:
    print(f"[peer_vllm] {msg}", file=sys.stderr, flush=True)


# -- the model folder and what one decode token reads -----------------------------------------------

def ensure_hf_folder(hf_dir: Path, make_script: Path) -> None:
    if not (hf_dir / "config.json").exists():
        log(f"making the HF folder {hf_dir} with {make_script}")
        tmp = hf_dir.with_name(hf_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, str(make_script), str(tmp)], check=True, env=LAUNCH_ENV,
                       stdout=sys.stderr)
        tmp.rename(hf_dir)
    config_path = hf_dir / "config.json"
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def safetensors_shapes(hf_dir: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the headers only (8-byte length, then JSON)."""
    shapes: dict[str, list[int]] = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    if not shapes:
        raise SystemExit(f"no .safetensors files in {hf_dir}")
    return shapes


def decode_weight_params(hf_dir: Path) -> dict[str, Any]:
    """Weights one decode token streams: every linear (2-D) weight except the embedding table,
    of which a token reads one row, plus the LM head (the embedding itself when tied)."""
    shapes = safetensors_shapes(hf_dir)
    embed = next(k for k in shapes if k.endswith("embed_tokens.weight"))
    head = next((k for k in shapes if k.endswith("lm_head.weight")), embed)

    def numel(k: str) -> int:
        return math.prod(shapes[k])

    linear = sum(numel(k) for k, s in shapes.items() if len(s) == 2 and k not in (embed, head))
    return {"linear_params": linear, "lm_head_params": numel(head), "params_per_token": linear + numel(head),
            "source": f"safetensors headers of {hf_dir}"}


# -- prompts ----------------------------------------------------------------------------------------

class PromptMaker:
    """Token ids as `thrifty bench throughput` makes its "random" dataset: uniform over the
    vocabulary minus the tokenizer's special ids and the model's EOS ids. The tokenizer and config
    are the HF folder's (converted from the same GGUF thrifty reads: same vocabulary, same special
    ids), so nothing here loads a model."""

    def __init__(self, hf_dir: Path, max_model_len: int, seed: int):
        from transformers import AutoTokenizer

        config = json.loads((hf_dir / "config.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        eos = config.get("eos_token_id")
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.special = (set(tokenizer.all_special_ids) | eos_ids) - {None}
        self.vocab_size = config["vocab_size"]
        self.max_model_len = max_model_len
        self.seed = seed

    def __call__(self, w: Workload, seed_offset: int) -> list[list[int]]:
        from thrifty.bench.datasets import make_dataset

        requests = make_dataset("random", w.num_prompts, w.input_len, w.output_len, self.vocab_size,
                                self.special, self.max_model_len, self.seed + seed_offset)
        return [r.prompt_token_ids for r in requests]


# -- workers ----------------------------------------------------------------------------------------

def worker_command(engine: str, args: argparse.Namespace, spec_path: Path) -> list[str]:
    if engine == "thrifty":
        return [sys.executable, str(WORKER), engine, str(spec_path)]
    venv = args.vllm_venv
    return [str(venv / "bin" / "vllm-env"), str(venv / "bin" / "python"), str(WORKER), engine, str(spec_path)]


def vllm_thread_env(threads: int) -> dict[str, str]:
    """vLLM-CPU binds one OpenMP thread per core of its CPU list ("auto": all cores here). Fewer
    threads than cores: bind to the first `threads` cores, unless the user set the list."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads >= len(cpus) or "VLLM_CPU_OMP_THREADS_BIND" in LAUNCH_ENV:
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus[:threads]))}


def run_worker(engine: str, args: argparse.Namespace, spec_path: Path) -> dict[str, Any]:
    """Runs one worker; returns {"info": {...}, "workloads": {name: {...}}, "check": [...]}.
    The worker's stderr (engine logs) passes through to ours."""
    env = {**LAUNCH_ENV, **(vllm_thread_env(args.threads) if engine == "vllm" else {})}
    start = time.perf_counter()
    proc = subprocess.run(worker_command(engine, args, spec_path), env=env, cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{engine} worker failed (exit {proc.returncode}); its log is above")
    result: dict[str, Any] = {"workloads": {}}
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        kind = record.pop("kind")
        record.pop("engine")
        if kind == "workload":
            result["workloads"][record["workload"]] = record
        elif kind == "check":
            result["check"] = record["tokens"]
        else:
            result["info"] = record
    result["info"]["process_s"] = round(time.perf_counter() - start, 2)
    return result


# -- the report -------------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    import torch

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, env={**LAUNCH_ENV, "LC_ALL": "C"}).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    return {
        "cpu_model": fields.get("Model name", "").strip(),
        "cpu_family": fields.get("CPU family", "").strip(),  # with the model number: the generation
        "cpu_model_number": fields.get("Model", "").strip(),
        "cpu_flags": fields.get("Flags", "").strip(),
        "cpus": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def git_state() -> dict[str, Any]:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "thrifty_dirty": bool(git("status", "--porcelain", "--", "thrifty"))}


def summarize(workloads: list[Workload], rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for w in workloads:
        per_round = []
        for i, r in enumerate(rounds, 1):
            figures = {e: r[e]["workloads"][w.name] for e in ENGINES}
            ratio = figures["thrifty"][w.ratio_metric] / figures["vllm"][w.ratio_metric]
            per_round.append({"round": i, **figures, "ratio": round(ratio, 4)})
        ratios = [r["ratio"] for r in per_round]
        out[w.name] = {
            "num_prompts": w.num_prompts, "input_len": w.input_len, "output_len": w.output_len,
            "ratio_metric": w.ratio_metric, "rounds": per_round,
            "ratio_median": round(statistics.median(ratios), 4), "ratio_min": min(ratios),
        }
    return out


def bandwidth_fraction(b1: dict[str, Any] | None, bytes_per_token: int, when: str) -> dict[str, Any] | None:
    """B1 tok/s as a fraction of the bandwidth limit (every weight read once per token): for each
    engine, each round's runs against the read bandwidth its worker measured right `when`
    ("before" or "after") the run, and the median over all of them."""
    if b1 is None:
        return None
    out: dict[str, Any] = {}
    for e in ENGINES:
        per_round = [[round(run["output_tokens_per_s"] * bytes_per_token / (run[f"read_gbs_{when}"] * 1e9), 4)
                      for run in r[e]["runs"]] for r in b1["rounds"]]
        out[e] = {"rounds": per_round, "median": statistics.median(f for runs in per_round for f in runs)}
    return out


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (bf16 near-ties can flip one engine's greedy pick)."""
    same_len = len(a) == len(b)
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if same_len else min(len(a), len(b)))


def print_table(summary: dict[str, Any]) -> None:
    for name, w in summary.items():
        m = w["ratio_metric"]
        cells = "  ".join(f"r{r['round']}: vllm {r['vllm'][m]:.1f} thrifty {r['thrifty'][m]:.1f} ({r['ratio']:.2f}x)"
                          for r in w["rounds"])
        log(f"{name:8s} {m}: {cells}  median {w['ratio_median']:.2f}x")


def main() -> None:
    args = parse_args()
    if args.b1_repeats < 1:
        raise SystemExit("--b1-repeats must be at least 1")
    workloads = [w.scaled(args.scale) for w in WORKLOADS if w.name in args.workloads]

    ensure_hf_folder(args.hf_dir, args.make_hf_script)
    weights = decode_weight_params(args.hf_dir)
    weights["bytes_per_token_bf16"] = weights["params_per_token"] * BYTES_PER_ELEMENT["bfloat16"]
    weights["bytes_per_token"] = weights["params_per_token"] * BYTES_PER_ELEMENT[args.dtype]

    # Seed offsets: a workload's index in WORKLOADS (its prompts do not depend on the selection),
    # then the warm-up prompt's own. The check prompt is W64's first prompt, chosen or not.
    make_prompts = PromptMaker(args.hf_dir, args.max_model_len, args.seed)
    offsets = {w.name: i for i, w in enumerate(WORKLOADS)}
    b1_runs = next((replace(w, num_prompts=args.b1_repeats) for w in workloads if w.name == "B1"), None)
    spec = {
        "dtype": args.dtype, "threads": args.threads, "hf_dir": str(args.hf_dir), "max_model_len": args.max_model_len,
        "warmup": {"prompt": make_prompts(WARMUP, len(WORKLOADS))[0], "max_tokens": WARMUP.output_len},
        "workloads": [{"name": w.name, "prompts": make_prompts(b1_runs if w.name == "B1" else w, offsets[w.name]),
                       "max_tokens": w.output_len} for w in workloads],
        "check": {"prompt": make_prompts(WORKLOADS[0].scaled(args.scale), 0)[0], "max_tokens": args.check_tokens},
    }

    log("measuring read bandwidth")
    bandwidth = {"before_gbs": read_bandwidth_gbs(args.threads)}
    rounds: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="peer_vllm_") as tmp:
        for engine in ENGINES:
            path = Path(tmp) / f"{engine}.json"
            path.write_text(json.dumps({**spec, "engine_args": getattr(args, f"{engine}_args")}))
        for i in range(1, args.rounds + 1):
            rounds.append({})
            for engine in ENGINES:
                log(f"round {i}/{args.rounds}: {engine}")
                rounds[-1][engine] = run_worker(engine, args, Path(tmp) / f"{engine}.json")
    bandwidth["after_gbs"] = read_bandwidth_gbs(args.threads)
    bandwidth["best_gbs"] = max(bandwidth["before_gbs"], bandwidth["after_gbs"])
    bandwidth["method"] = (f"torch fp32 sum over 1 GiB of random values, {args.threads} threads, best of 5; "
                           "each B1 run's own figures are measured by its worker right before and after it "
                           "(read_gbs_before, read_gbs_after)")
    ceiling = bandwidth["best_gbs"] * 1e9 / weights["bytes_per_token"]
    bandwidth["decode_ceiling_tokens_per_s"] = round(ceiling, 2)

    summary = summarize(workloads, rounds)
    checks = {e: [r[e]["check"] for r in rounds] for e in ENGINES}
    result = {
        "benchmark": "thrifty vs vLLM-CPU (benchmarks/peer_vllm.py)",
        "machine": machine_info(),
        "settings": {
            "model": "SmolLM2-135M-Instruct (thrifty: its GGUF; vLLM: the HF folder made from it)",
            "workloads": args.workloads, "rounds": args.rounds, "dtype": args.dtype, "threads": args.threads,
            "scale": args.scale, "max_model_len": args.max_model_len, "seed": args.seed,
            "sampling": "greedy (temperature 0), ignore_eos, exactly max_tokens per request",
            "thrifty_args": args.thrifty_args, "vllm_args": args.vllm_args,
            "vllm_venv": str(args.vllm_venv), "hf_dir": str(args.hf_dir), "thrifty_git": git_state(),
        },
        "engines": {e: [r[e]["info"] for r in rounds] for e in ENGINES},
        "workloads": summary,
        "weights": weights,
        "bandwidth": bandwidth,
        "b1_fraction_of_bandwidth_limit": bandwidth_fraction(summary.get("B1"), weights["bytes_per_token"], "before"),
        "b1_fraction_of_bandwidth_limit_after": bandwidth_fraction(summary.get("B1"), weights["bytes_per_token"],
                                                                   "after"),
        "greedy_check": {
            "prompt": "first W64 prompt", "num_tokens": args.check_tokens,
            "vllm": checks["vllm"][0], "thrifty": checks["thrifty"][0],
            "match": all(t == checks["vllm"][0] for ts in checks.values() for t in ts),  # every round
            "first_mismatch": first_mismatch(checks["vllm"][0], checks["thrifty"][0]),
        },
    }
    print_table(summary)
    for key in ("b1_fraction_of_bandwidth_limit", "b1_fraction_of_bandwidth_limit_after"):
        if result[key] is not None:
            log(f"{key}: " + "  ".join(f"{e} {f['rounds']} median {f['median']:.2f}" for e, f in result[key].items()))
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
