"""The router's HTTP app (Starlette): OpenAI routes forwarded to the backends, `/health`, `/metrics`.

A request for the tiered model name goes to the cheapest tier first. Each tier's answer is
judged (escalation.py) before the client sees any of it: a poor one is asked of the next tier,
and the client gets the first good answer (the last tier's in any case) with `usage.cost_usd`
summed over every tier tried, the answering tier in the `tier` field and the `x-thrifty-tier`
header. A streamed request is buffered the same way until its tier is known; the last tier
streams live.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx2 as httpx
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import thrifty
from thrifty.entrypoints.openai.errors import APIError, bad_request
from thrifty.router.config import RouterConfig, Tier
from thrifty.router.escalation import GatheredChoice, add_stream_chunk, gather_response
from thrifty.router.metrics import NO_TIER, RouterMetrics
from thrifty.router.policies import PrefixAware, RouteKey, make_policy
from thrifty.router.pool import Backend, BackendPool

logger = logging.getLogger("thrifty.router")

RETRY_STATUSES = frozenset({429, 502, 503, 504})  # worth one try elsewhere: busy, going away, or unreachable
DOWN_STATUSES = frozenset({502, 503})  # the backend itself is unwell: out of the pool until /health says not
# Headers that describe one hop, not the request (RFC 9110 7.6.1), or that the client library recomputes.
HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                         "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding"})


@dataclass
class Sent:
    """A backend's answer: a whole body, or (streams answering 200) an open stream whose first
    line has been read."""

    backend: Backend
    ticket: int
    status: int
    body: bytes = b""
    response: httpx.Response | None = None
    lines: AsyncIterator[str] | None = None
    first_line: str = ""

    async def all_lines(self) -> AsyncIterator[str]:
        yield self.first_line
        async for line in self.lines:
            yield line


def route_key(body: dict, session_header: str | None) -> RouteKey:
    """The text prefix_aware hashes (the prompt, or the messages as the template would order
    them) and the session (the `user` field, else the session header)."""
    if "messages" in body:
        parts = []
        for m in body.get("messages") or []:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"<{m.get('role') if isinstance(m, dict) else ''}>{content or ''}")
        prompt = "\n".join(parts)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list):  # a batch of prompts, or token ids: route by the first
            prompt = prompt[0] if prompt else ""
        prompt = prompt if isinstance(prompt, str) else " ".join(map(str, prompt or []))
    user = body.get("user")
    return RouteKey(prompt, str(user) if user else session_header)


def _usage_cost(usage: dict | None) -> float:
    try:
        return float((usage or {}).get("cost_usd") or 0.0)
    except (TypeError, ValueError):
        return 0.0


def _wants_logprobs(body: dict, chat: bool) -> bool:
    return bool(body.get("logprobs")) if chat else body.get("logprobs") is not None


class Router:
    def __init__(self, config: RouterConfig, reload: Callable[[], RouterConfig] | None = None,
                 config_path: str | None = None, health_interval: float = 2.0, request_timeout: float = 600.0,
                 session_header: str = "x-session-id", prefix_options: dict | None = None):
        self.reload, self.config_path = reload, config_path
        self.session_header = session_header.lower()
        self.prefix_options = prefix_options or {}
        self.pool = BackendPool(config.static_urls, list(config.backend_dns), health_interval,
                                on_leave=self._forget)
        self.metrics = RouterMetrics(self.pool)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(request_timeout, connect=5.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        self._config_mtime = self._mtime()
        self.apply(config)

    def apply(self, config: RouterConfig) -> None:
        self.config = config
        self.policy = make_policy(config.policy, **(self.prefix_options if config.policy == "prefix_aware" else {}))
        self.pool.reconfigure(config.static_urls, list(config.backend_dns))

    def _forget(self, url: str) -> None:
        if isinstance(self.policy, PrefixAware):
            self.policy.forget(url)

    def _mtime(self) -> float | None:
        try:
            return os.stat(self.config_path).st_mtime if self.config_path else None
        except OSError:
            return None

    def reload_if_changed(self) -> None:
        mtime = self._mtime()
        if self.reload is None or mtime is None or mtime == self._config_mtime:
            return
        self._config_mtime = mtime
        try:
            config = self.reload()
        except Exception as e:  # any bad edit (a wrong type, say) must not stop the router
            logger.error("config %s not reloaded (the running configuration stays): %s", self.config_path, e)
            return
        logger.info("config %s reloaded: policy %s, %d backend(s), %d tier(s)", self.config_path, config.policy,
                    len(config.static_urls) + len(config.backend_dns), len(config.tiers))
        self.apply(config)

    # -- sending -----------------------------------------------------------------------------------
    async def send(self, path: str, body: dict, headers: dict[str, str], candidates: list[Backend], key: RouteKey,
                   stream: bool, model: str | None = None) -> Sent:
        """Sends to a backend chosen by the policy; if it fails before answering (no connection,
        an error while waiting for the first byte, or a busy/unavailable status), once more to
        another. Raises APIError when no backend answered."""
        tried: set[str] = set()
        failure = "no healthy backend"
        for attempt in range(2):
            pool = [b for b in candidates if b.healthy and b.url not in tried]
            if not pool:
                break
            b = self.policy.choose(pool, key)
            tried.add(b.url)
            payload = json.dumps(body if model is None else {**body, "model": _model_for(b, model)}).encode()
            ticket = b.dispatched()
            try:
                resp = await self.client.send(
                    self.client.build_request("POST", f"{b.url}{path}", content=payload, headers=headers),
                    stream=True)
                if resp.status_code in RETRY_STATUSES and attempt == 0 and len(candidates) > 1:
                    await resp.aclose()
                    if resp.status_code in DOWN_STATUSES:
                        self.pool.mark_down(b, f"answered {resp.status_code}")
                    raise _Retry(f"{b.url} answered {resp.status_code}")
                if stream and resp.status_code == 200:
                    lines = resp.aiter_lines()
                    first = await anext(lines)
                    return Sent(b, ticket, 200, response=resp, lines=lines, first_line=first)
                data = await resp.aread()
                await resp.aclose()
                return Sent(b, ticket, resp.status_code, body=data)
            except (httpx.HTTPError, StopAsyncIteration, _Retry) as e:
                b.finished(ticket)
                failure = f"{b.url}: {e or type(e).__name__}"
                if not isinstance(e, _Retry):
                    self.pool.mark_down(b, f"{type(e).__name__} {e}")
                if attempt == 0:
                    self.metrics.retries.labels(b.url).inc()
                logger.warning("request to %s failed before answering (%s)", b.url, failure)
        raise APIError(503 if not tried else 502, f"no backend answered: {failure}", type="service_unavailable")

    def candidates(self, model: str | None, urls: list[str] | None = None) -> list[Backend]:
        healthy = self.pool.healthy(urls)
        if model is None:
            return healthy
        return [b for b in healthy if not b.models or model in b.models]

    # -- requests ----------------------------------------------------------------------------------
    async def handle(self, request: Request) -> Response:
        path = request.url.path
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise bad_request(f"Malformed JSON body: {e}") from None
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        key = route_key(body, request.headers.get(self.session_header))
        model = body.get("model")
        if self.config.tiers and model == self.config.tiered_model:
            return await self._tiered(path, body, headers, key)
        candidates = self.candidates(model)
        if not candidates:
            raise self._no_backend(model)
        stream = bool(body.get("stream"))
        sent = await self.send(path, _with_usage(body) if stream else body, headers, candidates, key, stream)
        return self._respond(sent, NO_TIER, body, 0.0)

    def _no_backend(self, model: str | None) -> APIError:
        """404 for a model no backend has ever listed (when all list theirs), else 503."""
        backends = list(self.pool.backends.values())
        known = {m for b in backends for m in b.models}
        if backends and all(b.models for b in backends) and model not in known:
            names = sorted(known | ({self.config.tiered_model} if self.config.tiers else set()))
            return APIError(404, f"The model `{model}` does not exist. Models: {', '.join(names)}",
                            param="model", code="model_not_found")
        return APIError(503, f"no healthy backend serves the model `{model}`", type="service_unavailable",
                        headers={"Retry-After": "1"})

    async def _tiered(self, path: str, body: dict, headers: dict[str, str], key: RouteKey) -> Response:
        tiers = self.config.tiers
        policy = self.config.escalation
        chat = "messages" in body
        stream = bool(body.get("stream"))
        added_logprobs = policy.needs_logprobs and not _wants_logprobs(body, chat)
        cost, tried = 0.0, []
        for i, tier in enumerate(tiers):
            last = i == len(tiers) - 1
            upstream = _with_usage(body) if stream else dict(body)
            if added_logprobs and not last:
                upstream.update({"logprobs": True} if chat else {"logprobs": 0})
            candidates = self.candidates(None, list(tier.urls))
            try:
                if not candidates:
                    raise APIError(503, f"tier {tier.name}: no healthy backend", type="service_unavailable")
                sent = await self.send(path, upstream, headers, candidates, key, stream, model=tier.name)
            except APIError as e:
                if last:
                    raise
                self._escalated(tier, tiers[i + 1], "unavailable", str(e))
                continue
            if sent.status != 200 and (last or 400 <= sent.status < 500):
                return self._respond(sent, tier.name, body, cost)  # the client's error
            if last:
                return self._respond(sent, tier.name, body, cost, tried)
            if sent.status != 200:
                sent.backend.finished(sent.ticket)
                self._count(sent, tier.name, 0.0)
                self._escalated(tier, tiers[i + 1], "error", f"status {sent.status}")
                continue
            choices, answer_cost, events = await self._gather(sent, stream)
            self._count(sent, tier.name, answer_cost)
            reason = policy.judge(body, choices)
            if reason is None:
                return self._answer(sent, tier.name, body, cost, events, added_logprobs, tried)
            cost += answer_cost
            tried.append(tier.name)
            self._escalated(tier, tiers[i + 1], reason, "")
        raise AssertionError("unreachable: the last tier always answers")

    def _escalated(self, tier: Tier, to: Tier, reason: str, detail: str) -> None:
        self.metrics.escalations.labels(tier.name, to.name, reason).inc()
        logger.info("escalated from tier %s to %s: %s %s", tier.name, to.name, reason, detail)

    async def _gather(self, sent: Sent, stream: bool) -> tuple[list[GatheredChoice], float, list[dict] | None]:
        """A whole answer: its choices, its cost, and (streams) its events."""
        if not stream:
            sent.backend.finished(sent.ticket)
            data = json.loads(sent.body)
            return gather_response(data), _usage_cost(data.get("usage")), None
        events, by_index, cost = [], {}, 0.0
        try:
            async for line in sent.all_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    events.append(chunk)
                    add_stream_chunk(by_index, chunk)
                    if chunk.get("usage") and not chunk.get("choices"):
                        cost = _usage_cost(chunk["usage"])
        finally:
            await sent.response.aclose()
            sent.backend.finished(sent.ticket)
        return [by_index[i] for i in sorted(by_index)], cost, events

    def _count(self, sent: Sent, tier: str, cost: float) -> None:
        self.metrics.requests.labels(sent.backend.url, tier, str(sent.status)).inc()
        if cost:
            self.metrics.cost.labels(sent.backend.url, tier).inc(cost)

    def _answer(self, sent: Sent, tier: str, body: dict, cost_before: float, events: list[dict] | None,
                strip_logprobs: bool, tried: list[str]) -> Response:
        """A gathered answer of a tier that is not the last, as the client asked for it."""
        headers = _tier_headers(sent, tier, tried)
        if events is None:
            data = _rewrite(json.loads(sent.body), tier, True, strip_logprobs, cost_before)
            return JSONResponse(data, headers=headers)
        keep_usage = _client_wants_usage(body)
        chunks = [c for c in (_rewrite(e, tier, keep_usage, strip_logprobs, cost_before) for e in events) if c]
        return StreamingResponse(_sse(chunks), media_type="text/event-stream", headers=headers)

    def _respond(self, sent: Sent, tier: str, body: dict, cost_before: float, tried: list[str] = ()) -> Response:
        """A backend's answer relayed as it comes (streams), or whole."""
        headers = _tier_headers(sent, tier, tried)
        if sent.lines is None:
            sent.backend.finished(sent.ticket)
            cost = 0.0
            if sent.status == 200:
                with contextlib.suppress(ValueError, AttributeError):
                    cost = _usage_cost(json.loads(sent.body).get("usage"))
            self._count(sent, tier, cost)
            if sent.status == 200 and (tier or cost_before):
                data = _rewrite(json.loads(sent.body), tier, True, False, cost_before)
                return JSONResponse(data, headers=headers)
            return Response(sent.body, status_code=sent.status, media_type="application/json", headers=headers)
        return StreamingResponse(self._relay(sent, tier, body, cost_before), media_type="text/event-stream",
                                 headers=headers)

    async def _relay(self, sent: Sent, tier: str, body: dict, cost_before: float) -> AsyncIterator[str]:
        keep_usage = _client_wants_usage(body)
        cost = 0.0
        try:
            async for line in sent.all_lines():
                if not line.startswith("data: {"):
                    if line:
                        yield f"{line}\n\n"
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage") and not chunk.get("choices"):
                    cost = _usage_cost(chunk["usage"])
                chunk = _rewrite(chunk, tier, keep_usage, False, cost_before)
                if chunk is not None:
                    yield f"data: {json.dumps(chunk)}\n\n"
        except httpx.HTTPError as e:  # the backend died mid-stream: too late to retry, say so
            self.pool.mark_down(sent.backend, f"{type(e).__name__} mid-stream")
            err = APIError(502, f"the backend failed mid-stream: {type(e).__name__}", type="service_unavailable")
            yield f"data: {json.dumps(err.body())}\n\n"
        finally:
            await sent.response.aclose()
            sent.backend.finished(sent.ticket)
            self._count(sent, tier, cost)

    # -- the app -----------------------------------------------------------------------------------
    async def models(self, _: Request) -> Response:
        now = int(time.time())
        names = dict.fromkeys(m for b in self.pool.healthy() for m in b.models)
        if self.config.tiers:
            names[self.config.tiered_model] = None
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": now, "owned_by": "thrifty-router"} for name in names]})

    async def health(self, _: Request) -> Response:
        return Response(status_code=200 if self.pool.healthy() else 503)

    async def prometheus(self, _: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def version(self, _: Request) -> Response:
        return JSONResponse({"version": thrifty.__version__})

    def build_app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(_: Starlette):
            self.reload_if_changed()
            await self.pool.check_all()
            checker = asyncio.create_task(self.pool.run(on_tick=self.reload_if_changed))
            yield
            checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checker
            await self.client.aclose()
            await self.pool.aclose()

        async def api_error(_: Request, exc: APIError) -> Response:
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

        routes = [Route("/v1/completions", self.handle, methods=["POST"]),
                  Route("/v1/chat/completions", self.handle, methods=["POST"]),
                  Route("/v1/models", self.models), Route("/health", self.health), Route("/metrics", self.prometheus),
                  Route("/version", self.version)]
        return Starlette(routes=routes, lifespan=lifespan, exception_handlers={APIError: api_error})


class _Retry(Exception):
    pass


def _model_for(backend: Backend, tier_name: str) -> str:
    """The model name a tier's backend serves (its first), or the tier's name if it never said."""
    return backend.models[0] if backend.models else tier_name


def _with_usage(body: dict) -> dict:
    """A streamed request that also asks for the usage chunk, so the router learns the cost."""
    return {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}


def _client_wants_usage(body: dict) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


def _rewrite(chunk: dict, tier: str, keep_usage: bool, strip_logprobs: bool, cost_before: float) -> dict | None:
    """A response or stream chunk as the client should see it: the tier that answered, the cost
    of every tier tried, and neither logprobs nor usage that the router asked for itself."""
    if chunk.get("usage"):
        if not keep_usage and not chunk.get("choices"):
            return None  # the usage-only chunk the client did not ask for
        if cost_before:
            chunk["usage"]["cost_usd"] = cost_before + _usage_cost(chunk["usage"])
    if not keep_usage:
        chunk.pop("usage", None)
    if strip_logprobs:
        for c in chunk.get("choices") or []:
            if "logprobs" in c:
                c["logprobs"] = None
    if tier:
        chunk["tier"] = tier
    return chunk


def _sse(chunks: list[dict]) -> AsyncIterator[str]:
    async def gen():
        for c in chunks:
            yield f"data: {json.dumps(c)}\n\n"
        yield "data: [DONE]\n\n"

    return gen()


def _tier_headers(sent: Sent, tier: str, tried: list[str] | tuple = ()) -> dict[str, str]:
    headers = {"x-thrifty-backend": sent.backend.url}
    if tier:
        headers["x-thrifty-tier"] = tier
        if tried:
            headers["x-thrifty-tiers-tried"] = ",".join([*tried, tier])
    return headers
