"""prefect-tensorflow tasks: one module per lifecycle stage.

Importing this package does not import TensorFlow; each task imports it when
it runs.

Example:
    >>> from prefect import flow
    >>> from prefect_tensorflow.tasks import select_latest_checkpoint, train_with_checkpoints
    >>> @flow
    ... def train_and_pick(model_dir: str) -> str:
    ...     train_with_checkpoints(model_dir, steps=500)
    ...     return select_latest_checkpoint(model_dir).path
"""

from .errors import (
    CheckpointMismatchError,
    ImportStringError,
    InvalidCheckpointError,
    MetricNotFoundError,
    ModelDirError,
    NoValidCheckpointError,
    PrefectTensorFlowError,
    TrainingError,
)
from .policy import CheckpointPolicy
from .selection import CheckpointInfo, CheckpointRef, select_best_checkpoint, select_latest_checkpoint
from .training import TrainResult, train_with_checkpoints

__all__ = [
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointPolicy",
    "CheckpointRef",
    "ImportStringError",
    "InvalidCheckpointError",
    "MetricNotFoundError",
    "ModelDirError",
    "NoValidCheckpointError",
    "PrefectTensorFlowError",
    "TrainResult",
    "TrainingError",
    "select_best_checkpoint",
    "select_latest_checkpoint",
    "train_with_checkpoints",
]
