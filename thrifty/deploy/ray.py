"""thrifty on Ray Serve: replicas of one engine each, behind Ray Serve's HTTP proxy, autoscaled.

    serve run thrifty.deploy.ray:app                                   # the defaults
    serve run thrifty.deploy.ray:build_app model=/path/m.gguf max_replicas=4 target_ongoing_requests=16
    thrifty serve --ray --max-replicas 4 ...                           # run_from_cli()

Each replica is one AsyncLLM serving the routes of `thrifty serve` (api_server.build_app's FastAPI
app, handed to Serve through `serve.ingress`), plus `GET /cost`. Ray Serve's proxy spreads requests
over the replicas; its autoscaler keeps about `target_ongoing_requests` requests in flight per
replica, between `min_replicas` and `max_replicas`.

Cost: each replica is paid from the start of its constructor (the model load included) to the end
of its destructor, which Serve runs after draining it when it scales down or shuts down. A replica
reports its seconds (startup, busy and idle from thrifty's CostMeter) and tokens every
`cost_report_interval_s` and once more at its end to a named, detached Ray actor, the CostLedger of
its application and deployment. `GET /cost` (any replica answers) and `cost_summary()` sum the live
and the departed replicas: replica-seconds, replica-hours and dollars at each replica's price.

This module imports no torch: the engine is imported inside the replicas, so `serve run`'s driver,
the ledger's process and the CLI stay light.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
import typing
from typing import Any, Literal

import ray
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from ray import serve
from ray.serve import Application

from thrifty.config import EngineConfig

logger = logging.getLogger("thrifty.deploy.ray")

LEDGER_NAMESPACE = "thrifty"
DEFAULT_DEPLOYMENT_NAME = "thrifty"
DEFAULT_APP_NAME = "default"  # Ray Serve's own default (`serve run`)


# -- options ------------------------------------------------------------------------------
class _ServeOptions(BaseModel):
    """Everything but the engine's own fields (those come from EngineConfig, below). Strings are
    accepted and converted, as `serve run MODULE:build_app key=value ...` passes them."""

    model_config = ConfigDict(extra="forbid")

    # The deployment and its autoscaling (Ray Serve's AutoscalingConfig and deployment options).
    name: str = DEFAULT_DEPLOYMENT_NAME
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(16.0, gt=0)
    max_ongoing_requests: int = Field(64, ge=1)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)
    num_cpus: float = Field(1.0, ge=0)  # per replica; also its torch threads unless num_threads is given
    num_gpus: float = Field(0.0, ge=0)
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0)  # as `thrifty serve --shutdown-timeout`
    # The server (as the `thrifty serve` flags of the same names).
    served_model_name: list[str] | None = None
    # KEY, NAME=KEY or NAME=KEY:OPTIONS; given as key=value text it is split at commas, so options with
    # several values need a list or api_key_file.
    api_key: list[str] | None = None
    api_key_file: str | None = None
    usage_db: str | None = None  # each replica checks the limits against its own usage (docs/server.md)
    chat_template: str | None = None
    trust_request_chat_template: bool = False
    enable_auto_tool_choice: bool = False
    tool_call_parser: Literal["smollm2", "hermes"] | None = None
    max_waiting_requests: int = Field(1024, ge=0)  # 0: no limit
    price_per_hour: float | None = Field(None, ge=0)  # None: the table's GPU entry, or a CPU estimate (0: off)
    wake_on_request: bool = False  # sleep mode (with enable_sleep_mode), as `thrifty serve`'s flags
    sleep_when_idle: float | None = Field(None, gt=0)
    sleep_level: Literal[1, 2] = 1
    sleep_drain_timeout: float = Field(30.0, ge=0)
    cost_report_interval_s: float = Field(5.0, gt=0)

    @field_validator("served_model_name", "api_key", mode="before")
    @classmethod
    def _comma_list(cls, value):
        if isinstance(value, str):  # key=value on the command line: comma-separated
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @model_validator(mode="after")
    def _replicas(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must be within "
                             f"[{self.min_replicas}, {self.max_replicas}]")
        return self

    # The engine ------------------------------------------------------------------------------
    def engine_config(self) -> EngineConfig:
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(EngineConfig)}
        if kwargs["num_threads"] is None and self.num_cpus >= 1:
            kwargs["num_threads"] = int(self.num_cpus)  # not every core of a machine shared by replicas
        return EngineConfig(**kwargs)

    def autoscaling_config(self) -> dict:
        config = {k: getattr(self, k) for k in (
            "min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s",
            "look_back_period_s")}
        if self.initial_replicas is not None:
            config["initial_replicas"] = self.initial_replicas
        return config


def _engine_fields() -> dict[str, Any]:
    hints = typing.get_type_hints(EngineConfig)
    return {f.name: (hints[f.name], f.default) for f in dataclasses.fields(EngineConfig)}


DeploymentOptions = create_model("DeploymentOptions", __base__=_ServeOptions, **_engine_fields())
DeploymentOptions.__doc__ = ("The arguments of build_app: the deployment's, the server's (as `thrifty serve`'s "
                             "flags) and every EngineConfig field (model, dtype, kv_cache_memory, max_num_seqs, ...).")


# -- the cost ledger ------------------------------------------------------------------------
_SUMMED = ("seconds", "unreported_s", "startup_s", "busy_s", "idle_s", "asleep_s", "in_step_s", "cost_usd",
           "busy_cost_usd", "unbilled_cost_usd", "generation_tokens", "requests")


class CostLedger:
    """Replica-seconds and dollars of one deployment's replicas, live and departed.

    Replicas call report() with their own figures (their clock, from their start); the ledger
    notes when each report arrived on its clock. A live replica's seconds are its last report's
    lifetime plus the time since that report arrived (it is paid for while it runs, reported or
    not). A replica that stopped reports a last time (`stopped`); one that vanished without doing
    so (killed, its node lost) and has not reported for `stale_after_s` is `lost`: it is counted up
    to its last report only, so its last report interval at most is missing.
    Run as a Ray actor by get_ledger(); a plain class, so it can be tested without Ray.
    """

    def __init__(self, keep_departed: int = 100):
        self.since_unix = time.time()
        self._live: dict[str, dict] = {}
        self._departed: collections.deque[dict] = collections.deque(maxlen=keep_departed)
        self._departed_ids: set[str] = set()
        self._departed_totals = dict.fromkeys(_SUMMED, 0.0)
        self._num_departed = 0

    def report(self, record: dict) -> None:
        replica = record["replica"]
        if replica in self._departed_ids:
            return  # a periodic report that crossed the last one
        previous = self._live.get(replica)
        if previous is not None and previous["seq"] > record["seq"]:
            return
        record = dict(record, received=time.monotonic())
        if record["stopped"]:
            self._live.pop(replica, None)
            final = self._priced(record, time.monotonic(), stale_after_s=float("inf"))
            self._departed.append(final)
            self._departed_ids.add(replica)
            self._num_departed += 1
            for key in _SUMMED:  # (a replica of an older thrifty may lack a newer key: the ledger outlives it)
                self._departed_totals[key] += final.get(key, 0.0)
        else:
            self._live[replica] = record

    @staticmethod
    def _priced(record: dict, now: float, stale_after_s: float) -> dict:
        age = now - record["received"]
        if record["stopped"]:
            state, unreported = "stopped", 0.0
        elif age > stale_after_s:
            state, unreported = "lost", 0.0
        else:
            state, unreported = "live", age
        seconds = record["lifetime_s"] + unreported
        out = {k: v for k, v in record.items() if k != "received"}
        out.update(state=state, seconds=seconds, unreported_s=unreported,
                   cost_usd=seconds * record["price_per_hour"] / 3600.0, report_age_s=age)
        return out

    def summary(self) -> dict:
        now = time.monotonic()
        live = []
        for record in self._live.values():
            stale_after_s = max(30.0, 3 * record.get("report_interval_s", 5.0))
            live.append(self._priced(record, now, stale_after_s))
        totals = dict(self._departed_totals)
        for record in live:
            for key in _SUMMED:
                totals[key] += record.get(key, 0.0)
        states = collections.Counter(r["state"] for r in live)
        tokens = totals["generation_tokens"]
        return {
            "since_unix": self.since_unix,
            "replicas_live": states["live"],
            "replicas_lost": states["lost"],
            "replicas_stopped": self._num_departed,
            "replica_seconds": totals["seconds"],
            "replica_hours": totals["seconds"] / 3600.0,
            "cost_usd": totals["cost_usd"],
            "busy_cost_usd": totals["busy_cost_usd"],
            "unbilled_cost_usd": totals["unbilled_cost_usd"],
            "startup_seconds": totals["startup_s"],
            "busy_seconds": totals["busy_s"],
            "idle_seconds": totals["idle_s"],
            "asleep_seconds": totals["asleep_s"],
            "in_step_seconds": totals["in_step_s"],
            "unreported_seconds": totals["unreported_s"],
            "generation_tokens": int(tokens),
            "requests": int(totals["requests"]),
            "cost_per_million_tokens_usd": totals["cost_usd"] / tokens * 1e6 if tokens else None,
            "replicas": live + list(self._departed),  # the departed: the last `keep_departed`
        }


def ledger_name(app_name: str, deployment: str) -> str:
    return f"thrifty-cost-ledger:{app_name}:{deployment}"


def get_ledger(app_name: str = DEFAULT_APP_NAME, deployment: str = DEFAULT_DEPLOYMENT_NAME,
               create: bool = True):
    """The ledger actor of an application's deployment. Detached: it outlives its replicas and
    application (so a redeploy keeps counting) until the Ray cluster stops or someone kills it."""
    name = ledger_name(app_name, deployment)
    if not create:
        return ray.get_actor(name, namespace=LEDGER_NAMESPACE)
    return ray.remote(CostLedger).options(
        name=name, namespace=LEDGER_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_restarts=0).remote()


def cost_summary(app_name: str = DEFAULT_APP_NAME, deployment: str = DEFAULT_DEPLOYMENT_NAME) -> dict:
    """From a process connected to the cluster (ray.init): the ledger's summary."""
    return ray.get(get_ledger(app_name, deployment, create=False).summary.remote())


# -- the replica ----------------------------------------------------------------------------
class _ReplicaHeader:
    """ASGI middleware: every HTTP response says which replica answered (X-Thrifty-Replica)."""

    def __init__(self, app, replica: str):
        self.app = app
        self.header = (b"x-thrifty-replica", replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)


@serve.deployment(name=DEFAULT_DEPLOYMENT_NAME)
@serve.ingress()
class ThriftyServer:
    """One replica: one engine, the routes of `thrifty serve`, and GET /cost."""

    async def __init__(self, options: dict):
        self._t0 = time.monotonic()
        self._started_unix = time.time()
        self._seq = 0
        self._tokens = 0
        self._requests = 0
        self._stopped = False
        self.llm = None
        self.ledger = None
        self._reporter: asyncio.Task | None = None
        self.options = DeploymentOptions.model_validate(options)
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_tag
        self.ledger = get_ledger(ctx.app_name, ctx.deployment)

        from thrifty.engine.async_llm import AsyncLLM
        from thrifty.entrypoints.openai.api_server import freeze_startup_heap, resolve_price, sleep_config

        config = self.options.engine_config()
        # A replica rents its num_cpus of the node, not the node: the CPU estimate is scaled to them.
        self.price = resolve_price(self.options.price_per_hour, config, vcpus=self.options.num_cpus or None)
        self.price_per_hour = self.price.price_per_hour_usd
        try:
            self.llm = AsyncLLM(config, max_waiting_requests=self.options.max_waiting_requests or None,
                                price_per_hour=self.price_per_hour, sleep_config=sleep_config(self.options))
        except BaseException:
            await self._report(stopped=True)  # the failed load was paid for too
            raise
        freeze_startup_heap()  # (a replica is a process of its own)
        self._meter_before_start = self.llm.cost  # AsyncLLM.start() replaces it: the serving starts
        self.llm.step_observers.append(self._observe_step)
        await self._report()
        self._reporter = asyncio.get_running_loop().create_task(self._report_periodically())

    def __serve_build_asgi_app__(self):
        from thrifty.entrypoints.openai.api_server import _load_chat_template, build_app as build_openai_app
        from thrifty.entrypoints.openai.api_server import parse_api_keys

        opts = self.options
        names = opts.served_model_name or [self.llm.engine.model_name]
        app = build_openai_app(self.llm, names, parse_api_keys(opts.api_key, opts.api_key_file),
                               _load_chat_template(opts.chat_template), str(self.llm.engine.source.path or ""),
                               opts.trust_request_chat_template, opts.enable_auto_tool_choice, opts.tool_call_parser,
                               self.price, opts.usage_db)

        @app.get("/cost")
        async def cost():
            """The deployment's cost across its replicas, live and departed (CostLedger.summary)."""
            await self._report()  # this replica up to now
            return await self.ledger.summary.remote()

        app.add_middleware(_ReplicaHeader, replica=self.replica)
        return app

    def check_health(self):
        if self.llm is not None and self.llm.dead_error is not None:
            raise RuntimeError(f"the engine loop failed: {self.llm.dead_error!r}")

    async def __del__(self):
        # Serve runs this after draining the replica's requests and the app's lifespan shutdown
        # (which stopped the engine loop): the replica's last report.
        if getattr(self, "_reporter", None) is not None:
            self._reporter.cancel()
        if getattr(self, "ledger", None) is not None and hasattr(self, "price_per_hour"):
            await self._report(stopped=True)

    # -- cost reports ---------------------------------------------------------------------
    def _observe_step(self, obs) -> None:
        for out in obs.outputs:
            self._tokens += sum(len(c.token_ids) for c in out.outputs)
            self._requests += out.finished

    def _record(self, stopped: bool) -> dict:
        now = time.monotonic()
        lifetime = now - self._t0
        record = {"replica": self.replica, "node": socket.gethostname(), "pid": os.getpid(),
                  "price_per_hour": self.price_per_hour, "started_unix": self._started_unix,
                  "report_interval_s": self.options.cost_report_interval_s, "lifetime_s": lifetime,
                  "startup_s": lifetime, "busy_s": 0.0, "idle_s": 0.0, "asleep_s": 0.0, "in_step_s": 0.0,
                  "busy_cost_usd": 0.0,
                  "unbilled_cost_usd": 0.0, "generation_tokens": self._tokens, "requests": self._requests,
                  "stopped": stopped}
        meter = None if self.llm is None else self.llm.cost
        if meter is not None and meter is not self._meter_before_start:  # the engine loop started
            startup = meter.start - self._t0
            busy = meter.busy_s
            idle = meter.idle_seconds(now)
            asleep = meter.asleep_seconds(now)
            record.update(startup_s=startup, busy_s=busy, idle_s=idle, asleep_s=asleep,
                          in_step_s=max(0.0, lifetime - startup - busy - idle - asleep),  # the step in progress
                          busy_cost_usd=meter.busy_cost_usd, unbilled_cost_usd=meter.unbilled_cost_usd)
        return record

    async def _report(self, stopped: bool = False) -> None:
        if self._stopped:
            return
        self._stopped = stopped
        self._seq += 1
        record = dict(self._record(stopped), seq=self._seq)
        try:
            await asyncio.wait_for(asyncio.ensure_future(self.ledger.report.remote(record)), timeout=10)
        except Exception as e:  # the cost is still in the replica's own /metrics
            logger.warning("replica %s could not report its cost to the ledger: %r", self.replica, e)

    async def _report_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.options.cost_report_interval_s)
            await self._report()


# -- building the application -----------------------------------------------------------------
def build_app(args: dict | BaseModel | None = None) -> Application:
    """The application builder: `serve run thrifty.deploy.ray:build_app key=value ...` (or
    build_app({...}) from Python). The keys are DeploymentOptions' fields."""
    if isinstance(args, BaseModel):
        args = args.model_dump(exclude_unset=True)
    opts = DeploymentOptions.model_validate(args or {})
    opts.engine_config()  # a bad engine option fails here, not in every replica
    deployment = ThriftyServer.options(
        name=opts.name,
        autoscaling_config=opts.autoscaling_config(),
        max_ongoing_requests=opts.max_ongoing_requests,
        graceful_shutdown_timeout_s=opts.graceful_shutdown_timeout_s,
        ray_actor_options={"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus},
    )
    return deployment.bind(opts.model_dump())


app = build_app()  # `serve run thrifty.deploy.ray:app`: the default model, 1 to 2 replicas


# -- `thrifty serve --ray` ----------------------------------------------------------------
# _ServeOptions fields whose `thrifty serve` flag has another name; the others share theirs.
_CLI_RENAMED = {"num_cpus": "num_cpus_per_replica", "num_gpus": "num_gpus_per_replica",
                "graceful_shutdown_timeout_s": "shutdown_timeout"}


def options_from_cli(args: argparse.Namespace, config: EngineConfig) -> dict:
    """`thrifty serve` flags (with thrifty.deploy.add_ray_args') and its EngineConfig -> build_app's
    arguments. Flags left at None take DeploymentOptions' defaults."""
    options = dataclasses.asdict(config)
    for field in _ServeOptions.model_fields:
        if field == "name":  # the deployment's name is not a flag
            continue
        value = getattr(args, _CLI_RENAMED.get(field, field), None)
        if value is not None:
            options[field] = value
    return options


def run_from_cli(args: argparse.Namespace, config: EngineConfig) -> int:
    """`thrifty serve --ray ...`: starts (or joins, with --ray-address) a Ray cluster, runs the
    application on --host/--port behind Serve's proxy, and on SIGTERM or Ctrl-C deletes it
    (replicas drain, then report their last cost), prints the cost summary and exits 0."""
    import json

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    application = build_app(options_from_cli(args, config))
    app_name = args.ray_app_name or DEFAULT_APP_NAME
    deployment_name = DEFAULT_DEPLOYMENT_NAME
    address = args.ray_address or os.environ.get("RAY_ADDRESS") or None
    own_cluster = address is None  # "local": never join a cluster `ray start` left running by chance
    ray.init(address=address or "local", include_dashboard=False if own_cluster else None,
             logging_level=args.log_level.upper())
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    serve_logging = {"log_level": args.log_level.upper(),
                     "enable_access_log": not getattr(args, "disable_uvicorn_access_log", False)}
    try:
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config=serve_logging)
        serve.run(application, name=app_name, route_prefix="/", logging_config=serve_logging)
        logger.info("serving on http://%s:%d/v1 through Ray Serve (application %s); cost: GET /cost",
                    args.host, args.port, app_name)
        stop.wait()
        logger.info("stopping: the replicas drain and report their last cost")
        serve.delete(app_name)
        print(json.dumps({k: v for k, v in cost_summary(app_name, deployment_name).items() if k != "replicas"},
                         indent=2))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if own_cluster:
            serve.shutdown()
            ray.shutdown()
    return 0
