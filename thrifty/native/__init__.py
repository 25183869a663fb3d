"""The native CPU kernels (csrc/cpu, built by `make` with `python -m thrifty.native.build`).

`load()` loads the library into torch (torch.ops.thrifty.*, torch.classes.thrifty.LlamaModel)
if it was built from the current sources for an instruction set this CPU has; otherwise thrifty
runs its pure-torch reference path and says why, once, in the log.
"""

from __future__ import annotations

import json
import logging
import os
from functools import cache
from pathlib import Path

from thrifty.cpuinfo import cpu_flags

logger = logging.getLogger("thrifty")

# THRIFTY_NATIVE=0 turns the native path off (the reference path runs everywhere).
ENV_SWITCH = "THRIFTY_NATIVE"
# THRIFTY_NATIVE_LIB=PATH loads another build (the tests run other instruction sets' builds so).
ENV_LIBRARY = "THRIFTY_NATIVE_LIB"


def _library() -> Path:
    from thrifty.native.build import library_path  # (not at import: `python -m thrifty.native.build`)

    return Path(os.environ[ENV_LIBRARY]) if os.environ.get(ENV_LIBRARY) else library_path()


def unavailable_reason() -> str | None:
    """Why the library cannot be used here, or None if it can."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0"
    path = _library()
    stamp_path = path.with_suffix(".json")
    if not path.exists() or not stamp_path.exists():
        return f"{path} is not built (run `make` or `python -m thrifty.native.build`)"
    from thrifty.native.build import source_hash

    stamp = json.loads(stamp_path.read_text())
    if stamp.get("sources") != source_hash():
        return "it was built from older sources (run `make` to rebuild it)"
    missing = sorted(set(stamp.get("cpu_flags_needed", ())) - cpu_flags())
    if missing:
        return f"it was built for a CPU with {', '.join(missing)}, which this one lacks (run `make` to rebuild it)"
    return None


@cache
def load() -> bool:
    """Loads the library once; returns whether the native kernels are available."""
    reason = unavailable_reason()
    if reason is None:
        import torch

        try:
            torch.ops.load_library(str(_library()))
        except (OSError, RuntimeError) as e:
            reason = f"loading it failed: {e}"
    if reason is not None:
        logger.warning("thrifty: native CPU kernels unavailable (%s); using the pure-torch reference path", reason)
        return False
    return True
