"""The storage schemes this package has a backend for, and the module of each.

`BACKENDS` maps a scheme to the module (in this package) and class that
implement `backend.StorageBackend` for it. A scheme counts as supported once
its module is installed: `locations.parse_location` accepts exactly those, and
`stores.object_store` builds the backend. A new backend is one new module in
this package (plus its tests) and its row below.

Example:
    >>> from prefect_tensorflow.tasks.storage.schemes import supported_schemes
    >>> {"file", "s3"} <= set(supported_schemes())
    True
"""

from __future__ import annotations

import importlib.util

BACKENDS: dict[str, tuple[str, str]] = {
    "file": ("local", "LocalStore"),
    "s3": ("s3", "ObjectStore"),
    "gs": ("gcs", "GcsStore"),
}


def backend_module(scheme: str) -> str:
    """The dotted name of the module implementing `scheme`."""
    return f"{__package__}.{BACKENDS[scheme][0]}"


def supported_schemes() -> tuple[str, ...]:
    """The schemes whose backend module is installed (`file` always)."""
    return tuple(s for s in BACKENDS if importlib.util.find_spec(backend_module(s)) is not None)
