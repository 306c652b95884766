"""prefect-tensorflow tasks: one plain module per lifecycle stage, and the Prefect tasks made from them.

The layout says what imports what:

- `checkpoints/` (files, writer, keep policy, selection, the `ModelDir`),
  `storage/` (locations, one backend per scheme), `training/` (one loop,
  its processes), `export/` (SavedModel, frozen graph, verification) and
  `registry/` (MLflow, the champion rule) and `promotion/` (the gate around
  the rule: scoring, approval, serving check) hold the work as plain functions
  and pydantic models. They import neither Prefect nor (until a function
  runs) TensorFlow, so the CLI's plain commands start fast and library
  callers can use them without Prefect.
- `prefect_tasks` makes each task from its plain function (`task(fn, ...)`),
  and `blocks` holds the `MlflowConnection` block. Only these two import Prefect.

This package's names resolve lazily (PEP 562): `from prefect_tensorflow.tasks
import train_with_checkpoints` gives the Prefect task (its plain function is
`train_with_checkpoints.fn`, also `prefect_tensorflow.tasks.training.loop.train_with_checkpoints`),
and only then imports Prefect. `prefect block register -m prefect_tensorflow.tasks`
registers the block.

Example:
    >>> from prefect import flow
    >>> from prefect_tensorflow.tasks import (
    ...     TrainingConfig, export_saved_model, freeze_graph, select_latest_checkpoint, train_with_checkpoints,
    ... )
    >>> @flow
    ... def train_and_ship(model_dir: str) -> int:
    ...     train_with_checkpoints(model_dir, TrainingConfig(steps=500))
    ...     checkpoint = select_latest_checkpoint(model_dir).path
    ...     freeze_graph(checkpoint, "/tmp/iris.pb")
    ...     return export_saved_model(checkpoint, "/tmp/iris-export").version
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    # the Prefect tasks (prefect_tasks.py) and block (blocks.py)
    "train_with_checkpoints": "prefect_tasks",
    "select_latest_checkpoint": "prefect_tasks",
    "select_best_checkpoint": "prefect_tasks",
    "select_checkpoint_at_step": "prefect_tasks",
    "select_checkpoint": "prefect_tasks",
    "freeze_graph": "prefect_tasks",
    "export_saved_model": "prefect_tasks",
    "verify_artifacts": "prefect_tasks",
    "log_frozen_graph_to_mlflow": "prefect_tasks",
    "register_model_version": "prefect_tasks",
    "find_registered_version": "prefect_tasks",
    "check_can_register": "prefect_tasks",
    "set_model_version_aliases": "prefect_tasks",
    "gate_champion": "prefect_tasks",
    "retry_if_server_unavailable": "prefect_tasks",
    "train_sweep_candidate": "prefect_tasks",
    "start_sweep_run": "prefect_tasks",
    "record_sweep_comparison": "prefect_tasks",
    "end_sweep_run": "prefect_tasks",
    "MlflowConnection": "blocks",
    # configs and results (plain pydantic models)
    "TrainingConfig": "configs",
    "ExportConfig": "configs",
    "GateConfig": "configs",
    "CheckpointPolicy": "checkpoints.policy",
    "ModelDir": "checkpoints.model_dir",
    "MlflowConfig": "registry.mlflow_connection",
    "TrainResult": "training.loop",
    "CheckpointRef": "checkpoints.selection",
    "CheckpointInfo": "checkpoints.selection",
    "CheckpointSelection": "checkpoints.selection",
    "FreezeResult": "export.frozen_graph",
    "ExportResult": "export.saved_model",
    "Parity": "export.verification",
    "VerifyReport": "export.verification",
    "RegisteredVersion": "registry.model_versions",
    "GateDecision": "registry.gate",
    "Settings": "settings",
    "Candidate": "training.sweep_candidates",
    "CandidateSpec": "training.sweep_candidates",
    "CandidateResult": "training.sweep_candidates",
    "MultiWorkerOptions": "training.multi_worker",
    "train_multi_worker": "training.multi_worker",
    # errors
    "PrefectTensorFlowError": "errors",
    "CheckpointMismatchError": "errors",
    "ExportError": "errors",
    "FreezeError": "errors",
    "GraphTooLargeError": "errors",
    "ImportStringError": "errors",
    "InvalidCheckpointError": "errors",
    "MetricNotFoundError": "errors",
    "MetricsTimeoutError": "errors",
    "MlflowSettingsError": "errors",
    "MlflowUnavailableError": "errors",
    "ModelDirError": "errors",
    "NoValidCheckpointError": "errors",
    "ParityError": "errors",
    "RegistryError": "errors",
    "StorageError": "errors",
    "TrainingError": "errors",
    "UnsafeParameterError": "errors",
    "SweepError": "training.sweep_candidates",
    "MultiWorkerError": "training.multi_worker",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
