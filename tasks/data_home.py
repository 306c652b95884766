"""The local data directory every embedded default lives under.

`./.prefect-tensorflow`, or `$PREFECT_TENSORFLOW_HOME` when set: model dirs,
exports, frozen graphs and the embedded MLflow store.

Example:
    >>> from prefect_tensorflow.tasks.data_home import data_home
    >>> data_home().endswith(".prefect-tensorflow")  # doctest: +SKIP
    True
"""

from __future__ import annotations

import os

HOME_ENV = "PREFECT_TENSORFLOW_HOME"


def data_home() -> str:
    """The local data directory: `$PREFECT_TENSORFLOW_HOME` or `./.prefect-tensorflow`."""
    return os.path.abspath(os.environ.get(HOME_ENV) or ".prefect-tensorflow")
