"""Sleep mode's shared pieces: its options, its error, what a sleep reports, and how the memory
it releases is measured.

Level 1 frees the KV cache (and on CUDA moves the weights to host memory); level 2 also discards
the weights, which waking reloads from the model path. On a CPU the weights already are host
memory, so level 1 keeps them where they are (docs/server.md, "Sleep mode").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
from dataclasses import dataclass

from thrifty.machine import proc_kib_bytes

SLEEP_LEVELS = (1, 2)
SLEEP_MODES = ("abort", "wait")
# vLLM's engine_sleep_state values, by level (on a CPU level 1 offloads nothing: the weights stay).
SLEEP_STATE_NAMES = {0: "awake", 1: "weights_offloaded", 2: "discard_all"}


class EngineSleepingError(RuntimeError):
    """The engine is asleep (or going to sleep): the server answers 503 with Retry-After."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))  # whole seconds, as the header takes


@dataclass
class SleepConfig:
    """The server's sleep options (`thrifty serve --enable-sleep-mode ...`)."""

    wake_on_request: bool = False  # a request arriving while asleep wakes the engine (else a 503)
    sleep_when_idle: float | None = None  # seconds without requests before the engine sleeps by itself
    sleep_level: int = 1  # the level of those idle sleeps
    drain_timeout: float = 30.0  # mode "wait": seconds requests in flight may take before they are aborted

    def __post_init__(self) -> None:
        check_level(self.sleep_level, "sleep_level")
        if self.sleep_when_idle is not None:
            if self.sleep_when_idle <= 0:
                raise ValueError(f"sleep_when_idle must be > 0 seconds, got {self.sleep_when_idle}")
            self.wake_on_request = True  # else every request after an idle sleep would be refused
        if self.drain_timeout < 0:
            raise ValueError(f"sleep_drain_timeout must be >= 0 seconds, got {self.drain_timeout}")


def check_level(level, name: str = "level") -> int:
    if isinstance(level, bool) or level not in SLEEP_LEVELS:
        raise ValueError(f"{name}: must be 1 or 2, got {level!r}")
    return level


@dataclass
class SleepResult:
    level: int
    released_bytes: int  # memory in use before minus after (resident set on CPU, device memory on CUDA)
    seconds: float
    before_bytes: int
    after_bytes: int


def resident_bytes() -> int:
    """This process's resident set (VmRSS), from /proc/self/status; 0 where there is none."""
    return proc_kib_bytes("/proc/self/status", "VmRSS") or 0


def memory_in_use(device) -> int:
    """What a sleep can release: device memory in use on CUDA, else the resident set."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        return total - free
    return resident_bytes()


def release_freed_memory(device) -> None:
    """Hands freed memory back to the system: Python's cycles first, then the allocator's caches
    (glibc keeps freed heap chunks below its mmap threshold, where many packed weights live)."""
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
    _malloc_trim()


def _malloc_trim() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)  # glibc only (musl has none)
    if trim is not None:
        trim(0)
