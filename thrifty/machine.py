"""What this process may use of the machine: CPUs (its affinity, capped by a cgroup CPU quota) and
memory (MemTotal, capped by a cgroup memory limit). Torch-free: the server's default price asks.

A container sees the host's CPUs and memory in /proc; its cgroup says what it is allowed, and that
is what it would rent. Both cgroup v2 (cpu.max, memory.max) and v1 (cpu.cfs_quota_us,
memory.limit_in_bytes) are read, from the process's own cgroup up to the root: a parent's limit
binds its children.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"
GiB = 1024**3


@dataclass(frozen=True)
class MachineShare:
    vcpus: float  # CPUs this process may run on at once (a cgroup quota may make it fractional)
    memory_gib: float | None  # memory it may use, None if unknown
    host_cpus: int  # CPUs the kernel lists, for the log line

    def describe(self) -> str:
        mem = "memory unknown" if self.memory_gib is None else f"{self.memory_gib:.1f} GiB memory"
        return f"{self.vcpus:g} of {self.host_cpus} CPUs usable, {mem}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_dirs(controller: str, root: Path, proc_cgroup: Path) -> list[Path]:
    """The directories that may hold `controller`'s limits for this process, innermost first:
    its own cgroup, each parent, then the mount root (what a container with its own cgroup
    namespace sees). v2 (one hierarchy at `root`) is tried before v1 (`root/controller`)."""
    text = _read(proc_cgroup) or ""
    mounts: list[tuple[Path, str]] = []
    for line in text.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "" and line.startswith("0::"):
            mounts.append((root, path))
        elif controller in controllers.split(","):
            mounts.append((root / controller, path))
    mounts.sort(key=lambda m: m[0] != root)  # v2 first
    dirs: list[Path] = []
    for base, path in mounts or [(root, "/")]:
        rel = Path(path.lstrip("/"))
        while True:
            d = base / rel
            if d.is_dir() and d not in dirs:
                dirs.append(d)
            if rel == rel.parent:
                break
            rel = rel.parent
    return dirs


def cgroup_cpu_limit(root: str | Path = CGROUP_ROOT, proc_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """CPUs' worth of time per period the cgroup allows (quota / period), the tightest found; None
    if no quota is set."""
    limits = []
    for d in _cgroup_dirs("cpu", Path(root), Path(proc_cgroup)):
        v2 = _read(d / "cpu.max")
        if v2 is not None:
            quota, _, period = v2.partition(" ")
            if quota != "max" and period:
                limits.append(int(quota) / int(period))
            continue
        quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        if quota is not None and period is not None and int(quota) > 0 and int(period) > 0:
            limits.append(int(quota) / int(period))
    return min(limits) if limits else None


def cgroup_memory_limit_bytes(root: str | Path = CGROUP_ROOT,
                              proc_cgroup: str | Path = "/proc/self/cgroup") -> int | None:
    """The tightest cgroup memory limit, None if none is set (v1 writes "no limit" as a huge number,
    which the caller's min with MemTotal absorbs)."""
    limits = []
    for d in _cgroup_dirs("memory", Path(root), Path(proc_cgroup)):
        value = _read(d / "memory.max")
        if value is None:
            value = _read(d / "memory.limit_in_bytes")
        if value is not None and value.isdigit():
            limits.append(int(value))
    return min(limits) if limits else None


def proc_kib_bytes(path: str | Path, key: str) -> int | None:
    """A `Key:   N kB` line of a /proc file (meminfo, self/status), in bytes; None if it has none."""
    for line in (_read(Path(path)) or "").splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    return None


def mem_total_bytes(meminfo: str | Path = "/proc/meminfo") -> int | None:
    return proc_kib_bytes(meminfo, "MemTotal")


def machine_share(affinity: int | None = None, root: str | Path = CGROUP_ROOT,
                  proc_cgroup: str | Path = "/proc/self/cgroup", meminfo: str | Path = "/proc/meminfo") -> MachineShare:
    """CPUs and memory this process may use. The arguments are for tests; by default they are read
    from the kernel."""
    cpus = affinity if affinity is not None else len(os.sched_getaffinity(0))
    quota = cgroup_cpu_limit(root, proc_cgroup)
    vcpus = min(float(cpus), quota) if quota is not None else float(cpus)
    known = [b for b in (mem_total_bytes(meminfo), cgroup_memory_limit_bytes(root, proc_cgroup)) if b is not None]
    return MachineShare(vcpus=vcpus, memory_gib=min(known) / GiB if known else None,
                        host_cpus=os.cpu_count() or cpus)


@cache
def usable_vcpus() -> float:
    """This process's vCPUs, read once: what its CPU seconds are shared over when they are turned into
    the priced instance's wall time (the CPU estimate is scaled to the same count)."""
    return machine_share().vcpus
