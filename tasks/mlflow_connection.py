"""`MlflowConnection`: where MLflow runs and registered models go, as a Prefect Block.

Every field is optional. A field that is set wins; otherwise MLflow's own
environment variables do (`MLFLOW_TRACKING_URI`, `MLFLOW_REGISTRY_URI`,
`MLFLOW_EXPERIMENT_NAME`, `MLFLOW_TRACKING_TOKEN`); otherwise the embedded
default: an SQLite store at `<data home>/mlflow/mlflow.db` (the registry needs
a database store) with artifacts in `<data home>/mlflow/artifacts`.

The token is a `SecretStr`: it reaches MLflow only through
`MLFLOW_TRACKING_TOKEN` while a call runs, and is never logged, tagged or
written as a param.

Calls to MLflow go through `MlflowConnection.call`: MLflow's HTTP client
retries each request (connection refused, timeouts, HTTP 408/429/5xx) with
exponential backoff, and `call` retries the whole operation a few times more,
so a tracking server that restarts in the middle of a flow is waited for.
What still fails raises `MlflowUnavailableError` naming the server.

Example:
    >>> from prefect_tensorflow.tasks.mlflow_connection import MlflowConnection
    >>> conn = MlflowConnection(tracking_uri="http://127.0.0.1:5000", experiment_name="iris")
    >>> conn.resolved_tracking_uri()
    'http://127.0.0.1:5000'
    >>> conn.save("iris-mlflow")  # doctest: +SKIP
    >>> MlflowConnection.load("iris-mlflow")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator

from .data_home import data_home
from .errors import MlflowSettingsError, MlflowUnavailableError
from .logs import get_logger

DEFAULT_EXPERIMENT = "prefect-tensorflow"
DEFAULT_UI_URL = "http://127.0.0.1:5000"
_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks", "databricks-uc")
T = TypeVar("T")


def default_mlflow_dir() -> str:
    """`<data home>/mlflow`: the embedded store's database and artifacts."""
    return os.path.join(data_home(), "mlflow")


def default_tracking_uri() -> str:
    """`sqlite:///<data home>/mlflow/mlflow.db`."""
    return "sqlite:///" + os.path.join(default_mlflow_dir(), "mlflow.db")


class MlflowConnection(Block):
    """Connection to an MLflow tracking server and model registry."""

    _block_type_name = "MLflow Connection"
    _block_type_slug = "mlflow-connection"
    _description = "Tracking and registry URIs, experiment and token of an MLflow server."
    _documentation_url = "https://mlflow.org/docs/latest/tracking/server.html"

    tracking_uri: Optional[str] = Field(
        default=None, description="e.g. http://127.0.0.1:5000; default $MLFLOW_TRACKING_URI, else local SQLite"
    )
    registry_uri: Optional[str] = Field(default=None, description="default $MLFLOW_REGISTRY_URI, else the tracking URI")
    experiment_name: Optional[str] = Field(
        default=None, description=f"default $MLFLOW_EXPERIMENT_NAME, else {DEFAULT_EXPERIMENT!r}"
    )
    token: Optional[SecretStr] = Field(default=None, description="Bearer token; default $MLFLOW_TRACKING_TOKEN")
    ui_url: Optional[str] = Field(
        default=None, description=f"Base URL of the MLflow UI for links; default the http(s) tracking URI, else {DEFAULT_UI_URL}"
    )
    request_retries: int = Field(default=3, ge=0, description="MLflow's retries of each HTTP request")
    request_backoff_factor: int = Field(default=1, ge=0, description="Seconds; doubles with each request retry")
    request_timeout: int = Field(default=30, ge=1, description="Seconds before an HTTP request times out")
    operation_retries: int = Field(default=3, ge=0, description="Retries of a whole operation after the request retries")
    operation_retry_delay: float = Field(default=2.0, ge=0, description="Seconds; doubles with each operation retry")

    @field_validator("tracking_uri", "registry_uri", "ui_url")
    @classmethod
    def _check_uri(cls, value: Optional[str], info) -> Optional[str]:
        if value is None:
            return None
        value = value.strip()
        scheme = urlsplit(value).scheme
        allowed = ("http", "https") if info.field_name == "ui_url" else _SCHEMES
        if scheme not in allowed:
            raise ValueError(
                f"{info.field_name}: expected a URI with a scheme among {', '.join(allowed)}, received {value!r}"
            )
        return value

    @field_validator("experiment_name")
    @classmethod
    def _check_experiment(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.strip():
            raise ValueError("experiment_name: expected a non-empty name, received an empty string")
        return value

    def resolved_tracking_uri(self) -> str:
        """The field, else `$MLFLOW_TRACKING_URI`, else the embedded SQLite store."""
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()

    def resolved_registry_uri(self) -> str:
        """The field, else `$MLFLOW_REGISTRY_URI`, else the tracking URI."""
        return self.registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or self.resolved_tracking_uri()

    def resolved_experiment_name(self) -> str:
        return self.experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT

    def default_artifact_location(self) -> Optional[str]:
        """For a SQLite store, `artifacts/` beside the database file (MLflow's own default
        would be `./mlruns` in whatever the working directory is); else the server's default."""
        uri = self.resolved_tracking_uri()
        if not uri.startswith("sqlite:///"):
            return None
        database = uri[len("sqlite:///"):]
        return "file://" + os.path.join(os.path.dirname(os.path.abspath(database)), "artifacts")

    def server_label(self) -> str:
        """The tracking URI without credentials, for messages."""
        uri = self.resolved_tracking_uri()
        parts = urlsplit(uri)
        if "@" not in parts.netloc:
            return uri
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

    def _environment(self) -> dict[str, str]:
        env = {
            "MLFLOW_TRACKING_URI": self.resolved_tracking_uri(),
            "MLFLOW_REGISTRY_URI": self.resolved_registry_uri(),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.request_retries),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(self.request_backoff_factor),
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(self.request_timeout),
        }
        if self.token is not None:
            env["MLFLOW_TRACKING_TOKEN"] = self.token.get_secret_value()
        return env

    @contextmanager
    def activate(self) -> Iterator[None]:
        """Point MLflow's fluent API and clients at this connection while the block runs.

        MLflow reads its URIs, token and HTTP retry settings from the environment
        and from module globals set by `mlflow.set_tracking_uri`; both are put
        back as they were afterwards.
        """
        import mlflow
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        env = self._environment()
        saved_env = {key: os.environ.get(key) for key in env}
        saved_uris = (tracking_utils._tracking_uri, registry_utils._registry_uri)
        os.environ.update(env)
        location = self.default_artifact_location()
        if location is not None:  # SQLite creates the database file, not its directory
            os.makedirs(os.path.dirname(location[len("file://"):]), exist_ok=True)
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(env["MLFLOW_REGISTRY_URI"])
        try:
            yield
        finally:
            tracking_utils._tracking_uri, registry_utils._registry_uri = saved_uris
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def client(self):
        """An `MlflowClient` on this connection's URIs (use inside `activate()` for the token)."""
        from mlflow import MlflowClient

        return MlflowClient(self.resolved_tracking_uri(), self.resolved_registry_uri())

    def call(self, operation: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` with this connection active (`activate()`), retrying transient server faults.

        Raises:
            MlflowUnavailableError: the server still failed after all retries.
        """

        def active() -> T:
            with self.activate():
                return fn(*args, **kwargs)

        return self.retrying(operation, active)

    def retrying(self, operation: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn`, retrying transient server faults `operation_retries` times with doubling delays.

        For use inside `activate()`; `operation` names what failed in the error.

        Raises:
            MlflowUnavailableError: the server still failed after all retries.
        """
        attempts = self.operation_retries + 1
        delay = self.operation_retry_delay
        for attempt in range(1, attempts + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - sorted into transient or not below
                if not is_transient(err):
                    raise
                if attempt == attempts:
                    raise MlflowUnavailableError(self.server_label(), operation, attempts, _short(err)) from err
                get_logger().warning(
                    "MLflow server %s: %s failed (%s); retrying in %.0f s (%d/%d)",
                    self.server_label(), operation, _short(err), delay, attempt, attempts - 1,
                )
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def experiment_id(self) -> str:
        """The experiment's id, created on first use (artifacts beside the embedded store)."""
        return self.call("getting the experiment", self._experiment_id)

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
        location = self.default_artifact_location()
        try:
            return client.create_experiment(name, artifact_location=location)
        except Exception:  # noqa: BLE001 - a concurrent creator won the race
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id


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


def console_command(name: str) -> str:
    """`name` if that console script is on PATH, else the one beside this Python (e.g. `.venv/bin/mlflow`),
    relative to the working directory when it is below it: what to print for a user to type."""
    if shutil.which(name):
        return name
    beside = os.path.join(os.path.dirname(sys.executable), name)
    relative = os.path.relpath(beside)
    return relative if not relative.startswith("..") else beside


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


def _short(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def retry_if_server_unavailable(task, task_run, state) -> bool:
    """A Prefect `retry_condition_fn`: retry a task only when MLflow was unreachable.

    A corrupt checkpoint, a parity failure or a bad name fails at once; only
    `MlflowUnavailableError` (the server still down after the in-task retries)
    is worth another attempt later.

    Example:
        >>> from prefect_tensorflow.tasks.registry import register_model_version
        >>> register = register_model_version.with_options(
        ...     retries=2, retry_delay_seconds=30, retry_condition_fn=retry_if_server_unavailable)
    """
    try:
        state.result()
    except MlflowUnavailableError:
        return True
    except BaseException:  # noqa: BLE001 - any other failure is final
        return False
    return False


# Prefect task options for tasks that talk to MLflow: retried later when the server was
# down (after their own in-task retries); a corrupt checkpoint or a parity failure is not.
MLFLOW_TASK_RETRIES = dict(retries=2, retry_delay_seconds=[10, 30], retry_condition_fn=retry_if_server_unavailable)
