"""The training loop: steps, summaries, progress and checkpoints, for one process and for each of several workers.

`run_steps` is the one loop. What differs between one process and a worker
of several is a `replicas.Replicas` object (`ONE_PROCESS`, or a worker's
`worker.WorkerReplicas`).

A non-finite training loss stops the loop (`NonFiniteLossError`) before a
checkpoint of those weights is saved: the loss fetched at a summary step is
checked there, and `CheckpointSaver.save` checks the mean loss of the steps
since the last checkpoint (summed on the device at every step) before it
writes anything. The checkpoints saved before are committed, so the newest
checkpoint stays the last good one and the same call resumes from it.

Example:
    >>> from prefect_tensorflow.tasks.training.steps import LoopOutcome
    >>> LoopOutcome(20, False, 1.5).step
    20
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional, Protocol

from ..errors import NonFiniteLossError
from ..run_context import get_logger
from . import sidecar_evaluator, stop_request
from .checkpoint_saver import CheckpointSaver
from .model_and_data import write_graph
from .preemption import PreemptionGuard
from .replicas import ONE_PROCESS, Replicas


class Progress(Protocol):
    """Where progress goes: the caller's callback (`summaries.ProgressReporter`) or a worker's heartbeat."""

    def loss_at(self, step: int, loss: float) -> None: ...

    def advance(self, step: int) -> None: ...

    def finish(self, step: int) -> None: ...


STOP_MESSAGES = {
    stop_request.PREEMPTED: "SIGTERM received at step %d: saving a checkpoint before exiting",
    stop_request.CANCELLED: "flow run cancelled at step %d: saving a checkpoint, then stopping (the next run resumes from it)",
    stop_request.TIMED_OUT: "timeout reached at step %d: saving a checkpoint, then stopping (the next run resumes from it)",
}


class LoopOutcome:
    """Where the loop stopped, whether a signal stopped it (and why: `stop_request`), and the seconds from its
    first step to its last save."""

    def __init__(self, step: int, preempted: bool, seconds: float, stopped: Optional[str] = None):
        self.step, self.preempted, self.seconds, self.stopped = step, preempted, seconds, stopped


def run_steps(
    train_step: Any,
    iterator: Any,
    *,
    step: int,
    target: int,
    saver: CheckpointSaver,
    progress: Progress,
    replicas: Replicas = ONE_PROCESS,
    preempted_evaluation_wait: Optional[float] = None,
) -> LoopOutcome:
    """Train from `step` to `target`, checkpointing at start, when due and at the end, as `saver.policy` says.

    Before the first step, `graph.pbtxt` (and the event files and the sidecar's files, with `saver.summaries`) are
    written where the saver writes, so that the state file stays the last change to the model dir
    (see `checkpoint_files.state_file_is_last_change`), and what a save runs in this thread is traced, as the train
    step is. Then wait for the writes (and the evaluator this process started: at most
    `preempted_evaluation_wait` s after a preemption, the grace period may be short; after a cancel or a
    timeout it is stopped at once: a cancel must end within seconds, the next training's evaluator catches up).

    A SIGTERM or a Prefect timeout's SIGALRM (`preemption.PreemptionGuard`) stops the loop before the next
    step: a checkpoint is saved, then the signal goes back to whoever sent it (the flow run ends Crashed after
    a preemption, Cancelled after a cancel, TimedOut after a timeout).
    """
    policy, summary_every, summaries = saver.policy, saver.config.summary_every_n_steps, saver.summaries
    if step < target:
        write_graph(train_step, iterator, saver.directory.handle)
        try:
            saver.prepare()  # traced here with the train step, not at the first save inside the loop
        except BaseException:
            saver.abandon()  # the evaluator this process started goes too
            raise
        if summaries is not None:
            summaries.create()
            sidecar_evaluator.prepare(saver.directory.handle)
    preempted, stopped = False, None
    started = time.monotonic()
    with PreemptionGuard(enabled=replicas.preemptible) as guard:
        try:
            if policy.is_due_at_start(step, target, saver.last_step):
                saver.save(step)
            while step < target:
                if guard.requested:
                    preempted, stopped = True, guard.reason()
                    get_logger().warning(STOP_MESSAGES.get(stopped or "", STOP_MESSAGES[stop_request.PREEMPTED]), step)
                    break
                loss = train_step(iterator)
                step += 1
                saver.raise_if_failed()  # a failed background write stops training at the next step
                if step % summary_every == 0:
                    value = replicas.reduce_sum(float(loss))
                    if not math.isfinite(value):  # every worker has the same sum: all stop here
                        raise NonFiniteLossError(saver.directory.path, value, step, last_good_step=saver.last_step)
                    if summaries is not None:
                        summaries.training_step(step, value, summary_every, target)
                    progress.loss_at(step, value)
                else:
                    progress.advance(step)
                if replicas.save_due(policy, step, saver.seconds_since_save()):
                    saver.save(step)
            if policy.is_due_at_end(step, saver.last_step, preempted=preempted):
                saver.save(step)
        except NonFiniteLossError as err:
            get_logger().error("%s", err)
            saver.finish(evaluation_timeout=preempted_evaluation_wait)  # commit (and evaluate) the good ones before
            raise
        except BaseException:
            saver.abandon()  # no writer thread or evaluator outlives a failed training
            raise
        seconds = time.monotonic() - started
        progress.finish(step)
        saver.finish(
            evaluation_timeout=preempted_evaluation_wait if preempted else None,
            stop_evaluator=stopped in (stop_request.CANCELLED, stop_request.TIMED_OUT),
        )
        if summaries is not None:
            summaries.flush()
    return LoopOutcome(step, preempted, seconds, stopped)
