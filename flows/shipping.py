"""Shipping a selected checkpoint, as `retrain` does it: freeze, export, log, register and gate, then publish.

`retrain` and `sweep` end the same way once they hold the checkpoint to ship
and the training that produced it; these two helpers are that end, made of
the same Prefect tasks, so both flows ship alike:

- `ship_checkpoint`: a verified frozen `.pb`, the next verified SavedModel
  version, and (with an MLflow connection) the frozen graph logged to the
  training's run and the export registered, `challenger`, and `champion`
  when it beats the champion on the gate metric;
- `publish_shipped`: the Prefect artifacts: the checkpoint table, the
  training summary, the links to the MLflow model version and run.

Example:
    >>> from prefect_tensorflow.flows.shipping import Shipped
    >>> sorted(Shipped.model_fields)
    ['export', 'frozen_graph', 'registered']
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from prefect_tensorflow.tasks import prefect_tasks as tasks
from prefect_tensorflow.tasks.checkpoints.selection import CheckpointRef
from prefect_tensorflow.tasks.configs import ExportConfig, GateConfig, TrainingConfig
from prefect_tensorflow.tasks.export.frozen_graph import FreezeResult
from prefect_tensorflow.tasks.export.saved_model import ExportResult
from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
from prefect_tensorflow.tasks.registry.model_versions import RegisteredVersion
from prefect_tensorflow.tasks.training.loop import TrainResult

from .artifacts import publish_checkpoint_table, publish_mlflow_links, publish_training_summary
from .parameters import frozen_graph_path


class Shipped(BaseModel):
    """What shipping a checkpoint produced."""

    model_config = ConfigDict(frozen=True)

    frozen_graph: FreezeResult
    export: ExportResult
    registered: Optional[RegisteredVersion] = Field(default=None, description="None without an MLflow connection")


def ship_checkpoint(
    ref: CheckpointRef,
    training: TrainingConfig,
    *,
    export_base: str,
    frozen_dir: str,
    connection: Optional[MlflowConfig],
    registered_model_name: str,
    gate: GateConfig,
    run_id: Optional[str],
) -> Shipped:
    """Freeze and export `ref` (verified), then log and register it in MLflow when `connection` is set.

    Args:
        ref: the checkpoint to ship.
        training: the config it was trained with (model, hparams and data rebuild it for the export).
        export_base: directory of SavedModel versions.
        frozen_dir: directory of frozen graphs.
        connection: the MLflow connection; None ships without MLflow.
        registered_model_name: the registered model the export becomes a version of.
        gate: the champion gate.
        run_id: the MLflow run the frozen graph and the model are logged to (the training's run).
    """
    export = ExportConfig(model=training.model, hparams=training.hparams, data=training.data)
    frozen = tasks.freeze_graph(ref.path, frozen_graph_path(frozen_dir, ref.path), export)
    exported = tasks.export_saved_model(ref.path, export_base, export)
    registered = None
    if connection is not None:
        tasks.log_frozen_graph_to_mlflow(connection, run_id, frozen)
        registered = tasks.register_model_version(
            exported,
            registered_model_name,
            connection,
            checkpoint=ref,
            frozen=frozen,
            run_id=run_id,
            data=training.data,
            gate=gate,
        )
    return Shipped(frozen_graph=frozen, export=exported, registered=registered)


def publish_shipped(result: TrainResult, ref: CheckpointRef, selection: str, shipped: Shipped) -> None:
    """The Prefect artifacts of a shipped training: checkpoint table, training summary, MLflow links."""
    publish_checkpoint_table(result.model_dir, ref)
    publish_training_summary(result, ref, selection, shipped.frozen_graph, shipped.export, shipped.registered)
    if shipped.registered is not None:
        publish_mlflow_links(shipped.registered)
