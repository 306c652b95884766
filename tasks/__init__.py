"""prefect-tensorflow tasks: one module per lifecycle stage.

Importing this package does not import TensorFlow; each task imports it when
it runs. `MlflowConnection` is a Prefect Block: `prefect block register -m
prefect_tensorflow.tasks` makes it appear in the UI.

Example:
    >>> from prefect import flow
    >>> from prefect_tensorflow.tasks import (
    ...     export_saved_model, freeze_graph, select_latest_checkpoint, train_with_checkpoints,
    ... )
    >>> @flow
    ... def train_and_ship(model_dir: str) -> int:
    ...     train_with_checkpoints(model_dir, steps=500)
    ...     checkpoint = select_latest_checkpoint(model_dir).path
    ...     freeze_graph(checkpoint, "/tmp/iris.pb")
    ...     return export_saved_model(checkpoint, "/tmp/iris-export").version
"""

from .errors import (
    CheckpointMismatchError,
    ExportError,
    FreezeError,
    GraphTooLargeError,
    ImportStringError,
    InvalidCheckpointError,
    MetricNotFoundError,
    MlflowSettingsError,
    MlflowUnavailableError,
    ModelDirError,
    NoValidCheckpointError,
    RegistryError,
    ParityError,
    PrefectTensorFlowError,
    TrainingError,
)
from .exporting import ExportResult, export_saved_model
from .freezing import FreezeResult, freeze_graph
from .mlflow_connection import MlflowConnection
from .registry import GateDecision, RegisteredVersion, register_model_version
from .tracking import log_frozen_graph_to_mlflow
from .verification import Parity, VerifyReport, verify_artifacts
from .policy import CheckpointPolicy
from .selection import CheckpointInfo, CheckpointRef, select_best_checkpoint, select_latest_checkpoint
from .training import TrainResult, train_with_checkpoints

__all__ = [
    "ExportError",
    "ExportResult",
    "FreezeError",
    "FreezeResult",
    "GraphTooLargeError",
    "ParityError",
    "export_saved_model",
    "GateDecision",
    "MlflowConnection",
    "MlflowSettingsError",
    "MlflowUnavailableError",
    "RegisteredVersion",
    "RegistryError",
    "log_frozen_graph_to_mlflow",
    "register_model_version",
    "freeze_graph",
    "Parity",
    "VerifyReport",
    "verify_artifacts",
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
