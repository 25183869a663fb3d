"""The native kernels built for other instruction sets than this CPU's best, each run through the
op tests of test_native.py in a subprocess (a process holds one build of the library): the
AVX2 build is what CPUs without AVX-512 (the AMD EPYC Zen 3 machines) run, the generic one what
CPUs without AVX2 run. Each build runs on this CPU as long as it has the instructions the build
needs; one it lacks is skipped and says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from thrifty import native
from thrifty.cpuinfo import cpu_flags
from thrifty.native.build import build

OP_TESTS = "linear_matches or paged_attention_matches or write_kv or rms_norm or quantized"


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_other_instruction_sets_pass_the_op_tests(isa, tmp_path):
    if native.unavailable_reason() is not None:
        pytest.skip(f"native kernels unavailable here: {native.unavailable_reason()}")
    lib = build(isa, out=tmp_path / f"thrifty_cpu_{isa}.so")
    needed = set(json.loads(lib.with_suffix(".json").read_text())["cpu_flags_needed"])
    if needed - cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(needed - cpu_flags())} for the {isa} build")
    env = {**os.environ, native.ENV_LIBRARY: str(lib)}
    tests = Path(__file__).with_name("test_native.py")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(tests),
                           "-k", OP_TESTS], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-500:]
