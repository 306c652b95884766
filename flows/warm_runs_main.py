"""The warm flow-run template's program: Prefect, the served flows, TensorFlow and MLflow imported once, a child forked per run.

`warm_runs.WarmRunTemplate` starts it (`python -m prefect_tensorflow.flows.warm_runs_main MODULE...`,
with serve's environment) and speaks `warm_template_main`'s protocol to it (`fork_loop`: one JSON
object a line, a child forked per request, its exit reported). The arguments name the flow modules
of the deployments served warm; only modules of `prefect_tensorflow.flows` are accepted (the runner
passes the entrypoints of `prefect.yaml`, never anything a run's parameters say).

Like the serving-check template it runs no TensorFlow op, starts no thread and opens no connection
before forking (`fork_loop` refuses otherwise), so a child copies imported code only. A child
(`run_flow_run`) is what
`python -m prefect.engine` is for the runner's cold path: its own session, dying with the template
(`PR_SET_PDEATHSIG`), output to the log the request names; it takes the environment the runner built
for the run (`PREFECT__FLOW_RUN_ID`, the control channel's port and token, the heartbeat), reads the
flow run from the API and runs it with Prefect's engine in a fresh settings context. The flow's own
parameter checks run there, exactly as in a spawned process.

Example:
    >>> from prefect_tensorflow.flows.warm_runs_main import check_modules
    >>> check_modules(["prefect_tensorflow.flows.export_checkpoint"])
    ['prefect_tensorflow.flows.export_checkpoint']
    >>> check_modules(["os"])
    Traceback (most recent call last):
    ...
    ValueError: warm flow modules must be modules of prefect_tensorflow.flows, got 'os'
"""

from __future__ import annotations

import importlib
import os
import re
import runpy
import sys
import time
import warnings
from typing import Any

from prefect_tensorflow.tasks.promotion.warm_template import fork_template_here, stop_template
from prefect_tensorflow.tasks.promotion.warm_template_main import fork_loop, import_all

FLOW_MODULE = re.compile(r"prefect_tensorflow\.flows\.[a-z_][a-z0-9_]*")

WARM_IMPORTS = (
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.runner._control_channel",
    "prefect_tensorflow.tasks.checkpoints.selection",
    "prefect_tensorflow.tasks.export.saved_model",
    "prefect_tensorflow.tasks.export.frozen_graph",
    "prefect_tensorflow.tasks.registry.model_versions",
    "prefect_tensorflow.tasks.registry.tracking",
    "prefect_tensorflow.tasks.promotion.champion_gate",
    "prefect_tensorflow.tasks.promotion.scoring_server",
    "prefect_tensorflow.tasks.registry.mlflow_client",
    "prefect_tensorflow.tasks.registry.sqlite_store",
    "prefect_tensorflow.tasks.data.source",
    "prefect_tensorflow.tasks.iris",
    "prefect.concurrency.sync",
    "mlflow",
    "mlflow.pyfunc",
    "mlflow.store.model_registry.sqlalchemy_store",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_workspace_store",
    "mlflow.store.tracking.sqlalchemy_workspace_store",
    "sqlalchemy.dialects.sqlite",
    "alembic.command",
    "git",
    "tensorflow_serving.apis.prediction_log_pb2",
)
"""What an `export-checkpoint` run imports lazily (TensorFlow first, through the lean import): the modules
new in `sys.modules` after the flow's chain ran in a process that had imported only the flow module."""


def check_modules(names: list[str]) -> list[str]:
    """The flow module names, refused unless each is a module of `prefect_tensorflow.flows`.

    Raises:
        ValueError: a name outside `prefect_tensorflow.flows`.
    """
    for name in names:
        if not FLOW_MODULE.fullmatch(name):
            raise ValueError(f"warm flow modules must be modules of prefect_tensorflow.flows, got {name!r}")
    return list(names)


def warm_imports(modules: list[str]) -> None:
    """Import the flow modules, TensorFlow (without Keras' optional imports) and `WARM_IMPORTS`."""
    from prefect_tensorflow.tasks.lean_import import skip_keras_optional_imports

    skip_keras_optional_imports()
    for name in modules:
        importlib.import_module(name)
    import tensorflow  # noqa: F401

    for name in WARM_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional store or a renamed Prefect internal: that run imports it itself
            pass
    import_all()  # what a run's serving template, forked from the run, needs (`run_flow_run`)


def run_flow_run(request: dict[str, Any]) -> int:
    """Run the flow run the request's environment names, as `python -m prefect.engine` would; its exit code."""
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import Settings

    os.environ.clear()
    os.environ.update(request["env"])
    if sys.path and sys.path[0] == os.getcwd():  # `python -m` put the template's directory first; a run gets its own
        sys.path[0] = request["cwd"]
    os.chdir(request["cwd"])
    sys.argv = ["prefect.engine"]
    fork_template_here()  # now, while the run has no thread: its serving check forks from a template ready at once
    with SettingsContext(profile=get_settings_context().profile, settings=Settings()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules": the template imported it
                runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
        except SystemExit as done:
            return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        finally:
            send_pending_logs_and_events()
            stop_template()  # the child ends with os._exit, which skips the atexit that would remove its directory
    return 0


def send_pending_logs_and_events(timeout: float = 10.0) -> None:
    """Send the run's queued logs and events, as a normal interpreter exit does for `python -m prefect.engine`.

    Prefect's log and event workers drain at the interpreter's thread shutdown, which the forked child's
    `os._exit` skips: without this, the lines a run logs last (its error, "Finished in state Failed")
    never reach the API, and the UI's logs of a failed run are empty.
    """
    from prefect._internal.concurrency.services import QueueService

    QueueService.drain_all(timeout=timeout, at_exit=True)


def main(argv: list[str]) -> int:
    import signal

    started = time.perf_counter()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner stops us by closing our stdin
    warm_imports(check_modules(argv))
    return fork_loop(run_flow_run, started)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
