"""Unit and property tests for thrifty.core (block pool, KV cache manager, scheduler).

No model is loaded: `FakeModel` stands in for the model runner. It keeps a paged "KV cache"
(one int64 per slot) and, for every scheduled request, writes a fingerprint of each newly
computed position into that position's slot (the fingerprint hashes the whole token prefix
up to that position, so a slot holds the right value only if the right tokens were computed
there). When a request samples, it first checks that every position of its context holds the
right fingerprint in the slot its block table points to (so stale, aliased or never-computed
blocks are caught), then emits a token that is a deterministic function of the whole sequence.
Outputs can therefore be compared exactly with a model-free reference generation.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thrifty.core.block_pool import BlockPool, hash_block
from thrifty.core.kv_cache_manager import KVCacheManager, cdiv
from thrifty.core.request import Request, RequestStatus
from thrifty.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from thrifty.sampling_params import SamplingParams

VOCAB = 16
EOS = 0
EOS_SET = frozenset({EOS})
_EMPTY_SLOT = 0  # never a fingerprint (see _fp)
_FP_SEED = 0x5EED


def _fp(prev: int, token: int) -> int:
    h = hash((prev, token))
    return h if h != _EMPTY_SLOT else 1


def fingerprints(tokens: list[int]) -> list[int]:
    out, prev = [], _FP_SEED
    for t in tokens:
        prev = _fp(prev, t)
        out.append(prev)
    return out


def next_token(last_fp: int) -> int:
    """The fake model's (deterministic) next token, a function of the whole sequence."""
    return (last_fp >> 7) % VOCAB


def make_request(rid, prompt, max_tokens=16, ignore_eos=True, **kw) -> Request:
    extra = {k: kw.pop(k) for k in ("cache_salt", "leader") if k in kw}
    return Request(str(rid), list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, **kw),
                   eos_token_ids=EOS_SET, **extra)


def reference_output(prompt: list[int], params: SamplingParams, max_model_len: int) -> tuple[list[int], RequestStatus]:
    """What the request must produce with FakeModel, from the stop rules alone (no scheduler)."""
    tokens = list(prompt)
    fps = fingerprints(tokens)
    out: list[int] = []
    max_tokens = params.max_tokens or 1 << 62
    while True:
        t = next_token(fps[-1])
        out.append(t)
        tokens.append(t)
        fps.append(_fp(fps[-1], t))
        if len(out) >= params.min_tokens:
            if not params.ignore_eos and t in EOS_SET:
                return out, RequestStatus.FINISHED_STOPPED
            if t in params.stop_token_ids:
                return out, RequestStatus.FINISHED_STOPPED
        if len(out) >= max_tokens or len(tokens) >= max_model_len:
            return out, RequestStatus.FINISHED_LENGTH_CAPPED


class FakeModel:
    """Also keeps each request's block table from the SchedulerOutput deltas alone, as the real
    runner does, so that a delta the scheduler forgets to send shows up as a wrong slot."""

    def __init__(self, kv: KVCacheManager):
        self.bs = kv.block_size
        self.cache = np.full(kv.num_blocks * kv.block_size, _EMPTY_SLOT, dtype=np.int64)
        self._fps: dict[int, list[int]] = {}  # id(request) -> fingerprints of its tokens so far
        self.tables: dict[str, list[int]] = {}  # request id -> block ids, from the deltas
        self._applied: SchedulerOutput | None = None

    def update_tables(self, out: SchedulerOutput) -> None:
        if out is self._applied:
            return
        self._applied = out
        for rid in out.finished_req_ids | out.preempted_req_ids:
            self.tables.pop(rid, None)
        for new in out.scheduled_new_reqs:
            assert new.req_id not in self.tables, f"{new.req_id} sent as new while the runner holds it"
            self.tables[new.req_id] = list(new.block_ids)
        for cached in out.scheduled_cached_reqs:
            assert cached.req_id in self.tables, f"{cached.req_id} sent as cached but never as new"
            self.tables[cached.req_id] += cached.new_block_ids

    def _fingerprints(self, r: Request) -> list[int]:
        fps = self._fps.setdefault(id(r), [])
        if len(fps) < r.num_tokens:
            prev = fps[-1] if fps else _FP_SEED
            for i in range(len(fps), r.num_tokens):
                prev = _fp(prev, r.token_at(i))
                fps.append(prev)
        return fps

    def _slots(self, block_ids: list[int], start: int, end: int) -> np.ndarray:
        pos = np.arange(start, end)
        return np.asarray(block_ids, dtype=np.int64)[pos // self.bs] * self.bs + pos % self.bs

    def execute(self, out: SchedulerOutput) -> dict[str, list[int]]:
        self.update_tables(out)
        assert out.scheduled_spec_decode_tokens == {s.request.request_id: s.spec_token_ids
                                                    for s in out.scheduled if s.spec_token_ids}
        # Write phase (as every layer writes the step's new K/V before attending). A static
        # batch's padding row rewrites its request's last position, as the runner does.
        # Proposed tokens are computed like any other, after the request's own.
        for s in out.scheduled + out.padding:
            r = s.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
            blocks = self.tables[r.request_id]
            assert s.num_new_tokens >= 1
            assert end <= r.num_tokens + len(s.spec_token_ids), f"{r.request_id} computes past its tokens"
            assert len(blocks) * self.bs >= end, f"{r.request_id} has no slot for position {end - 1}"
            fps = list(self._fingerprints(r))
            for t in s.spec_token_ids:
                fps.append(_fp(fps[-1], t))
            self.cache[self._slots(blocks, start, end)] = fps[start:end]
        # Read phase: a sampling request attends to its whole context; each proposal is accepted
        # while it is the token the model gives at its position, then the model's own token.
        sampled = {}
        for s in out.scheduled:
            if not s.samples:
                continue
            r = s.request
            fps = self._fingerprints(r)
            got = self.cache[self._slots(self.tables[r.request_id], 0, r.num_tokens)]
            bad = np.nonzero(got != np.asarray(fps, dtype=np.int64))[0]
            assert bad.size == 0, (f"{r.request_id}: KV of positions {bad.tolist()[:8]} is stale or missing "
                                   f"(num_cached_tokens={r.num_cached_tokens})")
            fp, tokens = fps[-1], []
            for d in s.spec_token_ids:
                if d != next_token(fp):
                    break
                tokens.append(d)
                fp = _fp(fp, d)
            sampled[r.request_id] = tokens + [next_token(fp)]
        return sampled

    def propose(self, sim: Sim, k: int, p_right: float, rng: random.Random) -> None:
        """Proposals as the engine makes them (capped by max_tokens and the context), each the
        right next token with probability p_right, else a random one."""
        for r in sim.sched.running:
            if r.num_tokens - r.num_computed_tokens != 1:
                continue
            room = min(k, r.max_tokens - r.num_output_tokens - 1, sim.cfg.max_model_len - r.num_tokens - 1)
            fp, drafts = self._fingerprints(r)[-1], []
            for _ in range(max(0, room)):
                t = next_token(fp) if rng.random() < p_right else rng.randrange(1, VOCAB)
                drafts.append(t)
                fp = _fp(fp, t)
            r.spec_token_ids = drafts


class Sim:
    """Scheduler + KV cache manager + fake model, driven like LLMEngine.step."""

    def __init__(self, num_blocks, block_size, *, max_num_seqs=256, budget=8192, max_model_len=None,
                 policy="continuous", caching=True, spec=None, **scheduling):
        self.cfg = SchedulerConfig(max_num_seqs, budget, max_model_len or num_blocks * block_size, policy,
                                   **scheduling)
        assert num_blocks * block_size >= self.cfg.max_model_len
        self.kv = KVCacheManager(num_blocks, block_size, caching)
        self.sched = Scheduler(self.cfg, self.kv)
        self.model = FakeModel(self.kv)
        self.all: dict[str, Request] = {}
        self.finished: list[Request] = []
        self.evictions_at_admission: dict[str, int] = {}
        self.steps = 0
        self.spec = spec  # (k, p_right, rng): propose after every step, as the engine does

    def drafted(self) -> int:
        return self.sched.spec_stats.num_draft_tokens

    def add(self, request: Request) -> Request:
        assert request.num_prompt_tokens < self.cfg.max_model_len
        self.all[request.request_id] = request
        self.sched.add_request(request)
        return request

    def step(self) -> tuple[SchedulerOutput, dict[str, int]]:
        out = self.sched.schedule()
        self.blocks_after_schedule = {rid: len(b) for rid, b in self.kv.req_to_blocks.items()}
        for s in out.scheduled:
            self.evictions_at_admission.setdefault(s.request.request_id, self.kv.pool.num_evictions)
        check_scheduled(self, out)
        sampled = self.model.execute(out)
        self.finished += self.sched.update_from_output(out, sampled)
        self.steps += 1
        check_state(self)
        if self.spec is not None:
            self.model.propose(self, *self.spec)
        return out, sampled

    def abort(self, rid: str) -> Request | None:
        r = self.sched.finish_request(rid, RequestStatus.FINISHED_ABORTED)
        check_state(self)
        return r

    def run(self, max_steps=10_000) -> None:
        while self.sched.has_unfinished_requests():
            assert self.steps < max_steps, "the simulation did not terminate"
            out, _ = self.step()
            assert not out.is_empty, "nothing scheduled while requests are unfinished"


def check_scheduled(sim: Sim, out: SchedulerOutput) -> None:
    """Checks right after schedule(), before the model runs."""
    cfg, kv = sim.cfg, sim.kv
    assert out.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
    assert len(sim.sched.running) <= cfg.max_num_seqs
    ids = [s.request.request_id for s in out.scheduled]
    assert len(ids) == len(set(ids))
    assert set(ids) <= {r.request_id for r in sim.sched.running}
    assert list(out.num_scheduled_tokens.items()) == [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]
    assert out.padding_req_ids == [p.request.request_id for p in out.padding]
    new_ids = [n.req_id for n in out.scheduled_new_reqs]
    cached_ids = [c.req_id for c in out.scheduled_cached_reqs]
    assert sorted(new_ids + cached_ids) == sorted(ids)
    for new in out.scheduled_new_reqs:
        r = sim.sched.requests[new.req_id]
        assert new.prompt_token_ids == r.prompt_token_ids and new.output_token_ids == r.output_token_ids
        assert new.num_computed_tokens == r.num_computed_tokens
    for cached in out.scheduled_cached_reqs:
        assert cached.num_computed_tokens == sim.sched.requests[cached.req_id].num_computed_tokens
    # The runner's view, rebuilt from the deltas alone, matches the KV cache manager's.
    sim.model.update_tables(out)
    padding_ids = {r.request_id for r in sim.sched.padding}
    assert set(ids) <= set(sim.model.tables) <= {r.request_id for r in sim.sched.running} | padding_ids
    for s in out.scheduled:
        r = s.request
        assert r.status == RequestStatus.RUNNING
        assert 1 <= s.num_new_tokens <= r.num_tokens - r.num_computed_tokens + len(s.spec_token_ids)
        assert not s.spec_token_ids or r.num_tokens - r.num_computed_tokens == 1
        assert sim.model.tables[r.request_id] == kv.get_block_ids(r.request_id)
        assert kv.num_blocks_of(r.request_id) * kv.block_size >= r.num_computed_tokens + s.num_new_tokens
    for r in out.preempted:
        assert r.status == RequestStatus.PREEMPTED and r.num_computed_tokens == 0
        assert r.request_id not in ids and not kv.req_to_blocks.get(r.request_id)
    assert [p.request for p in out.padding] == sim.sched.padding[: len(out.padding)]
    for p in out.padding:
        assert p.padding and not p.samples and p.num_new_tokens == 1
        assert p.request.is_finished and p.request.status != RequestStatus.FINISHED_ABORTED
        assert p.request.num_computed_tokens == p.request.num_tokens - 1
        assert sim.model.tables[p.request.request_id] == kv.get_block_ids(p.request.request_id)
    check_pool(sim)


def check_pool(sim: Sim) -> None:
    kv, pool = sim.kv, sim.kv.pool
    holders = Counter(b.block_id for blocks in kv.req_to_blocks.values() for b in blocks)
    for blocks in kv.req_to_blocks.values():
        assert len({b.block_id for b in blocks}) == len(blocks), "a request holds a block twice"
    for b in pool.blocks:
        assert b.ref_cnt == holders.get(b.block_id, 0), f"block {b.block_id}: ref_cnt {b.ref_cnt}"
    used = sum(1 for b in pool.blocks if b.ref_cnt > 0)
    assert pool.num_free_blocks + used == pool.num_blocks
    assert pool.num_used_blocks == used
    for h, entry in pool._cached.items():
        for b in entry.values() if isinstance(entry, dict) else [entry]:
            assert b.block_hash == h


def check_state(sim: Sim) -> None:
    sched, kv = sim.sched, sim.kv
    check_pool(sim)
    assert len(sched.running) <= sim.cfg.max_num_seqs
    live = {r.request_id for r in sched.running} | {r.request_id for r in sched.waiting}
    assert live == set(sched.requests)
    assert len(sched.running) + len(sched.waiting) == len(live)
    padding = {r.request_id: r for r in sched.padding}
    # A static batch's finished members keep their blocks only while a batch mate still runs.
    assert not padding or (sched.running and sim.cfg.policy == "static")
    for rid, blocks in kv.req_to_blocks.items():
        assert rid in sched.requests or rid in padding, f"finished request {rid} still holds blocks"
        r = sched.requests.get(rid) or padding[rid]
        assert len(blocks) * kv.block_size >= r.num_computed_tokens
        if blocks and rid not in padding:
            assert r.status == RequestStatus.RUNNING
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING
        assert len(kv.req_to_blocks.get(r.request_id, ())) * kv.block_size >= r.num_computed_tokens
        assert r.num_computed_tokens < r.num_tokens
    for r in sched.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert r.num_computed_tokens == 0
    for r in sim.finished:
        assert r.is_finished and (r.request_id not in kv.req_to_blocks or r.request_id in padding)


def check_drained(sim: Sim) -> None:
    kv = sim.kv
    assert not sim.sched.has_unfinished_requests()
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert kv.pool.num_free_blocks == kv.num_blocks
    assert kv.req_to_blocks == {}
    assert kv._req_to_hashes == {}
    assert sim.sched.requests == {}


def prompt_of(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def dummy_request(rid, n, seed=0, **kw):
    return make_request(rid, prompt_of(n, seed), **kw)


# =====================================================================================
# BlockPool


def test_pool_rejects_empty():
    with pytest.raises(ValueError):
        BlockPool(0)


def test_pool_new_blocks_come_in_id_order_with_ref_one():
    pool = BlockPool(4)
    assert pool.num_free_blocks == 4 and pool.usage() == 0
    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.num_free_blocks == 1 and pool.num_used_blocks == 3 and pool.usage() == 0.75
    with pytest.raises(RuntimeError):
        pool.get_new_blocks(2)
    assert pool.num_free_blocks == 1  # a failed request takes nothing


def test_pool_lru_eviction_order_revival_and_hash_removal():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(4)
    hashes = [hash_block(None, [i]) for i in range(4)]
    for b, h in zip(blocks, hashes):
        pool.cache_block(b, h)
        assert pool.get_cached_block(h) is b
    b0, b1, b2, b3 = blocks
    pool.free_blocks([b2, b0, b3, b1])  # eviction order: b2 first, b1 last
    assert pool.num_free_blocks == 4
    # Freed blocks keep their hash: still findable.
    assert all(pool.get_cached_block(h) is b for b, h in zip(blocks, hashes))
    assert all(b.block_hash == h for b, h in zip(blocks, hashes))

    (new,) = pool.get_new_blocks(1)
    assert new is b2 and new.ref_cnt == 1
    assert new.block_hash is None and pool.get_cached_block(hashes[2]) is None
    assert pool.num_evictions == 1

    pool.touch([b0])  # revive from the free queue
    assert b0.ref_cnt == 1 and pool.num_free_blocks == 2
    assert pool.get_cached_block(hashes[0]) is b0

    assert pool.get_new_blocks(2) == [b3, b1]  # b0 is no longer free
    assert pool.get_cached_block(hashes[3]) is None and pool.get_cached_block(hashes[1]) is None
    assert pool.get_cached_block(hashes[0]) is b0
    assert pool.num_evictions == 3 and pool.num_free_blocks == 0


def test_pool_refreed_block_goes_to_back_of_queue():
    pool = BlockPool(3)
    a, b, c = pool.get_new_blocks(3)
    pool.free_blocks([a, b, c])
    pool.touch([a])
    pool.free_blocks([a])  # a is now the most recently freed
    assert pool.get_new_blocks(3) == [b, c, a]


def test_pool_ref_counts_shared_blocks():
    pool = BlockPool(2)
    (b,) = pool.get_new_blocks(1)
    pool.touch([b])
    pool.touch([b])
    assert b.ref_cnt == 3 and pool.num_free_blocks == 1
    pool.free_blocks([b])
    pool.free_blocks([b])
    assert b.ref_cnt == 1 and pool.num_free_blocks == 1
    pool.free_blocks([b])
    assert b.ref_cnt == 0 and pool.num_free_blocks == 2


def test_pool_free_twice_asserts():
    pool = BlockPool(2)
    (b,) = pool.get_new_blocks(1)
    pool.free_blocks([b])
    with pytest.raises(AssertionError):
        pool.free_blocks([b])


def test_pool_cache_block_first_writer_wins():
    pool = BlockPool(3)
    a, b, _ = pool.get_new_blocks(3)
    h = hash_block(None, [1, 2])
    pool.cache_block(a, h)
    pool.cache_block(b, h)  # a duplicate: a stays registered
    assert pool.get_cached_block(h) is a
    pool.cache_block(a, hash_block(None, [3, 4]))  # a block's hash is final
    assert a.block_hash == h
    pool.free_blocks([b, a])
    pool.get_new_blocks(1)  # evicts b, which is not the registered block
    assert pool.get_cached_block(h) is a


def test_pool_reset_prefix_cache_drops_only_free_blocks():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    ha, hb = hash_block(None, [1]), hash_block(None, [2])
    pool.cache_block(a, ha)
    pool.cache_block(b, hb)
    pool.free_blocks([a])
    pool.reset_prefix_cache()
    assert pool.get_cached_block(ha) is None and a.block_hash is None
    assert pool.get_cached_block(hb) is b


def test_hash_block_chains_parents_and_extra():
    root1, root2 = hash_block(None, [1, 2]), hash_block(None, [3, 4])
    assert hash_block(None, [1, 2]) == root1
    assert hash_block(root1, [5, 6]) != hash_block(root2, [5, 6])
    assert hash_block(None, [1, 2], "s") != root1
    assert hash_block(None, [1, 2], "s") != hash_block(None, [1, 2], "t")


# =====================================================================================
# KVCacheManager


def admit(kv: KVCacheManager, r: Request, num_new: int | None = None):
    """Admit `r` as the scheduler does (prefix lookup + allocation), and mark the step computed."""
    hits, num_hit = kv.get_computed_blocks(r)
    num_new = r.num_tokens - num_hit if num_new is None else num_new
    new = kv.allocate_slots(r, num_new, hits)
    assert new is not None
    r.num_computed_tokens = num_hit + num_new
    return hits, num_hit


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("prompt_len", [1, 3, 4, 5, 8, 16, 17, 33, 64])
def test_kv_prefix_hit_full_blocks_never_whole_prompt(block_size, prompt_len):
    kv = KVCacheManager(256, block_size, enable_caching=True)
    prompt = prompt_of(prompt_len)
    a = make_request("a", prompt)
    assert admit(kv, a)[1] == 0
    b = make_request("b", prompt)
    hits, num_hit = admit(kv, b)
    expected = ((prompt_len - 1) // block_size) * block_size
    assert num_hit == expected and len(hits) * block_size == num_hit
    assert num_hit < prompt_len  # at least one token is computed
    assert kv.get_block_ids("b")[:len(hits)] == kv.get_block_ids("a")[:len(hits)]
    assert all(h.ref_cnt == 2 for h in hits)
    assert kv.prefix_cache_hits == expected and kv.prefix_cache_queries == 2 * prompt_len
    kv.free(a)
    kv.free(b)
    # Both finished: the blocks stay cached and a third identical prompt still hits.
    c = make_request("c", prompt)
    assert admit(kv, c)[1] == expected


def test_kv_hit_on_extended_prompt_and_partial_match():
    kv = KVCacheManager(32, 4)
    base = prompt_of(12)
    a = make_request("a", base)
    admit(kv, a)
    # Longer prompt with the same start: all 3 full blocks of `a` hit.
    b = make_request("b", base + [1, 2, 3])
    assert admit(kv, b)[1] == 12
    # Differs inside block 1: only block 0 hits.
    other = list(base)
    other[5] = (other[5] % (VOCAB - 1)) + 1 if other[5] != VOCAB - 1 else 1
    assert other[5] != base[5]
    c = make_request("c", other + [7])
    assert admit(kv, c)[1] == 4


def test_kv_hash_chain_same_tokens_different_parent_do_not_hit():
    kv = KVCacheManager(32, 4)
    x, y, z = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]
    a = make_request("a", x + z + [5])
    admit(kv, a)
    # Block `z` exists in the cache but under parent `x`; under parent `y` it must not hit.
    b = make_request("b", y + z + [5])
    assert admit(kv, b)[1] == 0
    assert set(kv.get_block_ids("a")).isdisjoint(kv.get_block_ids("b"))


def test_kv_only_computed_blocks_are_cached():
    kv = KVCacheManager(32, 4)
    prompt = prompt_of(13)
    a = make_request("a", prompt)
    admit(kv, a, num_new=6)  # a chunk: block 0 full, block 1 half
    b = make_request("b", prompt)
    assert kv.get_computed_blocks(b)[1] == 4
    kv.allocate_slots(a, 7)
    a.num_computed_tokens = 13
    assert kv.get_computed_blocks(b)[1] == 12


def test_kv_generated_tokens_are_cached_too():
    kv = KVCacheManager(32, 4)
    a = make_request("a", prompt_of(6))
    admit(kv, a)
    for t in (3, 4, 5):  # decode: the sampled token is computed on the next step
        a.output_token_ids.append(t)
        assert kv.allocate_slots(a, 1) is not None
        a.num_computed_tokens += 1
    a.output_token_ids.append(9)  # sampled, not computed yet
    assert a.num_tokens == 10 and a.num_computed_tokens == 9
    b = make_request("b", a.all_token_ids[:9] + [1])
    assert kv.get_computed_blocks(b)[1] == 8


def test_kv_allocate_slots_returns_none_and_changes_nothing_when_short():
    kv = KVCacheManager(6, 4)
    shared = prompt_of(8, seed=1)
    a = make_request("a", shared + [1, 2])
    admit(kv, a)  # 3 blocks
    kv.free(a)  # blocks 0,1 cached and free
    b = make_request("b", prompt_of(12, seed=2))
    admit(kv, b)  # 3 blocks: 3 free left (two of them cached)
    assert kv.pool.num_free_blocks == 3

    def snapshot():
        return ([(x.ref_cnt, x.block_hash) for x in kv.pool.blocks], kv.pool.num_free_blocks,
                dict(kv.pool._cached), {k: list(v) for k, v in kv.req_to_blocks.items() if v},
                kv.pool.num_evictions)

    c = make_request("c", shared + prompt_of(12, seed=3))  # 20 tokens, 2 hit blocks, needs 3 new
    hits, num_hit = kv.get_computed_blocks(c)
    assert num_hit == 8 and all(h.ref_cnt == 0 for h in hits)
    before = snapshot()
    assert kv.allocate_slots(c, 12, hits) is None  # 3 new + 2 revived > 3 free
    assert snapshot() == before
    assert kv.get_block_ids("c") == []
    # A running request that cannot grow: same.
    b.output_token_ids.append(1)
    assert kv.allocate_slots(b, 1, num_reserved_tokens=100) is None
    assert snapshot() == before
    # Exactly enough succeeds.
    assert kv.allocate_slots(c, 4, hits) is not None  # 1 new + 2 revived
    assert kv.pool.num_free_blocks == 0


def test_kv_allocate_counts_revived_blocks():
    """Hit blocks sitting in the free queue consume free capacity when revived."""
    kv = KVCacheManager(3, 4)
    a = make_request("a", prompt_of(9))
    admit(kv, a)
    kv.free(a)
    b = make_request("b", prompt_of(9))  # hits 2 blocks (free), needs 1 more
    hits, _ = kv.get_computed_blocks(b)
    assert len(hits) == 2
    assert kv.allocate_slots(b, 1, hits, num_reserved_tokens=4) is None  # would need 2 + 2 > 3
    assert kv.allocate_slots(b, 1, hits) is not None
    assert kv.pool.num_free_blocks == 0 and all(h.ref_cnt == 1 for h in hits)


def test_kv_free_returns_everything_and_evicts_tail_first():
    kv = KVCacheManager(8, 4)
    a = make_request("a", prompt_of(16))
    admit(kv, a)
    b = make_request("b", prompt_of(16))
    admit(kv, b)  # shares 3 blocks, owns 1
    assert kv.pool.num_free_blocks == 3
    kv.free(a)
    assert kv.pool.num_free_blocks == 4  # only a's own last block
    kv.free(b)
    assert kv.pool.num_free_blocks == 8 and all(x.ref_cnt == 0 for x in kv.pool.blocks)
    assert kv.req_to_blocks == {} and kv._req_to_hashes == {}
    kv.free(b)  # freeing an unknown request is a no-op
    assert kv.pool.num_free_blocks == 8
    # The tail block of a prompt is evicted before its head.
    c = make_request("c", prompt_of(4, seed=9))
    admit(kv, c, num_new=4)
    d = make_request("d", prompt_of(16))
    assert kv.get_computed_blocks(d)[1] == 12


def test_kv_caching_off_no_sharing_without_salt():
    kv = KVCacheManager(16, 4, enable_caching=False)
    prompt = prompt_of(12)
    a = make_request("a", prompt)
    admit(kv, a)
    b = make_request("b", prompt)
    assert admit(kv, b)[1] == 0
    assert all(x.block_hash is None for x in kv.pool.blocks)


@pytest.mark.parametrize("caching", [False, True])
def test_kv_cache_salt_isolation(caching):
    kv = KVCacheManager(32, 4, enable_caching=caching)
    prompt = prompt_of(12)
    lead = make_request("0_x", prompt, cache_salt="x")
    admit(kv, lead)
    sib = make_request("1_x", prompt, cache_salt="x", leader=lead)
    assert admit(kv, sib)[1] == 8
    other = make_request("0_y", prompt, cache_salt="y")
    assert admit(kv, other)[1] == 0
    plain = make_request("p", prompt)
    assert admit(kv, plain)[1] == 0
    if caching:  # an unsalted twin of the plain request hits it, not the salted ones
        twin = make_request("q", prompt)
        hits, n = admit(kv, twin)
        assert n == 8 and [h.block_id for h in hits] == kv.get_block_ids("p")[:2]
    # After the siblings finish, a later sibling with the same salt still hits (caching off too).
    for r in (lead, sib):
        kv.free(r)
    late = make_request("2_x", prompt, cache_salt="x")
    assert kv.get_computed_blocks(late)[1] == 8


def test_failed_step_takes_back_its_prefix_cache_entries():
    """Blocks enter the prefix cache when the step that fills them is scheduled; if that step
    fails, uncache_step() removes them, while blocks computed by earlier steps stay cached."""
    kv = KVCacheManager(16, 4)
    a = make_request("a", prompt_of(13))
    kv.begin_step()
    kv.allocate_slots(a, 8)  # step 1 fills blocks 0-1
    a.num_computed_tokens = 8
    kv.begin_step()
    kv.allocate_slots(a, 5)  # step 2 fills block 2 ... and fails
    kv.uncache_step()
    kv.free(a)
    again = make_request("again", prompt_of(13))
    hits, n = kv.get_computed_blocks(again)
    assert n == 8 and len(hits) == 2


def test_kv_block_ids_and_slot_count():
    kv = KVCacheManager(8, 4)
    a = make_request("a", prompt_of(9))
    admit(kv, a)
    assert len(kv.get_block_ids("a")) == 3 and kv.num_allocated_slots() == 12
    assert kv.get_block_ids("nope") == []
    assert cdiv(9, 4) == 3 and cdiv(8, 4) == 2


# =====================================================================================
# Scheduler: unit tests


def test_scheduler_config_validation():
    with pytest.raises(ValueError):
        SchedulerConfig(policy="fifo")
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_batched_tokens=0)


def test_single_request_runs_to_completion_and_matches_reference():
    sim = Sim(16, 4)
    r = sim.add(dummy_request("a", 10, max_tokens=7))
    out, sampled = sim.step()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 10)]
    assert r.num_cached_tokens == 0 and r.first_scheduled_time is not None
    sim.run()
    assert r.output_token_ids == reference_output(r.prompt_token_ids, r.sampling_params, sim.cfg.max_model_len)[0]
    assert len(r.output_token_ids) == 7 and r.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert r.status.finish_reason == "length"
    assert sim.steps == 7 and sim.finished == [r]
    check_drained(sim)


def test_chunked_prefill_only_last_chunk_samples():
    sim = Sim(16, 4, budget=4)
    r = sim.add(dummy_request("a", 10, max_tokens=3))
    chunks = []
    while sim.sched.has_unfinished_requests():
        out, sampled = sim.step()
        (s,) = out.scheduled
        chunks.append((s.num_new_tokens, "a" in sampled))
    assert chunks == [(4, False), (4, False), (2, True), (1, True), (1, True)]
    assert len(r.output_token_ids) == 3
    check_drained(sim)


def test_budget_and_max_num_seqs_respected():
    sim = Sim(64, 4, max_num_seqs=3, budget=10)
    for i in range(8):
        sim.add(dummy_request(i, 7, seed=i, max_tokens=5))
    while sim.sched.has_unfinished_requests():
        out, _ = sim.step()
        assert out.total_num_scheduled_tokens <= 10
        assert len(out.scheduled) <= 3 and len(sim.sched.running) <= 3
    assert all(len(r.output_token_ids) == 5 for r in sim.all.values())
    check_drained(sim)


def test_running_requests_scheduled_before_waiting_and_fcfs():
    sim = Sim(64, 4, max_num_seqs=8, budget=6)
    sim.add(dummy_request("a", 5, max_tokens=10))
    sim.step()  # a prefilled, now decoding
    for rid in "bcd":
        sim.add(dummy_request(rid, 5, seed=ord(rid), max_tokens=10))
    out, _ = sim.step()
    # a first (1 decode token), then b with the rest of the budget (a chunk), c and d wait.
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 5)]
    assert [r.request_id for r in sim.sched.waiting] == ["c", "d"]
    out, _ = sim.step()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 1), ("c", 4)]
    out, _ = sim.step()
    assert [s.request.request_id for s in out.scheduled] == ["a", "b", "c", "d"]
    assert [r.request_id for r in sim.sched.running] == ["a", "b", "c", "d"]
    sim.run()
    check_drained(sim)


def test_admission_is_fcfs_under_max_num_seqs():
    sim = Sim(64, 4, max_num_seqs=1)
    for i in range(4):
        sim.add(dummy_request(i, 3, seed=i, max_tokens=2))
    order = []
    while sim.sched.has_unfinished_requests():
        out, _ = sim.step()
        assert len(out.scheduled) == 1
        rid = out.scheduled[0].request.request_id
        if not order or order[-1] != rid:
            order.append(rid)
    assert order == ["0", "1", "2", "3"]


def test_admission_waits_for_blocks_without_skipping():
    """A waiting request that does not fit blocks admission of the ones behind it (FCFS)."""
    sim = Sim(4, 4, max_model_len=16)
    a = sim.add(dummy_request("a", 9, max_tokens=2))  # 3 blocks
    b = sim.add(dummy_request("b", 8, seed=1, max_tokens=2))  # 2 blocks: does not fit
    c = sim.add(dummy_request("c", 2, seed=2, max_tokens=2))  # 1 block: would fit
    out, _ = sim.step()
    assert [s.request.request_id for s in out.scheduled] == ["a"]
    assert [r.request_id for r in sim.sched.waiting] == ["b", "c"]
    sim.run()
    assert all(len(r.output_token_ids) == 2 for r in (a, b, c))
    check_drained(sim)


def test_preemption_of_most_recent_request_and_recompute():
    # 6 blocks of 4; three 7-token prompts hold 2 blocks each; growing past 8 tokens needs more.
    sim = Sim(6, 4, max_model_len=24, caching=False)
    reqs = [sim.add(dummy_request(rid, 7, seed=i, max_tokens=6)) for i, rid in enumerate("abc")]
    out, _ = sim.step()
    assert len(out.scheduled) == 3 and sim.kv.pool.num_free_blocks == 0
    # Each now has 8 tokens and 7 computed: position 7 fits, the next step needs nothing new.
    out, _ = sim.step()
    assert not out.preempted
    # Now 9 tokens: position 8 needs a third block for each; a takes c's blocks.
    out, _ = sim.step()
    assert [r.request_id for r in out.preempted] == ["c"]
    c = reqs[2]
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert [s.request.request_id for s in out.scheduled] == ["a", "b"]
    assert list(sim.sched.waiting) == [c] and sim.sched.num_preemptions == 1
    assert c.num_cached_tokens == 0  # stays the first admission's value
    sim.add(dummy_request("d", 3, seed=7, max_tokens=1))
    assert [r.request_id for r in sim.sched.waiting] == ["c", "d"]  # the preempted one goes first
    sim.run()
    for r in reqs:
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.sampling_params, 24)[0]
        assert len(r.output_token_ids) == 6
    assert sim.sched.num_preemptions >= 1
    check_drained(sim)


@pytest.mark.parametrize("num_blocks, preempted, scheduled", [
    (4, "dc", "ab"),  # a takes d's block, b takes c's
    (3, "cb", "a"),  # a takes c's block; b finds none and is itself the last: preempted
])
def test_preemption_pops_from_the_back_until_the_request_fits(num_blocks, preempted, scheduled):
    sim = Sim(num_blocks, 4, max_model_len=12, caching=False)
    reqs = {rid: sim.add(dummy_request(rid, 4, seed=i, max_tokens=8)) for i, rid in enumerate("abcd"[:num_blocks])}
    sim.step()  # each holds one full block and has 5 tokens: the next step needs a second block each
    out, _ = sim.step()
    assert [r.request_id for r in out.preempted] == list(preempted)
    assert [s.request.request_id for s in out.scheduled] == list(scheduled)
    assert [r.request_id for r in sim.sched.running] == list(scheduled)
    assert [r.request_id for r in sim.sched.waiting] == list(reversed(preempted))
    sim.run()
    for r in reqs.values():
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.sampling_params, 12)[0]
    check_drained(sim)


def test_preempted_request_recomputes_and_hits_its_own_cached_blocks():
    bs = 4
    sim = Sim(7, bs, max_model_len=28, caching=True)
    a = sim.add(dummy_request("a", 7, max_tokens=8))  # 2 blocks
    c = sim.add(dummy_request("c", 15, seed=1, max_tokens=4))  # 4 blocks (3 full, cached)
    while c.status != RequestStatus.PREEMPTED:
        out, _ = sim.step()
        assert sim.steps < 20
    assert out.preempted == [c] and c.num_computed_tokens == 0
    assert list(sim.sched.waiting) == [c]
    num_tokens_at_preemption = c.num_tokens
    while c.status != RequestStatus.RUNNING:
        out, _ = sim.step()
        assert sim.steps < 40
    (s,) = [s for s in out.scheduled if s.request is c]
    hit = c.num_computed_tokens - s.num_new_tokens
    assert hit > 0 and hit % bs == 0  # its full prompt blocks survived in the cache
    assert c.num_computed_tokens == num_tokens_at_preemption  # caught up in one step, and sampled
    assert c.num_cached_tokens == 0  # stays the first admission's value
    sim.run()
    for r in (a, c):
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.sampling_params, 28)[0]
    check_drained(sim)


def test_no_admission_in_a_step_that_preempted():
    sim = Sim(4, 4, max_model_len=16, caching=False)
    a = sim.add(dummy_request("a", 4, max_tokens=8))
    b = sim.add(dummy_request("b", 4, seed=1, max_tokens=8))
    sim.step()
    z = sim.add(dummy_request("z", 1, seed=5, max_tokens=1))
    while True:
        out, _ = sim.step()
        assert sim.steps < 10
        if out.preempted:
            break
    assert out.preempted == [b] and sim.kv.pool.num_free_blocks >= 1  # z would fit, but is not admitted
    assert [s.request for s in out.scheduled] == [a]
    assert list(sim.sched.waiting) == [b, z]
    sim.run()
    assert [len(r.output_token_ids) for r in (a, b, z)] == [8, 8, 1]
    check_drained(sim)


def test_static_policy_batches_and_reserves():
    bs = 4
    sim = Sim(32, bs, max_model_len=40, policy="static", max_num_seqs=3, budget=1000)
    specs = [(5, 6), (9, 2), (3, 30), (4, 4), (6, 1)]
    reqs = [sim.add(dummy_request(i, p, seed=i, max_tokens=m)) for i, (p, m) in enumerate(specs)]
    out, _ = sim.step()
    batch = [s.request for s in out.scheduled]
    assert batch == reqs[:3]
    for r in batch:
        want = cdiv(min(r.num_prompt_tokens + r.sampling_params.max_tokens, 40), bs)
        assert len(sim.kv.get_block_ids(r.request_id)) == want
    # Nothing else is admitted while any of the batch runs, even with free blocks and seats.
    seen_running = set(r.request_id for r in batch)
    while any(r.request_id in sim.sched.requests for r in batch):
        out, _ = sim.step()
        assert {s.request.request_id for s in out.scheduled} <= seen_running
        for r in sim.sched.running:  # reservations never grow
            want = cdiv(min(r.num_prompt_tokens + r.sampling_params.max_tokens, 40), bs)
            assert len(sim.kv.get_block_ids(r.request_id)) == want
    out, _ = sim.step()
    assert [s.request for s in out.scheduled] == reqs[3:]
    sim.run()
    for r in reqs:
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.sampling_params, 40)[0]
    check_drained(sim)


def test_static_batch_keeps_its_shape_until_its_slowest_member_finishes():
    bs = 4
    sim = Sim(32, bs, policy="static", max_num_seqs=2)
    short = sim.add(dummy_request("short", 5, max_tokens=2))
    long = sim.add(dummy_request("long", 6, seed=1, max_tokens=7))
    nxt = sim.add(dummy_request("next", 3, seed=2, max_tokens=1))
    steps = 0
    while long.request_id in sim.sched.requests:
        out, _ = sim.step()
        steps += 1
        # short takes its 2 tokens in steps 1-2, then rides along as a padding row.
        assert [s.request for s in out.scheduled] == ([short, long] if steps <= 2 else [long])
        assert [p.request for p in out.padding] == ([short] if steps > 2 else [])
        if 2 <= steps < 7:
            assert short.is_finished and sim.sched.padding == [short]
            assert len(sim.kv.get_block_ids("short")) == cdiv(5 + 2, bs)  # its reservation, still held
    assert steps == 7
    # The batch is done: short's blocks are free and the next batch starts.
    assert sim.sched.padding == [] and "short" not in sim.kv.req_to_blocks
    out, _ = sim.step()
    assert [s.request for s in out.scheduled] == [nxt] and out.padding == []
    sim.run()
    for r in (short, long, nxt):
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.sampling_params, sim.cfg.max_model_len)[0]
    check_drained(sim)


def test_static_abort_frees_at_once_and_the_last_member_releases_the_padding():
    sim = Sim(32, 4, policy="static")
    a = sim.add(dummy_request("a", 4, max_tokens=1))
    b = sim.add(dummy_request("b", 4, seed=1, max_tokens=9))
    c = sim.add(dummy_request("c", 4, seed=2, max_tokens=9))
    sim.step()  # prefill: a samples its only token and becomes padding
    assert sim.sched.padding == [a] and a.is_finished
    sim.abort("b")
    assert "b" not in sim.kv.req_to_blocks and sim.sched.padding == [a]
    sim.abort("c")  # the last running member: the batch is over
    assert sim.sched.padding == [] and sim.kv.req_to_blocks == {}
    assert b.status == c.status == RequestStatus.FINISHED_ABORTED
    check_drained(sim)


def test_static_policy_admits_only_what_fits():
    sim = Sim(8, 4, max_model_len=32, policy="static")
    a = sim.add(dummy_request("a", 10, max_tokens=10))  # 5 blocks reserved
    b = sim.add(dummy_request("b", 10, seed=1, max_tokens=10))  # 5 more: does not fit
    c = sim.add(dummy_request("c", 1, seed=2, max_tokens=1))  # fits, but FCFS: waits
    out, _ = sim.step()
    assert [s.request for s in out.scheduled] == [a]
    sim.run()
    assert [len(r.output_token_ids) for r in (a, b, c)] == [10, 10, 1]
    check_drained(sim)


def test_static_policy_chunks_with_budget():
    sim = Sim(16, 4, policy="static", budget=5)
    a = sim.add(dummy_request("a", 12, max_tokens=2))
    sizes = []
    while sim.sched.has_unfinished_requests():
        out, _ = sim.step()
        sizes.append(out.total_num_scheduled_tokens)
    assert sizes == [5, 5, 2, 1]
    assert len(a.output_token_ids) == 2
    check_drained(sim)


@pytest.mark.parametrize("caching", [False, True])
def test_n_gt_1_followers_wait_for_leader_then_hit(caching):
    sim = Sim(32, 4, budget=8, caching=caching)
    prompt = prompt_of(14)
    lead = sim.add(make_request("0_r", prompt, max_tokens=4, cache_salt="r"))
    f1 = sim.add(make_request("1_r", prompt, max_tokens=4, cache_salt="r", leader=lead))
    f2 = sim.add(make_request("2_r", prompt, max_tokens=4, cache_salt="r", leader=lead))
    other = sim.add(dummy_request("x", 2, seed=3, max_tokens=4))
    out, _ = sim.step()  # leader chunk of 8; followers skipped; nothing left for x
    assert [s.request for s in out.scheduled] == [lead]
    assert list(sim.sched.waiting) == [f1, f2, other]
    out, _ = sim.step()  # leader finishes its prompt (6 tokens), followers still wait, x admitted
    assert [s.request for s in out.scheduled] == [lead, other]
    assert list(sim.sched.waiting) == [f1, f2]
    assert lead.is_prefilled
    out, _ = sim.step()
    assert [s.request for s in out.scheduled][:2] == [lead, other]
    assert f1 in [s.request for s in out.scheduled]
    assert f1.num_cached_tokens == 12 and lead.num_cached_tokens == 0
    sim.run()
    assert f2.num_cached_tokens == 12
    ref = reference_output(prompt, lead.sampling_params, sim.cfg.max_model_len)[0]
    assert lead.output_token_ids == f1.output_token_ids == f2.output_token_ids == ref
    check_drained(sim)


def _leader_and_follower() -> tuple[Sim, Request, Request]:
    """Two requests with the same 6-token prompt, the second following the first."""
    sim = Sim(32, 4)
    prompt = prompt_of(6)
    lead = sim.add(make_request("0_r", prompt, cache_salt="r"))
    return sim, lead, sim.add(make_request("1_r", prompt, cache_salt="r", leader=lead))


def test_followers_admitted_when_leader_is_gone():
    sim, lead, f1 = _leader_and_follower()
    sim.abort(lead.request_id)
    out, _ = sim.step()
    assert [s.request for s in out.scheduled] == [f1]
    sim.run()
    check_drained(sim)


def test_follower_waits_again_while_its_leader_recomputes():
    sim, lead, f1 = _leader_and_follower()
    assert sim.sched._waits_for_leader(f1)
    sim.step()
    assert lead.is_prefilled and not sim.sched._waits_for_leader(f1)
    lead.num_computed_tokens = 0  # as after a preemption
    assert sim.sched._waits_for_leader(f1)


# -- stop conditions --------------------------------------------------------------------


def drive(sim: Sim, r: Request, tokens: list[int]) -> list[int]:
    """Feed the given tokens as the model's samples; returns the ones accepted before finishing."""
    sim.add(r)
    for t in tokens:
        if r.is_finished:
            break
        while True:
            out = sim.sched.schedule()
            sampled = {s.request.request_id: [t] for s in out.scheduled if s.samples}
            sim.sched.update_from_output(out, sampled)
            check_state(sim)
            if sampled:
                break
    return r.output_token_ids


def test_stop_on_eos():
    sim = Sim(16, 4)
    r = make_request("a", [1, 2, 3], max_tokens=10, ignore_eos=False)
    assert drive(sim, r, [5, 6, EOS, 7]) == [5, 6, EOS]
    assert r.status == RequestStatus.FINISHED_STOPPED and r.status.finish_reason == "stop"
    assert r.stop_reason is None
    check_drained(sim)


def test_ignore_eos():
    sim = Sim(16, 4)
    r = make_request("a", [1, 2, 3], max_tokens=4, ignore_eos=True)
    assert drive(sim, r, [EOS, EOS, 5, EOS, 6]) == [EOS, EOS, 5, EOS]
    assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_stop_token_ids_set_stop_reason_even_with_ignore_eos():
    sim = Sim(16, 4)
    r = make_request("a", [1, 2, 3], max_tokens=10, ignore_eos=True, stop_token_ids=[9])
    assert drive(sim, r, [EOS, 5, 9, 4]) == [EOS, 5, 9]
    assert r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason == 9


def test_max_tokens():
    sim = Sim(16, 4)
    r = make_request("a", [1, 2, 3], max_tokens=1, ignore_eos=False)
    assert drive(sim, r, [5, 6]) == [5]
    assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_eos_on_the_last_allowed_token_is_a_stop():
    sim = Sim(16, 4)
    r = make_request("a", [1, 2, 3], max_tokens=2, ignore_eos=False)
    assert drive(sim, r, [5, EOS]) == [5, EOS]
    assert r.status == RequestStatus.FINISHED_STOPPED


def test_min_tokens_holds_back_eos_and_stop_ids():
    sim = Sim(16, 4)
    r = make_request("a", [1, 2, 3], max_tokens=10, ignore_eos=False, min_tokens=3, stop_token_ids=[9])
    assert drive(sim, r, [EOS, 9, EOS, 5, 6]) == [EOS, 9, EOS]
    assert r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason is None


def test_max_model_len_caps_total_tokens():
    sim = Sim(4, 4, max_model_len=10)
    r = make_request("a", prompt_of(7), max_tokens=100)
    assert len(drive(sim, r, [5] * 20)) == 3
    assert r.num_tokens == 10 and r.status == RequestStatus.FINISHED_LENGTH_CAPPED
    check_drained(sim)


def test_max_tokens_none_runs_to_max_model_len():
    sim = Sim(4, 4, max_model_len=12)
    r = Request("a", prompt_of(11), SamplingParams(max_tokens=None), eos_token_ids=EOS_SET)
    sim.add(r)
    sim.run()
    assert r.num_tokens == 12 and len(r.output_token_ids) == 1
    check_drained(sim)


# -- finish_request ---------------------------------------------------------------------


def test_finish_request_aborts_waiting_and_running():
    sim = Sim(16, 4, max_num_seqs=1)
    a = sim.add(dummy_request("a", 5))
    b = sim.add(dummy_request("b", 5, seed=1))
    sim.step()
    assert sim.kv.pool.num_free_blocks < 16
    assert sim.abort("a") is a and a.status == RequestStatus.FINISHED_ABORTED
    assert a.status.finish_reason == "abort"
    assert sim.abort("b") is b and b not in sim.sched.waiting
    assert sim.abort("a") is None and sim.abort("zzz") is None
    check_drained(sim)


def test_finish_request_on_preempted_request():
    sim = Sim(6, 4, max_model_len=24, caching=False)
    for i, rid in enumerate("abc"):
        sim.add(dummy_request(rid, 7, seed=i, max_tokens=6))
    for _ in range(3):
        out, _ = sim.step()
    (c,) = out.preempted
    assert sim.abort("c") is c and c.status == RequestStatus.FINISHED_ABORTED
    sim.run()
    check_drained(sim)


# -- prefix caching through the scheduler -------------------------------------------------


def test_identical_prompt_after_finish_hits_cache():
    sim = Sim(32, 4)
    prompt = prompt_of(21)
    a = sim.add(make_request("a", prompt, max_tokens=3))
    sim.run()
    b = sim.add(make_request("b", prompt, max_tokens=3))
    out, _ = sim.step()
    assert b.num_cached_tokens == 20 and out.scheduled[0].num_new_tokens == 1
    sim.run()
    assert a.output_token_ids == b.output_token_ids
    check_drained(sim)


def test_prefix_hit_on_blocks_computed_in_the_same_step():
    sim = Sim(32, 4, budget=100)
    prompt = prompt_of(13)
    a = sim.add(make_request("a", prompt, max_tokens=3))
    b = sim.add(make_request("b", prompt, max_tokens=3))
    out, _ = sim.step()
    assert [s.num_new_tokens for s in out.scheduled] == [13, 1]
    assert b.num_cached_tokens == 12
    sim.run()
    assert a.output_token_ids == b.output_token_ids
    check_drained(sim)


def test_static_abort_mid_prefill_leaves_no_uncomputed_blocks_in_cache():
    sim = Sim(16, 4, policy="static", budget=4)
    prompt = prompt_of(12)
    a = sim.add(make_request("a", prompt, max_tokens=2))
    out, _ = sim.step()  # only tokens 0..3 of a are computed
    assert a.num_computed_tokens == 4
    sim.abort("a")
    b = sim.add(make_request("b", prompt, max_tokens=2))
    sim.run()  # FakeModel asserts b's context KV is what b's tokens would produce
    assert b.num_cached_tokens <= 4


def test_static_abort_mid_prefill_does_not_corrupt_batch_mate():
    sim = Sim(16, 4, policy="static", budget=4)
    prompt = prompt_of(12)
    sim.add(make_request("a", prompt, max_tokens=2))
    b = sim.add(make_request("b", prompt + [3], max_tokens=2))
    sim.step()  # a: tokens 0..3 computed; b admitted in the same batch with a's blocks as hits
    sim.abort("a")
    sim.run()
    assert b.output_token_ids == reference_output(b.prompt_token_ids, b.sampling_params, sim.cfg.max_model_len)[0]


# =====================================================================================
# Property tests: random request mixes through the whole schedule/run/update loop


@st.composite
def scenarios(draw, tight=False):
    bs = draw(st.sampled_from([1, 4, 16]))
    policy = "continuous" if tight else draw(st.sampled_from(["continuous", "static"]))
    caching = draw(st.booleans())
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    max_prompt_cap = draw(st.sampled_from([8, 40, 200]))
    prefixes = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, max_prompt_cap))] for _ in range(3)]
    n_groups = draw(st.integers(3, 8) if tight else st.integers(1, 8))
    groups = []  # (prompt, params, n, arrival_step)
    for _ in range(n_groups):
        plen = draw(st.integers(1, max_prompt_cap))
        kind = draw(st.integers(0, 3))
        if kind == 0 and groups:  # an exact repeat of an earlier prompt
            prompt = list(groups[draw(st.integers(0, len(groups) - 1))][0])
        elif kind <= 1:
            pre = prefixes[draw(st.integers(0, 2))]
            prompt = (pre + [rng.randrange(1, VOCAB) for _ in range(plen)])[:plen]
        else:
            prompt = [rng.randrange(1, VOCAB) for _ in range(plen)]
        max_tokens = draw(st.integers(1, 50))
        params = dict(max_tokens=max_tokens, ignore_eos=draw(st.booleans()),
                      min_tokens=draw(st.integers(0, max_tokens)) if draw(st.booleans()) else 0,
                      stop_token_ids=[draw(st.integers(1, VOCAB - 1))] if draw(st.integers(0, 4)) == 0 else [])
        n = draw(st.sampled_from([1, 1, 1, 2, 3]))
        groups.append((prompt, params, n, draw(st.integers(0, 4 if tight else 30))))
    longest = max(len(g[0]) for g in groups)
    max_model_len = longest + 1 + draw(st.integers(0, 60))
    min_blocks = cdiv(max_model_len, bs)
    if tight:
        num_blocks = min_blocks + draw(st.integers(0, 2))
    else:
        num_blocks = min_blocks + draw(st.one_of(st.integers(0, min_blocks // 4), st.integers(0, 2 * min_blocks)))
    budget = draw(st.one_of(st.integers(1, 24), st.integers(1, 256)))
    max_num_seqs = draw(st.integers(1, 16))
    aborts = draw(st.lists(st.tuples(st.integers(0, 40), st.integers(0, n_groups - 1)), max_size=4))
    # Speculative decoding (continuous only): k proposals, each right with some probability.
    spec = None
    if policy == "continuous" and draw(st.booleans()):
        spec = (draw(st.integers(1, 6)), draw(st.sampled_from([0.0, 0.5, 0.9, 1.0])), rng.random())
    return dict(bs=bs, policy=policy, caching=caching, groups=groups, max_model_len=max_model_len,
                num_blocks=num_blocks, budget=budget, max_num_seqs=max_num_seqs, aborts=aborts, spec=spec)


def scenario_requests(sc, **fields_of_group):
    """A scenario's requests: by arrival step, by group (n > 1 siblings share a group), and the
    groups to abort by step. fields_of_group: Request fields, a function of the group's index."""
    arrivals: dict[int, list[list[Request]]] = {}
    group_reqs: list[list[Request]] = []
    for g, (prompt, params, n, at) in enumerate(sc["groups"]):
        reqs, leader = [], None
        extra = {name: field(g, at) for name, field in fields_of_group.items()}
        for i in range(n):
            rid = f"g{g}" if n == 1 else f"{i}_g{g}"
            r = Request(rid, prompt, SamplingParams(**params), eos_token_ids=EOS_SET,
                        cache_salt=f"g{g}" if n > 1 else None, leader=leader, **extra)
            leader = leader or (r if n > 1 else None)
            reqs.append(r)
        group_reqs.append(reqs)
        arrivals.setdefault(at, []).append(reqs)
    aborts: dict[int, list[int]] = {}
    for at, g in sc["aborts"]:
        aborts.setdefault(at, []).append(g)
    return arrivals, group_reqs, aborts


def run_scenario(sc):
    spec = sc.get("spec")
    sim = Sim(sc["num_blocks"], sc["bs"], max_num_seqs=sc["max_num_seqs"], budget=sc["budget"],
              max_model_len=sc["max_model_len"], policy=sc["policy"], caching=sc["caching"],
              spec=None if spec is None else (spec[0], spec[1], random.Random(spec[2])))
    static = sc["policy"] == "static"
    arrivals, group_reqs, aborts = scenario_requests(sc)
    aborted: set[str] = set()
    last_arrival = max(arrivals)
    total_tokens = sum(len(p) + min(pa["max_tokens"], sc["max_model_len"]) for p, pa, n, _ in sc["groups"]
                       for _ in range(n))
    max_steps = last_arrival + total_tokens + 10
    step = 0
    while step <= last_arrival or sim.sched.has_unfinished_requests():
        assert step <= max_steps, "the simulation did not terminate"
        for reqs in arrivals.get(step, ()):
            for r in reqs:
                sim.add(r)
        for g in aborts.get(step, ()):
            for r in group_reqs[g]:  # the engine aborts all of a request's siblings together
                if r.request_id not in sim.sched.requests:
                    continue
                assert sim.abort(r.request_id) is r
                aborted.add(r.request_id)
        if not sim.sched.has_unfinished_requests():
            step += 1
            continue
        waiting_before = list(sim.sched.waiting)
        running_before = list(sim.sched.running)
        live_before = set(sim.sched.requests)
        blocked = {r.request_id for r in waiting_before if r.leader is not None
                   and r.leader.request_id in sim.sched.requests and not r.leader.is_prefilled}
        out, _ = sim.step()
        assert not out.is_empty, "nothing scheduled while requests are unfinished"
        scheduled = [s.request for s in out.scheduled]
        admitted = [r for r in waiting_before if r not in sim.sched.waiting]
        if static:
            assert not admitted or not running_before, "static: admission while a batch runs"
            assert not out.preempted, "static: reservations make preemption impossible"
        if admitted and not static:
            assert not out.preempted
            # Running requests come first, and all that are still running were scheduled.
            assert scheduled == [r for r in running_before if r not in out.preempted] + admitted
        if admitted:
            # FCFS: the admitted requests are the head of the queue, except followers (n > 1) whose leader's
            # prompt was not computed at the start of the step, which may be skipped.
            pos = [waiting_before.index(r) for r in admitted]
            assert pos == sorted(pos)
            skipped = [r for r in waiting_before[:pos[-1]] if r not in admitted]
            assert static or all(r.request_id in blocked for r in skipped)
            if static:
                assert not skipped
        for r in admitted:
            if static:
                mml = sc["max_model_len"]
                want = cdiv(min(r.num_prompt_tokens + r.sampling_params.max_tokens, mml), sc["bs"])
                assert sim.blocks_after_schedule[r.request_id] == want
            elif r.request_id in blocked:
                # Only if its leader was admitted earlier in this very step with its prompt all cached.
                assert r.leader in admitted[:admitted.index(r)]
                assert r.leader.num_cached_tokens >= 0 and r.leader.request_id not in blocked
            if (not static and r.leader is not None and r.leader.request_id in live_before
                    and r.num_preemptions == 0):
                # A follower admitted while its leader lives hits the leader's prompt blocks.
                assert r.num_cached_tokens == (r.num_prompt_tokens - 1) // sc["bs"] * sc["bs"]
        if out.preempted:
            # The most recently admitted running requests are the ones preempted.
            kept = [r for r in running_before if r not in out.preempted]
            assert running_before == kept + list(reversed(out.preempted))
            assert sim.sched.waiting[0] is out.preempted[-1]
        step += 1
    check_drained(sim)
    mml = sc["max_model_len"]
    for r in sim.all.values():
        if r.request_id in aborted:
            assert r.status == RequestStatus.FINISHED_ABORTED
            continue
        ref, status = reference_output(r.prompt_token_ids, r.sampling_params, mml)
        assert r.output_token_ids == ref
        assert r.status == status
        if status == RequestStatus.FINISHED_LENGTH_CAPPED:
            assert len(r.output_token_ids) == min(r.sampling_params.max_tokens, mml - r.num_prompt_tokens)
        assert r.num_tokens <= mml
        assert 0 <= r.num_cached_tokens < r.num_prompt_tokens
        if not sc["caching"] and r.cache_salt is None:
            assert r.num_cached_tokens == 0
    # Resubmitting a finished prompt hits its blocks, if nothing was evicted since it was admitted.
    done = [r for r in sim.finished if r.request_id not in aborted and r.num_prompt_tokens > sc["bs"]
            and sim.evictions_at_admission[r.request_id] == sim.kv.pool.num_evictions]
    if sc["caching"] and done:
        last = done[-1]
        again = sim.add(Request("again", last.prompt_token_ids, SamplingParams(max_tokens=1),
                                eos_token_ids=EOS_SET, cache_salt=last.cache_salt))
        sim.run(max_steps=sim.steps + 10 + last.num_prompt_tokens)
        assert again.num_cached_tokens == (last.num_prompt_tokens - 1) // sc["bs"] * sc["bs"] > 0
        check_drained(sim)
    return sim


PROPERTY_SETTINGS = settings(max_examples=200, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY_SETTINGS
@given(scenarios())
def test_property_random_request_mixes(sc):
    run_scenario(sc)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios(tight=True))
def test_property_preemption_heavy(sc):
    """Continuous batching with a pool barely larger than one full-length request."""
    run_scenario(sc)


def test_duplicate_block_stays_findable_after_registered_copy_is_evicted():
    bs = 4
    sim = Sim(10, bs, max_model_len=40)
    x = prompt_of(8, seed=11)
    y = reference_output(x, SamplingParams(max_tokens=8, ignore_eos=True), 40)[0]
    a = sim.add(make_request("a", x, max_tokens=8))
    # b's prompt contains a's future output: b computes (and registers) block x+y[:4] first.
    b = sim.add(make_request("b", x + y[:4] + [1], max_tokens=1))
    sim.run()
    assert a.output_token_ids == y and b.num_cached_tokens == 8
    # A filler evicts the 6 least recently freed blocks, among them b's copy (not a's).
    sim.add(make_request("filler", prompt_of(24, seed=12), max_tokens=1))
    sim.run()
    c = sim.add(make_request("c", x + y, max_tokens=1))
    sim.run()
    assert c.num_cached_tokens == 12  # a's own copy of block 2 is still in the pool with its hash


# -- speculative decoding ---------------------------------------------------------------------


@pytest.mark.parametrize("p_right", [0.0, 0.6, 1.0])
def test_speculation_gives_the_same_tokens_in_fewer_steps_when_proposals_are_right(p_right):
    prompts = [prompt_of(n, seed=n) for n in (5, 23, 40)]
    runs = {}
    for spec in (None, (4, p_right, random.Random(3))):
        sim = Sim(64, 4, max_model_len=120, budget=64, spec=spec)
        reqs = [sim.add(make_request(f"r{i}", p, max_tokens=30)) for i, p in enumerate(prompts)]
        sim.run()
        check_drained(sim)
        runs[spec is not None] = ([r.output_token_ids for r in reqs], sim.steps, sim.sched.spec_stats)
    (plain, plain_steps, _), (spec_out, spec_steps, stats) = runs[False], runs[True]
    assert spec_out == plain == [reference_output(p, SamplingParams(max_tokens=30, ignore_eos=True), 120)[0]
                                 for p in prompts]
    assert stats.num_drafts > 0 and stats.num_draft_tokens >= stats.num_drafts
    if p_right == 1.0:
        assert stats.num_accepted_tokens == stats.num_draft_tokens and spec_steps < plain_steps / 3
    elif p_right == 0.0:  # a random proposal is right once in a while (the vocabulary is small)
        assert stats.num_accepted_tokens < stats.num_draft_tokens / 10
    assert stats.accepted_per_pos == sorted(stats.accepted_per_pos, reverse=True)
    assert sum(stats.accepted_per_pos) == stats.num_accepted_tokens


def test_proposals_are_dropped_before_anything_is_preempted_for_them():
    # Room for exactly the two requests' tokens: proposals never get blocks, nobody is preempted.
    sim = Sim(8, 4, max_model_len=16, budget=64, spec=(6, 1.0, random.Random(0)))
    a = sim.add(make_request("a", prompt_of(7, seed=1), max_tokens=9))
    b = sim.add(make_request("b", prompt_of(7, seed=2), max_tokens=9))
    sim.run()
    check_drained(sim)
    assert sim.sched.num_preemptions == 0
    for r in (a, b):
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.sampling_params, 16)[0]
