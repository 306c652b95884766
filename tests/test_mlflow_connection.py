"""MlflowConnection: precedence of fields, environment and defaults; the secret token; retries."""

from __future__ import annotations

import os
import socket
import time

import pytest
from pydantic import ValidationError

from prefect_tensorflow.tasks.errors import MlflowUnavailableError
from prefect_tensorflow.tasks.mlflow_connection import (
    DEFAULT_EXPERIMENT,
    MlflowConnection,
    default_tracking_uri,
    is_transient,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    [("tracking_uri", "localhost:5000"), ("tracking_uri", "ftp://host/x"), ("registry_uri", "nowhere"),
     ("ui_url", "sqlite:///x.db")],
)
def test_a_malformed_uri_is_refused_naming_the_field(field, value):
    with pytest.raises(ValidationError) as info:
        MlflowConnection(**{field: value})
    assert f"{field}: expected a URI" in str(info.value) and value in str(info.value)


@pytest.mark.parametrize("field, value", [("request_retries", -1), ("request_timeout", 0), ("experiment_name", " ")])
def test_out_of_range_settings_are_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        MlflowConnection(**{field: value})


def test_the_token_is_secret_and_only_set_while_active(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    conn = MlflowConnection(tracking_uri="http://127.0.0.1:5999", token="s3cr3t-token")
    assert "s3cr3t-token" not in repr(conn) and "s3cr3t-token" not in str(conn.model_dump())
    with conn.activate():
        assert os.environ["MLFLOW_TRACKING_TOKEN"] == "s3cr3t-token"
    assert "MLFLOW_TRACKING_TOKEN" not in os.environ


def test_activate_restores_the_environment_and_mlflows_globals(monkeypatch, tmp_path):
    import mlflow

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "11")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri()
    conn = MlflowConnection(tracking_uri=f"sqlite:///{tmp_path}/x/mlflow.db", request_retries=1)
    with conn.activate():
        assert mlflow.get_tracking_uri() == conn.resolved_tracking_uri()
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
        assert (tmp_path / "x").is_dir()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "11"
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.get_tracking_uri() == before


def test_credentials_never_appear_in_the_server_label():
    conn = MlflowConnection(tracking_uri="https://user:pa55@mlflow.example.com/path")
    assert conn.server_label() == "https://mlflow.example.com/path"


def test_experiment_is_created_once_with_artifacts_beside_the_database(mlflow_store, tmp_path):
    first = mlflow_store.experiment_id()
    assert mlflow_store.experiment_id() == first
    experiment = mlflow_store.client().get_experiment(first)
    assert experiment.name == "tests"
    assert experiment.artifact_location == f"file://{tmp_path}/mlflow/artifacts"


def test_a_server_that_is_not_there_fails_with_an_error_naming_it_after_the_retries():
    port = _free_port()  # nothing listens: connection refused, for real
    conn = MlflowConnection(
        tracking_uri=f"http://127.0.0.1:{port}", request_retries=1, request_backoff_factor=0,
        operation_retries=2, operation_retry_delay=0.2,
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
