"""`CheckpointWriter`: checkpoints whose only cost in the training loop is a snapshot of the state.

TensorFlow's `Checkpoint.save` walks the object graph in Python on every save
(the object graph proto, a saveable per variable, the iterator): tens of
milliseconds of a training thread for even a tiny model, and its async mode
still copies every variable and rebuilds a twin input iterator in the loop.
This writer learns the checkpoint's keys once (`save_util.serialize_graph_view`,
the same code TensorFlow's own save uses, so the keys, the object graph and
the file format are TensorFlow's), then at each save:

1. in the training thread: one `tf.function` that reads every variable (and
   serializes the input iterator, for data in the iterator mode: see
   `training.input_position`): a consistent snapshot of the step, a few
   small ops (on the CPU a read shares the variable's buffer; the next update
   copies it first, so the snapshot costs about one copy of the variables);
2. in one background thread, in order: the snapshot written into
   `<prefix>_temp/` (`bundle.write_bundle`: the files `SaveV2` writes, byte for
   byte, at about the speed of a plain file write; `SaveV2` itself for what it
   cannot write) and `MergeV2Checkpoints` into `<prefix>.index` + `.data-*`
   (TensorFlow's own commit of the files), then the `checkpoint` state file,
   rewritten by TensorFlow's `update_checkpoint_state_internal` (a temp file
   and a rename): the commit; then the keep policy (the newest
   `keep_checkpoint_max`, one every `keep_checkpoint_every_n_hours`) deletes
   what it drops, as `tf.train.CheckpointManager` does, except a checkpoint
   `may_delete` holds back (the sidecar evaluator has not written its
   metrics line yet): that one stays kept, past the limit, and listed in the
   state file, until a later commit or `apply_keep_policy()` at the end.

With `policy.durable_commit` (the default) a commit is durable: the new
checkpoint's `.index` and `.data-*` files and the model dir are fsynced before
the state file is staged, the staged state file before its rename, and the
model dir after it, so that after a power cut the state file never names data
that never reached the disk. Since the data must reach the disk before the
commit anyway, a large checkpoint's data file (`bundle.DIRECT_MIN_BYTES`) is
then written straight to it (`O_DIRECT`, `storage.direct_io`): no page-cache
pages to find for it, which on a VM that hands freed memory back to its host
cost more CPU than the write itself.

A failed write (a full disk, permission denied, a model dir gone read-only)
removes what it left (the `_temp` directory, the checkpoint's files) and is
raised in the training thread by the next step (`raise_if_failed`), the next
`save` or `finish`, as a `TrainingError` naming the file and the reason
(`storage.write_failures`); the state file keeps naming the last complete
checkpoint, and nothing half-written is listed in it.

A crash at any moment leaves the previous committed checkpoint as the latest:
an uncommitted `_temp` directory (removed at the next start) or files the
state file does not name yet (selection validates and skips them). With
`async_save=False` the same work happens before `save` returns.

Anything the recipe cannot handle (a trackable with a registered saver, a
Python-state object) makes it fall back to `tf.train.Checkpoint.write` for
the files, still committed the same way.

The model dir is opened once (`confined_dirs.open_directory`; in a deployment
run walked from its root with no symlink followed) and everything goes through
that descriptor: TensorFlow writes `/proc/self/fd/<fd>/<name>-<step>`, the state
file is staged and renamed relative to it, the keep policy unlinks relative to
it. Before each commit `OpenDir.verify` checks the path still names that
directory: a model dir moved or replaced (say by a symlink) mid-training gets
nothing more, and the training fails saying so. The keep policy only ever
deletes files directly in the model dir: a resumed state file's
`all_model_checkpoint_paths` are resolved with
`checkpoint_files.resolve_state_path`; one outside the model dir is refused
in a deployment run and dropped from the kept list, untouched, otherwise.

Example:
    >>> import os, tempfile
    >>> import tensorflow as tf
    >>> from prefect_tensorflow.tasks.checkpoints.writer import CheckpointWriter
    >>> from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    >>> step = tf.Variable(0, dtype=tf.int64)
    >>> model_dir = tempfile.mkdtemp()
    >>> writer = CheckpointWriter(tf.train.Checkpoint(global_step=step), model_dir, CheckpointPolicy(keep_checkpoint_max=2))
    >>> for n in (1, 2, 3):
    ...     _ = step.assign(n)
    ...     _ = writer.save(n)
    >>> writer.finish()
    >>> sorted(f for f in os.listdir(model_dir) if f.endswith(".index"))
    ['model.ckpt-2.index', 'model.ckpt-3.index']
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Optional

from ..errors import TrainingError
from ..run_context import get_logger, in_deployment_run
from ..storage.confined_dirs import OpenDir, open_directory
from ..storage.local import _remove_entry, fsync_directory, fsync_entries, staged_file
from ..storage.write_failures import describe_write_failure
from . import bundle
from .files import STATE_FILE, is_inside, resolve_state_path
from .policy import CheckpointPolicy

CommittedCallback = Callable[[int, str], None]


class CheckpointWriter:
    """Saves `checkpoint` into `model_dir` under the policy's name and keep rules (see the module docstring).

    Args:
        checkpoint: the `tf.train.Checkpoint` to save (its objects must all be built).
        model_dir: the local directory the files go to.
        policy: `checkpoint_name`, `keep_checkpoint_max`, `keep_checkpoint_every_n_hours`, `async_save`.
        on_committed: called (in the writer's thread when async) after each checkpoint is committed.
        may_delete: whether the keep policy may delete a checkpoint yet (the sidecar's: once it has its
            metrics line); one it may not stays kept, past `keep_checkpoint_max`, until a later commit or
            `apply_keep_policy()`.
        directory: `model_dir` already opened (`confined_dirs.open_directory`), owned by the caller;
            default: opened here (created if missing), closed with the writer.
        untrusted: default: whether this runs in a deployment's flow run (then the model dir is
            walked from its root without following symlinks, and a state file naming checkpoints
            outside it is refused).

    Raises:
        UnsafeParameterError: untrusted, and the model dir is outside the roots or reached through a
            symlink, or its state file names checkpoints outside it.
    """

    def __init__(
        self,
        checkpoint: Any,
        model_dir: str,
        policy: CheckpointPolicy,
        on_committed: Optional[CommittedCallback] = None,
        may_delete: Optional[Callable[[str], bool]] = None,
        *,
        directory: Optional[OpenDir] = None,
        untrusted: Optional[bool] = None,
    ):
        self.checkpoint, self.model_dir, self.policy = checkpoint, os.path.normpath(model_dir), policy
        self.on_committed, self.may_delete = on_committed, may_delete
        self._untrusted = untrusted if untrusted is not None else in_deployment_run()
        if directory is None:
            directory = open_directory(self.model_dir, parameter="model_dir", create=True, untrusted=self._untrusted)
            weakref.finalize(self, directory.close)
        self.directory = directory
        self._prefix = os.path.join(self.model_dir, policy.checkpoint_name)
        self._absolute_dir = os.path.abspath(self.model_dir)
        self._recipe: Optional[_Recipe] = None
        self._kept: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._last_preserved = time.time()
        self._recover_state()
        self._queue: queue.Queue = queue.Queue(maxsize=1)  # one save in flight: a second one waits for it
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None

    def prepare(self) -> None:
        """Learn the checkpoint's keys and warm the snapshot function up now, so that the first `save` does not.

        Tracing takes tens of milliseconds; a training calls this before its first step, as it traces its
        train step there. Nothing is saved and `save_counter` does not move.
        """
        if self._recipe is None:
            self._recipe = _Recipe.learn(self.checkpoint)
        self._recipe.warm_up()

    def save(self, step: int) -> str:
        """Snapshot the state now and write checkpoint `<name>-<step>` (in the background when async).

        Returns:
            The checkpoint prefix (committed when `finish()` returns, or now when not async).

        Raises:
            TrainingError: an earlier background write failed.
        """
        self._raise_background_error()
        prefix = f"{self._prefix}-{step}"
        if self._recipe is None:
            self._recipe = _Recipe.learn(self.checkpoint)
        snapshot = self._recipe.snapshot()
        if not self.policy.async_save:
            self._write(step, prefix, snapshot)
            return prefix
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="checkpoint-writer", daemon=True)
            self._thread.start()
        self._queue.put((step, prefix, snapshot))
        return prefix

    def finish(self) -> None:
        """Wait until every checkpoint asked for is committed.

        Raises:
            TrainingError: a background write failed.
        """
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._raise_background_error()

    def raise_if_failed(self) -> None:
        """Raise the background write's error now, if there was one (the training loop asks after every step).

        Raises:
            TrainingError: a background write failed (the message names the file and the reason).
        """
        if self._error is not None:
            self._raise_background_error()

    def abandon(self) -> None:
        """The training failed: let the write under way end (or fail, and clean up), drop the rest, stop the thread."""
        if self._thread is not None:
            self._error = self._error or _AbandonedError()
            try:
                self._queue.put(None, timeout=60.0)
            except queue.Full:
                pass
            self._thread.join(timeout=60.0)
            self._thread = None

    def apply_keep_policy(self) -> None:
        """Delete what the keep policy dropped, `may_delete` or not (after `finish()`, once evaluation is over)."""
        if self._kept and self._sweep(force=True):
            self._record_state(next(reversed(self._kept)))

    @property
    def checkpoints(self) -> list[str]:
        """The kept checkpoints (prefixes), oldest first."""
        return list(self._kept)

    # --- the background half ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._write(*item)
                except BaseException as err:  # noqa: BLE001 - raised in the training thread by the next save or finish()
                    self._error = err
            item = None  # the snapshot's memory goes now, not when the next save arrives

    def _raise_background_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, TrainingError):
                raise err
            raise TrainingError(f"{self.model_dir}: writing a checkpoint failed: {err}") from err

    def _write(self, step: int, prefix: str, snapshot: Any) -> None:
        assert self._recipe is not None
        name = os.path.basename(prefix)
        committed = False
        try:
            self.directory.verify()
            self._recipe.write(self.directory.entry(name), snapshot, durable=self.policy.durable_commit)  # through the descriptor
            if self.policy.durable_commit:  # the data before the state file names it
                fsync_entries(self._files_of(name), dir_fd=self.directory.fd)
                fsync_directory(self.directory.fd)
            self._commit(prefix)
            committed = True
            if self._sweep():
                self._record_state(prefix)
        except Exception as err:
            committed = committed or self._named_by_state_file(name)
            if not committed:
                self._discard(name)
            raise TrainingError(
                f"model dir {self.model_dir}: writing checkpoint {name} failed"
                f"{'' if committed else ' (removed; the state file still names the previous checkpoint)'}: "
                + describe_write_failure(
                    err, {self.directory.handle: self.model_dir, f"/proc/self/fd/{self.directory.fd}": self.model_dir}
                )
            ) from err
        if self.on_committed is not None:
            self.on_committed(step, prefix)

    def _files_of(self, name: str) -> list[str]:
        """The files of checkpoint `name` in the model dir (`.index`, `.data-*`)."""
        return [e for e in os.listdir(self.directory.fd) if e == name + ".index" or e.startswith(name + ".data-")]

    def _discard(self, name: str) -> None:
        """Remove what a failed write of checkpoint `name` left: its `_temp` directory and its files."""
        try:
            for entry in [name + "_temp", *self._files_of(name)]:
                _remove_entry(self.directory.fd, entry)
        except OSError as err:  # a read-only model dir: the next training's start removes them (never listed)
            get_logger().warning("%s: could not remove what the failed write of %s left: %s", self.model_dir, name, err)

    def _named_by_state_file(self, name: str) -> bool:
        """Whether the state file on disk names `name` as the latest (a commit whose last fsync failed)."""
        try:
            with open(self.directory.entry(STATE_FILE), encoding="utf-8") as handle:
                return f'model_checkpoint_path: "{name}"' in handle.read()
        except OSError:
            return False

    def _commit(self, prefix: str) -> None:
        """Record `prefix` in the state file (the commit); the keep policy follows, as in CheckpointManager.

        A failure before the state file names `prefix` leaves the kept list as it was.
        """
        previous = collections.OrderedDict(self._kept)
        self._kept.pop(prefix, None)
        self._kept[prefix] = time.time()
        try:
            self._record_state(prefix)
        except BaseException:
            self._kept = previous
            raise

    def _record_state(self, latest: str) -> None:
        write_state_file(self.directory, latest, self._kept, self._last_preserved, durable=self.policy.durable_commit)

    def _sweep(self, force: bool = False) -> bool:
        """Drop the oldest kept checkpoints past `keep_checkpoint_max`, keeping one per `keep_checkpoint_every_n_hours`.

        Unless `force`, a checkpoint `may_delete` holds back stays in the kept list for a later sweep.
        """
        limit, hours = self.policy.keep_checkpoint_max, self.policy.keep_checkpoint_every_n_hours
        if not limit or len(self._kept) <= limit:
            return False
        swept = False
        for prefix in list(self._kept)[: len(self._kept) - limit]:
            if not force and self.may_delete is not None and not self.may_delete(prefix):
                continue
            timestamp = self._kept.pop(prefix)
            swept = True
            if hours and timestamp - hours * 3600.0 >= self._last_preserved:
                self._last_preserved = timestamp  # preserved: dropped from the list, files kept
                continue
            self._delete(prefix)
        return swept

    def _delete(self, prefix: str) -> None:
        """Unlink `<prefix>.index` and `.data-*`, relative to the model dir's descriptor (no symlink followed).

        Only a checkpoint directly in the model dir is ever deleted (the kept list holds nothing else).
        """
        directory, name = os.path.split(prefix)
        if os.path.abspath(directory) != self._absolute_dir:
            get_logger().warning("%s is not in the model dir %s; its files are left alone", prefix, self.model_dir)
            return
        self.directory.verify()
        for entry in os.listdir(self.directory.fd):
            if entry == name + ".index" or entry.startswith(name + ".data-"):
                try:
                    os.unlink(entry, dir_fd=self.directory.fd)
                except FileNotFoundError:
                    pass

    def _recover_state(self) -> None:
        """Take over the kept list of an existing state file (a resumed training), as CheckpointManager does."""
        recovered = read_kept_list(self.model_dir, untrusted=self._untrusted)
        if recovered is not None:
            self._kept, self._last_preserved = recovered.kept, recovered.last_preserved


class KeptList:
    """A state file's kept list as the keep policy may use it: checkpoints directly in the model dir only."""

    def __init__(
        self, latest: Optional[str], kept: collections.OrderedDict[str, float], last_preserved: float, outside: list[str]
    ):
        self.latest, self.kept, self.last_preserved, self.outside = latest, kept, last_preserved, outside


def read_kept_list(model_dir: str, *, untrusted: Optional[bool] = None) -> Optional[KeptList]:
    """The kept checkpoints of `<model_dir>/checkpoint` (None: no readable state file), each resolved with
    `checkpoint_files.resolve_state_path`; what lies outside the model dir is left out (`outside`), never kept.

    Raises:
        UnsafeParameterError: untrusted (default: in a deployment run), and the state file names a
            checkpoint outside the model dir (the message names the state file and the entry).
    """
    from tensorflow.python.checkpoint.checkpoint_management import get_checkpoint_state

    untrusted = untrusted if untrusted is not None else in_deployment_run()
    model_dir = os.path.normpath(model_dir)
    absolute_dir = os.path.abspath(model_dir)
    source = os.path.join(model_dir, STATE_FILE)
    if not os.path.exists(source):
        return None
    try:
        state = get_checkpoint_state(model_dir)
    except Exception as err:  # noqa: BLE001 - an unreadable state file is rewritten at the first commit
        get_logger().warning("%s: state file unreadable (%s); starting a new one", model_dir, err)
        return None
    if state is None:
        return None
    now = time.time()
    last_preserved = min(state.last_preserved_timestamp or now, now)
    timestamps = list(state.all_model_checkpoint_timestamps) or [last_preserved] * len(state.all_model_checkpoint_paths)
    kept: collections.OrderedDict[str, float] = collections.OrderedDict()
    outside: list[str] = []

    def inside(named: str) -> Optional[str]:
        # Untrusted: raises UnsafeParameterError for a checkpoint outside the model dir, naming the state file.
        path = os.path.normpath(resolve_state_path(model_dir, named, source=source, untrusted=untrusted))
        if os.path.dirname(path) != absolute_dir or not is_inside(path, model_dir):
            get_logger().warning(
                "%s names %s, outside the model dir %s; the keep policy leaves it alone", source, named, model_dir
            )
            outside.append(named)
            return None
        return os.path.join(model_dir, os.path.basename(path))

    for named, timestamp in zip(state.all_model_checkpoint_paths, timestamps):
        path = inside(named)
        if path is not None and min(timestamp, now) > last_preserved:
            kept[path] = min(timestamp, now)
    latest = inside(state.model_checkpoint_path) if state.model_checkpoint_path else None
    return KeptList(latest, kept, last_preserved, outside)


def apply_keep_policy(model_dir: str, policy: CheckpointPolicy, *, untrusted: Optional[bool] = None) -> None:
    """The keep policy's last sweep over `model_dir`, by its state file's kept list: what a writer held back for
    its metrics line is deleted now (a multi-worker training's caller, once its sidecar evaluator is done).

    Example:
        >>> import tempfile
        >>> apply_keep_policy(tempfile.mkdtemp(), CheckpointPolicy(keep_checkpoint_max=2))  # no state file: nothing
    """
    writer = CheckpointWriter(None, model_dir, policy, untrusted=untrusted)
    try:
        writer.apply_keep_policy()
    finally:
        writer.directory.close()


def write_state_file(
    directory: OpenDir,
    latest: str,
    kept: collections.OrderedDict[str, float],
    last_preserved: float,
    *,
    durable: bool = True,
) -> None:
    """Rewrite `directory`'s state file (relative names, as TensorFlow's `save_relative_paths=True`), staged and
    renamed relative to its descriptor after `verify()` (`storage.staged_file`; `durable`: the staged file
    fsynced before the rename, the directory after)."""
    from google.protobuf import text_format
    from tensorflow.python.checkpoint.checkpoint_management import generate_checkpoint_state_proto

    proto = generate_checkpoint_state_proto(
        ".",
        model_checkpoint_path=os.path.basename(latest),
        all_model_checkpoint_paths=[os.path.basename(p) for p in kept],
        all_model_checkpoint_timestamps=list(kept.values()),
        last_preserved_timestamp=last_preserved,
    )
    directory.verify()
    with staged_file(STATE_FILE, parent=directory, durable=durable) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text_format.MessageToString(proto))


class _Recipe:
    """How to snapshot and write one `tf.train.Checkpoint`: its keys, object graph and tensor sources."""

    def __init__(self, checkpoint: Any, keys: list[str], graph_proto: bytes, read: Any, fallback: bool):
        self.checkpoint, self.keys, self.graph_proto, self._read, self.fallback = checkpoint, keys, graph_proto, read, fallback

    @classmethod
    def learn(cls, checkpoint: Any) -> _Recipe:
        """Serialize the object graph once, with TensorFlow's own code, and keep what each save needs."""
        import tensorflow as tf
        from tensorflow.python.checkpoint import graph_view, save_util
        from tensorflow.python.distribute.values import DistributedValues
        from tensorflow.python.training.saving.saveable_object import SaveSpec
        from tensorflow.python.training.saving.saveable_object_util import SaveableCompatibilityConverter

        checkpoint.save_counter  # noqa: B018 - created lazily; it is part of every checkpoint
        serialized, _, registered, proto = save_util.serialize_graph_view(graph_view.ObjectGraphView(checkpoint))
        readers: list[tuple[str, Callable[[], Any]]] = []  # (key, how to get its tensor inside the snapshot function)
        plain = not registered
        for trackable, tensors in serialized.items():
            if trackable is None:
                continue
            if isinstance(trackable, tf.train.experimental.PythonState) or isinstance(
                getattr(trackable, "obj", None), tf.train.experimental.PythonState
            ):
                plain = False  # its value is Python's: a traced snapshot would keep the first save's value forever
                continue
            if isinstance(trackable, SaveableCompatibilityConverter):  # wraps e.g. the input iterator
                for saveable in trackable.saveables:
                    if isinstance(trackable.obj, DistributedValues) and len(saveable.specs) == 1:
                        readers.append((saveable.specs[0].name, _variable_reader(trackable.obj)))  # a strategy's variable
                        continue
                    if not hasattr(trackable.obj, "_serialize_to_tensors"):
                        plain = False
                        continue
                    for spec in saveable.specs:  # spec names are the saveable's name + the object's own key
                        own_key = spec.name[len(saveable.name) :] or spec.name.rsplit("/", 1)[-1]
                        readers.append((spec.name, _serialized_reader(trackable.obj, own_key)))
                continue
            for key, value in tensors.items():
                if isinstance(value, dict):  # sliced (partitioned) tensors: let TensorFlow write them
                    plain = False
                elif isinstance(value, DistributedValues):  # a variable of a tf.distribute strategy: its local value
                    readers.append((key, _variable_reader(value)))
                elif isinstance(value, SaveSpec) and not hasattr(value, "numpy"):
                    readers.append((key, _variable_reader(trackable)))
                else:
                    readers.append((key, _serialized_reader(trackable, key.rsplit("/", 1)[-1])))
        if not plain:
            get_logger().info("this checkpoint has parts only TensorFlow's own save writes; using it")
            return cls(checkpoint, [], b"", None, fallback=True)

        @tf.function
        def read() -> list:
            return [tf.identity(reader()) for _, reader in readers]

        return cls(checkpoint, [key for key, _ in readers], proto.SerializeToString(), read, fallback=False)

    def warm_up(self) -> None:
        """Trace the snapshot function and run it once, its result dropped (the fallback has none).

        Its first call is where TensorFlow traces it and builds its executor; a read has no side effect.
        """
        if not self.fallback:
            self._read()

    def snapshot(self) -> Any:
        """The tensors of this step (or None: the fallback writes the live objects)."""
        if self.fallback:
            return None
        self.checkpoint.save_counter.assign_add(1)
        return self._read()

    def write(self, prefix: str, snapshot: Any, *, durable: bool = False) -> None:
        """Write the snapshot as TensorFlow would, the index appearing last (its merge).

        `durable`: the caller fsyncs the files next, so a large data file may as well go straight to the
        disk (`bundle.DIRECT_MIN_BYTES`); otherwise it goes through the page cache, written back later.
        """
        import tensorflow as tf

        if self.fallback:
            self.checkpoint.write(prefix)
            return
        names = ["_CHECKPOINTABLE_OBJECT_GRAPH", *self.keys]
        tensors = [tf.constant(self.graph_proto), *snapshot]
        temp = f"{prefix}_temp/part-00000-of-00001"
        if bundle.can_write(tensors):  # the same files as SaveV2's, without its copy and software CRC32C
            os.makedirs(os.path.dirname(temp), exist_ok=True)
            bundle.write_bundle(temp, dict(zip(names, tensors)), direct_min_bytes=bundle.DIRECT_MIN_BYTES if durable else None)
        else:
            tf.raw_ops.SaveV2(prefix=temp, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)
        tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=[temp], destination_prefix=prefix, delete_old_dirs=True)


class _AbandonedError(Exception):
    """The training failed: the writes still queued are dropped."""


def _variable_reader(variable: Any) -> Callable[[], Any]:
    return lambda: variable.read_value() if hasattr(variable, "read_value") else variable.value


def _serialized_reader(trackable: Any, name: str) -> Callable[[], Any]:
    return lambda: trackable._serialize_to_tensors()[name]
