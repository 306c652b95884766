"""The environment defaults the command line sets before Prefect or TensorFlow is loaded.

It also makes the process's first `import tensorflow` lean (`tasks/lean_import.py`).

Where things go by default is in `prefect_tensorflow.tasks.settings` (the data
home, `./.prefect-tensorflow`); this module only sets what Prefect and
TensorFlow read from the environment when they are imported.

Example:
    >>> from prefect_tensorflow.flows.defaults import apply_environment_defaults
    >>> env = {}
    >>> apply_environment_defaults(env)
    >>> env["PREFECT_SERVER_ANALYTICS_ENABLED"]
    'false'
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Optional

from prefect_tensorflow.tasks.child_processes import quiet_tensorflow
from prefect_tensorflow.tasks.lean_import import skip_keras_optional_imports

# Prefect's ephemeral API migrates a new SQLite database on first use; on a
# 2-core machine that can take longer than Prefect's default 20 s start-up limit.
EPHEMERAL_STARTUP_TIMEOUT = "180"


def apply_environment_defaults(environ: Optional[MutableMapping[str, str]] = None) -> None:
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
    quiet_tensorflow(env)
    if environ is None:  # this process: its first `import tensorflow` skips Keras's optional extras
        skip_keras_optional_imports()
