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

.PHONY: install run serve test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade "pip>=24" "setuptools>=77" wheel
	$(BIN)/python -m pip install -qq -e ".[test]"
	@touch $(STAMP)

run: install
	$(BIN)/prefect-tensorflow retrain

# A local Prefect server on 127.0.0.1:4200 (unless PREFECT_API_URL is set) serving
# retrain-iris (nightly) and export-checkpoint: open http://127.0.0.1:4200 and press Run.
serve: install
	$(BIN)/prefect-tensorflow serve

test: install
	$(BIN)/python -m pytest -ra --durations=15

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf .prefect-tensorflow
