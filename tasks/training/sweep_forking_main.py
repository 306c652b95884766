"""The sweep trainers' warm template: `python -m prefect_tensorflow.tasks.training.sweep_forking_main`.

Started by `sweep_template` once per Dask worker process (with the environment
and cwd a trainer started by that worker would get), it imports TensorFlow,
the training loop and (with `--with-mlflow`: the sweep tracks) MLflow's client once, runs no TensorFlow op, then
serves `warm_template_main.fork_loop`: for each request it forks a child that
trains one candidate (`train_forked`), as `sweep_trainer_main` would.

Example:
    >>> from prefect_tensorflow.tasks.training.sweep_candidates import TRAINER_MODULE
    >>> from prefect_tensorflow.tasks.training.sweep_forking_main import FORKING_MODULE
    >>> len(FORKING_MODULE) == len(TRAINER_MODULE)  # a forked trainer renames itself in place (`show_as_trainer`)
    True
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

from .sweep_template import FORKING_MODULE, WITH_MLFLOW


def _imports(with_mlflow: bool) -> None:
    from ..lean_import import skip_keras_optional_imports

    skip_keras_optional_imports()  # a process of ours: Keras' scikit-learn and plotting extras are not needed
    import tensorflow  # noqa: F401

    from . import loop, sweep_candidates  # noqa: F401 - the trainer's own imports, done once

    if not with_mlflow:  # an untracked sweep's candidates never import it
        return
    try:  # a tracked candidate's client (the template stays usable without MLflow)
        import mlflow.tracking  # noqa: F401
    except ImportError:
        pass


def show_as_trainer() -> bool:
    """Rewrite this process's command line from the template's module to the trainer's (`warm_process.show_as`),
    so a forked trainer is found like a started one (`stop_local_trainers`, operators' `pgrep -f sweep_trainer_main`)."""
    from ..warm_process import show_as
    from .sweep_candidates import TRAINER_MODULE

    return show_as(FORKING_MODULE, TRAINER_MODULE)


def train_forked(request: dict[str, Any]) -> int:
    """In a forked child: train the candidate in `request["payload"]`, its answer line into `request["answer"]`."""
    from .sweep_candidates import train_from_payload

    started = time.time()
    show_as_trainer()
    with open(request["answer"], "w", encoding="utf-8") as answer:
        sys.stdout = answer
        return train_from_payload(request["payload"], started)


def main() -> int:
    started = time.perf_counter()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us by closing our stdin
    _imports(WITH_MLFLOW in sys.argv[1:])
    from ..promotion.warm_template_main import fork_loop

    return fork_loop(train_forked, started)


if __name__ == "__main__":
    from ..promotion.warm_template_main import exit_now

    exit_now(main())
