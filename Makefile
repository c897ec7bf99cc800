# Two entry points (see README): `make run` and `make test`. Both set up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run demo test test-fast protos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
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

test: setup
	$(BIN)/python -m pytest -q -ra --durations=15

protos: setup
	$(BIN)/python -m glmserve.protos.generate

clean:
	rm -rf $(VENV) build *.egg-info
