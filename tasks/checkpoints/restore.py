"""Restore a `tf.train.Checkpoint` strictly: every key must match, or nothing is trusted.

The TensorFlow guide warns that checkpoint keys must match the objects that
restore them; `Checkpoint.read` on its own restores what matches and silently
skips the rest. `restore_strict` turns any mismatch into a
`CheckpointMismatchError` naming the missing and unexpected keys.

Example:
    >>> import os, tempfile
    >>> import tensorflow as tf
    >>> from prefect_tensorflow.tasks.checkpoints.restore import restore_strict
    >>> prefix = tf.train.Checkpoint(step=tf.Variable(5)).save(os.path.join(tempfile.mkdtemp(), "ckpt"))
    >>> ckpt = tf.train.Checkpoint(step=tf.Variable(0))
    >>> restore_strict(ckpt, prefix)
    >>> int(ckpt.step.numpy())
    5
    >>> restore_strict(tf.train.Checkpoint(other=tf.Variable(0)), prefix)
    Traceback (most recent call last):
    ...
    prefect_tensorflow.tasks.errors.CheckpointMismatchError: checkpoint ... does not match the model being restored; ...
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

from ..errors import CheckpointMismatchError, InvalidCheckpointError, NoValidCheckpointError, TrainingError
from ..run_context import get_logger
from .files import OBJECT_GRAPH_KEY, checkpoint_prefixes, step_of
from .selection import CheckpointRef, checkpoint_ref, select_latest_checkpoint

_IGNORED = {OBJECT_GRAPH_KEY, "save_counter/.ATTRIBUTES/VARIABLE_VALUE"}


def checkpoint_keys(prefix: str) -> set[str]:
    """The variable keys stored in a checkpoint (object graph and save counter left out)."""
    import tensorflow as tf

    return {name for name, _ in tf.train.list_variables(prefix)} - _IGNORED


def expected_keys(checkpoint) -> set[str]:
    """The keys `checkpoint` would write, found by writing it to a scratch directory.

    Only used to explain a mismatch, so its cost is paid on the error path alone.
    """
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="ptf-keys-") as scratch:
        prefix = checkpoint.write(os.path.join(scratch, "expected"))
        return {name for name, _ in tf.train.list_variables(prefix)} - _IGNORED


def restore_strict(checkpoint, prefix: str | os.PathLike) -> None:
    """Restore `checkpoint` (a `tf.train.Checkpoint`) from `prefix`, all keys or an error.

    Build every object first (e.g. `optimizer.build(model.trainable_variables)`)
    so that slot variables are matched now rather than deferred.

    Raises:
        CheckpointMismatchError: keys are missing from the checkpoint or the
            checkpoint holds keys the objects do not have (the objects may then
            be partly restored and must be discarded).
        InvalidCheckpointError: TensorFlow cannot read the checkpoint.
    """
    import tensorflow as tf

    prefix = os.fspath(prefix)
    if hasattr(checkpoint, "save_counter"):
        checkpoint.save_counter  # noqa: B018 - created lazily; it must exist to be matched now
    try:
        status = checkpoint.read(prefix)
    except ValueError as err:  # a stored tensor's shape or dtype differs from the variable's
        missing, unexpected = _key_difference(checkpoint, prefix)
        detail = str(err).strip().splitlines()[-1]
        raise CheckpointMismatchError(prefix, missing, unexpected, detail=detail) from err
    except tf.errors.OpError as err:
        raise InvalidCheckpointError(prefix, f"TensorFlow cannot restore it: {err.message}") from err
    try:
        status.assert_existing_objects_matched()
        status.assert_consumed()
    except AssertionError as err:
        status.expect_partial()  # the objects are discarded; no "unrestored values" warnings
        missing, unexpected = _key_difference(checkpoint, prefix)
        if not missing and not unexpected:
            raise CheckpointMismatchError(prefix, [str(err)], []) from err
        raise CheckpointMismatchError(prefix, missing, unexpected) from err


def _key_difference(checkpoint, prefix: str) -> tuple[list[str], list[str]]:
    stored, wanted = checkpoint_keys(prefix), expected_keys(checkpoint)
    return sorted(wanted - stored), sorted(stored - wanted)


def resume_from_newest(checkpoint, model_dir: str) -> Optional[CheckpointRef]:
    """Restore `checkpoint` from the newest checkpoint of `model_dir` that restores; None if there is none.

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
        candidates = [select_latest_checkpoint(model_dir).path]
    except NoValidCheckpointError as err:
        if prefixes:
            raise TrainingError(f"{err}. Move them aside to train from scratch.") from err
        return None
    newest = step_of(candidates[0]) or 0
    candidates += [p for p in prefixes if (step_of(p) or 0) < newest and step_of(p) is not None]
    failures = []
    for prefix in candidates:
        try:
            ref = checkpoint_ref(prefix)
            restore_strict(checkpoint, ref.path)
            return ref
        except InvalidCheckpointError as err:
            failures.append(f"{os.path.basename(prefix)}: {err.reason}")
            log.warning("cannot resume from %s: %s; trying an older checkpoint", prefix, err.reason)
    raise TrainingError(
        f"model dir {model_dir}: no checkpoint restores ({'; '.join(failures)}). Move them aside to train from scratch."
    )
