"""Two tracked trainings, two registrations and two champion gates at once, in threads, against two real `mlflow server`s.

Prefect's default task runner (a thread pool) runs `.submit()`ted tasks in
threads of one process. Each connection carries its own server (and would
carry its own credentials): nothing process-wide may change, so every run,
metric, logged model and model version must land in its own server only.
"""

from __future__ import annotations

import os

import pytest
from mlflow_server import MlflowServer, start_all
from prefect import flow

from prefect_tensorflow.tasks import prefect_tasks as tasks
from prefect_tensorflow.tasks.blocks import MlflowConnection
from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
from prefect_tensorflow.tasks.configs import ExportConfig, GateConfig, TrainingConfig

pytestmark = pytest.mark.slow
CONFIG = TrainingConfig(steps=300, policy=CheckpointPolicy(save_checkpoints_steps=100), evaluation="in_loop")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    started = start_all(MlflowServer(tmp_path_factory.mktemp(f"mlflow-{name}")) for name in ("a", "b"))
    try:
        yield started
    finally:
        for server in started:
            server.stop()


@flow
def two_at_once(dirs: list[str], exports: list[str], connections: list[MlflowConnection]) -> list[dict]:
    trainings = [tasks.train_with_checkpoints.submit(d, CONFIG, c) for d, c in zip(dirs, connections)]
    results = [future.result() for future in trainings]
    checkpoints = [tasks.select_latest_checkpoint(r.model_dir) for r in results]
    exported = [tasks.export_saved_model(ref.path, e, ExportConfig()) for ref, e in zip(checkpoints, exports)]
    registrations = [
        tasks.register_model_version.submit(export, "iris", connection, checkpoint=ref, run_id=result.mlflow_run_id, data="iris")
        for export, connection, ref, result in zip(exported, connections, checkpoints, results)
    ]
    registered = [g.result() for g in registrations]
    # the gates too: both scored, serve-checked (one warm template for the process) and moved at once
    gates = [tasks.gate_champion.submit(r, c, GateConfig(), data="iris") for r, c in zip(registered, connections)]
    from prefect.runtime import flow_run

    return [
        {"run_id": r.mlflow_run_id, "registered": g, "gate": d.result(), "flow_run": flow_run.id}
        for r, g, d in zip(results, registered, gates)
    ]


def overlapped(flow_run_id: str, task_prefix: str) -> bool:
    """Whether the flow run's two task runs named `task_prefix*` ran at the same time (per the Prefect API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    spans = sorted((r.start_time, r.end_time) for r in runs if r.name.startswith(task_prefix))
    assert len(spans) == 2, [r.name for r in runs]
    return spans[1][0] < spans[0][1]


def test_concurrent_trainings_and_registrations_land_in_their_own_servers(prefect_api, servers, tmp_path):
    connections = [
        MlflowConnection(tracking_uri=server.uri, experiment_name=f"threads-{i}", operation_retries=1)
        for i, server in enumerate(servers)
    ]
    environment = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    out = two_at_once(
        [str(tmp_path / "a" / "iris"), str(tmp_path / "b" / "iris")],
        [str(tmp_path / "a" / "export"), str(tmp_path / "b" / "export")],
        connections,
    )
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")} == environment  # nothing process-wide changed
    clients = [c.client() for c in connections]
    for mine, (connection, client, other) in enumerate(zip(connections, clients, reversed(clients))):
        run_id, registered = out[mine]["run_id"], out[mine]["registered"]
        run = client.get_run(run_id)  # the training run is in its own server ...
        assert run.info.status == "FINISHED"
        assert run.data.params["steps"] == "300"
        assert {"loss", "eval/accuracy"} <= set(run.data.metrics)
        assert run.data.tags["prefect_tensorflow.model_dir"].endswith(f"/{'ab'[mine]}/iris")
        assert client.get_experiment(run.info.experiment_id).name == f"threads-{mine}"
        with pytest.raises(Exception, match="(?i)not found|does not exist|RESOURCE_DOES_NOT_EXIST"):
            other.get_run(run_id)  # ... and not in the other one
        assert (registered.name, registered.version, registered.run_id) == ("iris", 1, run_id)
        assert registered.model_uri and connection.server_label() in registered.version_url
        versions = client.search_model_versions("name = 'iris'")
        assert [(v.version, v.run_id) for v in versions] == [("1", run_id)]  # one version each, from its own run
        assert out[mine]["gate"].state == "first_version" and out[mine]["gate"].promoted, out[mine]["gate"].reason
        assert client.get_model_version_by_alias("iris", "champion").version == "1"  # moved in its own server
        assert {a.path for a in client.list_artifacts(run_id)} >= {"checkpoints", "tensorboard"}
    assert out[0]["run_id"] != out[1]["run_id"]
    assert overlapped(out[0]["flow_run"], "train-with-checkpoints") and overlapped(out[0]["flow_run"], "register-model-version")
    assert overlapped(out[0]["flow_run"], "gate-champion")
