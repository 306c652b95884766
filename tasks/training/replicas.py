"""What differs between one training process and one worker of several, as the training loop sees it.

How a number is summed over the workers (the reported loss, the loss window),
how the workers agree that a time-based checkpoint is due (every worker must
save at the same step), whether SIGTERM is a preemption to checkpoint before
exiting (one process; a worker is stopped by its supervisor, which restarts
all of them), whether this copy counts (the chief), and where the sidecar
evaluator runs.

Example:
    >>> from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    >>> from prefect_tensorflow.tasks.training.replicas import ONE_PROCESS
    >>> ONE_PROCESS.reduce_sum(2.5), ONE_PROCESS.save_due(CheckpointPolicy(save_checkpoints_steps=10), 20, 0.0)
    (2.5, True)
"""

from __future__ import annotations

from ..checkpoints.policy import CheckpointPolicy


class Replicas:
    """One process: sums are the number itself, the policy decides alone, SIGTERM is a preemption."""

    preemptible = True
    chief = True
    evaluator_elsewhere = False
    """Whether a sidecar evaluator runs beside another process (the multi-worker caller), not this one."""

    def reduce_sum(self, value: float) -> float:
        """The sum over the workers of `value` (every worker calls it at the same point)."""
        return value

    def save_due(self, policy: CheckpointPolicy, step: int, seconds_since_save: float) -> bool:
        """Whether to checkpoint after `step` (every worker gets the same answer)."""
        return policy.is_due(step, seconds_since_save)


ONE_PROCESS = Replicas()


ONE_PROCESS = Replicas()
