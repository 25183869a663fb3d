"""The cost-aware switch for speculative decoding: speculate only while it is measured to be cheaper.

Whether k proposals per request pay for themselves depends on the machine, the model, the batch
size and how often proposals are right: at batch 1 a step that computes 5 tokens per request
costs about what a 1-token step does (the weights are read once either way), at batch 32 it may
cost several times more. Rather than model that, the switch measures it: for each batch-size
bucket (powers of two) it keeps the seconds per generated token of decode steps with proposals
and of steps without (the median of the last few, the draft's work included) and uses the
cheaper mode; a bucket not measured yet follows the nearest one that is.

Now and then it runs the other mode, so both estimates follow the workload. What that costs is
bounded in time, not in steps: exploring has an allowance that grows by `explore_cost` of every
step's time and is spent by what each exploring step took beyond the preferred mode's estimate;
the switch explores only when the allowance covers what the step is expected to cost (from the
estimates: batch size x the difference per token) and at most once in 1/max_explore steps of a
bucket. So exploring costs about `explore_cost` of the time however bad the other
mode is, a draft model's catch-up after a long pause included. Steps that prefill are not
measured: their time says nothing about decoding.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

MIN_SAMPLES = 3  # per arm and bucket before its own estimates are used
WINDOW = 5  # the steps an estimate is the median of


@dataclass
class _Arm:
    """A mode's seconds per token at one bucket: the median of its last WINDOW steps, so that one
    slow step (the machine's, not the mode's) does not make a mode look dear; an estimate kept
    too high would make the switch explore that mode the less (exploring it looks costly)."""

    recent: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    samples: int = 0

    @property
    def seconds_per_token(self) -> float:
        return statistics.median(self.recent) if self.recent else 0.0

    def observe(self, value: float) -> None:
        self.recent.append(value)
        self.samples += 1


@dataclass
class SpecController:
    always: bool = False  # the "always" switch: no measuring, speculate whenever there is a proposal
    explore_cost: float = 0.01  # the share of the engine's time exploring the costlier mode may cost
    max_explore: float = 1 / 16  # the largest share of a bucket's steps that explore
    _arms: dict[tuple[int, bool], _Arm] = field(default_factory=dict)
    _since: dict[int, int] = field(default_factory=dict)  # per bucket: steps since it last explored
    _exploring: bool = False  # the last decision went against the preferred mode
    allowance_seconds: float = 0.0  # what exploring may still cost
    saved_seconds: float = 0.0  # estimated time speculation saved so far (can go negative)
    enabled: bool = True  # the last decision

    @staticmethod
    def bucket(batch_size: int) -> int:
        return max(1, batch_size).bit_length()

    def decide(self, batch_size: int) -> bool:
        """Whether the next step's requests get proposals."""
        self._exploring = False
        if self.always:
            self.enabled = True
            return True
        b = self.bucket(batch_size)
        preferred = self.preferred(b)
        if preferred is None:  # nothing measured anywhere yet: measure both, proposals first
            choice = self._arm(b, True).samples <= self._arm(b, False).samples
        else:
            since = self._since[b] = self._since.get(b, 0) + 1
            self._exploring = (since * self.max_explore >= 1 and self.allowance_seconds > 0
                               and self.allowance_seconds >= self._price(b, batch_size, not preferred))
            if self._exploring:
                self._since[b] = 0
            choice = preferred != self._exploring
        self.enabled = choice
        return choice

    def preferred(self, bucket: int) -> bool | None:
        """Whether speculating is the cheaper mode at this bucket, by its own estimates once both
        modes have MIN_SAMPLES there, else by the nearest bucket's that has; None if none has."""
        nearest = self._nearest(bucket, lambda b: min(self._samples(b, True), self._samples(b, False)) >= MIN_SAMPLES)
        if nearest is None:
            return None
        return self._arm(nearest, True).seconds_per_token <= self._arm(nearest, False).seconds_per_token

    def observe(self, batch_size: int, speculated: bool, seconds: float, tokens: int, decode: bool = True) -> None:
        """The last step (as decided) took `seconds` and generated `tokens`; it is measured if it
        was a decode step (no prefill) of batch_size requests."""
        self.allowance_seconds += self.explore_cost * seconds
        if not decode or tokens <= 0 or seconds <= 0:
            return
        b = self.bucket(batch_size)
        other = self._estimate(b, not speculated)
        if self._exploring and other is not None:
            self.allowance_seconds -= seconds - tokens * other
        if speculated and other is not None:
            self.saved_seconds += tokens * other - seconds
        self._arm(b, speculated).observe(seconds / tokens)

    def _price(self, bucket: int, batch_size: int, speculated: bool) -> float:
        """What a step of the given mode is expected to cost beyond one of the other mode."""
        mine, other = self._estimate(bucket, speculated), self._estimate(bucket, not speculated)
        return batch_size * max(0.0, mine - other) if mine is not None and other is not None else 0.0

    def _estimate(self, bucket: int, speculated: bool) -> float | None:
        """Seconds per token of a mode at this bucket, or at the nearest bucket that measured it."""
        nearest = self._nearest(bucket, lambda b: self._samples(b, speculated) > 0)
        return None if nearest is None else self._arm(nearest, speculated).seconds_per_token

    def _nearest(self, bucket: int, measured: Callable[[int], bool]) -> int | None:
        """The bucket closest to this one (itself first, then the smaller) that is `measured`."""
        buckets = {b for b, _ in self._arms if measured(b)}
        return min(buckets, key=lambda b: (abs(b - bucket), b)) if buckets else None

    def _samples(self, bucket: int, speculated: bool) -> int:
        arm = self._arms.get((bucket, speculated))
        return arm.samples if arm is not None else 0

    def _arm(self, bucket: int, speculated: bool) -> _Arm:
        return self._arms.setdefault((bucket, speculated), _Arm())

    def estimates(self) -> dict[int, tuple[float | None, float | None]]:
        """Per bucket's smallest batch size: (seconds per token with proposals, without)."""
        out = {}
        for (b, spec), arm in sorted(self._arms.items()):
            on_off = out.setdefault(1 << (b - 1), [None, None])
            on_off[0 if spec else 1] = arm.seconds_per_token if arm.samples else None
        return {k: tuple(v) for k, v in out.items()}
