"""A worker process of a multi-worker training: the collective set-up, then the one training loop.

Started by the supervisor as `python -m prefect_tensorflow.tasks.training.multi_worker_main worker
RUN_DIR INDEX` with a `TF_CONFIG` on 127.0.0.1, it dies with the supervisor,
builds the model under `MultiWorkerMirroredStrategy` (Keras 3's `fit` does not
support this strategy), restores the chief's newest valid checkpoint and runs
`steps.run_steps` with `WorkerReplicas`: the loss and the loss window summed
over the workers, time-based checkpoints agreed on by all of them, SIGTERM
left to the supervisor.

Checkpoints follow TensorFlow's multi-worker guide, through the same
`CheckpointSaver` and `CheckpointWriter` as one process: every worker saves
(the snapshot may run collectives), worker 0 (the chief) into the model dir,
the others into a throwaway directory of their own, removed at the end. The
chief's keep policy waits for the sidecar's metrics lines as one process's
does (the sidecar runs beside the caller). In-loop evaluation is done by the
chief on a plain copy of the model, outside the collectives.

The input position is not in the checkpoint (a distributed iterator cannot be
checkpointed): the single-process pipeline is rebuilt at `global_step`
(`input_position.positioned_batches`: the stateless order of data with a known
length, else the seeded stream with `skip(global_step)`), each worker taking
its `batch_size / N` share of every global batch.

Example:
    >>> from prefect_tensorflow.tasks.training.worker import WorkerReporter
    >>> import json, os, tempfile
    >>> run_dir = tempfile.mkdtemp()
    >>> chief = WorkerReporter(run_dir, 0, chief=True, target=10)
    >>> chief.loss_at(5, 0.25)
    >>> json.loads(open(os.path.join(run_dir, "events.jsonl")).read())["loss"]
    0.25
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any, Optional

from .. import model_code
from ..checkpoints.policy import CheckpointPolicy
from ..checkpoints.restore import resume_from_newest
from ..checkpoints.selection import select_latest_checkpoint
from ..child_processes import die_with_parent, read_json, write_json_atomically
from ..configs import TrainingConfig
from ..data.training_errors import output_classes, refused_data_error
from ..errors import NoValidCheckpointError, PrefectTensorFlowError
from ..run_context import get_logger
from ..storage.confined_dirs import open_directory
from .checkpoint_saver import CheckpointSaver, refuse_symlinked_entries, remove_uncommitted, throwaway_dir
from .input_position import positioned_batches, random_access_examples
from .model_and_data import LossWindow, build_model_and_data, evaluate, has_input_position, input_pipeline
from .multi_worker_settings import (
    ENV_SUPERVISOR,
    EXIT_FATAL,
    EXIT_PORT_IN_USE,
    MARKER,
    MultiWorkerError,
    MultiWorkerOptions,
    worker_threads,
)
from .replicas import Replicas
from .steps import run_steps
from .summaries import SummaryWriters

HEARTBEAT_SECONDS = 1.0


class WorkerReporter:
    """A worker's progress: its heartbeat file (the supervisor's stall check) and, on the chief, the event stream."""

    def __init__(self, run_dir: str, index: int, chief: bool, target: int):
        self.heartbeat = os.path.join(run_dir, f"heartbeat-{index}.json")
        self.events_path = os.path.join(run_dir, "events.jsonl")
        self.chief, self.target = chief, target
        self._next = 0.0

    def event(self, **event: Any) -> None:
        if self.chief:
            with open(self.events_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(event, sort_keys=True) + "\n")

    def _beat(self, step: int, loss: Optional[float]) -> None:
        now = time.monotonic()
        if loss is None and now < self._next and step != self.target:
            return
        self._next = now + HEARTBEAT_SECONDS
        write_json_atomically(self.heartbeat, {"step": step, "time": time.time(), "pid": os.getpid()})
        self.event(event="progress", step=step, target=self.target, loss=loss)

    def loss_at(self, step: int, loss: float) -> None:
        self._beat(step, loss)

    def advance(self, step: int) -> None:
        self._beat(step, None)

    def finish(self, step: int) -> None:
        """Nothing more: the step reaching the target was reported by `advance`."""

    def checkpoint(self, step: int, path: str, metrics: dict[str, float]) -> None:
        self.event(event="checkpoint", step=step, path=path, metrics=metrics)


class WorkerReplicas(Replicas):
    """Several workers: sums are collectives, a time-based checkpoint is due when any worker's clock says so
    (checked every `sync_every` steps, by all), SIGTERM is the supervisor's to handle, only the chief counts."""

    preemptible = False
    evaluator_elsewhere = True  # started by the caller, beside the supervisor

    def __init__(self, tf: Any, strategy: Any, sync_every: int, chief: bool):
        self.tf, self.strategy, self.sync_every, self.chief = tf, strategy, sync_every, chief

    def reduce_sum(self, value: float) -> float:
        tf = self.tf
        per_replica = self.strategy.run(lambda: tf.constant(float(value), tf.float64))
        return float(self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy())

    def save_due(self, policy: CheckpointPolicy, step: int, seconds_since_save: float) -> bool:
        if policy.save_checkpoints_steps is not None:
            return policy.is_due(step, 0.0)
        if step % self.sync_every:
            return False
        return self.reduce_sum(1.0 if policy.is_due(step, seconds_since_save) else 0.0) > 0


def run_worker(run_dir: str, index: int) -> int:
    """A worker process's main: set up the strategy, then `train_worker`; exits without TensorFlow's teardown."""
    die_with_parent(ENV_SUPERVISOR)
    spec = read_json(os.path.join(run_dir, "spec.json")) or {}
    config = TrainingConfig.model_validate(spec["config"])
    options = MultiWorkerOptions.model_validate(spec["options"])

    import tensorflow as tf

    threads = worker_threads(config.workers, options.threads_per_worker)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    communication = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING,
        timeout_seconds=options.collective_timeout or None,
    )
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=communication)
    except tf.errors.UnknownError as err:
        if "Could not start gRPC server" in str(err):
            print(f"worker {index}: {err}", flush=True)
            sys.stdout.flush()
            os._exit(EXIT_PORT_IN_USE)
        raise
    if strategy.num_replicas_in_sync != config.workers:
        raise MultiWorkerError(f"expected {config.workers} replicas, the strategy has {strategy.num_replicas_in_sync}")
    target = int(spec["target"])
    try:
        train_worker(
            tf,
            strategy,
            config,
            spec["model_dir"],
            target,
            index,
            WorkerReporter(run_dir, index, index == 0, target),
            run_dir,
            untrusted=bool(spec.get("untrusted", False)),
        )
    except PrefectTensorFlowError as err:  # the same on every attempt: the supervisor gives up at once
        print(f"worker {index}: {type(err).__name__}: {err}", flush=True)
        sys.stderr.flush()
        os._exit(EXIT_FATAL)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip TensorFlow's teardown (seconds, and collective shutdown waits): everything is on disk


def train_worker(
    tf: Any,
    strategy: Any,
    config: TrainingConfig,
    model_dir: str,
    target: int,
    index: int,
    reporter: WorkerReporter,
    run_dir: str,
    *,
    untrusted: bool = False,
) -> None:
    """Build under `strategy`, restore the chief's newest checkpoint, run the training loop; the chief writes `result.json`."""
    chief = index == 0
    replicas = WorkerReplicas(tf, strategy, config.summary_every_n_steps, chief)
    with strategy.scope():
        net, train_ds, eval_ds = build_model_and_data(config)
        net.optimizer.build(net.trainable_variables)
        global_step = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="global_step", aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA
        )
    # In-loop evaluation: the chief evaluates a plain (not distributed) copy, outside the
    # collectives; every worker builds it so that each draws the same random numbers.
    eval_net = model_code.build_model(config.model, dict(config.hparams)) if config.evaluation == "in_loop" else None
    window = LossWindow()
    objects = {"model": net, "optimizer": net.optimizer, "global_step": global_step}
    write_dir = model_dir if chief else throwaway_dir(index)
    try:
        with open_directory(write_dir, parameter="model_dir", create=True, untrusted=untrusted and chief) as directory:
            if chief:
                if directory.confined:
                    refuse_symlinked_entries(directory)
                remove_uncommitted(directory)
            latest = _restore(tf, objects, model_dir, train_ds, config)
            start_step = step = int(global_step.numpy())
            if replicas.reduce_sum(start_step) != start_step * config.workers:
                raise MultiWorkerError(f"worker {index} restored step {start_step}, another worker a different one")
            if latest is not None:
                print(f"worker {index}: resumed from {latest.path} (step {start_step})", flush=True)
            if chief:
                marker = os.path.join(model_dir, MARKER)
                wanted = {"workers": config.workers, "input_position": "positioned at global_step"}
                if read_json(marker) != wanted:
                    write_json_atomically(marker, wanted)

            dataset = positioned_batches(train_ds, config, start_step, random_access_examples(train_ds))
            shard = tf.data.Options()
            shard.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
            iterator = iter(strategy.experimental_distribute_dataset(dataset.with_options(shard)))
            train_step = _distributed_train_step(tf, strategy, net, global_step, window)
            summaries = SummaryWriters(directory.handle) if chief else None
            eval_batches = eval_ds.batch(max(config.batch_size, 256))

            def evaluate_copy() -> dict[str, float]:
                assert eval_net is not None
                eval_net.set_weights(net.get_weights())
                return evaluate(eval_net, eval_batches)

            saver = CheckpointSaver(
                tf.train.Checkpoint(**objects),
                directory,
                config,
                evaluate_now=evaluate_copy,
                loss_window=window,
                untrusted=untrusted and chief,  # a throwaway dir is this process's own
                summaries=summaries,
                on_checkpoint=reporter.checkpoint,
                replicas=replicas,
                resumed=latest,
            )
            try:
                outcome = run_steps(
                    train_step, iterator, step=step, target=target, saver=saver, progress=reporter, replicas=replicas
                )
            except tf.errors.InvalidArgumentError as err:  # bad data in a batch: the same on every attempt, so fatal
                splits = {"train": train_ds, "eval": eval_ds}
                raise refused_data_error(err.message, config.data, splits, output_classes(net)) from err
            replicas.reduce_sum(0.0)  # a barrier: nobody leaves while a peer still saves
            if chief:
                write_json_atomically(
                    os.path.join(run_dir, "result.json"),
                    {
                        "final_step": outcome.step,
                        "start_step": start_step,
                        "last_checkpoint": saver.saved[-1] if saver.saved else (latest.path if latest is not None else None),
                        "metrics": saver.metrics,
                    },
                )
    finally:
        if not chief:
            shutil.rmtree(write_dir, ignore_errors=True)  # the guide: the others' copies are thrown away
    get_logger().info("worker %d finished at step %d", index, outcome.step)


def _restore(tf: Any, objects: dict[str, Any], model_dir: str, train_ds: Any, config: TrainingConfig) -> Any:
    """Restore the chief's newest valid checkpoint (None: there is none)."""
    restore_objects = dict(objects)
    try:
        newest: Optional[str] = select_latest_checkpoint(model_dir).path
    except NoValidCheckpointError:
        newest = None
    if newest is not None and has_input_position(newest):
        # Written by a single process: its input position goes into a throwaway iterator
        # (restored for the strict key check) and is replaced by skip(global_step).
        restore_objects["input_iterator"] = iter(input_pipeline(train_ds, config))
    return resume_from_newest(tf.train.Checkpoint(**restore_objects), model_dir)


def _distributed_train_step(tf: Any, strategy: Any, net: Any, global_step: Any, window: LossWindow) -> Any:
    """One optimisation step over the distributed iterator; returns this worker's share of the loss."""

    @tf.function
    def train_step(it):
        def step_fn(x, y):
            with tf.GradientTape() as tape:
                y_pred = net(x, training=True)
                # Keras scales a mean loss by 1 / replicas inside a replica context, and the
                # optimizer sums the gradients over replicas: the global batch's mean gradient.
                loss = net.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
            grads = tape.gradient(loss, net.trainable_variables)
            net.optimizer.apply_gradients(zip(grads, net.trainable_variables))
            return loss

        x, y = next(it)
        # This worker's share of the loss (already scaled by 1 / replicas): the only collective of
        # a step is the gradients' all-reduce; losses are summed over workers when reported.
        (loss,) = strategy.experimental_local_results(strategy.run(step_fn, args=(x, y)))
        global_step.assign_add(1)
        window.total.assign_add(tf.cast(loss, tf.float64))
        window.count.assign_add(1)
        return loss

    return train_step
