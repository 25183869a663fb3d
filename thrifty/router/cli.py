"""`thrifty router`: its flags, and starting it. Imports neither torch nor the engine."""

from __future__ import annotations

import argparse
import logging
import signal

from thrifty.router.escalation import REASONS
from thrifty.router.policies import POLICIES


def register(sub) -> None:
    p = sub.add_parser("router", help="an OpenAI-compatible gateway in front of several servers (no torch)",
                       description="Routes OpenAI requests to OpenAI-compatible backends (thrifty, vLLM, "
                                   "llama.cpp's server) by policy, keeps unhealthy ones out, retries once "
                                   "elsewhere before the first byte, and escalates through model tiers.")
    p.add_argument("--backend", action="append", default=None, metavar="URL",
                   help="a backend's root URL, e.g. http://127.0.0.1:8001 (repeatable)")
    p.add_argument("--backend-dns", action="append", default=None, metavar="URL",
                   help="a URL whose host name resolves to several addresses (a Kubernetes headless Service): "
                        "one backend per address, re-resolved every --health-interval (repeatable)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a YAML or JSON file with backends, backend_dns, tiers, tiered_model, policy, "
                        "escalation; reloaded when it changes (flags add to it)")
    p.add_argument("--policy", default=None, choices=list(POLICIES),
                   help="how a replica is chosen (default: prefix_aware): round_robin; least_loaded (scraped "
                        "running + waiting, plus requests sent since the scrape); prefix_aware (the replica that "
                        "served the longest prefix, within the load guard); session (sticky by the 'user' field "
                        "or --session-header)")
    p.add_argument("--tier", action="append", default=None, metavar="NAME=URL[,URL...]",
                   help="a model tier, cheapest first (repeatable); requests for --tiered-model go through them")
    p.add_argument("--tiered-model", default=None,
                   help="the model name that goes through the tiers (default: auto)")
    p.add_argument("--escalate-on", default=None, metavar="REASONS",
                   help=f"comma-separated, from {', '.join(REASONS)} (default: all)")
    p.add_argument("--escalate-min-logprob", type=float, default=None,
                   help="low_logprob: escalate when a choice's mean token logprob is under this (default -1.0)")
    p.add_argument("--health-interval", type=float, default=2.0,
                   help="seconds between health checks and metrics scrapes of each backend")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a backend may take to answer")
    p.add_argument("--session-header", default="x-session-id",
                   help="session: the header that names a session when the body has no 'user'")
    p.add_argument("--prefix-block-chars", type=int, default=128,
                   help="prefix_aware: characters per hashed block of the prompt")
    p.add_argument("--balance-abs", type=float, default=4.0,
                   help="prefix_aware load guard: a replica stays eligible while within this many requests of "
                        "the least loaded one...")
    p.add_argument("--balance-rel", type=float, default=1.5, help="...or within this ratio of its load")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_router)


def load_config(args: argparse.Namespace):
    from thrifty.router.config import build_config, read_file

    return build_config(read_file(args.config) if args.config else None, args.backend, args.backend_dns, args.tier,
                        args.policy, args.tiered_model, args.escalate_on, args.escalate_min_logprob)


def cmd_router(args: argparse.Namespace) -> int:
    import uvicorn

    from thrifty.router.app import Router

    if args.health_interval <= 0 or args.request_timeout <= 0:
        raise ValueError("health_interval and request_timeout must be > 0")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    config = load_config(args)
    router = Router(config, reload=lambda: load_config(args), config_path=args.config,
                    health_interval=args.health_interval, request_timeout=args.request_timeout,
                    session_header=args.session_header,
                    prefix_options={"block_chars": args.prefix_block_chars, "balance_abs": args.balance_abs,
                                    "balance_rel": args.balance_rel})
    server = uvicorn.Server(uvicorn.Config(router.build_app(), host=args.host, port=args.port,
                                           log_level=args.log_level, access_log=False, timeout_keep_alive=5))
    logging.getLogger("thrifty.router").info("routing on http://%s:%d/v1 (policy %s)", args.host, args.port,
                                             config.policy)
    signal.signal(signal.SIGTERM, lambda *_: None)  # as in `thrifty serve`: a drained SIGTERM exits 0
    server.run()
    return 0 if server.started else 1
