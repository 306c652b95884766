"""`train_with_checkpoints`: train a Keras model with TF2 checkpoints that resume exactly.

One `tf.train.Checkpoint` holds everything an exact resume needs, under
stable keys: `model`, `optimizer`, `global_step` and `input_iterator` (the
position of the shuffled, repeated input pipeline). A
`tf.train.CheckpointManager` writes `<model_dir>/model.ckpt-<step>.index`,
`.data-00000-of-00001` and the `checkpoint` state file; TensorBoard event
files (loss every `summary_every_n_steps`, evaluation metrics at each
checkpoint under `eval/`), `graph.pbtxt` and `checkpoint_metrics.jsonl` sit
beside them.

`steps` is the target global step (the Estimator's `max_steps`): after a crash
the same call finishes the same training. With the same seed, TensorFlow's op
determinism makes a resumed run end with the weights of an uninterrupted one.

The run, step by step: resolve the model code (`model_code`), prepare the
model dir, build the model and the input pipeline, resume from the newest
checkpoint that restores (`restore.resume_from_newest`), then loop: one
`tf.function` step, a summary every N steps, a checkpoint when the policy says
so (`CheckpointPolicy.is_due`), written by `CheckpointSaver`.

Example:
    >>> from prefect_tensorflow.tasks.configs import TrainingConfig
    >>> from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    >>> from prefect_tensorflow.tasks.training.loop import train_with_checkpoints
    >>> import tempfile
    >>> config = TrainingConfig(steps=20, policy=CheckpointPolicy(save_checkpoints_steps=10))
    >>> result = train_with_checkpoints(tempfile.mkdtemp(), config)
    >>> result.final_step, result.checkpoints_saved
    (20, 3)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from .. import model_code
from ..checkpoints.files import step_of, uncommitted_temp_dirs
from ..checkpoints.metrics_log import METRICS_FILE, append_metrics, read_metrics
from ..checkpoints.remote import RemoteModelDir
from ..checkpoints.restore import checkpoint_keys, resume_from_newest
from ..checkpoints.selection import select_latest_checkpoint
from ..checkpoints.writer import CheckpointWriter
from ..configs import TrainingConfig
from ..errors import ModelDirError, NoValidCheckpointError, TrainingError, UnsafeParameterError
from ..registry.mlflow_connection import MlflowConfig
from ..registry.tracking import TrainingRun
from ..run_context import get_logger
from ..storage.confined_dirs import OpenDir, open_directory
from ..storage.locations import _remove_entry, parse_location
from . import sidecar_evaluator
from .preemption import PreemptionGuard

ProgressCallback = Callable[[int, int, Optional[float]], None]
"""`(step, target, loss)`: called with the loss at every summary step (every `summary_every_n_steps`),
and with `loss=None` as training advances in between (at most every `PROGRESS_INTERVAL` s)."""
CheckpointCallback = Callable[[int, str, dict[str, float]], None]
"""`(step, checkpoint prefix, metrics)`: called after every checkpoint."""
PROGRESS_INTERVAL = 0.2
PREEMPTED_EVALUATION_WAIT = 30.0


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


def train_with_checkpoints(
    model_dir: str,
    config: Optional[TrainingConfig] = None,
    tracking: Optional[MlflowConfig] = None,
    *,
    on_progress: Optional[ProgressCallback] = None,
    on_checkpoint: Optional[CheckpointCallback] = None,
) -> TrainResult:
    """Train a model with checkpoints, resuming from the model dir's newest valid checkpoint.

    Args:
        model_dir: where checkpoints, event files and `graph.pbtxt` are written (created if missing).
        config: what to train: model, data, steps, batch size, seed, checkpoint policy
            (default: the bundled iris, 1000 steps, the Estimator's policy).
        tracking: the MLflow connection to track the run in (params, the loss,
            checkpoint metrics, the checkpoint list and event files); None for no MLflow run.
        on_progress: called as training advances (the CLI's progress bar).
        on_checkpoint: called after every checkpoint.

    Returns:
        What the run did: steps, the last checkpoint, its metrics, the MLflow run.

    Raises:
        ImportStringError: `config.model` or `config.data` is refused or names nothing importable
            (before anything is written, an MLflow run included).
        ModelDirError: `model_dir` is a file or cannot be created.
        TrainingError: the model or data do not follow their contracts, or the model dir's
            checkpoints are all broken.
        CheckpointMismatchError: the newest checkpoint was written by another model.

    Example:
        >>> from prefect import flow
        >>> from prefect_tensorflow.tasks import TrainingConfig, train_with_checkpoints
        >>> @flow
        ... def nightly(model_dir: str = "/models/iris") -> int:
        ...     return train_with_checkpoints(model_dir, TrainingConfig(more_steps=1000)).final_step
    """
    config = config if isinstance(config, TrainingConfig) else TrainingConfig.model_validate(config or {})
    resolve_model_code(config)
    if config.workers > 1:
        from .multi_worker import train_multi_worker

        return train_multi_worker(model_dir, config, tracking, on_progress=on_progress, on_checkpoint=on_checkpoint)
    location = parse_location(model_dir, parameter="model_dir")
    mirror = None if location.is_local else RemoteModelDir(location.uri)
    local_dir = prepare_model_dir(location.uri) if mirror is None else mirror.pull()
    hooks = _Hooks(on_progress, on_checkpoint, mirror)
    untrusted = None if mirror is None else False  # a remote model dir's local mirror is the run's own scratch dir
    try:
        if tracking is None:
            result = _train(local_dir, config, hooks.progress, hooks.checkpointed, untrusted=untrusted)
        else:
            params = {"model_dir": location.uri, **config.mlflow_params()}
            with TrainingRun(tracking, model_dir=local_dir, params=params, run_name=f"train-{location.name}") as run:
                hooks.run = run
                result = _train(local_dir, config, hooks.progress, hooks.checkpointed, untrusted=untrusted)
                if config.evaluation == "sidecar":
                    hooks.log_evaluations(local_dir)
            result = result.model_copy(update={"mlflow_run_id": run.run_id, "mlflow_run_url": run.url})
    finally:
        if mirror is not None:
            mirror.close()
    if mirror is None:
        return result
    return result.model_copy(update={"model_dir": location.uri, "last_checkpoint": mirror.remote_prefix(result.last_checkpoint)})


class _Hooks:
    """What happens beside the training loop: MLflow metrics, checkpoint publishing, the caller's callbacks."""

    def __init__(
        self,
        on_progress: Optional[ProgressCallback],
        on_checkpoint: Optional[CheckpointCallback],
        mirror: Optional[RemoteModelDir],
    ):
        self.on_progress, self.on_checkpoint, self.mirror = on_progress, on_checkpoint, mirror
        self.run: Optional[TrainingRun] = None
        self.committed: list[int] = []

    def progress(self, step: int, target: int, loss: Optional[float]) -> None:
        if loss is not None and self.run is not None:
            self.run.log_metric("loss", loss, step)
        if self.on_progress is not None:
            self.on_progress(step, target, loss)

    def checkpointed(self, step: int, prefix: str, metrics: dict[str, float]) -> None:
        self.committed.append(step)
        if self.mirror is not None:
            self.mirror.publish(step, prefix)
        if self.run is not None:
            self.run.log_metrics(checkpoint_metric_names(metrics), step)
        if self.on_checkpoint is not None:
            self.on_checkpoint(step, self.mirror.remote_prefix(prefix) or prefix if self.mirror else prefix, metrics)

    def log_evaluations(self, model_dir: str) -> None:
        """Send the evaluation metrics the sidecar recorded for this run's checkpoints to MLflow."""
        if self.run is None:
            return
        recorded = read_metrics(model_dir)
        for step in self.committed:
            evaluated = {k: v for k, v in recorded.get(step, {}).items() if k != "train_loss"}
            if evaluated:
                self.run.log_metrics(checkpoint_metric_names(evaluated), step)


def resolve_model_code(config: TrainingConfig) -> None:
    """Check and import the config's model builder and dataset loader, before anything is written.

    Raises:
        ImportStringError: either is refused (see `model_code.import_string`) or does not import.
        TrainingError: the builder does not accept the config's `hparams`.
    """
    model_code.check_hparams(config.model, dict(config.hparams))
    model_code.load(config.data, "data")


def prepare_model_dir(model_dir: str | os.PathLike) -> str:
    """Create `model_dir` if needed and check it is a writable directory; returns its absolute path.

    Raises:
        ModelDirError: it is a file, cannot be created or is not writable.
    """
    path = parse_location(model_dir, parameter="model_dir").uri
    if os.path.exists(path) and not os.path.isdir(path):
        raise ModelDirError(path, "is a file; expected a directory (existing or to be created)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ModelDirError(path, f"cannot be created: {err}") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise ModelDirError(path, "is not writable")
    return path


def checkpoint_metric_names(metrics: Mapping[str, float]) -> dict[str, float]:
    """Evaluation metrics under `eval/` (as in TensorBoard); `train_loss` (mean since the last checkpoint) as is."""
    return {(key if key == "train_loss" else f"eval/{key}"): value for key, value in metrics.items()}


# --- the run, step by step -----------------------------------------------------------------


def _train(
    model_dir: str,
    config: TrainingConfig,
    on_progress: Optional[ProgressCallback],
    on_checkpoint: Optional[CheckpointCallback],
    *,
    untrusted: Optional[bool] = None,
) -> TrainResult:
    """Train in `model_dir`, opened once (`confined_dirs.open_directory`) and written through its descriptor.

    The checkpoint files, the state file, the metrics lines (in-loop), `graph.pbtxt`, the event files and
    the keep policy's deletions all go through `/proc/self/fd/<fd>` or `dir_fd=`; the state file and the
    metrics lines are written only after `OpenDir.verify`: a model dir moved or replaced mid-training gets
    nothing more, and the training fails saying so. `untrusted` (default: in a deployment run): walked from
    its root without following symlinks, and `eval/`, `graph.pbtxt`, the metrics log and the evaluator's
    lock must not be symlinks.
    """
    with open_directory(model_dir, parameter="model_dir", create=True, untrusted=untrusted) as directory:
        if directory.confined:
            _refuse_symlinked_entries(directory)
        return _train_in(directory, model_dir, config, on_progress, on_checkpoint, untrusted=directory.confined)


def _refuse_symlinked_entries(directory: OpenDir) -> None:
    """The entries training (and its sidecar) open by name must not lead elsewhere through a symlink."""
    for name in ("eval", "graph.pbtxt", METRICS_FILE, sidecar_evaluator.LOCK_FILE):
        if os.path.islink(directory.entry(name)):
            raise UnsafeParameterError(
                "model_dir",
                directory.path,
                f"{directory.display(name)} is a symbolic link; a deployment run writes only inside the model dir",
            )


def _train_in(
    directory: OpenDir,
    model_dir: str,
    config: TrainingConfig,
    on_progress: Optional[ProgressCallback],
    on_checkpoint: Optional[CheckpointCallback],
    *,
    untrusted: bool,
) -> TrainResult:
    import tensorflow as tf

    started = time.monotonic()
    log = get_logger()
    policy = config.policy
    net, train_ds, eval_ds = build_model_and_data(config)
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    net.optimizer.build(net.trainable_variables)
    objects = {"model": net, "optimizer": net.optimizer, "global_step": global_step}

    for leftover in uncommitted_temp_dirs(model_dir):
        log.warning("removing %s, a checkpoint write cut short by a crash", leftover)
        _remove_entry(directory.fd, os.path.basename(leftover))
    if _written_without_input_position(model_dir):
        # Written by several workers (tasks/training/multi_worker.py): their input position is
        # skip(global_step) over the same seeded stream, and so is this process's.
        latest = resume_from_newest(tf.train.Checkpoint(**objects), model_dir)
        iterator = iter(input_pipeline(train_ds, config).skip(int(global_step.numpy())))
        ckpt = tf.train.Checkpoint(**objects, input_iterator=iterator)
    else:
        iterator = iter(input_pipeline(train_ds, config))
        ckpt = tf.train.Checkpoint(**objects, input_iterator=iterator)
        latest = resume_from_newest(ckpt, model_dir)
    if latest is not None:
        log.info("resumed from %s (step %d)", latest.path, int(global_step.numpy()))
    start_step = step = int(global_step.numpy())
    target = config.target_step(start_step)
    if target < start_step:
        log.warning("%s is already at step %d, past the target step %d; nothing to train", model_dir, start_step, target)

    loss_window = LossWindow()
    train_step = make_train_step(net, global_step, loss_window)
    summaries = SummaryWriters(directory.handle)
    if step < target:
        # Written before the first save, so that the state file stays the last change
        # to the directory (see checkpoint_files.state_file_is_last_change).
        write_graph(train_step, iterator, directory.handle)
        summaries.create()
        sidecar_evaluator.prepare(directory.handle)
    evaluator = None
    if config.evaluation == "sidecar" and step < target:
        evaluator = sidecar_evaluator.SidecarEvaluator(model_dir, evaluation_spec(config), directory)
    saver = CheckpointSaver(
        ckpt,
        model_dir,
        config,
        net,
        eval_ds.batch(max(config.batch_size, 256)),
        loss_window,
        summaries,
        on_checkpoint,
        evaluator,
        last_step=latest.step if latest is not None else None,
        metrics=dict(latest.metrics) if latest is not None else {},
        directory=directory,
        untrusted=untrusted,
    )
    progress = ProgressReporter(on_progress, target)
    preempted = False
    loop_started = time.monotonic()
    with PreemptionGuard() as guard:
        if policy.is_due_at_start(step, target, saver.last_step):
            saver.save(step)
        while step < target:
            if guard.requested:
                preempted = True
                log.warning("SIGTERM received at step %d: saving a checkpoint before exiting", step)
                break
            loss = train_step(iterator)
            step += 1
            if step % config.summary_every_n_steps == 0:
                progress.loss_at(step, summaries.training_step(step, float(loss), config.summary_every_n_steps, target))
            else:
                progress.advance(step)
            if policy.is_due(step, saver.seconds_since_save()):
                saver.save(step)
        if policy.is_due_at_end(step, saver.last_step, preempted=preempted):
            saver.save(step)
        loop_seconds = time.monotonic() - loop_started
        progress.finish(step)
        # After a preemption the evaluator gets a bounded wait: the grace period may be short.
        saver.finish(evaluation_timeout=PREEMPTED_EVALUATION_WAIT if preempted else None)
        summaries.flush()

    return TrainResult(
        model_dir=model_dir,
        start_step=start_step,
        final_step=step,
        target_step=target,
        steps_run=max(step - start_step, 0),
        last_checkpoint=saver.saved[-1] if saver.saved else (latest.path if latest else None),
        checkpoints_saved=len(saver.saved),
        final_metrics=saver.metrics,
        preempted=preempted,
        elapsed_seconds=time.monotonic() - started,
        loop_seconds=loop_seconds,
    )


def _written_without_input_position(model_dir: str) -> bool:
    """Whether the newest valid checkpoint lacks `input_iterator` (multi-worker checkpoints do)."""
    try:
        newest = select_latest_checkpoint(model_dir).path
    except (NoValidCheckpointError, ModelDirError):
        return False
    return not any(key.startswith("input_iterator/") for key in checkpoint_keys(newest))


def build_model_and_data(config: TrainingConfig):
    """Seed everything, build the compiled model and both splits, checking each contract.

    Raises:
        TrainingError: the builder refused the hparams, returned something else than a
            compiled `keras.Model`, or the loader did not return a `tf.data.Dataset`.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    net = model_code.build_model(config.model, dict(config.hparams))
    if getattr(net, "optimizer", None) is None or getattr(net, "loss", None) is None:
        raise TrainingError(
            f"model {config.model!r}: expected a compiled model (model.compile(optimizer=..., loss=...)), "
            "received one without an optimizer or a loss"
        )
    return net, model_code.load_split(config.data, "train"), model_code.load_split(config.data, "eval")


def input_pipeline(dataset, config: TrainingConfig):
    """Repeat `dataset` forever, shuffle the stream with the config's seed, and batch it.

    Repeating before shuffling means the shuffle is instantiated once, when
    the training iterator is created. Shuffling after repeating would draw each
    epoch's order from a seed generator shared by every iterator of the
    dataset, and TensorFlow's async checkpoint creates a second iterator (to
    copy the input position), which would change the order training sees.
    """
    import tensorflow as tf

    options = tf.data.Options()
    # Autotuning has nothing to tune here and its thread makes deleting the
    # iterator wait up to seconds after training ends.
    options.autotune.enabled = False
    return (
        dataset.repeat()
        .shuffle(config.shuffle_buffer, seed=config.seed)
        .batch(config.batch_size, drop_remainder=True)
        .with_options(options)
    )


class LossWindow:
    """The training loss summed on the device since the last checkpoint: no per-step host sync.

    Not part of the checkpoint, so after a resume the first window is shorter.
    """

    def __init__(self) -> None:
        import tensorflow as tf

        self.total = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self.count = tf.Variable(0, dtype=tf.int64, trainable=False)

    def take_mean(self) -> Optional[float]:
        """The mean since the last call (None if no step ran), and start a new window."""
        count = int(self.count.numpy())
        mean = float(self.total.numpy()) / count if count else None
        self.total.assign(0.0)
        self.count.assign(0)
        return mean


def make_train_step(net, global_step, window: LossWindow):
    """One optimisation step as a `tf.function` over the input iterator; returns the loss tensor."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def train_step(iterator):
        x, y = next(iterator)
        with tf.GradientTape() as tape:
            y_pred = net(x, training=True)
            loss = net.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
        grads = tape.gradient(loss, net.trainable_variables)
        net.optimizer.apply_gradients(zip(grads, net.trainable_variables))
        global_step.assign_add(1)
        window.total.assign_add(tf.cast(loss, tf.float64))
        window.count.assign_add(1)
        return loss

    return train_step


class CheckpointSaver:
    """Takes each checkpoint: the training loss of its window, its metrics as the evaluation mode says, the write.

    - `in_loop`: evaluate now, append the metrics line, then save (the line is there before the commit);
    - `sidecar`: save; once committed, the sidecar evaluator is told, and writes the line;
    - `none`: append a line with the training loss only, then save.

    The write is `CheckpointWriter`'s: a snapshot now, the files and the commit in the background
    (`policy.async_save`). `on_checkpoint(step, prefix, metrics)` is called once a checkpoint is committed.
    """

    def __init__(
        self,
        checkpoint: Any,
        model_dir: str,
        config: TrainingConfig,
        net: Any,
        eval_batches: Any,
        loss_window: LossWindow,
        summaries: SummaryWriters,
        on_checkpoint: Optional[CheckpointCallback],
        evaluator: Optional[sidecar_evaluator.SidecarEvaluator],
        *,
        last_step: Optional[int],
        metrics: dict[str, float],
        directory: Optional[OpenDir] = None,
        untrusted: Optional[bool] = None,
    ):
        self.model_dir, self.config, self.policy = model_dir, config, config.policy
        self.net, self.eval_batches, self.loss_window = net, eval_batches, loss_window
        self.summaries, self.on_checkpoint, self.evaluator = summaries, on_checkpoint, evaluator
        self.last_step, self.metrics = last_step, metrics
        self.saved: list[str] = []
        self._pending: dict[int, dict[str, float]] = {}
        self._last_time = time.monotonic()
        self.writer = CheckpointWriter(
            checkpoint,
            model_dir,
            self.policy,
            on_committed=self._committed,
            may_delete=self._evaluated,
            directory=directory,
            untrusted=untrusted,
        )
        self.directory = self.writer.directory
        self._handle = self.directory.handle  # the metrics log is read and appended through the descriptor

    def seconds_since_save(self) -> float:
        return time.monotonic() - self._last_time

    def save(self, step: int) -> str:
        train_loss = self.loss_window.take_mean()
        metrics: dict[str, float] = {} if train_loss is None else {"train_loss": train_loss}
        if self.config.evaluation != "sidecar":
            if self.config.evaluation == "in_loop":
                metrics = {**evaluate(self.net, self.eval_batches), **metrics}
                self.summaries.evaluation(step, metrics)
            self.directory.verify()
            append_metrics(self._handle, step=step, checkpoint=f"{self.policy.checkpoint_name}-{step}", metrics=metrics)
        self._pending[step] = metrics
        path = self.writer.save(step)
        self.saved.append(path)
        self.last_step, self.metrics, self._last_time = step, metrics, time.monotonic()
        get_logger().info("saved checkpoint %s (%s)", path, format_metrics(metrics) or "evaluation to follow")
        return path

    def _evaluated(self, prefix: str) -> bool:
        """Whether the keep policy may delete `prefix`: the sidecar has written its line (or is gone)."""
        if self.evaluator is None or not self.evaluator.alive():
            return True
        return step_of(prefix) in read_metrics(self._handle)

    def _committed(self, step: int, prefix: str) -> None:
        metrics = self._pending.pop(step, {})
        if self.evaluator is not None:
            self.evaluator.notify(step, metrics.get("train_loss"))
        if self.on_checkpoint is not None:
            self.on_checkpoint(step, prefix, dict(metrics))

    def finish(self, *, evaluation_timeout: Optional[float]) -> None:
        """Wait for the writes and for the evaluator (at most `evaluation_timeout` s); take the last checkpoint's metrics."""
        self.writer.finish()
        if self.evaluator is not None:
            self.evaluator.finish(timeout=evaluation_timeout)
        self.writer.apply_keep_policy()
        if self.last_step is not None:
            self.metrics = read_metrics(self._handle).get(self.last_step, self.metrics)


def evaluation_spec(config: TrainingConfig) -> sidecar_evaluator.EvaluationSpec:
    """What the sidecar evaluator needs, with the model code as trusted import strings (already checked)."""
    return sidecar_evaluator.EvaluationSpec(
        model=model_code.import_string(config.model, "model"),
        data=model_code.import_string(config.data, "data"),
        hparams=dict(config.hparams),
        batch_size=max(config.batch_size, 256),
        checkpoint_name=config.policy.checkpoint_name,
    )


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


def evaluate(net, batches) -> dict[str, float]:
    """The compiled metrics of `net` on `batches`, finite values only."""
    values = net.evaluate(batches, verbose=0, return_dict=True)
    return {str(k): float(v) for k, v in values.items() if math.isfinite(float(v))}


def write_graph(train_step, iterator, model_dir: str) -> None:
    """`graph.pbtxt`: the training step's graph, as the Estimator wrote it."""
    import tensorflow as tf

    graph_def = train_step.get_concrete_function(iterator).graph.as_graph_def()
    tf.io.write_graph(graph_def, model_dir, "graph.pbtxt", as_text=True)


def format_metrics(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
