"""The sidecar evaluators' warm template: `python -m prefect_tensorflow.tasks.training.evaluator_forking_main`.

Started by `evaluator_template` (once per trainer process that asks for it, with
the environment and cwd an evaluator started from there would get), it lowers
its CPU priority as an evaluator does, imports TensorFlow, Keras and the
evaluator once, runs no TensorFlow op, then serves
`warm_template_main.fork_loop`: for each training's request it forks a child
that is that training's evaluator (`evaluate_forked`). The child opens what a
started evaluator inherits (the model dir's descriptor, its stdin pipe, its
ready pipe) through `/proc/<trainer>/fd/<n>`, the trainer's own open
descriptors, renames its command line to the started evaluator's (the two
module names have the same length), and runs `sidecar_evaluator_main.main`.

Example:
    >>> from prefect_tensorflow.tasks.training.evaluator_process import ENTRY_MODULE, FORKING_MODULE
    >>> FORKING_MODULE == __name__ and len(FORKING_MODULE) == len(ENTRY_MODULE)
    True
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
from typing import Any

from .evaluator_process import ENTRY_MODULE, EVALUATOR_NICE, FORKING_MODULE, PARENT_VARIABLE


def _imports() -> None:
    from ..lean_import import skip_keras_optional_imports

    skip_keras_optional_imports()
    import keras  # noqa: F401
    import tensorflow  # noqa: F401

    from ..data import source  # noqa: F401
    from . import sidecar_evaluator_main  # noqa: F401


def _inherit(trainer: int, fd: int, flags: int) -> int:
    """The trainer's open descriptor `fd`, opened again here (what a started evaluator inherits)."""
    return os.open(f"/proc/{trainer}/fd/{fd}", flags | os.O_CLOEXEC)


def evaluate_forked(request: dict[str, Any]) -> int:
    """In a forked child: be the evaluator of the training that sent `request` (its descriptors' numbers in the
    trainer, the model dir's path and root); returns `sidecar_evaluator_main.main`'s exit status."""
    from ..warm_process import show_as
    from .sidecar_evaluator_main import main as run_evaluator

    show_as(FORKING_MODULE, ENTRY_MODULE)
    trainer = int(request["trainer"])
    stdin = _inherit(trainer, int(request["stdin"]), os.O_RDONLY)
    os.dup2(stdin, 0)
    os.close(stdin)
    sys.stdin = open(0, closefd=False)
    directory = _inherit(trainer, int(request["directory"]), os.O_RDONLY | os.O_DIRECTORY)
    ready = _inherit(trainer, int(request["ready"]), os.O_WRONLY)
    argv = [str(request["path"]), "--fd", str(directory), "--ready-fd", str(ready)]
    if request.get("root") is not None:
        argv += ["--root", str(request["root"])]
    os.environ.clear()
    os.environ.update(request["env"])  # what a started evaluator gets
    os.environ[PARENT_VARIABLE] = str(os.getppid())  # it dies with the template, which dies with the trainer
    return run_evaluator(argv, nice=False)


def main() -> int:
    started = time.perf_counter()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us by closing our stdin
    os.nice(EVALUATOR_NICE)  # the import, and every evaluator forked from here, at the evaluator's priority
    _imports()
    gc.freeze()  # the imports' objects out of every collection: an evaluator's collections copy none of their pages
    from ..promotion.warm_template_main import fork_loop

    return fork_loop(evaluate_forked, started)


if __name__ == "__main__":
    from ..promotion.warm_template_main import exit_now

    exit_now(main())
