"""A warm template for this process's sidecar evaluators: each training's evaluator forked, not a new Python.

A sidecar evaluator started as a new process spends ~4 s of CPU importing
TensorFlow and Keras before its first checkpoint, on the cores the training
uses. A process that trains more than once (a notebook, a script that trains
several models, a long-lived worker) can call `launch_template()` once:
`python -m prefect_tensorflow.tasks.training.evaluator_forking_main` starts
(at the evaluator's CPU priority), imports them, and from then on each
training's evaluator is a fork of it (`fork_evaluator`, asked by
`SidecarEvaluator`), which has only its model to build. A training that
starts while the template is still importing, or after it died, or in an
environment or cwd other than the one it was launched for, starts its
evaluator as a new process, as without a template: `fork_evaluator` never
waits. The environment a started evaluator would get goes with each fork
request (a pipe, never argv); only the variables read at start-up
(`IMPORT_TIME_PREFIXES`: TensorFlow's, Keras', Python's) and the cwd must be
those the template started with. One template per process; it exits with the process (its stdin
closes) and takes its evaluators along.

What the forked evaluator does is the started one's, through the same
descriptors: it opens the trainer's own open descriptors (the model dir, its
stdin and ready pipes) through `/proc/<trainer>/fd/<n>`, so it works in the
directory the trainer opened, not by its path, and its output goes to the
model dir's `eval/evaluator.log` the trainer opened. Linux only (elsewhere
`fork_evaluator` answers None).

Example:
    >>> from prefect_tensorflow.tasks.training.evaluator_template import template_ready
    >>> template_ready()  # none launched by this process
    False
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional

from ..child_processes import child_env
from ..warm_process import START_TIMEOUT, ForkedProcess, TemplateSlot, WarmTemplate, WarmTemplateError
from .evaluator_process import FORKING_MODULE, PARENT_VARIABLE

_logger = logging.getLogger(__name__)
_slot = TemplateSlot()


IMPORT_TIME_PREFIXES = ("TF_", "TF2_", "KERAS_", "CUDA", "OMP_", "KMP_", "MKL_", "PYTHON", "LD_", "HDF5_", "TPU_")
"""Variables read when TensorFlow, Keras and Python start (the template's time, not the fork's): they must match."""


def evaluator_env() -> dict[str, str]:
    """The environment an evaluator started from here now would get (one TensorFlow thread)."""
    import tensorflow  # noqa: F401 - its import sets variables (TF2_BEHAVIOR, KMP_*): taken after it

    return child_env(PARENT_VARIABLE, threads=1)


def template_key(env: Optional[dict[str, str]] = None) -> tuple[tuple[tuple[str, str], ...], str]:
    """What a template must have started with to fork this process's evaluators now: the variables read at start-up
    (`IMPORT_TIME_PREFIXES`) and the cwd. The rest of the environment is sent with each fork request."""
    env = evaluator_env() if env is None else env
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES))), os.getcwd()


def _maker(env: dict[str, str], cwd: str) -> Any:
    return lambda: WarmTemplate([sys.executable, "-m", FORKING_MODULE], env=env, cwd=cwd)


def launch_template() -> None:
    """Start this process's evaluator template without waiting for its imports (nothing if one runs or starts
    for this environment and cwd; a template that cannot start is not tried again, and evaluators start cold).

    Example:
        >>> launch_template()  # doctest: +SKIP
    """
    if sys.platform.startswith("linux"):
        env = evaluator_env()
        _slot.launch(_maker(env, os.getcwd()), template_key(env))


def wait_until_ready(timeout: float = START_TIMEOUT) -> bool:
    """Wait (at most `timeout` s) until the launched template has imported everything; whether it has."""
    template = _slot.current()
    if template is None:
        return False
    if template.starting():
        try:
            template.wait_ready(timeout)
        except WarmTemplateError as err:
            _logger.warning("the evaluator template could not start: %s", err)
            return False
    return template.alive()


def template_ready() -> bool:
    """Whether this process has a template ready to fork an evaluator for this environment and cwd."""
    return _slot.ready(template_key()) is not None


def fork_evaluator(request: dict[str, Any], log_path: str) -> Optional[ForkedProcess]:
    """An evaluator forked from the ready template (`request`: see `evaluator_forking_main.evaluate_forked`; the
    environment a started evaluator would get is added), its output appended to `log_path`; None at once when there is no ready template for this environment and cwd, or
    the fork failed (said in the log): the caller starts it as a new process."""
    if _slot.current() is None:
        return None  # none launched (and no TensorFlow import for the key: the multi-worker caller has none)
    env = evaluator_env()
    template = _slot.ready(template_key(env))
    if template is None:
        return None
    try:
        return template.fork("evaluate", {**request, "env": env}, log_path)
    except WarmTemplateError as err:
        _logger.warning("the evaluator template could not fork an evaluator (%s): starting it as a new process", err)
        return None


def template_pid() -> Optional[int]:
    """The pid of this process's template, if it started one."""
    template = _slot.current()
    return template.process.pid if template is not None and template.process is not None else None


def stop_template() -> None:
    """Stop this process's template and its evaluators (at exit; a test may call it)."""
    _slot.stop()
