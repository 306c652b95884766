"""The MLflow password and token of a saved connection appear nowhere but in the block that holds them.

A real basic-auth `mlflow server` (which also takes bearer tokens: see
`mlflow_token_auth.py`) and a real Prefect server with `prefect-tensorflow
serve`, all on 127.0.0.1. Two `MlflowConnection` blocks are saved as a team
would: one with a user's password, one with a token, each a distinctive random
value. The `retrain` deployment is run from each (60 steps, as the Run form
does, the block picked by reference), both complete and register a version.
Then every place a secret could leak is read and searched for the secrets
(raw, and the Basic header's base64 of `user:password`):

- MLflow: every experiment's tags, every run's params, tags and metric names,
  every artifact of every run and logged model (downloaded), every logged
  model's tags and params, every registered model's and version's tags,
  descriptions, sources and aliases;
- Prefect, through its API: the flow runs (parameters, state messages, state
  history), their task runs, every log line, the published artifacts, and the
  block documents as the API returns them by default (secrets obfuscated);
- files: everything under the test root (the data home, Prefect's home, the
  MLflow server's store, the servers' and serve's logs) and pytest's tmp dirs.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from pathlib import Path

import pytest
from mlflow_server import MlflowServer
from served import ServedDeployments

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory, prefect_database):
    """The MLflow server (a password user and a token user) and the served deployments, with saved blocks."""
    root = tmp_path_factory.mktemp("secret-scan")
    password = "pw-" + secrets.token_hex(16)
    token = "tok-" + secrets.token_hex(16)
    mlflow = MlflowServer(root / "mlflow-server", auth=True, token_users={token: "scan-token-user"})
    served = ServedDeployments(
        root, ServedDeployments.environ_for(root, PREFECT_TENSORFLOW_HOME=str(root / "data")), limit=2, database=prefect_database
    )
    try:
        mlflow.launch()  # both servers start at once: each start-up is mostly imports, on one core
        served.start_server()
        mlflow.wait_healthy()
        admin = mlflow.admin()
        admin.create_user("scan-password-user", password)
        admin.create_user("scan-token-user", "unused-" + secrets.token_hex(8))  # the token maps to this user
        blocks = {
            "password": served.save_block(
                "scan-password",
                tracking_uri=mlflow.uri,
                username="scan-password-user",
                password=password,
                experiment_name="scan-password",
            ),
            "token": served.save_block("scan-token", tracking_uri=mlflow.uri, token=token, experiment_name="scan-token"),
        }
        served.start_serve()
        yield {
            "root": root,
            "mlflow": mlflow,
            "served": served,
            "blocks": blocks,
            "secrets": {
                "password": password,
                "token": token,
                "basic header": base64.b64encode(f"scan-password-user:{password}".encode()).decode(),
            },
        }
    finally:
        served.stop()
        mlflow.stop()


def _find(secrets_: dict[str, str], where: str, text: str | bytes, found: list[str]) -> None:
    data = text if isinstance(text, bytes) else str(text).encode("utf-8", "surrogateescape")
    for label, secret in secrets_.items():
        if secret.encode() in data:
            found.append(f"{label} in {where}")


def test_secrets_of_saved_connections_appear_nowhere_after_two_retrain_runs(stack, tmp_path):
    from mlflow.entities import ViewType
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig

    served, mlflow_server, found = stack["served"], stack["mlflow"], []
    secrets_ = stack["secrets"]
    data = stack["root"] / "data"
    with served.api() as client:
        runs = {}
        for kind, block_id in stack["blocks"].items():
            parameters = {
                "model_dir": str(data / "models" / f"scan-{kind}"),
                "training": {"model": "iris", "data": "iris", "steps": 60, "policy": {"save_checkpoints_steps": 30}},
                "registered_model_name": f"scan-{kind}",
                "export_base": str(data / "exports" / f"scan-{kind}"),
                "frozen_dir": str(data / "frozen" / f"scan-{kind}"),
                "mlflow": {"$ref": {"block_document_id": block_id}},
            }
            runs[kind] = served.create_run(client, "retrain-iris", parameters)
        finished = served.wait(client, list(runs.values()), timeout=900)
        for kind, run_id in runs.items():
            state = finished[run_id].state
            assert state.is_completed(), f"{kind}: {state}\n{served.serve_log.read_text()[-3000:]}"

        # --- Prefect, through its API -------------------------------------------------------------
        ids = list(runs.values())
        for run_id in ids:
            _find(secrets_, f"flow run {run_id}", client.read_flow_run(run_id).model_dump_json(), found)
            for state in client.read_flow_run_states(run_id):
                _find(secrets_, f"flow run state {state.name}", state.model_dump_json(), found)
        run_filter = FlowRunFilter(id=FlowRunFilterId(any_=ids))
        task_runs = client.read_task_runs(flow_run_filter=run_filter)
        assert task_runs
        for task_run in task_runs:
            _find(secrets_, f"task run {task_run.name}", task_run.model_dump_json(), found)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
        assert len(logs) > 10
        for log in logs:
            _find(secrets_, f"log line {log.message[:60]!r}", log.message, found)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
        assert artifacts
        for artifact in artifacts:
            _find(secrets_, f"Prefect artifact {artifact.key}", artifact.model_dump_json(), found)
        for kind, block_id in stack["blocks"].items():
            default = client.request("GET", "/block_documents/{id}", path_params={"id": block_id}).text
            _find(secrets_, f"block document {kind} as the API returns it by default", default, found)
            assert '"password"' in default or '"token"' in default
            listed = client.request("POST", "/block_documents/filter", json={}).text
            _find(secrets_, "block documents list", listed, found)
        revealed = client.request(  # the control: where the secret is, the search finds it
            "GET", "/block_documents/{id}", path_params={"id": stack["blocks"]["password"]}, params={"include_secrets": "true"}
        ).text
        control: list[str] = []
        _find(secrets_, "the block with include_secrets", revealed, control)
        assert control == ["password in the block with include_secrets"]

    # --- MLflow, every run, artifact, logged model, registered model and version ---------------------
    admin = MlflowConfig(
        tracking_uri=mlflow_server.uri, username=mlflow_server.admin_username, password=mlflow_server.admin_password
    ).client()
    experiments = admin.search_experiments(view_type=ViewType.ALL)
    assert {e.name for e in experiments} >= {"scan-password", "scan-token"}
    downloads = tmp_path / "downloads"
    artifact_files = 0
    for experiment in experiments:
        _find(secrets_, f"experiment {experiment.name}", json.dumps(experiment.tags), found)
        for run in admin.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL):
            where = f"MLflow run {run.info.run_name}"
            _find(secrets_, where + " params", json.dumps(run.data.params), found)
            _find(secrets_, where + " tags", json.dumps(run.data.tags), found)
            _find(secrets_, where + " metric names", json.dumps(sorted(run.data.metrics)), found)
            target = downloads / run.info.run_id
            admin.download_artifacts(run.info.run_id, "", str(target))
            artifact_files += _scan_tree(secrets_, target, f"artifacts of {run.info.run_name}", found)
        for model in admin.search_logged_models(experiment_ids=[experiment.experiment_id]):
            _find(secrets_, f"logged model {model.name}", json.dumps({"tags": model.tags, "params": model.params}), found)
            target = downloads / model.model_id
            admin.download_logged_model(model.model_id, str(target))
            artifact_files += _scan_tree(secrets_, target, f"logged model {model.model_id}", found)
    assert artifact_files > 20  # checkpoints, TensorBoard, the frozen graph, the MLmodel and SavedModel files
    registered = admin.search_registered_models()
    assert {m.name for m in registered} >= {"scan-password", "scan-token"}
    for model in registered:
        _find(secrets_, f"registered model {model.name}", json.dumps([model.description, model.tags, model.aliases]), found)
    for version in admin.search_model_versions():
        fields = [version.source, version.description, version.run_link, version.tags, list(version.aliases)]
        _find(secrets_, f"model version {version.name}/{version.version}", json.dumps(fields), found)

    # --- files: the data home, both servers' stores and logs, serve's log, pytest's tmp dirs -------------
    scanned = _scan_tree(secrets_, stack["root"], "file", found, skip={mlflow_server.root / "basic_auth.ini"})
    scanned += _scan_tree(secrets_, tmp_path, "file", found)
    assert scanned > 50
    print(
        f"\nsecret scan: {len(logs)} log lines, {len(task_runs)} task runs, {len(artifacts)} Prefect artifacts, "
        f"{sum(1 for _ in experiments)} experiments, {artifact_files} MLflow artifact files, {scanned} files on disk; "
        f"found: {len(found)}"
    )
    for log in (served.server_log, served.serve_log, mlflow_server.log_path):
        assert log.exists() and log.stat().st_size > 0, log
    assert not found, "secrets found:\n" + "\n".join(sorted(set(found)))


def _scan_tree(secrets_: dict[str, str], root: Path, what: str, found: list[str], skip: frozenset | set = frozenset()) -> int:
    """Search every file under `root`; how many there were."""
    count = 0
    for current, _, files in os.walk(root):
        for name in files:
            path = Path(current, name)
            if path in skip or path.is_symlink():
                continue
            try:
                content = path.read_bytes()
            except OSError:  # a file a server removed meanwhile (a SQLite journal)
                continue
            count += 1
            _find(secrets_, f"{what} {path}", content, found)
    return count


def test_the_api_returns_a_saved_secret_to_whoever_asks_for_it(stack):
    """What the threat model must say: Prefect OSS has no roles, so anyone who can reach the API (and so
    press Run) can read a saved block's secrets with `include_secrets=true`. The MLflow user of a block
    should hold only the permissions its deployments need."""
    served = stack["served"]
    with served.api() as client:
        document = client.request(
            "GET",
            "/block_documents/{id}",
            path_params={"id": stack["blocks"]["password"]},
            params={"include_secrets": "true"},
        ).json()
    assert document["data"]["password"] == stack["secrets"]["password"]


def test_the_run_form_can_pick_a_saved_mlflow_block_with_the_schema_enforced(stack):
    """The reference the Run form sends for a picked block, with "Enforce Parameter Schema" on (the default).
    The run is scheduled a day ahead, so that nothing runs; it is deleted afterwards."""
    from datetime import datetime, timedelta, timezone

    from prefect.states import Scheduled

    served = stack["served"]
    reference = {"$ref": {"block_document_id": stack["blocks"]["password"]}}
    with served.api() as client:
        deployment = client.read_deployment(served.deployments["export-checkpoint"])
        assert deployment.enforce_parameter_schema  # the server checks the reference against the schema
        run = client.create_flow_run_from_deployment(
            deployment.id,
            parameters={"mlflow": reference},
            state=Scheduled(scheduled_time=datetime.now(timezone.utc) + timedelta(days=1)),
        )
        try:
            stored = client.read_flow_run(run.id)
            assert stored.state is not None and stored.state.is_scheduled(), stored.state
            assert stored.parameters["mlflow"] == reference  # accepted as the reference, not as the block's secrets
        finally:
            client.delete_flow_run(run.id)
