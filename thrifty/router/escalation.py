"""When a cheaper tier's answer is poor enough to ask the next tier. Pure code, no I/O.

An answer is judged from what the tier returned (a whole response, or a stream gathered into
one): any choice that is poor makes the answer poor. The reasons, checked in this order:
- `length`: a choice stopped at max_tokens (finish_reason "length"), so it is cut short;
- `invalid_json`: the request asked for JSON (response_format json_object or json_schema) and a
  choice's text does not parse;
- `low_logprob`: the mean logprob of a choice's tokens is under the threshold (the model was
  unsure); the router asks the tier for the sampled tokens' logprobs to know it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

REASONS = ("length", "invalid_json", "low_logprob")


@dataclass
class GatheredChoice:
    """One choice of an answer, however it arrived."""

    text: str = ""
    finish_reason: str | None = None
    token_logprobs: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class EscalationPolicy:
    reasons: frozenset[str] = frozenset(REASONS)
    min_mean_logprob: float = -1.0

    def __post_init__(self) -> None:
        unknown = set(self.reasons) - set(REASONS)
        if unknown:
            raise ValueError(f"escalate_on: unknown reason(s) {sorted(unknown)}; choose from {', '.join(REASONS)}")

    @property
    def needs_logprobs(self) -> bool:
        return "low_logprob" in self.reasons

    def judge(self, request: dict, choices: list[GatheredChoice]) -> str | None:
        """The reason to escalate, or None when the answer is good enough."""
        wants_json = (request.get("response_format") or {}).get("type") in ("json_object", "json_schema")
        for reason in REASONS:
            if reason in self.reasons and any(self._poor(reason, c, wants_json) for c in choices):
                return reason
        return None

    def _poor(self, reason: str, choice: GatheredChoice, wants_json: bool) -> bool:
        if reason == "length":
            return choice.finish_reason == "length"
        if reason == "invalid_json":
            if not wants_json:
                return False
            try:
                json.loads(choice.text)
            except ValueError:
                return True
            return False
        lps = choice.token_logprobs
        return bool(lps) and sum(lps) / len(lps) < self.min_mean_logprob


def gather_response(body: dict) -> list[GatheredChoice]:
    """The choices of a non-streamed completions or chat completions response."""
    out = []
    for c in body.get("choices") or []:
        out.append(GatheredChoice(_text(c, "message"), c.get("finish_reason"), choice_logprobs(c.get("logprobs"))))
    return out


def _text(choice: dict, chat_field: str) -> str:
    """A chat choice's message (or a chunk's delta) content, else a completions choice's text."""
    if chat_field in choice:
        return (choice[chat_field] or {}).get("content") or ""
    return choice.get("text") or ""


def choice_logprobs(logprobs: dict | None) -> list[float]:
    """The sampled tokens' logprobs of a choice (or of a stream chunk's choice), either API."""
    if not logprobs:
        return []
    if "content" in logprobs:  # chat
        return [float(t["logprob"]) for t in logprobs.get("content") or [] if t.get("logprob") is not None]
    return [float(lp) for lp in logprobs.get("token_logprobs") or [] if lp is not None]  # completions


def add_stream_chunk(choices: dict[int, GatheredChoice], chunk: dict) -> None:
    """Folds one streamed chunk into the per-index choices gathered so far."""
    for c in chunk.get("choices") or []:
        g = choices.setdefault(int(c.get("index", 0)), GatheredChoice())
        g.text += _text(c, "delta")
        g.token_logprobs += choice_logprobs(c.get("logprobs"))
        if c.get("finish_reason") is not None:
            g.finish_reason = c["finish_reason"]
