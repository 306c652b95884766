"""The sweep trainer process: `python -m prefect_tensorflow.tasks.training.sweep_trainer_main`, the candidate's
spec and MLflow connection as JSON on stdin (`sweep_candidates.trainer_main`; started by `train_candidate`).

Example:
    >>> from prefect_tensorflow.tasks.training.sweep_candidates import TRAINER_MODULE
    >>> TRAINER_MODULE == __name__
    True
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from .sweep_candidates import trainer_main

    sys.exit(trainer_main())
