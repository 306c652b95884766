"""The `export-checkpoint` flow: ship a checkpoint that already exists, from the Prefect UI.

Select (`"latest"`, a step number, or `"best:<metric>"`) -> export a verified
SavedModel version -> freeze a verified `.pb` -> log and register in MLflow ->
champion gate -> the aliases asked for. Every parameter is checked before
anything is written: a model dir that does not exist or holds no valid
checkpoint, a step that is not there, model code that is not allowed, a path
outside the roots, a bad alias fails the run at once with a message naming it.

Re-running it for a checkpoint that is already exported and registered
returns the existing version without freezing or logging again; two runs for
the same checkpoint at once end with one SavedModel version and one model
version (locks on the export base).

Example:
    >>> from prefect_tensorflow.flows.export_checkpoint import export_checkpoint
    >>> export_checkpoint.name
    'export-checkpoint'
"""

from __future__ import annotations

from typing import Optional

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from prefect_tensorflow.tasks import prefect_tasks as tasks
from prefect_tensorflow.tasks.blocks import MlflowConnection
from prefect_tensorflow.tasks.checkpoints.selection import CheckpointRef, CheckpointSelection
from prefect_tensorflow.tasks.configs import AliasName, DataRef, ExportConfig, GateConfig, ModelRef, RegisteredModelName
from prefect_tensorflow.tasks.export.frozen_graph import FreezeResult
from prefect_tensorflow.tasks.export.saved_model import ExportResult
from prefect_tensorflow.tasks.lean_import import skip_keras_optional_imports
from prefect_tensorflow.tasks.registry.model_versions import RegisteredVersion, gate_value
from prefect_tensorflow.tasks.run_context import current_flow_run_id, get_logger, in_deployment_run
from prefect_tensorflow.tasks.security import check_mlflow_connection
from prefect_tensorflow.tasks.settings import get_settings

from .artifacts import publish_checkpoint_table, publish_export_summary, publish_mlflow_links
from .parameters import checked_code, checked_paths, frozen_graph_path


class ExportSummary(BaseModel):
    """What an `export-checkpoint` run shipped."""

    model_config = ConfigDict(frozen=True)

    checkpoint: CheckpointRef
    selection: str
    export: ExportResult
    frozen_graph: Optional[FreezeResult] = Field(description="None when the export was already registered")
    registered: RegisteredVersion
    flow_run_id: Optional[str] = Field(default=None, description="The Prefect flow run that produced this")


@flow(name="export-checkpoint", flow_run_name="export-{registered_model_name}-{checkpoint}", log_prints=True)
def export_checkpoint(
    model_dir: str = "",
    checkpoint: str = "latest",
    registered_model_name: RegisteredModelName = "iris",
    aliases: list[AliasName] = [],  # noqa: B006 - Prefect copies parameters
    model: ModelRef = "iris",
    data: DataRef = "iris",
    export_base: str = "",
    frozen_dir: str = "",
    gate: GateConfig = GateConfig(),
    mlflow: Optional[MlflowConnection] = None,
) -> ExportSummary:
    """Ship a checkpoint that exists: select it, export and freeze it (verified), register it in MLflow.

    Publishes a table of the checkpoints considered, a markdown summary of the
    export (paths, signature, version, parity, the gate's decision) and links
    to the MLflow run and model version.

    Args:
        model_dir: Directory (or s3://bucket/prefix) holding the checkpoints. Empty: models/iris
            under the data home (the worker's PREFECT_TENSORFLOW_HOME). In a deployment run it must
            be under the worker's PREFECT_TENSORFLOW_ROOTS (default: the data home).
        checkpoint: Which checkpoint to ship: 'latest', a step number (e.g. '2000'), or 'best:METRIC'
            for the best by a recorded metric (e.g. 'best:accuracy'; lowest wins for names with
            'loss' or 'error'; add ':min' or ':max' to choose). The run's checkpoints table lists
            the steps and metrics.
        registered_model_name: The MLflow registered model to add the version to (created if missing).
        aliases: Aliases to point at the new version besides challenger (and champion if it wins
            the gate), e.g. 'staging'.
        model: The model builder the checkpoint was trained with (a registered name).
        data: The dataset loader whose eval split is the verification batch (a registered name).
        export_base: Directory of SavedModel versions for TF Serving. Empty: exports/<registered_model_name>
            under the data home. In a deployment run it must be under PREFECT_TENSORFLOW_ROOTS.
        frozen_dir: Directory for the frozen .pb (never replaced by other bytes). Empty: frozen/<registered_model_name>
            under the data home. In a deployment run it must be under PREFECT_TENSORFLOW_ROOTS.
        gate: Champion gate: the checkpoint metric the version must beat the champion on (None:
            never move champion), and whether higher ('max') or lower ('min') is better.
        mlflow: A saved MLflow Connection block. Leave it on None for the worker's
            MLFLOW_TRACKING_URI (else a local SQLite store).

    Raises:
        ValueError: a malformed `checkpoint`, path, name or alias (before anything is written).
        ImportStringError: `model` or `data` is refused or names nothing importable.
        UnsafeParameterError: in a deployment run, a path outside the roots or an inline MLflow connection.
        ModelDirError, NoValidCheckpointError, MetricNotFoundError: nothing to ship.
    """
    log = get_logger()
    if in_deployment_run():  # this process is the run's own: its TensorFlow import can be lean
        skip_keras_optional_imports()
    selection = CheckpointSelection.parse(checkpoint, parameter="checkpoint")
    settings = get_settings()
    paths = checked_paths(
        model_dir=model_dir or settings.default_path("models"),
        export_base=export_base or settings.default_path("exports", registered_model_name),
        frozen_dir=frozen_dir or settings.default_path("frozen", registered_model_name),
    )
    checked_code(model=model, data=data or None)
    check_mlflow_connection(mlflow)
    aliases = list(dict.fromkeys(aliases))
    connection = mlflow or MlflowConnection()
    config = ExportConfig(model=model, data=data or None)

    ref = tasks.select_checkpoint(paths["model_dir"], selection, parameter="checkpoint")
    gate_value(ref, gate.metric)  # the gate metric must be there before anything is written
    tasks.check_can_register(registered_model_name, connection)
    publish_checkpoint_table(ref.model_dir, ref)

    exported = tasks.export_saved_model(ref.path, paths["export_base"], config)
    registered = tasks.find_registered_version(exported, registered_model_name, connection) if exported.reused else None
    frozen = None
    if registered is not None:
        log.info("%s is already exported and registered as %s version %d", ref.path, registered.name, registered.version)
    else:
        frozen = tasks.freeze_graph(ref.path, frozen_graph_path(paths["frozen_dir"], ref.path), config)
        run_name = f"export-checkpoint-{registered_model_name}-step-{ref.step}"
        run_id = tasks.log_frozen_graph_to_mlflow(connection, None, frozen, run_name=run_name)
        registered = tasks.register_model_version(
            exported,
            registered_model_name,
            connection,
            checkpoint=ref,
            frozen=frozen,
            run_id=run_id,
            data=data or None,
            gate=gate,
        )
    if aliases:
        registered = tasks.set_model_version_aliases(registered, aliases, connection)
    publish_export_summary(ref, str(selection), exported, frozen, registered)
    publish_mlflow_links(registered)
    return ExportSummary(
        checkpoint=ref,
        selection=str(selection),
        export=exported,
        frozen_graph=frozen,
        registered=registered,
        flow_run_id=current_flow_run_id(),
    )
