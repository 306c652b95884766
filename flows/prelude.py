"""What every flow does first, before anything is written: the checks of its untrusted parameters.

`retrain`, `export-checkpoint` and `sweep` start alike: a deployment run's
TensorFlow import is made lean, empty paths take their defaults under the
data home, every path is parsed and (in a deployment run) confined to the
roots, the model code is refused or imported, and the MLflow connection is
checked (saved blocks only in a deployment run) and resolved. Each failure
names the parameter. What a flow checks beyond that (its selection, a sweep's
Dask address) it checks itself.

Example:
    >>> from prefect_tensorflow.flows.prelude import flow_prelude
    >>> prelude = flow_prelude({"model_dir": "/tmp/m"}, "iris", model=None, data=None, mlflow=None, track=False)
    >>> prelude.paths["model_dir"], prelude.connection
    ('/tmp/m', None)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

from prefect_tensorflow.tasks.blocks import MlflowConnection
from prefect_tensorflow.tasks.lean_import import skip_keras_optional_imports
from prefect_tensorflow.tasks.run_context import in_deployment_run
from prefect_tensorflow.tasks.security import check_mlflow_connection
from prefect_tensorflow.tasks.settings import get_settings

from .parameters import checked_code, checked_paths

# Where an empty path parameter defaults to under the data home: `<home>/<kind>/iris` for the model dirs,
# `<home>/<kind>/<registered model name>` for what is shipped (two models never share an export base).
DEFAULT_PATH_KINDS = (("model_dir", "models"), ("sweep_root", "sweeps"))
DEFAULT_SHIPPING_KINDS = (("export_base", "exports"), ("frozen_dir", "frozen"))


@dataclass(frozen=True)
class Prelude:
    """The checked parameters a flow works with: its paths (defaults filled in) and its MLflow connection."""

    paths: Mapping[str, str]
    connection: Optional[MlflowConnection]


def flow_prelude(
    paths: Mapping[str, str],
    registered_model_name: str,
    *,
    model: Optional[str],
    data: Optional[str],
    mlflow: Optional[MlflowConnection],
    track: bool = True,
) -> Prelude:
    """Run the checks every flow starts with, in the order the flows have always run them.

    Args:
        paths: the path parameters by name (`model_dir`, `sweep_root`, `export_base`, `frozen_dir`);
            an empty one defaults under the data home.
        registered_model_name: the registered model; the default export base and frozen-graph
            directory are named after it.
        model: the model builder to load (None: none).
        data: the dataset loader to load (None: none).
        mlflow: the `mlflow` parameter.
        track: whether the flow talks to MLflow; without it the connection is None.

    Raises:
        StorageError, UnsafeParameterError: a path, naming its parameter.
        ImportStringError: `model` or `data`.
        UnsafeParameterError: in a deployment run, an inline MLflow connection.
    """
    if in_deployment_run():  # this process is the run's own: its TensorFlow import can be lean
        skip_keras_optional_imports()
    settings = get_settings()
    defaults = {name: settings.default_path(kind) for name, kind in DEFAULT_PATH_KINDS}
    defaults.update({name: settings.default_path(kind, registered_model_name) for name, kind in DEFAULT_SHIPPING_KINDS})
    checked = checked_paths(**{name: value or defaults[name] for name, value in paths.items()})
    checked_code(model=model, data=data)
    check_mlflow_connection(mlflow)
    return Prelude(paths=checked, connection=(mlflow or MlflowConnection()) if track else None)
