"""`thrifty` commands started as processes on free loopback ports (benchmarks and tests)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx2 as httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_thrifty(args: list[str], url: str, timeout: float, any_answer: bool = False,
                  stdout=subprocess.PIPE) -> subprocess.Popen:
    """Starts `python -m thrifty.entrypoints.cli ARGS` and waits until `url`/health answers 200
    (or, with any_answer, answers at all). With stdout piped, a process that exits early has its
    output in the error."""
    proc = subprocess.Popen([sys.executable, "-m", "thrifty.entrypoints.cli", *args], stdout=stdout,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout is not None else f"exit code {proc.returncode}"
            raise RuntimeError(f"{args[0]} exited: {output}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200 or any_answer:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{args[0]} did not become healthy")
