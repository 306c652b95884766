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


# Prefect's ephemeral API migrates a new SQLite database on first use; on a
# 2-core machine that can take longer than Prefect's default 20 s start-up limit.
EPHEMERAL_STARTUP_TIMEOUT = "180"


def data_home() -> str:
    """`tasks.data_home.data_home()`, imported when called: importing the tasks package imports
    Prefect, which must not happen before `apply_environment_defaults` (see there)."""
    from prefect_tensorflow.tasks.data_home import data_home as tasks_data_home

    return tasks_data_home()


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
