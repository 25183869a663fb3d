"""Builds the native CPU kernel library (csrc/cpu) for the CPU of this machine.

    python -m thrifty.native.build --if-stale  # what `make` runs: builds when needed
    python -m thrifty.native.build             # builds
    python -m thrifty.native.build --isa avx2  # another instruction set, e.g. to test its code path

The library is compiled with g++ against the installed torch (its headers, its libraries and its
OpenMP runtime), with -march=native by default, so the vector code is the widest this CPU has.
A stamp beside it records the sources' hash and the CPU flags it was built for; thrifty loads
the library only where both still match (see thrifty/native/__init__.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ROOT / "csrc" / "cpu"
LIB_DIR = Path(__file__).resolve().parent / "lib"
# -march values by name; "native" is this machine's CPU.
ISAS = {"native": "native", "avx512bf16": "sapphirerapids", "avx512": "skylake-avx512", "avx2": "haswell",
        "generic": "x86-64"}


def source_hash() -> str:
    h = hashlib.sha256()
    for path in sorted(SOURCES.iterdir()):
        if path.suffix in (".cpp", ".h"):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def compiled_isa_flags(march: str) -> list[str]:
    """The CPU features the compiler enables for -march=..., as /proc/cpuinfo names them."""
    out = subprocess.run(["g++", f"-march={march}", "-dM", "-E", "-x", "c++", "/dev/null"],
                         capture_output=True, text=True, check=True).stdout
    macros = {"__AVX2__": "avx2", "__FMA__": "fma", "__F16C__": "f16c", "__AVX512F__": "avx512f",
              "__AVX512BW__": "avx512bw", "__AVX512VL__": "avx512vl", "__AVX512DQ__": "avx512dq",
              "__AVX512BF16__": "avx512_bf16"}
    return sorted(flag for macro, flag in macros.items() if f"#define {macro} " in out)


def library_path(isa: str = "native") -> Path:
    return LIB_DIR / f"thrifty_cpu_{isa}.so"


def build(isa: str = "native", jobs: int = 2, out: Path | None = None) -> Path:
    import torch
    from torch.utils import cpp_extension

    if shutil.which("g++") is None:
        raise RuntimeError("g++ not found: install it (Debian: apt-get install g++) to build the native kernels")
    march = ISAS[isa]
    out = out or library_path(isa)
    out.parent.mkdir(parents=True, exist_ok=True)
    objdir = out.parent / f"obj_{isa}"
    objdir.mkdir(exist_ok=True)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cflags = ["-O3", f"-march={march}", "-fPIC", "-std=c++20", "-fopenmp", "-DNDEBUG",
              f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized", "-Wno-uninitialized"]
    cflags += [f"-isystem{p}" for p in cpp_extension.include_paths()]
    libdir = cpp_extension.library_paths()[0]
    sources = sorted(SOURCES.glob("*.cpp"))

    def compile_one(src: Path) -> Path:
        obj = objdir / (src.stem + ".o")
        subprocess.run(["g++", *cflags, "-c", str(src), "-o", str(obj)], check=True)
        return obj

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        objects = list(pool.map(compile_one, sources))
    # Link against torch's libraries and its OpenMP runtime (same soname as the system's, so the
    # process keeps a single OpenMP thread pool).
    tmp = out.with_suffix(".so.tmp")
    subprocess.run(["g++", "-shared", "-fopenmp", "-o", str(tmp), *map(str, objects), f"-L{libdir}",
                    "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{libdir}"], check=True)
    tmp.replace(out)
    stamp = {"sources": source_hash(), "isa": isa, "cpu_flags_needed": compiled_isa_flags(march),
             "torch": torch.__version__, "seconds": round(time.monotonic() - start, 1)}
    out.with_suffix(".json").write_text(json.dumps(stamp, indent=1) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", default="native", choices=sorted(ISAS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--if-stale", action="store_true",
                    help="build only if the library is missing, older than the sources, or built for another CPU")
    args = ap.parse_args()
    if args.if_stale and args.isa == "native" and args.out is None:
        from thrifty.native import unavailable_reason

        reason = unavailable_reason()
        if reason is None:
            print(f"{library_path()} is up to date for this CPU")
            return
        print(f"building the native kernels: {reason}")
    try:
        path = build(args.isa, args.jobs, args.out)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"thrifty: the native kernels were not built ({e}); the pure-torch path will be used",
              file=sys.stderr)
        sys.exit(1)
    print(f"built {path} ({json.loads(path.with_suffix('.json').read_text())['seconds']} s)")


if __name__ == "__main__":
    main()
