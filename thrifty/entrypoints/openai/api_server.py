"""The OpenAI-compatible HTTP server: FastAPI routes over one AsyncLLM, served by uvicorn.

The model loads before the port opens. SIGTERM (or Ctrl-C) stops accepting connections, lets
running requests finish for up to --shutdown-timeout seconds, then stops the engine and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hmac
import logging
import signal
import time
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

import thrifty
from thrifty.config import EngineConfig
from thrifty.cost.prices import PriceChoice, server_price
from thrifty.engine.async_llm import AsyncLLM, EngineDeadError
from thrifty.engine.metrics import EngineMetrics
from thrifty.engine.sleep import EngineSleepingError, SleepConfig
from thrifty.entrypoints.openai.limits import (
    KeyLimitsCollector,
    KeyPolicy,
    Limiter,
    check_priced,
    check_priorities,
    parse_api_keys,
)
from thrifty.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from thrifty.entrypoints.openai.serving import (
    APIError,
    OpenAIServing,
    bad_request,
    from_value_error,
    unavailable,
)
from thrifty.entrypoints.openai.tools import check_tools

logger = logging.getLogger("thrifty.server")

OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/ping"})  # reachable without an API key


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return f"Malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    parts = []
    for e in errors[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {e.get('msg')}")
    return "; ".join(parts), param


def build_app(llm: AsyncLLM, served_model_names: list[str], api_keys: dict[str, KeyPolicy] | None = None,
              chat_template: str | None = None, model_root: str | None = None,
              trust_request_chat_template: bool = False, enable_auto_tool_choice: bool = False,
              tool_call_parser: str | None = None, price: PriceChoice | None = None,
              usage_db: str | None = None) -> FastAPI:
    """`api_keys` from parse_api_keys; `usage_db` the SQLite file of the keys' usage, opened (at
    the default path if None) only when a key has a limit."""
    metrics = EngineMetrics(llm, served_model_names[0], price)
    policies = list((api_keys or {}).values())
    check_priced(policies, llm.cost.price_per_hour)
    check_priorities(policies, llm.engine.config.scheduling_policy)
    limiter = Limiter.open(policies, usage_db)
    if limiter is not None:
        metrics.registry.register(KeyLimitsCollector(limiter, served_model_names[0]))
    serving = OpenAIServing(llm, served_model_names, chat_template, metrics.observe_key_usage,
                            trust_request_chat_template, enable_auto_tool_choice, tool_call_parser, limiter)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        llm.start()
        try:
            yield
        finally:
            await llm.shutdown()
            if limiter is not None:
                limiter.close()  # after the last request's usage is counted: every write done

    app = FastAPI(title="thrifty", version=thrifty.__version__, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(bad_request(message, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), type=kind).body(),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError):
        return JSONResponse(APIError(503, str(exc), type="service_unavailable").body(), status_code=503)

    @app.exception_handler(EngineSleepingError)
    async def engine_sleeping(_: Request, exc: EngineSleepingError):
        err = unavailable(exc)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception):
        logger.exception("unhandled error", exc_info=exc)
        return JSONResponse(APIError(500, f"internal error: {exc}", type="internal_error").body(), status_code=500)

    if api_keys:
        expected = [(f"Bearer {key}".encode(), policy) for key, policy in api_keys.items()]

        @app.middleware("http")
        async def authenticate(request: Request, call_next):
            if request.method != "OPTIONS" and request.url.path not in OPEN_PATHS:
                given = request.headers.get("authorization", "").encode()
                # Compare with every key (constant time each), so timing tells nothing about which matched.
                matches = [policy for key, policy in expected if hmac.compare_digest(given, key)]
                if not matches:
                    err = APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer KEY'.",
                                   code="invalid_api_key")
                    return JSONResponse(err.body(), status_code=401)
                request.state.key_name = matches[0].name
                request.state.key_policy = matches[0]
            return await call_next(request)

    def respond(result):
        if isinstance(result, Response):
            return result
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def key_policy(raw: Request) -> KeyPolicy | None:
        return getattr(raw.state, "key_policy", None)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return respond(await _cancel_on_disconnect(raw, serving.create_completion(req, key_policy(raw))))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        return respond(await _cancel_on_disconnect(raw, serving.create_chat_completion(req, key_policy(raw))))

    created = int(time.time())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "thrifty", "root": model_root,
             "parent": None, "max_model_len": serving.max_model_len} for name in served_model_names]}

    @app.get("/health")
    async def health():
        if llm.is_running:
            return Response(status_code=200)
        return Response(status_code=503)

    @app.get("/ping")
    async def ping():
        return await health()

    @app.get("/version")
    async def version():
        return {"version": thrifty.__version__}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if llm.engine.config.enable_sleep_mode:
        _add_sleep_routes(app, llm, admin_only=any(p.admin for p in policies))

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        serving.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of 'prompt' or 'messages'", "prompt")
        if req.prompt is not None:
            ids = serving.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            chat = ChatCompletionRequest(messages=req.messages, add_generation_prompt=req.add_generation_prompt)
            ids = serving.chat_prompt(chat, check_tools(req.tools or [])).token_ids
        return {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        serving.check_model(req.model)
        try:
            llm.engine.check_vocab(req.tokens, "tokens")
        except ValueError as e:
            raise from_value_error(e) from None
        return {"prompt": serving.tokenizer.decode(req.tokens)}

    return app


def _add_sleep_routes(app: FastAPI, llm: AsyncLLM, admin_only: bool) -> None:
    """vLLM's sleep-mode routes (--enable-sleep-mode); behind the API key like /v1 when keys are set,
    and once any key is marked admin, sleep and wake are for admin keys only (a tenant's key must not
    put the server to sleep under the other tenants)."""

    def check_admin(raw: Request) -> None:
        policy = getattr(raw.state, "key_policy", None)
        if admin_only and not (policy is not None and policy.admin):
            raise APIError(403, f"{raw.url.path} needs an admin API key (a key with admin: true)",
                           type="permission_error", code="admin_key_required")

    @app.post("/sleep")
    async def sleep(raw: Request):
        check_admin(raw)
        level = raw.query_params.get("level", "1")
        if not level.isdigit():
            raise bad_request(f"level: must be 1 or 2, got {level!r}", "level")
        try:
            result = await llm.sleep(int(level), raw.query_params.get("mode", "abort"))
        except ValueError as e:
            raise from_value_error(e) from None
        return {"status": "sleeping", "level": result.level, "released_bytes": result.released_bytes,
                "seconds": round(result.seconds, 4)}

    @app.post("/wake_up")
    async def wake_up(raw: Request):
        check_admin(raw)
        # (vLLM's `tags` pick what to wake on CUDA; thrifty always wakes everything)
        return {"status": "awake", "seconds": round(await llm.wake_up(), 4)}

    @app.get("/is_sleeping")
    async def is_sleeping():
        return {"is_sleeping": llm.is_sleeping}


async def _cancel_on_disconnect(raw: Request, work: Awaitable):
    """Runs a handler, cancelling it (and so aborting its requests) if the client goes away first.
    Starlette notices a disconnect by itself only while it streams a response."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Response(status_code=499)  # nobody is there to read it


def _load_chat_template(value: str | None) -> str | None:
    """--chat-template is a file path or the template itself (as in vLLM)."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path.read_text()
    if "{" not in value:
        raise ValueError(f"chat_template: {value!r} is neither a file nor a Jinja template")
    return value


def resolve_price(given: float | None, config: EngineConfig, vcpus: float | None = None) -> PriceChoice:
    """--price-per-hour (0: cost off), else on CUDA the price table's entry for the detected GPU,
    else an estimate from the table's CPU instances scaled to the CPUs this server may use (or to
    `vcpus`, a Ray replica's share). Logged, so the price behind every cost_usd is on record."""
    gpu_name = None
    if given is None and config.resolve_device().startswith("cuda"):
        import torch

        gpu_name = torch.cuda.get_device_name(torch.device(config.resolve_device()))
    choice = server_price(given, gpu_name, vcpus=vcpus)
    # No price where one was expected (a GPU the table lacks) is worth a warning; 0 by request is not.
    level = logging.WARNING if choice.source == "off" and given is None else logging.INFO
    logger.log(level, choice.describe())
    return choice


def sleep_config(args: argparse.Namespace) -> SleepConfig:
    """The sleep flags of `thrifty serve` (they need --enable-sleep-mode, which AsyncLLM checks)."""
    return SleepConfig(wake_on_request=args.wake_on_request, sleep_when_idle=args.sleep_when_idle,
                       sleep_level=args.sleep_level, drain_timeout=args.sleep_drain_timeout)


def freeze_startup_heap() -> None:
    """Exempt what start-up built (the tokenizer, the model's modules, the libraries: hundreds of
    thousands of objects) from the garbage collector, as vLLM's server does: a full collection
    otherwise walks all of it, holding the GIL, and every request in flight, the engine's step
    included, waits that long. Only for a process that serves one engine: what is frozen is never
    collected."""
    gc.collect()
    gc.freeze()


def run_server(args: argparse.Namespace, config: EngineConfig) -> int:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    chat_template = _load_chat_template(args.chat_template)
    api_keys = parse_api_keys(args.api_key, args.api_key_file)
    price = resolve_price(args.price_per_hour, config)
    # (build_app checks again: here they fail before the model loads)
    check_priced(api_keys.values(), price.price_per_hour_usd)
    check_priorities(api_keys.values(), config.scheduling_policy)
    llm = AsyncLLM(config, max_waiting_requests=args.max_waiting_requests or None,
                   price_per_hour=price.price_per_hour_usd, sleep_config=sleep_config(args))
    names = args.served_model_name or [llm.engine.model_name]
    app = build_app(llm, names, api_keys, chat_template, str(llm.engine.source.path or ""),
                    args.trust_request_chat_template, args.enable_auto_tool_choice, args.tool_call_parser, price,
                    args.usage_db)
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level,
        access_log=not args.disable_uvicorn_access_log, timeout_graceful_shutdown=args.shutdown_timeout,
        timeout_keep_alive=5))
    logger.info("serving %s on http://%s:%d/v1", names[0], args.host, args.port)
    # uvicorn drains on SIGTERM, then re-raises the signal into the handler that was installed
    # before it; a no-op there makes a graceful shutdown exit 0 rather than die by the signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    freeze_startup_heap()
    server.run()
    return 0 if server.started else 1
