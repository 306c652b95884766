"""What a training run shows as it goes: TensorBoard event files, the progress callback, log lines.

Example:
    >>> from prefect_tensorflow.tasks.training.summaries import ProgressReporter, format_metrics
    >>> seen = []
    >>> ProgressReporter(lambda step, target, loss: seen.append((step, loss)), 10).loss_at(5, 0.5)
    >>> seen, format_metrics({"loss": 0.51234})
    ([(5, 0.5)], 'loss=0.5123')
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any, Optional

from ..run_context import get_logger
from .results import ProgressCallback

PROGRESS_INTERVAL = 0.2


class SummaryWriters:
    """TensorBoard event files: the training loss and steps/s in `model_dir`, eval metrics in `model_dir/eval`."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self._train: Any = None
        self._eval: Any = None
        self._rate_time = time.monotonic()

    def create(self) -> None:
        """Create the event files now (before the first save: see `_train`)."""
        import tensorflow as tf

        if self._train is None:
            self._train = tf.summary.create_file_writer(self.model_dir)
            self._eval = tf.summary.create_file_writer(os.path.join(self.model_dir, "eval"))

    def training_step(self, step: int, loss: float, every: int, target: int) -> float:
        """Write the loss and the step rate at `step`; log them; return the loss."""
        import tensorflow as tf

        now = time.monotonic()
        rate = every / max(now - self._rate_time, 1e-9)
        self._rate_time = now
        self.create()
        with self._train.as_default(step=step):
            tf.summary.scalar("loss", loss)
            tf.summary.scalar("global_step/sec", rate)
        get_logger().info("step %d/%d: loss %.4f (%.0f steps/s)", step, target, loss, rate)
        return loss

    def evaluation(self, step: int, metrics: Mapping[str, float]) -> None:
        """Write a checkpoint's evaluation metrics to `eval/` at `step`."""
        import tensorflow as tf

        self.create()
        with self._eval.as_default(step=step):
            for key, value in metrics.items():
                tf.summary.scalar(key, value)
        self._eval.flush()

    def flush(self) -> None:
        for writer in (self._train, self._eval):
            if writer is not None:
                writer.flush()


class ProgressReporter:
    """Calls `on_progress` with each summary step's loss, and in between at most every
    `PROGRESS_INTERVAL` seconds (a step costs a comparison, never a host sync), and at the end."""

    def __init__(self, callback: Optional[ProgressCallback], target: int):
        self.callback, self.target = callback, target
        self._next = 0.0

    def loss_at(self, step: int, loss: float) -> None:
        if self.callback is not None:
            self._next = time.monotonic() + PROGRESS_INTERVAL
            self.callback(step, self.target, loss)

    def advance(self, step: int) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if now >= self._next or step == self.target:
            self._next = now + PROGRESS_INTERVAL
            self.callback(step, self.target, None)

    def finish(self, step: int) -> None:
        if self.callback is not None:
            self.callback(step, self.target, None)


def format_metrics(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
