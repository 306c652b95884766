"""The one place a location's scheme chooses its storage backend.

`BACKENDS` maps a scheme to the module (in this package) and class that
implement `backend.StorageBackend` for it. A scheme counts as supported once
its module is installed, and `locations.parse_location` accepts exactly the
supported schemes: a URI is never accepted early and refused late. A new
backend is one new module here (plus its tests); its row below names it.

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
import importlib.util
from typing import TYPE_CHECKING, Any

from ..errors import StorageError

if TYPE_CHECKING:
    from .backend import StorageBackend
    from .locations import Location

BACKENDS: dict[str, tuple[str, str]] = {
    "file": ("local", "LocalStore"),
    "s3": ("s3", "ObjectStore"),
    "gs": ("gcs", "GcsStore"),
}


def _module_name(scheme: str) -> str:
    return f"{__package__}.{BACKENDS[scheme][0]}"


def supported_schemes() -> tuple[str, ...]:
    """The schemes whose backend module is installed (`file` always)."""
    return tuple(s for s in BACKENDS if importlib.util.find_spec(_module_name(s)) is not None)


def object_store(location: Location, client: Any = None) -> StorageBackend:
    """The backend of `location`, by its scheme (`client`: the backend's client, or a local `OpenDir`).

    Raises:
        StorageError: no backend for the location's scheme.
    """
    if location.scheme not in supported_schemes():
        raise StorageError(f"{location}: no storage backend for {location.scheme}:// (have: {', '.join(supported_schemes())})")
    module = importlib.import_module(_module_name(location.scheme))
    backend: StorageBackend = getattr(module, BACKENDS[location.scheme][1])(location, client)
    return backend


def read_location_bytes(location: Location) -> bytes:
    """The bytes of one file: a local path or an object (FileNotFoundError if none)."""
    return object_store(location.parent).read_bytes(location.name)
