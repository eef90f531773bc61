# One command to set up and run the demo, one to set up and pass the tests.
PY      ?= python3
VENV    ?= .venv
UV_VER  := 0.13.8
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test lint format test-slow bench lock clean

setup: $(STAMP)

# The venv is rebuilt whenever the lock file changes; `uv pip sync` installs exactly the locked set.
# --compile-bytecode: every process (each Ray worker, each CLI call) then imports torch, pandas and
# Prefect from .pyc files; without them, where PYTHONDONTWRITEBYTECODE is set, each process compiled
# them from source again (14 s instead of 6 s per process here).
$(STAMP): requirements.lock pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv==$(UV_VER)
	$(BIN)/uv pip sync --compile-bytecode --python $(BIN)/python requirements.lock
	$(BIN)/uv pip install --compile-bytecode --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

demo: setup
	$(BIN)/deltaedit demo

test: setup lint
	$(BIN)/python -m pytest -m "not slow" --durations=15 tests

# ruff's settings live in pyproject.toml ([tool.ruff]); `make format` rewrites what `lint` rejects.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test-slow: setup
	$(BIN)/python -m pytest -m "slow" tests

bench: setup
	rc=0; for b in bench/*_bench.py; do $(BIN)/python $$b || rc=1; done; exit $$rc

# Re-resolve the pinned set after editing pyproject.toml's dependencies.
lock:
	$(BIN)/uv pip compile pyproject.toml --extra test --python-version 3.11 \
	    --python-platform x86_64-manylinux_2_28 -o requirements.lock

clean:
	rm -rf $(VENV) runs .pytest_cache
