"""The `export-checkpoint` flow under a Prefect test API, with a real SQLite MLflow store."""

from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefect_tensorflow.flows.export_checkpoint import export_checkpoint
from prefect_tensorflow.tasks.configs import GateConfig


def _kwargs(tmp_path: Path, mlflow_store, **extra):
    return {
        "export_base": str(tmp_path / "export"),
        "frozen_dir": str(tmp_path / "frozen"),
        "mlflow": mlflow_store,
        "registered_model_name": "ui-iris",
        **extra,
    }


def _artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    run_filter = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        return {a.key: a for a in client.read_artifacts(artifact_filter=run_filter)}


def test_export_checkpoint_ships_the_latest_and_publishes_what_it_did(prefect_api, model_dir_copy, mlflow_store, tmp_path):
    state = export_checkpoint(  # an alias asked for twice is set once
        model_dir=str(model_dir_copy), aliases=["staging", "staging"], return_state=True, **_kwargs(tmp_path, mlflow_store)
    )
    summary = state.result()
    assert summary.checkpoint.step == 300
    assert (summary.export.version, summary.export.reused) == (1, False)
    assert (tmp_path / "export" / "1" / "saved_model.pb").exists()
    assert summary.frozen_graph is not None and Path(summary.frozen_graph.path).exists()
    registered = summary.registered
    assert (registered.name, registered.version) == ("ui-iris", 1)
    assert registered.aliases == ["challenger", "champion", "staging"]
    version = mlflow_store.client().get_model_version("ui-iris", "1")
    assert version.tags["prefect_tensorflow.aliases_requested"] == "staging"
    assert version.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert summary.flow_run_id == str(state.state_details.flow_run_id)

    artifacts = _artifacts(state.state_details.flow_run_id)
    assert {"checkpoints", "export-summary", "mlflow-model-version", "mlflow-run"} <= set(artifacts)
    rows = artifacts["checkpoints"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert [r["step"] for r in rows] == [300, 200, 100, 0] and rows[0]["selected"] == "yes"
    note = artifacts["export-summary"].data
    for text in (
        summary.export.path,
        summary.frozen_graph.path,
        "promoted to champion",
        "`features` float32",
        registered.version_url,
    ):
        assert text in note


def test_a_step_or_the_best_checkpoint_can_be_shipped(prefect_api, model_dir_copy, mlflow_store, tmp_path):
    from prefect_tensorflow.tasks.checkpoints.selection import select_best_checkpoint

    by_step = export_checkpoint(model_dir=str(model_dir_copy), checkpoint="100", **_kwargs(tmp_path, mlflow_store))
    assert by_step.checkpoint.step == 100 and by_step.export.source.endswith("model.ckpt-100")
    best = export_checkpoint(
        model_dir=str(model_dir_copy),
        checkpoint="best:loss",
        gate=GateConfig(metric="loss", mode="min"),
        **_kwargs(tmp_path, mlflow_store),
    )
    assert best.checkpoint.path == select_best_checkpoint(model_dir_copy, "loss", "min").path
    assert best.selection == "best:loss:min" and best.registered.gate.metric == "loss"


def test_re_running_returns_the_existing_version_without_redoing_the_work(prefect_api, model_dir_copy, mlflow_store, tmp_path):
    first = export_checkpoint(model_dir=str(model_dir_copy), **_kwargs(tmp_path, mlflow_store))
    frozen_mtime = os.stat(first.frozen_graph.path).st_mtime_ns
    again = export_checkpoint(model_dir=str(model_dir_copy), **_kwargs(tmp_path, mlflow_store))
    assert again.export.reused and again.export.version == first.export.version
    assert again.registered.reused and again.registered.version == first.registered.version
    assert again.frozen_graph is None and os.stat(first.frozen_graph.path).st_mtime_ns == frozen_mtime
    assert again.registered.gate == first.registered.gate
    assert sorted(p for p in os.listdir(tmp_path / "export") if not p.startswith(".")) == ["1"]
    assert len(mlflow_store.client().search_model_versions("name = 'ui-iris'")) == 1


@pytest.mark.parametrize(
    "params, error",
    [
        ({"model_dir": "{tmp}/nowhere"}, "does not exist; expected a directory of checkpoints"),
        ({"model_dir": "{tmp}/empty"}, "no valid checkpoint in"),
        ({"checkpoint": "999"}, "has no checkpoint at step 999; steps present: [0, 100, 200, 300]"),
        ({"checkpoint": "-5"}, "checkpoint: expected 'latest', a step number"),
        ({"checkpoint": "best:f1"}, "metric 'f1' was not recorded"),
        ({"model": "no_such_module:build"}, "no_such_module"),
        ({"data": "prefect_tensorflow.tasks.iris:nothing_here"}, "nothing_here"),
        ({"aliases": ["staging", "v3"]}, "aliases.1: Value error, expected alias names"),
        ({"aliases": ["latest"]}, "aliases.0: Value error, expected alias names"),
        ({"gate": {"metric": "f1"}}, "gate.metric: Value error, expected 'accuracy' or 'error' or 'loss' or 'mse' or 'mae'"),
        ({"gate": {"mode": "up"}}, "gate.mode: Value error, expected 'min' or 'max'"),
        ({"registered_model_name": "team/iris"}, "registered_model_name: Value error, expected a registered model name"),
    ],
)
def test_bad_parameters_fail_at_once_naming_the_parameter_and_write_nothing(
    prefect_api, model_dir_copy, mlflow_store, tmp_path, params, error
):
    (tmp_path / "empty").mkdir()
    params = {k: (v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v) for k, v in params.items()}
    params.setdefault("model_dir", str(model_dir_copy))
    with pytest.raises(Exception) as info:
        export_checkpoint(**{**_kwargs(tmp_path, mlflow_store), **params})
    assert error in str(info.value)
    assert not (tmp_path / "export").exists() and not (tmp_path / "frozen").exists()
    assert mlflow_store.client().search_registered_models() == []


@pytest.mark.slow
def test_two_runs_for_the_same_checkpoint_at_once_end_with_one_version(prefect_api, model_dir_copy, mlflow_store, tmp_path):
    from prefect.settings import PREFECT_API_URL

    script = f"""
import json
from prefect_tensorflow.flows.export_checkpoint import export_checkpoint
from prefect_tensorflow.tasks.blocks import MlflowConnection
summary = export_checkpoint(
    model_dir={str(model_dir_copy)!r}, export_base={str(tmp_path / "export")!r}, frozen_dir={str(tmp_path / "frozen")!r},
    registered_model_name="ui-iris", mlflow=MlflowConnection(tracking_uri={mlflow_store.tracking_uri!r}, experiment_name="tests"),
)
print(json.dumps({{"export": summary.export.version, "model": summary.registered.version}}))
"""
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the test API, not an ephemeral one each
    outs = []
    procs = []
    for i in range(2):
        out = open(tmp_path / f"out{i}", "w")
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=out, stderr=subprocess.STDOUT))
    for proc in procs:
        proc.wait(timeout=600)
    for out in outs:
        out.close()
    texts = [(tmp_path / f"out{i}").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], [t[-2000:] for t in texts]
    results = [json.loads(t.strip().splitlines()[-1]) for t in texts]
    assert results == [{"export": 1, "model": 1}] * 2
    assert sorted(p for p in os.listdir(tmp_path / "export") if not p.startswith(".")) == ["1"]
    assert len(mlflow_store.client().search_model_versions("name = 'ui-iris'")) == 1


def test_mlflow_tasks_are_retried_only_when_the_server_was_unavailable(prefect_api, trained_dir, caplog):
    """The retries declared on the real tasks: a server that stays down is tried again, a bad input is not."""
    from prefect import flow

    from prefect_tensorflow.flows.servers import free_port
    from prefect_tensorflow.tasks import prefect_tasks
    from prefect_tensorflow.tasks.checkpoints.selection import checkpoint_ref
    from prefect_tensorflow.tasks.errors import MlflowSettingsError, MlflowUnavailableError
    from prefect_tensorflow.tasks.export.saved_model import ExportResult
    from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig

    for task in (
        prefect_tasks.train_with_checkpoints,
        prefect_tasks.log_frozen_graph_to_mlflow,
        prefect_tasks.register_model_version,
        prefect_tasks.find_registered_version,
        prefect_tasks.set_model_version_aliases,
        prefect_tasks.gate_champion,
    ):
        assert task.retries >= 1 and task.retry_condition_fn is prefect_tasks.retry_if_server_unavailable, task.name
    down = MlflowConfig(tracking_uri=f"http://127.0.0.1:{free_port()}", request_retries=0, operation_retries=0)
    export = ExportResult.model_construct(path="/nowhere/1", fingerprint="0" * 64)
    checkpoint = checkpoint_ref(trained_dir / "model.ckpt-100")

    @flow
    def both():
        lookup = prefect_tasks.find_registered_version.with_options(retry_delay_seconds=0)
        register = prefect_tasks.register_model_version.with_options(retry_delay_seconds=0)
        unavailable = lookup(export, "iris", down, return_state=True)
        bad_name = register(export, "team/iris", down, checkpoint=checkpoint, return_state=True)
        return [(type(s.result(raise_on_failure=False)), s.state_details.task_run_id) for s in (unavailable, bad_name)]

    with caplog.at_level(logging.INFO, logger="prefect.task_runs"):
        (unavailable, unavailable_id), (no_metric, no_metric_id) = both()
    assert (unavailable, no_metric) == (MlflowUnavailableError, MlflowSettingsError)
    # Retries counted from the engine's own lines, in this process (one "Retry n/N will start" per retry, then
    # "Retries are exhausted"): the API's record of a task run arrives as events, which a loaded machine was
    # seen to drop (EventsWorker errors), so its run_count is not read back.
    retried, exhausted = collections.Counter(), collections.Counter()
    for record in caplog.records:
        message, run = record.getMessage(), str(getattr(record, "task_run_id", ""))
        if message.startswith("Task run failed with exception") and message.endswith("Retries are exhausted"):
            exhausted[run] += 1
        elif message.startswith("Task run failed with exception") and " - Retry " in message:
            retried[run] += 1
    retries = prefect_tasks.register_model_version.retries
    assert retries >= 1 and prefect_tasks.find_registered_version.retries == retries
    assert [retried[str(unavailable_id)], exhausted[str(unavailable_id)]] == [retries, 1]  # tried retries + 1 times
    assert retried[str(no_metric_id)] == 0  # a bad input: never tried again


def test_without_paths_it_ships_the_model_dir_under_the_data_home(
    prefect_api, model_dir_copy, mlflow_store, tmp_path, monkeypatch
):
    import shutil

    home = tmp_path / "home"
    monkeypatch.setenv("PREFECT_TENSORFLOW_HOME", str(home))
    shutil.copytree(model_dir_copy, home / "models" / "iris")
    summary = export_checkpoint(checkpoint="200", mlflow=mlflow_store)
    assert summary.checkpoint.path == str(home / "models" / "iris" / "model.ckpt-200")
    assert summary.export.path == str(home / "exports" / "iris" / "1")
    assert summary.frozen_graph.path == str(home / "frozen" / "iris" / "model.ckpt-200.pb")
    assert (summary.registered.name, summary.registered.version) == ("iris", 1)
