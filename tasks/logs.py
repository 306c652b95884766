"""One logger for plain functions and Prefect runs alike.

Inside a Prefect flow or task run, messages go to the run's logger (and so to
the Prefect UI); outside one, to the standard `prefect_tensorflow` logger.

Example:
    >>> from prefect_tensorflow.tasks.logs import get_logger
    >>> get_logger().info("selected %s", "model.ckpt-1000")
"""

from __future__ import annotations

import logging


def get_logger() -> logging.Logger | logging.LoggerAdapter:
    """The current Prefect run's logger, or `logging.getLogger("prefect_tensorflow")`."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger

        if TaskRunContext.get() or FlowRunContext.get():
            return get_run_logger()
    except Exception:  # noqa: BLE001 - outside Prefect, or Prefect not importable
        pass
    return logging.getLogger("prefect_tensorflow")
