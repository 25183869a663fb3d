"""AsyncLLM: the engine loop as an asyncio task, for the server.

One task owns the LLMEngine. Between steps it applies queued adds and aborts; each step runs
in a worker thread (torch releases the GIL), so the event loop keeps serving HTTP while the
model computes. Outputs are cut into deltas right after each step (before the next step
extends the engine's lists) and pushed to each request's queue.

Sleep mode (sleep(), wake_up()): the engine is awake, draining (a sleep was asked for: requests
in flight are aborted, or with mode "wait" finished, up to a timeout), asleep, or waking. Sleep
and wake run in the worker thread between steps, like a step, never overlapping one. A request
arriving while draining or asleep gets EngineSleepingError (the server's 503), or with
wake_on_request waits for the wake it triggers; one arriving while waking waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from thrifty.config import EngineConfig
from thrifty.engine.cost_meter import CostMeter
from thrifty.engine.llm_engine import LLMEngine, StepFailed
from thrifty.engine.sleep import SLEEP_MODES, EngineSleepingError, SleepConfig, SleepResult, check_level
from thrifty.outputs import CompletionOutput, RequestOutput
from thrifty.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; no request can be served any more."""


@dataclass
class _Stream:
    queue: asyncio.Queue
    sent_text: list[int]  # characters of each choice already delivered
    sent_tokens: list[int]
    sent_logprobs: list[int]
    finished: bool = False


@dataclass
class _SleepOrder:
    level: int
    deadline: float  # requests still in flight then are aborted (mode "abort": at once)
    ordered_at: float  # requests that arrive later wait for the wake (or are refused)
    waiters: list[asyncio.Future] = field(default_factory=list)  # the sleep() calls (none for an idle sleep)


@dataclass
class StepObservation:
    """What one engine step did, for metrics and cost accounting."""

    end: float
    num_tokens: int  # computed in the step, over all its requests
    outputs: list[RequestOutput] = field(default_factory=list)  # deltas, as the requests received them


class AsyncLLM:
    def __init__(self, config: EngineConfig, max_waiting_requests: int | None = None, price_per_hour: float = 0.0,
                 sleep_config: SleepConfig | None = None):
        self.sleep_config = sleep_config or SleepConfig()
        if (self.sleep_config.wake_on_request or self.sleep_config.sleep_when_idle) and not config.enable_sleep_mode:
            raise ValueError("wake_on_request and sleep_when_idle need sleep mode (--enable-sleep-mode)")
        self.engine = LLMEngine(config)
        self.cost = CostMeter(price_per_hour)
        self.max_waiting_requests = max_waiting_requests
        self._streams: dict[str, _Stream] = {}
        self._pending: list[Callable[[], None]] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="thrifty-engine")
        self._num_pending_adds = 0
        self.dead_error: BaseException | None = None
        self.step_observers: list[Callable[[StepObservation], None]] = []
        # Called with (request id, "abort" | "error") when a request ends without finishing.
        self.end_observers: list[Callable[[str, str], None]] = []
        # Sleep mode: see the module's docstring.
        self.sleep_state = "awake"  # awake, draining, asleep or waking
        self._sleep_order: _SleepOrder | None = None
        self._wake_waiters: list[asyncio.Future] = []
        self._held: list[Callable[[], None]] = []  # adds that arrived while not awake, run after the wake
        self._held_ids: set[str] = set()
        self._last_active = time.monotonic()  # the last arrival or step, for sleep_when_idle
        self.last_wake_seconds = 0.0
        self.num_refused_asleep = 0
        self.sleep_observers: list[Callable[[SleepResult], None]] = []
        self.wake_observers: list[Callable[[float], None]] = []

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.cost = CostMeter(self.cost.price_per_hour)  # the server's life starts now
        self._last_active = time.monotonic()
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="thrifty-engine-loop")

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._executor.shutdown(wait=True)

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done() and self.dead_error is None

    @property
    def num_waiting(self) -> int:
        """Requests queued and not yet admitted (including adds not yet handed to the engine)."""
        return self.engine.num_waiting_requests() + self._num_pending_adds

    def num_waiting_ahead_of(self, priority: int) -> int:
        """Queued requests a new one of this priority would wait behind (all of them under fcfs)."""
        return self.engine.num_waiting_ahead_of(priority) + self._num_pending_adds

    @property
    def num_running(self) -> int:
        return self.engine.num_running_requests()

    # -- requests -----------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       prompt: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """add_request() and its outputs in one call."""
        async for out in self.add_request(prompt_token_ids, params, request_id, prompt, priority):
            yield out

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                    prompt: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Queues the request now (so it counts as waiting at once) and returns an iterator of
        RequestOutputs whose choices carry only what is new since the last one. Raises ValueError
        for a bad prompt before anything is queued. Leaving the iteration early (a client gone)
        aborts the request and frees its blocks before the next step; so does abort()."""
        if not self.is_running:
            raise EngineDeadError("the engine loop is not running")
        self.engine.validate(prompt_token_ids)
        self.engine.check_priority(priority)
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if self.sleep_state in ("draining", "asleep") and not self.sleep_config.wake_on_request:
            self.num_refused_asleep += 1
            raise self._sleeping_error("the engine is asleep or going to sleep (POST /wake_up wakes it)")
        stream = _Stream(asyncio.Queue(), [0] * params.n, [0] * params.n, [0] * params.n)
        self._streams[request_id] = stream
        arrival = self._last_active = time.monotonic()
        self._num_pending_adds += 1

        def add() -> None:
            if request_id in self._streams and self._must_hold(arrival):
                self._held.append(add)
                self._held_ids.add(request_id)
                return
            self._num_pending_adds -= 1
            self._held_ids.discard(request_id)
            if request_id not in self._streams:
                return  # aborted before it reached the engine
            try:
                self.engine.add_request({"prompt": prompt, "prompt_token_ids": prompt_token_ids}, params,
                                        request_id, arrival, priority)
            except Exception as e:  # delivered to the one request that caused it
                self._finish_stream(request_id, e)

        self._submit(add)
        return self._outputs(request_id, stream)

    async def _outputs(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request (no-op if it already finished); its blocks are freed before the next step."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        stream.finished = True
        self._submit(lambda: self._drop(request_id))
        for observe in self.end_observers:
            observe(request_id, "abort")

    def _must_hold(self, arrival: float) -> bool:
        """Whether a new request waits for the engine to wake: it is asleep or waking, or going
        to sleep and the request came after the sleep was asked for."""
        order = self._sleep_order
        return self.sleep_state != "awake" and not (self.sleep_state == "draining" and arrival < order.ordered_at)

    def _sleeping_error(self, message: str) -> EngineSleepingError:
        return EngineSleepingError(f"{message}; retry later", self.last_wake_seconds)

    # -- sleep mode -----------------------------------------------------------------------
    async def sleep(self, level: int = 1, mode: str = "abort") -> SleepResult:
        """Puts the engine to sleep (LLMEngine.sleep) once the requests in flight are aborted
        (mode "abort", vLLM's default: each gets EngineSleepingError) or finished (mode "wait",
        up to sleep_config.drain_timeout, then aborted). Sleeping again at the same level or
        lower does nothing (0 bytes released); at a deeper one it discards the rest."""
        if not self.engine.config.enable_sleep_mode:
            raise ValueError("sleep: sleep mode is not enabled (--enable-sleep-mode)")
        check_level(level)
        if mode not in SLEEP_MODES:
            raise ValueError(f"mode: must be one of {SLEEP_MODES}, got {mode!r}")
        if not self.is_running:
            raise EngineDeadError("the engine loop is not running")
        if self.sleep_state == "asleep" and self._sleep_order is None and self.engine.sleep_level >= level:
            return SleepResult(self.engine.sleep_level, 0, 0.0, 0, 0)
        waiter = asyncio.get_running_loop().create_future()
        self._order_sleep(level, mode).waiters.append(waiter)
        return await waiter

    async def wake_up(self) -> float:
        """Wakes the engine (after the sleep in progress, if any); returns the seconds the wake
        took (0 when it was awake)."""
        if not self.is_running:
            raise EngineDeadError("the engine loop is not running")
        if self.sleep_state == "awake" and self._sleep_order is None:
            return 0.0
        waiter = asyncio.get_running_loop().create_future()
        self._wake_waiters.append(waiter)
        self._wakeup.set()
        return await waiter

    @property
    def is_sleeping(self) -> bool:
        """From the moment a sleep is asked for until the wake is done (vLLM's is_sleeping)."""
        return self.sleep_state != "awake"

    def _order_sleep(self, level: int, mode: str) -> _SleepOrder:
        now = time.monotonic()
        deadline = now + self.sleep_config.drain_timeout if mode == "wait" else now
        order = self._sleep_order
        if order is None:
            order = self._sleep_order = _SleepOrder(level, deadline, now)
        else:  # one sleep for every call: the deepest level, the earliest deadline
            order.level = max(order.level, level)
            order.deadline = min(order.deadline, deadline)
        if self.sleep_state == "awake":
            self.sleep_state = "draining"
        self._wakeup.set()
        return order

    async def _go_to_sleep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Aborts what is still in flight (each request answered with EngineSleepingError; held
        ones too without wake_on_request), then sleeps in the worker thread."""
        order, engine = self._sleep_order, self.engine
        error = self._sleeping_error("the engine went to sleep while this request was in flight")
        keep = self._held_ids if self.sleep_config.wake_on_request else set()
        for request_id in [r for r in self._streams if r not in keep]:
            self._end_stream(request_id, error, "abort")
        for request_id in engine.unfinished_request_ids():
            self._drop(request_id)
        if not keep:
            held, self._held = self._held, []
            for op in held:  # (their streams are gone: they only count themselves out)
                op()
        self.cost.went_to_sleep(time.monotonic())
        try:
            result = await loop.run_in_executor(self._executor, engine.sleep, order.level)
        except BaseException as e:
            _settle(order.waiters, error=EngineDeadError(f"the engine failed to sleep: {e!r}"))
            raise
        self._sleep_order = None
        self.sleep_state = "asleep"
        logger.info("asleep at level %d: %.3f GiB released in %.2f s", result.level, result.released_bytes / 2**30,
                    result.seconds)
        _settle(order.waiters, result)
        for observe in self.sleep_observers:
            observe(result)

    async def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        self.sleep_state = "waking"
        try:
            seconds = await loop.run_in_executor(self._executor, self.engine.wake_up)
        except BaseException as e:
            _settle(self._wake_waiters, error=EngineDeadError(f"the engine failed to wake up: {e!r}"))
            raise
        self.cost.woke(time.monotonic())
        self.last_wake_seconds = seconds
        self.sleep_state = "draining" if self._sleep_order is not None else "awake"
        self._last_active = time.monotonic()
        logger.info("awake again in %.2f s", seconds)
        waiters, self._wake_waiters = self._wake_waiters, []
        _settle(waiters, seconds)
        for observe in self.wake_observers:
            observe(seconds)
        held, self._held = self._held, []
        for op in held:
            op()

    async def _idle(self) -> None:
        """Waits for work; with sleep_when_idle, asks for a sleep once the engine has had none
        for that long."""
        after = self.sleep_config.sleep_when_idle
        if after is None or self.sleep_state != "awake":
            await self._wakeup.wait()
            return
        try:
            await asyncio.wait_for(self._wakeup.wait(), max(0.0, self._last_active + after - time.monotonic()))
        except asyncio.TimeoutError:
            logger.info("no request for %g s: going to sleep (level %d)", after, self.sleep_config.sleep_level)
            self._order_sleep(self.sleep_config.sleep_level, "abort")

    def _submit(self, op: Callable[[], None]) -> None:
        self._pending.append(op)
        if self._wakeup is not None:
            self._wakeup.set()

    # -- the loop -----------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self.engine
        try:
            while True:
                ops, self._pending = self._pending, []
                for op in ops:
                    op()
                order = self._sleep_order
                if order is not None and self.sleep_state in ("draining", "asleep") and (
                        not engine.has_unfinished_requests() or time.monotonic() >= order.deadline):
                    await self._go_to_sleep(loop)
                    continue
                if self.sleep_state == "asleep" and (self._wake_waiters or self._held):
                    await self._wake(loop)
                    continue
                if self.sleep_state == "asleep" or not engine.has_unfinished_requests():
                    self.cost.went_idle()
                    self._wakeup.clear()
                    if not self._pending:
                        await self._idle()
                    continue
                start = time.monotonic()
                self.cost.work_arrived(start)
                try:
                    outputs, stats = await loop.run_in_executor(self._executor, engine.step_with_stats)
                except StepFailed as e:
                    logger.exception("engine step failed; its requests get an error, the others go on")
                    self.cost.step(time.monotonic(), e.stats.num_tokens_by_request)
                    for request_id in e.request_ids:
                        self.cost.forget(request_id, billed=False)
                        self._end_stream(request_id, RuntimeError(f"the model step failed: {e.__cause__!r}"), "error")
                    continue
                end = self._last_active = time.monotonic()
                self.cost.step(end, stats.num_tokens_by_request)
                deltas = self._dispatch(outputs)
                obs = StepObservation(end, sum(stats.num_tokens_by_request.values()), deltas)
                for observe in self.step_observers:
                    observe(obs)
                await asyncio.sleep(0)  # let handlers run between steps
        except asyncio.CancelledError:
            self._fail_all(EngineDeadError("the server is shutting down"))
            raise
        except BaseException as e:
            logger.exception("engine loop failed")
            self.dead_error = e
            self._fail_all(EngineDeadError(f"the engine loop failed: {e!r}"))

    def _dispatch(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        deltas = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            delta = RequestOutput(out.request_id, out.prompt, out.prompt_token_ids,
                                  [self._delta(stream, c) for c in out.outputs], out.finished, out.metrics,
                                  out.num_cached_tokens, self.cost.request_cost(out.request_id))
            stream.queue.put_nowait(delta)
            deltas.append(delta)
            if out.finished:
                stream.finished = True
                self._streams.pop(out.request_id, None)
                self.cost.forget(out.request_id, billed=True)
        return deltas

    @staticmethod
    def _delta(stream: _Stream, c: CompletionOutput) -> CompletionOutput:
        i = c.index
        text = c.text[stream.sent_text[i]:]
        tokens = c.token_ids[stream.sent_tokens[i]:]
        logprobs = None if c.logprobs is None else c.logprobs[stream.sent_logprobs[i]:]
        stream.sent_text[i] = len(c.text)
        stream.sent_tokens[i] = len(c.token_ids)
        stream.sent_logprobs[i] = len(c.logprobs) if c.logprobs is not None else 0
        return CompletionOutput(i, text, list(tokens), c.cumulative_logprob, logprobs, c.finish_reason,
                                c.stop_reason)

    def _finish_stream(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.finished = True
            stream.queue.put_nowait(error)

    def _end_stream(self, request_id: str, error: BaseException, how: str) -> None:
        """Ends a request's stream with an error and tells the end observers how it ended."""
        self._finish_stream(request_id, error)
        for observe in self.end_observers:
            observe(request_id, how)

    def _drop(self, request_id: str) -> None:
        """Frees a request the engine still holds; what it cost so far is billed to no response."""
        self.engine.abort_request(request_id)
        self.cost.forget(request_id, billed=False)

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._streams):
            self._finish_stream(request_id, error)
        waiters = self._wake_waiters + (self._sleep_order.waiters if self._sleep_order is not None else [])
        _settle(waiters, error=error)


def _settle(waiters: list[asyncio.Future], result=None, error: BaseException | None = None) -> None:
    """Answers the sleep() or wake_up() calls still waiting (a cancelled one is gone)."""
    for waiter in waiters:
        if not waiter.done():
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(result)
