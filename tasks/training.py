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

Example:
    >>> from prefect import flow
    >>> from prefect_tensorflow.tasks.training import train_with_checkpoints
    >>> from prefect_tensorflow.tasks.policy import CheckpointPolicy
    >>> @flow
    ... def nightly(model_dir: str = "/models/iris") -> int:
    ...     policy = CheckpointPolicy(save_checkpoints_steps=200)
    ...     return train_with_checkpoints(model_dir, more_steps=1000, policy=policy).final_step
"""

from __future__ import annotations

import math
import os
import shutil
import time
from typing import Any, Callable, Optional

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from . import iris
from .async_save import enable_keras_async_checkpoint
from .checkpoint_files import checkpoint_prefixes, step_of, uncommitted_temp_dirs
from .errors import InvalidCheckpointError, ModelDirError, NoValidCheckpointError, TrainingError
from .importing import build_model, load_object
from .logs import get_logger
from .metrics_log import append_metrics
from .mlflow_connection import MlflowConnection
from .policy import CheckpointPolicy
from .preemption import PreemptionGuard
from .restore import restore_strict
from .selection import CheckpointRef, checkpoint_ref, find_latest_checkpoint
from .tracking import TrainingRun

ProgressCallback = Callable[[int, int, Optional[float]], None]
CheckpointCallback = Callable[[int, str, dict[str, float]], None]


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
    elapsed_seconds: float = 0.0
    mlflow_run_id: Optional[str] = Field(default=None, description="The MLflow run that tracked the training")
    mlflow_run_url: Optional[str] = None


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, received {value!r}")
    return value


def check_arguments(
    *, model: str = iris.MODEL, data: str = iris.DATA, steps: int = 1000, more_steps: Optional[int] = None,
    batch_size: int = 32, seed: int = 0, shuffle_buffer: int = 1000, summary_every_n_steps: int = 100,
    **_: Any,
) -> None:
    """Check `train`'s counts and import strings before anything is written.

    Raises:
        ValueError: a count is not an integer in range.
        ImportStringError: `model` or `data` names nothing importable.
    """
    _check_int("steps", steps, 0)
    if more_steps is not None:
        _check_int("more_steps", more_steps, 0)
    _check_int("batch_size", batch_size, 1)
    _check_int("shuffle_buffer", shuffle_buffer, 1)
    _check_int("summary_every_n_steps", summary_every_n_steps, 1)
    _check_int("seed", seed, 0)
    load_object(model, parameter="model")
    load_object(data, parameter="data")


def _prepare_model_dir(model_dir: str | os.PathLike) -> str:
    path = os.path.abspath(os.fspath(model_dir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ModelDirError(path, "is a file; expected a directory (existing or to be created)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ModelDirError(path, f"cannot be created: {err}") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise ModelDirError(path, "is not writable")
    return path


def _build(model: str, data: str, hparams: dict[str, Any]):
    import tensorflow as tf

    net = build_model(model, hparams)
    if getattr(net, "optimizer", None) is None or getattr(net, "loss", None) is None:
        raise TrainingError(
            f"model {model!r}: expected a compiled model (model.compile(optimizer=..., loss=...)), "
            "received one without an optimizer or a loss"
        )
    loader = load_object(data, parameter="data")
    datasets = {}
    for split in ("train", "eval"):
        ds = loader(split)
        if not isinstance(ds, tf.data.Dataset):
            raise TrainingError(
                f"data {data!r}: expected {split!r} to give a tf.data.Dataset of (features, label), "
                f"received {type(ds).__name__}"
            )
        datasets[split] = ds
    return net, datasets["train"], datasets["eval"]


def train(
    model_dir: str | os.PathLike,
    *,
    model: str = iris.MODEL,
    data: str = iris.DATA,
    steps: int = 1000,
    more_steps: Optional[int] = None,
    batch_size: int = 32,
    seed: int = 0,
    policy: Optional[CheckpointPolicy] = None,
    hparams: Optional[dict[str, Any]] = None,
    shuffle_buffer: int = 1000,
    summary_every_n_steps: int = 100,
    on_progress: Optional[ProgressCallback] = None,
    on_checkpoint: Optional[CheckpointCallback] = None,
) -> TrainResult:
    """Train to global step `steps` (or `more_steps` past the newest checkpoint), checkpointing.

    The plain function behind `train_with_checkpoints`; see the module docstring.
    `on_progress(step, target, loss)` is called after every step and
    `on_checkpoint(step, prefix, metrics)` after every checkpoint.

    Raises:
        ValueError: a count is not a non-negative integer.
        ModelDirError: `model_dir` is a file or cannot be created.
        ImportStringError: `model` or `data` names nothing importable.
        TrainingError: the model or data do not follow their contracts.
        CheckpointMismatchError: the newest checkpoint was written by another model.
    """
    started = time.monotonic()
    check_arguments(
        model=model, data=data, steps=steps, more_steps=more_steps, batch_size=batch_size, seed=seed,
        shuffle_buffer=shuffle_buffer, summary_every_n_steps=summary_every_n_steps,
    )
    policy = policy or CheckpointPolicy()
    hparams = dict(hparams or {})
    model_dir = _prepare_model_dir(model_dir)
    log = get_logger()

    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    net, train_ds, eval_ds = _build(model, data, hparams)
    pipeline = input_pipeline(train_ds, seed=seed, shuffle_buffer=shuffle_buffer, batch_size=batch_size)
    eval_batches = eval_ds.batch(max(batch_size, 256))
    iterator = iter(pipeline)
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    net.optimizer.build(net.trainable_variables)
    ckpt = tf.train.Checkpoint(
        model=net, optimizer=net.optimizer, global_step=global_step, input_iterator=iterator
    )

    for leftover in uncommitted_temp_dirs(model_dir):
        log.warning("removing %s, a checkpoint write cut short by a crash", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    latest = _resume(ckpt, model_dir)
    if latest is not None:
        log.info("resumed from %s (step %d)", latest.path, int(global_step.numpy()))
    manager = tf.train.CheckpointManager(
        ckpt,
        model_dir,
        max_to_keep=policy.keep_checkpoint_max,
        keep_checkpoint_every_n_hours=policy.keep_checkpoint_every_n_hours,
        checkpoint_name=policy.checkpoint_name,
    )
    if policy.async_save:
        enable_keras_async_checkpoint()
    options = tf.train.CheckpointOptions(experimental_enable_async_checkpoint=policy.async_save)

    start_step = step = int(global_step.numpy())
    target = start_step + more_steps if more_steps is not None else steps
    if target < start_step:
        log.warning(
            "%s is already at step %d, past the target step %d; nothing to train",
            model_dir, start_step, target,
        )

    # Training loss since the last checkpoint, summed on the device: no per-step sync.
    # Not part of the checkpoint, so after a resume the first window is shorter.
    loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False)
    loss_count = tf.Variable(0, dtype=tf.int64, trainable=False)

    @tf.function(reduce_retracing=True)
    def train_step(it):
        x, y = next(it)
        with tf.GradientTape() as tape:
            y_pred = net(x, training=True)
            loss = net.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
        grads = tape.gradient(loss, net.trainable_variables)
        net.optimizer.apply_gradients(zip(grads, net.trainable_variables))
        global_step.assign_add(1)
        loss_sum.assign_add(tf.cast(loss, tf.float64))
        loss_count.assign_add(1)
        return loss

    writers = _SummaryWriters(model_dir)  # no event files for a run with nothing to train
    saved: list[str] = []
    last_saved_step = latest.step if latest is not None else None
    last_save_time = time.monotonic()
    metrics: dict[str, float] = dict(latest.metrics) if latest is not None else {}
    rate_time = time.monotonic()

    def save() -> None:
        nonlocal last_saved_step, last_save_time, metrics
        metrics = _evaluate(net, eval_batches)
        if int(loss_count.numpy()):
            metrics["train_loss"] = float(loss_sum.numpy()) / int(loss_count.numpy())
        loss_sum.assign(0.0)
        loss_count.assign(0)
        name = f"{policy.checkpoint_name}-{step}"
        append_metrics(model_dir, step=step, checkpoint=name, metrics=metrics)
        path = manager.save(checkpoint_number=step, options=options)
        with writers.eval.as_default(step=step):
            for key, value in metrics.items():
                tf.summary.scalar(key, value)
        writers.eval.flush()
        saved.append(path)
        last_saved_step, last_save_time = step, time.monotonic()
        log.info("saved checkpoint %s (%s)", path, _fmt(metrics))
        if on_checkpoint is not None:
            on_checkpoint(step, path, dict(metrics))

    preempted = False
    if step < target:
        # Written before the first save, so that the state file stays the last
        # change to the directory (see checkpoint_files.state_file_is_last_change).
        _write_graph(train_step, iterator, model_dir)
        writers.train, writers.eval  # create the event files now, before the first save
    with PreemptionGuard() as guard:
        if policy.save_at_start and last_saved_step != step and step < target:
            save()
        while step < target:
            if guard.requested:
                preempted = True
                log.warning("SIGTERM received at step %d: saving a checkpoint before exiting", step)
                break
            loss_value = train_step(iterator)
            step += 1
            summary_due = step % summary_every_n_steps == 0
            loss = float(loss_value) if summary_due or on_progress is not None else None
            if summary_due:
                now = time.monotonic()
                rate = summary_every_n_steps / max(now - rate_time, 1e-9)
                rate_time = now
                with writers.train.as_default(step=step):
                    tf.summary.scalar("loss", loss)
                    tf.summary.scalar("global_step/sec", rate)
                log.info("step %d/%d: loss %.4f (%.0f steps/s)", step, target, loss, rate)
            if on_progress is not None:
                on_progress(step, target, loss)
            if (
                policy.save_checkpoints_steps is not None and step % policy.save_checkpoints_steps == 0
            ) or (
                policy.save_checkpoints_secs is not None
                and time.monotonic() - last_save_time >= policy.save_checkpoints_secs
            ):
                save()
        if (preempted or policy.save_at_end) and last_saved_step != step:
            save()
        if policy.async_save:
            ckpt.sync()
        writers.flush()

    return TrainResult(
        model_dir=model_dir,
        start_step=start_step,
        final_step=step,
        target_step=target,
        steps_run=step - start_step,
        last_checkpoint=saved[-1] if saved else (latest.path if latest else None),
        checkpoints_saved=len(saved),
        final_metrics=metrics,
        preempted=preempted,
        elapsed_seconds=time.monotonic() - started,
    )


def _resume(ckpt, model_dir: str) -> Optional[CheckpointRef]:
    """Restore `ckpt` from the newest checkpoint of `model_dir` that restores; None if there is none.

    A checkpoint can pass the cheap validation and still fail to restore (a
    flipped bit fails its CRC32C); then the next older valid one is tried.

    Raises:
        TrainingError: `model_dir` holds checkpoints but none is valid or none
            restores. Training from scratch over them would silently throw a
            long training away; move them aside to start over.
        CheckpointMismatchError: the checkpoints were written by another model.
    """
    log = get_logger()
    prefixes = checkpoint_prefixes(model_dir)
    try:
        candidates = [find_latest_checkpoint(model_dir).path]
    except NoValidCheckpointError as err:
        if prefixes:
            raise TrainingError(f"{err}. Move them aside to train from scratch.") from err
        return None
    newest = step_of(candidates[0]) or 0
    candidates += [p for p in prefixes if step_of(p) is not None and step_of(p) < newest]
    failures = []
    for prefix in candidates:
        try:
            ref = checkpoint_ref(prefix)
            restore_strict(ckpt, ref.path)
            return ref
        except InvalidCheckpointError as err:
            failures.append(f"{os.path.basename(prefix)}: {err.reason}")
            log.warning("cannot resume from %s: %s; trying an older checkpoint", prefix, err.reason)
    raise TrainingError(
        f"model dir {model_dir}: no checkpoint restores ({'; '.join(failures)}). "
        "Move them aside to train from scratch."
    )


def input_pipeline(dataset, *, seed: int, shuffle_buffer: int, batch_size: int):
    """Repeat `dataset` forever, shuffle the stream with `seed`, and batch it.

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
        .shuffle(shuffle_buffer, seed=seed)
        .batch(batch_size, drop_remainder=True)
        .with_options(options)
    )


class _SummaryWriters:
    """TensorBoard writers for `model_dir` (training) and `model_dir/eval`, created on first use."""

    def __init__(self, model_dir: str):
        self._model_dir = model_dir
        self._train = self._eval = None

    @property
    def train(self):
        import tensorflow as tf

        if self._train is None:
            self._train = tf.summary.create_file_writer(self._model_dir)
        return self._train

    @property
    def eval(self):
        import tensorflow as tf

        if self._eval is None:
            self._eval = tf.summary.create_file_writer(os.path.join(self._model_dir, "eval"))
        return self._eval

    def flush(self) -> None:
        for writer in (self._train, self._eval):
            if writer is not None:
                writer.flush()


def _evaluate(net, batches) -> dict[str, float]:
    values = net.evaluate(batches, verbose=0, return_dict=True)
    return {str(k): float(v) for k, v in values.items() if math.isfinite(float(v))}


def _write_graph(train_step, iterator, model_dir: str) -> None:
    import tensorflow as tf

    graph_def = train_step.get_concrete_function(iterator).graph.as_graph_def()
    tf.io.write_graph(graph_def, model_dir, "graph.pbtxt", as_text=True)


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


@task(name="train-with-checkpoints")
def train_with_checkpoints(
    model_dir: str,
    model: str = iris.MODEL,
    data: str = iris.DATA,
    steps: int = 1000,
    more_steps: Optional[int] = None,
    batch_size: int = 32,
    seed: int = 0,
    policy: Optional[CheckpointPolicy] = None,
    hparams: Optional[dict[str, Any]] = None,
    tracking: Optional[MlflowConnection] = None,
) -> TrainResult:
    """Train a model with checkpoints, resuming from the model dir's newest valid checkpoint.

    Args:
        model_dir: where checkpoints, event files and `graph.pbtxt` are written.
        model: `"module:attr"` of a builder returning a compiled `keras.Model`.
        data: `"module:attr"` of a loader `(split) -> tf.data.Dataset` of (features, label).
        steps: target global step (the Estimator's `max_steps`).
        more_steps: train this many steps past the newest checkpoint instead.
        batch_size: examples per step.
        seed: random seed of initialisation and shuffling.
        policy: when to checkpoint and what to keep; Estimator defaults when None.
        hparams: keyword arguments for the model builder.
        tracking: the MLflow connection to track the run in (params, the loss
            at every step, checkpoint metrics, the checkpoint list and event
            files); None for no MLflow run.

    Returns:
        What the run did: steps, the last checkpoint, its metrics.

    Raises:
        ModelDirError, ImportStringError, TrainingError, CheckpointMismatchError.

    Example:
        >>> from prefect import flow
        >>> @flow
        ... def train_iris(model_dir: str = "/models/iris") -> str:
        ...     return train_with_checkpoints(model_dir, steps=2000).last_checkpoint
    """
    kwargs = dict(
        model=model, data=data, steps=steps, more_steps=more_steps, batch_size=batch_size, seed=seed,
        policy=policy, hparams=hparams,
    )
    if tracking is None:
        return train(model_dir, **kwargs)
    return train_tracked(model_dir, tracking, **kwargs)


def _checkpoint_metric_names(metrics: dict[str, float]) -> dict[str, float]:
    """Evaluation metrics under `eval/` (as in TensorBoard); `train_loss` (mean since the last checkpoint) as is."""
    return {(key if key == "train_loss" else f"eval/{key}"): value for key, value in metrics.items()}


def train_tracked(model_dir: str | os.PathLike, tracking: MlflowConnection, **kwargs: Any) -> TrainResult:
    """`train(model_dir, **kwargs)` inside one MLflow run (see `tracking.TrainingRun`).

    Arguments are checked before the MLflow run is created: a bad one leaves no run.
    """
    check_arguments(**kwargs)
    _prepare_model_dir(model_dir)
    policy = kwargs.get("policy") or CheckpointPolicy()
    params = {
        "model_dir": os.path.abspath(os.fspath(model_dir)),
        "model": kwargs.get("model", iris.MODEL),
        "data": kwargs.get("data", iris.DATA),
        "steps": kwargs.get("steps", 1000),
        "more_steps": kwargs.get("more_steps"),
        "batch_size": kwargs.get("batch_size", 32),
        "seed": kwargs.get("seed", 0),
        "policy": policy.model_dump(),
        "hparams": dict(kwargs.get("hparams") or {}),
    }
    with TrainingRun(tracking, model_dir=params["model_dir"], params=params) as run:
        result = train(
            model_dir,
            **kwargs,
            on_progress=lambda step, _target, loss: run.log_metric("loss", loss, step),
            on_checkpoint=lambda step, _path, metrics: run.log_metrics(_checkpoint_metric_names(metrics), step),
        )
    return result.model_copy(update={"mlflow_run_id": run.run_id, "mlflow_run_url": run.url})
