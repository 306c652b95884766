"""The warm template: one isolated process with TensorFlow and MLflow's scoring server imported, forked per check.

A serving check in a fresh `python -I` process spends most of its time
importing TensorFlow (and, for `mlflow models serve`, MLflow). `fork_check`
asks a template process (`warm_template_main.py`, started lazily once per
parent process with `python -I`, no project code, cwd a temporary directory)
to `os.fork()` a child that does the check: a cold load of the SavedModel
(`kind="load"`, what `serving_check_main.py` does) or MLflow's scoring
server for a registered version (`kind="serve"`). The child is a fresh
process as far as the SavedModel is concerned (the template ran no
TensorFlow op and has no eager context), in a session of its own; the
answer is a `ForkedProcess` with the `subprocess.Popen` methods the checks
and `child_processes.stop_process_group` use.

A warm flow run (`flows/warm_runs_main.py`) does not launch one: before its
run starts (no thread, no TensorFlow op yet) it forks itself into its serving
template (`fork_template_here`), ready at once because the warm flow-run
template imported the template's modules too. That fork trims `sys.path` to
a launched template's and drops the project's modules (importing them
registers nothing with TensorFlow or Keras, which a test checks), so its
checks still run without project code.

Lifetime: the template is stopped at this process's exit (`atexit`), and it
exits by itself when its stdin closes, so a parent killed with SIGKILL
leaves no template and no check behind (the children also die with the
template, `PR_SET_PDEATHSIG`). A template found dead is restarted once; when
it cannot start, or a fork fails, `fork_check` answers None and the caller
runs the cold path.

Peak memory: a forked child's peak RSS (`ru_maxrss`, `VmHWM`) starts from
the template's resident set at the fork (the pages it shares with the
template: NumPy, TensorFlow, MLflow, imported once) and adds what the check
touched: what a serving process holding those imports and the model holds
resident, not the extra memory the fork cost. It is lower than a fresh
process's figure, which also counts what importing touched and released (on
this machine, iris: 386 MB forked vs 797 MB fresh; a 101 MB model: 488 vs
1446 MB): a `ServingLimits.max_peak_memory_mb` tuned on cold figures is
looser on warm ones. A template forked from a warm run starts from that
run's larger resident set (Prefect and the flow imported too): iris, 423 MB.

The process machinery (the template, its children, its slot in this process)
is `tasks.warm_process`, shared with the sweep trainers' template.

Example:
    >>> from prefect_tensorflow.tasks.promotion.warm_template import MAIN, ForkedProcess
    >>> MAIN.endswith("warm_template_main.py"), ForkedProcess(12345).poll() is None
    (True, True)
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Literal, Optional

from ..warm_process import START_TIMEOUT, ForkedProcess, TemplateSlot, WarmTemplate, WarmTemplateError

__all__ = [
    "MAIN",
    "ForkedProcess",
    "WarmTemplate",
    "WarmTemplateError",
    "fork_check",
    "fork_template_here",
    "launch_template",
    "running_template",
    "stop_template",
]

MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "warm_template_main.py")

_logger = logging.getLogger(__name__)
_slot = TemplateSlot()


def _new_template() -> WarmTemplate:
    return WarmTemplate([sys.executable, "-I", MAIN])  # cwd: the template's own temporary directory


def running_template(timeout: float = START_TIMEOUT) -> WarmTemplate:
    """This process's serving template, started if there is none or it died.

    Raises:
        WarmTemplateError: it could not start.
    """
    return _slot.running(_new_template, timeout=timeout)


def launch_template() -> None:
    """Start this process's serving template without waiting for its imports (nothing if one runs or starts):
    a flow that will register a version calls it first, so the imports overlap its export and freeze."""
    _slot.launch(_new_template)


def fork_template_here() -> bool:
    """Make a fork of this process this process's serving template (no launch, no imports to wait for); True if
    it did. For a process that imported the template's modules (`warm_template_main.import_all`), runs no
    thread but its main one and no TensorFlow op: a warm flow run calls it before its run starts.

    The fork differs from a launched template in what it has imported (this process's modules besides the
    template's, e.g. Prefect) and in its `sys.path`, trimmed to what `python -I` would give (no cwd, no
    `PYTHONPATH`); like a launched one it runs in its own directory with this process's environment.

    Example:
        >>> fork_template_here.__name__
        'fork_template_here'
    """
    from . import warm_template_main

    problem = warm_template_main.fork_problem()
    if problem is not None:
        _logger.warning("serving template not forked (%s): it is launched when needed", problem)
        return False
    template = _new_template()
    try:
        path = _isolated_path()
        template.start_forked(lambda: _serve_checks(warm_template_main, path))
    except OSError as err:
        template.stop()
        _logger.warning("serving template not forked (%s): it is launched when needed", err)
        return False
    _slot.adopt(template)
    return True


def _isolated_path() -> list[str]:
    """This process's `sys.path` as `python -I <warm_template_main.py>` would have it: the template's directory
    first, without the cwd (`''`) and the `PYTHONPATH` entries."""
    dropped = {os.getcwd(), *(os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)}
    return [os.path.dirname(MAIN), *(p for p in sys.path if p and os.path.abspath(p) not in dropped)]


def _serve_checks(program: Any, path: list[str]) -> int:
    """The forked template's body: `sys.path` as a launched template's, the project's modules dropped (they
    register nothing with TensorFlow or Keras: `tests/test_warm_template.py` checks), then its loop."""
    sys.path[:] = path
    for name in [m for m in sys.modules if m.split(".")[0] == "prefect_tensorflow"]:
        del sys.modules[name]
    return int(program.serve_checks(time.perf_counter()))


def stop_template() -> None:
    """Stop this process's serving template, if it runs (at exit; a test may call it)."""
    _slot.stop()


def fork_check(kind: Literal["load", "serve"], request: dict[str, Any], log_path: str) -> Optional[ForkedProcess]:
    """A child of the warm template running the check `request` (see `warm_template_main`), or None: run it cold.

    A template found dead (or dying on this request) is restarted once; a template that cannot start
    or cannot fork answers None (the reason is logged).

    Example:
        >>> fork_check.__name__
        'fork_check'
    """
    child, why = _slot.fork(_new_template, kind, request, log_path)
    if child is None:
        _logger.warning("warm serving check unavailable (%s): running the cold path", why)
    return child
