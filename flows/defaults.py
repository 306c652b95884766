"""Embedded defaults of the main job: where it writes when nothing is configured.

Everything `make run` writes goes under one local data directory,
`./.prefect-tensorflow` (or `$PREFECT_TENSORFLOW_HOME`).

Example:
    >>> from prefect_tensorflow.flows.defaults import default_model_dir
    >>> default_model_dir().endswith("models/iris")
    True
"""

from __future__ import annotations

import os

from prefect_tensorflow.tasks.data_home import HOME_ENV, data_home  # noqa: F401 - re-exported
from prefect_tensorflow.tasks.mlflow_connection import retry_if_server_unavailable

# Tasks that talk to MLflow are retried later when the server was down (after
# their own in-task retries); a corrupt checkpoint or a parity failure is not.
MLFLOW_TASK_RETRIES = dict(retries=2, retry_delay_seconds=[10, 30], retry_condition_fn=retry_if_server_unavailable)

# Prefect's ephemeral API migrates a new SQLite database on first use; on a
# 2-core machine that can take longer than Prefect's default 20 s start-up limit.
EPHEMERAL_STARTUP_TIMEOUT = "180"


def default_model_dir() -> str:
    """Where the bundled iris model is trained by default."""
    return os.path.join(data_home(), "models", "iris")


def default_export_base() -> str:
    """Where the bundled iris model's SavedModel versions go by default."""
    return os.path.join(data_home(), "exports", "iris")


def default_frozen_dir() -> str:
    """Where frozen graphs of the bundled iris model go by default."""
    return os.path.join(data_home(), "frozen", "iris")


def apply_environment_defaults(environ: dict[str, str] | None = None) -> None:
    """Set the environment defaults the CLI needs, leaving anything the user set alone.

    Called before Prefect or TensorFlow is imported: Prefect reads its settings
    and TensorFlow its log level when they load.
    """
    env = os.environ if environ is None else environ
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_TIMEOUT)
    # The ephemeral server's telemetry heartbeat races the first migration of a
    # fresh SQLite database ("database is locked", logged at ERROR) and needs
    # the network, which `make run` must not.
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # 3 hides TensorFlow's C++ info, warnings and the "failed call to cuInit"
    # error every CPU-only machine prints; Python-level errors still raise.
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
