# `make run` and `make test` work on a fresh machine with Python 3.11 and nothing else.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# A fresh PREFECT_HOME makes Prefect's ephemeral API migrate a new SQLite database;
# on 2 cores that can take longer than Prefect's default 20 s start-up limit.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
# Its telemetry heartbeat races that migration ("database is locked") and needs the network.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install chromium postgresql strace run serve team-stack lint test bench clean

install: $(STAMP) chromium postgresql strace

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade "pip>=24" "setuptools>=77" wheel
	$(BIN)/python -m pip install -qq -e ".[test]"
	@touch $(STAMP)

# Debian's Chromium for the browser test (tests/test_browser.py drives it with Playwright; Playwright's
# own browser download is not used). Installed only when missing, as root with apt-get; elsewhere the
# test is skipped with a reason naming what to install, and nothing else needs it.
CHROMIUM := /usr/bin/chromium
chromium:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for tests/test_browser.py"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
			|| echo "WARNING: apt-get install chromium failed: tests/test_browser.py will be skipped"; \
	else \
		echo "WARNING: $(CHROMIUM) is missing and this is not root with apt-get: tests/test_browser.py will be skipped (install Debian's chromium package)"; \
	fi

# strace for tests/test_durability.py (it traces fsync and rename to check the order of a durable commit).
# Installed only when missing, as root with apt-get; elsewhere those tests are skipped with a reason.
strace:
	@if command -v strace >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's strace for tests/test_durability.py"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace >/dev/null; } \
			|| echo "WARNING: apt-get install strace failed: tests/test_durability.py will be skipped"; \
	else \
		echo "WARNING: strace is missing and this is not root with apt-get: tests/test_durability.py will be skipped (install Debian's strace package)"; \
	fi

# Debian's PostgreSQL server binaries (initdb, postgres) for the team-storage tests and `make team-stack`:
# they start throwaway clusters of their own (tests/conftest.py, devtools/team_stack.py), never the
# system's. Installed only when no /usr/lib/postgresql/<N>/bin/initdb is there (so once), as root
# with apt-get; PG_BINDIR may name other binaries instead.
postgresql:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || [ -x "$$PG_BINDIR/initdb" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's postgresql (server binaries) for the team-storage tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null \
			|| { echo "ERROR: apt-get install postgresql failed: the PostgreSQL tests cannot run" >&2; exit 1; }; \
	else \
		echo "*************************************************************************************" >&2; \
		echo "WARNING: PostgreSQL's server binaries are missing (no /usr/lib/postgresql/*/bin/initdb)" >&2; \
		echo "and this is not root with apt-get, so they cannot be installed here. The tests that" >&2; \
		echo "start PostgreSQL (MLflow and Prefect on PostgreSQL, make team-stack) will FAIL." >&2; \
		echo "Fix: sudo apt-get install postgresql, or set PG_BINDIR to a directory holding initdb." >&2; \
		echo "*************************************************************************************" >&2; \
	fi

run: install
	$(BIN)/prefect-tensorflow retrain

# A local Prefect server on 127.0.0.1:4200 (unless PREFECT_API_URL is set) serving
# retrain-iris (nightly) and export-checkpoint: open http://127.0.0.1:4200 and press Run.
serve: install
	$(BIN)/prefect-tensorflow serve

# ruff (lint + format) and mypy. mypy reads the sources through a symlinked
# prefect_tensorflow/ tree: the editable install maps tasks/ and flows/ with an
# import hook that mypy cannot follow.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@mkdir -p .mypy-src/prefect_tensorflow
	@ln -sfn ../../tasks .mypy-src/prefect_tensorflow/tasks
	@ln -sfn ../../flows .mypy-src/prefect_tensorflow/flows
	MYPYPATH=.mypy-src $(BIN)/mypy -p prefect_tensorflow.tasks -p prefect_tensorflow.flows

# Two pytest workers (pytest-xdist), each taking a whole test file at a time so that a module's servers start
# once: most tests wait on subprocesses and servers, so two share 2 cores better than one. Files are handed
# out in collection order, the longest first (tests/conftest.py), not xdist's most-tests-first.
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -ra --durations=40 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The team's production shape on this machine: PostgreSQL, S3 (moto), mlflow server and prefect server on
# them, a process worker; runs retrain-iris on it with S3 paths, then serves until Ctrl-C.
team-stack: install
	$(BIN)/python -m devtools.team_stack

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf .prefect-tensorflow .mypy-src .mypy_cache .ruff_cache
