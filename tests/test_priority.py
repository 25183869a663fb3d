"""Priority scheduling (--scheduling-policy priority): the scheduler alone, with the fake model of
test_core (which checks every position's KV), so a wrong block or a lost token fails here."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_core import (PROPERTY_SETTINGS, Sim, check_drained, dummy_request, reference_output, scenario_requests,
                       scenarios)

from thrifty.core.kv_cache_manager import cdiv
from thrifty.core.request import Request, RequestStatus
from thrifty.core.scheduler import SchedulerConfig
from thrifty.sampling_params import SamplingParams


def priority_sim(num_blocks=64, block_size=4, *, aging_seconds=1e9, aging_seats=1, **kw) -> Sim:
    sim = Sim(num_blocks, block_size, scheduling="priority", priority_aging_seconds=aging_seconds,
              priority_aging_seats=aging_seats, **kw)
    sim.sched.clock = lambda: sim.steps  # aging counts steps here
    return sim


def add(sim: Sim, rid: str, n: int, priority: int = 0, max_tokens: int = 8, seed: int | None = None) -> Request:
    r = dummy_request(rid, n, seed=hash(rid) % 1000 if seed is None else seed, max_tokens=max_tokens)
    r.priority = priority
    r.arrival_time = sim.steps
    return sim.add(r)


def assert_reference_outputs(sim: Sim) -> None:
    for r in sim.all.values():
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.sampling_params,
                                                      sim.cfg.max_model_len)[0], r.request_id


def test_config_checks():
    with pytest.raises(ValueError, match="fcfs' or 'priority"):
        SchedulerConfig(scheduling="sjf")
    with pytest.raises(ValueError, match="static"):
        SchedulerConfig(policy="static", scheduling="priority")
    with pytest.raises(ValueError, match="priority_aging_seats"):
        SchedulerConfig(max_num_seqs=2, scheduling="priority", priority_aging_seats=3)
    with pytest.raises(ValueError, match="priority_aging_seconds"):
        SchedulerConfig(scheduling="priority", priority_aging_seconds=-1)


def test_urgent_request_takes_the_seat_of_the_least_urgent_in_the_same_step():
    sim = priority_sim(max_num_seqs=2)
    a, b = add(sim, "a", 6, priority=1), add(sim, "b", 6, priority=1)
    sim.step()
    vip = add(sim, "vip", 6, priority=-1)
    out, _ = sim.step()
    # b arrived after a, so it is the less urgent of the two equal ones.
    assert out.preempted == [b] and b.status == RequestStatus.PREEMPTED
    assert [s.request for s in out.scheduled] == [vip, a]  # the most urgent first in the batch
    assert sim.sched.num_priority_preemptions == 1
    sim.run()
    check_drained(sim)
    assert_reference_outputs(sim)


def test_equal_priorities_never_preempt_each_other():
    sim = priority_sim(max_num_seqs=2)
    add(sim, "a", 6), add(sim, "b", 6)
    sim.step()
    c = add(sim, "c", 6)
    for _ in range(3):
        out, _ = sim.step()
        assert not out.preempted and c.status == RequestStatus.WAITING
    sim.run()
    assert sim.sched.num_preemptions == 0
    assert_reference_outputs(sim)


def test_a_less_urgent_request_never_preempts():
    sim = priority_sim(max_num_seqs=1)
    a = add(sim, "a", 6, priority=0)
    sim.step()
    add(sim, "low", 6, priority=5)
    sim.run()
    assert sim.sched.num_preemptions == 0 and a.num_preemptions == 0


def test_token_budget_goes_to_the_most_urgent_and_defers_the_rest_without_recompute():
    # A long low-priority prompt is being prefilled in chunks when a VIP arrives: the VIP's
    # prefill takes the budget first, and the low request waits with its KV kept (no preemption).
    sim = priority_sim(num_blocks=64, max_num_seqs=4, budget=8)
    decoding = add(sim, "decoding", 3, priority=1, max_tokens=8)
    low = add(sim, "low", 40, priority=1, max_tokens=4)
    sim.step()
    sim.step()
    assert decoding.num_output_tokens == 2 and low.num_computed_tokens == 5 + 7
    vip = add(sim, "vip", 12, priority=-1, max_tokens=4)
    out, _ = sim.step()
    assert [s.request for s in out.scheduled] == [vip]  # the whole budget
    assert out.num_scheduled_tokens == {"vip": 8}
    assert low.status == RequestStatus.RUNNING and low.num_computed_tokens == 12  # deferred, not preempted
    # The rest of the VIP's prompt: budget is left, but a step that computes an urgent prompt
    # computes no less urgent one; a less urgent decode may join it.
    out, _ = sim.step()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("vip", 4), ("decoding", 1)]
    out, _ = sim.step()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [
        ("vip", 1), ("decoding", 1), ("low", 6)]
    sim.run()
    assert sim.sched.num_preemptions == 0
    assert_reference_outputs(sim)


def test_victim_resumes_from_its_cached_blocks():
    bs = 4
    sim = priority_sim(num_blocks=64, block_size=bs, max_num_seqs=1)
    low = add(sim, "low", 21, priority=1, max_tokens=12)
    for _ in range(4):
        sim.step()  # the prompt and 3 tokens computed
    computed = low.num_computed_tokens
    add(sim, "vip", 5, priority=0, max_tokens=2)
    out, _ = sim.step()
    assert out.preempted == [low]
    sim.run()
    # Every full block of what low had computed came back from the prefix cache.
    assert sim.sched.num_recovered_tokens == computed // bs * bs > 0
    assert_reference_outputs(sim)
    check_drained(sim)


def test_urgent_request_takes_blocks_from_a_lower_priority_one():
    bs = 4
    sim = priority_sim(num_blocks=10, block_size=bs, max_num_seqs=4, max_model_len=40)
    low = add(sim, "low", 30, priority=2, max_tokens=4)  # 8 of the 10 blocks
    sim.step()
    vip = add(sim, "vip", 12, priority=1, max_tokens=2)  # needs 3 blocks
    out, _ = sim.step()
    assert out.preempted == [low] and [s.request for s in out.scheduled] == [vip]
    sim.run()
    assert_reference_outputs(sim)
    check_drained(sim)


def test_nothing_less_urgent_than_a_victim_is_admitted_in_its_step():
    bs = 4
    sim = priority_sim(num_blocks=10, block_size=bs, max_num_seqs=4, max_model_len=40)
    victim = add(sim, "victim", 30, priority=2, max_tokens=4)  # 8 of the 10 blocks
    sim.step()
    add(sim, "vip", 12, priority=0, max_tokens=2)
    small = add(sim, "small", 3, priority=3, max_tokens=2)  # would fit in what the victim freed
    out, _ = sim.step()
    assert out.preempted == [victim]
    assert small.status == RequestStatus.WAITING and [s.request.request_id for s in out.scheduled] == ["vip"]
    sim.run()
    assert_reference_outputs(sim)
    check_drained(sim)


def test_aging_admits_a_starving_request_within_the_bound():
    # One seat, a VIP in it at every step: without aging the low request would never run.
    aging = 5
    sim = priority_sim(num_blocks=64, max_num_seqs=1, aging_seconds=aging, aging_seats=1)
    low = add(sim, "low", 6, priority=3, max_tokens=3)
    vips = 0
    while low.first_scheduled_time is None:
        assert sim.steps < 100, "starved"
        if not any(r.priority < 3 for r in sim.sched.waiting):
            add(sim, f"vip{vips}", 4, priority=0, max_tokens=3)
            vips += 1
        sim.step()
    l_max = 4 + 3  # the longest request's tokens: one starving wait of a protected seat
    assert low.protected and sim.steps <= aging + l_max + 1
    sim.run()
    assert_reference_outputs(sim)


def test_without_aging_seats_low_priority_waits_while_urgent_work_exists():
    sim = priority_sim(num_blocks=64, max_num_seqs=1, aging_seconds=0, aging_seats=0)
    low = add(sim, "low", 6, priority=3, max_tokens=3)
    for i in range(30):
        if not any(r.priority < 3 for r in sim.sched.waiting):
            add(sim, f"vip{i}", 4, priority=0, max_tokens=3)
        sim.step()
    assert low.first_scheduled_time is None


# =====================================================================================
# Property tests: random mixes of priorities through the whole schedule/run/update loop


@st.composite
def priority_scenarios(draw, tight=False):
    sc = draw(scenarios(tight=tight))
    sc["policy"] = "continuous"
    sc["priorities"] = [draw(st.integers(-3, 3)) for _ in sc["groups"]]
    sc["aging_seconds"] = draw(st.integers(0, 40))
    # Aging's bound needs every protected request to fit at once.
    max_seats = min(sc["max_num_seqs"], sc["num_blocks"] // cdiv(sc["max_model_len"], sc["bs"]), 2)
    sc["aging_seats"] = draw(st.integers(0, max_seats))
    return sc


def run_priority_scenario(sc):
    spec = sc.get("spec")
    sim = Sim(sc["num_blocks"], sc["bs"], max_num_seqs=sc["max_num_seqs"], budget=sc["budget"],
              max_model_len=sc["max_model_len"], caching=sc["caching"],
              spec=None if spec is None else (spec[0], spec[1], random.Random(spec[2])),
              scheduling="priority", priority_aging_seconds=sc["aging_seconds"],
              priority_aging_seats=sc["aging_seats"])
    sched = sim.sched
    step = 0
    sched.clock = lambda: step
    # Every preemption made for a waiting request: who preempted whom.
    preemptions: list[tuple[bool, int, bool, int]] = []  # preemptor protected, priority; the victim's
    preempt_for = sched._preempt_for

    def spy(request, out):
        victim = sched._least_urgent_unscheduled(out)
        seen = (request.protected, request.priority, victim and victim.protected, victim and victim.priority)
        if preempt_for(request, out):
            preemptions.append(seen)
            return True
        return False
    sched._preempt_for = spy

    arrivals, group_reqs, aborts = scenario_requests(sc, arrival_time=lambda g, at: at,
                                                     priority=lambda g, at: sc["priorities"][g])
    aborted: set[str] = set()
    admitted_at: dict[str, int] = {}
    finished_at: dict[str, int] = {}
    mml = sc["max_model_len"]
    l_max = max(min(len(p) + pa["max_tokens"], mml) for p, pa, _, _ in sc["groups"])
    num_reqs = sum(n for _, _, n, _ in sc["groups"])
    last_arrival = max(arrivals)
    max_steps = last_arrival + sc["aging_seconds"] + (num_reqs + 1) * l_max * 2 + 10
    while step <= last_arrival or sched.has_unfinished_requests():
        assert step <= max_steps, "the simulation did not terminate"
        for reqs in arrivals.get(step, ()):
            for r in reqs:
                sim.add(r)
        for g in aborts.get(step, ()):
            for r in group_reqs[g]:
                if r.request_id in sched.requests:
                    assert sim.abort(r.request_id) is r
                    aborted.add(r.request_id)
        if not sched.has_unfinished_requests():
            step += 1
            continue
        waiting_before = list(sched.waiting)
        blocked = {r.request_id for r in waiting_before if r.leader is not None
                   and r.leader.request_id in sched.requests and not r.leader.is_prefilled}
        num_preemptions, num_for_priority = sched.num_preemptions, sched.num_priority_preemptions
        out, _ = sim.step()
        assert not out.is_empty, "nothing scheduled while requests are unfinished"
        for s in out.scheduled:
            admitted_at.setdefault(s.request.request_id, step)
        for r in sim.finished:
            finished_at.setdefault(r.request_id, step)
        # Priorities respected: unless memory ran short this step (then a running request may
        # preempt any less urgent one and admissions stop), no request is left waiting while a
        # request of strictly lower priority, or any unprotected one if it is protected, runs.
        memory_short = sched.num_preemptions - num_preemptions > sched.num_priority_preemptions - num_for_priority
        # A step that computes a prompt of priority p admits nothing less urgent than p (only
        # decodes of less urgent requests join it).
        prefills = [s.request.priority for s in out.scheduled if s.num_new_tokens - len(s.spec_token_ids) > 1]
        if not memory_short:
            ran = [s for s in out.scheduled if not s.request.protected]
            for w in sched.waiting:
                if w in waiting_before and w not in out.preempted and w.request_id not in blocked:
                    assert not (w.protected and ran), f"protected {w.request_id} waits"
                    isolated = prefills and w.priority > min(prefills)
                    assert all(s.request.priority <= w.priority or isolated and s.num_new_tokens == 1 + len(
                        s.spec_token_ids) for s in ran), f"{w.request_id} waits"
        step += 1
    check_drained(sim)
    for protected, priority, victim_protected, victim_priority in preemptions:
        assert not victim_protected
        assert protected or victim_priority > priority, "equal or more urgent preempted"
    for r in sim.all.values():
        if r.request_id in aborted:
            continue
        ref, status = reference_output(r.prompt_token_ids, r.sampling_params, mml)
        assert r.output_token_ids == ref and r.status == status
        if sc["aging_seats"]:
            # The documented bound (docs/server.md): finished within A + (S + 1) * L_max steps of
            # arriving, S the requests that arrived before it.
            ahead = sum(1 for o in sim.all.values() if (o.arrival_time, o.arrival_seq) < (r.arrival_time, r.arrival_seq))
            took = finished_at[r.request_id] - r.arrival_time
            assert admitted_at[r.request_id] <= finished_at[r.request_id]
            assert took <= sc["aging_seconds"] + (ahead + 1) * l_max, f"{r.request_id} took {took} steps"
    return sim


@PROPERTY_SETTINGS
@given(priority_scenarios())
def test_property_priority_mixes(sc):
    run_priority_scenario(sc)


@PROPERTY_SETTINGS
@given(priority_scenarios(tight=True))
def test_property_priority_preemption_heavy(sc):
    run_priority_scenario(sc)


# =====================================================================================
# The engine and the server, on the real default model


@pytest.mark.slow
def test_engine_serves_by_priority_with_unchanged_greedy_outputs():
    from thrifty import LLM

    kw = dict(dtype="float32", max_model_len=256, kv_cache_memory=0.02, max_num_seqs=2)
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,", "Once upon a time"]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    fcfs = LLM(**kw)
    with pytest.raises(ValueError, match="priority: 1 needs the priority scheduling policy"):
        fcfs.generate(prompts[:1], sp, use_tqdm=False, priority=[1])
    reference = [o.outputs[0].token_ids for o in fcfs.generate(prompts, sp, use_tqdm=False)]
    llm = LLM(scheduling_policy="priority", **kw)
    with pytest.raises(ValueError, match="priority: 2 given for 4 prompts"):
        llm.generate(prompts, sp, use_tqdm=False, priority=[0, 1])
    outs = llm.generate(prompts, sp, use_tqdm=False, priority=[3, 2, 1, -1])
    assert [o.outputs[0].token_ids for o in outs] == reference
    # Two seats: the two most urgent ran first.
    first = sorted(outs, key=lambda o: o.metrics.first_scheduled_time)
    assert [o.prompt for o in first[:2]] == [prompts[3], prompts[2]]
    assert outs[3].metrics.priority == -1


@pytest.fixture(scope="module")
def priority_server():
    from conftest import Server

    srv = Server("--scheduling-policy", "priority", "--max-num-seqs", "1", "--max-model-len", "512",
                 "--kv-cache-memory", "0.05", "--api-key", "vip=sk-vip:priority=-1", "--api-key",
                 "batch=sk-batch:priority=5", "--api-key", "sk-plain")
    yield srv
    assert srv.stop() == 0


@pytest.mark.slow
def test_server_urgent_request_preempts_and_both_answers_are_unchanged(priority_server):
    import openai
    from test_server import metrics

    # The keys' default priorities: vip -1, batch 5.
    url = f"{priority_server.url}/v1"
    batch = openai.OpenAI(base_url=url, api_key="sk-batch", max_retries=0)
    vip = openai.OpenAI(base_url=url, api_key="sk-vip", max_retries=0)
    low = dict(prompt="Once upon a time, in a small village by the sea, there lived", max_tokens=120,
               temperature=0, extra_body={"ignore_eos": True})
    urgent = dict(prompt="The capital of France is", max_tokens=8, temperature=0)
    model = vip.models.list().data[0].id
    alone_low = batch.completions.create(model=model, **low).choices[0].text
    alone_vip = vip.completions.create(model=model, **urgent).choices[0].text
    before = metrics(priority_server)
    # One seat: the low request is mid-stream when the urgent one arrives and takes its seat.
    stream = iter(batch.completions.create(model=model, stream=True, **low))
    first = next(stream).choices[0].text
    assert vip.completions.create(model=model, **urgent).choices[0].text == alone_vip
    assert first + "".join(c.choices[0].text for c in stream) == alone_low
    after = metrics(priority_server)
    assert after["thrifty:priority_preemptions_total"] == before["thrifty:priority_preemptions_total"] + 1
    assert after["thrifty:preemption_recovered_tokens_total"] > before["thrifty:preemption_recovered_tokens_total"]
    for cls in ("-1", "5"):
        assert after[f"thrifty:time_to_first_token_seconds_by_priority_count{{priority_class={cls}}}"] == 2
        assert after[f"thrifty:request_queue_time_seconds_by_priority_count{{priority_class={cls}}}"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("priority, words", [(True, "integer"), ("high", "integer"), (1 << 63, "less than")])
def test_server_bad_priority_is_a_400(priority_server, priority, words):
    from test_server import http

    r = http(priority_server, "POST", "/v1/completions", key="sk-plain", json={"prompt": "hi", "priority": priority})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority" and words in r.text


@pytest.mark.slow
def test_server_a_key_caps_how_urgent_its_requests_may_be(priority_server):
    from test_server import http, metrics

    def count(cls: str) -> float:
        return metrics(priority_server).get(
            f"thrifty:time_to_first_token_seconds_by_priority_count{{priority_class={cls}}}", 0)

    before = {cls: count(cls) for cls in ("-3", "5", "7", "2")}
    body = {"prompt": "hi", "max_tokens": 1}
    for key, priority in (("sk-batch", -3), ("sk-batch", 7), ("sk-plain", -3), ("sk-plain", 2)):
        assert http(priority_server, "POST", "/v1/completions", key=key,
                    json={**body, "priority": priority}).status_code == 200
    # batch (5) asking for -3 is served at 5; asking for 7 (less urgent) is allowed; a key
    # without a priority takes the request's.
    assert {cls: count(cls) - before[cls] for cls in before} == {"-3": 1, "5": 1, "7": 1, "2": 1}
