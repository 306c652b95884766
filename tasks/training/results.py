"""What a training run reports: `TrainResult`, the callbacks' shapes, the metric names it logs.

Shared by the one-process run (`loop.py`) and the multi-worker caller (`multi_worker.py`).

Example:
    >>> from prefect_tensorflow.tasks.training.results import checkpoint_metric_names
    >>> checkpoint_metric_names({"accuracy": 0.9, "train_loss": 0.3})
    {'eval/accuracy': 0.9, 'train_loss': 0.3}
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..checkpoints.model_dir import ModelDir
from ..errors import ModelDirError

ProgressCallback = Callable[[int, int, Optional[float]], None]
"""`(step, target, loss)`: called with the loss at every summary step (every `summary_every_n_steps`),
and with `loss=None` as training advances in between (at most every ``summaries.PROGRESS_INTERVAL`` s)."""
CheckpointCallback = Callable[[int, str, dict[str, float]], None]
"""`(step, checkpoint prefix, metrics)`: called after every checkpoint."""


class TrainResult(BaseModel):
    """What a training run did; small and picklable, never TensorFlow objects."""

    model_config = ConfigDict(frozen=True)

    model_dir: str
    start_step: int = Field(description="Global step the run started (or resumed) at")
    final_step: int = Field(description="Global step at the end of the run")
    target_step: int
    steps_run: int
    last_checkpoint: Optional[str] = Field(description="Prefix of the newest checkpoint written")
    checkpoints_saved: int
    final_metrics: dict[str, float] = Field(default_factory=dict)
    preempted: bool = False
    elapsed_seconds: float = Field(default=0.0, description="The whole call, waiting for the last write and evaluation")
    loop_seconds: float = Field(
        default=0.0, description="The training loop alone: first step to the last save's return (0 from train_multi_worker)"
    )
    mlflow_run_id: Optional[str] = Field(default=None, description="The MLflow run that tracked the training")
    mlflow_run_url: Optional[str] = None


def checkpoint_metric_names(metrics: Mapping[str, float]) -> dict[str, float]:
    """Evaluation metrics under `eval/` (as in TensorBoard); `train_loss` (mean since the last checkpoint) as is."""
    return {(key if key == "train_loss" else f"eval/{key}"): value for key, value in metrics.items()}


def prepare_model_dir(model_dir: ModelDir) -> str:
    """Create the local `model_dir` if needed and check it is a writable directory; returns its absolute path.

    Raises:
        ModelDirError: it is a file, cannot be created or is not writable.
    """
    path = model_dir.uri
    if os.path.exists(path) and not os.path.isdir(path):
        raise ModelDirError(path, "is a file; expected a directory (existing or to be created)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ModelDirError(path, f"cannot be created: {err}") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise ModelDirError(path, "is not writable")
    return path


def log_sidecar_evaluations(run: Any, model_dir: str, steps: list[int]) -> None:
    """Send the evaluation metrics the sidecar recorded for `steps` (this run's checkpoints) to the MLflow `run`."""
    from ..checkpoints.metrics_log import read_metrics

    recorded = read_metrics(model_dir)
    for step in steps:
        evaluated = {k: v for k, v in recorded.get(step, {}).items() if k != "train_loss"}
        if evaluated:
            run.log_metrics(checkpoint_metric_names(evaluated), step)
