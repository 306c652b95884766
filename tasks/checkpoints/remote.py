"""Checkpoints in an `s3://` model dir: select and list them, fetch one to run it, and publish them from training.

TensorFlow 2.21 does not read or write `s3://` (that moved to tensorflow-io,
which does not load with it), so an object-store model dir is mirrored:

- **Selecting** needs no TensorFlow and no download: the `checkpoint` state
  file (one GET) names the newest committed checkpoint; its `.index` (one GET)
  and its shards' sizes (one HEAD each, and one for a `.meta`) validate it,
  and the metrics log (one GET) gives its metrics: "latest" sends no listing
  and the same five requests on 1 or 10,000 checkpoints. A missing, garbage
  or dangling state file falls back to listing the directory and taking the
  highest valid step, each skipped one logged with why.
- **Running** one (export, freeze, verify) downloads its files to a local
  cache first (`fetch_checkpoint`).
- **Training** (`RemoteModelDir`) trains in a local staging directory: it
  first pulls the checkpoints the remote state file keeps, resumes from them,
  and publishes each checkpoint once TensorFlow has committed it locally:
  data shards, then the index, then the metrics log, then the state file
  last, in a background thread (training does not wait for the upload). The
  state file is the commit point on the store: a checkpoint whose upload a
  crash cut short is not named by it and is never "latest"; the next run
  redoes it, bit for bit. A publisher behind training (a slow store) takes
  the local state file as it is when it gets to it: it uploads the kept
  checkpoints the store lacks, then those state-file bytes, so that the
  store's state file never names a checkpoint whose files are not all there,
  and a checkpoint the keep policy deleted before its turn is skipped.
  Checkpoints the keep policy deletes locally are deleted remotely after the
  commit; what a killed run left (shards without an index, checkpoints the
  state file no longer keeps) is deleted with the next run's first commit.
  The sidecar evaluator's metrics lines follow with the next publish, and the
  last ones when training ends; so do the TensorBoard event files and
  `graph.pbtxt` (those that changed), so a killed run's summaries are on the
  store up to its last commit. The staging copy is removed when training
  ends, however it ends (`discard`); the training holds the model dir's lease
  (`training.model_dir_lease`), so no other process of any data home uses the
  same model dir meanwhile. A `fence` (the lease's check) is called before
  each publish and at `close`: a holder that hung past the lease's TTL and
  lost it uploads nothing more.

Every function takes the model dir's storage backend (`ModelDir.store()`),
parsed once by the caller.

Example:
    >>> from prefect_tensorflow.tasks.checkpoints.remote import checkpoint_names
    >>> from prefect_tensorflow.tasks.storage.backend import ObjectInfo
    >>> checkpoint_names({"model.ckpt-9.index": ObjectInfo(1, ""), "model.ckpt-10.index": ObjectInfo(1, "")})
    ['model.ckpt-10', 'model.ckpt-9']
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import Optional

from ..errors import InvalidCheckpointError, ModelDirError, NoValidCheckpointError, StorageError
from ..run_context import get_logger
from ..settings import get_settings
from ..storage.backend import ObjectInfo, PreconditionFailedError, StorageBackend
from ..storage.local import staged_file
from ..storage.locations import Location, parse_location
from ..storage.stores import object_store
from .files import (
    STATE_FILE,
    CheckpointFiles,
    data_shard_path,
    files_from_index,
    parse_state_lines,
    state_file_text,
    step_of,
)
from .metrics_log import METRICS_FILE, metrics_by_step

INDEX = ".index"
_CHECKPOINT_FILE = re.compile(r"^([^/]+-\d+)\.(?:index|meta|data-\d+-of-\d+)$")


def _sizes(listing: dict[str, ObjectInfo]):
    return lambda key: listing[key].size if key in listing else None


def check_remote_checkpoint(store: StorageBackend, name: str, listing: Optional[dict[str, ObjectInfo]] = None) -> CheckpointFiles:
    """Validate checkpoint `name` (e.g. `model.ckpt-300`) of `store`: its index parses, its shards are whole.

    With a `listing` (of the model dir) the shards' sizes come from it; without
    one, from a HEAD request each: a fixed number of requests however many
    checkpoints the model dir holds (one GET of the index, one HEAD per data
    shard and one for a `.meta` graph), and never a listing.

    Raises:
        InvalidCheckpointError: the index is missing or unreadable, a shard is missing or short.
    """
    uri = store.uri(name)
    if listing is not None and name + INDEX not in listing:
        raise InvalidCheckpointError(uri, "index file is missing")
    try:
        data, info = store.read_with_info(name + INDEX)
    except FileNotFoundError as err:
        raise InvalidCheckpointError(uri, "index file is missing") from err
    if listing is not None:
        sizes = _sizes(listing)
        has_meta = name + ".meta" in listing
    else:

        def sizes(key: str) -> Optional[int]:
            found = store.head(key)
            return None if found is None else found.size

        has_meta = store.head(name + ".meta") is not None
    return files_from_index(
        uri,
        data,
        index_size=len(data),
        mtime=info.modified,
        shard_size=lambda path: sizes(path[len(store.uri()) + 1 :]),
        has_meta_graph=has_meta,
    )


def remote_state(store: StorageBackend) -> str:
    """The checkpoint name the remote state file names (its basename).

    Raises:
        FileNotFoundError: there is no state file.
        ValueError: it is not a CheckpointState text proto.
    """
    data = store.read_bytes(STATE_FILE)
    return os.path.basename(parse_state_lines(data.splitlines(keepends=True), store.uri(STATE_FILE)))


def remote_metrics(store: StorageBackend) -> dict[int, dict[str, float]]:
    try:
        return metrics_by_step(store.read_bytes(METRICS_FILE).splitlines())
    except FileNotFoundError:
        return {}


def checkpoint_names(listing: dict[str, ObjectInfo]) -> list[str]:
    """Checkpoint names (`<prefix>-<step>`) with an index in a listing, highest step first."""
    names = [k[: -len(INDEX)] for k in listing if k.endswith(INDEX) and "/" not in k]
    return sorted(names, key=lambda n: (step_of(n) is not None, step_of(n) or 0, n), reverse=True)


def latest_remote_checkpoint(store: StorageBackend) -> CheckpointFiles:
    """The newest committed, valid checkpoint of an object-store model dir (see the module docstring).

    Raises:
        ModelDirError: nothing is stored under the model dir.
        NoValidCheckpointError: no checkpoint in it is valid.
    """
    model_dir = store.uri()
    log = get_logger()
    try:
        name = remote_state(store)
        return check_remote_checkpoint(store, name)
    except FileNotFoundError:
        why = "no 'checkpoint' state file"
    except ValueError as err:
        why = f"state file is unreadable ({err})"
        log.warning("%s: %s; looking for the newest valid checkpoint instead", model_dir, why)
    except InvalidCheckpointError as err:
        why = f"state file names {err.path}, which is invalid: {err.reason}"
        log.warning("%s: %s; looking for the newest valid checkpoint instead", model_dir, why)
    listing = store.listing()
    if not listing:
        raise ModelDirError(model_dir, "holds nothing; expected a directory of checkpoints")
    skipped = []
    for name in checkpoint_names(listing):
        if step_of(name) is None:
            continue
        try:
            return check_remote_checkpoint(store, name, listing)
        except InvalidCheckpointError as err:
            skipped.append(f"{name}: {err.reason}")
            log.warning("skipping checkpoint %s: %s", store.uri(name), err.reason)
    raise NoValidCheckpointError(model_dir, f"{why}; {'; '.join(skipped) or 'no <prefix>-<step>.index objects'}")


def remote_checkpoints(store: StorageBackend) -> Iterator[tuple[str, Optional[CheckpointFiles], Optional[str]]]:
    """Every checkpoint of an object-store model dir, highest step first: (uri, files or None, why invalid)."""
    listing = store.listing()
    if not listing:
        raise ModelDirError(store.uri(), "holds nothing; expected a directory of checkpoints")
    for name in checkpoint_names(listing):
        try:
            yield store.uri(name), check_remote_checkpoint(store, name, listing), None
        except InvalidCheckpointError as err:
            yield store.uri(name), None, err.reason


def fetch_checkpoint(prefix: str) -> str:
    """`fetch_checkpoint_files` for a checkpoint's URI (`s3://team/models/iris/model.ckpt-300`)."""
    location = parse_location(prefix, parameter="checkpoint")
    return fetch_checkpoint_files(object_store(location.parent), location.name)


def fetch_checkpoint_files(store: StorageBackend, name: str) -> str:
    """Download checkpoint `name`'s files (index, shards, `.meta`) to the local cache; returns the local prefix.

    The cache is `<data home>/cache/checkpoints/<hash of the URI>/`; a file already there with the
    right size is not downloaded again.

    Raises:
        InvalidCheckpointError: the checkpoint is incomplete on the store.
    """
    listing = store.listing(starting=name + ".")
    files = check_remote_checkpoint(store, name, listing)
    local_dir = os.path.join(
        get_settings().home, "cache", "checkpoints", hashlib.sha256(store.uri(name).encode()).hexdigest()[:16]
    )
    os.makedirs(local_dir, exist_ok=True)
    wanted = (
        [name + INDEX]
        + [data_shard_path(name, shard, files.num_shards) for shard in range(files.num_shards)]
        + ([name + ".meta"] if files.has_meta_graph else [])
    )
    for key in wanted:
        local = os.path.join(local_dir, key)
        if not (os.path.exists(local) and os.path.getsize(local) == listing[key].size):
            # A temporary of this process's own: two processes fetching one checkpoint share the cache.
            with staged_file(local) as tmp:
                store.download_file(key, tmp)
    return os.path.join(local_dir, name)


class RemoteModelDir:
    """A training's local mirror of an `s3://` model dir, and its publisher (see the module docstring).

    Example:
        mirror = RemoteModelDir("s3://team/models/iris")
        local_dir = mirror.pull()             # the checkpoints the remote state file keeps
        ... train in local_dir, calling mirror.publish(step, local_prefix) after each save ...
        mirror.close()                        # waits for the uploads; raises what failed
        mirror.discard()                      # the staging copy goes
    """

    def __init__(self, model_dir: str | Location, fence: Optional[Callable[[], None]] = None):
        location = model_dir if isinstance(model_dir, Location) else parse_location(model_dir, parameter="model_dir")
        self.uri = location.uri
        self.store = object_store(location)
        self.local_dir = os.path.join(get_settings().home, "staging", hashlib.sha256(self.uri.encode()).hexdigest()[:16])
        self._queue: queue.Queue = queue.Queue()
        self._published: Optional[bytes] = None  # the state file's bytes last committed to the store
        # The etags of the state file and the metrics log as this run last saw or wrote them (None: absent):
        # each write is conditional on them, so a writer the lease no longer covers overwrites neither.
        self._etags: dict[str, Optional[str]] = {STATE_FILE: None, METRICS_FILE: None}
        # Checkpoints with files on the store: whole ones (pulled or uploaded), and ones that may be
        # partial (an upload cut short, a killed run's leftovers), deleted unless the next commit keeps them.
        self._remote: set[str] = set()
        self._partial: set[str] = set()
        self._error: Optional[BaseException] = None
        self._fence = fence  # raises once the model dir's lease is lost: checked before each commit
        self._summaries: dict[str, tuple[int, int]] = {}  # event file / graph.pbtxt -> (size, mtime) uploaded
        self._thread = threading.Thread(target=self._upload_loop, name="checkpoint-publisher", daemon=True)

    def pull(self) -> str:
        """A fresh staging dir holding the checkpoints the remote state file keeps; returns its path."""
        shutil.rmtree(self.local_dir, ignore_errors=True)
        os.makedirs(self.local_dir)
        try:
            state = self.store.read_bytes(STATE_FILE)
        except FileNotFoundError:
            state = None
        listing = self.store.listing()
        names: list[str] = []
        if state is not None:
            try:
                latest = os.path.basename(parse_state_lines(state.splitlines(keepends=True), self.store.uri(STATE_FILE)))
                names = [latest] + [n for n in _kept(state) if n != latest]
            except ValueError:
                names = []
        if not names:  # no usable state file: the newest valid checkpoint, found by listing
            try:
                names = [os.path.basename(latest_remote_checkpoint(self.store).prefix)]
            except (NoValidCheckpointError, ModelDirError):
                names = []
        kept = []
        for name in names:
            try:
                files = check_remote_checkpoint(self.store, name, {k: v for k, v in listing.items() if k.startswith(name + ".")})
            except InvalidCheckpointError as err:
                get_logger().warning("not resuming from %s: %s", self.store.uri(name), err.reason)
                continue
            for key in [name + INDEX, *[data_shard_path(name, i, files.num_shards) for i in range(files.num_shards)]]:
                self.store.download_file(key, os.path.join(self.local_dir, key))
            kept.append(name)
        if METRICS_FILE in listing:
            self.store.download_file(METRICS_FILE, os.path.join(self.local_dir, METRICS_FILE))
        for name in self._etags:
            self._etags[name] = listing[name].etag if name in listing else None
        if kept:
            # The remote state file is TensorFlow's own (timestamps included, which the keep policy
            # reads): used as it is when the checkpoint it names is whole; else one naming what is.
            if (
                state is not None
                and kept[0] == names[0]
                and names == [n for n in names if n in kept]
                and state_named_first(state, kept[0])
            ):
                text = state
            else:
                text = state_file_text(kept[0], sorted(kept, key=lambda n: step_of(n) or 0)).encode()
            with open(os.path.join(self.local_dir, STATE_FILE), "wb") as handle:
                handle.write(text)
        # Checkpoints the store holds that its state file does not keep: what a run killed between
        # its commit and the keep policy's deletion, or in the middle of an upload, left behind.
        # They are deleted with the first checkpoint this run commits (as TensorFlow would have).
        present = _checkpoint_names_in(listing)
        leftovers = {n for n in present if n + INDEX not in listing}  # uploads cut short before their index
        if names and state is not None and state_named_first(state, names[0]):
            leftovers |= {n for n in present if n not in names}
        self._remote, self._partial = set(kept), leftovers
        self._thread.start()
        return self.local_dir

    def publish(self, step: int, local_prefix: str) -> None:
        """Queue the checkpoint just saved at `local_prefix` for upload (returns at once)."""
        self._queue.put((step, os.path.basename(local_prefix)))

    def close(self, timeout: float = 3600) -> None:
        """Upload what is queued, then the event files and `graph.pbtxt`.

        Raises:
            StorageError: an upload failed (the store's newest committed checkpoint is then an earlier one).
        """
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._error is not None:
            raise StorageError(f"{self.uri}: publishing checkpoints failed: {self._error}") from self._error
        if self._fence is not None:
            self._fence()  # the lease lost: not a byte more (metrics log, summaries) over the new holder's
        # The keep policy's last deletions (held back until their metrics lines existed) come after the
        # last commit: publish that state file too.
        self._publish_settled()
        # The sidecar evaluator writes a checkpoint's metrics line after its commit: each publish
        # carries the lines written so far, and this one those of the last checkpoints.
        metrics = os.path.join(self.local_dir, METRICS_FILE)
        if os.path.exists(metrics):
            self._put_unless_changed(METRICS_FILE, _read(metrics))
        self.publish_summaries()

    def _put_unless_changed(self, name: str, data: bytes) -> None:
        """Write the state file or the metrics log only if it is still what this run last saw or wrote.

        Raises:
            StorageError: another writer changed it (a training that took the lease over from this one).
        """
        try:
            self._etags[name] = self._put_if(name, data, self._etags[name])
        except (PreconditionFailedError, FileExistsError) as err:
            if self._fence is None:
                raise self._changed(name) from err
            # Still ours (the fence raises once the lease is taken over): the change is a dead holder's
            # write that was in flight when it died and landed after this run listed the store.
            self._fence()
            current = self.store.head(name)
            get_logger().warning(
                "%s: changed after this run listed it (a write of the previous holder landing late); "
                "replaced under this run's lease",
                self.store.uri(name),
            )
            try:
                self._etags[name] = self._put_if(name, data, current.etag if current is not None else None)
            except (PreconditionFailedError, FileExistsError) as again:
                raise self._changed(name) from again

    def _put_if(self, name: str, data: bytes, etag: Optional[str]) -> str:
        return self.store.put_bytes(name, data, if_match=etag) if etag else self.store.put_bytes(name, data, create_only=True)

    def _changed(self, name: str) -> StorageError:
        return StorageError(
            f"{self.store.uri(name)}: changed by another writer while this training held the model dir's lease "
            "(it was taken over); not overwritten"
        )

    def discard(self) -> None:
        """Remove the local staging copy (after `close`, or after a failure): the store keeps what was committed."""
        shutil.rmtree(self.local_dir, ignore_errors=True)

    def publish_summaries(self) -> None:
        """Upload the TensorBoard event files and `graph.pbtxt` that changed since they were last uploaded.

        Called after each checkpoint commit and when training ends: a killed run's summaries reach the
        store up to its last commit. An event file is uploaded as it is then (what the writer has flushed).
        """
        for root, _, names in os.walk(self.local_dir):
            for filename in names:
                if filename.startswith("events.out.tfevents.") or filename == "graph.pbtxt":
                    local = os.path.join(root, filename)
                    try:
                        st = os.stat(local)
                    except FileNotFoundError:
                        continue
                    if self._summaries.get(local) == (st.st_size, st.st_mtime_ns):
                        continue
                    self.store.upload_file(local, os.path.relpath(local, self.local_dir).replace(os.sep, "/"))
                    self._summaries[local] = (st.st_size, st.st_mtime_ns)

    def remote_prefix(self, local_prefix: Optional[str]) -> Optional[str]:
        return self.store.uri(os.path.basename(local_prefix)) if local_prefix else None

    def _upload_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._error is not None:
                return
            try:
                self._upload(*item)
            except BaseException as err:  # noqa: BLE001 - raised by close(), on the training thread
                self._error = err

    def _committed_locally(self, step: int) -> bool:
        try:
            with open(os.path.join(self.local_dir, STATE_FILE), "rb") as handle:
                named = step_of(parse_state_lines(handle, STATE_FILE))
        except (OSError, ValueError):
            return False
        return named is not None and named >= step

    def _upload(self, step: int, name: str) -> None:
        deadline = time.monotonic() + 3600
        while not self._committed_locally(step):  # an async save commits the index, then the state file
            if time.monotonic() > deadline:
                raise StorageError(f"{self.local_dir}: checkpoint {name} was never committed locally")
            time.sleep(0.05)
        self._publish_settled()

    def _publish_settled(self) -> None:
        """`publish_committed()` until a round finds the local state file unchanged under it."""
        for _ in range(1000):
            if self.publish_committed():
                return
            time.sleep(0.01)
        raise StorageError(f"{self.local_dir}: the checkpoints kept kept changing while being uploaded")

    def publish_committed(self) -> bool:
        """Publish what the local state file commits now; False if TensorFlow deleted a file meanwhile.

        The publisher may be behind training (a slow store): by the time it gets to a checkpoint,
        newer ones may have been committed and it deleted by the keep policy. So each round takes
        the local state file as it is, uploads every checkpoint it keeps that the store lacks
        (oldest first, shards before index), the metrics log, then those very state-file bytes:
        the store's state file never names a checkpoint whose files are not all there.
        """
        state = _read(os.path.join(self.local_dir, STATE_FILE))
        if state == self._published:
            return True  # a later round already published this state (the publisher caught up)
        if self._fence is not None:
            self._fence()  # the lease lost: nothing uploaded over the new holder's files
        try:
            latest = os.path.basename(parse_state_lines(state.splitlines(keepends=True), STATE_FILE))
        except ValueError:
            return False  # being rewritten
        kept = list(dict.fromkeys([*_kept(state), latest]))
        try:
            for name in sorted((n for n in kept if n not in self._remote), key=lambda n: step_of(n) or 0):
                shards = sorted(f for f in os.listdir(self.local_dir) if f.startswith(name + ".data-"))
                if not shards:
                    raise FileNotFoundError(os.path.join(self.local_dir, name + ".data-*"))
                self._partial.add(name)  # from its first file on: deleted with the others if it is not kept
                for filename in [*shards, name + INDEX]:
                    self.store.upload_file(os.path.join(self.local_dir, filename), filename)
                self._remote.add(name)
        except FileNotFoundError:
            return False  # deleted under us: a newer state file supersedes this one
        metrics = os.path.join(self.local_dir, METRICS_FILE)
        if os.path.exists(metrics):
            self._put_unless_changed(METRICS_FILE, _read(metrics))
        if self._fence is not None:
            self._fence()  # a holder whose lease was taken over commits nothing more
        self._put_unless_changed(STATE_FILE, state)  # the commit
        self._published = state
        gone = sorted(n for n in self._remote | self._partial if n not in kept)
        if gone:
            listing = self.store.listing()
            self.store.delete([k for k in listing if any(k.startswith(n + ".") for n in gone)])
            self._remote -= set(gone)
        self._partial.clear()
        get_logger().info("published checkpoint %s (step %s)", self.store.uri(latest), step_of(latest))
        self.publish_summaries()
        return True


def _checkpoint_names_in(listing: dict[str, ObjectInfo]) -> set[str]:
    """Names of the checkpoints (`<prefix>-<step>`) any of whose files (index, shards, .meta) is in a listing."""
    names = set()
    for key in listing:
        match = _CHECKPOINT_FILE.match(key)
        if match:
            names.add(match.group(1))
    return names


def state_named_first(state: bytes, name: str) -> bool:
    try:
        return os.path.basename(parse_state_lines(state.splitlines(keepends=True), STATE_FILE)) == name
    except ValueError:
        return False


def _kept(state: bytes) -> list[str]:
    import ast

    kept = []
    for line in state.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "all_model_checkpoint_paths":
            try:
                kept.append(os.path.basename(ast.literal_eval(value.strip())))
            except (ValueError, SyntaxError):
                continue
    return kept


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()
