"""API keys with options, and the rate limits and budgets they set.

A key is `KEY`, `NAME=KEY` or `NAME=KEY:OPTION=VALUE,...` (`--api-key`), or an entry of a YAML or
JSON key file (`--api-key-file`). Its options: `priority` (the key's default request priority),
`rpm` and `tpm` (requests and tokens per minute, over a sliding 60 s window), `usd_per_day` (cost
per UTC day) and `admin`. Usage is counted by key name, so keys sharing a name share a budget;
it is kept in memory for the checks and in SQLite so that it survives a restart.

Torch-free, so that `thrifty --help` and the router can import it.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from thrifty.entrypoints.openai.errors import APIError
from thrifty.jsonio import read_mapping

logger = logging.getLogger("thrifty.limits")

LIMITS = ("rpm", "tpm", "usd_per_day")
WINDOW_S = 60  # rpm and tpm: the last 60 one-second buckets
_DAY_S = 86400


# -- keys -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyPolicy:
    """One API key and what it may do. Limits of None are no limit."""

    name: str | None
    key: str = field(repr=False)  # (a secret: kept out of logs and error messages)
    priority: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    usd_per_day: float | None = None
    admin: bool = False

    @property
    def limits(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in LIMITS if getattr(self, name) is not None}


def _integer(value: object, what: str) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"{what} must be an integer, got {value!r}")


def _count(value: object, what: str) -> int:
    n = _integer(value, what)
    if n <= 0:
        raise ValueError(f"{what} must be a positive integer (leave it out for no limit), got {value!r}")
    return n


def _usd(value: object, what: str) -> float:
    try:
        usd = float(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else math.nan
    except ValueError:
        usd = math.nan
    if not (math.isfinite(usd) and usd > 0):
        raise ValueError(f"{what} must be a positive number of USD (leave it out for no limit), got {value!r}")
    return usd


def _flag(value: object, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ValueError(f"{what} must be true or false, got {value!r}")


_OPTIONS: dict[str, Callable[[object, str], object]] = {
    "priority": _integer, "rpm": _count, "tpm": _count, "usd_per_day": _usd, "admin": _flag}


def _policy(name: str | None, key: str, options: dict[str, object], where: str) -> KeyPolicy:
    if options and name is None:
        raise ValueError(f"{where}: options ({', '.join(options)}) need a key name, as NAME=KEY:OPTIONS (usage is "
                         "counted by name)")
    values = {opt: _OPTIONS[opt](value, f"{where}: {opt}") for opt, value in options.items()}
    return KeyPolicy(name, key, **values)


def _option_pairs(suffix: str) -> dict[str, str] | None:
    """`rpm=60,tpm=1000` -> its options; None if it is not all known options (then it is part of a key)."""
    pairs: dict[str, str] = {}
    for item in suffix.split(","):
        opt, sep, value = item.partition("=")
        opt = opt.strip()
        if not sep or opt not in _OPTIONS:
            return None
        if opt in pairs:
            raise ValueError(f"api_key: option {opt!r} is given twice")
        pairs[opt] = value
    return pairs


def parse_api_key(value: str) -> KeyPolicy:
    """`KEY`, `NAME=KEY` or `NAME=KEY:priority=-1,rpm=60,tpm=100000,usd_per_day=5,admin=true`. A key
    containing ':' stays whole unless what follows its last ':' is all known options."""
    body, options = value, {}
    head, sep, suffix = value.rpartition(":")
    if sep:
        pairs = _option_pairs(suffix)
        if pairs is not None:
            body, options = head, pairs
    name, sep, key = body.partition("=")
    name, key = (name, key) if sep else (None, body)
    if not key or (sep and not name):
        raise ValueError(f"api_key: {'a name' if sep and not name else 'a key'} is empty; give KEY, NAME=KEY or "
                         "NAME=KEY:OPTION=VALUE,...")
    return _policy(name, key, options, f"api_key {name!r}" if name else "api_key")


_FILE_FIELDS = ("name", "key", "key_env", *_OPTIONS)


def read_key_file(path: str) -> list[KeyPolicy]:
    """`keys: [{name, key | key_env, priority, rpm, tpm, usd_per_day, admin}, ...]` (YAML or JSON)."""
    data = read_mapping(path, "api_key_file")
    unknown = set(data) - {"keys"}
    if unknown:
        raise ValueError(f"api_key_file {path}: unknown field(s) {sorted(unknown)}; expected 'keys'")
    entries = data.get("keys")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"api_key_file {path}: 'keys' must be a non-empty list of keys")
    policies = []
    for i, entry in enumerate(entries):
        where = f"api_key_file {path}: keys[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(entry).__name__}")
        unknown = set(entry) - set(_FILE_FIELDS)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; known: {', '.join(_FILE_FIELDS)}")
        name = entry.get("name")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"{where}: name must be a non-empty string, got {name!r}")
        if ("key" in entry) == ("key_env" in entry):
            raise ValueError(f"{where}: give exactly one of 'key' or 'key_env'")
        if "key" in entry:
            key = entry["key"]
            if not isinstance(key, str) or not key:
                raise ValueError(f"{where}: key must be a non-empty string")
        else:
            env = entry["key_env"]
            key = os.environ.get(env, "") if isinstance(env, str) else ""
            if not key:
                raise ValueError(f"{where}: key_env: the environment variable {env!r} is not set or empty")
        options = {opt: entry[opt] for opt in _OPTIONS if entry.get(opt) is not None}
        policies.append(_policy(name, key, options, f"{where} ({name})" if name else where))
    return policies


def parse_api_keys(values: list[str] | None, key_file: str | None = None) -> dict[str, KeyPolicy]:
    """--api-key (repeatable) and --api-key-file -> {key: its policy}. Keys that share a name
    share its usage, so they must set the same limits."""
    policies = [parse_api_key(v) for v in values or []] + (read_key_file(key_file) if key_file else [])
    keys: dict[str, KeyPolicy] = {}
    by_name: dict[str, KeyPolicy] = {}
    for p in policies:
        if keys.setdefault(p.key, p) != p:
            raise ValueError(f"api_key: a key is given twice, with different names or options (names "
                             f"{keys[p.key].name!r} and {p.name!r})")
        if p.name is not None and by_name.setdefault(p.name, p).limits != p.limits:
            raise ValueError(f"api_key: the keys named {p.name!r} set different limits ({by_name[p.name].limits} "
                             f"and {p.limits}); keys that share a name share its budget, so give each the same")
    return keys


def check_priced(policies: Iterable[KeyPolicy], price_per_hour: float) -> None:
    """A USD budget needs costs: with a price of 0 every request would be free and the budget moot."""
    budgeted = sorted({p.name for p in policies if p.usd_per_day is not None})
    if budgeted and price_per_hour <= 0:
        raise ValueError(f"api_key: usd_per_day is set (key {', '.join(map(repr, budgeted))}) but the price per "
                         "hour is 0, so nothing would ever be spent; give --price-per-hour")


def check_priorities(policies: Iterable[KeyPolicy], scheduling_policy: str) -> None:
    """A key's priority means something only to the priority scheduler: under fcfs it would make
    every request of the key a 400."""
    named = sorted({p.name for p in policies if p.priority})
    if named and scheduling_policy != "priority":
        raise ValueError(f"api_key: priority is set (key {', '.join(map(repr, named))}) but the scheduling policy "
                         f"is {scheduling_policy}; give --scheduling-policy priority")


# -- usage ------------------------------------------------------------------------------------
def default_usage_db() -> str:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "thrifty", "usage.db")


def utc_day(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_second (key_name TEXT NOT NULL, second INTEGER NOT NULL,
    requests INTEGER NOT NULL, tokens INTEGER NOT NULL, PRIMARY KEY (key_name, second));
CREATE TABLE IF NOT EXISTS usage_day (key_name TEXT NOT NULL, day TEXT NOT NULL, cost_usd REAL NOT NULL,
    requests INTEGER NOT NULL, tokens INTEGER NOT NULL, PRIMARY KEY (key_name, day));
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);
INSERT OR IGNORE INTO meta VALUES ('schema_version', '1');
"""


@dataclass
class _Bucket:
    requests: int = 0
    tokens: int = 0


class UsageStore:
    """Usage by key name: per second over the last minute (rpm, tpm) and per UTC day (USD, and
    requests and tokens for the record). An in-memory mirror answers the checks; each addition is
    also written to SQLite (WAL) on one worker thread, so the event loop never waits on the disk.
    Times are wall-clock seconds, which mean the same after a restart."""

    def __init__(self, path: str, now: float):
        self.path = path
        try:
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            seconds = self._db.execute("SELECT key_name, second, requests, tokens FROM usage_second WHERE second > ?",
                                       (int(now) - WINDOW_S,)).fetchall()
            days = self._db.execute("SELECT key_name, day, cost_usd FROM usage_day WHERE day = ?",
                                    (utc_day(now),)).fetchall()
        except (OSError, sqlite3.Error) as e:
            raise ValueError(f"usage_db: cannot use {path!r}: {e}") from None
        self._seconds: dict[str, dict[int, _Bucket]] = defaultdict(dict)
        for name, second, requests, tokens in seconds:
            self._seconds[name][second] = _Bucket(requests, tokens)
        self._cost: dict[tuple[str, str], float] = {(name, day): cost for name, day, cost in days}
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="thrifty-usage")

    def add(self, name: str, now: float, requests: int = 0, tokens: int = 0, cost_usd: float = 0.0) -> None:
        second, day = int(now), utc_day(now)
        if requests or tokens:
            bucket = self._seconds[name].setdefault(second, _Bucket())
            bucket.requests += requests
            bucket.tokens += tokens
            for old in [s for s in self._seconds[name] if s <= second - WINDOW_S]:
                del self._seconds[name][old]
        self._cost[name, day] = self._cost.get((name, day), 0.0) + cost_usd
        try:
            write = self._writer.submit(self._write, name, second, day, requests, tokens, cost_usd)
        except RuntimeError:  # closed: usage counted after the shutdown (a request cut off late) is lost
            logger.warning("usage of key %r after the usage database was closed is not kept", name)
            return
        write.add_done_callback(_log_error)

    def _write(self, name: str, second: int, day: str, requests: int, tokens: int, cost_usd: float) -> None:
        with self._db:  # one transaction
            self._db.execute("BEGIN")
            if requests or tokens:
                self._db.execute("INSERT INTO usage_second VALUES (?, ?, ?, ?) ON CONFLICT (key_name, second) DO "
                                 "UPDATE SET requests = requests + excluded.requests, tokens = tokens + "
                                 "excluded.tokens", (name, second, requests, tokens))
                self._db.execute("DELETE FROM usage_second WHERE key_name = ? AND second <= ?",
                                 (name, second - WINDOW_S))
            self._db.execute("INSERT INTO usage_day VALUES (?, ?, ?, ?, ?) ON CONFLICT (key_name, day) DO UPDATE "
                             "SET cost_usd = cost_usd + excluded.cost_usd, requests = requests + excluded.requests, "
                             "tokens = tokens + excluded.tokens", (name, day, cost_usd, requests, tokens))

    def window(self, name: str, now: float) -> list[tuple[int, _Bucket]]:
        """The buckets of the last 60 s (this second's included), oldest first."""
        start = int(now) - WINDOW_S + 1
        return sorted((s, b) for s, b in self._seconds.get(name, {}).items() if s >= start)

    def cost_today(self, name: str, now: float) -> float:
        return self._cost.get((name, utc_day(now)), 0.0)

    def flush(self) -> None:
        """Waits until every addition so far is written."""
        self._writer.submit(lambda: None).result()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._db.close()


def _log_error(future: Future) -> None:
    if future.exception() is not None:
        logger.error("usage could not be written to the usage database: %s", future.exception())


# -- limits -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Refusal:
    """Why a key may not go ahead now, and when it may."""

    name: str
    limit: str  # rpm, tpm or usd_per_day
    used: float
    allowed: float
    retry_after: int  # seconds

    def error(self) -> APIError:
        headers = {"Retry-After": str(self.retry_after)}
        if self.limit == "usd_per_day":
            hours, minutes = divmod(math.ceil(self.retry_after / 60), 60)
            message = (f"API key {self.name!r} is over its usd_per_day budget (${self.used:.4f} of "
                       f"${self.allowed:.2f} spent today, UTC); it resets at 00:00 UTC, in {hours}h {minutes}m.")
            return APIError(429, message, type="rate_limit_error", code="budget_exceeded", headers=headers)
        unit = "requests" if self.limit == "rpm" else "tokens"
        headers |= {f"x-ratelimit-limit-{unit}": str(int(self.allowed)), f"x-ratelimit-remaining-{unit}": "0",
                    f"x-ratelimit-reset-{unit}": f"{self.retry_after}s"}
        message = (f"API key {self.name!r} is over its {self.limit} limit ({int(self.used)} {unit} of "
                   f"{int(self.allowed)} per minute used in the last 60 s); retry in {self.retry_after} s.")
        return APIError(429, message, type="rate_limit_error", code="rate_limit_exceeded", headers=headers)


def _counted(bucket: _Bucket, limit: str) -> int:
    """What a second's bucket counts toward rpm (requests) or tpm (tokens)."""
    return bucket.requests if limit == "rpm" else bucket.tokens


class Limiter:
    """Answers "may this key go ahead now?" from its name's usage so far: usage at or over a limit
    is a refusal. Usage counts when it happens (see OpenAIServing), so requests already in flight
    can take a key past its limits; the next request is refused."""

    def __init__(self, policies: Iterable[KeyPolicy], store: UsageStore, clock: Callable[[], float] = time.time):
        self.limits: dict[str, dict[str, float]] = {p.name: p.limits for p in policies if p.name and p.limits}
        self.store = store
        self.clock = clock
        self.refused: dict[tuple[str, str], int] = defaultdict(int)  # (name, limit) -> requests refused

    @classmethod
    def open(cls, policies: Iterable[KeyPolicy], path: str | None) -> Limiter | None:
        """A limiter on the usage database at `path` (default: default_usage_db()), or None when no
        key has a limit."""
        policies = list(policies)
        if not any(p.name and p.limits for p in policies):
            return None
        store = UsageStore(path or default_usage_db(), time.time())
        logger.info("per-key usage is kept in %s", store.path)
        return cls(policies, store)

    def usage(self, name: str, limit: str, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        if limit == "usd_per_day":
            return self.store.cost_today(name, now)
        return sum(_counted(b, limit) for _, b in self.store.window(name, now))

    def check(self, policy: KeyPolicy) -> Refusal | None:
        """The refusal with the longest wait, if any limit is reached."""
        if policy.name is None:
            return None
        now = self.clock()
        refusals = []
        for limit, allowed in policy.limits.items():
            used = self.usage(policy.name, limit, now)
            if used >= allowed:
                refusals.append(Refusal(policy.name, limit, used, allowed,
                                        self._retry_after(policy.name, limit, used, allowed, now)))
        return max(refusals, key=lambda r: r.retry_after, default=None)

    def enforce(self, policy: KeyPolicy) -> None:
        refusal = self.check(policy)
        if refusal is not None:
            self.refused[refusal.name, refusal.limit] += 1
            raise refusal.error()

    def _retry_after(self, name: str, limit: str, used: float, allowed: float, now: float) -> int:
        if limit == "usd_per_day":
            return max(1, math.ceil(_DAY_S - now % _DAY_S))  # to the next 00:00 UTC
        # The window drops bucket s at second s + 60: wait for the first drop that brings usage under.
        remaining = used
        for second, b in self.store.window(name, now):
            remaining -= _counted(b, limit)
            if remaining < allowed:
                return max(1, second + WINDOW_S - int(now))
        return WINDOW_S

    def record_start(self, name: str, prompt_tokens: int) -> None:
        """A request accepted (queued): it counts toward rpm, its prompt toward tpm."""
        self.store.add(name, self.clock(), requests=1, tokens=prompt_tokens)

    def record_end(self, name: str, completion_tokens: int, cost_usd: float) -> None:
        """A request ended (finished, aborted or failed): its output toward tpm, its cost toward USD."""
        self.store.add(name, self.clock(), tokens=completion_tokens, cost_usd=cost_usd)

    def close(self) -> None:
        self.store.close()


class KeyLimitsCollector:
    """thrifty:key_limit, thrifty:key_usage and thrifty:key_limited_requests_total by key name and
    limit, read from the limiter when Prometheus scrapes."""

    def __init__(self, limiter: Limiter, model_name: str):
        self.limiter = limiter
        self.model_name = model_name

    def collect(self):
        labels = ["model_name", "key_name", "limit"]
        limit = GaugeMetricFamily("thrifty:key_limit", "A key name's limit: rpm, tpm (per minute) or usd_per_day.",
                                  labels=labels)
        usage = GaugeMetricFamily("thrifty:key_usage", "A key name's usage against each limit: requests or tokens "
                                  "in the last 60 s, USD spent today (UTC).", labels=labels)
        refused = CounterMetricFamily("thrifty:key_limited_requests", "Requests refused with 429 because a key "
                                      "name was at a limit.", labels=labels)
        now = self.limiter.clock()
        for name, limits in sorted(self.limiter.limits.items()):
            for which, allowed in limits.items():
                row = [self.model_name, name, which]
                limit.add_metric(row, allowed)
                usage.add_metric(row, self.limiter.usage(name, which, now))
                refused.add_metric(row, self.limiter.refused.get((name, which), 0))
        yield from (limit, usage, refused)
