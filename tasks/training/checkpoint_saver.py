"""`CheckpointSaver`: each checkpoint of a training, in one process or on every worker of several.

It takes the training loss of the window before the checkpoint, its metrics as
the evaluation mode says, and hands the write to `CheckpointWriter` (the one
writer: a snapshot now, the files, the commit and the keep policy after):

- `in_loop`: evaluate now, append the metrics line, then save (the line is there before the commit);
- `sidecar`: save; once committed, the sidecar evaluator is told, and writes the line; the keep
  policy deletes a checkpoint only once it has its line (or no evaluator is left);
- `none`: append a line with the training loss only, then save.

With several workers every worker saves (the snapshot may run collectives, as
TensorFlow's multi-worker guide says), and only the chief's copy counts: it
writes into the model dir, evaluates and appends the metrics lines; the
others write into a throwaway directory of their own (`throwaway_dir`). The
sidecar evaluator then runs beside the caller, not the chief: the chief's
keep policy asks the model dir's evaluator lock whether one still evaluates,
and the caller applies the last sweep once the evaluator is done
(`checkpoints.writer.apply_keep_policy`).

Example:
    >>> from prefect_tensorflow.tasks.training.checkpoint_saver import throwaway_dir
    >>> import os
    >>> path = throwaway_dir(1)
    >>> os.path.basename(path).startswith("ptf-worker1-"), os.path.isdir(path)
    (True, True)
    >>> os.rmdir(path)
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any, Optional

import numpy as np

from ..checkpoints.files import step_of, uncommitted_temp_dirs
from ..checkpoints.metrics_log import METRICS_FILE, append_metrics, read_metrics
from ..checkpoints.writer import CheckpointWriter
from ..configs import TrainingConfig
from ..errors import NonFiniteLossError, UnsafeParameterError
from ..run_context import get_logger
from ..storage.confined_dirs import OpenDir
from ..storage.local import _remove_entry
from . import sidecar_evaluator
from .model_and_data import LossWindow
from .replicas import ONE_PROCESS, Replicas
from .results import CheckpointCallback
from .summaries import SummaryWriters, format_metrics


def throwaway_dir(index: int) -> str:
    """A new temporary directory for the checkpoints of worker `index` (not the chief): written, never read."""
    return tempfile.mkdtemp(prefix=f"ptf-worker{index}-")


def remove_uncommitted(directory: OpenDir) -> None:
    """Remove the `<prefix>_temp` directories of checkpoint writes a crash cut short (through the descriptor)."""
    for leftover in uncommitted_temp_dirs(directory.handle):
        get_logger().warning(
            "removing %s, a checkpoint write cut short by a crash", directory.display(os.path.basename(leftover))
        )
        _remove_entry(directory.fd, os.path.basename(leftover))


def refuse_symlinked_entries(directory: OpenDir) -> None:
    """The entries training (and its sidecar) open by name must not lead elsewhere through a symlink.

    Raises:
        UnsafeParameterError: one of them is a symbolic link (a deployment run writes only inside the model dir).
    """
    for name in ("eval", "graph.pbtxt", METRICS_FILE, sidecar_evaluator.LOCK_FILE):
        if os.path.islink(directory.entry(name)):
            raise UnsafeParameterError(
                "model_dir",
                directory.path,
                f"{directory.display(name)} is a symbolic link; a deployment run writes only inside the model dir",
            )


def _checkpointed_variables(checkpoint: Any) -> list:
    """The variables of the checkpoint's `model` and `optimizer` (the weights a resume would restore)."""
    found: list[Any] = []
    for name in ("model", "optimizer"):
        owner = getattr(checkpoint, name, None)
        found.extend(getattr(owner, "variables", None) or [])
    return found


class CheckpointSaver:
    """Takes each checkpoint (see the module docstring); `on_checkpoint(step, prefix, metrics)` once it is committed.

    Args:
        checkpoint: the `tf.train.Checkpoint` to save.
        directory: where this process writes (the model dir, opened; a worker's throwaway dir).
        config: the training (evaluation mode, checkpoint policy).
        evaluate_now: the in-loop evaluation (`in_loop` only): the compiled metrics of the current weights.
        loss_window: the training loss since the last checkpoint.
        summaries: the TensorBoard writers (`in_loop` metrics go to `eval/`).
        evaluator: the sidecar evaluator this process started (told of each commit), if any.
        replicas: one process, or a worker of several: whether this copy counts (`chief`; the others compute
            nothing but the loss sum), the sum over workers, whether the sidecar runs beside the caller.
        resumed: the checkpoint resumed from (`CheckpointRef`: its step and metrics), if any.
        untrusted: as `CheckpointWriter`'s.
    """

    def __init__(
        self,
        checkpoint: Any,
        directory: OpenDir,
        config: TrainingConfig,
        *,
        evaluate_now: Optional[Callable[[], dict[str, float]]],
        loss_window: LossWindow,
        summaries: Optional[SummaryWriters],
        on_checkpoint: Optional[CheckpointCallback],
        evaluator: Optional[sidecar_evaluator.SidecarEvaluator] = None,
        replicas: Replicas = ONE_PROCESS,
        resumed: Any = None,
        untrusted: Optional[bool] = None,
    ):
        chief = replicas.chief
        self.config, self.policy, self.chief = config, config.policy, chief
        self.evaluate_now, self.loss_window, self.summaries = evaluate_now, loss_window, summaries
        self.on_checkpoint, self.evaluator, self.reduce_sum = on_checkpoint, evaluator, replicas.reduce_sum
        # a sidecar started by someone else (the multi-worker caller) evaluates this model dir
        self.sidecar_elsewhere = chief and replicas.evaluator_elsewhere and config.evaluation == "sidecar"
        self.last_step: Optional[int] = resumed.step if resumed is not None else None
        self.metrics: dict[str, float] = dict(resumed.metrics) if resumed is not None else {}
        self.saved: list[str] = []
        self._pending: dict[int, dict[str, float]] = {}
        self._last_time = time.monotonic()
        policy = self.policy
        if not chief:  # throwaway copies: the newest one only
            policy = policy.model_copy(update={"keep_checkpoint_max": 1, "keep_checkpoint_every_n_hours": None})
        self.writer = CheckpointWriter(
            checkpoint,
            directory.path,
            policy,
            on_committed=self._committed,
            may_delete=self._evaluated,
            directory=directory,
            untrusted=untrusted,
        )
        self.directory, self.checkpoint = directory, checkpoint
        self._finite_flags: Any = None
        self._watched: list[Any] = []
        self._handle = directory.handle  # the metrics log is read and appended through the descriptor

    def seconds_since_save(self) -> float:
        return time.monotonic() - self._last_time

    def prepare(self) -> None:
        """Trace and run once what every save runs in the training thread (the snapshot, the finite check).

        The first call of a `tf.function` traces it and builds its executor (20-60 ms each for iris); a
        training calls this before its first step, where it traces its train step.
        """
        self.writer.prepare()
        self._finite_check()()

    def _finite_check(self) -> Any:
        """The `tf.function` giving one bool per floating variable of the checkpoint: all finite?"""
        import tensorflow as tf

        if self._finite_flags is None:
            self._watched = [v for v in _checkpointed_variables(self.checkpoint) if tf.as_dtype(v.dtype).is_floating]
            variables = self._watched

            @tf.function
            def finite_flags():  # one bool per variable; no int64 copy of the weights (twice their size)
                flags = [tf.reduce_all(tf.math.is_finite(v)) for v in variables]
                return tf.stack(flags) if flags else tf.zeros([0], tf.bool)

            self._finite_flags = finite_flags
        return self._finite_flags

    def save(self, step: int) -> str:
        """Checkpoint `step` (every worker calls it at the same step); returns its prefix.

        Raises:
            NonFiniteLossError: the training loss since the last checkpoint, or a weight, is NaN or infinite
                (nothing written).
        """
        train_loss = self.loss_window.take_mean(self.reduce_sum)
        self._refuse_non_finite(step, train_loss)
        metrics: dict[str, float] = {} if train_loss is None else {"train_loss": train_loss}
        if self.chief and self.config.evaluation != "sidecar":
            if self.config.evaluation == "in_loop":
                assert self.evaluate_now is not None
                metrics = {**self.evaluate_now(), **metrics}
                if self.summaries is not None:
                    self.summaries.evaluation(step, metrics)
            self.directory.verify()
            append_metrics(self._handle, step=step, checkpoint=f"{self.policy.checkpoint_name}-{step}", metrics=metrics)
        self._pending[step] = metrics
        path = self.writer.save(step)
        self.last_step, self._last_time = step, time.monotonic()
        if self.chief:
            self.saved.append(path)
            self.metrics = metrics
            get_logger().info("saved checkpoint %s (%s)", path, format_metrics(metrics) or "evaluation to follow")
        return path

    def _refuse_non_finite(self, step: int, train_loss: Optional[float]) -> None:
        """Raise `NonFiniteLossError` when the loss since the last save or any weight is NaN or infinite.

        The weights are checked too because a NaN input can poison them while the loss stays finite (a ReLU
        after a NaN kernel may give 0, so the logits, and the loss, look sane). Every worker calls the same
        collectives here, so all of them stop together.
        """
        all_finite = self._finite_check()
        failing = [v for v, ok in zip(self._watched, all_finite().numpy()) if not ok]
        bad = self.reduce_sum(float(len(failing)))
        if (train_loss is None or math.isfinite(train_loss)) and bad == 0:
            return
        named = []
        for variable in failing[:4]:
            values = np.asarray(variable.numpy())
            name = getattr(variable, "path", None) or variable.name
            named.append(f"{name}: {int(np.size(values) - np.isfinite(values).sum())} of {np.size(values)}")
        weights = (
            f"{int(bad)} variables; {', '.join(named) or 'on another worker'}{' ...' if len(failing) > 4 else ''}" if bad else ""
        )
        loss = train_loss if train_loss is not None and not math.isfinite(train_loss) else None
        raise NonFiniteLossError(
            self.directory.path, loss, step, last_good_step=self.last_step, since=self.last_step or 0, weights=weights
        )

    def _evaluated(self, prefix: str) -> bool:
        """Whether the keep policy may delete `prefix`: the sidecar has written its line (or is gone)."""
        if self.evaluator is not None:
            if not self.evaluator.alive():
                return True
        elif not self.sidecar_elsewhere or not sidecar_evaluator.evaluator_running(self._handle):
            return True
        return step_of(prefix) in read_metrics(self._handle)

    def _committed(self, step: int, prefix: str) -> None:
        metrics = self._pending.pop(step, {})
        if self.evaluator is not None:
            self.evaluator.notify(step, metrics.get("train_loss"))
        if self.chief and self.on_checkpoint is not None:
            self.on_checkpoint(step, prefix, dict(metrics))

    def raise_if_failed(self) -> None:
        """Raise a background checkpoint write's error now (`CheckpointWriter.raise_if_failed`)."""
        self.writer.raise_if_failed()

    def abandon(self) -> None:
        """The training failed: stop the writer (its write under way ends or is cleaned up) and this process's
        evaluator (at once: the next training's evaluator catches up), so that nothing outlives the training."""
        try:
            self.writer.abandon()
        finally:
            if self.evaluator is not None:
                self.evaluator.stop()

    def finish(self, *, evaluation_timeout: Optional[float] = None, stop_evaluator: bool = False) -> None:
        """Wait for the writes and for this process's evaluator (at most `evaluation_timeout` s; with
        `stop_evaluator`, a cancel or a timeout, it is stopped at once: `SidecarEvaluator.stop`); take the last
        checkpoint's metrics. The keep policy's last sweep waits for the evaluator: here when it is this
        process's, the caller's own when it runs elsewhere."""
        self.writer.finish()
        if self.evaluator is not None:
            if stop_evaluator:
                self.evaluator.stop()
            else:
                self.evaluator.finish(timeout=evaluation_timeout)
        if not self.sidecar_elsewhere:
            self.writer.apply_keep_policy()
        if self.chief and self.last_step is not None:
            self.metrics = read_metrics(self._handle).get(self.last_step, self.metrics)
