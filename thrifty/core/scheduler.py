"""Which requests run this step, and how many tokens each computes.

Every request is "num_computed_tokens catching up with its tokens": a prefill, a chunk of one,
a decode after a prefix-cache hit and a recompute after preemption are the same mechanism.

Policies:
- continuous (default): running requests first, then waiting ones are admitted while the
  token budget, `max_num_seqs` and free blocks allow; long prompts are chunked to fit.
- static: a batch is admitted only when nothing runs, each request reserving blocks for its
  whole prompt + max_tokens up front, and it runs to completion (the classic baseline). The
  batch keeps its shape until its slowest member finishes, as a fixed batch tensor does in
  transformers' `generate`: a member that finished early is returned at once, but it stays in
  the batch as a padding row (its last position recomputed, nothing sampled) and keeps its
  blocks until the whole batch is done.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from thrifty.core.kv_cache_manager import KVCacheManager
from thrifty.core.request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    policy: str = "continuous"  # or "static"

    def __post_init__(self) -> None:
        if self.policy not in ("continuous", "static"):
            raise ValueError(f"scheduler policy must be 'continuous' or 'static', got {self.policy!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    block_ids: list[int]
    padding: bool = False  # a finished static-batch member: computed, never sampled

    @property
    def samples(self) -> bool:
        """Whether this step brings the request up to date, so its last position yields a token."""
        return not self.padding and self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    padding: list[ScheduledRequest] = field(default_factory=list)  # static only: one row each

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled) + len(self.padding)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager):
        self.config = config
        self.kv = kv_cache_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.padding: list[Request] = []  # static: finished members of the running batch
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # -- queue management -------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Stop a request (abort, stop string) and free its blocks, at once or, for a member of a
        static batch that did not abort, when the whole batch is done."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        was_running = request.status == RequestStatus.RUNNING
        if was_running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        if was_running and self.config.policy == "static" and status != RequestStatus.FINISHED_ABORTED:
            self.padding.append(request)
        else:
            self.kv.free(request)
        if not self.running:
            for member in self.padding:
                self.kv.free(member)
            self.padding.clear()
        return request

    # -- the step -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        static = self.config.policy == "static"
        if static and not self.running:
            self._admit_static_batch()

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, num_new, out):
                break  # the request itself was preempted
            out.scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
            i += 1
        for request in self.padding[:budget]:
            out.padding.append(ScheduledRequest(request, 1, self.kv.get_block_ids(request.request_id), True))

        if not static and not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        while self.kv.allocate_slots(request, num_new) is None:
            # Out of blocks: recompute the most recently admitted request later.
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.popleft()
            if self._waits_for_leader(request):
                skipped.append(request)
                continue
            hit_blocks, num_hit = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit, budget)
            if self.kv.allocate_slots(request, num_new, hit_blocks) is None:
                self.waiting.appendleft(request)
                break
            self._start(request, num_hit)
            out.scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))

    def _admit_static_batch(self) -> None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hit_blocks, num_hit = self.kv.get_computed_blocks(request)
            # Reserve the whole request (prompt + max_tokens) as contiguous allocators do.
            max_len = min(request.num_prompt_tokens + request.max_tokens, self.config.max_model_len)
            # Reserve only: blocks enter the prefix cache as chunks are really computed.
            if self.kv.allocate_slots(request, 0, hit_blocks, max_len - num_hit) is None:
                break
            self.waiting.popleft()
            self._start(request, num_hit)

    def _waits_for_leader(self, request: Request) -> bool:
        # n > 1 followers wait for the leader's prompt KV, then hit it in the prefix cache.
        leader = request.leader
        return leader is not None and leader.request_id in self.requests and not leader.is_prefilled

    def _start(self, request: Request, num_hit: int) -> None:
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = num_hit
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit
            request.first_scheduled_time = time.monotonic()
        self.running.append(request)

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        return ScheduledRequest(request, num_new, self.kv.get_block_ids(request.request_id))

    # -- after the model ran ------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed counts, append sampled tokens, apply token-level stop rules.
        Returns the requests that finished (their blocks are already freed)."""
        finished = []
        for s in out.scheduled:
            request = s.request
            request.num_computed_tokens += s.num_new_tokens
            token = sampled.get(request.request_id)
            if token is None:
                continue
            request.output_token_ids.append(token)
            status = self._check_stop(request, token)
            if status is not None:
                finished.append(self.finish_request(request.request_id, status))
        return finished

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH_CAPPED
        return None
