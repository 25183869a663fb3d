"""A request as the scheduler sees it: tokens, and how many of them have KV computed."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from thrifty.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything from here on is finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


# A proposal the model runner's drafter makes within the step that verifies it (draft_model,
# layer_skip): the scheduler reserves its slot and budget like any other proposal's.
DRAFT_PENDING = -1

_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    # n > 1: the siblings of one prompt share a salt so they can share prompt blocks
    # even when prefix caching is off, and followers wait for the leader's prefill.
    cache_salt: str | None = None
    leader: Request | None = field(default=None, repr=False)
    priority: int = 0  # --scheduling-policy priority: lower is served first


    output_token_ids: list[int] = field(default_factory=list)
    # Proposed next tokens (speculative decoding), verified by the next step that computes them.
    spec_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hits at first admission; -1 = not admitted yet
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    # Priority scheduling: set once the request has waited past the aging threshold and holds a
    # seat of the aging lane (never a priority victim from then on).
    protected: bool = False
    arrival_seq: int = 0  # tie-break after arrival_time, set by the scheduler

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def max_tokens(self) -> int:
        return self.sampling_params.max_tokens or 1 << 62

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def is_prefilled(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    def token_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]
