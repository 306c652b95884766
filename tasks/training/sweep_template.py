"""The sweep trainers' warm template in this (Dask worker) process: a trainer forked per candidate.

`fork_trainer` asks this process's template (`sweep_forking_main`, a
`warm_process.WarmTemplate` started with exactly the environment and cwd a
trainer started from here would get) for a child that trains one candidate:
the spec and connection travel on the template's stdin (a pipe, never argv or
a file), the answer line comes back in `answer_path`, the output goes to the
candidate's log. A template whose environment or cwd differs from what a
trainer would get now is replaced first. `launch_template` starts it without
waiting (a sweep's LocalCluster does so on every worker as it comes up, so
TensorFlow imports while Prefect submits the tasks). A template that cannot
start or fork makes `fork_trainer` answer None: the caller starts the
trainer cold (`sweep_trainer_main`).

Lifetime and kills: a killed trainer is one forked child (the template and
its Dask worker go on); a killed Dask worker closes its template's stdin, and
the template SIGKILLs its children and exits; a killed template takes its
children with it (`PR_SET_PDEATHSIG`).

Example:
    >>> from prefect_tensorflow.tasks.training.sweep_template import template_key
    >>> env, cwd = template_key(threads=1)
    >>> dict(env)["TF_NUM_INTRAOP_THREADS"], cwd == __import__("os").getcwd()
    ('1', True)
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional

from ..child_processes import child_env
from ..warm_process import ForkedProcess, TemplateSlot, WarmTemplate

FORKING_MODULE = "prefect_tensorflow.tasks.training.sweep_forking_main"
"""The template's module (`python -m`); as long as `sweep_trainer_main`'s name, so a forked trainer can rename itself."""

WITH_MLFLOW = "--with-mlflow"
"""The template's flag: import MLflow's client too (the sweep tracks its candidates)."""

ENV_PARENT = "PREFECT_TENSORFLOW_SWEEP_PARENT"
"""The trainer's parent pid variable (`child_processes.die_with_parent`; a forked trainer's parent is the template)."""

_logger = logging.getLogger(__name__)
_slot = TemplateSlot()


def template_key(threads: int) -> tuple[tuple[tuple[str, str], ...], str]:
    """What a trainer started from here now would see: its environment (`child_env`) and cwd."""
    return tuple(sorted(child_env(ENV_PARENT, threads).items())), os.getcwd()


def _maker(key: tuple[tuple[tuple[str, str], ...], str], tracked: bool) -> Any:
    env, cwd = key
    argv = [sys.executable, "-m", FORKING_MODULE, *([WITH_MLFLOW] if tracked else [])]
    return lambda: WarmTemplate(argv, env=dict(env), cwd=cwd)


def launch_template(threads: int = 1, tracked: bool = True) -> Optional[int]:
    """Start this process's template for trainers of `threads` threads, without waiting for its imports; its pid.

    For `client.run` on a sweep's Dask workers: never raises (a template that cannot start is reported by the
    first `fork_trainer`). `tracked=False` (a sweep without MLflow) leaves MLflow's client out of the template:
    about 1 s less CPU per worker while the first candidates wait; a tracked candidate forked from it imports it.
    """
    key = template_key(threads)
    _slot.launch(_maker(key, tracked), key)
    template = _slot.current()
    return template.process.pid if template is not None and template.process is not None else None


def fork_trainer(payload: dict[str, Any], threads: int, log_path: str, answer_path: str) -> Optional[ForkedProcess]:
    """A trainer forked from this process's template, training `payload` (what `sweep_trainer_main` reads on
    stdin), or None: start it cold. A template found dead (or dying on this request) is restarted once."""
    key = template_key(threads)
    tracked = payload.get("connection") is not None
    child, why = _slot.fork(_maker(key, tracked), "train", {"payload": payload, "answer": answer_path}, log_path, key)
    if child is None:
        _logger.warning("warm sweep trainer unavailable (%s): starting it cold", why)
    return child


def template_pid() -> Optional[int]:
    """The pid of this process's template, if it started one."""
    template = _slot.current()
    return template.process.pid if template is not None and template.process is not None else None


def stop_template() -> None:
    """Stop this process's template and its trainers (at exit; a test may call it)."""
    _slot.stop()
