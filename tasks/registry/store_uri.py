"""Where an MLflow store URI points on this machine: pure parsing, shared by the connection, the client and `security`.

Kept apart from `mlflow_connection` (which builds clients through
`mlflow_client`) so that `mlflow_client` and `security` can both read a
store's path without importing each other in a circle.

Example:
    >>> from prefect_tensorflow.tasks.registry.store_uri import local_store_path
    >>> local_store_path("http://127.0.0.1:5000") is None
    True
"""

from __future__ import annotations

import os
from typing import Optional
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname


def local_store_path(uri: str) -> Optional[str]:
    """The local path an MLflow store URI names, parsed the way MLflow and SQLAlchemy parse it.

    MLflow takes the scheme case-insensitively; a URI without a scheme, or a
    `file:` one, is a file store (percent-decoded); a `sqlite` one (any driver)
    is SQLAlchemy's: `sqlite:///relative.db` is relative to the working
    directory, `sqlite:////abs.db` absolute, and the database part is
    percent-decoded. Returns an absolute path (not resolved), or None for a
    server (`http`, `postgresql`, ...) or an in-memory SQLite database.

    Example:
        >>> import os
        >>> local_store_path("SQLITE:///data/mlflow.db") == os.path.abspath("data/mlflow.db")
        True
        >>> local_store_path("sqlite:////srv/a%2e%2e/m.db"), local_store_path("http://127.0.0.1:5000")
        ('/srv/a../m.db', None)
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = url2pathname(unquote(parts.path)) if scheme == "file" else uri
        return os.path.abspath(path)
    if scheme.split("+", 1)[0] != "sqlite":
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:":
        return None
    return os.path.abspath(database)
