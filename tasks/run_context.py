"""What the code knows of the Prefect run it is called from, without importing Prefect.

The plain modules of this package never import Prefect: a library caller or
the CLI's plain commands do not load it. When Prefect is already loaded (a
flow or task run is under way), these helpers ask it: the run's logger, its
ids and UI URL for MLflow tags, and whether the run was started from a
deployment (whose parameters came from the UI and are untrusted).

Example:
    >>> from prefect_tensorflow.tasks.run_context import get_logger, prefect_run_tags
    >>> get_logger().name
    'prefect_tensorflow'
    >>> prefect_run_tags()
    {}
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

LOGGER_NAME = "prefect_tensorflow"


def _prefect_context() -> Any:
    """`prefect.context` if Prefect is loaded and a flow or task run is active, else None."""
    context = sys.modules.get("prefect.context")
    if context is None:
        return None
    if context.TaskRunContext.get() is None and context.FlowRunContext.get() is None:
        return None
    return context


def get_logger() -> logging.Logger | logging.LoggerAdapter:
    """The current Prefect run's logger (so messages reach the UI), else `logging.getLogger("prefect_tensorflow")`."""
    if _prefect_context() is not None:
        from prefect.logging import get_run_logger

        return get_run_logger()
    return logging.getLogger(LOGGER_NAME)


def flush_run_logs() -> None:
    """Send the current Prefect run's queued log lines to its API now, through Prefect's own handler.

    Prefect sends them in batches (every 2 s): a line another run reads back (the training's target step,
    for a resubmission) must not be lost with a SIGKILL before the next batch. Outside a run, or where API
    logging is off, nothing happens.

    Example:
        >>> flush_run_logs()  # outside a Prefect run: nothing to send
    """
    if _prefect_context() is None:
        return
    from prefect.logging.handlers import APILogHandler

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, APILogHandler):
                handler.flush()  # blocks up to 5 s; in a running event loop it only schedules the send
                return


def prefect_run_tags() -> dict[str, str]:
    """`prefect.flow_run_id`, `prefect.flow_run_url`, ... of the current run, for MLflow tags; {} outside one."""
    if _prefect_context() is None:
        return {}
    from prefect.runtime import deployment, flow_run, task_run

    values = {
        "prefect.flow_run_id": flow_run.id,
        "prefect.flow_run_name": flow_run.name,
        "prefect.flow_name": flow_run.flow_name,
        "prefect.flow_run_url": flow_run.ui_url,
        "prefect.task_run_id": task_run.id,
        "prefect.deployment_id": deployment.id,
        "prefect.deployment_name": deployment.name,
    }
    return {key: str(value) for key, value in values.items() if value}


def current_flow_run_id() -> Optional[str]:
    """The id of the flow run this is called from, or None outside one."""
    if _prefect_context() is None:
        return None
    from prefect.runtime import flow_run

    return flow_run.id or None


def in_deployment_run() -> bool:
    """Whether this runs inside a flow run created from a deployment (its own or a parent's).

    Such a run's parameters were typed into the Prefect UI (or posted to the
    API) by anyone allowed to press Run: they are untrusted. A library or CLI
    caller runs its own code and is trusted.
    """
    if _prefect_context() is None:
        return False
    from prefect.runtime import deployment, flow_run

    return bool(deployment.id or flow_run.parent_deployment_id)
