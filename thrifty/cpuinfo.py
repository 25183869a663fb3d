"""What /proc/cpuinfo says of this machine's CPU (no torch: the CLI, benchmarks and the native
build all ask)."""

from __future__ import annotations

import platform
from functools import cache


@cache
def _first_cpu() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    return _first_cpu().get("model name") or platform.processor() or "unknown"


def cpu_flags_line() -> str:
    """The feature flags as lscpu's Flags line lists them."""
    return _first_cpu().get("flags", "")


def cpu_flags() -> set[str]:
    return set(cpu_flags_line().split())


def cpu_vendor() -> str:
    """x86's vendor_id ("GenuineIntel", "AuthenticAMD"); "" where /proc/cpuinfo gives none (ARM)."""
    return _first_cpu().get("vendor_id", "")
