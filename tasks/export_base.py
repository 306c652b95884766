"""Where SavedModel versions live: a local directory or an `s3://` prefix, each with its lock and its publish.

TensorFlow Serving watches an export base for `<version>/` directories and
loads a version once its `saved_model.pb` is there. Both kinds here keep that
promise and the package's others:

| | local directory | `s3://bucket/prefix` |
|---|---|---|
| a version appears | one `rename` of a staged sibling | every file uploaded and checked, `saved_model.pb` last |
| two exporters | `flock` on `.prefect-tensorflow.lock` | a lease object made by a conditional write |
| what a crash leaves | a `.ptf-tmp-` sibling, removed by the next export | files without `saved_model.pb`, removed by the next export |
| reuse check | the version's files hashed again | the version downloaded and hashed again |

Example:
    >>> import tempfile
    >>> from prefect_tensorflow.tasks.export_base import open_export_base
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
from typing import Any

from .errors import ExportError
from .object_store import ObjectStore, lease
from .run_context import get_logger
from .storage import (
    LOCK_FILE,
    Location,
    exclusive_lock,
    parse_location,
    remove_abandoned_temporaries,
    scratch_dir,
    staged_directory,
)

INFO_FILE = "assets.extra/prefect_tensorflow.json"
SERVED_FILE = "saved_model.pb"
LEASE = ".prefect-tensorflow/lock"


def saved_model_digest(path: str) -> str:
    """sha256 over `saved_model.pb` and every file under `variables/`, in path order."""
    import hashlib

    digest = hashlib.sha256()
    files = [os.path.join(path, SERVED_FILE)]
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
    """A directory of `<version>/` SavedModels."""

    def __init__(self, location: Location):
        self.uri = location.uri
        self.created = False

    def prepare(self) -> None:
        """Create the directory if missing (remembering that it did) and check it is usable."""
        if os.path.exists(self.uri) and not os.path.isdir(self.uri):
            raise ExportError(f"export base {self.uri} is a file; expected a directory of version directories")
        self.created = not os.path.exists(self.uri)
        try:
            os.makedirs(self.uri, exist_ok=True)
        except OSError as err:
            raise ExportError(f"export base {self.uri} cannot be created: {err.strerror or err}") from err
        if not os.access(self.uri, os.W_OK | os.X_OK):
            raise ExportError(f"export base {self.uri} is not writable")
        self.versions()  # refuse a wrong directory before leaving a lock file in it

    def versions(self) -> dict[int, str]:
        """Version number -> path. Raises ExportError if other (non-hidden) entries are there."""
        versions, strangers = {}, []
        for name in sorted(os.listdir(self.uri)):
            if name.startswith("."):
                continue
            if name.isdigit() and os.path.isdir(os.path.join(self.uri, name)):
                versions[int(name)] = os.path.join(self.uri, name)
            else:
                strangers.append(name)
        if strangers:
            raise _strangers_error(self.uri, strangers)
        return versions

    def lock(self) -> AbstractContextManager[None]:
        return exclusive_lock(self.uri)

    def info(self, version_path: str) -> dict[str, Any]:
        try:
            with open(os.path.join(version_path, INFO_FILE), encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return {}

    def digest(self, version_path: str) -> str:
        return saved_model_digest(version_path)

    def clean_up(self) -> list[str]:
        """Remove what an export cut short by a crash left (call under the lock)."""
        return remove_abandoned_temporaries(self.uri)

    @contextmanager
    def staged(self, version: int) -> Iterator[str]:
        """A staging directory for `version`, published by one rename when the block ends cleanly."""
        with staged_directory(os.path.join(self.uri, str(version))) as tmp:
            yield tmp

    def path(self, version: int) -> str:
        return os.path.join(self.uri, str(version))

    @contextmanager
    def local_copy(self, version_path: str) -> Iterator[str]:
        yield version_path

    def forget_if_created(self) -> None:
        """After a failed export into a base this call created: remove it if nobody else wrote in it."""
        if not self.created:
            return
        try:
            if os.listdir(self.uri) == [LOCK_FILE]:
                os.remove(os.path.join(self.uri, LOCK_FILE))
            os.rmdir(self.uri)
        except OSError:
            pass


class RemoteExportBase:
    """An `s3://bucket/prefix` of `<version>/` SavedModels (see the module docstring)."""

    def __init__(self, location: Location):
        self.uri = location.uri
        self.store = ObjectStore(location)
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

    def lock(self) -> AbstractContextManager[None]:
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


def open_export_base(export_base: str) -> LocalExportBase | RemoteExportBase:
    """The export base at a path or `s3://` URI (nothing is created yet: see `prepare`)."""
    location = parse_location(export_base, parameter="export_base")
    return LocalExportBase(location) if location.is_local else RemoteExportBase(location)


@contextmanager
def local_export(path: str) -> Iterator[str]:
    """A SavedModel version directory on this machine: itself, or a downloaded copy of a remote one."""
    location = parse_location(path, parameter="export")
    if location.is_local:
        yield location.uri
        return
    base_uri, _ = location.uri.rsplit("/", 1)
    with RemoteExportBase(parse_location(base_uri, parameter="export_base")).local_copy(location.uri) as local:
        get_logger().info("downloaded %s to verify it", location.uri)
        yield local
