"""`MlflowConfig`: where MLflow runs and registered models go, and how calls to it are retried.

Every field is optional. A field that is set wins; otherwise MLflow's own
environment variables do (`MLFLOW_TRACKING_URI`, `MLFLOW_REGISTRY_URI`,
`MLFLOW_EXPERIMENT_NAME`, `MLFLOW_TRACKING_TOKEN`, `MLFLOW_TRACKING_USERNAME`,
`MLFLOW_TRACKING_PASSWORD`: read, never written); otherwise the embedded
default: an SQLite store at `<data home>/mlflow/mlflow.db` (the registry needs
a database store) with artifacts in `<data home>/mlflow/artifacts`.

Nothing process-wide changes during a call: `client()` is an `MlflowClient`
whose server, credentials (a bearer token, or basic-auth user and password:
secrets, never logged) and HTTP retry policy are its own (`mlflow_client`),
so two connections can be used side by side in threads. The Prefect block
(`blocks.MlflowConnection`) is this config, saved.

Retries, three layers that do distinct work:

- MLflow's HTTP client retries each request (connection refused, timeouts,
  HTTP 408/429/5xx) with exponential backoff: a blip costs seconds;
- `retrying` retries a whole operation `operation_retries` more times, for an
  operation that must be redone as a unit (registration looks its fingerprint
  up first, so a lost answer never makes a second version) and for a server
  that restarts; what still fails raises `MlflowUnavailableError`;
- Prefect retries the task later (`prefect_tasks`), only after `MlflowUnavailableError`.

Example:
    >>> from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
    >>> config = MlflowConfig(tracking_uri="http://127.0.0.1:5000", experiment_name="iris")
    >>> config.resolved_tracking_uri(), config.server_label()
    ('http://127.0.0.1:5000', 'http://127.0.0.1:5000')
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, Optional, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit
from urllib.request import url2pathname

from pydantic import BaseModel, Field, SecretStr, field_validator

from ..errors import MlflowSettingsError, MlflowUnavailableError
from ..run_context import get_logger
from ..settings import data_home
from .store_uri import local_store_path

DEFAULT_EXPERIMENT = "prefect-tensorflow"
DEFAULT_UI_URL = "http://127.0.0.1:5000"
_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks", "databricks-uc")
SECRET_FIELDS = ("token", "password")
T = TypeVar("T")


def default_mlflow_dir() -> str:
    """`<data home>/mlflow`: the embedded store's database and artifacts."""
    return os.path.join(data_home(), "mlflow")


def default_tracking_uri() -> str:
    """`sqlite:///<data home>/mlflow/mlflow.db`."""
    return "sqlite:///" + os.path.join(default_mlflow_dir(), "mlflow.db")


class MlflowConfig(BaseModel):
    """Connection to an MLflow tracking server and model registry (see the module docstring)."""

    tracking_uri: Optional[str] = Field(
        default=None, description="e.g. http://mlflow.internal:5000; default $MLFLOW_TRACKING_URI, else local SQLite"
    )
    registry_uri: Optional[str] = Field(default=None, description="default $MLFLOW_REGISTRY_URI, else the tracking URI")
    experiment_name: Optional[str] = Field(
        default=None, description=f"default $MLFLOW_EXPERIMENT_NAME, else {DEFAULT_EXPERIMENT!r}"
    )
    token: Optional[SecretStr] = Field(default=None, description="Bearer token; default $MLFLOW_TRACKING_TOKEN")
    username: Optional[str] = Field(default=None, description="Basic-auth user; default $MLFLOW_TRACKING_USERNAME")
    password: Optional[SecretStr] = Field(default=None, description="Basic-auth password; default $MLFLOW_TRACKING_PASSWORD")
    ui_url: Optional[str] = Field(
        default=None, description=f"Base URL of the MLflow UI for links; default the http(s) tracking URI, else {DEFAULT_UI_URL}"
    )
    request_retries: int = Field(default=3, ge=0, le=10, description="MLflow's retries of each HTTP request")
    request_backoff_factor: int = Field(default=1, ge=0, le=120, description="Seconds; doubles with each request retry")
    request_timeout: int = Field(default=30, ge=1, description="Seconds before an HTTP request times out")
    operation_retries: int = Field(default=3, ge=0, description="Retries of a whole operation after the request retries")
    operation_retry_delay: float = Field(default=2.0, ge=0, description="Seconds; doubles with each operation retry")

    @field_validator("tracking_uri", "registry_uri", "ui_url")
    @classmethod
    def _check_uri(cls, value: Optional[str], info: Any) -> Optional[str]:
        if value is None:
            return None
        value = value.strip()
        scheme = urlsplit(value).scheme
        allowed = ("http", "https") if info.field_name == "ui_url" else _SCHEMES
        if scheme not in allowed:
            raise ValueError(f"{info.field_name}: expected a URI with a scheme among {', '.join(allowed)}, received {value!r}")
        if "@" in urlsplit(value).netloc:
            raise ValueError(f"{info.field_name}: give credentials as username/password or token, not in the URI")
        return value

    @field_validator("experiment_name")
    @classmethod
    def _check_experiment(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.strip():
            raise ValueError("experiment_name: expected a non-empty name, received an empty string")
        return value

    # --- where --------------------------------------------------------------------------------

    def resolved_tracking_uri(self) -> str:
        """The field, else `$MLFLOW_TRACKING_URI`, else the embedded SQLite store."""
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()

    def resolved_registry_uri(self) -> str:
        """The field, else `$MLFLOW_REGISTRY_URI`, else the tracking URI."""
        return self.registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or self.resolved_tracking_uri()

    def resolved_experiment_name(self) -> str:
        return self.experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT

    def resolved_token(self) -> Optional[str]:
        return self.token.get_secret_value() if self.token is not None else os.environ.get("MLFLOW_TRACKING_TOKEN")

    def resolved_username(self) -> Optional[str]:
        return self.username or os.environ.get("MLFLOW_TRACKING_USERNAME")

    def resolved_password(self) -> Optional[str]:
        return self.password.get_secret_value() if self.password is not None else os.environ.get("MLFLOW_TRACKING_PASSWORD")

    def default_artifact_location(self) -> Optional[str]:
        """For a SQLite store, `artifacts/` beside the database file (MLflow's own default
        would be `./mlruns` in whatever the working directory is); else the server's default.

        A `file://` URI whose special characters are percent-encoded, so that MLflow,
        which decodes it, reads the same path."""
        uri = self.resolved_tracking_uri()
        store = local_store_path(uri)
        if store is None or not urlsplit(uri).scheme.lower().startswith("sqlite"):
            return None
        return pathlib.Path(os.path.dirname(store), "artifacts").as_uri()

    def server_label(self) -> str:
        """The tracking URI without credentials, for messages."""
        parts = urlsplit(self.resolved_tracking_uri())
        if "@" not in parts.netloc:
            return self.resolved_tracking_uri()
        return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))

    def resolved_ui_url(self) -> str:
        if self.ui_url:
            return self.ui_url.rstrip("/")
        uri = self.server_label()
        return uri.rstrip("/") if uri.startswith(("http://", "https://")) else DEFAULT_UI_URL

    def run_url(self, experiment_id: str, run_id: str) -> str:
        return f"{self.resolved_ui_url()}/#/experiments/{experiment_id}/runs/{run_id}"

    def model_version_url(self, name: str, version: int | str) -> str:
        return f"{self.resolved_ui_url()}/#/models/{quote(name, safe='')}/versions/{version}"

    def ui_command(self) -> str:
        """The command that opens the MLflow UI on a SQLite store (experiments record their artifact
        location, so no artifact root is needed); for a server, its URL."""
        if not self.resolved_tracking_uri().startswith("sqlite:///"):
            return f"open {self.resolved_ui_url()}"
        return f"{console_command('mlflow')} ui --backend-store-uri {self.resolved_tracking_uri()} --host 127.0.0.1 --port 5000"

    # --- calls --------------------------------------------------------------------------------

    def client(self) -> Any:
        """An `MlflowClient` for this connection alone: its URIs, credentials and HTTP retries
        (`mlflow_client.connection_client`)."""
        from .mlflow_client import connection_client

        location = self.default_artifact_location()
        if location is not None:  # SQLite creates the database file, not its directory
            os.makedirs(url2pathname(urlsplit(location).path), exist_ok=True)
        return connection_client(self)

    def retrying(self, operation: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn`, retrying transient server faults `operation_retries` times with doubling delays.

        Raises:
            MlflowUnavailableError: the server still failed after all retries (`operation` names what).
        """
        attempts = self.operation_retries + 1
        delay = self.operation_retry_delay
        for attempt in range(1, attempts + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                if not is_transient(err):
                    raise
                if attempt == attempts:
                    raise MlflowUnavailableError(self.server_label(), operation, attempts, _short(err)) from err
                get_logger().warning(
                    "MLflow server %s: %s failed (%s); retrying in %.0f s (%d/%d)",
                    self.server_label(),
                    operation,
                    _short(err),
                    delay,
                    attempt,
                    attempts - 1,
                )
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def experiment_id(self) -> str:
        """The experiment's id, created on first use (artifacts beside the embedded store)."""
        return self.retrying("getting the experiment", self._experiment_id)

    def _experiment_id(self) -> str:
        client = self.client()
        name = self.resolved_experiment_name()
        found = client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise MlflowSettingsError(
                    f"experiment_name: {name!r} is a deleted experiment on {self.server_label()}; "
                    "restore it (mlflow experiments restore) or choose another name"
                )
            return found.experiment_id
        try:
            return client.create_experiment(name, artifact_location=self.default_artifact_location())
        except Exception:
            found = client.get_experiment_by_name(name)  # a concurrent creator won the race
            if found is None:
                raise
            return found.experiment_id

    def plain(self) -> MlflowConfig:
        """This connection as a plain `MlflowConfig` (a saved block's fields, without the block)."""
        return MlflowConfig.model_validate({name: getattr(self, name) for name in MlflowConfig.model_fields})

    def to_secret_json(self) -> str:
        """JSON of every field, secrets revealed: for a child process's stdin only, never logs or argv."""
        values = self.plain().model_dump(mode="json")
        for name in SECRET_FIELDS:
            secret = getattr(self, name)
            values[name] = secret.get_secret_value() if secret is not None else None
        return json.dumps(values)


_TRANSIENT_MARKERS = (
    "Max retries exceeded",
    "Connection refused",
    "ConnectionError",
    "Connection aborted",
    "RemoteDisconnected",
    "timed out",
    "timeout",
    "too many 5",
    "Temporarily Unavailable",
    "TEMPORARILY_UNAVAILABLE",
    "503",
    "502",
    "504",
    "500 Server Error",
)


def is_transient(err: BaseException) -> bool:
    """Whether `err` is a server or network fault that a later attempt may not meet."""
    import requests

    if isinstance(err, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        if getattr(err, "error_code", None) in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR") and "API request" in str(err):
            return True
        return any(marker in str(err) for marker in _TRANSIENT_MARKERS) and "API request" in str(err)
    return isinstance(err, OSError) and any(marker in str(err) for marker in _TRANSIENT_MARKERS)


def console_command(name: str) -> str:
    """`name` if that console script is on PATH, else the one beside this Python (e.g. `.venv/bin/mlflow`),
    relative to the working directory when it is below it: what to print for a user to type."""
    if shutil.which(name):
        return name
    beside = os.path.join(os.path.dirname(sys.executable), name)
    relative = os.path.relpath(beside)
    return relative if not relative.startswith("..") else beside


def _short(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
