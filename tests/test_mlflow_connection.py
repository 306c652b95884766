"""MlflowConfig / MlflowConnection: precedence of fields, environment and defaults; secrets; retries;
explicit clients that change nothing process-wide."""

from __future__ import annotations

import os
import time

import pytest
from pydantic import ValidationError

from prefect_tensorflow.flows.servers import free_port
from prefect_tensorflow.tasks.errors import MlflowUnavailableError
from prefect_tensorflow.tasks.registry.mlflow_connection import (
    DEFAULT_EXPERIMENT,
    MlflowConfig,
    default_tracking_uri,
    is_transient,
)

MlflowConnection = MlflowConfig  # the block is the same config, saved; these tests need no Prefect


def test_defaults_are_a_sqlite_store_under_the_data_home(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFECT_TENSORFLOW_HOME", str(tmp_path))
    conn = MlflowConnection()
    assert conn.resolved_tracking_uri() == f"sqlite:///{tmp_path}/mlflow/mlflow.db" == default_tracking_uri()
    assert conn.resolved_registry_uri() == conn.resolved_tracking_uri()
    assert conn.resolved_experiment_name() == DEFAULT_EXPERIMENT
    assert conn.default_artifact_location() == f"file://{tmp_path}/mlflow/artifacts"


def test_environment_wins_over_defaults_and_fields_win_over_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "sqlite:////tmp/registry.db")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    conn = MlflowConnection()
    assert conn.resolved_tracking_uri() == "http://127.0.0.1:5999"
    assert conn.resolved_registry_uri() == "sqlite:////tmp/registry.db"
    assert conn.resolved_experiment_name() == "from-env"
    assert conn.resolved_ui_url() == "http://127.0.0.1:5999"
    assert conn.default_artifact_location() is None  # a server decides where artifacts go
    explicit = MlflowConnection(tracking_uri="http://10.0.0.1:5000", experiment_name="mine")
    assert explicit.resolved_tracking_uri() == "http://10.0.0.1:5000"
    assert explicit.resolved_experiment_name() == "mine"


@pytest.mark.parametrize(
    "field, value",
    [
        ("tracking_uri", "localhost:5000"),
        ("tracking_uri", "ftp://host/x"),
        ("registry_uri", "nowhere"),
        ("ui_url", "sqlite:///x.db"),
    ],
)
def test_a_malformed_uri_is_refused_naming_the_field(field, value):
    with pytest.raises(ValidationError) as info:
        MlflowConnection(**{field: value})
    assert f"{field}: expected a URI" in str(info.value) and value in str(info.value)


@pytest.mark.parametrize("field, value", [("request_retries", -1), ("request_timeout", 0), ("experiment_name", " ")])
def test_out_of_range_settings_are_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        MlflowConnection(**{field: value})


def test_secrets_stay_secret_and_nothing_process_wide_changes(monkeypatch, tmp_path):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "11")
    conn = MlflowConnection(tracking_uri="http://127.0.0.1:5999", token="s3cr3t-token", username="ci", password="pa55-word")
    assert "s3cr3t-token" not in repr(conn) and "s3cr3t-token" not in str(conn.model_dump())
    assert "pa55-word" not in repr(conn) and "pa55-word" not in str(conn.model_dump())
    environ, uri = dict(os.environ), mlflow.get_tracking_uri()
    client = conn.client()
    creds = client._tracking_client.store.get_host_creds()
    assert (creds.host, creds.token, creds.username, creds.password) == (
        "http://127.0.0.1:5999",
        "s3cr3t-token",
        "ci",
        "pa55-word",
    )
    sqlite = MlflowConnection(tracking_uri=f"sqlite:///{tmp_path}/x/mlflow.db").client()
    assert sqlite.tracking_uri.startswith("sqlite:///") and (tmp_path / "x").is_dir()
    assert dict(os.environ) == environ and mlflow.get_tracking_uri() == uri


def test_the_secret_json_for_a_child_process_round_trips():
    conn = MlflowConnection(tracking_uri="http://127.0.0.1:5999", token="s3cr3t-token", password="pa55-word")
    again = MlflowConfig.model_validate_json(conn.to_secret_json())
    assert again.resolved_token() == "s3cr3t-token" and again.resolved_password() == "pa55-word"
    assert again.tracking_uri == conn.tracking_uri


def test_the_private_mlflow_names_the_explicit_clients_use_are_all_there():
    """An MLflow upgrade that moves them fails here, not in a production registration."""
    from prefect_tensorflow.tasks.registry.mlflow_client import check_private_api

    assert check_private_api() == []


def test_a_client_keeps_the_registry_uri_register_logged_model_reads(tmp_path):
    """`register_logged_model` tells a server from a database store by `client._registry_uri` (a private name
    `check_private_api` guards): a real client keeps what it was given there."""
    from mlflow import MlflowClient

    tracking, registry = f"sqlite:///{tmp_path}/t.db", "http://127.0.0.1:5000"
    assert MlflowClient(tracking, registry)._registry_uri == registry
    assert MlflowClient(tracking)._registry_uri == tracking


def test_credentials_in_a_uri_are_refused():
    with pytest.raises(ValidationError, match="give credentials as username/password or token"):
        MlflowConnection(tracking_uri="https://user:pa55@mlflow.example.com/path")


def test_experiment_is_created_once_with_artifacts_beside_the_database(mlflow_store, tmp_path):
    first = mlflow_store.experiment_id()
    assert mlflow_store.experiment_id() == first
    experiment = mlflow_store.client().get_experiment(first)
    assert experiment.name == "tests"
    assert experiment.artifact_location == f"file://{tmp_path}/mlflow/artifacts"


def test_a_server_that_is_not_there_fails_with_an_error_naming_it_after_the_retries():
    port = free_port()  # nothing listens: connection refused, for real
    conn = MlflowConnection(
        tracking_uri=f"http://127.0.0.1:{port}",
        request_retries=1,
        request_backoff_factor=0,
        operation_retries=2,
        operation_retry_delay=0.2,
    )
    started = time.monotonic()
    with pytest.raises(MlflowUnavailableError) as info:
        conn.experiment_id()
    message = str(info.value)
    assert f"http://127.0.0.1:{port}" in message and "after 3 attempt(s)" in message
    assert time.monotonic() - started >= 0.2 + 0.4  # it did back off between attempts


def test_only_server_faults_count_as_transient():
    import requests
    from mlflow.exceptions import MlflowException

    assert is_transient(requests.ConnectionError("refused"))
    assert is_transient(MlflowException("API request to http://x/api failed with exception Max retries exceeded"))
    assert not is_transient(MlflowException("Registered Model with name=iris not found"))
    assert not is_transient(ValueError("bad value"))


def test_the_artifact_repository_asks_what_the_server_supports_with_the_connections_credentials(monkeypatch):
    """MLflow 3.18's own `_fetch_server_capabilities` sends the environment's credentials; the project's sends the
    connection's. A real HTTP server on 127.0.0.1 records the header and answers as `mlflow server` does."""
    import base64
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prefect_tensorflow.tasks.registry.mlflow_client import Connection, artifact_repository

    seen: list[tuple[str, str]] = []

    class ServerInfo(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization", "")))
            body = json.dumps({"store_type": "SqlStore", "multipart_uploads_enabled": True, "artifacts_presigned_only": False})
            self.send_response(200 if self.path == "/api/3.0/mlflow/server-info" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "environment-token")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "environment-user")
    server = ThreadingHTTPServer(("127.0.0.1", 0), ServerInfo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_port}"
        conn = Connection(tracking_uri=uri, registry_uri=uri, username="alice", password="s3cret", max_retries=0)
        repo = artifact_repository(conn, "mlflow-artifacts:/1/run/artifacts")
        assert repo._fetch_server_capabilities() == {"multipart_uploads_enabled": True, "artifacts_presigned_only": False}
        assert repo._fetch_server_capabilities() == {"multipart_uploads_enabled": True, "artifacts_presigned_only": False}
        other = artifact_repository(conn, f"{uri}/some/other/http/store")._fetch_server_capabilities()
    finally:
        server.shutdown()
    assert seen == [("/api/3.0/mlflow/server-info", "Basic " + base64.b64encode(b"alice:s3cret").decode())]  # asked once
    assert other == {}  # not MLflow's artifact service: nothing to ask
