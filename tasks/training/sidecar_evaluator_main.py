"""The sidecar evaluator process (see `sidecar_evaluator`): `python -m prefect_tensorflow.tasks.training.sidecar_evaluator_main
<model_dir> [--fd N [--root R]] [--ready-fd W]`, then the `EvaluationSpec` and one committed step a line on stdin.

With `--fd` (the trainer's descriptor of the model dir, inherited) everything goes through that
descriptor, confined as the trainer opened it (`--root`: the root it was walked from).

Example:
    >>> from prefect_tensorflow.tasks.training.sidecar_evaluator_main import inherited_directory
    >>> inherited_directory(["/models/iris"])
    ('/models/iris', None)
"""

from __future__ import annotations

import gc
import json
import os
import sys
from typing import Optional

from ..child_processes import die_with_parent
from ..errors import StorageError
from ..lean_import import skip_keras_optional_imports
from ..storage.confined_dirs import OpenDir
from .evaluator_process import EVALUATOR_NICE, PARENT_VARIABLE
from .sidecar_evaluator import READY_BYTE, EvaluationSpec, Evaluator, evaluator_lock


def inherited_directory(argv: list[str]) -> tuple[str, Optional[OpenDir]]:
    """`<model_dir> [--fd N [--root R]]`: the model dir, and the trainer's open descriptor of it if handed over."""
    model_dir, options = argv[0], dict(zip(argv[1::2], argv[2::2]))
    if "--fd" not in options:
        return model_dir, None  # an older trainer: by path, as before
    fd = int(options["--fd"])
    path = os.path.normpath(model_dir)
    return model_dir, OpenDir(
        path, fd, os.dup(fd), os.path.basename(path) or ".", False, root=options.get("--root"), parameter="model_dir"
    )


def ready_descriptor(argv: list[str]) -> Optional[int]:
    """`--ready-fd W`: the pipe to write `READY_BYTE` to once the model is built (None: not asked).

    Example:
        >>> ready_descriptor(["/models/iris", "--fd", "3", "--ready-fd", "5"]), ready_descriptor(["/models/iris"])
        (5, None)
    """
    options = dict(zip(argv[1::2], argv[2::2]))
    return int(options["--ready-fd"]) if "--ready-fd" in options else None


def main(argv: list[str], *, nice: bool = True) -> int:
    """The sidecar: `<model_dir> [--fd N [--root R]]`, the spec then steps on stdin; 0, or 3 when it had to stop.

    With `--fd` (the trainer's descriptor of the model dir, inherited) everything goes through it; see `Evaluator`.
    `nice=False`: this process runs at the evaluator's priority already (forked from `evaluator_forking_main`).
    """
    die_with_parent(PARENT_VARIABLE)  # a killed trainer takes its evaluator along
    if nice:
        os.nice(EVALUATOR_NICE)  # one thread at a lower priority: a share of one core while training competes
    skip_keras_optional_imports()
    model_dir, directory = inherited_directory(argv)
    ready_fd = ready_descriptor(argv)
    work_dir = directory.handle if directory is not None else model_dir
    spec = EvaluationSpec.model_validate_json(sys.stdin.readline())
    try:
        with evaluator_lock(work_dir):  # one evaluator per model dir; a previous one finishes first
            evaluator = Evaluator(model_dir, spec, directory)
            if ready_fd is not None:  # the trainer evaluates in its own process until this says ready
                evaluator.build()
                gc.freeze()  # TensorFlow's ~0.4 M objects, out of every later collection's walk
                os.write(ready_fd, READY_BYTE)
                os.close(ready_fd)
            evaluator.catch_up()
            ended = False
            for line in sys.stdin:
                if line.strip():
                    message = json.loads(line)
                    if message.get("end"):
                        ended = True
                        break
                    evaluator.evaluate(int(message["step"]), message.get("train_loss"))
            if not ended:  # the training failed: the next training's evaluator catches up
                print("the training ended without finishing; the evaluator stops", flush=True)
                return 0
            evaluator.catch_up()  # what was committed but never announced
    except StorageError as err:
        print(f"the evaluator stops: {err}", flush=True)
        return 3
    finally:
        if directory is not None:
            directory.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
