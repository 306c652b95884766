"""One trainer per model dir: the lease a training holds on its model dir (or its data window) while it runs.

Two trainings on one model dir (a nightly run beside a manual Run, a retry
beside a run still alive) would both resume from the same step and overwrite
each other's checkpoints. `train_with_checkpoints` therefore holds the model
dir's lease for the whole training, in the calling process only (the sidecar
evaluator and the multi-worker workers are its children, not competitors):

| | local directory | `s3://` / `gs://` prefix |
|---|---|---|
| the lease | `flock` on `<model_dir>/.ptf-trainer.lock` (opened without following a symlink) | the object `<model_dir>/.prefect-tensorflow/trainer-lease`, made by a conditional write (`storage.s3.lease`) |
| the holder dies (SIGKILL, OOM) | the kernel drops the lock at once | the heartbeat stops; another trainer takes it over after `PREFECT_TENSORFLOW_LEASE_TTL` seconds |
| a normal end | the lock file is emptied, then unlocked (it stays: see `_local_lease`) | the lease object is deleted |

The holder (host, pid, Prefect flow run and its name, start time) is written
into the lock file or lease object; a second trainer waits up to
`PREFECT_TENSORFLOW_LEASE_WAIT` seconds (default 0), then refuses with
`ModelDirBusyError` naming it. Both decisions are logged.

Example:
    >>> import tempfile
    >>> from prefect_tensorflow.tasks.checkpoints.model_dir import ModelDir
    >>> from prefect_tensorflow.tasks.training.model_dir_lease import hold_model_dir
    >>> model_dir = ModelDir.parse(tempfile.mkdtemp())
    >>> with hold_model_dir(model_dir) as holder:
    ...     with hold_model_dir(model_dir):
    ...         pass
    Traceback (most recent call last):
    ...
    prefect_tensorflow.tasks.errors.ModelDirBusyError: model dir ...: another training holds it (pid ...
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from ..checkpoints.model_dir import ModelDir
from ..errors import ModelDirBusyError, StorageError
from ..run_context import get_logger
from ..settings import get_settings
from ..storage.backend import StorageBackend
from ..storage.confined_dirs import OpenDir, open_directory
from ..storage.s3 import HeldLease, lease

LOCK_FILE = ".ptf-trainer.lock"
REMOTE_LEASE = ".prefect-tensorflow/trainer-lease"
POLL_SECONDS = 0.2


def holder_record(what: str = "training") -> dict[str, Any]:
    """Who takes a lease: host, pid, what for, the Prefect flow run (id, name) if any, and when (UTC).

    Example:
        >>> sorted(holder_record())
        ['host', 'pid', 'since', 'what']
    """
    from ..run_context import prefect_run_tags

    record: dict[str, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "what": what,
        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tags = prefect_run_tags()
    for key in ("flow_run_id", "flow_run_name"):
        if tags.get(f"prefect.{key}"):
            record[key] = tags[f"prefect.{key}"]
    return record


def describe_holder(record: Optional[dict[str, Any]]) -> str:
    """The holder in words, for the error and the log.

    Example:
        >>> describe_holder({"host": "gpu1", "pid": 42, "since": "2026-12-01T02:00:00+00:00", "flow_run_name": "nightly"})
        'pid 42 on gpu1, flow run nightly, since 2026-12-01T02:00:00+00:00'
        >>> describe_holder(None)
        'holder unknown'
    """
    if not record:
        return "holder unknown"
    words = [f"pid {record.get('pid', '?')} on {record.get('host', '?')}"]
    name, run_id = record.get("flow_run_name"), record.get("flow_run_id")
    if name or run_id:
        words.append(f"flow run {name} ({run_id})" if name and run_id else f"flow run {name or run_id}")
    if record.get("since"):
        words.append(f"since {record['since']}")
    return ", ".join(words)


@contextmanager
def hold_model_dir(
    model_dir: ModelDir,
    *,
    wait: Optional[float] = None,
    ttl: Optional[float] = None,
    what: str = "training",
    name: str = "",
    subject: str = "",
) -> Iterator[HeldModelDir]:
    """Hold `model_dir`'s lease for the block (see the module docstring); yields it (`HeldModelDir`).

    Args:
        model_dir: the model dir (a local one is created if missing).
        wait: seconds to wait for another holder (default: `PREFECT_TENSORFLOW_LEASE_WAIT`).
        ttl: an object-store lease's time to live without a heartbeat (default: `PREFECT_TENSORFLOW_LEASE_TTL`).
        what: what the holder does, recorded ("training", "window 2026-11-30_2026-12-01").
        name: another lease in the same directory (a window's): the lock file `<name>.lock`, the lease
            object `.prefect-tensorflow/<name>-lease`; default: the trainer lease.
        subject: what the lease is named as in messages (default: the model dir).

    Raises:
        ModelDirBusyError: another process held it for `wait` seconds (naming it).
        StorageError: a local lock file is a symlink or not a regular file, or the store failed.
    """
    settings = get_settings()
    wait = settings.lease_wait if wait is None else wait
    ttl = settings.lease_ttl if ttl is None else ttl
    record = holder_record(what)
    subject = subject or model_dir.uri
    if model_dir.is_remote:
        remote_name = f".prefect-tensorflow/{name}-lease" if name else REMOTE_LEASE
        with _remote_lease(model_dir.store(), record, wait=wait, ttl=ttl, name=remote_name, subject=subject) as held:
            yield HeldModelDir(record, held.check)
        return
    with open_directory(model_dir.uri, parameter="model_dir", create=True) as directory:
        lock_name = f"{name}.lock" if name else LOCK_FILE
        with _local_lease(directory, record, wait=wait, name=lock_name, subject=subject) as fd:
            yield HeldModelDir(record, lambda: _check_local(directory, lock_name, fd))


@dataclass(frozen=True)
class HeldModelDir:
    """A lease held: its holder record, and `check()`, which raises once it is no longer this process's.

    Call `check()` before a commit: an object-store lease taken over (this holder hung past its TTL)
    or a local lock file removed from under it means another training may be writing.
    """

    record: dict[str, Any]
    check: Callable[[], None]


def _check_local(directory: OpenDir, name: str, fd: int) -> None:
    """Raise unless the directory still names the lock file this process holds."""
    try:
        named = os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
    except OSError:
        named = None
    mine = os.fstat(fd)
    if named is None or (named.st_dev, named.st_ino) != (mine.st_dev, mine.st_ino):
        raise StorageError(
            f"{directory.display(name)}: the lock file was removed or replaced while held; nothing more is committed"
        )


@contextmanager
def _remote_lease(
    store: StorageBackend, record: dict[str, Any], *, wait: float, ttl: float, name: str, subject: str
) -> Iterator[HeldLease]:
    def busy(held: Optional[dict[str, Any]], waited: float) -> BaseException:
        holder = describe_holder((held or {}).get("holder"))
        get_logger().warning("%s: refused: another training holds it (%s)", subject, holder)
        return ModelDirBusyError(subject, holder, wait)

    started = time.monotonic()
    with lease(store, name, ttl=ttl, wait=wait, holder=record, busy=busy) as held:
        _log_taken(subject, time.monotonic() - started)
        yield held


@contextmanager
def _local_lease(directory: OpenDir, record: dict[str, Any], *, wait: float, name: str, subject: str) -> Iterator[int]:
    started = time.monotonic()
    fd = _acquire(directory, wait, name, subject)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode() + b"\n", 0)
        _log_taken(subject, time.monotonic() - started)
        yield fd
    finally:
        # The file stays (emptied, unlocked): removing it would change the model dir after its state file,
        # and selection trusts a state file that is the directory's last change (`state_file_is_last_change`).
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _acquire(directory: OpenDir, wait: float, name: str, subject: str) -> int:
    """A descriptor of the lock file `name`, flocked, that the directory still names (else try again)."""
    started = time.monotonic()
    deadline = started + wait
    logged = False
    path = directory.display(name)
    while True:
        fd = _open_lock_file(directory, name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(_read_record(fd))
            os.close(fd)
            if time.monotonic() >= deadline:
                get_logger().warning("%s: refused: another training holds it (%s)", subject, holder)
                raise ModelDirBusyError(subject, holder, wait) from None
            if not logged:
                logged = True
                get_logger().warning("%s: another training holds it (%s); waiting up to %.0f s", subject, holder, wait)
            time.sleep(POLL_SECONDS)
            continue
        try:
            named = os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
        except FileNotFoundError:
            named = None
        mine = os.fstat(fd)
        if named is not None and (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino):
            return fd
        os.close(fd)  # its holder removed it when done: lock the file the model dir names now
        if not os.path.isdir(directory.handle):
            raise StorageError(f"{path}: the model dir went away while waiting for its lock")


def _open_lock_file(directory: OpenDir, name: str) -> int:
    path = directory.display(name)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(name, flags, 0o644, dir_fd=directory.fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise StorageError(f"lock file {path} is a symbolic link; refused (a lock file is never followed)") from err
        raise StorageError(f"lock file {path}: cannot be opened for the model dir's lease: {err.strerror or err}") from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StorageError(f"lock file {path} is not a regular file; refused")
    return fd


def _read_record(fd: int) -> Optional[dict[str, Any]]:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _log_taken(where: str, waited: float) -> None:
    if waited >= POLL_SECONDS:
        get_logger().warning("%s: holding the trainer lease after waiting %.1f s for the previous holder", where, waited)
    else:
        get_logger().info("%s: holding the trainer lease", where)
