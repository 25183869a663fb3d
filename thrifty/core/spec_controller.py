"""The cost-aware switch for speculative decoding: how many proposals each step verifies (0: none),
chosen for the most tokens per second the engine's own measurements predict.

Whether proposals pay for themselves depends on the machine, the model, the batch size, how many
tokens a step carries and how often proposals are right. So the switch predicts both sides of it:
- the time of a step, from a table the engine measures at start-up (`calibrate`: forwards of B
  requests computing q tokens each, at a few B and q) that gives the shape (how a step's time
  grows with its tokens), scaled by what the engine's own decode steps of that batch size take
  (the median ratio of their times to the table's over the last few, with and without
  proposals, the one not measured lately moved with the other: _Scale); a model draft's
  forwards move with that level too (the draft's own ratio to it measured while
  speculating), and so does its catching up (by the target's level alone);
- the tokens a step yields: per request 1 plus, for each proposal position i, the chance that
  the first i proposals are all accepted, a^i for an acceptance rate a measured on the steps
  that verified proposals (the rate of a proposal given that those before it were accepted,
  taken as the same at every position, as in Leviathan et al.'s analysis: so a step verifying
  one proposal tells about all k; counts that decay per step, so that they follow the
  workload, with a prior of one proposal at 1/2 that measurements soon outweigh).
Each step it takes the number of proposals k' in 0..k whose predicted tokens per second is the
highest: fewer under load, where a step's time grows with its tokens, more when idle, none where
the proposals are seldom right or the draft is too slow to ever pay.

While it runs without proposals, their acceptance is not measured; now and then it runs the best
k' > 0 anyway (and while it speculates, a step without), so that its estimates follow the
workload. What that costs is bounded in time: exploring has an allowance that grows by
`explore_cost` of every step's time and is spent by what each exploring step took beyond what
its tokens cost at the preferred choice's predicted rate; the switch explores only when the
allowance covers what the step is predicted to cost, and at most once in 1/max_explore steps.
The allowance saves up for at most EXPLORE_HORIZON seconds of steps, so that after a long time
without exploring (while a step with proposals was predicted to cost more than it held) the
switch does not explore in a burst: over any stretch of time, exploring costs explore_cost of
it, plus at most that horizon's share, plus the step that found out. A step dearer than that
share is tried when the allowance is full, which it then owes. It never explores where no
k' > 0 would pay even if every proposal were accepted (a draft whose forwards cost too much):
the table says so before any request runs. Each exploring step that leaves proposals not
preferred halves the allowance's growth, down to 1/2**MAX_BACKOFF, until proposals are preferred
again: a draft that is never right costs less and less to keep checking. Steps that prefill are
not measured: their time says nothing about decoding.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

WINDOW = 8  # the steps a scale is the median of
MARGIN = 0.03  # the predicted gain below which the switch does not speculate
ADJACENT = 2  # steps apart within which a step of one mode is compared with the other's scale
DECAY = 0.93  # per step that verified proposals, the weight earlier acceptance counts keep
PRIOR = 1.0  # the acceptance prior's weight, in proposals, at rate 1/2
EXPLORE_HORIZON = 5.0  # the seconds of steps whose allowance for exploring may be saved up
DECIDE_EVERY = 4  # the steps a choice holds while the batch and its proposals stay the same
MAX_BACKOFF = 3  # the most halvings of the exploring allowance's growth


def bucket(batch_size: int) -> int:
    """Batch sizes measured together: powers of two."""
    return max(1, batch_size).bit_length()


@dataclass
class _Shape:
    """Seconds of a step by its batch size and tokens per request, from the start-up table: at
    the table's nearest batch size, interpolated (or extended) linearly in tokens per request,
    times batch_size / that batch size."""

    table: dict[int, dict[float, float]] = field(default_factory=dict)  # batch size -> q -> seconds
    _rows: dict[int, tuple[int, list[float], list[float]]] = field(default_factory=dict)  # bucket -> its row

    def add(self, batch_size: int, q: float, seconds: float) -> None:
        self.table.setdefault(batch_size, {})[q] = seconds
        self._rows.clear()

    def seconds(self, batch_size: int, q: float) -> float | None:
        if not self.table:
            return None
        b = bucket(batch_size)
        row = self._rows.get(b)
        if row is None:  # (every step asks: the lookup is kept)
            b0 = min(self.table, key=lambda t: (abs(bucket(t) - b), t))
            qs = sorted(self.table[b0])
            row = self._rows[b] = (b0, qs, [self.table[b0][x] for x in qs])
        b0, qs, ts = row
        if len(qs) == 1:
            return ts[0] * q / qs[0] * batch_size / b0
        i = 1
        while i < len(qs) - 1 and q > qs[i]:  # the segment holding q, or the last
            i += 1
        t = ts[i - 1] + (ts[i] - ts[i - 1]) * (q - qs[i - 1]) / (qs[i] - qs[i - 1])
        return max(t, 0.0) * batch_size / b0


def _median(values: deque[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


@dataclass
class _Scale:
    """Measured over tabled seconds at one bucket, for steps with proposals and without: each
    the median of its last WINDOW steps. The mode measured last gives the level (the machine's
    speed now); the other is that times their ratio, the bias: the median of the last WINDOW
    ratios of a step of one mode to the last step of the other, taken only when that was at
    most ADJACENT steps before (measurements apart in time would compare the machine at two
    speeds). So when the machine slows down while one mode runs, the other's estimate
    moves with it instead of going stale, and a systematic difference between them (the
    sampler verifying proposals, a draft catching up) is kept. (Medians are taken when asked
    for, not per step: the switch asks every few steps.)"""

    windows: dict[bool, deque[float]] = field(default_factory=dict)
    latest: dict[bool, float] = field(default_factory=dict)  # each mode's last ratio
    last: dict[bool, int] = field(default_factory=dict)  # the step each mode was last measured
    biases: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))  # with proposals over without

    def add(self, ratio: float, speculated: bool, step: int) -> None:
        other = self.latest.get(not speculated)
        if other is not None and step - self.last[not speculated] <= ADJACENT:
            self.biases.append(ratio / other if speculated else other / ratio)
        window = self.windows.get(speculated)
        if window is None:
            window = self.windows[speculated] = deque(maxlen=WINDOW)
        window.append(ratio)
        self.latest[speculated] = ratio
        self.last[speculated] = step

    def value(self, speculated: bool) -> float:
        fresher = self.last[True] > self.last[False] if len(self.last) == 2 else next(iter(self.last))
        level = _median(self.windows[fresher])
        if fresher == speculated:
            return level
        bias = _median(self.biases) if self.biases else 1.0
        return level * bias if speculated else level / bias


@dataclass
class SpecController:
    num_speculative_tokens: int = 4  # k, the most proposals a step verifies per request
    always: bool = False  # the "always" switch: every proposal, no measuring
    explore_cost: float = 0.01  # the share of the engine's time exploring may cost
    max_explore: float = 1 / 16  # the largest share of steps that explore
    target: _Shape = field(default_factory=_Shape)  # the target's forward
    draft: _Shape = field(default_factory=_Shape)  # one draft forward (q = 1); empty for n-gram
    catch_up_seconds_per_token: float = 0.0  # a draft model's prefill
    _scales: dict[tuple[str, int], _Scale] = field(default_factory=dict)  # ("target" or "draft", bucket)
    _steps: int = 0  # decode steps measured
    _tried: float = 0.0  # proposals verified (decayed counts)
    _accepted: float = 0.0
    _since: int = 0  # steps since the last exploring one
    _fruitless: int = 0  # steps that explored proposals since proposals were last preferred
    _explore_price: float = 0.0  # what exploring was last predicted to cost
    _plan_key: tuple[int, int, int] | None = None  # the batch and proposals the last decision was for
    _plan_best: int = 0  # its choice (not an exploring step's)
    _plan_age: int = 0  # steps it has been used for
    _exploring: bool = False
    _preferred_seconds_per_token: float = 0.0  # of the choice an exploring step went against
    allowance_seconds: float = 0.0  # what exploring may still cost
    saved_seconds: float = 0.0  # predicted time speculation saved so far (can go negative)
    enabled: bool = True  # whether the last choice (with proposals to choose from) was k' > 0
    last_k: int = 0  # that choice's k'

    def __post_init__(self) -> None:
        self.enabled = self.always

    # -- measurements -----------------------------------------------------------------------
    def calibrate(self, batch_size: int, q: int, seconds: float, draft_seconds: float | None = None) -> None:
        """A start-up measurement: a target forward of batch_size requests computing q tokens
        each took `seconds`; with draft_seconds, one draft forward of batch_size tokens."""
        self.target.add(batch_size, q, seconds)
        if draft_seconds is not None:
            self.draft.add(batch_size, 1, draft_seconds)

    def calibrate_catch_up(self, seconds_per_token: float) -> None:
        """A start-up measurement: a draft model's prefill, per token (what catching up costs)."""
        self.catch_up_seconds_per_token = seconds_per_token

    def observe(self, batch_size: int, num_tokens: int, seconds: float, generated: int,
                verified: list[tuple[int, int]] = (), draft_seconds: float = 0.0,
                draft_decode_seconds: float = 0.0, draft_forwards: int = 0, decode: bool = True) -> None:
        """The last step: batch_size requests computed num_tokens tokens (proposals included) in
        `seconds`, `draft_seconds` of them the draft's (catching up included), of which
        draft_decode_seconds its `draft_forwards` decoding forwards; it generated `generated`
        tokens; `verified`: (proposals, accepted) per request that had proposals. Only decode
        steps (no prefill) are measured."""
        growth = self.explore_cost / 2 ** self._fruitless
        self.allowance_seconds = min(self.allowance_seconds + growth * seconds, self.explore_cost * EXPLORE_HORIZON)
        if verified:
            self._count(verified)
        if not decode or batch_size <= 0 or seconds <= 0:
            return
        b = bucket(batch_size)
        speculated = num_tokens > batch_size
        self._steps += 1
        predicted = self.target.seconds(batch_size, num_tokens / batch_size)
        if predicted:
            self._scale("target", b).add((seconds - draft_seconds) / predicted, speculated, self._steps)
        one_draft = self.draft.seconds(batch_size, 1) if draft_forwards else None
        if one_draft:
            # Relative to the target's level now: the draft's forwards slow down with the machine
            # as the target's do, and are measured only while speculating.
            self._scale("draft", b).add(draft_decode_seconds / (draft_forwards * one_draft)
                                        / self._scale_value("target", b, True), True, self._steps)
        if self._exploring:  # what it took beyond what its tokens cost the preferred way
            self.allowance_seconds -= seconds - generated * self._preferred_seconds_per_token
        plain = self._plain_seconds(batch_size) if speculated else None
        if plain is not None:
            self.saved_seconds += generated * plain / batch_size - seconds  # tokens one per step, less the time

    def _count(self, verified: list[tuple[int, int]]) -> None:
        """One step's (proposals, accepted) per request: a proposal is verified when all
        before it were accepted, so a request verified accepted + 1 of them (all, if all were
        accepted)."""
        self._tried = DECAY * self._tried + sum(min(proposed, accepted + 1) for proposed, accepted in verified)
        self._accepted = DECAY * self._accepted + sum(accepted for _, accepted in verified)

    def acceptance(self) -> float:
        """The chance a proposal is accepted given that those before it were, the same at
        every position: the decayed counts plus a prior of PRIOR proposals at 1/2."""
        return (self._accepted + PRIOR / 2) / (self._tried + PRIOR)

    # -- the choice -------------------------------------------------------------------------
    def choose(self, proposals: list[int], catch_up_tokens: int = 0) -> int:
        """The next step's k' (the most proposals a request verifies; 0: none), from each
        running request's available proposals (n-gram: those found; a draft: k) and, for a
        draft model, the tokens it would catch up on first (the step with proposals pays them:
        after a pause, the whole context of every request). A choice holds for up to
        DECIDE_EVERY steps while the batch and its proposals look the same: the estimates move
        slowly, and deciding every step cost a few percent of a small batch's step."""
        self._exploring = False
        most = min(max(proposals, default=0), self.num_speculative_tokens)
        if self.always or most == 0:  # (the gauges keep the last choice made)
            if most:
                self.last_k = most
            return most
        key = (len(proposals), most, sum(proposals))
        self._since += 1
        explore = self._since * self.max_explore >= 1 and self._affordable()
        if not explore and key == self._plan_key and self._plan_age < DECIDE_EVERY:
            self._plan_age += 1
            best = self._plan_best
        else:
            best = self._decide(proposals, most, catch_up_tokens, explore)
            self._plan_key = key
        self.enabled = best > 0
        self.last_k = best
        return best

    def _decide(self, proposals: list[int], most: int, catch_up_tokens: int, explore: bool) -> int:
        """The best k' now (recorded as the plan), or, when exploring is due and affordable,
        the other side."""
        self._plan_best, self._plan_age = 0, 1
        rates = self._rates(proposals, most, catch_up_tokens * self.catch_up_seconds_per_token)
        if rates is None:  # not calibrated: nothing to predict with
            return 0
        # Proposals must promise a clear gain: in a near tie the prediction's error (a few
        # percent) outweighs what speculating would win.
        best = self._plan_best = max(range(most + 1),
                                     key=lambda k: (rates[k][0] / rates[k][1] * (1 if k else 1 + MARGIN), -k))
        if best:
            self._fruitless = 0
        if self._since * self.max_explore >= 1:
            # The other side: the best k' > 0 when none is preferred, else none (so that the
            # level without proposals is measured too while speculating).
            k = max(range(1, most + 1), key=lambda k: (rates[k][0] / rates[k][1], -k)) if best == 0 else 0
            tokens, seconds = rates[k]
            preferred = rates[best][1] / rates[best][0]  # seconds per token
            self._explore_price = seconds - tokens * preferred
            if best == 0 and not self._could_pay(proposals, most):
                self._explore_price = math.inf
            if explore and self._affordable():
                self._preferred_seconds_per_token = preferred
                self._fruitless = min(self._fruitless + (best == 0), MAX_BACKOFF)
                best, self._exploring, self._since = k, True, 0
        return best

    def _affordable(self) -> bool:
        """Whether the allowance covers exploring's price, or is full (saved up to the horizon)
        and the price finite: a step dearer than the horizon's share (a draft catching up on a
        long prompt) is then tried once, and the allowance, gone negative, is repaid before the
        next, so that such a draft is found out too, at the same 1% of the time."""
        if self.allowance_seconds <= 0:
            return False
        full = self.allowance_seconds >= self.explore_cost * EXPLORE_HORIZON  # (observe caps it at exactly that)
        return self._explore_price <= self.allowance_seconds or (full and math.isfinite(self._explore_price))

    def _could_pay(self, proposals: list[int], most: int) -> bool:
        """Whether some k' > 0 would beat none if every proposal were accepted (a draft caught
        up): if not, exploring could only find that it does not pay, which the table says."""
        rates = self._rates(proposals, most, accept=1.0)
        return max(t / s for t, s in rates[1:]) > rates[0][0] / rates[0][1] * (1 + MARGIN)

    def _rates(self, proposals: list[int], most: int, catch_up: float = 0.0,
               accept: float | None = None) -> list[tuple[float, float]] | None:
        """Per k' in 0..most: (predicted tokens, predicted seconds) of the next step: the target
        computing its tokens, plus for a model draft k' forwards and `catch_up` seconds; at
        the measured acceptance rate unless `accept` is given."""
        batch = len(proposals)
        b = bucket(batch)
        accept = self.acceptance() if accept is None else accept
        off, on = self._scale_value("target", b, False), self._scale_value("target", b, True)
        one_draft = self.draft.seconds(batch, 1)
        draft = one_draft * on * self._scale_value("draft", b, True) if one_draft else 0.0
        out = []
        tokens, extra = float(batch), 0
        for k in range(most + 1):
            if k:
                having = sum(1 for n in proposals if n >= k)  # requests with a k-th proposal
                tokens += having * accept ** k  # each is generated if the first k are all accepted
                extra += having
            shape = self.target.seconds(batch, 1 + extra / batch)
            if not shape:
                return None
            out.append((tokens, shape * (on if extra else off) + (k * draft + catch_up * on if k else 0.0)))
        return out

    def _plain_seconds(self, batch_size: int) -> float | None:
        """A step's predicted seconds without proposals."""
        shape = self.target.seconds(batch_size, 1)
        return shape * self._scale_value("target", bucket(batch_size), False) if shape else None

    def _scale(self, which: str, b: int) -> _Scale:
        scale = self._scales.get((which, b))
        if scale is None:
            scale = self._scales[(which, b)] = _Scale()
        return scale

    def _scale_value(self, which: str, b: int, speculated: bool) -> float:
        """The bucket's scale, else the nearest bucket's, else 1 (the table as measured)."""
        s = self._scales.get((which, b))
        if s is None:
            near = [(abs(bb - b), bb) for w, bb in self._scales if w == which]
            if not near:
                return 1.0
            s = self._scales[(which, min(near)[1])]
        return s.value(speculated)

    def estimates(self) -> dict:
        """What the switch predicts with: the acceptance rate, and per bucket's smallest batch
        size its scales (measured / start-up table) of the target's steps and the draft's."""
        scales: dict[str, dict[str, float | None]] = {}
        for (which, b), s in sorted(self._scales.items()):
            row = scales.setdefault(str(1 << (b - 1)), {})
            if which == "draft":
                row["draft_over_target"] = s.value(True)
            else:
                row["target_off"], row["target_on"] = s.value(False), s.value(True)
        return {"acceptance": round(self.acceptance(), 4), "scales": scales}
