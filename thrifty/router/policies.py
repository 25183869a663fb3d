"""Routing policies: which of the healthy replicas gets a request. Pure code, no I/O.

A policy sees each candidate's `url` and `load` (requests running and waiting there, as the
router last scraped them, plus the ones it sent since) and the request's routing key (its prompt
text and its session).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

POLICIES = ("round_robin", "least_loaded", "prefix_aware", "session")


class Candidate(Protocol):
    url: str

    @property
    def load(self) -> float: ...


@dataclass(frozen=True)
class RouteKey:
    prompt: str = ""  # the prompt text (chat: the rendered messages), for prefix_aware
    session: str | None = None  # the `user` field or the session header, for session


class RoundRobin:
    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[Candidate], key: RouteKey) -> Candidate:
        ordered = sorted(candidates, key=lambda c: c.url)
        return ordered[next(self._turn) % len(ordered)]


class LeastLoaded:
    """The replica with the fewest requests; ties rotate, so equal replicas share the work."""

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[Candidate], key: RouteKey) -> Candidate:
        least = min(c.load for c in candidates)
        tied = sorted((c for c in candidates if c.load == least), key=lambda c: c.url)
        return tied[next(self._turn) % len(tied)]


def prefix_hashes(text: str, block_chars: int) -> list[int]:
    """One hash per whole block of the text, each chained to the blocks before it, so equal
    hashes mean equal prefixes (as the engine's prefix cache hashes token blocks)."""
    out, prev = [], 0
    for start in range(0, len(text) - block_chars + 1, block_chars):
        prev = hash((prev, text[start:start + block_chars]))
        out.append(prev)
    return out


class PrefixAware:
    """Sends a prompt to the replica that most recently served its longest known prefix, so that
    replica's prefix cache hits, unless that replica is overloaded.

    The load guard: a replica is eligible only while its load is within `balance_abs` requests of
    the least-loaded replica's, or within `balance_rel` times it. A hot prefix (one system prompt
    for all traffic) thus spreads to a second replica once the first is busier than that, and
    both then own it. With no prefix match of at least `min_match_blocks`, the least-loaded
    replica gets the request (and owns its prefix from then on).
    """

    def __init__(self, block_chars: int = 128, balance_abs: float = 4, balance_rel: float = 1.5,
                 min_match_blocks: int = 1, max_blocks: int = 200_000):
        if block_chars < 1 or balance_abs < 0 or balance_rel < 1 or min_match_blocks < 1 or max_blocks < 1:
            raise ValueError("prefix_aware: block_chars, min_match_blocks and max_blocks must be >= 1, "
                             "balance_abs >= 0 and balance_rel >= 1")
        self.block_chars = block_chars
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.min_match_blocks = min_match_blocks
        self.max_blocks = max_blocks
        self._owners: OrderedDict[int, set[str]] = OrderedDict()  # block hash -> replicas that hold it
        self._least = LeastLoaded()

    def matched_blocks(self, url: str, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if url not in self._owners.get(h, ()):
                break
            n += 1
        return n

    def choose(self, candidates: Sequence[Candidate], key: RouteKey) -> Candidate:
        hashes = prefix_hashes(key.prompt, self.block_chars)
        least = min(c.load for c in candidates)
        eligible = [c for c in candidates
                    if c.load <= least + self.balance_abs or c.load <= least * self.balance_rel]
        best = max(eligible, key=lambda c: (self.matched_blocks(c.url, hashes), -c.load))
        if self.matched_blocks(best.url, hashes) < self.min_match_blocks:
            best = self._least.choose(candidates, key)
        self._remember(best.url, hashes)
        return best

    def _remember(self, url: str, hashes: list[int]) -> None:
        for h in hashes:
            self._owners.setdefault(h, set()).add(url)
            self._owners.move_to_end(h)
        while len(self._owners) > self.max_blocks:
            self._owners.popitem(last=False)

    def forget(self, url: str) -> None:
        """A replica left the pool: its cache is gone (or will be cold when it comes back)."""
        for owners in self._owners.values():
            owners.discard(url)


class Session:
    """The same session always goes to the same replica while it is healthy (rendezvous hashing:
    a replica leaving or joining moves only its own sessions). No session: the least loaded."""

    def __init__(self) -> None:
        self._least = LeastLoaded()

    def choose(self, candidates: Sequence[Candidate], key: RouteKey) -> Candidate:
        if key.session is None:
            return self._least.choose(candidates, key)

        def score(c: Candidate) -> bytes:
            return hashlib.blake2b(f"{key.session}\0{c.url}".encode(), digest_size=8).digest()

        return max(candidates, key=score)


def make_policy(name: str, **prefix_options) -> RoundRobin | LeastLoaded | PrefixAware | Session:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded()
    if name == "prefix_aware":
        return PrefixAware(**prefix_options)
    if name == "session":
        return Session()
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}")
