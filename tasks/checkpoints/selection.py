"""Choose the checkpoint to ship: the latest valid one, or the best by a metric.

`select_latest_checkpoint` answers what `tf.train.latest_checkpoint` answers,
made trustworthy: the candidate is validated (index readable, every data shard
present and as large as the index says; optionally every tensor read back so
TensorFlow checks its CRC32C), and when the `checkpoint` state file is
missing, stale, garbage or names a checkpoint that is gone or damaged, the
newest valid checkpoint by step is chosen instead, with a log line for each
one skipped.

A checkpoint whose recorded metrics (the metrics log) hold a NaN or
infinite value is never selected, by any rule: its weights are suspect, and
"best" must not be decided by a NaN (which no comparison orders). Listings
show it as not valid, with the metric named.

In a deployment run (untrusted) what the model dir's files name is confined
too: a state file naming a checkpoint outside the model dir (absolute, `../`,
through a symlink), a checkpoint whose files are symlinks leading out of it,
or a metrics log that is a symlink out of it fails the selection with an
`UnsafeParameterError` naming the file and the path; nothing outside is read.

Example:
    >>> from prefect import flow
    >>> from prefect_tensorflow.tasks.checkpoints.selection import select_latest_checkpoint
    >>> @flow
    ... def ship(model_dir: str) -> str:
    ...     return select_latest_checkpoint(model_dir).path
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..config_checks import short_repr
from ..errors import (
    InvalidCheckpointError,
    MetricNotFoundError,
    ModelDirError,
    NoValidCheckpointError,
    UnsafeParameterError,
)
from ..metric_order import MODES, best_first, default_mode
from ..run_context import get_logger, in_deployment_run
from . import remote
from .files import (
    CheckpointFiles,
    check_checkpoint,
    checkpoint_prefixes,
    confine_checkpoint_files,
    is_inside,
    read_state_file,
    state_file_is_last_change,
    step_of,
)
from .metrics_log import METRICS_FILE
from .model_dir import ModelDir

_BEST = re.compile(r"best:([A-Za-z0-9_./-]{1,128})(?::(min|max))?")


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


def non_finite_metrics(metrics: dict[str, float]) -> Optional[str]:
    """Why recorded metrics disqualify a checkpoint (`"loss=nan"`), or None when every value is finite.

    Example:
        >>> non_finite_metrics({"accuracy": 0.9, "loss": float("nan")})
        'recorded metrics are not finite: loss=nan'
        >>> non_finite_metrics({"accuracy": 0.9}) is None
        True
    """
    bad = [f"{name}={value}" for name, value in sorted(metrics.items()) if not math.isfinite(value)]
    return f"recorded metrics are not finite: {', '.join(bad)}" if bad else None


def _ref(files: CheckpointFiles, model_dir: ModelDir, metrics: dict[str, float]) -> CheckpointRef:
    return CheckpointRef(
        path=files.prefix,
        step=files.step,
        format=files.format,  # type: ignore[arg-type]
        model_dir=model_dir.uri,
        size_bytes=files.size_bytes,
        num_tensors=files.num_tensors,
        has_meta_graph=files.has_meta_graph,
        mtime=files.mtime,
        metrics=metrics,
    )


class CheckpointSelection(BaseModel):
    """How the checkpoint to ship is chosen: `"latest"`, a step number, or `"best:<metric>[:min|max]"`.

    Example:
        >>> CheckpointSelection.parse("best:loss")
        CheckpointSelection(kind='best', metric='loss', mode='min', step=None)
        >>> CheckpointSelection.parse("2000").step
        2000
    """

    model_config = ConfigDict(frozen=True)

    kind: Literal["latest", "best", "step"]
    metric: Optional[str] = None
    mode: Literal["min", "max"] = "max"
    step: Optional[int] = None

    @classmethod
    def parse(cls, text: Union[str, int], *, parameter: str = "select") -> CheckpointSelection:
        """`"latest"`, a step (`2000` or `"2000"`), `"best:accuracy"` (max) or `"best:loss"`
        (min: names with "loss" or "error" default to min), or an explicit `"best:<metric>:min|max"`.

        Raises:
            ValueError: the text is none of these; the message names `parameter`.
        """
        if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
            text = str(text)
        value = text.strip() if isinstance(text, str) else None
        if value == "latest":
            return cls(kind="latest")
        if value is not None and value.isdigit() and len(value) <= 15:
            return cls(kind="step", step=int(value))
        match = _BEST.fullmatch(value) if value is not None else None
        if not match:
            raise ValueError(
                f"{parameter}: expected 'latest', a step number or 'best:<metric>[:min|max]', received {short_repr(text)}"
            )
        metric, mode = match.group(1), match.group(2)
        return cls(kind="best", metric=metric, mode=mode or default_mode(metric))  # type: ignore[arg-type]

    def __str__(self) -> str:
        if self.kind == "best":
            return f"best:{self.metric}:{self.mode}"
        return "latest" if self.kind == "latest" else str(self.step)


def _model_dir(model_dir: str | os.PathLike | ModelDir) -> ModelDir:
    """A public task's `model_dir` parsed once (and, local, checked to be a directory)."""
    parsed = ModelDir.parse(model_dir)
    if parsed.is_remote:
        return parsed  # an object store has no directories: an empty listing is the error
    path = parsed.uri
    if not os.path.exists(path):
        raise ModelDirError(path, "does not exist; expected a directory of checkpoints")
    if not os.path.isdir(path):
        raise ModelDirError(path, "is a file; expected a directory of checkpoints")
    if in_deployment_run():
        _check_metrics_log(path)
    return parsed


def _check_metrics_log(model_dir: str) -> None:
    """Untrusted: the model dir's metrics log, if any, must not lead out of it (a symlink)."""
    log = os.path.join(model_dir, METRICS_FILE)
    if os.path.lexists(log) and not is_inside(log, model_dir):
        raise UnsafeParameterError(
            "model_dir",
            model_dir,
            f"metrics log {log} leads to {os.path.realpath(log)}, outside the model dir; a deployment run reads only inside it",
        )


def _confined(prefix: str, model_dir: ModelDir) -> None:
    """Untrusted and local: the checkpoint and its files (symlinks resolved) are inside the model dir."""
    if not model_dir.is_remote:
        confine_checkpoint_files(prefix, model_dir=model_dir.uri)


def _links_out(model_dir: ModelDir) -> dict[str, str]:
    """Untrusted and local: the model dir's entries that are symlinks leading out of it (name -> target).

    One listing for a whole selection, so that checking each of 10,000 listed checkpoints stays cheap.
    """
    if model_dir.is_remote or not in_deployment_run():
        return {}
    links = {}
    with os.scandir(model_dir.uri) as entries:
        for entry in entries:
            if entry.is_symlink() and not is_inside(entry.path, model_dir.uri):
                links[entry.name] = os.path.realpath(entry.path)
    return links


def _refuse_links(prefix: str, model_dir: ModelDir, links: dict[str, str]) -> None:
    """Refuse a listed checkpoint one of whose files is a symlink out of the model dir (`_links_out`)."""
    name = os.path.basename(prefix)
    for entry, target in links.items():
        if entry in (name + ".index", name + ".meta") or entry.startswith(name + ".data-"):
            raise UnsafeParameterError(
                "model_dir",
                model_dir.uri,
                f"checkpoint file {os.path.join(model_dir.uri, entry)} (-> {target}) lies outside the model dir "
                f"{model_dir}; a deployment run reads checkpoints only there",
            )


def validate_checkpoint(prefix: str | os.PathLike, *, verify_checksums: bool = False) -> CheckpointFiles:
    """Validate one checkpoint; with `verify_checksums`, read every tensor back.

    Raises:
        InvalidCheckpointError: the checkpoint is incomplete or corrupt.
    """
    model_dir, name = ModelDir.of_checkpoint(prefix)
    files = remote.check_remote_checkpoint(model_dir.store(), name) if model_dir.is_remote else check_checkpoint(prefix)
    if verify_checksums:
        from .inspection import read_all_tensors

        read_all_tensors(model_dir.local_checkpoint(name) if model_dir.is_remote else files.prefix)
    return files


def _complete_metrics(model_dir: ModelDir, steps: list[int]) -> dict[int, dict[str, float]]:
    """The metrics of `steps`, waiting for an evaluator that is still producing them (never choose from half).

    Raises:
        MetricsTimeoutError: some checkpoints are evaluated and others not, after the bounded wait.
    """
    metrics = model_dir.metrics()
    missing = [s for s in steps if s not in metrics]
    if not missing or model_dir.is_remote:
        return metrics
    from ..settings import get_settings
    from ..training.sidecar_evaluator import evaluator_running, wait_for_metrics

    if evaluator_running(model_dir.uri) or len(missing) < len(steps):
        return wait_for_metrics(model_dir.uri, steps, get_settings().metrics_timeout)
    return metrics  # nothing was ever evaluated here (e.g. TF1 Saver checkpoints): no metric to wait for


def _checkpoints(model_dir: ModelDir, verify_checksums: bool) -> Iterator[tuple[str, Optional[CheckpointFiles], Optional[str]]]:
    """Every checkpoint of a (validated) model dir, highest step first: (prefix, files or None, why invalid)."""
    if model_dir.is_remote:
        for prefix, files, reason in remote.remote_checkpoints(model_dir.store()):
            if files is not None and verify_checksums:
                try:
                    files = validate_checkpoint(prefix, verify_checksums=True)
                except InvalidCheckpointError as err:
                    files, reason = None, err.reason
            yield prefix, files, reason
        return
    links = _links_out(model_dir)
    for prefix in checkpoint_prefixes(model_dir.uri):
        _refuse_links(prefix, model_dir, links)
        try:
            yield prefix, validate_checkpoint(prefix, verify_checksums=verify_checksums), None
        except InvalidCheckpointError as err:
            yield prefix, None, err.reason


def checkpoint_ref(prefix: str | os.PathLike, *, verify_checksums: bool = False) -> CheckpointRef:
    """Validate one checkpoint and describe it, its recorded metrics included.

    Raises:
        InvalidCheckpointError: the checkpoint is incomplete or corrupt.
    """
    if not ModelDir.of_checkpoint(prefix)[0].is_remote:
        confine_checkpoint_files(os.fspath(prefix), parameter="checkpoint")
    files = validate_checkpoint(prefix, verify_checksums=verify_checksums)
    model_dir = ModelDir.of_checkpoint(files.prefix)[0]
    if in_deployment_run() and not model_dir.is_remote:
        _check_metrics_log(model_dir.uri)
    return _ref(files, model_dir, model_dir.metrics_at(files.step))


def list_checkpoints(model_dir: str | os.PathLike | ModelDir, *, verify_checksums: bool = False) -> list[CheckpointInfo]:
    """Every checkpoint in `model_dir`, newest step first, with its validity.

    Example:
        >>> import tempfile
        >>> list_checkpoints(tempfile.mkdtemp())
        []
    """
    parsed = _model_dir(model_dir)
    metrics = parsed.metrics()
    rows = []
    for prefix, files, reason in _checkpoints(parsed, verify_checksums):
        step = step_of(prefix)
        if files is None:
            rows.append(CheckpointInfo(path=prefix, step=step, valid=False, reason=reason))
            continue
        recorded = metrics.get(step, {}) if step is not None else {}
        unfit = non_finite_metrics(recorded)
        rows.append(
            CheckpointInfo(
                path=prefix,
                step=step,
                valid=unfit is None,
                reason=unfit,
                format=files.format,
                size_bytes=files.size_bytes,
                mtime=files.mtime,
                metrics=recorded,
            )
        )
    return rows


def select_latest_checkpoint(model_dir: str | ModelDir, verify_checksums: bool = False) -> CheckpointRef:
    """Select the newest valid checkpoint of a model dir.

    Valid: its files are complete (index readable, every data shard there and as large as the index says;
    with `verify_checksums`, every tensor's CRC32C checked) and none of its recorded metrics is NaN or
    infinite; a checkpoint that fails either is skipped with a logged reason and the next older one considered.
    When the state file was the last change to the directory, the checkpoint it
    names is validated and returned without listing the directory; otherwise the
    highest valid step wins, and every checkpoint skipped is logged with why.

    Args:
        model_dir: directory the checkpoints were written to.
        verify_checksums: also read every tensor so TensorFlow checks its CRC32C
            (costs a full read of the checkpoint).

    Returns:
        The selected checkpoint, its recorded metrics included.

    Raises:
        ModelDirError: `model_dir` does not exist or is a file.
        NoValidCheckpointError: no checkpoint in it is valid.

    Example:
        >>> from prefect import flow
        >>> from prefect_tensorflow.tasks import select_latest_checkpoint
        >>> @flow
        ... def latest(model_dir: str) -> int:
        ...     return select_latest_checkpoint(model_dir).step
    """
    parsed = _model_dir(model_dir)
    if parsed.is_remote:
        files = remote.latest_remote_checkpoint(parsed.store())
        if verify_checksums:
            files = validate_checkpoint(files.prefix, verify_checksums=True)
        ref = _ref(files, parsed, parsed.metrics_at(files.step))
        unfit = non_finite_metrics(ref.metrics)
        if unfit is not None:
            get_logger().warning("skipping checkpoint %s: %s", ref.path, unfit)
            ref = _newest_finite(parsed, verify_checksums, [f"{os.path.basename(ref.path)}: {unfit}"])
    else:
        ref = _latest(parsed, verify_checksums)
    get_logger().info("latest valid checkpoint: %s (step %s)", ref.path, ref.step)
    return ref


def _latest(parsed: ModelDir, verify_checksums: bool) -> CheckpointRef:
    log = get_logger()
    model_dir = parsed.uri
    try:
        state = read_state_file(model_dir)
    except UnsafeParameterError:
        raise  # a state file naming a checkpoint outside the model dir (deployment runs): refused, not skipped
    except FileNotFoundError:
        state = None
        why = "no 'checkpoint' state file"
    except (OSError, ValueError) as err:
        state = None
        why = f"state file is unreadable ({err})"
        log.warning("%s: %s; looking for the newest valid checkpoint instead", model_dir, why)

    if state is not None:
        _confined(state.model_checkpoint_path, parsed)
        try:
            files = validate_checkpoint(state.model_checkpoint_path, verify_checksums=verify_checksums)
        except InvalidCheckpointError as err:
            why = f"state file names {err.path}, which is invalid: {err.reason}"
            log.warning("%s: %s; looking for the newest valid checkpoint instead", model_dir, why)
        else:
            if state_file_is_last_change(model_dir, state):
                metrics = parsed.metrics_at(files.step)
                unfit = non_finite_metrics(metrics)
                if unfit is None:
                    return _ref(files, parsed, metrics)
                why = f"state file names {os.path.basename(files.prefix)}, whose {unfit}"
                log.warning("%s: %s; looking for the newest valid checkpoint instead", model_dir, why)
            else:
                why = "the directory changed after the state file was written"

    skipped: list[str] = []
    links = _links_out(parsed)
    for prefix in checkpoint_prefixes(model_dir):
        if step_of(prefix) is None:
            continue
        _refuse_links(prefix, parsed, links)
        try:
            files = validate_checkpoint(prefix, verify_checksums=verify_checksums)
        except InvalidCheckpointError as err:
            skipped.append(f"{os.path.basename(prefix)}: {err.reason}")
            log.warning("skipping checkpoint %s: %s", prefix, err.reason)
            continue
        metrics = parsed.metrics_at(files.step)
        unfit = non_finite_metrics(metrics)
        if unfit is not None:
            skipped.append(f"{os.path.basename(prefix)}: {unfit}")
            log.warning("skipping checkpoint %s: %s", prefix, unfit)
            continue
        if state is not None and os.path.abspath(files.prefix) != os.path.abspath(state.model_checkpoint_path):
            log.warning(
                "state file of %s names %s but %s is the newest valid checkpoint; using it",
                model_dir,
                os.path.basename(state.model_checkpoint_path),
                os.path.basename(prefix),
            )
        return _ref(files, parsed, metrics)
    detail = "; ".join(skipped) if skipped else "no <prefix>-<step>.index files"
    raise NoValidCheckpointError(model_dir, f"{why}; {detail}")


def _newest_finite(parsed: ModelDir, verify_checksums: bool, skipped: list[str]) -> CheckpointRef:
    """An object-store model dir whose newest checkpoint has non-finite metrics: the newest valid one below it."""
    metrics = parsed.metrics()
    for prefix, files, reason in _checkpoints(parsed, verify_checksums):
        unfit = reason if files is None else non_finite_metrics(metrics.get(files.step, {}) if files.step is not None else {})
        if unfit is None and files is not None:
            return _ref(files, parsed, metrics.get(files.step, {}) if files.step is not None else {})
        if not any(entry.startswith(os.path.basename(prefix) + ":") for entry in skipped):
            skipped.append(f"{os.path.basename(prefix)}: {unfit}")
            get_logger().warning("skipping checkpoint %s: %s", prefix, unfit)
    raise NoValidCheckpointError(parsed.uri, "; ".join(skipped))


def select_best_checkpoint(
    model_dir: str | ModelDir, metric: str, mode: Literal["min", "max"] = "min", verify_checksums: bool = False
) -> CheckpointRef:
    """Select the valid checkpoint with the lowest (`min`) or highest (`max`) recorded metric.

    Ties go to the higher step; checkpoints without the metric are skipped, and so are those with a NaN or
    infinite recorded metric (NaN is never best), each with a logged reason.

    Args:
        model_dir: directory the checkpoints were written to.
        metric: a metric recorded at each checkpoint, e.g. "loss" or "accuracy".
        mode: "min" or "max".
        verify_checksums: also read every tensor so TensorFlow checks its CRC32C.

    Returns:
        The selected checkpoint, its metrics included.

    Raises:
        ValueError: `mode` is not "min" or "max".
        MetricNotFoundError: no valid checkpoint recorded `metric`.
        NoValidCheckpointError: no checkpoint in it is valid.

    Example:
        >>> from prefect import flow
        >>> from prefect_tensorflow.tasks import select_best_checkpoint
        >>> @flow
        ... def best(model_dir: str) -> str:
        ...     return select_best_checkpoint(model_dir, "accuracy", "max").path
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected 'min' or 'max', received {short_repr(mode)}")
    parsed = _model_dir(model_dir)
    log = get_logger()
    valid = []
    for prefix, files, reason in _checkpoints(parsed, verify_checksums):
        if files is None:
            log.warning("skipping checkpoint %s: %s", prefix, reason)
        else:
            valid.append(files)
    metrics = _complete_metrics(parsed, [f.step for f in valid if f.step is not None])
    recorded: set[str] = set()
    scored: list[tuple[float, CheckpointFiles]] = []
    for files in sorted(valid, key=lambda f: -(f.step or 0)):  # ties go to the higher step
        values = metrics.get(files.step, {}) if files.step is not None else {}
        recorded.update(values)
        unfit = non_finite_metrics(values)
        if unfit is not None:
            log.warning("skipping checkpoint %s: %s", files.prefix, unfit)
        elif metric in values:
            scored.append((values[metric], files))
    if not valid:
        raise NoValidCheckpointError(parsed.uri, "every checkpoint failed validation or none exist")
    if not scored:
        raise MetricNotFoundError(parsed.uri, metric, sorted(recorded))
    files = best_first(scored, lambda pair: pair[0], mode)[0][1]
    ref = _ref(files, parsed, metrics.get(files.step, {}) if files.step is not None else {})
    log.info("best checkpoint by %s (%s): %s (step %s, %s=%s)", metric, mode, ref.path, ref.step, metric, ref.metrics.get(metric))
    return ref


def select_checkpoint_at_step(model_dir: str | ModelDir, step: int, verify_checksums: bool = False) -> CheckpointRef:
    """Select the checkpoint written at a given global step, validated.

    Args:
        model_dir: directory the checkpoints were written to.
        step: the global step, e.g. 2000 for `model.ckpt-2000`.
        verify_checksums: also read every tensor so TensorFlow checks its CRC32C.

    Returns:
        The checkpoint, its recorded metrics included.

    Raises:
        ValueError: `step` is not a non-negative integer.
        ModelDirError: `model_dir` does not exist or is a file.
        NoValidCheckpointError: there is no checkpoint at `step`, or it is invalid
            (the message lists the steps that are there).

    Example:
        >>> from prefect import flow
        >>> from prefect_tensorflow.tasks import select_checkpoint_at_step
        >>> @flow
        ... def pinned(model_dir: str) -> str:
        ...     return select_checkpoint_at_step(model_dir, 2000).path
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an integer >= 0, received {short_repr(step)}")
    parsed = _model_dir(model_dir)
    if parsed.is_remote:
        names = remote.checkpoint_names(parsed.store().listing())
        prefixes = {step_of(name): parsed.checkpoint(name) for name in names}
    else:
        prefixes = {step_of(prefix): prefix for prefix in checkpoint_prefixes(parsed.uri)}
    if step not in prefixes:
        steps = sorted(s for s in prefixes if s is not None)
        raise NoValidCheckpointError(parsed.uri, f"has no checkpoint at step {step}; steps present: {steps or 'none'}")
    _confined(prefixes[step], parsed)
    try:
        files = validate_checkpoint(prefixes[step], verify_checksums=verify_checksums)
    except InvalidCheckpointError as err:
        raise NoValidCheckpointError(parsed.uri, f"the checkpoint at step {step} is invalid: {err.reason}") from err
    metrics = parsed.metrics_at(files.step)
    unfit = non_finite_metrics(metrics)
    if unfit is not None:
        raise NoValidCheckpointError(parsed.uri, f"the checkpoint at step {step} is not selectable: its {unfit}")
    get_logger().info("checkpoint at step %d: %s", step, files.prefix)
    return _ref(files, parsed, metrics)


def select_checkpoint(
    model_dir: str | ModelDir, selection: Union[CheckpointSelection, str] = "latest", *, parameter: str = "select"
) -> CheckpointRef:
    """Select the checkpoint to ship as `selection` says: the latest, one step, or the best by a metric.

    Args:
        model_dir: directory the checkpoints were written to.
        selection: a `CheckpointSelection`, or its text: `"latest"`, `"2000"`, `"best:accuracy"`.
        parameter: the flow parameter `selection` came from, named in the errors.

    Returns:
        The selected checkpoint, its recorded metrics included.

    Raises:
        ValueError: `selection` is malformed.
        ModelDirError, NoValidCheckpointError, MetricNotFoundError: nothing to select.

    Example:
        >>> from prefect import flow
        >>> from prefect_tensorflow.tasks import select_checkpoint
        >>> @flow
        ... def ship(model_dir: str) -> str:
        ...     return select_checkpoint(model_dir, "best:accuracy").path
    """
    if not isinstance(selection, CheckpointSelection):
        selection = CheckpointSelection.parse(selection, parameter=parameter)
    if selection.kind == "latest":
        return select_latest_checkpoint(model_dir)
    if selection.kind == "step":
        try:
            return select_checkpoint_at_step(model_dir, selection.step or 0)
        except NoValidCheckpointError as err:
            raise NoValidCheckpointError(err.model_dir, f"{parameter} {str(selection)!r}: {err.reason}") from None
    try:
        return select_best_checkpoint(model_dir, selection.metric or "", selection.mode)
    except MetricNotFoundError as err:
        raise MetricNotFoundError(err.model_dir, err.metric, err.available, parameter=f"{parameter} {str(selection)!r}") from None
