"""A Dask worker preload for the sweep's own LocalCluster: a worker that closed cleanly exits without Python's teardown.

A sweep waits for its LocalCluster to close before it ranks and ships. Once a
worker process has run Prefect tasks, the interpreter's teardown after the
worker closed (C code only: no Python frame runs in it) takes about half a
second more than a fresh worker's, and the sweep waits for it. `dask_setup`
registers, before any task can run, an exit hook that ends the process with
`os._exit(0)`, but only when the worker closed cleanly: any other exit keeps
Python's teardown and its exit code. Prefect's services (task-run events,
logs) drain in `threading`'s shutdown hooks, which run before any atexit
hook, and atexit hooks registered after this one (our template's stop) run
before it (newest first). The hook flushes logging and the standard
streams first. The worker's own directory is released by its close, not at
teardown.

Only a cluster this flow starts loads it (`flows.sweep.dask_task_runner`); a
shared cluster's workers are not ours to change.

Example:
    >>> from prefect_tensorflow.tasks.training.sweep_worker_exit import PRELOAD
    >>> PRELOAD
    'prefect_tensorflow.tasks.training.sweep_worker_exit'
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import weakref
from typing import Any

PRELOAD = __name__
"""The module name to give `LocalCluster(preload=[...])`."""


def dask_setup(worker: Any) -> None:
    """Dask's preload hook: register `exit_if_closed` for this worker process."""
    atexit.register(exit_if_closed, weakref.ref(worker))


def exit_if_closed(worker_ref: Any) -> None:
    """At exit: end the process now if its worker closed cleanly, else return (Python's teardown goes on)."""
    from distributed.core import Status

    worker = worker_ref()
    if worker is None or worker.status != Status.closed:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(0)
