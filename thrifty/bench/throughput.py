"""`thrifty bench throughput`: offline throughput of the engine on a synthetic workload."""

from __future__ import annotations

import json
import time

import torch

from thrifty.bench.datasets import grounded_dataset, make_dataset
from thrifty.cpuinfo import cpu_flags_line, cpu_name
from thrifty.entrypoints.llm import LLM
from thrifty.sampling_params import SamplingParams


# The workloads the CPU performance goals are measured on (docs/benchmarks.md):
# name -> (prompts, input tokens, output tokens). Greedy, exactly the output length.
WORKLOADS = {
    "W64": (64, 128, 128),  # a batch of 64 chat-sized requests
    "B1": (1, 128, 128),  # one request alone: bound by streaming the weights
    "long": (16, 1024, 256),  # long contexts: attention over the tokens each one really has
    "prefill": (8, 1024, 1),  # prompt processing only
}


def make_requests(llm: LLM, dataset: str, num_prompts: int, input_len: int, output_len: int,
                  ignore_eos: bool = True, seed: int = 0, temperature: float = 0.0
                  ) -> tuple[list[dict], list[SamplingParams]]:
    """The workload's prompts and their sampling parameters. Greedy by default; with a
    temperature, each request is seeded (seed + its index)."""
    engine = llm.llm_engine
    tok = engine.tokenizer
    special = set(tok.all_special_ids) | set(engine.eos_token_ids)
    if dataset == "grounded":
        requests = grounded_dataset(tok, num_prompts, input_len, output_len, engine.max_model_len, seed)
    else:
        requests = make_dataset(dataset, num_prompts, input_len, output_len, engine.vocab_size, special,
                                engine.max_model_len, seed)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=temperature, max_tokens=r.output_len, ignore_eos=ignore_eos,
                             seed=seed + i if temperature else None) for i, r in enumerate(requests)]
    return prompts, params


def warm_up(llm: LLM, prompt: dict) -> None:
    """One tiny request warms allocator and kernels, so the clock measures steady work; then the
    engine's counters start afresh."""
    llm.generate([prompt], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    llm.llm_engine.reset_stats()


def run_throughput(llm: LLM, dataset: str, num_prompts: int, input_len: int, output_len: int,
                   ignore_eos: bool = True, seed: int = 0, use_tqdm: bool = True, temperature: float = 0.0) -> dict:
    engine = llm.llm_engine
    prompts, params = make_requests(llm, dataset, num_prompts, input_len, output_len, ignore_eos, seed, temperature)
    warm_up(llm, prompts[0])
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    elapsed = time.perf_counter() - start

    num_in = sum(len(p["prompt_token_ids"]) for p in prompts)
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    kv = engine.kv_cache_manager
    return {
        "model": engine.model_name,
        "scheduler": engine.config.scheduler_policy,
        "dataset": dataset,
        "num_prompts": num_prompts,
        "input_len": input_len,
        "output_len": output_len,
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(num_prompts / elapsed, 3),
        "output_tokens_per_s": round(num_out / elapsed, 2),
        "total_tokens_per_s": round((num_in + num_out) / elapsed, 2),
        "kv_blocks_total": kv.num_blocks,
        "kv_blocks_peak": engine.stats.kv_blocks_peak,
        "kv_waste_frac": round(engine.stats.kv_waste_frac, 4),
        "total_input_tokens": num_in,
        "total_output_tokens": num_out,
        "num_steps": engine.stats.num_steps,
        "num_preemptions": engine.make_stats().num_preemptions,
        **spec_fields(engine),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "quantization": engine.config.quantization,
        "quantization_group_size": engine.config.quantization_group_size,
        "weight_bytes": engine.runner.weight_bytes,
        "kv_bytes_per_token": engine.runner.kv_bytes_per_token,
        "device": str(engine.runner.device),
        "backend": engine.runner.backend,
        "threads": torch.get_num_threads(),
        "max_num_seqs": engine.config.max_num_seqs,
        "max_num_batched_tokens": engine.config.max_num_batched_tokens,
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags_line(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def spec_fields(engine) -> dict:
    if engine.spec is None:
        return {"speculative_config": None}
    spec = engine.scheduler.spec_stats
    return {"speculative_config": {k: getattr(engine.spec, k) for k in (
                "method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "switch")},
            "spec_num_drafts": spec.num_drafts, "spec_num_draft_tokens": spec.num_draft_tokens,
            "spec_num_accepted_tokens": spec.num_accepted_tokens,
            "spec_acceptance_rate": round(spec.num_accepted_tokens / spec.num_draft_tokens, 4)
            if spec.num_draft_tokens else None,
            "spec_acceptance_per_pos": [round(a / spec.num_drafts, 4) for a in spec.accepted_per_pos]
            if spec.num_drafts else []}


def print_table(result: dict) -> None:
    keys = ["model", "scheduler", "dataset", "num_prompts", "elapsed_s", "requests_per_s",
            "output_tokens_per_s", "total_tokens_per_s", "kv_blocks_peak", "kv_blocks_total", "kv_waste_frac"]
    width = max(map(len, keys))
    print("=" * 20 + " thrifty bench throughput " + "=" * 20)
    for k in keys:
        print(f"{k:<{width}}  {result[k]}")


def write_json(result: dict, path: str | None) -> None:
    line = json.dumps(result)
    print(line)
    if path:
        with open(path, "w") as f:
            f.write(line + "\n")
