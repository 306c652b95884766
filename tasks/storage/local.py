"""Local disk as a storage backend: atomic publishing by rename, locks by `flock`, and `LocalStore`.

Every local writer of the package (exports, frozen graphs, checkpoints, the
metrics log) publishes through this module, in the spirit of Orbax's
`atomicity.py`: the content is written into a temporary sibling whose name
carries one recognisable marker (`.ptf-tmp-`), verified, then finalized by
one `rename` (a reader never sees a half-written file or directory), or by
one `link` when the name must not exist yet (`staged_file(create_only=True)`).
An abandoned temporary (its process is gone) is removed by
`remove_abandoned_temporaries`.

Publishing is durable by default, so that a power cut never leaves a name
pointing at data that never reached the disk: the staged file (or every file
and directory of a staged directory) is fsynced before the publishing rename,
and the parent directory after it (`durable=False` skips both: the rename is
still atomic, only the order on disk after a power cut is not guaranteed).
`fsync_entries` and `fsync_directory` are the same steps for a writer that
stages its files itself (the checkpoint writer).

`LocalStore` is the `backend.StorageBackend` of a local directory: the same
methods as the object stores (`s3.ObjectStore`), made of the helpers above.
Given the directory opened once (`confined_dirs.OpenDir`), it works through
that descriptor, following no symlink in the names it writes.

Example:
    >>> import os, tempfile
    >>> from prefect_tensorflow.tasks.storage.local import LocalStore, staged_file
    >>> from prefect_tensorflow.tasks.storage.locations import parse_location
    >>> target = os.path.join(tempfile.mkdtemp(), "graph.pb")
    >>> with staged_file(target) as tmp:
    ...     _ = open(tmp, "wb").write(b"bytes")
    >>> open(target, "rb").read()
    b'bytes'
    >>> store = LocalStore(parse_location(os.path.dirname(target), parameter="output"))
    >>> store.put_bytes("graph.pb", b"other", create_only=True)
    Traceback (most recent call last):
    ...
    FileExistsError: .../graph.pb
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Optional

from ..errors import StorageError
from .backend import ObjectInfo, PreconditionFailedError

if TYPE_CHECKING:
    from .confined_dirs import OpenDir
    from .locations import Location

TEMP_MARKER = ".ptf-tmp-"
LOCK_FILE = ".prefect-tensorflow.lock"
ABANDONED_AFTER_SECONDS = 24 * 3600
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


# --- durability ----------------------------------------------------------------------------


def fsync_directory(directory: Any) -> None:
    """fsync a directory (a path, or an open descriptor of it): its entries (a rename, a new file) reach the disk.

    Example:
        >>> import tempfile
        >>> fsync_directory(tempfile.mkdtemp())
    """
    if isinstance(directory, int):
        os.fsync(directory)
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_entries(names: Sequence[str], *, dir_fd: Optional[int] = None) -> None:
    """fsync each file in `names` (paths, or names relative to `dir_fd`), following no symlink.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "data")
        >>> _ = open(path, "wb").write(b"bytes")
        >>> fsync_entries([path])
    """
    for name in names:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(top: str) -> None:
    """fsync every regular file and directory under `top` (deepest first, `top` last), following no symlink."""
    for root, _dirs, files in os.walk(top, topdown=False):
        fsync_entries([os.path.join(root, f) for f in files if not os.path.islink(os.path.join(root, f))])
        fsync_directory(root)


# --- local atomic publishing ---------------------------------------------------------------
#
# Each helper takes an optional `parent` (`confined_dirs.OpenDir`): the directory, opened once, that
# `final` is a name in. With it, everything is created, renamed and removed relative to the
# directory's descriptor, the writer is handed a path through that descriptor, and the directory is
# verified (`OpenDir.verify`) right before the publishing rename; without it, plain paths as before.


def _temporary_name(name: str) -> str:
    return f".{name}{TEMP_MARKER}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temporary_sibling(final: str) -> str:
    """`<dir>/.<name>.ptf-tmp-<host>-<pid>-<random>`: where `final` is staged before its rename."""
    parent, name = os.path.split(os.path.abspath(final))
    return os.path.join(parent, _temporary_name(name))


def _entry_name(final: str, parent: OpenDir) -> str:
    """`final` as a name in `parent`: a bare name, or a path whose directory is `parent`'s path."""
    directory, name = os.path.split(final)
    if not name or name in (".", "..") or (directory and os.path.normpath(directory) != os.path.normpath(parent.path)):
        raise StorageError(f"{final}: expected a name in {parent.path}")
    return name


def _remove_entry(dir_fd: int, name: str) -> None:
    """Remove `name` (a file, or a whole directory) inside the directory `dir_fd`, following no symlink."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, ignore_errors=True, dir_fd=dir_fd)
    else:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass


@contextmanager
def staged_directory(final: str, *, parent: Optional[OpenDir] = None, durable: bool = True) -> Iterator[str]:
    """Yield a new temporary sibling directory of `final`; on success rename it to `final`.

    `final` must not exist when the block ends (a version directory is never
    replaced). On an error the temporary is removed and nothing is published.
    With `parent` (see above) `final` is a name in it, and the yielded path
    resolves through `parent`'s descriptor. `durable`: every file and directory
    of the temporary fsynced before the rename, the parent after.
    """
    if parent is not None:
        with _staged_directory_in(parent, _entry_name(final, parent), durable) as tmp:
            yield tmp
        return
    tmp = temporary_sibling(final)
    os.makedirs(tmp)
    try:
        yield tmp
        if durable:
            fsync_tree(tmp)
        try:
            os.rename(tmp, final)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise StorageError(f"{final} already exists; nothing was replaced") from err
            raise
        if durable:
            fsync_directory(os.path.dirname(os.path.abspath(final)))
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _staged_directory_in(parent: OpenDir, name: str, durable: bool) -> Iterator[str]:
    tmp = _temporary_name(name)
    os.mkdir(tmp, dir_fd=parent.fd)
    try:
        yield parent.entry(tmp)
        if durable:
            fsync_tree(parent.entry(tmp))
        parent.verify()
        try:
            os.rename(tmp, name, src_dir_fd=parent.fd, dst_dir_fd=parent.fd)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise StorageError(f"{parent.display(name)} already exists; nothing was replaced") from err
            raise
        if durable:
            fsync_directory(parent.fd)
    finally:
        _remove_entry(parent.fd, tmp)


@contextmanager
def staged_file(
    final: str, *, parent: Optional[OpenDir] = None, create_only: bool = False, durable: bool = True
) -> Iterator[str]:
    """Yield a temporary sibling path of `final`; on success atomically replace `final` with it.

    With `parent` (see above) `final` is a name in it; the temporary is created
    there at once (a new regular file, never a symlink's target) and the yielded
    path resolves through `parent`'s descriptor. With `create_only`, `final` is
    linked into place only if nothing has that name (else FileExistsError, and
    what is there stays). `durable`: the temporary fsynced before the rename,
    the parent directory after.
    """
    if parent is not None:
        with _staged_file_in(parent, _entry_name(final, parent), create_only, durable) as tmp:
            yield tmp
        return
    tmp = temporary_sibling(final)
    try:
        yield tmp
        if durable:
            fsync_entries([tmp])
        _publish_file(tmp, final, create_only=create_only)
        if durable:
            fsync_directory(os.path.dirname(os.path.abspath(final)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def _staged_file_in(parent: OpenDir, name: str, create_only: bool, durable: bool) -> Iterator[str]:
    tmp = _temporary_name(name)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=parent.fd))
    try:
        yield parent.entry(tmp)
        if durable:
            fsync_entries([tmp], dir_fd=parent.fd)
        parent.verify()
        _publish_file(tmp, name, create_only=create_only, dir_fd=parent.fd)
        if durable:
            fsync_directory(parent.fd)
    finally:
        _remove_entry(parent.fd, tmp)


def _publish_file(tmp: str, final: str, *, create_only: bool, dir_fd: Optional[int] = None) -> None:
    """Rename `tmp` to `final`; with `create_only`, link it there only if `final` does not exist."""
    if not create_only:
        os.replace(tmp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    try:
        os.link(tmp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        raise FileExistsError(final) from None


def _abandoned(name: str, mtime: float, now: float) -> bool:
    """A temporary is abandoned when a day old, or when its writer (on this host) is gone."""
    if now - mtime > ABANDONED_AFTER_SECONDS:
        return True
    parts = name.rpartition(TEMP_MARKER)[2].rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return True  # not one of ours in the expected shape: a leftover of an older layout
    host, pid = parts[0], int(parts[1])
    if host != _HOST:
        return False  # another machine's write may be under way: only the age decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_abandoned_temporaries(parent: str, *, directory: Optional[OpenDir] = None) -> list[str]:
    """Remove the temporaries in `parent` whose writer is gone (or that are a day old); return them.

    With `directory` (`parent` opened once, see above) they are listed and removed through its descriptor.
    """
    removed: list[str] = []
    now = time.time()
    try:
        entries = list(os.scandir(directory.fd if directory is not None else parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if TEMP_MARKER not in entry.name:
            continue
        try:
            stale = _abandoned(entry.name, entry.stat(follow_symlinks=False).st_mtime, now)
        except FileNotFoundError:
            continue
        if stale:
            if directory is not None:
                _remove_entry(directory.fd, entry.name)
                removed.append(directory.display(entry.name))
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                try:
                    os.remove(entry.path)
                except FileNotFoundError:
                    pass
            removed.append(entry.path)
    return removed


@contextmanager
def exclusive_lock(
    directory: str, name: str = LOCK_FILE, *, parent: Optional[OpenDir] = None, blocking: bool = True
) -> Iterator[bool]:
    """Hold an exclusive `flock` on `<directory>/<name>` (created if missing) for the block; yields True.

    The lock file is opened with `O_NOFOLLOW` (relative to `parent`'s descriptor when given): a
    symlink in its place is refused, never followed to create or lock its target. Not `blocking`,
    it yields False (without the lock) when another holder has it.

    Raises:
        StorageError: the directory is missing or not writable, or the lock file is a symlink or not a file.
    """
    path = os.path.join(directory, name)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(name, flags, 0o666, dir_fd=parent.fd) if parent is not None else os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise StorageError(f"lock file {path} is a symbolic link; refused (a lock file is never followed)") from err
        raise StorageError(f"{directory} is not writable: {err.strerror or err}") from err
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StorageError(f"lock file {path} is not a regular file; refused")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --- the backend ---------------------------------------------------------------------------


def _info(st: os.stat_result) -> ObjectInfo:
    """A local file's identity as an etag: a replaced file (a new inode or time) has another."""
    return ObjectInfo(st.st_size, f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}", st.st_mtime)


class LocalStore:
    """The files under one local directory, with the methods of the object stores (`backend.StorageBackend`).

    With `directory` (the location opened once, `confined_dirs.OpenDir`) every name resolves through
    its descriptor; a file is opened for reading with `O_NOFOLLOW`. Conditional replaces and deletes
    hold the directory's `flock` for their compare-and-swap.
    """

    def __init__(self, location: Location, directory: Any = None):
        if not location.is_local:
            raise StorageError(f"{location}: LocalStore holds local directories; see stores.object_store()")
        self.location = location
        self.directory: Optional[OpenDir] = directory

    @property
    def _base(self) -> str:
        return self.directory.handle if self.directory is not None else self.location.uri

    def key(self, *names: str) -> str:
        return os.path.join(self._base, *(n.strip("/") for n in names if n.strip("/")))

    def uri(self, *names: str) -> str:
        return os.path.join(self.location.uri, *(n.strip("/") for n in names if n.strip("/")))

    # --- reading ------------------------------------------------------------------------------

    def read_with_info(self, name: str) -> tuple[bytes, ObjectInfo]:
        try:
            fd = os.open(self.key(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError as err:
            raise FileNotFoundError(self.uri(name)) from err
        except OSError as err:
            raise StorageError(f"{self.uri(name)}: {err.strerror or err}") from err
        with os.fdopen(fd, "rb") as handle:
            info = _info(os.fstat(handle.fileno()))
            return handle.read(), info

    def read_bytes(self, name: str) -> bytes:
        return self.read_with_info(name)[0]

    def head(self, name: str) -> Optional[ObjectInfo]:
        try:
            st = os.stat(self.key(name), follow_symlinks=False)
        except FileNotFoundError:
            return None
        return _info(st) if stat.S_ISREG(st.st_mode) else None

    def listing(self, under: str = "", *, delimiter: bool = False, starting: str = "") -> dict[str, ObjectInfo]:
        """Regular files under `under` by name relative to the directory (staged temporaries and symlinks left out)."""
        found: dict[str, ObjectInfo] = {}
        top = self.key(under)
        for root, dirs, files in os.walk(top):
            relative_root = os.path.relpath(root, self._base).replace(os.sep, "/")
            prefix = "" if relative_root == "." else relative_root + "/"
            for name in files:
                if TEMP_MARKER in name:
                    continue
                relative = prefix + name
                if relative.startswith(starting):
                    try:
                        st = os.stat(os.path.join(root, name), follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISREG(st.st_mode):  # a symlink is no file of the store
                        found[relative] = _info(st)
            if delimiter:
                found.update({prefix + d + "/": ObjectInfo(0, "") for d in dirs if TEMP_MARKER not in d})
                break
            dirs[:] = [d for d in dirs if TEMP_MARKER not in d]
        return found

    def download_file(self, name: str, local: str) -> None:
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        with open(local, "wb") as handle:
            handle.write(self.read_bytes(name))

    def download_directory(self, under: str, local_dir: str) -> list[str]:
        names = list(self.listing(under))
        for name in names:
            relative = name[len(under.strip("/")) :].lstrip("/") if under else name
            self.download_file(name, os.path.join(local_dir, relative))
        return names

    # --- writing ------------------------------------------------------------------------------

    def put_bytes(self, name: str, data: bytes, *, create_only: bool = False, if_match: Optional[str] = None) -> str:
        if if_match is not None:
            with self._compare_and_swap():
                current = self.head(name)
                if current is None or current.etag != if_match:
                    raise PreconditionFailedError(self.uri(name))
                return self._write(name, data, create_only=False)
        return self._write(name, data, create_only=create_only)

    def _write(self, name: str, data: bytes, *, create_only: bool) -> str:
        try:
            with self._staged(name, create_only=create_only) as tmp:
                with open(tmp, "wb") as handle:
                    handle.write(data)
        except FileExistsError:
            raise FileExistsError(self.uri(name)) from None
        info = self.head(name)
        return info.etag if info is not None else ""

    def upload_file(self, local: str, name: str) -> None:
        with self._staged(name) as tmp:
            shutil.copyfile(local, tmp)

    def _staged(self, name: str, *, create_only: bool = False) -> AbstractContextManager[str]:
        """`staged_file` for `name`: through the directory's descriptor (verified before the rename) when it is
        a direct child of an opened directory, else by path (missing parents created)."""
        if self.directory is not None and "/" not in name.strip("/"):
            return staged_file(name.strip("/"), parent=self.directory, create_only=create_only)
        final = self.key(name)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        return staged_file(final, create_only=create_only)

    def delete(self, names: Sequence[str]) -> None:
        for name in names:
            try:
                os.unlink(self.key(name))
            except FileNotFoundError:
                pass

    def delete_if_match(self, name: str, etag: str) -> bool:
        with self._compare_and_swap():
            current = self.head(name)
            if current is None or current.etag != etag:
                return False
            self.delete([name])
            return True

    def publish_directory(self, local_dir: str, under: str, last: Sequence[str] = ()) -> list[str]:
        """Copy `local_dir` to `under/`, each file renamed into place, the `last` ones after all others."""
        files = sorted(
            os.path.relpath(os.path.join(root, f), local_dir).replace(os.sep, "/")
            for root, _, names in os.walk(local_dir)
            for f in names
        )
        ordered = [f for f in files if f not in last] + [f for f in last if f in files]
        for relative in ordered:
            self.upload_file(os.path.join(local_dir, relative), f"{under}/{relative}" if under else relative)
        return [f"{under}/{f}" if under else f for f in ordered]

    @contextmanager
    def _compare_and_swap(self) -> Iterator[None]:
        with exclusive_lock(self._base, f"{LOCK_FILE}.cas", parent=self.directory):
            yield
