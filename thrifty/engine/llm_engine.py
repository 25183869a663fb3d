"""LLMEngine: the synchronous step loop (schedule -> run the model -> update outputs)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from thrifty.config import EngineConfig
from thrifty.core.kv_cache_manager import KVCacheManager
from thrifty.core.ngram_proposer import NgramProposer
from thrifty.core.request import DRAFT_PENDING, Request, RequestStatus
from thrifty.core.scheduler import Scheduler, SchedulerConfig, SchedulerStats, SpecDecodeStats
from thrifty.core.spec_controller import SpecController
from thrifty.engine.detokenizer import IncrementalDetokenizer
from thrifty.engine.sleep import SleepResult, check_level, memory_in_use, release_freed_memory
from thrifty.model.llama import LlamaForCausalLM
from thrifty.model.config import ModelArchConfig
from thrifty.model.loader import load_hf_config, load_model, load_tokenizer, resolve_model
from thrifty.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from thrifty.sampling_params import SamplingParams
from thrifty.structured_output import StructuredOutputManager
from thrifty.worker.drafter import DraftTimes
from thrifty.worker.model_runner import ModelRunner, SampledToken, kv_budget_bytes, num_kv_blocks
from thrifty.worker.paged_model import kv_bytes_per_token

PromptType = str | dict | list[int]
# The cost-aware switch's start-up table: requests' cached tokens, and the largest batch timed.
CALIBRATION_CONTEXT = 128
CALIBRATION_MAX_BATCH = 32


@dataclass
class IterationStats:
    """What one step did, for the server's cost meter and metrics."""

    num_tokens_by_request: dict[str, int]  # tokens computed, by request id (n > 1 siblings summed)


class StepFailed(RuntimeError):
    """The model failed on one step; its requests were aborted, the engine is consistent."""

    def __init__(self, request_ids: list[str], stats: IterationStats, cause: Exception):
        super().__init__(f"the model step failed ({cause!r}); aborted requests {request_ids}")
        self.request_ids = request_ids
        self.stats = stats


def _logprob_entry(decode, token_id: int, logprob: float, top: list[tuple[int, float]] | None,
                   rank: int | None = None) -> dict[int, Logprob]:
    """One position's logprobs as vLLM gives them: the chosen token first (its rank as given, else
    its place among the top ones, if there), then the top ones with their ranks."""
    entry = {token_id: Logprob(logprob, rank, decode(token_id))}
    for r, (tid, lp) in enumerate(top or (), start=1):
        if tid != token_id:
            entry[tid] = Logprob(lp, r, decode(tid))
        elif rank is None:
            entry[tid].rank = r
    return entry


@dataclass
class _Sequence:
    """Output-side state of one sampled sequence (one of a request's n)."""

    request: Request
    detok: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float = 0.0


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[_Sequence]
    metrics: RequestMetrics
    num_unfinished: int = 0
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # SamplingParams.prompt_logprobs


@dataclass
class EngineStats:
    """Counters for benchmarks and metrics."""

    num_steps: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    kv_blocks_peak: int = 0
    kv_slots_allocated: int = 0  # summed over steps: slots held by running requests
    kv_slots_used: int = 0  # summed over steps: of those, slots holding a computed token
    max_step_tokens: int = 0  # the most tokens any one step computed

    @property
    def kv_waste_frac(self) -> float:
        return 1.0 - self.kv_slots_used / self.kv_slots_allocated if self.kv_slots_allocated else 0.0


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        device = torch.device(config.resolve_device())
        self.dtype = config.resolve_dtype(device.type)
        if device.type == "cpu":
            torch.set_num_threads(config.resolve_num_threads())
        self.device = device
        self.source = resolve_model(config.model, config.load_format)
        self.model_name = self.source.name
        model = self._load_target()
        cfg = model.config
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds the model's context length "
                             f"({cfg.max_position_embeddings})")
        self.tokenizer = load_tokenizer(self.source)
        self.spec = config.speculative
        draft = self._load_draft(model)
        skip = self.spec is not None and self.spec.method == "layer_skip"
        # (checked here, before the KV budget, so a bad layer count is the error a user sees)
        self.draft_layers = self.spec.draft_layers(cfg.num_hidden_layers) if skip else None
        budget = kv_budget_bytes(device, config.kv_cache_memory, config.gpu_memory_utilization)
        bytes_per_token = sum(kv_bytes_per_token(m, self.dtype, config.kv_cache_dtype) for m in (model, draft) if m)
        num_blocks = num_kv_blocks(bytes_per_token, config.block_size, budget)
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"kv_cache_memory: {budget / (1 << 30):.4g} GiB holds {num_blocks * config.block_size} tokens, "
                f"fewer than one full-length request (max_model_len={self.max_model_len}); "
                f"raise kv_cache_memory or lower max_model_len"
            )
        seats = config.priority_aging_seats if config.scheduling_policy == "priority" else 0
        if seats * -(-self.max_model_len // config.block_size) > num_blocks:
            # Aging's bound holds only if every protected request can hold its whole length at once.
            raise ValueError(f"priority_aging_seats: {seats} full-length requests (max_model_len="
                             f"{self.max_model_len}) do not fit in the KV cache's {num_blocks * config.block_size} "
                             f"tokens; lower it or max_model_len, or raise kv_cache_memory")
        self.kv_cache_manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len,
                            config.scheduler_policy, config.scheduling_policy, config.priority_aging_seconds,
                            config.priority_aging_seats),
            self.kv_cache_manager,
        )
        self.vocab_size = cfg.vocab_size
        self.eos_token_ids = frozenset(cfg.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        )
        self.structured = StructuredOutputManager(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.num_kv_blocks = num_blocks
        self.runner = self._build_runner(model, draft)
        self.sleep_level = 0  # 0: awake; else the level of the sleep it is in (sleep mode)
        self.stats = EngineStats()
        self.proposer = (NgramProposer(self.spec.prompt_lookup_min, self.spec.prompt_lookup_max)
                         if self.spec is not None and self.spec.method == "ngram" else None)
        self.controller = SpecController(self.spec.num_speculative_tokens if self.spec else 0,
                                         always=self.spec is not None and self.spec.switch == "always")
        if self.spec is not None and not self.controller.always:
            self._calibrate_switch()
        self._states: dict[str, _RequestState] = {}
        self._seq_parent: dict[str, _RequestState] = {}
        self._ids = itertools.count()

    def _calibrate_switch(self) -> None:
        """The cost-aware switch's table of step times (spec_controller.py): forwards of 1, 2, 4 ..
        requests (up to max_num_seqs, at most CALIBRATION_MAX_BATCH) computing 1, 2 and k + 1
        tokens each, one draft forward of as many tokens for a model draft, and a draft model's
        prefill (what catching up costs): about a hundred forwards at start-up (a second or two
        for the default model); the engine's own steps then scale it. (Not for switch
        "always": it predicts nothing, and its saved-time gauges stay at 0.)"""
        k = self.spec.num_speculative_tokens
        context = max(1, min(CALIBRATION_CONTEXT, self.max_model_len - k - 1))
        b = 1
        fits = True
        while fits and b <= min(self.config.max_num_seqs, CALIBRATION_MAX_BATCH):
            for q in sorted({1, 2, k + 1}):
                if b * q > self.config.max_num_batched_tokens:
                    continue
                seconds = self.runner.time_forward(b, q, context)
                if seconds is None:  # the KV blocks hold no more: the smaller batch sizes will do
                    fits = False
                    break
                draft = self.runner.time_forward(b, 1, context, draft=True) if (
                    q == 1 and self.runner.drafter is not None) else None
                self.controller.calibrate(b, q, seconds, draft)
            b *= 2
        if self.runner.drafter is not None and self.runner.drafter.own_cache:
            seconds = self.runner.time_forward(1, context, 0, draft=True, logits=False)
            if seconds is not None:
                self.controller.calibrate_catch_up(seconds / context)

    def _load_target(self) -> LlamaForCausalLM:
        config = self.config
        return load_model(self.source, self.dtype, self.device, config.seed, config.quantization,
                          config.quantization_group_size)

    def _build_runner(self, model: LlamaForCausalLM, draft: LlamaForCausalLM | None) -> ModelRunner:
        config = self.config
        return ModelRunner(model, self.device, self.dtype, config.block_size, self.num_kv_blocks, self.max_model_len,
                           config.max_num_seqs, config.seed, config.backend, config.kv_cache_dtype,
                           draft_model=draft, draft_layers=self.draft_layers,
                           max_batched_tokens=config.max_num_batched_tokens, structured=self.structured)

    def _load_draft(self, target: LlamaForCausalLM) -> LlamaForCausalLM | None:
        """The draft model of speculative_config (None without one), checked against the target
        (from its config.json before its weights are read, where it has one)."""
        if self.spec is None or self.spec.method != "draft_model":
            return None
        config = self.config
        device = self.device
        try:
            source = resolve_model(self.spec.model)
        except ValueError as e:
            raise ValueError(f"speculative_config: draft {e}") from None
        if source.kind != "gguf":
            self._check_draft(ModelArchConfig.from_hf(load_hf_config(source)), target.config)
        draft = load_model(source, self.dtype, device, config.seed, self.spec.quantization or config.quantization,
                           config.quantization_group_size)
        self._check_draft(draft.config, target.config)
        if load_tokenizer(source).get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"speculative_config: the draft model {self.spec.model!r} has another tokenizer than "
                             "the target (same size, different tokens): a draft must share the target's vocabulary")
        return draft

    def _check_draft(self, cfg: ModelArchConfig, target: ModelArchConfig) -> None:
        """The same vocabulary (proposals are the target's token ids), no bigger, long enough."""
        path = self.spec.model
        if cfg.vocab_size != target.vocab_size:
            raise ValueError(f"speculative_config: the draft model {path!r} has a vocabulary of {cfg.vocab_size} "
                             f"tokens, the target {target.vocab_size}: a draft must share the target's vocabulary")
        if cfg.num_params > target.num_params:
            raise ValueError(f"speculative_config: the draft model {path!r} ({cfg.num_params / 1e6:.1f}M "
                             f"parameters) is bigger than the target ({target.num_params / 1e6:.1f}M): it would "
                             "cost more than it saves")
        if cfg.max_position_embeddings < self.max_model_len:
            raise ValueError(f"speculative_config: the draft model {path!r} handles {cfg.max_position_embeddings} "
                             f"positions, fewer than max_model_len ({self.max_model_len}); lower max_model_len")

    # -- requests -------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenize_prompt(prompt["prompt"])
            raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"prompt: expected a string, a token id list or a dict, got {type(prompt).__name__}")

    def validate(self, prompt_token_ids: list[int]) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt: empty prompt (it has no tokens)")
        if n >= self.max_model_len:
            raise ValueError(f"prompt: {n} tokens, longer than the context allows (max_model_len="
                             f"{self.max_model_len}, which must also leave room for one generated token)")
        self.check_vocab(prompt_token_ids, "prompt_token_ids")

    def check_vocab(self, token_ids: list[int], field: str) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{field}: {bad[0]} is outside the vocabulary (size {self.vocab_size})")

    def add_request(self, prompt: PromptType, params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None, priority: int = 0) -> str:
        params = params or SamplingParams()
        self.check_priority(priority)
        text, ids = self.tokenize_prompt(prompt)
        self.validate(ids)
        request_id = request_id if request_id is not None else str(next(self._ids))
        seq_ids = [request_id] if params.n == 1 else [f"{i}_{request_id}" for i in range(params.n)]
        if request_id in self._states or any(i in self._seq_parent for i in seq_ids):
            raise ValueError(f"request_id {request_id!r} is already in use")
        if params.structured_outputs is not None:  # (a hit when the server compiled it already)
            self.structured.compile(params.structured_outputs)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        state = _RequestState(request_id, text, ids, [], RequestMetrics(arrival, priority=priority), params.n,
                              [None] * len(ids) if params.prompt_logprobs is not None else None)
        leader = None
        for i in range(params.n):
            child_params = params.clone()
            child_params.n = 1
            if params.seed is not None:
                child_params.seed = params.seed + i  # siblings must not repeat each other
            if i > 0:  # the leader computes the prompt's logprobs; its siblings hit its KV
                child_params.prompt_logprobs = None
            child_params.all_stop_token_ids = set(self.eos_token_ids)
            seq_id = seq_ids[i]
            req = Request(seq_id, ids, child_params, self.eos_token_ids, arrival,
                          cache_salt=self._cache_salt(request_id, seq_id, params.n), leader=leader,
                          priority=priority)
            leader = leader or (req if params.n > 1 else None)
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens, params.stop,
                                           params.include_stop_str_in_output)
            state.seqs.append(_Sequence(req, detok, [] if params.logprobs is not None else None))
            self._seq_parent[seq_id] = state
        self._states[request_id] = state
        for seq in state.seqs:
            self.scheduler.add_request(seq.request)
        return request_id

    def check_priority(self, priority: int) -> None:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority: must be an integer, got {priority!r}")
        if priority and self.config.scheduling_policy != "priority":
            raise ValueError(f"priority: {priority} needs the priority scheduling policy (--scheduling-policy "
                             f"priority); under fcfs every request has priority 0")

    def _cache_salt(self, request_id: str, seq_id: str, n: int) -> str | None:
        # n > 1: the siblings share prompt blocks even with prefix caching off. Priority scheduling
        # with caching off: a request's own blocks stay findable by itself alone, so a preempted
        # request resumes from them instead of recomputing everything.
        if n > 1:
            return request_id
        if self.config.scheduling_policy == "priority" and not self.config.enable_prefix_caching:
            return seq_id
        return None

    def abort_request(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is None:
            return
        for seq in state.seqs:
            self.scheduler.finish_request(seq.request.request_id, RequestStatus.FINISHED_ABORTED)
            self._forget(seq.request.request_id)

    def unfinished_request_ids(self) -> list[str]:
        return list(self._states)

    def reset_stats(self) -> None:
        self.stats = EngineStats()
        self.scheduler.num_preemptions = 0
        self.scheduler.spec_stats = SpecDecodeStats()

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache's entries for blocks no request holds (vLLM's name)."""
        self.kv_cache_manager.pool.reset_prefix_cache()
        return True

    # -- sleep mode (vLLM's LLM.sleep / wake_up) -------------------------------------------
    @property
    def is_sleeping(self) -> bool:
        return self.sleep_level > 0

    def sleep(self, level: int = 1) -> SleepResult:
        """Frees memory while no request is in flight. Level 1 frees the KV caches (the
        target's and a draft model's) and the native kernels' workspaces, and on CUDA moves the
        weights to host memory; on a CPU the weights already are host memory and stay. Level 2
        also discards the weights (the model runner, native model and torch module), which
        wake_up reloads from the model path with the same arguments and seed. The prefix cache
        is emptied either way. Returns the memory released, measured: the resident set on a
        CPU, device memory on CUDA. Sleeping deeper (1, then 2) discards the rest."""
        if not self.config.enable_sleep_mode:
            raise ValueError("sleep: sleep mode is not enabled (enable_sleep_mode=True, --enable-sleep-mode)")
        check_level(level)
        unfinished = self.scheduler.num_waiting + self.scheduler.num_running
        if unfinished:
            raise RuntimeError(f"sleep: {unfinished} requests are unfinished; finish or abort them first")
        start = time.perf_counter()
        before = memory_in_use(self.device)
        if level == 2:
            self.runner = None  # its KV caches, weights and drafter with it
        elif self.sleep_level == 0:
            self.runner.sleep()
        self.kv_cache_manager.pool.reset_prefix_cache()  # what the blocks held is gone
        release_freed_memory(self.device)
        after = memory_in_use(self.device)
        self.sleep_level = max(self.sleep_level, level)
        return SleepResult(self.sleep_level, before - after, time.perf_counter() - start, before, after)

    def wake_up(self) -> float:
        """Undoes sleep(): the KV caches again (empty), the weights back or reloaded. Returns
        the seconds it took (0 when awake already)."""
        if self.sleep_level == 0:
            return 0.0
        start = time.perf_counter()
        if self.runner is None:
            model = self._load_target()
            self.runner = self._build_runner(model, self._load_draft(model))
            del model
            release_freed_memory(self.device)  # what loading took and left (the file's tensors, unpacked)
        else:
            self.runner.wake_up()
        self.sleep_level = 0
        return time.perf_counter() - start

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def make_stats(self) -> SchedulerStats:
        return self.scheduler.make_stats()

    def num_waiting_requests(self) -> int:
        return self.scheduler.num_waiting

    def num_waiting_ahead_of(self, priority: int) -> int:
        return self.scheduler.num_waiting_ahead_of(priority)

    def num_running_requests(self) -> int:
        return self.scheduler.num_running

    # -- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        return self.step_with_stats()[0]

    def step_with_stats(self) -> tuple[list[RequestOutput], IterationStats]:
        if self.sleep_level:
            raise RuntimeError("the engine is asleep: wake_up() first")
        start = time.perf_counter()
        out = self.scheduler.schedule()
        stats = IterationStats(self._tokens_by_request(out))
        if out.is_empty:
            return [], stats
        try:
            sampled = self.runner.execute(out)
        except Exception as e:
            # Only this step's requests are lost: free them so the engine can go on serving the
            # rest, and take back the prefix-cache entries of the KV the step never computed.
            self.kv_cache_manager.uncache_step()
            failed = list(stats.num_tokens_by_request)  # the step's requests, n > 1 siblings under one id
            for request_id in failed:
                self.abort_request(request_id)
            raise StepFailed(failed, stats, e) from e
        self._count_tokens(out)
        for req_id, entries in self.runner.prompt_logprobs.items():
            state = self._seq_parent.get(req_id)
            if state is not None:
                self._record_prompt_logprobs(state, entries)
        num_before = {s.request.request_id: s.request.num_output_tokens for s in out.scheduled}
        decode_only = all(s.num_new_tokens == 1 + len(s.spec_token_ids) and s.samples for s in out.scheduled)
        self.scheduler.update_from_output(out, {rid: [t.token_id for t in ts] for rid, ts in sampled.items()})
        now = time.monotonic()
        self._record_kv_usage(self.scheduler.make_stats())
        touched: dict[str, _RequestState] = {}
        num_sampled = 0
        for s in out.scheduled:
            req = s.request
            state = self._seq_parent.get(req.request_id)
            if state is None:
                continue
            if state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = req.first_scheduled_time
            tokens = sampled.get(req.request_id)
            if tokens:
                # The scheduler keeps the tokens up to a stop token or the length limit.
                first = num_before[req.request_id]
                kept = tokens[:req.num_output_tokens - first]
                num_sampled += self._process_tokens(state, req, kept, first, now)
                touched[state.request_id] = state
        self.stats.num_generation_tokens += num_sampled
        if self.spec is not None:
            verified = [(len(s.spec_token_ids), len(sampled.get(s.request.request_id, [])) - 1)
                        for s in out.scheduled if s.spec_token_ids]
            draft = self.runner.drafter.last if self.runner.drafter is not None else DraftTimes()
            self.controller.observe(len(out.scheduled), sum(s.num_new_tokens for s in out.scheduled),
                                    time.perf_counter() - start, num_sampled, verified, draft.seconds,
                                    draft.decode_seconds, draft.forwards, decode=decode_only)
            self._propose()
        return [self._make_output(state) for state in touched.values()], stats

    def _propose(self) -> None:
        """Proposals for the next step, for each request that is up to date: the n-gram
        proposer's now, or a draft's slots, filled by the model runner within the step; as
        many as the cost-aware switch chooses (up to k)."""
        k = self.spec.num_speculative_tokens
        ready = []
        for req in self.scheduler.running:
            if req.num_tokens - req.num_computed_tokens != 1:
                continue
            # Every proposal accepted plus the bonus token must fit max_tokens and the context.
            room = min(k, req.max_tokens - req.num_output_tokens - 1, self.max_model_len - req.num_tokens - 1)
            req.spec_token_ids = (self.proposer.propose(req, room) if self.proposer is not None
                                  else [DRAFT_PENDING] * max(0, room))
            ready.append(req)
        drafter = self.runner.drafter
        behind = drafter.tokens_behind({r.request_id: r.num_computed_tokens for r in ready}) if drafter else 0
        chosen = self.controller.choose([len(r.spec_token_ids) for r in ready]
                                        + [0] * (self.scheduler.num_running - len(ready)), behind)
        for req in ready:
            del req.spec_token_ids[chosen:]

    def _tokens_by_request(self, out) -> dict[str, int]:
        tokens: dict[str, int] = {}
        for s in out.scheduled:
            state = self._seq_parent.get(s.request.request_id)
            if state is not None:  # n > 1 siblings add up under their request
                tokens[state.request_id] = tokens.get(state.request_id, 0) + s.num_new_tokens
        return tokens

    def _process_tokens(self, state: _RequestState, req: Request, tokens: list[SampledToken], first: int,
                        now: float) -> int:
        """The step's tokens of one sequence (several when it verified proposals), which are its
        outputs from index `first` on. Returns how many it keeps (a stop string ends it early)."""
        seq = next(q for q in state.seqs if q.request is req)
        metrics = state.metrics
        metrics.first_token_time = metrics.first_token_time or now
        metrics.last_token_time = now
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1  # the scheduler's stop rules end a request at its last kept token
            seq.cumulative_logprob += token.logprob
            if seq.logprobs is not None:
                seq.logprobs.append(_logprob_entry(seq.detok.decode_token, token.token_id, token.logprob,
                                                   token.top_logprobs))
            # A stop token (EOS or stop_token_ids) ends the text without adding its own.
            stopped_by_token = last and req.status == RequestStatus.FINISHED_STOPPED
            stop = None
            if not stopped_by_token or req.sampling_params.include_stop_str_in_output:
                stop = seq.detok.add_token(token.token_id)
            if stop is not None and not req.is_finished:
                req.stop_reason = stop
                self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
                del req.output_token_ids[first + i + 1:]  # tokens verified past the stop string
                last = True
            if last:
                if req.is_finished:
                    self._finished(state, req, now)
                return i + 1
        return 0  # no token

    def _finished(self, state: _RequestState, req: Request, now: float) -> None:
        self._forget(req.request_id)
        state.num_unfinished -= 1
        if state.num_unfinished == 0:
            state.metrics.finished_time = now
            self._states.pop(state.request_id, None)

    def _record_prompt_logprobs(self, state: _RequestState, entries: list) -> None:
        decode = state.seqs[0].detok.decode_token
        for position, token_id, logprob, rank, top in entries:
            state.prompt_logprobs[position] = _logprob_entry(decode, token_id, logprob, top, rank)

    def _forget(self, seq_id: str) -> None:
        self._seq_parent.pop(seq_id, None)  # the runner forgets it once the scheduler frees it
        if self.proposer is not None:
            self.proposer.forget(seq_id)

    def _make_output(self, state: _RequestState) -> RequestOutput:
        outputs = [
            CompletionOutput(i, seq.detok.stable_text(seq.request.is_finished), seq.request.output_token_ids,
                             seq.cumulative_logprob,
                             seq.logprobs, seq.request.status.finish_reason, seq.request.stop_reason)
            for i, seq in enumerate(state.seqs)
        ]
        leader = state.seqs[0].request
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, outputs,
                             state.num_unfinished == 0, state.metrics, max(leader.num_cached_tokens, 0),
                             prompt_logprobs=None if state.prompt_logprobs is None else list(state.prompt_logprobs))

    def _count_tokens(self, out) -> None:
        st = self.stats
        st.num_steps += 1
        st.max_step_tokens = max(st.max_step_tokens, out.total_num_scheduled_tokens)
        for s in out.scheduled:
            prompt_left = s.request.num_prompt_tokens - s.request.num_computed_tokens
            st.num_prompt_tokens += max(0, min(prompt_left, s.num_new_tokens))

    def _record_kv_usage(self, sched: SchedulerStats) -> None:
        st = self.stats
        st.kv_blocks_peak = max(st.kv_blocks_peak, sched.kv_blocks_used)
        st.kv_slots_allocated += sched.kv_slots_allocated
        st.kv_slots_used += sched.kv_slots_used
