"""Prometheus metrics under vLLM's names (and a `model_name` label), so vLLM dashboards work.

Per-request latencies and token counts are observed from the deltas each engine step hands
out; queue lengths, KV usage, preemptions and prefix-cache counters are read from the engine
when Prometheus scrapes.
"""

from __future__ import annotations

import time

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from thrifty.cost.prices import PriceChoice
from thrifty.engine.async_llm import AsyncLLM, StepObservation
from thrifty.engine.sleep import SLEEP_STATE_NAMES, SleepResult

prometheus_client.disable_created_metrics()

# vLLM's buckets, so histograms line up on shared dashboards.
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0]
_REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0]
_ITERATION_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
_SLEEP_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0]


class _EngineStateCollector:
    """Values the engine already keeps, read at scrape time."""

    def __init__(self, llm: AsyncLLM, model_name: str, price: PriceChoice | None = None):
        self.llm = llm
        self.model_name = model_name
        self.price = price

    def collect(self):
        llm = self.llm
        stats = llm.engine.make_stats()
        rows = [
            (GaugeMetricFamily, "vllm:num_requests_running", "Number of requests in model execution batches.",
             llm.num_running),
            (GaugeMetricFamily, "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
             llm.num_waiting),
            (GaugeMetricFamily, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
             stats.kv_cache_usage),
            (CounterMetricFamily, "vllm:num_preemptions", "Cumulative number of preemptions from the engine.",
             stats.num_preemptions),
            (CounterMetricFamily, "thrifty:priority_preemptions",
             "Preemptions made for a more urgent waiting request (priority scheduling); also in vllm:num_preemptions.",
             stats.num_priority_preemptions),
            (CounterMetricFamily, "thrifty:preemption_recovered_tokens",
             "Tokens preempted requests found in the prefix cache when re-admitted (work a preemption did not lose).",
             stats.num_recovered_tokens),
            (CounterMetricFamily, "vllm:prefix_cache_queries",
             "Prefix cache queries, in terms of number of queried tokens.", stats.prefix_cache_queries),
            (CounterMetricFamily, "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
             stats.prefix_cache_hits),
            *self._cost(time.monotonic()),
            (CounterMetricFamily, "thrifty:structured_output_compile_seconds",
             "CPU seconds spent compiling structured-output grammars (a cached grammar costs none).",
             llm.engine.structured.compile_seconds),
            (CounterMetricFamily, "thrifty:structured_output_mask_seconds",
             "Seconds the engine spent filling structured-output token masks.", llm.engine.structured.mask_seconds),
        ]
        if self.price is not None:
            yield self._price_info()
        if llm.engine.config.enable_sleep_mode:
            rows += self._sleep()
            yield self._sleep_state()
        if llm.engine.spec is not None:
            rows += self._spec()
            yield self._accepted_per_pos()
        for family, name, doc, value in rows:
            m = family(name, doc, labels=["model_name"])
            m.add_metric([self.model_name], value)
            yield m

    def _spec(self) -> list[tuple]:
        """vLLM's speculative-decoding counters, and thrifty's switch state and savings (gauges: an
        estimate, revised as the measurements are, so it may go down)."""
        spec, controller = self.llm.engine.scheduler.spec_stats, self.llm.engine.controller
        return [
            (CounterMetricFamily, "vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", spec.num_drafts),
            (CounterMetricFamily, "vllm:spec_decode_num_draft_tokens", "Number of draft tokens.",
             spec.num_draft_tokens),
            (CounterMetricFamily, "vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.",
             spec.num_accepted_tokens),
            (GaugeMetricFamily, "thrifty:spec_decode_enabled", "1 while the cost-aware switch has speculation on, "
             "else 0.", 1.0 if controller.enabled else 0.0),
            (GaugeMetricFamily, "thrifty:spec_decode_num_speculative_tokens", "Proposals per request the "
             "cost-aware switch chose for the last step (0 to num_speculative_tokens).", controller.last_k),
            (GaugeMetricFamily, "thrifty:spec_decode_saved_seconds", "Engine time speculation saved so far: tokens "
             "of steps with proposals x the switch's predicted seconds per token without, minus the steps' time.",
             controller.saved_seconds),
            (GaugeMetricFamily, "thrifty:spec_decode_saved_usd", "thrifty:spec_decode_saved_seconds x price.",
             controller.saved_seconds * self.llm.cost.price_per_s),
        ]

    def _accepted_per_pos(self) -> CounterMetricFamily:
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                      "Accepted tokens per draft position.", labels=["model_name", "position"])
        for position, value in enumerate(self.llm.engine.scheduler.spec_stats.accepted_per_pos):
            per_pos.add_metric([self.model_name, str(position)], value)
        return per_pos

    def _price_info(self) -> GaugeMetricFamily:
        """Where thrifty:price_per_hour_usd came from, as vLLM's *_info gauges carry facts: 1, with labels."""
        price = self.price
        info = GaugeMetricFamily("thrifty:price_info", "Where the price per hour comes from: source is flag "
                                 "(--price-per-hour), table (the GPU's price table entry), estimate (a CPU "
                                 "instance of the price table scaled to this server's vCPUs) or off.",
                                 labels=["model_name", "source", "entry", "detail"])
        info.add_metric([self.model_name, price.source, price.entry, price.detail], 1.0)
        return info

    def _sleep(self) -> list[tuple]:
        llm = self.llm
        return [
            (GaugeMetricFamily, "thrifty:sleeping", "The engine's sleep level: 0 awake, 1 or 2 asleep.",
             llm.engine.sleep_level),
            (CounterMetricFamily, "thrifty:requests_refused_asleep",
             "Requests refused with 503 because the engine was asleep.", llm.num_refused_asleep),
        ]

    def _sleep_state(self) -> GaugeMetricFamily:
        """vLLM's gauge: 1 for the state the engine is in (level 1 is named weights_offloaded,
        though on a CPU the weights stay where they are)."""
        state = GaugeMetricFamily("vllm:engine_sleep_state", "Engine sleep state.",
                                  labels=["model_name", "sleep_state"])
        for level, name in SLEEP_STATE_NAMES.items():
            state.add_metric([self.model_name, name], float(self.llm.engine.sleep_level == level))
        return state

    def _cost(self, now: float) -> list[tuple]:
        cost = self.llm.cost
        return [
            (CounterMetricFamily, "thrifty:cost_usd", "Busy time x price, charged to the requests that ran.",
             cost.busy_cost_usd),
            (CounterMetricFamily, "thrifty:unbilled_cost_usd",
             "Part of thrifty:cost_usd charged to requests that ended without a response (aborted, failed).",
             cost.unbilled_cost_usd),
            (CounterMetricFamily, "thrifty:idle_cost_usd", "Time awake with nothing to run x price.",
             cost.idle_cost_usd(now)),
            (CounterMetricFamily, "thrifty:busy_seconds", "Seconds the engine had requests to run.", cost.busy_s),
            (CounterMetricFamily, "thrifty:idle_seconds", "Seconds the engine was awake with nothing to run.",
             cost.idle_seconds(now)),
            (CounterMetricFamily, "thrifty:asleep_seconds", "Seconds the engine was asleep (sleep mode; waking "
             "included): busy + idle + asleep seconds = the server's life.", cost.asleep_seconds(now)),
            (CounterMetricFamily, "thrifty:asleep_cost_usd", "Time asleep x price: the instance is billed asleep too.",
             cost.asleep_cost_usd(now)),
            (GaugeMetricFamily, "thrifty:cost_per_million_tokens_usd",
             f"All cost (idle included) per million tokens computed, over the last {cost.window_s:g} s.",
             cost.cost_per_million_tokens(now)),
            (GaugeMetricFamily, "thrifty:busy_ratio",
             f"Fraction of the last {cost.window_s:g} s the engine had requests to run.", cost.busy_ratio(now)),
            (GaugeMetricFamily, "thrifty:price_per_hour_usd", "The price per hour costs are computed with.",
             cost.price_per_hour),
        ]


class EngineMetrics:
    def __init__(self, llm: AsyncLLM, model_name: str, price: PriceChoice | None = None):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStateCollector(llm, model_name, price))
        labels = ["model_name"]

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels + list(extra), registry=self.registry)

        def histogram(name: str, doc: str, buckets: list[float], extra: tuple[str, ...] = ()) -> Histogram:
            h = Histogram(name, doc, labels + list(extra), buckets=buckets, registry=self.registry)
            return h if extra else h.labels(model_name)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.").labels(model_name)
        self.generation_tokens = counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.").labels(model_name)
        self.prompt_tokens_cached = counter("vllm:prompt_tokens_cached",
                                            "Number of cached prompt tokens (prefix-cache hits).").labels(model_name)
        self._success = counter("vllm:request_success", "Count of successfully processed requests.",
                                ("finished_reason",))
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              _TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             _ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             _REQUEST_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.", _REQUEST_BUCKETS)
        # Priority scheduling's service levels: the same latencies, by priority class.
        self.ttft_by_priority = histogram("thrifty:time_to_first_token_seconds_by_priority",
                                          "Time to first token in seconds, by request priority.", _TTFT_BUCKETS,
                                          ("priority_class",))
        self.queue_time_by_priority = histogram("thrifty:request_queue_time_seconds_by_priority",
                                                "Time spent waiting before first scheduled, by request priority.",
                                                _REQUEST_BUCKETS, ("priority_class",))
        self.iteration_tokens = histogram("vllm:iteration_tokens_total",
                                          "Histogram of number of tokens per engine_step.", _ITERATION_BUCKETS)
        # Per API-key name (--api-key NAME=KEY), so a platform can bill its tenants.
        self.key_prompt_tokens = counter("thrifty:key_prompt_tokens", "Prompt tokens by API key name.", ("key_name",))
        self.key_generation_tokens = counter("thrifty:key_generation_tokens", "Generated tokens by API key name.",
                                             ("key_name",))
        self.key_cost = counter("thrifty:key_cost_usd", "Cost charged to requests, by API key name.", ("key_name",))
        self.model_name = model_name
        self._last_token_time: dict[str, float] = {}
        llm.step_observers.append(self.observe_step)
        llm.end_observers.append(self.observe_end)
        # Sleep mode; and the process's memory (process_resident_memory_bytes), which sleep releases.
        prometheus_client.ProcessCollector(registry=self.registry)
        if llm.engine.config.enable_sleep_mode:
            self.sleep_seconds = histogram("thrifty:sleep_seconds", "Seconds each sleep took to release memory "
                                           "(after the requests in flight ended).", _SLEEP_BUCKETS)
            self.wake_seconds = histogram("thrifty:wake_seconds", "Seconds each wake took.", _SLEEP_BUCKETS)
            self.sleep_released = prometheus_client.Gauge(
                "thrifty:sleep_released_bytes", "Memory the last sleep released, measured: the resident set on a "
                "CPU, device memory on CUDA.", labels, registry=self.registry).labels(model_name)
            llm.sleep_observers.append(self.observe_sleep)
            llm.wake_observers.append(self.wake_seconds.observe)

    def observe_step(self, obs: StepObservation) -> None:
        self.iteration_tokens.observe(obs.num_tokens)
        now = obs.end
        for out in obs.outputs:
            new_tokens = sum(len(c.token_ids) for c in out.outputs)
            last = self._last_token_time.get(out.request_id)
            if last is None:  # the request's first tokens
                m = out.metrics
                label = (self.model_name, priority_class(m.priority))
                self.ttft.observe(now - m.arrival_time)
                self.ttft_by_priority.labels(*label).observe(now - m.arrival_time)
                if m.first_scheduled_time is not None:
                    self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
                    self.queue_time_by_priority.labels(*label).observe(m.first_scheduled_time - m.arrival_time)
                self.prompt_tokens.inc(len(out.prompt_token_ids))
                self.prompt_tokens_cached.inc(out.num_cached_tokens)
            elif new_tokens:
                self.itl.observe(now - last)
            self.generation_tokens.inc(new_tokens)
            if out.finished:
                self._last_token_time.pop(out.request_id, None)
                self.e2e.observe(now - out.metrics.arrival_time)
                reason = out.outputs[0].finish_reason or "stop"
                self._success.labels(self.model_name, reason).inc()
            elif new_tokens:
                self._last_token_time[out.request_id] = now

    def observe_end(self, request_id: str, reason: str) -> None:
        """A request that ended unfinished: "abort" (client gone) or "error" (its step failed)."""
        self._last_token_time.pop(request_id, None)
        self._success.labels(self.model_name, reason).inc()

    def observe_sleep(self, result: SleepResult) -> None:
        self.sleep_seconds.observe(result.seconds)
        self.sleep_released.set(result.released_bytes)

    def observe_key_usage(self, key_name: str, prompt_tokens: int, generation_tokens: int, cost_usd: float) -> None:
        self.key_prompt_tokens.labels(self.model_name, key_name).inc(prompt_tokens)
        self.key_generation_tokens.labels(self.model_name, key_name).inc(generation_tokens)
        self.key_cost.labels(self.model_name, key_name).inc(cost_usd)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


def priority_class(priority: int) -> str:
    """A bounded label for a client-chosen integer."""
    return str(priority) if -10 <= priority <= 10 else "<-10" if priority < -10 else ">10"
