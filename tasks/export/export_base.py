"""Where SavedModel versions live: a local directory or an `s3://` prefix, each with its lock and its publish.

TensorFlow Serving watches an export base for `<version>/` directories and
loads a version once its `saved_model.pb` is there. Both kinds here keep that
promise and the package's others:

| | local directory | `s3://bucket/prefix` |
|---|---|---|
| a version appears | one `rename` of a staged sibling | every file uploaded and checked, `saved_model.pb` last |
| two exporters | `flock` on `.prefect-tensorflow.lock` (never a symlink) | a lease object made by a conditional write |
| what a crash leaves | a `.ptf-tmp-` sibling, removed by the next export | files without `saved_model.pb`, removed by the next export |
| reuse check | the version's files hashed again | the version downloaded and hashed again |

A local base is opened once (`confined_dirs.open_directory`: in a deployment
run, walked from its root without following symlinks) and everything after
that (lock file, staging, the publishing rename, clean-up) goes through that
descriptor: replacing the base's path by a symlink during an export publishes
nothing, anywhere.

Example:
    >>> import tempfile
    >>> from prefect_tensorflow.tasks.export.export_base import open_export_base
    >>> base = open_export_base(tempfile.mkdtemp())
    >>> base.versions()
    {}
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Optional

from ..errors import ExportError, StorageError
from ..run_context import get_logger, in_deployment_run
from ..storage.confined_dirs import OpenDir, open_directory
from ..storage.local import LOCK_FILE, exclusive_lock, remove_abandoned_temporaries, staged_directory
from ..storage.locations import Location, parse_location, scratch_dir
from ..storage.s3 import lease
from ..storage.stores import object_store
from ..storage.write_failures import reported_write_failure
from .warmup import WARMUP_FILE

INFO_FILE = "assets.extra/prefect_tensorflow.json"
SERVED_FILE = "saved_model.pb"
LEASE = ".prefect-tensorflow/lock"


def saved_model_digest(path: str) -> str:
    """sha256 over `saved_model.pb`, every file under `variables/` and the TF Serving warmup file if any, in path order."""
    import hashlib

    digest = hashlib.sha256()
    files = [os.path.join(path, SERVED_FILE)]
    if os.path.isfile(os.path.join(path, WARMUP_FILE)):
        files.append(os.path.join(path, WARMUP_FILE))
    for root, _, names in os.walk(os.path.join(path, "variables")):
        files.extend(os.path.join(root, n) for n in names)
    for name in sorted(files):
        digest.update(os.path.relpath(name, path).encode())
        with open(name, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _strangers_error(base: str, strangers: list[str]) -> ExportError:
    return ExportError(
        f"export base {base} holds entries that are not version directories: {', '.join(strangers[:10])}; "
        "expected only <integer>/ SavedModel directories"
    )


class LocalExportBase:
    """A directory of `<version>/` SavedModels, held open by descriptor once `prepare`d (see the module docstring)."""

    def __init__(self, location: Location):
        self.uri = location.uri
        self.created = False
        self.dir: Optional[OpenDir] = None

    def _open(self, *, create: bool) -> OpenDir:
        if create and os.path.lexists(self.uri) and not os.path.isdir(self.uri):
            raise ExportError(f"export base {self.uri} is a file; expected a directory of version directories")
        try:  # StorageError (not a directory) and UnsafeParameterError (a symlink, outside the roots) pass
            return open_directory(self.uri, parameter="export_base", create=create)
        except OSError as err:
            raise ExportError(
                f"export base {self.uri} cannot be {'created' if create else 'opened'}: {err.strerror or err}"
            ) from err

    def prepare(self) -> None:
        """Open the directory (creating it if missing, remembering that it did) and check it is usable."""
        if self.dir is None:
            self.dir = self._open(create=True)
            self.created = self.dir.created
        if not os.access(self.dir.handle, os.W_OK | os.X_OK):
            raise ExportError(f"export base {self.uri} is not writable")
        self.versions()  # refuse a wrong directory before leaving a lock file in it

    def close(self) -> None:
        if self.dir is not None:
            self.dir.close()
            self.dir = None

    def _names(self) -> list[str]:
        return self.dir.listdir() if self.dir is not None else os.listdir(self.uri)

    def _is_dir(self, name: str) -> bool:
        return self.dir.is_dir(name) if self.dir is not None else os.path.isdir(os.path.join(self.uri, name))

    def _reading_path(self, version_path: str) -> str:
        """Where to read a version this base listed: through the descriptor when open."""
        name = os.path.basename(version_path.rstrip(os.sep))
        if self.dir is not None and os.path.join(self.uri, name) == version_path:
            return self.dir.entry(name)
        return version_path

    def versions(self) -> dict[int, str]:
        """Version number -> path. Raises ExportError if other (non-hidden) entries are there."""
        versions, strangers = {}, []
        for name in sorted(self._names()):
            if name.startswith("."):
                continue
            if name.isdigit() and self._is_dir(name):
                versions[int(name)] = os.path.join(self.uri, name)
            else:
                strangers.append(name)
        if strangers:
            raise _strangers_error(self.uri, strangers)
        return versions

    @contextmanager
    def lock(self) -> Iterator[None]:
        """The exclusive lock on the base's lock file (opened without following a symlink)."""
        opened = self.dir is None
        if opened:
            try:
                self.dir = open_directory(self.uri, parameter="export_base")
            except OSError as err:
                raise StorageError(f"{self.uri} is not writable: {err.strerror or err}") from err
        try:
            with exclusive_lock(self.uri, parent=self.dir):
                yield
        finally:
            if opened:
                self.close()

    def info(self, version_path: str) -> dict[str, Any]:
        try:
            with open(os.path.join(self._reading_path(version_path), INFO_FILE), encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return {}

    def digest(self, version_path: str) -> str:
        return saved_model_digest(self._reading_path(version_path))

    def clean_up(self) -> list[str]:
        """Remove what an export cut short by a crash left (call under the lock)."""
        return remove_abandoned_temporaries(self.uri, directory=self.dir)

    @contextmanager
    def staged(self, version: int) -> Iterator[str]:
        """A staging directory for `version` (it exists, empty), published by one rename when the block ends cleanly."""
        if self.dir is None:
            raise ExportError(f"export base {self.uri}: prepare() it before staging a version")
        paths = {self.dir.handle: self.uri}
        with reported_write_failure(f"writing SavedModel version {self.path(version)}", paths, ExportError):
            with staged_directory(str(version), parent=self.dir) as tmp:
                yield tmp

    def path(self, version: int) -> str:
        return os.path.join(self.uri, str(version))

    @contextmanager
    def local_copy(self, version_path: str) -> Iterator[str]:
        yield version_path

    def forget_if_created(self) -> None:
        """After a failed export into a base this call created: remove it if nobody else wrote in it."""
        if self.created and self.dir is not None:
            self.dir.remove_if_empty(but=[LOCK_FILE])


class RemoteExportBase:
    """An `s3://bucket/prefix` of `<version>/` SavedModels (see the module docstring)."""

    def __init__(self, location: Location):
        self.uri = location.uri
        self.store = object_store(location)
        self.created = False

    def prepare(self) -> None:
        self.versions()

    def _listing(self) -> tuple[dict[int, str], dict[int, str]]:
        """(complete versions, partial ones), number -> URI."""
        children = [name.rstrip("/") for name in self.store.listing(delimiter=True)]
        numbers = sorted(int(n) for n in children if n.isdigit())
        strangers = [n for n in children if not n.isdigit() and not n.startswith(".")]
        if strangers:
            raise _strangers_error(self.uri, strangers)
        complete: dict[int, str] = {}
        partial: dict[int, str] = {}
        for number in numbers:
            target = complete if self.store.head(f"{number}/{SERVED_FILE}") is not None else partial
            target[number] = self.store.uri(str(number))
        return complete, partial

    def versions(self) -> dict[int, str]:
        return self._listing()[0]

    def lock(self) -> AbstractContextManager[Any]:
        return lease(self.store, LEASE)

    def info(self, version_path: str) -> dict[str, Any]:
        try:
            return json.loads(self.store.read_bytes(f"{version_path.rsplit('/', 1)[1]}/{INFO_FILE}"))
        except (FileNotFoundError, ValueError):
            return {}

    def digest(self, version_path: str) -> str:
        with self.local_copy(version_path) as local:
            return saved_model_digest(local)

    def clean_up(self) -> list[str]:
        """Delete versions whose upload a crash cut short (no `saved_model.pb`); call under the lock."""
        _, partial = self._listing()
        for number in partial:
            self.store.delete(list(self.store.listing(str(number))))
        return list(partial.values())

    @contextmanager
    def staged(self, version: int) -> Iterator[str]:
        """A local staging directory for `version`, uploaded (`saved_model.pb` last) when the block ends cleanly."""
        staging = tempfile.mkdtemp(prefix="ptf-export-", dir=scratch_dir())
        local = os.path.join(staging, str(version))
        try:
            yield local
            self.store.publish_directory(local, str(version), last=[SERVED_FILE])
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def path(self, version: int) -> str:
        return self.store.uri(str(version))

    @contextmanager
    def local_copy(self, version_path: str) -> Iterator[str]:
        """The version downloaded to a scratch directory, for as long as the block runs."""
        scratch = tempfile.mkdtemp(prefix="ptf-download-", dir=scratch_dir())
        try:
            number = version_path.rstrip("/").rsplit("/", 1)[1]
            local = os.path.join(scratch, number)
            self.store.download_directory(number, local)
            yield local
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def forget_if_created(self) -> None:
        pass

    def close(self) -> None:
        pass


def open_export_base(export_base: str) -> LocalExportBase | RemoteExportBase:
    """The export base at a path or `s3://` URI (nothing is created yet: see `prepare`)."""
    location = parse_location(export_base, parameter="export_base")
    return LocalExportBase(location) if location.is_local else RemoteExportBase(location)


@contextmanager
def local_export(path: str) -> Iterator[str]:
    """A SavedModel version directory on this machine: itself, or a downloaded copy of a remote one.

    In a deployment run a local one must still resolve under the roots (it may have been swapped
    for a symlink since it was exported): nothing outside them is read or registered.

    Raises:
        UnsafeParameterError: in a deployment run, the local path now resolves outside the roots.
    """
    location = parse_location(path, parameter="export")
    if location.is_local:
        if in_deployment_run():
            from ..security import confine

            yield confine(location.uri, parameter="export", untrusted=True)
            return
        yield location.uri
        return
    base_uri, _ = location.uri.rsplit("/", 1)
    with RemoteExportBase(parse_location(base_uri, parameter="export_base")).local_copy(location.uri) as local:
        get_logger().info("downloaded %s to verify it", location.uri)
        yield local
