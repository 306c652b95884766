"""Choose the checkpoint to ship: the latest valid one, or the best by a metric.

`select_latest_checkpoint` answers what `tf.train.latest_checkpoint` answers,
made trustworthy: the candidate is validated (index readable, every data shard
present and as large as the index says; optionally every tensor read back so
TensorFlow checks its CRC32C), and when the `checkpoint` state file is
missing, stale, garbage or names a checkpoint that is gone or damaged, the
newest valid checkpoint by step is chosen instead, with a log line for each
one skipped.

Example:
    >>> from prefect import flow
    >>> from prefect_tensorflow.tasks.selection import select_latest_checkpoint
    >>> @flow
    ... def ship(model_dir: str) -> str:
    ...     return select_latest_checkpoint(model_dir).path
"""

from __future__ import annotations

import os
from typing import Literal, Optional

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from .checkpoint_files import (
    CheckpointFiles,
    check_checkpoint,
    checkpoint_prefixes,
    read_state_file,
    state_file_is_last_change,
    step_of,
)
from .errors import (
    InvalidCheckpointError,
    MetricNotFoundError,
    ModelDirError,
    NoValidCheckpointError,
)
from .logs import get_logger
from .metrics_log import metrics_at, read_metrics


class CheckpointRef(BaseModel):
    """A validated checkpoint, as passed between tasks."""

    model_config = ConfigDict(frozen=True)

    path: str = Field(description="Checkpoint prefix, e.g. /models/iris/model.ckpt-1000")
    step: Optional[int] = Field(description="Global step from the file name")
    format: Literal["tf2", "tf1"] = Field(description="tf2 object-based or tf1 Saver")
    model_dir: str
    size_bytes: int
    num_tensors: int
    has_meta_graph: bool
    mtime: float
    metrics: dict[str, float] = Field(default_factory=dict)


class CheckpointInfo(BaseModel):
    """One row of a checkpoint listing: valid or not, and why."""

    model_config = ConfigDict(frozen=True)

    path: str
    step: Optional[int]
    valid: bool
    reason: Optional[str] = None
    format: Optional[str] = None
    size_bytes: Optional[int] = None
    mtime: Optional[float] = None
    metrics: dict[str, float] = Field(default_factory=dict)


def _ref(files: CheckpointFiles, model_dir: str, metrics: dict[str, float]) -> CheckpointRef:
    return CheckpointRef(
        path=files.prefix,
        step=files.step,
        format=files.format,  # type: ignore[arg-type]
        model_dir=model_dir,
        size_bytes=files.size_bytes,
        num_tensors=files.num_tensors,
        has_meta_graph=files.has_meta_graph,
        mtime=files.mtime,
        metrics=metrics,
    )


def _model_dir(model_dir: str | os.PathLike) -> str:
    path = os.path.abspath(os.fspath(model_dir))
    if not os.path.exists(path):
        raise ModelDirError(path, "does not exist; expected a directory of checkpoints")
    if not os.path.isdir(path):
        raise ModelDirError(path, "is a file; expected a directory of checkpoints")
    return path


def validate_checkpoint(prefix: str | os.PathLike, *, verify_checksums: bool = False) -> CheckpointFiles:
    """Validate one checkpoint; with `verify_checksums`, read every tensor back.

    Raises:
        InvalidCheckpointError: the checkpoint is incomplete or corrupt.
    """
    files = check_checkpoint(prefix)
    if verify_checksums:
        from .inspection import read_all_tensors

        read_all_tensors(files.prefix)
    return files


def checkpoint_ref(prefix: str | os.PathLike, *, verify_checksums: bool = False) -> CheckpointRef:
    """Validate one checkpoint and describe it, its recorded metrics included.

    Raises:
        InvalidCheckpointError: the checkpoint is incomplete or corrupt.
    """
    files = validate_checkpoint(prefix, verify_checksums=verify_checksums)
    model_dir = os.path.dirname(os.path.abspath(files.prefix))
    return _ref(files, model_dir, metrics_at(model_dir, files.step))


def list_checkpoints(model_dir: str | os.PathLike, *, verify_checksums: bool = False) -> list[CheckpointInfo]:
    """Every checkpoint in `model_dir`, newest step first, with its validity.

    Example:
        >>> for info in list_checkpoints("/models/iris"):  # doctest: +SKIP
        ...     print(info.step, info.valid, info.reason)
    """
    model_dir = _model_dir(model_dir)
    metrics = read_metrics(model_dir)
    rows = []
    for prefix in checkpoint_prefixes(model_dir):
        step = step_of(prefix)
        try:
            files = validate_checkpoint(prefix, verify_checksums=verify_checksums)
        except InvalidCheckpointError as err:
            rows.append(CheckpointInfo(path=prefix, step=step, valid=False, reason=err.reason))
            continue
        rows.append(
            CheckpointInfo(
                path=prefix, step=step, valid=True, format=files.format,
                size_bytes=files.size_bytes, mtime=files.mtime,
                metrics=metrics.get(step, {}) if step is not None else {},
            )
        )
    return rows


def find_latest_checkpoint(
    model_dir: str | os.PathLike, *, verify_checksums: bool = False
) -> CheckpointRef:
    """The newest valid checkpoint of `model_dir` (plain function behind the task).

    Raises:
        ModelDirError: `model_dir` does not exist or is a file.
        NoValidCheckpointError: no checkpoint in `model_dir` is valid.
    """
    model_dir = _model_dir(model_dir)
    log = get_logger()
    try:
        state = read_state_file(model_dir)
    except FileNotFoundError:
        state = None
        why = "no 'checkpoint' state file"
    except (OSError, ValueError) as err:
        state = None
        why = f"state file is unreadable ({err})"
        log.warning("%s: %s; looking for the newest valid checkpoint instead", model_dir, why)

    if state is not None:
        try:
            files = validate_checkpoint(state.model_checkpoint_path, verify_checksums=verify_checksums)
        except InvalidCheckpointError as err:
            why = f"state file names {err.path}, which is invalid: {err.reason}"
            log.warning("%s: %s; looking for the newest valid checkpoint instead", model_dir, why)
        else:
            if state_file_is_last_change(model_dir, state):
                return _ref(files, model_dir, metrics_at(model_dir, files.step))
            why = "the directory changed after the state file was written"

    skipped: list[str] = []
    for prefix in checkpoint_prefixes(model_dir):
        if step_of(prefix) is None:
            continue
        try:
            files = validate_checkpoint(prefix, verify_checksums=verify_checksums)
        except InvalidCheckpointError as err:
            skipped.append(f"{os.path.basename(prefix)}: {err.reason}")
            log.warning("skipping checkpoint %s: %s", prefix, err.reason)
            continue
        if state is not None and os.path.abspath(files.prefix) != os.path.abspath(
            state.model_checkpoint_path
        ):
            log.warning(
                "state file of %s names %s but %s is the newest valid checkpoint; using it",
                model_dir, os.path.basename(state.model_checkpoint_path), os.path.basename(prefix),
            )
        return _ref(files, model_dir, metrics_at(model_dir, files.step))
    detail = "; ".join(skipped) if skipped else "no <prefix>-<step>.index files"
    raise NoValidCheckpointError(model_dir, f"{why}; {detail}")


def find_best_checkpoint(
    model_dir: str | os.PathLike,
    metric: str,
    mode: Literal["min", "max"] = "min",
    *,
    verify_checksums: bool = False,
) -> CheckpointRef:
    """The valid checkpoint with the lowest (`min`) or highest (`max`) recorded `metric`.

    Ties go to the higher step. Checkpoints without the metric are skipped.

    Raises:
        ValueError: `mode` is not "min" or "max".
        MetricNotFoundError: no valid checkpoint recorded `metric`.
        NoValidCheckpointError: no checkpoint in `model_dir` is valid.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode: expected 'min' or 'max', received {mode!r}")
    model_dir = _model_dir(model_dir)
    metrics = read_metrics(model_dir)
    log = get_logger()
    best: Optional[tuple[float, int, CheckpointFiles]] = None
    any_valid = False
    recorded: set[str] = set()
    for prefix in checkpoint_prefixes(model_dir):
        step = step_of(prefix)
        try:
            files = validate_checkpoint(prefix, verify_checksums=verify_checksums)
        except InvalidCheckpointError as err:
            log.warning("skipping checkpoint %s: %s", prefix, err.reason)
            continue
        any_valid = True
        values = metrics.get(step, {}) if step is not None else {}
        recorded.update(values)
        if metric not in values:
            continue
        score = values[metric] if mode == "min" else -values[metric]
        key = (score, -(step or 0))
        if best is None or key < (best[0], -(best[1])):
            best = (score, step or 0, files)
    if not any_valid:
        raise NoValidCheckpointError(model_dir, "every checkpoint failed validation or none exist")
    if best is None:
        raise MetricNotFoundError(model_dir, metric, sorted(recorded))
    return _ref(best[2], model_dir, metrics.get(best[1], {}))


def find_checkpoint_at_step(model_dir: str | os.PathLike, step: int, *, verify_checksums: bool = False) -> CheckpointRef:
    """The checkpoint of `model_dir` written at global step `step`, validated.

    Raises:
        ValueError: `step` is not a non-negative integer.
        ModelDirError: `model_dir` does not exist or is a file.
        NoValidCheckpointError: there is no checkpoint at `step`, or it is invalid
            (the message lists the steps that are there).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an integer >= 0, received {step!r}")
    model_dir = _model_dir(model_dir)
    prefixes = {step_of(prefix): prefix for prefix in checkpoint_prefixes(model_dir)}
    if step not in prefixes:
        steps = sorted(s for s in prefixes if s is not None)
        raise NoValidCheckpointError(
            model_dir, f"has no checkpoint at step {step}; steps present: {steps or 'none'}"
        )
    try:
        files = validate_checkpoint(prefixes[step], verify_checksums=verify_checksums)
    except InvalidCheckpointError as err:
        raise NoValidCheckpointError(model_dir, f"the checkpoint at step {step} is invalid: {err.reason}") from err
    return _ref(files, model_dir, metrics_at(model_dir, files.step))


@task(name="select-checkpoint-at-step", task_run_name="select-checkpoint-at-step-{step}")
def select_checkpoint_at_step(model_dir: str, step: int, verify_checksums: bool = False) -> CheckpointRef:
    """Select the checkpoint written at a given global step, validated.

    Args:
        model_dir: directory the checkpoints were written to.
        step: the global step, e.g. 2000 for `model.ckpt-2000`.
        verify_checksums: also read every tensor so TensorFlow checks its CRC32C.

    Returns:
        The checkpoint, its recorded metrics included.

    Raises:
        ModelDirError, NoValidCheckpointError (no checkpoint at that step, or it is invalid).

    Example:
        >>> from prefect import flow
        >>> @flow
        ... def pinned(model_dir: str) -> str:
        ...     return select_checkpoint_at_step(model_dir, 2000).path
    """
    ref = find_checkpoint_at_step(model_dir, step, verify_checksums=verify_checksums)
    get_logger().info("checkpoint at step %d: %s", step, ref.path)
    return ref


@task(name="select-latest-checkpoint", task_run_name="select-latest-checkpoint")
def select_latest_checkpoint(model_dir: str, verify_checksums: bool = False) -> CheckpointRef:
    """Select the newest valid checkpoint of a model dir.

    Args:
        model_dir: directory the checkpoints were written to.
        verify_checksums: also read every tensor so TensorFlow checks its CRC32C
            (costs a full read of the checkpoint).

    Returns:
        The selected checkpoint.

    Raises:
        ModelDirError: `model_dir` does not exist or is a file.
        NoValidCheckpointError: no checkpoint in it is valid.

    Example:
        >>> from prefect import flow
        >>> @flow
        ... def latest(model_dir: str) -> int:
        ...     return select_latest_checkpoint(model_dir).step
    """
    ref = find_latest_checkpoint(model_dir, verify_checksums=verify_checksums)
    get_logger().info("latest valid checkpoint: %s (step %s)", ref.path, ref.step)
    return ref


@task(name="select-best-checkpoint", task_run_name="select-best-checkpoint-{metric}-{mode}")
def select_best_checkpoint(
    model_dir: str, metric: str, mode: Literal["min", "max"] = "min", verify_checksums: bool = False
) -> CheckpointRef:
    """Select the valid checkpoint with the best recorded metric.

    Args:
        model_dir: directory the checkpoints were written to.
        metric: a metric recorded at each checkpoint, e.g. "loss" or "accuracy".
        mode: "min" or "max".
        verify_checksums: also read every tensor so TensorFlow checks its CRC32C.

    Returns:
        The selected checkpoint, its metrics included.

    Raises:
        MetricNotFoundError: no valid checkpoint recorded `metric`.
        NoValidCheckpointError: no checkpoint in it is valid.

    Example:
        >>> from prefect import flow
        >>> @flow
        ... def best(model_dir: str) -> str:
        ...     return select_best_checkpoint(model_dir, "accuracy", "max").path
    """
    ref = find_best_checkpoint(model_dir, metric, mode, verify_checksums=verify_checksums)
    get_logger().info(
        "best checkpoint by %s (%s): %s (step %s, %s=%s)",
        metric, mode, ref.path, ref.step, metric, ref.metrics.get(metric),
    )
    return ref
