"""20 `export-checkpoint` runs queued at once through `prefect-tensorflow serve --limit 4`.

A real `prefect server` (SQLite, Prefect's default; and PostgreSQL, the
`prefect_pg_server` fixture), a real `serve`, one trained model dir (the
`trained_dir` fixture: checkpoints 0, 100, 200 and 300) and the embedded
SQLite MLflow store every run writes to. The runs, created as the Run form
does, ask for the four checkpoints in turn (5 runs each; on PostgreSQL 8 runs,
2 each), so several runs
for the same checkpoint run side by side. Every run must complete (or fail
naming why), nothing may fail on "database is locked", and the registry ends
with one model version per distinct checkpoint.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from served import ServedDeployments

from prefect_tensorflow.tasks.child_processes import log_tail
from prefect_tensorflow.tasks.registry.tracking import TAG_PREFIX

RUNS = 20
# PostgreSQL has no "database is locked"; 8 runs (2 per checkpoint, 4 at a time) prove the rest there at 2/5 the time
RUNS_ON = {"sqlite": RUNS, "postgresql": 8}
LIMIT = 4
STEPS = (0, 100, 200, 300)


def queue_and_wait(stack: ServedDeployments, model_dir: Path, name: str, count: int = RUNS) -> tuple[dict, float]:
    """Create `count` export-checkpoint runs at once (checkpoints in turn); wait for all; (runs by id, seconds)."""
    with stack.api() as client:
        started = time.monotonic()
        ids = [
            stack.create_run(
                client,
                "export-checkpoint",
                {"model_dir": str(model_dir), "checkpoint": str(STEPS[i % len(STEPS)]), "registered_model_name": name},
                name=f"{name}-{i}",
            )
            for i in range(count)
        ]
        runs = stack.wait(client, ids, timeout=900)
        return runs, time.monotonic() - started


def check_outcome(stack: ServedDeployments, runs: dict, name: str, mlflow_uri: str, count: int = RUNS) -> None:
    import mlflow

    log = log_tail(str(stack.serve_log), 200_000)
    states = {run.name: run.state.type.value if run.state else None for run in runs.values()}
    assert len(runs) == count and all(s == "COMPLETED" for s in states.values()), (
        f"{states}\n{log_tail(str(stack.serve_log), 6000)}"
    )
    assert "database is locked" not in log
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    versions = client.search_model_versions(f"name = '{name}'")
    steps = sorted(int(v.tags[f"{TAG_PREFIX}checkpoint.step"]) for v in versions)
    assert steps == list(STEPS), [(v.version, v.tags) for v in versions]  # one version per distinct checkpoint


FIRST_OPEN = """
import os, sys, time
from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
import mlflow.store.tracking.sqlalchemy_store, mlflow.store.model_registry.sqlalchemy_store
open(sys.argv[2] + ".ready", "w").close()
while not os.path.exists(sys.argv[3]):
    time.sleep(0.01)
MlflowConfig(tracking_uri=sys.argv[1]).client().search_registered_models()
"""


def test_processes_opening_a_new_sqlite_store_together_all_succeed(tmp_path):
    """MLflow creates a SQLite store's tables when a process first opens it, unlocked: 4 processes opening
    a new one at the same instant all failed on each other's CREATE TABLE / alembic steps before the lock."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    go = tmp_path / "go"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_OPEN, uri, str(tmp_path / f"p{i}"), str(go)], stderr=subprocess.PIPE, text=True
        )
        for i in range(4)
    ]
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("p*.ready"))) < 4 and time.monotonic() < deadline:  # every one imported MLflow
        time.sleep(0.05)
    go.touch()
    outcomes = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in processes]
    assert [code for code, _ in outcomes] == [0, 0, 0, 0], [err[-500:] for _, err in outcomes]


@pytest.fixture
def model_dir(trained_dir, tmp_path) -> Path:
    target = tmp_path / "data" / "models" / "iris"
    shutil.copytree(trained_dir, target)
    return target


@pytest.mark.slow
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_twenty_export_runs_at_once_complete_with_one_version_per_checkpoint(
    database, model_dir, tmp_path, prefect_database, request
):
    data = tmp_path / "data"
    mlflow_uri = f"sqlite:///{data}/mlflow/mlflow.db"
    environ = ServedDeployments.environ_for(tmp_path, PREFECT_TENSORFLOW_HOME=str(data), MLFLOW_TRACKING_URI=mlflow_uri)
    if database == "postgresql":
        environ["PREFECT_API_URL"] = request.getfixturevalue("prefect_pg_server")
    stack = ServedDeployments(tmp_path, environ, limit=LIMIT, database=prefect_database)
    try:
        if database == "sqlite":
            stack.start_server()
        stack.start_serve()
        name = f"many-{database}"
        runs, seconds = queue_and_wait(stack, model_dir, name, RUNS_ON[database])
        print(f"{RUNS_ON[database]} export-checkpoint runs, serve --limit {LIMIT}, Prefect on {database}: {seconds:.0f} s")
        check_outcome(stack, runs, name, mlflow_uri, RUNS_ON[database])
    finally:
        stack.stop()
