# One command to set up and run the demo, one to set up and pass the tests.
PY      ?= python3
VENV    ?= .venv
UV_VER  := 0.13.8
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
BROWSER := $(VENV)/.chromium
CHROMIUM ?= /usr/bin/chromium
export CHROMIUM

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test lint format test-slow bench lock clean

setup: $(STAMP) $(BROWSER)

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

# The report's browser test (tests/helpers_browser.py) drives Debian's headless Chromium over its
# DevTools protocol: installed here when $(CHROMIUM) is missing (apt, with sudo unless root); nothing
# is downloaded when the tests run. Where that fails it says so, and the browser tests fail naming the fix.
$(BROWSER): | $(STAMP)
	@if [ -x $(CHROMIUM) ]; then :; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends chromium; } || \
	  echo "could not install chromium: the report's browser test needs $(CHROMIUM)"; \
	else echo "$(CHROMIUM) missing and no apt-get: install Chromium for the report's browser test"; fi
	@if [ -x $(CHROMIUM) ]; then touch $@; fi

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
