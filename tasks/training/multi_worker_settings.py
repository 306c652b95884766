"""What the caller, the supervisor and the workers of a multi-worker training agree on: options, names, exit codes.

Example:
    >>> from prefect_tensorflow.tasks.training.multi_worker_settings import MultiWorkerOptions, check_config
    >>> from prefect_tensorflow.tasks.configs import TrainingConfig
    >>> MultiWorkerOptions().max_restarts
    3
    >>> check_config(TrainingConfig(workers=3, batch_size=32))
    Traceback (most recent call last):
    ...
    prefect_tensorflow.tasks.training.multi_worker_settings.MultiWorkerError: batch_size: 32 is not divisible by workers=3; each worker takes batch_size / workers examples of every batch
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..configs import TrainingConfig
from ..errors import TrainingError

MARKER = ".ptf-multi-worker.json"
"""In a model dir trained by several workers: how its input position is kept."""
EXIT_PORT_IN_USE = 73
"""A worker's exit status when its gRPC server could not bind its port (retried with fresh ports)."""
EXIT_FATAL = 65
"""A worker's exit status after an error a restart cannot cure (bad model code, a mismatched checkpoint)."""
ENTRY_MODULE = "prefect_tensorflow.tasks.training.multi_worker_main"
"""`python -m` this with `supervise RUN_DIR` or `worker RUN_DIR INDEX`."""
ENV_PARENT = "PREFECT_TENSORFLOW_MW_PARENT"
ENV_SUPERVISOR = "PREFECT_TENSORFLOW_MW_SUPERVISOR"


class MultiWorkerError(TrainingError):
    """Multi-worker training cannot start (a setting at fault) or failed on every attempt."""


class MultiWorkerOptions(BaseModel):
    """How the supervisor runs the workers (the training itself is the `TrainingConfig`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_restarts: int = Field(default=3, ge=0, le=100, description="Restarts of all workers after a failure or a stall")
    stall_timeout: float = Field(
        default=600.0, gt=0, description="Seconds without a step by any worker (start-up included) before a restart"
    )
    collective_timeout: float = Field(
        default=300.0,
        ge=0,
        description="Seconds a collective (all-reduce) may wait for a peer; 0 waits forever. Above the slowest step and evaluation",
    )
    isolate_network: Literal["auto", "require", "off"] = Field(
        default="auto", description="Run the workers in a private network namespace: when possible, always, never"
    )
    threads_per_worker: int = Field(
        default=0, ge=0, le=256, description="TensorFlow threads per pool and worker; 0: cores / workers"
    )
    grace_seconds: float = Field(default=5.0, ge=0, description="Seconds between SIGTERM and SIGKILL when tearing workers down")
    restart_backoff: float = Field(default=1.0, ge=0, description="Seconds before the first restart; doubles, at most 30")


def check_config(config: TrainingConfig) -> None:
    """Refuse settings a multi-worker training cannot honour, naming the field.

    Raises:
        MultiWorkerError: `batch_size` is not a multiple of `workers`.
    """
    if config.batch_size % config.workers:
        raise MultiWorkerError(
            f"batch_size: {config.batch_size} is not divisible by workers={config.workers}; "
            "each worker takes batch_size / workers examples of every batch"
        )


def worker_threads(workers: int, threads_per_worker: int = 0) -> int:
    """Threads per TensorFlow pool in each worker: the option, else the cores shared out (at least 1)."""
    if threads_per_worker > 0:
        return threads_per_worker
    return max(1, (os.cpu_count() or 1) // max(1, workers))
