"""Speculative decoding against none, on an input-grounded workload, at batch 1 and batch 32.

    python benchmarks/spec_decode.py [--json FILE] [--rounds 2] [--configs none,ngram_cost,...]

The workload is `thrifty bench throughput --dataset grounded`: passages of Python's documentation
(pydoc_data, shipped with CPython) to be copied, greedy, up to --output-len tokens (stopping at
EOS). Configurations (--configs): none; each method with the cost-aware switch (thrifty's
default; `_cost`) and always on (`_always`): ngram, layer_skip (--skip-layers of the target's
layers) and draft (a draft model made of --draft-layers of the default model's layers by
thrifty.model.truncate, the only same-vocabulary draft at hand); none_control, a second engine
without speculation, measures how much two identical engines in one process differ. All engines
are loaded first, in the order given. Then, per round, each workload and batch size runs on every
engine in lockstep: the same requests on each, one engine step of each in turn, the clock
counting only each engine's own steps, so that the host's noise (which comes and goes over
seconds to minutes) falls on all alike. Batch 1 is --b1-prompts requests one after the other,
each alone in every engine. The order is reversed every other round. Prints one JSON line per
run (with the steps that verified proposals and their seconds, and the decoding alone: the
steps without prompt tokens) and a summary of ratios against none, end to end and decoding.
"""

from __future__ import annotations

import argparse
import json
import time

from thrifty import LLM
from thrifty.bench.throughput import make_requests, spec_fields, warm_up
from thrifty.cpuinfo import cpu_flags_line, cpu_name
from thrifty.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256, help="a copy of the whole passage, then EOS")
    ap.add_argument("--b1-prompts", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default="auto")
    ap.add_argument("--workloads", default="grounded,random,sampled",
                    help="grounded (outputs copy the prompt); random (random prompt tokens, greedy: this model "
                         "then falls into repeating itself, which proposals predict); sampled (random prompts, "
                         "temperature 1: proposals are rarely found or right, the case the cost-aware switch is for)")
    ap.add_argument("--configs", default="none,ngram_cost,ngram_always")
    ap.add_argument("--skip-layers", type=int, default=20, help="layer_skip's num_layers")
    ap.add_argument("--draft-layers", type=int, default=12, help="the draft model's layers")
    ap.add_argument("--draft-quantization", default="int4",
                    help="the draft model's weights (its truncated copy is written as float)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    def spec(name: str) -> dict | None:
        if name.startswith("none"):  # "none_control": a second engine without, loaded where it is named
            return None
        method, switch = name.rsplit("_", 1)
        keys = {"ngram": {"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 5},
                "layer_skip": {"method": "layer_skip", "num_layers": args.skip_layers},
                "draft": {"method": "draft_model", "model": draft_dir, "quantization": args.draft_quantization}}[method]
        return {**keys, "num_speculative_tokens": args.k, "switch": switch}

    names = args.configs.split(",")
    draft_dir = None
    if any(n.startswith("draft_") for n in names):
        import tempfile

        from thrifty.model.truncate import truncate_model

        draft_dir = str(truncate_model(None, tempfile.mkdtemp(prefix="thrifty-draft-"), args.draft_layers))
    configs = {name: spec(name) for name in names}
    llms = {name: LLM(dtype=args.dtype, quantization=args.quantization, max_model_len=2048, kv_cache_memory=1.0,
                      speculative_config=spec) for name, spec in configs.items()}
    rows = []
    for rnd in range(args.rounds):
        for workload in args.workloads.split(","):
            for batch in (1, args.batch):
                order = list(configs) if rnd % 2 == 0 else list(configs)[::-1]
                runs: dict[str, list[dict]] = {name: [] for name in order}
                # Batch 1 is one prompt after another, each alone in every engine.
                for i in range(args.b1_prompts if batch == 1 else 1):
                    prompts, params = workload_requests(llms["none"], workload, batch, 100 * rnd + i, args)
                    for name, run in lockstep({name: llms[name] for name in order}, prompts, params).items():
                        runs[name].append(run)
                for name in order:
                    rows.append({"kind": "spec_decode", "round": rnd, "workload": workload, "batch": batch,
                                 "config": name, **_row(runs[name], llms[name], configs[name] is not None)})
                    print(json.dumps(rows[-1]), flush=True)
    summary = {"kind": "spec_decode_summary", "machine": cpu_name(), "cpu_flags": cpu_flags_line(),
               "date": time.strftime("%Y-%m-%d"), "dtype": str(llms["none"].llm_engine.dtype).removeprefix("torch."),
               "quantization": args.quantization, "commit": _commit(),
               "k": args.k, "skip_layers": args.skip_layers, "draft_layers": args.draft_layers,
               "draft_quantization": args.draft_quantization,
               "input_len": args.input_len, "output_len": args.output_len,
               "switch_table_ms": {name: _table_ms(llms[name]) for name in names if configs[name] is not None
                                   and configs[name]["switch"] == "cost"},
               "ratios_vs_none": {}, "decode_ratios_vs_none": {}}
    for r in rows:
        if r["config"] != "none":  # (none_control against none: how much engines differ by themselves)
            base = next(b for b in rows if b["config"] == "none" and b["round"] == r["round"]
                        and b["batch"] == r["batch"] and b["workload"] == r["workload"])
            key = f"{r['workload']}:{r['config']}@B{r['batch']}"
            summary["ratios_vs_none"].setdefault(key, []).append(
                round(r["output_tokens_per_s"] / base["output_tokens_per_s"], 3))
            summary["decode_ratios_vs_none"].setdefault(key, []).append(
                round(r["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3))
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**summary, "rows": rows}, f, indent=1)
            f.write("\n")


def _commit() -> str:
    import subprocess

    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def workload_requests(llm: LLM, workload: str, batch: int, seed: int, args) -> tuple[list[dict], list[SamplingParams]]:
    """grounded stops at EOS, the others ask for exactly output_len tokens; sampled is random
    prompts at temperature 1."""
    grounded = workload == "grounded"
    return make_requests(llm, "random" if workload == "sampled" else workload, batch, args.input_len,
                         args.output_len, ignore_eos=not grounded, seed=seed,
                         temperature=1.0 if workload == "sampled" else 0.0)


def lockstep(llms: dict[str, LLM], prompts: list[dict],
             params: list[SamplingParams] | dict[str, list[SamplingParams]]) -> dict[str, dict]:
    """Every engine serves the same requests (with the same parameters, or each engine its own),
    one step of each in turn (the order reversed every turn), and the clock counts only each
    engine's own steps. The host's noise, which comes and goes over seconds to minutes, then falls
    on every engine alike."""
    for name, llm in llms.items():
        warm_up(llm, prompts[0])
        # Every run starts from an empty prefix cache: runs reuse passages, and an engine with
        # a draft model holds fewer target blocks in the same memory, so fewer would stay cached.
        llm.reset_prefix_cache()
        for prompt, sp in zip(prompts, params[name] if isinstance(params, dict) else params):
            llm.llm_engine.add_request(prompt, sp)
    runs = {name: {"total_output_tokens": 0, "elapsed_s": 0.0, "prefill_s": 0.0, "speculating_steps": 0,
                   "speculating_s": 0.0, "slowest_step_s": 0.0} for name in llms}
    active = list(llms)
    while active:
        for name in list(active):
            engine = llms[name].llm_engine
            drafts = engine.scheduler.spec_stats.num_drafts
            prompt_tokens = engine.stats.num_prompt_tokens
            start = time.perf_counter()
            outputs = engine.step()
            seconds = time.perf_counter() - start
            run = runs[name]
            run["elapsed_s"] += seconds
            run["total_output_tokens"] += sum(len(o.outputs[0].token_ids) for o in outputs if o.finished)
            run["slowest_step_s"] = max(run["slowest_step_s"], seconds)
            if engine.stats.num_prompt_tokens > prompt_tokens:  # it computed prompt tokens
                run["prefill_s"] += seconds
            if engine.scheduler.spec_stats.num_drafts > drafts:  # it verified proposals
                run["speculating_steps"] += 1
                run["speculating_s"] += seconds
            if not engine.has_unfinished_requests():
                active.remove(name)
        active.reverse()
    return {name: {**runs[name], "num_prompts": len(prompts), **spec_fields(llm.llm_engine)}
            for name, llm in llms.items()}


def _table_ms(llm: LLM) -> dict:
    """The cost-aware switch's start-up table: target (and draft) forward ms by batch size and tokens each."""
    c = llm.llm_engine.controller
    return {which: {str(b): {str(q): round(t * 1e3, 2) for q, t in row.items()} for b, row in shape.table.items()}
            for which, shape in (("target", c.target), ("draft", c.draft)) if shape.table}


def _row(runs: list[dict], llm: LLM, speculative: bool) -> dict:
    tokens = sum(r["total_output_tokens"] for r in runs)
    seconds = sum(r["elapsed_s"] for r in runs)
    drafts = sum(r.get("spec_num_draft_tokens", 0) for r in runs)
    steps = {key: round(sum(r[key] for r in runs), 3) for key in ("prefill_s", "speculating_steps", "speculating_s")}
    # Decoding alone: the steps without prompt tokens, and the tokens after each request's first
    # (which its last prefill step samples).
    decode_tps = (tokens - sum(r["num_prompts"] for r in runs)) / (seconds - steps["prefill_s"])
    accepted = sum(r.get("spec_num_accepted_tokens", 0) for r in runs)
    return {"output_tokens": tokens, "elapsed_s": round(seconds, 3), "output_tokens_per_s": round(tokens / seconds, 2),
            "decode_tokens_per_s": round(decode_tps, 2),
            "acceptance_rate": round(accepted / drafts, 4) if drafts else None,
            "acceptance_per_pos": runs[-1].get("spec_acceptance_per_pos"), **steps,
            "slowest_step_s": round(max(r["slowest_step_s"] for r in runs), 3),
            "switch_estimates": llm.llm_engine.controller.estimates() if speculative else None}


if __name__ == "__main__":
    main()
