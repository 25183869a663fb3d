"""One engine's half of `benchmarks/peer_vllm.py`: load the engine once, run the workloads, report.

Started by the orchestrator in the engine's own virtual environment, never by hand:

    /work/main/.venv/bin/python benchmarks/peer_worker.py thrifty SPEC.json
    /tmp/vllm-cpu-venv/bin/vllm-env /tmp/vllm-cpu-venv/bin/python benchmarks/peer_worker.py vllm SPEC.json

SPEC.json (written by the orchestrator) holds the settings and every prompt as token ids:
    {"dtype": "bfloat16", "threads": 2, "hf_dir": "...", "max_model_len": 2048, "engine_args": {...},
     "warmup": {"prompt": [ids], "max_tokens": n},
     "workloads": [{"name": "W64", "prompts": [[ids], ...], "max_tokens": 128}, ...],
     "check": {"prompt": [ids], "max_tokens": 16}}

Stdout carries only JSON lines, in this order: one {"kind": "info"} (versions, load time, the
engine's effective settings), one {"kind": "workload"} per workload, one {"kind": "check"} (the
greedy tokens of the check prompt, generated after the timed work so it cannot warm or cache
anything for it). Everything the engines log goes to stderr: vLLM logs to stdout by default.

Only the standard library is imported at module level: the file must import in both virtual
environments, and vLLM's spawned engine process re-imports it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, is_dataclass
from typing import Any, Callable, TextIO

# generate(list of prompts as token ids, max_tokens) -> the generated token ids of each prompt
Generate = Callable[[list[list[int]], int], list[list[int]]]


def load_thrifty(spec: dict[str, Any]) -> tuple[Generate, dict[str, Any]]:
    import torch

    import thrifty
    from thrifty import LLM, SamplingParams

    llm = LLM(dtype=spec["dtype"], num_threads=spec["threads"], **spec["engine_args"])
    config = getattr(llm.llm_engine, "config", None)
    info = {
        "version": thrifty.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "engine_config": asdict(config) if is_dataclass(config) else repr(config),
    }
    return _generator(llm, SamplingParams), info


def load_vllm(spec: dict[str, Any]) -> tuple[Generate, dict[str, Any]]:
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["hf_dir"], dtype=spec["dtype"], max_model_len=spec["max_model_len"], seed=0,
              **spec["engine_args"])
    cfg = llm.llm_engine.vllm_config
    info = {
        "version": vllm.__version__,
        "torch": torch.__version__,
        "block_size": cfg.cache_config.block_size,
        "num_kv_blocks": cfg.cache_config.num_gpu_blocks,
        "kv_cache_bytes": cfg.cache_config.kv_cache_memory_bytes,
        "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
        "max_num_seqs": cfg.scheduler_config.max_num_seqs,
        "enable_chunked_prefill": cfg.scheduler_config.enable_chunked_prefill,
        "enable_prefix_caching": cfg.cache_config.enable_prefix_caching,
        "compilation_mode": getattr(cfg.compilation_config.mode, "name", str(cfg.compilation_config.mode)),
        "env": {k: v for k, v in sorted(os.environ.items())
                if k.startswith(("VLLM_", "OMP_", "KMP_")) or k == "LD_PRELOAD"},
    }
    return _generator(llm, SamplingParams), info


def _generator(llm: Any, sampling_params_cls: type) -> Generate:
    """Both engines share vLLM's offline API: LLM.generate(prompts, SamplingParams, use_tqdm=...)."""

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = sampling_params_cls(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    return generate


LOADERS: dict[str, Callable[[dict[str, Any]], tuple[Generate, dict[str, Any]]]] = {
    "thrifty": load_thrifty,
    "vllm": load_vllm,
}


def read_bandwidth_gbs(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Best-of-`repeats` read bandwidth (GB/s) of a torch sum over a `gib` GiB fp32 tensor."""
    import torch

    torch.set_num_threads(threads)
    # Random values: pages of one repeated value can be merged by the host (same-page merging)
    # and then read from cache, which measured up to 1.8x the real rate on these machines.
    x = torch.randn(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return round(x.numel() * 4 / best / 1e9, 2)


def timed_generate(generate: Generate, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    outputs = generate(prompts, max_tokens)
    elapsed = time.perf_counter() - start
    num_in, num_out = sum(map(len, prompts)), sum(map(len, outputs))
    return {
        "num_prompts": len(prompts),
        "input_tokens": num_in,
        "output_tokens": num_out,
        "exact_output_len": all(len(o) == max_tokens for o in outputs),
        "elapsed_s": round(elapsed, 4),
        "output_tokens_per_s": round(num_out / elapsed, 3),
        "total_tokens_per_s": round((num_in + num_out) / elapsed, 3),
    }


def run_workload(generate: Generate, workload: dict[str, Any], threads: int) -> dict[str, Any]:
    prompts, max_tokens = workload["prompts"], workload["max_tokens"]
    if workload["name"] != "B1":
        return {"workload": workload["name"], **timed_generate(generate, prompts, max_tokens)}
    # The batch-1 figure is judged against the memory bandwidth: measure it right before and right
    # after each run, in the same process, so the figures see the same neighbours on this shared
    # machine, whose read rate moves from minute to minute. B1 has one prompt per run, each run
    # between two measurements (a prompt of its own: a repeated one would hit thrifty's prefix
    # cache, of 16-token blocks, and not vLLM's, of 128), and the median run is the figure.
    runs = []
    for prompt in prompts:
        before = read_bandwidth_gbs(threads)
        run = timed_generate(generate, [prompt], max_tokens)
        runs.append({**run, "read_gbs_before": before, "read_gbs_after": read_bandwidth_gbs(threads)})
    median = sorted(runs, key=lambda r: r["output_tokens_per_s"])[(len(runs) - 1) // 2]  # the lower, if even
    return {"workload": "B1", **median, "runs": runs}


def emit(out: TextIO, kind: str, engine: str, record: dict[str, Any]) -> None:
    out.write(json.dumps({"kind": kind, "engine": engine, **record}) + "\n")
    out.flush()


def main() -> None:
    engine, spec_path = sys.argv[1], sys.argv[2]
    if engine not in LOADERS:
        raise SystemExit(f"peer_worker: engine must be one of {sorted(LOADERS)}, got {engine!r}")
    # Keep the real stdout for the JSON lines; everything else written to fd 1 (vLLM's logger,
    # prints, child processes started from here) lands on stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    with open(spec_path) as f:
        spec = json.load(f)

    start = time.perf_counter()
    generate, info = LOADERS[engine](spec)
    info["load_s"] = round(time.perf_counter() - start, 2)
    emit(out, "info", engine, info)

    generate([spec["warmup"]["prompt"]], spec["warmup"]["max_tokens"])
    for workload in spec["workloads"]:
        emit(out, "workload", engine, run_workload(generate, workload, spec["threads"]))
    tokens = generate([spec["check"]["prompt"]], spec["check"]["max_tokens"])[0]
    emit(out, "check", engine, {"tokens": tokens})


if __name__ == "__main__":
    main()
