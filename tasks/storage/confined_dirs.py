"""Output directories opened once and written through their handle, so a path swapped mid-run leads nowhere.

`security.confine` checks where a path string leads when it is checked. A
directory replaced by a symlink afterwards (between a run's checks and its
writes) would take every later write made through the same string elsewhere.
So the writers of a run (export versions and their lock file, frozen graphs)
open their output directory once and then create, rename, lock and remove
entries relative to that descriptor (`dir_fd=`), never through the path again:

- in a deployment run (untrusted) the directory is reached from the root it
  lies under, one component at a time, with `O_NOFOLLOW`: a symlink anywhere
  below the root is refused, and a missing component is created inside its
  already-open parent. The descriptor is provably a directory under the root;
- a library or CLI caller (trusted) gets the directory its path names,
  symlinks followed as before, but pinned all the same.

TensorFlow only takes path strings: it is given `/proc/self/fd/<fd>/<name>`
(`OpenDir.entry`), which the kernel resolves through the open descriptor, not
through the swappable path. Before each publish (`storage.staged_directory`,
`storage.staged_file`) `OpenDir.verify` checks that the path still names the
same directory: a directory moved or replaced during the run publishes
nothing, and the run fails saying so.

Example:
    >>> import os, tempfile
    >>> from prefect_tensorflow.tasks.storage.confined_dirs import open_directory
    >>> root = tempfile.mkdtemp()
    >>> with open_directory(os.path.join(root, "exports", "iris"), parameter="export_base", create=True,
    ...                     untrusted=True, roots=[root]) as directory:
    ...     directory.created, os.path.basename(directory.path)
    (True, 'iris')
    >>> os.symlink("/etc", os.path.join(root, "escape"))
    >>> open_directory(os.path.join(root, "escape"), parameter="frozen_dir", untrusted=True, roots=[root])
    Traceback (most recent call last):
    ...
    prefect_tensorflow.tasks.errors.UnsafeParameterError: frozen_dir: .../escape is a symbolic link; a deployment run follows none below the roots, received '.../escape'
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from ..errors import StorageError, UnsafeParameterError
from ..run_context import in_deployment_run
from .locations import parse_location

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_PROC_FD = "/proc/self/fd"


@dataclass
class OpenDir:
    """A directory held open by descriptor: write relative to `fd`, hand `entry(name)` to TensorFlow."""

    path: str  # the path it was opened as (for messages and results; never used to write)
    fd: int
    parent_fd: int  # its parent, to remove the directory itself (`remove_if_empty`)
    name: str  # its name in the parent
    created: bool  # this call created it
    root: Optional[str] = None  # the root it was walked from (untrusted), else None
    parameter: str = "path"
    _closed: bool = field(default=False, repr=False)

    @property
    def confined(self) -> bool:
        """Whether it was reached from a root without following any symlink."""
        return self.root is not None

    @property
    def handle(self) -> str:
        """A path to the directory itself that resolves through the descriptor (Linux `/proc`), else `path`."""
        return f"{_PROC_FD}/{self.fd}" if os.path.isdir(_PROC_FD) else self.path

    def entry(self, name: str) -> str:
        """The path of `name` inside this directory, for code that only takes path strings (TensorFlow)."""
        return os.path.join(self.handle, name)

    def display(self, name: str) -> str:
        """`<path>/<name>`, for messages and results."""
        return os.path.join(self.path, name)

    def verify(self) -> None:
        """Check the path still names this very directory (confined: reached again without symlinks).

        Raises:
            StorageError: the directory was moved, removed or replaced (e.g. by a symlink) since it was opened.
        """
        mine = os.fstat(self.fd)
        try:
            if self.root is not None:
                fd, parent, _ = _walk(self.root, self.path, create=False, parameter=self.parameter)
                try:
                    now = os.fstat(fd)
                finally:
                    os.close(fd)
                    os.close(parent)  # both: a long training verifies at every checkpoint
            else:
                now = os.stat(self.path)
        except (OSError, StorageError, UnsafeParameterError) as err:
            raise StorageError(
                f"{self.parameter} {self.path} was moved or replaced while the run used it ({_reason(err)}); nothing was published"
            ) from err
        if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            raise StorageError(
                f"{self.parameter} {self.path} was replaced by another directory while the run used it; nothing was published"
            )

    def is_dir(self, name: str) -> bool:
        """Whether `name` is a directory here (a symlink to one counts only for a trusted caller)."""
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=not self.confined)
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode)

    def listdir(self) -> list[str]:
        return os.listdir(self.fd)

    def remove_if_empty(self, *, but: Sequence[str] = ()) -> bool:
        """Remove the directory (after the entries named in `but`) when nothing else is in it; True if removed."""
        try:
            names = os.listdir(self.fd)
            if any(name not in but for name in names):
                return False
            for name in names:
                os.unlink(name, dir_fd=self.fd)
            os.rmdir(self.name, dir_fd=self.parent_fd)  # a symlink swapped in since is not a directory: refused
        except OSError:
            return False
        return True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for fd in {self.fd, self.parent_fd}:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __enter__(self) -> OpenDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return str(err)


def local_roots(roots: Optional[Sequence[str]] = None) -> list[str]:
    """The local roots (`PREFECT_TENSORFLOW_ROOTS`, else the data home), symlinks resolved."""
    from ..settings import get_settings

    allowed = list(roots) if roots is not None else get_settings().allowed_roots()
    resolved = []
    for root in allowed:
        location = parse_location(root, parameter="PREFECT_TENSORFLOW_ROOTS")
        if location.is_local:
            resolved.append(os.path.realpath(location.uri))
    return resolved


def _root_of(path: str, roots: Sequence[str]) -> Optional[str]:
    """The deepest root `path` lies under, by its words (nothing is resolved)."""
    under = [r for r in roots if path == r or path.startswith(r.rstrip(os.sep) + os.sep)]
    return max(under, key=len) if under else None


def _walk(root: str, path: str, *, create: bool, parameter: str) -> tuple[int, int, bool]:
    """Open `path` from `root`, one component at a time, following no symlink: (fd, parent fd, created).

    Raises:
        UnsafeParameterError: a component is a symlink.
        StorageError: a component is not a directory.
        FileNotFoundError: a component is missing (and `create` is False).
    """
    if create:
        os.makedirs(root, exist_ok=True)  # the root itself is configuration, not a run's choice
    parts = [p for p in os.path.relpath(path, root).split(os.sep) if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeParameterError(parameter, path, "'..' is not allowed below the roots")
    fd = os.open(root, _DIR_FLAGS)
    parent = os.dup(fd)
    created = False
    reached = root
    try:
        for part in parts:
            reached = os.path.join(reached, part)
            created = False
            try:
                child = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, dir_fd=fd)
                    created = True
                except FileExistsError:
                    pass  # made by someone else meanwhile: open it as it is (refused below if a symlink)
                child = _open_component(part, fd, reached, path, parameter)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    child = _open_component(part, fd, reached, path, parameter)  # raises the right error
                else:
                    raise
            os.close(parent)
            parent, fd = fd, child
    except BaseException:
        os.close(fd)
        os.close(parent)
        raise
    return fd, parent, created


def _open_component(part: str, dir_fd: int, reached: str, path: str, parameter: str) -> int:
    try:
        return os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        try:
            st = os.stat(part, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            raise err from None
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeParameterError(
                parameter, path, f"{reached} is a symbolic link; a deployment run follows none below the roots"
            ) from None
        raise StorageError(f"{parameter}: {reached} is not a directory") from None


def open_directory(
    path: str,
    *,
    parameter: str,
    create: bool = False,
    untrusted: Optional[bool] = None,
    roots: Optional[Sequence[str]] = None,
) -> OpenDir:
    """Open a local directory once, for writing relative to it (see the module docstring).

    Args:
        path: the directory (a path string; for an untrusted caller, as `security.confine` returned it).
        parameter: the parameter it came from, named in errors.
        create: create it (and missing parents) if missing.
        untrusted: default: whether this runs in a deployment's flow run.
        roots: default: `PREFECT_TENSORFLOW_ROOTS`, else the data home.

    Returns:
        The open directory; close it (or use it as a context manager).

    Raises:
        UnsafeParameterError: untrusted, and outside the roots or through a symlink below them.
        StorageError: a component is not a directory.
        FileNotFoundError: missing (and `create` is False).
    """
    location = parse_location(path, parameter=parameter)
    if not location.is_local:
        raise StorageError(f"{parameter}: {location.uri} is not a local directory")
    path = os.path.normpath(location.uri)
    if untrusted if untrusted is not None else in_deployment_run():
        allowed = local_roots(roots)
        root = _root_of(path, allowed)
        if root is None:
            raise UnsafeParameterError(
                parameter, path, f"is outside the allowed roots ({', '.join(allowed) or 'none'}; PREFECT_TENSORFLOW_ROOTS)"
            )
        fd, parent, created = _walk(root, path, create=create, parameter=parameter)
        return OpenDir(path, fd, parent, os.path.basename(path) or ".", created, root=root, parameter=parameter)
    created = False
    if create and not os.path.isdir(path):
        try:
            os.makedirs(path)
            created = True
        except FileExistsError:
            pass
    parent = os.open(os.path.dirname(path) or os.sep, _DIR_FLAGS)
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as err:
        os.close(parent)
        if err.errno == errno.ENOTDIR:
            raise StorageError(f"{parameter}: {path} is not a directory") from err
        raise
    return OpenDir(path, fd, parent, os.path.basename(path) or ".", created, root=None, parameter=parameter)
