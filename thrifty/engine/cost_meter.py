"""Live cost: every second of the server's life is paid for, and charged to someone.

Wall time is split exactly into busy time (the engine had requests: from the end of the previous
step, or the moment work arrived, to the end of this step) and idle time (nothing to run). A
step's busy time x price is charged to the requests it computed, in proportion to the tokens each
computed in it; idle time x price is the idle cost. So the requests' costs sum to the busy cost
(those of aborted or failed requests, which no response reports, are also counted apart as
unbilled), and busy + idle cost = elapsed time x price, up to the step in progress, which is
counted when it ends.

Sleep mode adds a third state, asleep (from the start of a sleep to the end of the wake that
follows it): busy + idle + asleep time = elapsed time. The instance is billed while asleep too,
so asleep time x price is reported apart from idle cost, not charged to any request.
"""

from __future__ import annotations

import time
from collections import deque


class CostMeter:
    def __init__(self, price_per_hour: float = 0.0, window_s: float = 60.0, now: float | None = None):
        if price_per_hour < 0:
            raise ValueError(f"price_per_hour must be >= 0, got {price_per_hour}")
        self.price_per_hour = price_per_hour
        self.window_s = window_s
        self.start = self.mark = time.monotonic() if now is None else now
        self.idle = True  # whether the time since `mark` is idle (else it belongs to the next step)
        self.busy_s = 0.0
        self.idle_s = 0.0
        self.asleep = False  # whether the time since `mark` is asleep
        self.asleep_s = 0.0
        self.busy_cost_usd = 0.0
        self.unbilled_cost_usd = 0.0  # part of busy_cost_usd charged to requests that never reported it
        self._charged_s = 0.0  # charged outside the steps, still to take out of the idle or step time
        self._request_cost: dict[str, float] = {}
        self._recent: deque[tuple[float, float, int]] = deque()  # (end, busy seconds, tokens) per step

    @property
    def price_per_s(self) -> float:
        return self.price_per_hour / 3600.0

    # -- the engine loop reports ----------------------------------------------------------
    def work_arrived(self, now: float) -> None:
        """The engine had nothing to run until now."""
        if self.idle:
            self.idle_s += self._uncharged(now - self.mark)
            self.mark = now
            self.idle = False

    def went_idle(self) -> None:
        """Nothing left to run: time from the last step's end on is idle."""
        if not self.asleep:
            self.idle = True

    def went_to_sleep(self, now: float) -> None:
        """The engine starts to sleep (nothing runs): time from now until woke() is asleep; the
        time since the last step's end was idle."""
        if not self.asleep:
            self.idle_s += self._uncharged(now - self.mark)
            self.mark = now
            self.idle, self.asleep = False, True

    def woke(self, now: float) -> None:
        """The wake finished (its time counts as asleep); the engine is idle until work arrives."""
        if self.asleep:
            self.asleep_s += self._uncharged(now - self.mark)
            self.mark = now
            self.idle, self.asleep = True, False

    def charge(self, request_id: str, seconds: float) -> None:
        """Machine seconds spent for one request outside the steps (compiling its grammar): its
        cost, taken out of the time they were spent in (the idle time then, or the step that ran
        meanwhile), so that busy + idle time still add up to the elapsed time."""
        cost = seconds * self.price_per_s
        self._request_cost[request_id] = self._request_cost.get(request_id, 0.0) + cost
        self.busy_s += seconds
        self.busy_cost_usd += cost
        self._charged_s += seconds

    def _uncharged(self, seconds: float) -> float:
        taken = min(seconds, self._charged_s)
        self._charged_s -= taken
        return seconds - taken

    def step(self, end: float, tokens_by_request: dict[str, int]) -> None:
        seconds = self._uncharged(end - self.mark)
        self.mark = end
        total = sum(tokens_by_request.values())
        if total == 0:  # a step that computed nothing is not anyone's cost
            self.idle_s += seconds
            return
        cost = seconds * self.price_per_s
        self.busy_s += seconds
        self.busy_cost_usd += cost
        for request_id, n in tokens_by_request.items():
            self._request_cost[request_id] = self._request_cost.get(request_id, 0.0) + cost * n / total
        self._recent.append((end, seconds, total))

    def request_cost(self, request_id: str) -> float:
        return self._request_cost.get(request_id, 0.0)

    def forget(self, request_id: str, billed: bool) -> None:
        """The request is over; billed=False when its cost reached no response (aborted, failed)."""
        cost = self._request_cost.pop(request_id, 0.0)
        if not billed:
            self.unbilled_cost_usd += cost

    # -- what Prometheus reads ----------------------------------------------------------
    def idle_seconds(self, now: float) -> float:
        return self.idle_s + (now - self.mark if self.idle else 0.0)

    def idle_cost_usd(self, now: float) -> float:
        return self.idle_seconds(now) * self.price_per_s

    def asleep_seconds(self, now: float) -> float:
        return self.asleep_s + (now - self.mark if self.asleep else 0.0)

    def asleep_cost_usd(self, now: float) -> float:
        return self.asleep_seconds(now) * self.price_per_s

    def _window(self, now: float) -> tuple[float, float, int]:
        """(span, busy seconds, tokens) over the last window_s seconds."""
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()
        span = min(self.window_s, now - self.start)
        return span, sum(r[1] for r in self._recent), sum(r[2] for r in self._recent)

    def busy_ratio(self, now: float) -> float:
        span, busy, _ = self._window(now)
        return min(1.0, busy / span) if span > 0 else 0.0

    def cost_per_million_tokens(self, now: float) -> float:
        """Everything paid over the window (idle included) per million tokens computed in it."""
        span, _, tokens = self._window(now)
        return span * self.price_per_s / tokens * 1e6 if tokens else float("nan")
