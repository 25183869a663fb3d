"""The router's configuration: flags, and optionally a YAML or JSON file reloaded when it changes.

The file holds the same things as the flags (backends, backend_dns, tiers, tiered_model,
policy, escalation); what the flags give is added to what the file gives.

    policy: prefix_aware
    backends: [http://10.0.0.5:8000, http://10.0.0.6:8000]
    tiers:
      - {name: small, urls: [http://10.0.0.7:8000]}
      - {name: large, urls: [http://10.0.0.8:8000]}
    tiered_model: auto
    escalation: {reasons: [length, invalid_json, low_logprob], min_mean_logprob: -1.0}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from thrifty.jsonio import read_mapping
from thrifty.router.escalation import REASONS, EscalationPolicy
from thrifty.router.policies import POLICIES


@dataclass(frozen=True)
class Tier:
    name: str
    urls: tuple[str, ...]


@dataclass(frozen=True)
class RouterConfig:
    backends: tuple[str, ...] = ()
    backend_dns: tuple[str, ...] = ()  # URLs whose host name expands to one backend per address
    tiers: tuple[Tier, ...] = ()  # cheapest first
    tiered_model: str = "auto"  # requests for this model name go through the tiers
    policy: str = "prefix_aware"
    escalation: EscalationPolicy = field(default_factory=EscalationPolicy)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for url in (*self.backends, *self.backend_dns, *(u for t in self.tiers for u in t.urls)):
            check_url(url)
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier: names must be unique, got {names}")
        if not (self.backends or self.backend_dns or self.tiers):
            raise ValueError("router: no backends; give --backend URL, --backend-dns URL, --tier NAME=URL "
                             "or a --config file that lists some")

    @property
    def static_urls(self) -> list[str]:
        """Every backend URL named directly (backends, then the tiers'), each once."""
        return list(dict.fromkeys([*self.backends, *(u for t in self.tiers for u in t.urls)]))


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"backend: {url!r} is not an http(s) URL such as http://127.0.0.1:8000")
    if parts.path.rstrip("/") not in ("", "/v1") or parts.query:
        raise ValueError(f"backend: {url!r}: give the server's root URL (the router adds /v1/...)")
    return url


def normalize_url(url: str) -> str:
    """http://host:port/ or http://host:port/v1 -> http://host:port"""
    check_url(url)
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def parse_tier(value: str) -> Tier:
    """--tier NAME=URL[,URL...]"""
    name, sep, urls = value.partition("=")
    members = tuple(normalize_url(u.strip()) for u in urls.split(",") if u.strip())
    if not sep or not name.strip() or not members:
        raise ValueError(f"tier: {value!r} should be NAME=URL[,URL...]")
    return Tier(name.strip(), members)


def parse_escalate_on(value: str | list[str]) -> frozenset[str]:
    items = value.split(",") if isinstance(value, str) else value
    reasons = frozenset(r.strip() for r in items if r.strip())
    unknown = reasons - set(REASONS)
    if unknown:
        raise ValueError(f"escalate_on: unknown reason(s) {sorted(unknown)}; choose from {', '.join(REASONS)}")
    return reasons


def read_file(path: str | Path) -> dict:
    """A YAML or JSON config file as a dict (JSON is YAML, but a .json file gets JSON's errors)."""
    data = read_mapping(path, "config")
    known = {"policy", "backends", "backend_dns", "tiers", "tiered_model", "escalation"}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"config {path}: unknown key(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
    return data


def build_config(file_data: dict | None = None, backends: list[str] | None = None,
                 backend_dns: list[str] | None = None, tiers: list[str] | None = None,
                 policy: str | None = None, tiered_model: str | None = None,
                 escalate_on: str | None = None, min_mean_logprob: float | None = None) -> RouterConfig:
    """Flags (None: not given) on top of a config file's contents."""
    data = file_data or {}
    esc = data.get("escalation") or {}
    file_tiers = []
    for t in data.get("tiers") or []:
        if not isinstance(t, dict) or "name" not in t or not t.get("urls"):
            raise ValueError(f"config: a tier needs a name and urls, got {t!r}")
        file_tiers.append(Tier(str(t["name"]), tuple(normalize_url(u) for u in t["urls"])))
    reasons = escalate_on if escalate_on is not None else esc.get("reasons", list(REASONS))
    return RouterConfig(
        backends=tuple(dict.fromkeys(normalize_url(u) for u in [*(data.get("backends") or []), *(backends or [])])),
        backend_dns=tuple(normalize_url(u) for u in [*(data.get("backend_dns") or []), *(backend_dns or [])]),
        tiers=tuple(file_tiers + [parse_tier(t) for t in tiers or []]),
        tiered_model=tiered_model or data.get("tiered_model") or "auto",
        policy=policy or data.get("policy") or "prefix_aware",
        escalation=EscalationPolicy(parse_escalate_on(reasons),
                                    float(min_mean_logprob if min_mean_logprob is not None
                                          else esc.get("min_mean_logprob", -1.0))))
