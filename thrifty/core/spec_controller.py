"""The cost-aware switch for speculative decoding: speculate only while it is measured to be cheaper.

Whether k proposals per request pay for themselves depends on the machine, the model, the batch
size and how often proposals are right: at batch 1 a step that computes 5 tokens per request
costs about what a 1-token step does (the weights are read once either way), at batch 32 it may
cost several times more. Rather than model that, the switch measures it: for each batch-size
bucket (powers of two) it keeps the seconds per generated token of decode steps with proposals
and of steps without (exponential moving averages), uses the cheaper one, and now and then runs
the other so that both estimates follow the workload. It explores the less often the more the
other mode costs: a share of steps `explore_cost / gap` (gap: how much slower per token the
other mode measured), between `min_explore` and `max_explore`, so exploring never costs much
more than `explore_cost` of the time however bad the other mode is. Steps that prefill are not
measured: their time says nothing about decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIN_SAMPLES = 3  # per arm and bucket before the estimates are trusted


@dataclass
class _Arm:
    seconds_per_token: float = 0.0
    samples: int = 0

    def observe(self, value: float, weight: float) -> None:
        self.seconds_per_token = value if self.samples == 0 else (1 - weight) * self.seconds_per_token + weight * value
        self.samples += 1


@dataclass
class SpecController:
    always: bool = False  # the "always" switch: no measuring, speculate whenever there is a proposal
    explore_cost: float = 0.01  # the share of time exploring the costlier mode may cost
    min_explore: float = 1 / 256  # shares of steps that run the costlier mode
    max_explore: float = 1 / 16
    ema_weight: float = 0.2
    _arms: dict[tuple[int, bool], _Arm] = field(default_factory=dict)
    _credit: dict[int, float] = field(default_factory=dict)  # per bucket: exploring owed, in steps
    saved_seconds: float = 0.0  # estimated time speculation saved so far (can go negative)
    enabled: bool = True  # the last decision

    @staticmethod
    def bucket(batch_size: int) -> int:
        return max(1, batch_size).bit_length()

    def decide(self, batch_size: int) -> bool:
        """Whether the next step's requests get proposals."""
        if self.always:
            self.enabled = True
            return True
        b = self.bucket(batch_size)
        on, off = self._arm(b, True), self._arm(b, False)
        if on.samples < MIN_SAMPLES or off.samples < MIN_SAMPLES:
            choice = on.samples <= off.samples  # measure both first, proposals first
        else:
            cheap, dear = sorted((on.seconds_per_token, off.seconds_per_token))
            gap = dear / cheap - 1 if cheap > 0 else 1.0
            share = min(self.max_explore, max(self.min_explore, self.explore_cost / gap if gap > 0 else 1.0))
            credit = self._credit.get(b, 0.0) + share
            choice = on.seconds_per_token <= off.seconds_per_token
            if credit >= 1.0:
                choice, credit = not choice, credit - 1.0
            self._credit[b] = credit
        self.enabled = choice
        return choice

    def observe(self, batch_size: int, speculated: bool, seconds: float, tokens: int) -> None:
        """A decode step (no prefill) of batch_size requests took `seconds` and generated `tokens`."""
        if tokens <= 0 or seconds <= 0:
            return
        b = self.bucket(batch_size)
        on, off = self._arm(b, True), self._arm(b, False)
        if speculated and on.samples and off.samples:
            self.saved_seconds += tokens * off.seconds_per_token - seconds
        (on if speculated else off).observe(seconds / tokens, self.ema_weight)

    def _arm(self, bucket: int, speculated: bool) -> _Arm:
        return self._arms.setdefault((bucket, speculated), _Arm())

    def estimates(self) -> dict[int, tuple[float | None, float | None]]:
        """Per bucket's smallest batch size: (seconds per token with proposals, without)."""
        out = {}
        for (b, spec), arm in sorted(self._arms.items()):
            on_off = out.setdefault(1 << (b - 1), [None, None])
            on_off[0 if spec else 1] = arm.seconds_per_token if arm.samples else None
        return {k: tuple(v) for k, v in out.items()}
