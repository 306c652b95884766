"""A SQLite MLflow store is created (tables, migrations) by one process at a time.

MLflow creates the tables of an empty SQLite store, and migrates an old one,
when a process first opens it (`SqlAlchemyStore.__init__`), with no lock: 20
runs queued at once on a fresh data home made several processes run the same
`CREATE TABLE` and alembic steps together, and some failed ("table experiments
already exists", "duplicate column name: step"). `open_stores` takes an
exclusive `flock` on the directory holding the database while it opens the
client's tracking and registry stores, so the first process creates them
and the others find them done. MLflow keeps an opened store for the process
(per URI), so the lock is paid once per process.

Example:
    >>> import tempfile
    >>> from mlflow import MlflowClient
    >>> from prefect_tensorflow.tasks.registry.sqlite_store import open_stores
    >>> uri = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"
    >>> client = open_stores(lambda: MlflowClient(uri, uri), uri, uri)
    >>> client.search_experiments()[0].name
    'Default'
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

from .store_uri import local_store_path

Client = TypeVar("Client")


def sqlite_store_dirs(*uris: str) -> list[str]:
    """The existing directories holding the SQLite databases among `uris` (servers and others left out)."""
    dirs = set()
    for uri in uris:
        path = local_store_path(uri) if uri.lower().startswith("sqlite") else None
        if path is not None and os.path.isdir(os.path.dirname(path)):
            dirs.add(os.path.dirname(path))
    return sorted(dirs)


@contextmanager
def locked_dirs(dirs: list[str]) -> Iterator[None]:
    """Hold an exclusive `flock` on each directory in `dirs` (sorted: no two holders deadlock)."""
    with ExitStack() as stack:
        for directory in dirs:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            stack.callback(os.close, fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield


def open_stores(make_client: Callable[[], Client], tracking_uri: str, registry_uri: str) -> Client:
    """`make_client()`, its SQLite stores opened (created or migrated) under the lock; other stores as they are."""
    dirs = sqlite_store_dirs(tracking_uri, registry_uri)
    if not dirs:
        return make_client()
    with locked_dirs(dirs):
        client: Any = make_client()  # MLflow may open the tracking store here already
        client._tracking_client.store  # noqa: B018 - opening it is the point
        client._get_registry_client().store  # noqa: B018
    return client
