"""The storage interface every backend implements: the objects under one location, named relative to it.

One interface for local disk (`local.LocalStore`), S3 (`s3.ObjectStore`) and
Google Cloud Storage (`gcs.GcsStore`), in the shape of Orbax's
`_src/path/storage_backend.py` and Prefect's `ObjectStorageBlock`: list,
read, write-if-absent (`put_bytes(create_only=True)`), conditional replace
(`put_bytes(if_match=<etag>)`), delete, and a staged publish whose file the
readers look for goes last (`publish_directory(last=...)`, the rule of
Orbax's `atomicity.py`). `stores.object_store(location)` picks the backend
by the location's scheme, in one place.

An `etag` is whatever the backend uses to tell one content of a name from
another (S3's ETag, a Cloud Storage generation, a local file's identity):
opaque to callers, good only for handing back to `if_match` /
`delete_if_match`.

Example:
    >>> from prefect_tensorflow.tasks.storage.backend import ObjectInfo
    >>> ObjectInfo(size=3, etag="abc").size
    3
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol

from ..errors import StorageError

if TYPE_CHECKING:
    from .locations import Location


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str
    modified: float = 0.0  # seconds since the epoch


class PreconditionFailedError(StorageError):
    """A conditional write found the object changed (or gone) since it was read."""


class StorageBackend(Protocol):
    """The objects under one location; every name is relative to it (`a/b` for nested ones)."""

    location: Location

    def key(self, *names: str) -> str:
        """The backend's own name of `names` (an object key, a path)."""
        ...

    def uri(self, *names: str) -> str:
        """The location of `names` as users write it (`s3://...`, `gs://...`, an absolute path)."""
        ...

    def read_bytes(self, name: str) -> bytes:
        """The bytes of `name`. Raises FileNotFoundError if there is none."""
        ...

    def read_with_info(self, name: str) -> tuple[bytes, ObjectInfo]:
        """The bytes of `name` and its size, etag and time, read together. Raises FileNotFoundError."""
        ...

    def head(self, name: str) -> Optional[ObjectInfo]:
        """Size and etag of `name`, or None if there is none."""
        ...

    def listing(self, under: str = "", *, delimiter: bool = False, starting: str = "") -> dict[str, ObjectInfo]:
        """Everything under `under` (direct children only with `delimiter`, "directories" ending in '/'),
        or only the names starting with `starting`."""
        ...

    def download_file(self, name: str, local: str) -> None:
        """Copy `name` to the local path `local` (its directory created)."""
        ...

    def download_directory(self, under: str, local_dir: str) -> list[str]:
        """Copy everything under `under` into `local_dir`; returns the names copied."""
        ...

    def put_bytes(self, name: str, data: bytes, *, create_only: bool = False, if_match: Optional[str] = None) -> str:
        """Write `name` atomically (a reader sees the old or the new bytes); returns the new etag.

        Raises:
            FileExistsError: `create_only` and `name` exists.
            PreconditionFailedError: `if_match` and `name` holds another etag (or is gone).
        """
        ...

    def upload_file(self, local: str, name: str) -> None:
        """Write the local file `local` to `name` (atomically)."""
        ...

    def delete(self, names: Sequence[str]) -> None:
        """Delete `names` (missing ones are no error)."""
        ...

    def delete_if_match(self, name: str, etag: str) -> bool:
        """Delete `name` only if it still holds `etag`; False if it changed or is gone."""
        ...

    def publish_directory(self, local_dir: str, under: str, last: Sequence[str] = ()) -> list[str]:
        """Copy `local_dir` to `under/`, the `last` files (the ones readers look for) only after every other
        landed whole; returns the names written."""
        ...


class ClientCache:
    """One client per process and per value of the environment variables that configure it.

    Making a store client costs tens of milliseconds (a service model, an HTTP
    session), more than a request to a nearby store, and the clients are
    thread-safe: each backend keeps one cache and shares its client. A change of
    a variable that chooses the endpoint or the credentials gives a new client.

    Example:
        >>> cache = ClientCache(("MY_ENDPOINT",), make=lambda: object())
        >>> cache.get() is cache.get()
        True
    """

    def __init__(self, settings: Sequence[str], make: Callable[[], Any]):
        self.settings, self.make = tuple(settings), make
        self._clients: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def get(self) -> Any:
        """The client for this process and the current settings."""
        key = (os.getpid(), *(os.environ.get(name) for name in self.settings))
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = self.make()
            return client
