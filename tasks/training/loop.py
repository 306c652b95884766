"""`train_with_checkpoints`: train a Keras model with TF2 checkpoints that resume exactly.

One `tf.train.Checkpoint` holds everything an exact resume needs, under
stable keys: `model`, `optimizer`, `global_step`, and `input_iterator` (the
position of the shuffled, repeated input pipeline) only for data without a
known length: otherwise the input at step N is a function of (seed, N)
(`input_position`). A
`tf.train.CheckpointManager` writes `<model_dir>/model.ckpt-<step>.index`,
`.data-00000-of-00001` and the `checkpoint` state file; TensorBoard event
files (loss every `summary_every_n_steps`, evaluation metrics at each
checkpoint under `eval/`), `graph.pbtxt` and `checkpoint_metrics.jsonl` sit
beside them.

`steps` is the target global step (the Estimator's `max_steps`): after a crash
the same call finishes the same training. With the same seed, TensorFlow's op
determinism makes a resumed run end with the weights of an uninterrupted one.

The run, step by step: resolve the model code (`model_code`), prepare the
model dir, build the model and the input pipeline (`model_and_data`), resume
from the newest checkpoint that restores (`restore.resume_from_newest`), then
the one training loop (`steps.run_steps`): one `tf.function` step, a summary
every N steps, a checkpoint when the policy says so (`CheckpointPolicy.is_due`),
taken by `CheckpointSaver` and written by `CheckpointWriter`. With
`workers > 1` the same loop runs in each worker process (`multi_worker`).

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

import time
from collections.abc import Callable
from typing import Optional, Union

from .. import model_code
from ..checkpoints.model_dir import ModelDir
from ..checkpoints.remote import RemoteModelDir
from ..checkpoints.restore import resume_from_newest
from ..checkpoints.selection import select_latest_checkpoint
from ..configs import TrainingConfig
from ..data.training_errors import output_classes, refused_data_error
from ..errors import ModelDirError, NoValidCheckpointError
from ..registry.mlflow_connection import MlflowConfig
from ..registry.tracking import TrainingRun
from ..run_context import flush_run_logs, get_logger
from ..storage.confined_dirs import OpenDir, open_directory
from . import sidecar_evaluator
from .checkpoint_saver import CheckpointSaver, refuse_symlinked_entries, remove_uncommitted
from .input_position import positioned_batches, random_access_examples
from .model_and_data import (
    LossWindow,
    build_model_and_data,
    evaluate,
    has_input_position,
    input_pipeline,
    make_train_step,
)
from .model_dir_lease import hold_model_dir
from .multi_worker import train_multi_worker
from .results import (
    CheckpointCallback,
    ProgressCallback,
    TrainResult,
    checkpoint_metric_names,
    log_sidecar_evaluations,
    prepare_model_dir,
)
from .steps import run_steps
from .summaries import ProgressReporter, SummaryWriters

PREEMPTED_EVALUATION_WAIT = 30.0


def train_with_checkpoints(
    model_dir: Union[str, ModelDir],
    config: Optional[TrainingConfig] = None,
    tracking: Optional[MlflowConfig] = None,
    *,
    on_progress: Optional[ProgressCallback] = None,
    on_checkpoint: Optional[CheckpointCallback] = None,
    lease_wait: Optional[float] = None,
) -> TrainResult:
    """Train a model with checkpoints, resuming from the model dir's newest valid checkpoint.

    The model dir's lease is held for the whole training (`model_dir_lease`): a second
    training of the same model dir waits up to `lease_wait` seconds, then refuses.

    Args:
        model_dir: where checkpoints, event files and `graph.pbtxt` are written (created if missing): a path,
            an object-store URI or a parsed `ModelDir`.
        config: what to train: model, data, steps, batch size, seed, checkpoint policy
            (default: the bundled iris, 1000 steps, the Estimator's policy).
        tracking: the MLflow connection to track the run in (params, the loss,
            checkpoint metrics, the checkpoint list and event files); None for no MLflow run.
        on_progress: called as training advances (the CLI's progress bar).
        on_checkpoint: called after every checkpoint.
        lease_wait: seconds to wait for another training holding the model dir
            (default: `PREFECT_TENSORFLOW_LEASE_WAIT`, 0).

    Returns:
        What the run did: steps, the last checkpoint, its metrics, the MLflow run.

    Raises:
        ImportStringError: `config.model` or `config.data` is refused or names nothing importable
            (before anything is written, an MLflow run included).
        ModelDirError: `model_dir` is a file or cannot be created.
        ModelDirBusyError: another training holds the model dir (naming it) for `lease_wait` seconds.
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
    model = ModelDir.parse(model_dir)
    if not model.is_remote:
        prepare_model_dir(model)  # a file, or not writable: said before the lease
    with hold_model_dir(model, wait=lease_wait) as held:
        return _train_holding_lease(model, config, tracking, on_progress, on_checkpoint, held.check)


def _train_holding_lease(
    model: ModelDir,
    config: TrainingConfig,
    tracking: Optional[MlflowConfig],
    on_progress: Optional[ProgressCallback],
    on_checkpoint: Optional[CheckpointCallback],
    still_held: Callable[[], None],
) -> TrainResult:
    """`train_with_checkpoints` once the model dir's lease is held: locally, in a remote one's mirror, or on workers.

    `still_held` raises once the lease is no longer this process's: checked at each checkpoint (training
    stops there) and before each remote commit (nothing more is published).
    """
    if config.workers > 1:
        return train_multi_worker(model, config, tracking, on_progress=on_progress, on_checkpoint=on_checkpoint)
    mirror = RemoteModelDir(model.uri, fence=still_held) if model.is_remote else None
    hooks = _Hooks(on_progress, on_checkpoint, mirror, still_held)
    untrusted = None if mirror is None else False  # a remote model dir's local mirror is the run's own scratch dir
    try:
        local_dir = prepare_model_dir(model) if mirror is None else mirror.pull()
        try:
            if tracking is None:
                result = _train(local_dir, config, hooks.progress, hooks.checkpointed, untrusted=untrusted)
            else:
                params = {"model_dir": model.uri, **config.mlflow_params()}
                with TrainingRun(tracking, model_dir=local_dir, params=params, run_name=f"train-{model.location.name}") as run:
                    hooks.run = run
                    result = _train(local_dir, config, hooks.progress, hooks.checkpointed, untrusted=untrusted)
                    if config.evaluation == "sidecar":
                        hooks.log_evaluations(local_dir)
                result = result.model_copy(update={"mlflow_run_id": run.run_id, "mlflow_run_url": run.url})
        finally:
            if mirror is not None:
                mirror.close()
    finally:
        if mirror is not None:
            mirror.discard()  # the staging copy goes, whatever the end: the store holds what was committed
    if mirror is None:
        return result
    return result.model_copy(update={"model_dir": model.uri, "last_checkpoint": mirror.remote_prefix(result.last_checkpoint)})


class _Hooks:
    """What happens beside the training loop: MLflow metrics, checkpoint publishing, the caller's callbacks."""

    def __init__(
        self,
        on_progress: Optional[ProgressCallback],
        on_checkpoint: Optional[CheckpointCallback],
        mirror: Optional[RemoteModelDir],
        still_held: Callable[[], None] = lambda: None,
    ):
        self.on_progress, self.on_checkpoint, self.mirror = on_progress, on_checkpoint, mirror
        self.still_held = still_held
        self.run: Optional[TrainingRun] = None
        self.committed: list[int] = []

    def progress(self, step: int, target: int, loss: Optional[float]) -> None:
        if loss is not None and self.run is not None:
            self.run.log_metric("loss", loss, step)
        if self.on_progress is not None:
            self.on_progress(step, target, loss)

    def checkpointed(self, step: int, prefix: str, metrics: dict[str, float]) -> None:
        self.still_held()  # a lease lost (taken over, its lock file removed): training stops here
        self.committed.append(step)
        if self.mirror is not None:
            self.mirror.publish(step, prefix)
        if self.run is not None:
            self.run.log_metrics(checkpoint_metric_names(metrics), step)
        if self.on_checkpoint is not None:
            self.on_checkpoint(step, self.mirror.remote_prefix(prefix) or prefix if self.mirror else prefix, metrics)

    def log_evaluations(self, model_dir: str) -> None:
        """Send the evaluation metrics the sidecar recorded for this run's checkpoints to MLflow."""
        if self.run is not None:
            log_sidecar_evaluations(self.run, model_dir, self.committed)


def resolve_model_code(config: TrainingConfig) -> None:
    """Check and import the config's model builder and dataset loader, before anything is written.

    Raises:
        ImportStringError: either is refused (see `model_code.import_string`) or does not import.
        TrainingError: the builder does not accept the config's `hparams`.
    """
    model_code.check_hparams(config.model, dict(config.hparams))
    model_code.load(config.data, "data")


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
            refuse_symlinked_entries(directory)
        return _train_in(directory, model_dir, config, on_progress, on_checkpoint, untrusted=directory.confined)


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
    net, train_ds, eval_ds = build_model_and_data(config)
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    net.optimizer.build(net.trainable_variables)
    objects = {"model": net, "optimizer": net.optimizer, "global_step": global_step}

    remove_uncommitted(directory)
    if _written_with_input_iterator(model_dir):
        # The iterator mode (or a checkpoint from before the stateless mode): the order it was trained with.
        iterator = iter(input_pipeline(train_ds, config))
        ckpt = tf.train.Checkpoint(**objects, input_iterator=iterator)
        latest = resume_from_newest(ckpt, model_dir)
    else:
        # No checkpoint, a stateless one or several workers': the input is positioned at global_step.
        latest = resume_from_newest(tf.train.Checkpoint(**objects), model_dir)
        examples = random_access_examples(train_ds)
        iterator = iter(positioned_batches(train_ds, config, int(global_step.numpy()), examples))
        stateless = examples is not None
        ckpt = tf.train.Checkpoint(**objects) if stateless else tf.train.Checkpoint(**objects, input_iterator=iterator)
        log.info(
            "input order: %s",
            "stateless, index_shuffle of (seed, epoch)" if stateless else "shuffle buffer, iterator checkpointed",
        )
    if latest is not None:
        log.info("resumed from %s (step %d)", latest.path, int(global_step.numpy()))
    start_step = step = int(global_step.numpy())
    target = config.target_step(start_step)
    # read back by a resubmission (tasks/resubmission_policy.py): where a crashed `more_steps` run was going
    log.info("training from step %d to target step %d", start_step, target)
    flush_run_logs()  # on the server before the first checkpoint, whatever kills the process after it
    if target < start_step:
        log.warning("%s is already at step %d, past the target step %d; nothing to train", model_dir, start_step, target)

    loss_window = LossWindow()
    train_step = make_train_step(net, global_step, loss_window)
    summaries = SummaryWriters(directory.handle)
    evaluator = None
    # with nothing to train, still one to evaluate what a killed training's evaluator (dead with it) left
    if config.evaluation == "sidecar" and (step < target or sidecar_evaluator.unevaluated_steps(directory.handle)):
        spec = sidecar_evaluator.evaluation_spec(config)
        evaluator = sidecar_evaluator.SidecarEvaluator(
            model_dir, spec, directory, take_over=sidecar_evaluator.evaluation_spec(config, resolved=False)
        )
    eval_batches = eval_ds.batch(max(config.batch_size, 256))
    saver = CheckpointSaver(
        ckpt,
        directory,
        config,
        evaluate_now=lambda: evaluate(net, eval_batches),
        loss_window=loss_window,
        summaries=summaries,
        on_checkpoint=on_checkpoint,
        evaluator=evaluator,
        resumed=latest,
        untrusted=untrusted,
    )
    try:
        outcome = run_steps(
            train_step,
            iterator,
            step=step,
            target=target,
            saver=saver,
            progress=ProgressReporter(on_progress, target),
            preempted_evaluation_wait=PREEMPTED_EVALUATION_WAIT,
        )
    except tf.errors.InvalidArgumentError as err:  # bad data in a batch: one line naming the loader and the value
        splits = {"train": train_ds, "eval": eval_ds}
        raise refused_data_error(err.message, config.data, splits, output_classes(net)) from err
    return TrainResult(
        model_dir=model_dir,
        start_step=start_step,
        final_step=outcome.step,
        target_step=target,
        steps_run=max(outcome.step - start_step, 0),
        last_checkpoint=saver.saved[-1] if saver.saved else (latest.path if latest else None),
        checkpoints_saved=len(saver.saved),
        final_metrics=saver.metrics,
        preempted=outcome.preempted,
        elapsed_seconds=time.monotonic() - started,
        loop_seconds=outcome.seconds,
    )


def _written_with_input_iterator(model_dir: str) -> bool:
    """Whether the newest valid checkpoint holds `input_iterator` (stateless and multi-worker ones do not)."""
    try:
        newest = select_latest_checkpoint(model_dir).path
    except (NoValidCheckpointError, ModelDirError):
        return False
    return has_input_position(newest)
