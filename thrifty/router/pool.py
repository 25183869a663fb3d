"""The replicas behind the router: their health, their models and their load.

Every `health_interval` seconds each backend is asked for `/health`, `/v1/models` and
`/metrics` (vLLM's `vllm:num_requests_running` and `vllm:num_requests_waiting`). A backend that
fails `/health` (or a request's connection) leaves the pool until a check passes again. Between
two scrapes the router adds the requests it has sent since the last one, so a burst does not
all land on the replica that looked idle a second ago.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import httpx2 as httpx
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger("thrifty.router")


@dataclass
class Backend:
    url: str
    healthy: bool = False
    models: tuple[str, ...] = ()
    running: float | None = None  # scraped; None until a scrape worked (e.g. a server without /metrics)
    waiting: float | None = None
    in_flight: int = 0  # the router's own requests there now
    sent_since_scrape: int = 0  # of those, the ones sent after the last scrape
    scrape_epoch: int = 0

    @property
    def load(self) -> float:
        if self.running is None:
            return float(self.in_flight)
        return self.running + (self.waiting or 0.0) + self.sent_since_scrape

    def dispatched(self) -> int:
        """Counts a request sent here; returns the ticket to give back to `finished`."""
        self.in_flight += 1
        self.sent_since_scrape += 1
        return self.scrape_epoch

    def finished(self, ticket: int) -> None:
        self.in_flight -= 1
        if ticket == self.scrape_epoch:  # else the scrape since has counted (and reset) it
            self.sent_since_scrape -= 1


def _scraped(text: str) -> dict[str, float]:
    wanted = {"vllm:num_requests_running", "vllm:num_requests_waiting"}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted:
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


@dataclass
class BackendPool:
    static_urls: list[str]
    dns_urls: list[str] = field(default_factory=list)
    health_interval: float = 2.0
    on_leave: Callable[[str], None] | None = None  # told when a backend leaves the pool
    backends: dict[str, Backend] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for url in self.static_urls:
            self.backends[url] = Backend(url)
        # Generous: a replica busy on every core may answer /health late, which is not being down.
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(5.0))

    def healthy(self, urls: list[str] | None = None) -> list[Backend]:
        pool = self.backends.values() if urls is None else [self.backends[u] for u in urls if u in self.backends]
        return [b for b in pool if b.healthy]

    def mark_down(self, backend: Backend, why: str) -> None:
        if backend.healthy:
            logger.warning("backend %s left the pool: %s", backend.url, why)
            backend.healthy = False
            if self.on_leave is not None:
                self.on_leave(backend.url)

    def reconfigure(self, static_urls: list[str], dns_urls: list[str]) -> None:
        self.static_urls, self.dns_urls = static_urls, dns_urls
        self._keep(set(static_urls))

    def _keep(self, wanted: set[str]) -> None:
        for url in list(self.backends):
            if url not in wanted and self.backends[url].in_flight == 0:
                self.mark_down(self.backends.pop(url), "removed from the configuration")
        for url in wanted - set(self.backends):
            self.backends[url] = Backend(url)

    async def _resolve(self) -> set[str]:
        """Each --backend-dns URL as one URL per address its host resolves to now."""
        urls = set(self.static_urls)
        loop = asyncio.get_running_loop()
        for url in self.dns_urls:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                infos = await loop.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
            except OSError as e:
                logger.warning("backend-dns %s: %s", url, e)
                continue
            for family, _, _, _, addr in infos:
                host = f"[{addr[0]}]" if family == socket.AF_INET6 else addr[0]
                urls.add(urlunsplit((parts.scheme, f"{host}:{port}", "", "", "")))
        return urls

    async def check_all(self) -> None:
        if self.dns_urls:
            self._keep(await self._resolve())
        await asyncio.gather(*(self._check(b) for b in list(self.backends.values())))

    async def _check(self, b: Backend) -> None:
        try:
            ok = (await self._client.get(f"{b.url}/health")).status_code == 200
        except httpx.HTTPError as e:
            ok, why = False, f"/health: {type(e).__name__}"
        else:
            why = "/health did not answer 200"
        if not ok:
            self.mark_down(b, why)
            return
        try:
            models = (await self._client.get(f"{b.url}/v1/models")).json()["data"]
            b.models = tuple(str(m["id"]) for m in models)
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass  # a backend without /v1/models gets any model's requests
        try:
            resp = await self._client.get(f"{b.url}/metrics")
            values = _scraped(resp.text) if resp.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            values = {}
        if "vllm:num_requests_running" in values:
            b.running = values["vllm:num_requests_running"]
            b.waiting = values.get("vllm:num_requests_waiting", 0.0)
            b.scrape_epoch += 1
            b.sent_since_scrape = 0
        if not b.healthy:
            logger.info("backend %s joined the pool (models: %s)", b.url, ", ".join(b.models) or "unknown")
            b.healthy = True

    async def run(self, on_tick: Callable[[], None] | None = None) -> None:
        """Checks every backend every health_interval seconds until cancelled."""
        while True:
            try:
                if on_tick is not None:
                    on_tick()
                await self.check_all()
            except Exception:  # the checks must go on whatever one round met
                logger.exception("health check round failed")
            await asyncio.sleep(self.health_interval)

    async def aclose(self) -> None:
        await self._client.aclose()
