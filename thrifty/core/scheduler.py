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

Queue order (`scheduling`):
- fcfs (default): arrival order, as above.
- priority: lower `Request.priority` first, then arrival. Each step walks running and waiting
  requests together in that order, so the token budget goes to the most urgent first; running
  requests it does not reach are deferred (they keep their KV and resume next step), and a step
  that computes an urgent prompt computes no less urgent one (only their decodes). A waiting
  request takes the seat or blocks it lacks from running requests of strictly lower priority
  (larger number) that this step has not scheduled, least urgent first; equal priorities never
  preempt each other. A victim's full blocks stay in the prefix cache, so it recomputes only
  what was evicted meanwhile. Aging: a request that has waited `priority_aging_seconds` gets
  one of `priority_aging_seats` protected seats as they free up, oldest first; a protected
  request is walked first and never a priority victim, which bounds every request's wait
  (docs/server.md, "Priority scheduling").
"""

from __future__ import annotations

import bisect
import heapq
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from thrifty.core.block_pool import KVCacheBlock
from thrifty.core.kv_cache_manager import KVCacheManager
from thrifty.core.request import Request, RequestStatus
from thrifty.sampling_params import SamplingParams


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    policy: str = "continuous"  # or "static"
    scheduling: str = "fcfs"  # queue order: or "priority"
    priority_aging_seconds: float = 30.0  # priority: a wait this long earns a protected seat
    priority_aging_seats: int = 1  # priority: protected seats (0: no aging)

    def __post_init__(self) -> None:
        if self.policy not in ("continuous", "static"):
            raise ValueError(f"scheduler policy must be 'continuous' or 'static', got {self.policy!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.scheduling not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be 'fcfs' or 'priority', got {self.scheduling!r}")
        if self.scheduling == "priority" and self.policy == "static":
            raise ValueError("priority scheduling needs the continuous scheduler, not static batches")
        if self.priority_aging_seconds < 0:
            raise ValueError(f"priority_aging_seconds must be >= 0, got {self.priority_aging_seconds}")
        if not 0 <= self.priority_aging_seats <= self.max_num_seqs:
            raise ValueError(f"priority_aging_seats must be between 0 and max_num_seqs ({self.max_num_seqs}), "
                             f"got {self.priority_aging_seats}")


@dataclass
class ScheduledRequest:
    """The scheduler's own record of a request it scheduled (the runner never reads it)."""

    request: Request
    num_new_tokens: int  # including the proposed tokens
    padding: bool = False  # a finished static-batch member: computed, never sampled
    spec_token_ids: list[int] = field(default_factory=list)  # proposals this step verifies

    @property
    def samples(self) -> bool:
        """Whether this step brings the request up to date, so its last position yields a token."""
        return not self.padding and (self.request.num_computed_tokens + self.num_new_tokens
                                     == self.request.num_tokens + len(self.spec_token_ids))


@dataclass
class SpecDecodeStats:
    """Cumulative, as vLLM's vllm:spec_decode_* counters."""

    num_drafts: int = 0  # requests that had proposals verified, summed over steps
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [i]: proposals accepted at position i

    def observe(self, num_draft: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_draft:
            self.accepted_per_pos += [0] * (num_draft - len(self.accepted_per_pos))
        for i in range(num_accepted):
            self.accepted_per_pos[i] += 1


@dataclass
class NewRequestData:
    """A request the runner has not seen, or has forgotten (preempted): all it needs to run it."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens sampled before a preemption, to be recomputed
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request the runner already holds: only what changed since its last step."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    # What the model runner reads: the changes since the last step (vLLM v1's shape).
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)  # by request id, in batch order
    padding_req_ids: list[str] = field(default_factory=list)  # static: one row each, recomputed, not sampled
    finished_req_ids: set[str] = field(default_factory=set)  # freed since the last step: forget them
    preempted_req_ids: set[str] = field(default_factory=set)  # freed by this step: forget them
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)  # proposals, by request id
    # What the scheduler and the engine keep for themselves.
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    padding: list[ScheduledRequest] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values()) + len(self.padding_req_ids)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerStats:
    """A snapshot for metrics and benchmarks (vLLM's make_stats())."""

    num_running_reqs: int
    num_waiting_reqs: int
    kv_cache_usage: float
    kv_blocks_used: int
    kv_slots_allocated: int  # slots held by running requests
    kv_slots_used: int  # of those, slots holding a computed token
    prefix_cache_queries: int  # cumulative, in tokens
    prefix_cache_hits: int
    num_preemptions: int  # cumulative
    num_priority_preemptions: int = 0  # cumulative: of those, made for a more urgent waiting request
    num_recovered_tokens: int = 0  # cumulative: prefix-cache hits of preempted requests on re-admission


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager):
        self.config = config
        self.kv = kv_cache_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.padding: list[Request] = []  # static: finished members of the running batch
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_priority_preemptions = 0
        self.num_recovered_tokens = 0
        self.spec_stats = SpecDecodeStats()
        self.by_priority = config.scheduling == "priority"
        self.clock: Callable[[], float] = time.monotonic  # aging's clock (the arrival times' clock)
        self._num_added = 0
        self._sent: set[str] = set()  # requests the runner holds (sent as new, not freed since)
        self._freed: set[str] = set()  # blocks freed since the last schedule(): the runner forgets them

    # -- queue management -------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        request.arrival_seq = self._num_added
        self._num_added += 1
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        if self.by_priority:
            bisect.insort(self.waiting, request, key=urgency)
        else:
            self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def num_waiting_ahead_of(self, priority: int) -> int:
        """Waiting requests a new request of this priority would queue behind."""
        if not self.by_priority:
            return len(self.waiting)
        # list() copies in one step of C, so the server's thread may ask while a step runs.
        return sum(1 for r in list(self.waiting) if r.protected or r.priority <= priority)

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
            self._free(request)
        if not self.running:
            for member in self.padding:
                self._free(member)
            self.padding.clear()
        return request

    def _free(self, request: Request) -> None:
        self.kv.free(request)
        self._freed.add(request.request_id)
        self._sent.discard(request.request_id)

    # -- the step -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._freed)
        self._freed = set()
        self.kv.begin_step()
        budget = self.config.max_num_batched_tokens
        static = self.config.policy == "static"
        if self.by_priority:
            self._schedule_by_priority(out, budget)
            return out
        if static and not self.running:
            self._admit_static_batch()

        i = 0
        while i < len(self.running) and budget > 0:
            num_new = self._schedule_running(out, self.running[i], budget, self.running.pop)
            if num_new is None:
                break  # the request itself was preempted
            budget -= num_new
            i += 1
        for request in self.padding[:budget]:
            out.padding.append(ScheduledRequest(request, 1, True))
            out.padding_req_ids.append(request.request_id)

        if not static and not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, request: Request, budget: int,
                          pop_victim: Callable[[], Request]) -> int | None:
        """Schedules a running request's next tokens; None if it was preempted itself. Out of
        blocks, it preempts requests from pop_victim (which ends with the request itself)."""
        behind = request.num_tokens - request.num_computed_tokens
        # Proposals ride along only with a request that is otherwise up to date, as far as
        # the budget and free blocks allow (never at the cost of a preemption).
        drafts = request.spec_token_ids[:max(0, budget - 1)] if behind == 1 else []
        request.spec_token_ids = []
        new_blocks = self.kv.allocate_slots(request, behind + len(drafts)) if drafts else None
        if new_blocks is None:
            drafts = []
            while (new_blocks := self.kv.allocate_slots(request, min(behind, budget))) is None:
                # Out of blocks: recompute a later request (the newest, or the least urgent) later.
                victim = pop_victim()
                self._preempt(victim, out)
                if victim is request:
                    return None
        num_new = min(behind, budget) + len(drafts)
        self._schedule(out, request, num_new, new_blocks, drafts)
        return num_new

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.kv.free(request)  # the runner learns of it through preempted_req_ids
        self._sent.discard(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(request)
        out.preempted_req_ids.add(request.request_id)
        if self.by_priority:
            self._enqueue(request)  # back to its (priority, arrival) place
        else:
            self.waiting.appendleft(request)

    # -- priority scheduling ------------------------------------------------------------
    def _schedule_by_priority(self, out: SchedulerOutput, budget: int) -> None:
        self._protect_starving()
        self.running.sort(key=urgency)
        # One walk over running and waiting requests in urgency order. Victims are always
        # requests this walk has not reached (so never one scheduled in this step): the running
        # list is sorted, and admitted requests are appended to it already scheduled.
        walk = heapq.merge(((urgency(r), 0, r) for r in list(self.running)),
                           ((urgency(r), 1, r) for r in list(self.waiting)))
        admitting = True
        # A step that computes an urgent prompt computes no less urgent one: the urgent request's
        # first token waits for the whole step, so only decodes of less urgent requests join it.
        prefill_priority: int | None = None
        for _, waiting, request in walk:
            if budget <= 0:
                break
            isolated = (prefill_priority is not None and request.priority > prefill_priority
                        and not request.protected)
            if not waiting:
                if request.status != RequestStatus.RUNNING:
                    continue  # preempted earlier in this walk
                if isolated and request.num_tokens - request.num_computed_tokens > 1:
                    continue  # deferred: its KV stays
                num_preempted = len(out.preempted)
                num_new = self._schedule_running(out, request, budget, lambda: self._pop_least_urgent(out))
                if len(out.preempted) > num_preempted:
                    admitting = False  # memory is short: no admissions into what was just freed
                budget -= num_new or 0
            elif admitting and not self._waits_for_leader(request):
                if isolated or out.preempted and urgency(request) > min(map(urgency, out.preempted)):
                    admitting = False  # nor admit a request less urgent than one just preempted
                    continue
                num_new = self._admit_by_priority(out, request, budget)
                if num_new is None:
                    admitting = False  # nothing less urgent may overtake it
                budget -= num_new or 0
            if self._is_prefill(out, request) and (prefill_priority is None or request.priority < prefill_priority):
                prefill_priority = request.priority

    @staticmethod
    def _is_prefill(out: SchedulerOutput, request: Request) -> bool:
        """Whether this step computes a chunk of the request's prompt (or of its recompute)."""
        num_new = out.num_scheduled_tokens.get(request.request_id)
        return num_new is not None and num_new - len(out.scheduled_spec_decode_tokens.get(request.request_id, ())) > 1

    def _admit_by_priority(self, out: SchedulerOutput, request: Request, budget: int) -> int | None:
        """Admits a waiting request, taking the seat and blocks it needs from running requests
        of strictly lower priority; the tokens it was scheduled, or None if it must wait."""
        while len(self.running) >= self.config.max_num_seqs:
            if not self._preempt_for(request, out):
                return None
        hit_blocks, num_hit = self.kv.get_computed_blocks(request)
        num_new = min(request.num_tokens - num_hit, budget)
        while (new_blocks := self.kv.allocate_slots(request, num_new, hit_blocks)) is None:
            if not self._preempt_for(request, out):
                return None
        self.waiting.remove(request)
        self._start(request, num_hit)
        self._schedule(out, request, num_new, new_blocks)
        return num_new

    def _preempt_for(self, request: Request, out: SchedulerOutput) -> bool:
        """Preempts the least urgent running request not yet scheduled in this step, if it may
        yield to `request`: it is not protected and its priority is strictly lower (a protected
        request may take from any unprotected one)."""
        victim = self._least_urgent_unscheduled(out)
        if victim is None or victim.protected or not (request.protected or victim.priority > request.priority):
            return False
        self.running.remove(victim)
        self._preempt(victim, out)
        self.num_priority_preemptions += 1
        return True

    def _least_urgent_unscheduled(self, out: SchedulerOutput) -> Request | None:
        return next((r for r in reversed(self.running) if r.request_id not in out.num_scheduled_tokens), None)

    def _pop_least_urgent(self, out: SchedulerOutput) -> Request:
        # Called while scheduling a running request not yet scheduled, so there is one: at worst itself.
        victim = self._least_urgent_unscheduled(out)
        self.running.remove(victim)
        return victim

    def _protect_starving(self) -> None:
        """Gives free aging seats to the requests, waiting or running (a running one may be deferred
        step after step), that have waited longest past the threshold."""
        cfg = self.config
        unfinished = (*self.waiting, *self.running)  # (a request is protected until it finishes)
        free_seats = cfg.priority_aging_seats - sum(r.protected for r in unfinished)
        if free_seats <= 0:
            return
        deadline = self.clock() - cfg.priority_aging_seconds
        # (A follower waiting for its leader could not use the seat: the leader gets it first.)
        starving = sorted((r for r in unfinished if not r.protected and r.arrival_time <= deadline
                           and not self._waits_for_leader(r)), key=lambda r: (r.arrival_time, r.arrival_seq))
        for oldest in starving[:free_seats]:
            oldest.protected = True
            if oldest.status != RequestStatus.RUNNING:
                self.waiting.remove(oldest)
                self._enqueue(oldest)  # to the front, among the protected

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.popleft()
            if self._waits_for_leader(request):
                skipped.append(request)
                continue
            hit_blocks, num_hit = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit, budget)
            new_blocks = self.kv.allocate_slots(request, num_new, hit_blocks)
            if new_blocks is None:
                self.waiting.appendleft(request)
                break
            self._start(request, num_hit)
            self._schedule(out, request, num_new, new_blocks)
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
        elif request.num_preemptions:
            self.num_recovered_tokens += num_hit  # work a preemption did not lose
        self.running.append(request)

    def _schedule(self, out: SchedulerOutput, request: Request, num_new: int,
                  new_blocks: list[KVCacheBlock], drafts: list[int] | None = None) -> None:
        rid = request.request_id
        out.scheduled.append(ScheduledRequest(request, num_new, spec_token_ids=drafts or []))
        out.num_scheduled_tokens[rid] = num_new
        if drafts:
            out.scheduled_spec_decode_tokens[rid] = drafts
        if rid not in self._sent:
            self._sent.add(rid)
            out.scheduled_new_reqs.append(NewRequestData(
                rid, request.prompt_token_ids, list(request.output_token_ids), request.sampling_params,
                self.kv.get_block_ids(rid), request.num_computed_tokens))
        else:
            out.scheduled_cached_reqs.append(CachedRequestData(
                rid, [b.block_id for b in new_blocks], request.num_computed_tokens))

    def make_stats(self) -> SchedulerStats:
        kv = self.kv
        return SchedulerStats(
            num_running_reqs=self.num_running,
            num_waiting_reqs=self.num_waiting,
            kv_cache_usage=kv.usage(),
            kv_blocks_used=kv.pool.num_used_blocks,
            kv_slots_allocated=sum(kv.num_blocks_of(r.request_id) for r in self.running) * kv.block_size,
            kv_slots_used=sum(r.num_computed_tokens for r in self.running),
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
            num_priority_preemptions=self.num_priority_preemptions,
            num_recovered_tokens=self.num_recovered_tokens,
        )

    # -- after the model ran ------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Request]:
        """Advance computed counts, append sampled tokens, apply token-level stop rules.

        A request that verified k proposals gets 1 to k + 1 tokens: the proposals accepted, then
        the target's own token. The rejected proposals' KV positions are rewound (their slots
        are overwritten by the next tokens; their blocks stay with the request). Returns the
        requests that finished (their blocks are already freed)."""
        finished = []
        for s in out.scheduled:
            request = s.request
            tokens = sampled.get(request.request_id)
            num_rejected = 0
            if s.spec_token_ids:
                num_accepted = len(tokens) - 1
                num_rejected = len(s.spec_token_ids) - num_accepted
                self.spec_stats.observe(len(s.spec_token_ids), num_accepted)
            request.num_computed_tokens += s.num_new_tokens - num_rejected
            for token in tokens or ():
                request.output_token_ids.append(token)
                status = self._check_stop(request, token)
                if status is not None:
                    finished.append(self.finish_request(request.request_id, status))
                    break
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


def urgency(request: Request) -> tuple:
    """Priority scheduling's order: protected requests first (oldest first), then by priority
    (lower first), arrival and the order requests were added."""
    if request.protected:
        return (0, request.arrival_time, request.arrival_seq)
    return (1, request.priority, request.arrival_time, request.arrival_seq)
