"""Where things are: locations (local paths or object-store URIs) and how each kind publishes atomically.

Every writer of the package (exports, frozen graphs, checkpoints on object
storage) publishes through this module, in the spirit of Orbax's
`atomicity.py`: the content is written into a temporary sibling whose name
carries one recognisable marker (`.ptf-tmp-`), verified, then finalized:

- on local disk by one `rename` (a reader never sees a half-written file or
  directory), and an abandoned temporary (its process is gone) is removed by
  `remove_abandoned_temporaries`;
- on object storage (`s3://`, `gs://`: no rename) by uploading every part
  first and the one object readers look for last (see `object_store`).

A value that looks like a URI of another scheme (`s3:/bucket` with one
slash, `http://...`, `hdfs://...`) is refused, never turned into a local
directory named `s3:`.

Example:
    >>> import os, tempfile
    >>> from prefect_tensorflow.tasks.storage.locations import parse_location, staged_file
    >>> parse_location("s3://team/models/iris", parameter="model_dir").scheme
    's3'
    >>> target = os.path.join(tempfile.mkdtemp(), "graph.pb")
    >>> with staged_file(target) as tmp:
    ...     _ = open(tmp, "wb").write(b"bytes")
    >>> open(target, "rb").read()
    b'bytes'
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ..config_checks import short_repr
from ..errors import StorageError

if TYPE_CHECKING:
    from .confined_dirs import OpenDir

TEMP_MARKER = ".ptf-tmp-"
LOCK_FILE = ".prefect-tensorflow.lock"
REMOTE_SCHEMES = ("s3", "gs")
ABANDONED_AFTER_SECONDS = 24 * 3600
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(.*)$", re.S)
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


@dataclass(frozen=True)
class Location:
    """A parsed location: an absolute local path, or `<scheme>://<bucket>/<key prefix>`."""

    uri: str
    scheme: str  # "file", "s3" or "gs"

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def path(self) -> str:
        """The local path, or `bucket/key` as fsspec names an object."""
        return self.uri if self.is_local else self.uri.split("://", 1)[1]

    def join(self, *parts: str) -> Location:
        if self.is_local:
            return Location(os.path.join(self.uri, *parts), "file")
        return Location("/".join([self.uri.rstrip("/"), *(p.strip("/") for p in parts)]), self.scheme)

    @property
    def name(self) -> str:
        return os.path.basename(self.uri.rstrip("/"))

    def __str__(self) -> str:
        return self.uri


def parse_location(value: object, *, parameter: str) -> Location:
    """Parse a local path (relative ones made absolute) or an `s3://` / `gs://` URI.

    Raises:
        StorageError: naming `parameter`: not text, empty, a NUL byte or a lone surrogate, a URI of an
            unsupported scheme or a malformed one (`s3:/bucket`, `s3://`).
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip() or "\x00" in value or len(value) > 4096 or not _encodable(value):
        raise StorageError(f"{parameter}: expected a local path or an s3:// URI, received {short_repr(value)}")
    match = _SCHEME.match(value)
    if match is None:
        return Location(os.path.abspath(value), "file")
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "file":
        if not rest.startswith("//"):
            raise StorageError(f"{parameter}: expected file:///absolute/path, received {short_repr(value)}")
        return Location(os.path.abspath(rest[2:] or "/"), "file")
    if scheme not in REMOTE_SCHEMES:
        raise StorageError(
            f"{parameter}: unsupported scheme {scheme!r}; expected a local path, s3://bucket/prefix or "
            f"gs://bucket/prefix, received {short_repr(value)}"
        )
    bucket, _, key = rest[2:].partition("/") if rest.startswith("//") else ("", "", "")
    if not bucket or not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,62}", bucket):
        raise StorageError(f"{parameter}: expected {scheme}://bucket/prefix, received {short_repr(value)}")
    segments = [s for s in key.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise StorageError(f"{parameter}: '.' and '..' are not allowed in an object key, received {short_repr(value)}")
    return Location("/".join([f"{scheme}://{bucket}", *segments]), scheme)


def _encodable(text: str) -> bool:
    """False for text with a lone surrogate (`"\\udcff"`): no file system or object store can name it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def scratch_dir() -> str:
    """`<data home>/scratch`: where object-store writes are staged and downloads unpacked."""
    from ..settings import get_settings

    path = os.path.join(get_settings().home, "scratch")
    os.makedirs(path, exist_ok=True)
    return path


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
def staged_directory(final: str, *, parent: Optional[OpenDir] = None) -> Iterator[str]:
    """Yield a new temporary sibling directory of `final`; on success rename it to `final`.

    `final` must not exist when the block ends (a version directory is never
    replaced). On an error the temporary is removed and nothing is published.
    With `parent` (see above) `final` is a name in it, and the yielded path
    resolves through `parent`'s descriptor.
    """
    if parent is not None:
        with _staged_directory_in(parent, _entry_name(final, parent)) as tmp:
            yield tmp
        return
    tmp = temporary_sibling(final)
    os.makedirs(tmp)
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise StorageError(f"{final} already exists; nothing was replaced") from err
            raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _staged_directory_in(parent: OpenDir, name: str) -> Iterator[str]:
    tmp = _temporary_name(name)
    os.mkdir(tmp, dir_fd=parent.fd)
    try:
        yield parent.entry(tmp)
        parent.verify()
        try:
            os.rename(tmp, name, src_dir_fd=parent.fd, dst_dir_fd=parent.fd)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise StorageError(f"{parent.display(name)} already exists; nothing was replaced") from err
            raise
    finally:
        _remove_entry(parent.fd, tmp)


@contextmanager
def staged_file(final: str, *, parent: Optional[OpenDir] = None) -> Iterator[str]:
    """Yield a temporary sibling path of `final`; on success atomically replace `final` with it.

    With `parent` (see above) `final` is a name in it; the temporary is created
    there at once (a new regular file, never a symlink's target) and the yielded
    path resolves through `parent`'s descriptor.
    """
    if parent is not None:
        with _staged_file_in(parent, _entry_name(final, parent)) as tmp:
            yield tmp
        return
    tmp = temporary_sibling(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def _staged_file_in(parent: OpenDir, name: str) -> Iterator[str]:
    tmp = _temporary_name(name)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=parent.fd))
    try:
        yield parent.entry(tmp)
        parent.verify()
        os.replace(tmp, name, src_dir_fd=parent.fd, dst_dir_fd=parent.fd)
    finally:
        _remove_entry(parent.fd, tmp)


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
