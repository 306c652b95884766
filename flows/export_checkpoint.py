"""The `export-checkpoint` flow: ship a checkpoint that already exists, from the Prefect UI.

Select (`"latest"`, a step number, or `"best:<metric>"`) -> export a verified
SavedModel version -> freeze a verified `.pb` -> log and register in MLflow ->
champion gate -> the aliases asked for. Every parameter is checked before
anything is written: a model dir that does not exist or holds no valid
checkpoint, a step that is not there, a bad import string or alias fails the
run at once with a message naming it.

Re-running it for a checkpoint that is already exported and registered
returns the existing version without freezing or logging again; two runs for
the same checkpoint at once end with one SavedModel version and one model
version (locks on the export base).

Example:
    >>> from prefect_tensorflow.flows.export_checkpoint import export_checkpoint
    >>> summary = export_checkpoint(model_dir="/models/iris", checkpoint="best:accuracy")  # doctest: +SKIP
    >>> summary.registered.model_uri  # doctest: +SKIP
    'models:/iris/3'
"""

from __future__ import annotations

import os
from typing import Annotated, Literal, Optional

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from prefect_tensorflow.tasks import iris
from prefect_tensorflow.tasks.errors import RegistryError
from prefect_tensorflow.tasks.exporting import ExportResult, export_saved_model
from prefect_tensorflow.tasks.freezing import FreezeResult, freeze_graph
from prefect_tensorflow.tasks.importing import load_object
from prefect_tensorflow.tasks.logs import get_logger
from prefect_tensorflow.tasks.mlflow_connection import MLFLOW_TASK_RETRIES, MlflowConnection
from prefect_tensorflow.tasks.registry import (
    RegisteredVersion,
    gate_value,
    register_model_version,
    registered_version_for,
    set_model_version_aliases,
)
from prefect_tensorflow.tasks.selection import CheckpointRef
from prefect_tensorflow.tasks.tracking import log_frozen_graph_to_mlflow

from .artifacts import publish_checkpoint_table, publish_export_summary, publish_mlflow_links
from .defaults import default_export_base, default_frozen_dir
from .parameters import (
    Selection,
    check_aliases,
    check_registered_model_name,
    current_flow_run_id,
    select_checkpoint,
)

class ExportSummary(BaseModel):
    """What an `export-checkpoint` run shipped."""

    model_config = ConfigDict(frozen=True)

    checkpoint: CheckpointRef
    selection: str
    export: ExportResult
    frozen_graph: Optional[FreezeResult] = Field(description="None when the export was already registered")
    registered: RegisteredVersion
    flow_run_id: Optional[str] = Field(default=None, description="The Prefect flow run that produced this")


@flow(name="export-checkpoint", log_prints=True)
def export_checkpoint(
    model_dir: Annotated[str, Field(min_length=1, description="Directory holding the checkpoints to ship from")],
    checkpoint: Annotated[str, Field(description="'latest', a step number (e.g. '2000') or 'best:<metric>[:min|max]'")] = "latest",
    registered_model_name: Annotated[str, Field(min_length=1, description="MLflow registered model to add the version to")] = "iris",
    export_base: Annotated[Optional[str], Field(description="Directory of SavedModel versions; default ./.prefect-tensorflow/exports/iris")] = None,
    frozen_dir: Annotated[Optional[str], Field(description="Directory for the frozen .pb; default ./.prefect-tensorflow/frozen/iris")] = None,
    model: Annotated[str, Field(description="'module:attr' of the Keras model builder the checkpoint was trained with")] = iris.MODEL,
    data: Annotated[Optional[str], Field(description="'module:attr' of the dataset loader for verification; empty for random values")] = iris.DATA,
    aliases: Annotated[list[str], Field(description="Extra aliases to point at the new version, e.g. ['staging']")] = [],  # noqa: B006 - Prefect copies parameters
    gate_metric: Annotated[Optional[str], Field(description="Checkpoint metric the version must beat the champion on; empty: never move champion")] = "accuracy",
    gate_mode: Annotated[Literal["min", "max"], Field(description="'max' if higher is better, 'min' if lower is")] = "max",
    mlflow: Annotated[Optional[MlflowConnection], Field(description="MLflow connection; default $MLFLOW_TRACKING_URI, else local SQLite")] = None,
) -> ExportSummary:
    """Select a checkpoint of `model_dir`, export and freeze it (verified), register it in MLflow.

    Publishes a table of the checkpoints considered, a markdown summary of the
    export (paths, signature, version, parity, the gate's decision) and links
    to the MLflow run and model version.

    Raises:
        ValueError: a malformed `checkpoint`, name or alias (before anything is written).
        ImportStringError: `model` or `data` names nothing importable.
        ModelDirError, NoValidCheckpointError, MetricNotFoundError: nothing to ship.
    """
    log = get_logger()
    selection = Selection.parse(checkpoint, parameter="checkpoint")
    check_registered_model_name(registered_model_name)
    aliases = check_aliases(aliases)
    load_object(model, parameter="model")
    data = data or None
    if data is not None:
        load_object(data, parameter="data")
    gate_metric = gate_metric or None
    connection = mlflow or MlflowConnection()

    ref = select_checkpoint(os.path.abspath(model_dir), selection)
    gate_value(ref, gate_metric)  # the gate metric must be there before anything is written
    publish_checkpoint_table(ref.model_dir, ref)

    exported = export_saved_model(ref.path, export_base or default_export_base(), model=model, data=data)
    registered = registered_version_for(exported, registered_model_name, connection) if exported.reused else None
    frozen = None
    if registered is not None:
        log.info("%s is already exported and registered as %s version %d", ref.path, registered.name, registered.version)
    else:
        frozen_dir = os.path.abspath(frozen_dir or default_frozen_dir())
        os.makedirs(frozen_dir, exist_ok=True)
        frozen = freeze_graph(
            ref.path, os.path.join(frozen_dir, os.path.basename(ref.path) + ".pb"), model=model, data=data
        )
        run_id = log_frozen_graph_to_mlflow.with_options(**MLFLOW_TASK_RETRIES)(connection, None, frozen)
        registered = register_model_version.with_options(**MLFLOW_TASK_RETRIES)(
            exported, registered_model_name, connection=connection, checkpoint=ref, frozen=frozen,
            run_id=run_id, data=data, gate_metric=gate_metric, gate_mode=gate_mode,
        )
    if aliases:
        registered = set_model_version_aliases.with_options(**MLFLOW_TASK_RETRIES)(registered, aliases, connection)
    if registered is None:  # pragma: no cover - register_model_version returns or raises
        raise RegistryError(f"{exported.path} was not registered")
    publish_export_summary(ref, checkpoint, exported, frozen, registered)
    publish_mlflow_links(registered)
    return ExportSummary(
        checkpoint=ref, selection=checkpoint, export=exported, frozen_graph=frozen, registered=registered,
        flow_run_id=current_flow_run_id(),
    )
