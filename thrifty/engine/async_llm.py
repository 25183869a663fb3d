"""AsyncLLM: the engine loop as an asyncio task, for the server.

One task owns the LLMEngine. Between steps it applies queued adds and aborts; each step runs
in a worker thread (torch releases the GIL), so the event loop keeps serving HTTP while the
model computes. Outputs are cut into deltas right after each step (before the next step
extends the engine's lists) and pushed to each request's queue.
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
class StepObservation:
    """What one engine step did, for metrics and cost accounting."""

    end: float
    num_tokens: int  # computed in the step, over all its requests
    outputs: list[RequestOutput] = field(default_factory=list)  # deltas, as the requests received them


class AsyncLLM:
    def __init__(self, config: EngineConfig, max_waiting_requests: int | None = None, price_per_hour: float = 0.0):
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

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.cost = CostMeter(self.cost.price_per_hour)  # the server's life starts now
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
        stream = _Stream(asyncio.Queue(), [0] * params.n, [0] * params.n, [0] * params.n)
        self._streams[request_id] = stream
        arrival = time.monotonic()
        self._num_pending_adds += 1

        def add() -> None:
            self._num_pending_adds -= 1
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

        def abort() -> None:
            self.engine.abort_request(request_id)
            self.cost.forget(request_id, billed=False)

        self._submit(abort)
        for observe in self.end_observers:
            observe(request_id, "abort")

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
                if not engine.has_unfinished_requests():
                    self.cost.went_idle()
                    self._wakeup.clear()
                    if not self._pending:
                        await self._wakeup.wait()
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
                        self._finish_stream(request_id, RuntimeError(f"the model step failed: {e.__cause__!r}"))
                        for observe in self.end_observers:
                            observe(request_id, "error")
                    continue
                end = time.monotonic()
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

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._streams):
            self._finish_stream(request_id, error)
