# Two entry points (see README): `make run` and `make test`. Both set up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run demo test prometheus protos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=77" wheel
	# The pinned CPU build lies on disk; an unpinned torch would pull GBs of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]" --config-settings editable_mode=strict
	touch $(STAMP)

setup: $(STAMP)
	# strict editable installs link files one by one: re-link so new modules are importable.
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict

run: setup
	$(BIN)/glmserve up

demo: setup
	$(BIN)/glmserve demo

test: setup prometheus
	$(BIN)/lint-imports   # layering contracts in pyproject.toml ([tool.importlinter])
	$(BIN)/python -m pytest -q -ra --durations=15

# The dashboard test scrapes the running services with a real Prometheus (Debian's package).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq prometheus >/dev/null) || \
	    echo "prometheus could not be installed: its tests will skip"; \
	  else echo "not root: install Debian's prometheus package to run the Prometheus tests"; fi; }

protos: setup
	$(BIN)/python -m glmserve.protos.generate

clean:
	rm -rf $(VENV) build *.egg-info
