"""The one place a location's scheme chooses its storage backend.

`schemes.BACKENDS` maps a scheme to the module (in this package) and class
that implement `backend.StorageBackend` for it; `locations.parse_location`
accepts exactly the supported schemes, so a URI is never accepted early and
refused late.

Example:
    >>> from prefect_tensorflow.tasks.storage.locations import parse_location
    >>> from prefect_tensorflow.tasks.storage.stores import object_store
    >>> type(object_store(parse_location("s3://team/models/iris", parameter="model_dir"))).__name__
    'ObjectStore'
    >>> type(object_store(parse_location("/tmp/models/iris", parameter="model_dir"))).__name__
    'LocalStore'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import StorageError
from .schemes import BACKENDS, backend_module, supported_schemes

if TYPE_CHECKING:
    from .backend import StorageBackend
    from .locations import Location


def object_store(location: Location, client: Any = None) -> StorageBackend:
    """The backend of `location`, by its scheme (`client`: the backend's client, or a local `OpenDir`).

    Raises:
        StorageError: no backend for the location's scheme.
    """
    if location.scheme not in supported_schemes():
        raise StorageError(f"{location}: no storage backend for {location.scheme}:// (have: {', '.join(supported_schemes())})")
    module = importlib.import_module(backend_module(location.scheme))
    backend: StorageBackend = getattr(module, BACKENDS[location.scheme][1])(location, client)
    return backend


def read_location_bytes(location: Location) -> bytes:
    """The bytes of one file: a local path or an object (FileNotFoundError if none)."""
    return object_store(location.parent).read_bytes(location.name)
