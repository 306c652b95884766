"""The `retrain` flow: train with checkpoints, select the checkpoint to ship, freeze, export.

This is the main job `make run` runs: train (resuming from the newest valid
checkpoint) in an MLflow run, select (latest or best by a metric), freeze it to
a verified `.pb` (logged to the run), export it as a verified SavedModel
version, log that as an MLflow model and register it, then run the champion
gate. Without an `mlflow` connection block the environment's
`MLFLOW_TRACKING_URI` is used, else the local SQLite store.

Example:
    >>> from prefect_tensorflow.flows.retrain import retrain
    >>> summary = retrain(model_dir="/tmp/iris", steps=500)  # doctest: +SKIP
    >>> summary.checkpoint.path  # doctest: +SKIP
    '/tmp/iris/model.ckpt-500'
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Annotated, Literal, Optional

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from prefect_tensorflow.tasks import iris
from prefect_tensorflow.tasks.mlflow_connection import MLFLOW_TASK_RETRIES, MlflowConnection
from prefect_tensorflow.tasks.registry import RegisteredVersion, register_model_version
from prefect_tensorflow.tasks.tracking import log_frozen_graph_to_mlflow
from prefect_tensorflow.tasks.policy import CheckpointPolicy
from prefect_tensorflow.tasks.selection import CheckpointRef
from prefect_tensorflow.tasks.exporting import ExportResult, export_saved_model
from prefect_tensorflow.tasks.freezing import FreezeResult, freeze_graph
from prefect_tensorflow.tasks.logs import get_logger
from prefect_tensorflow.tasks.training import TrainResult, check_arguments, train_with_checkpoints

from .artifacts import publish_checkpoint_table, publish_mlflow_links, publish_training_summary
from .defaults import default_export_base, default_frozen_dir, default_model_dir
from .parameters import Selection, check_registered_model_name, current_flow_run_id, select_checkpoint

class RetrainSummary(BaseModel):
    """What a `retrain` run produced."""

    model_config = ConfigDict(frozen=True)

    training: TrainResult
    checkpoint: CheckpointRef = Field(description="The checkpoint selected to ship")
    selection: str
    frozen_graph: FreezeResult
    export: ExportResult
    registered: Optional[RegisteredVersion] = Field(default=None, description="None when track=False")
    flow_run_id: Optional[str] = Field(default=None, description="The Prefect flow run that produced this")


def set_aside(model_dir: str) -> Optional[str]:
    """Rename a model dir that holds anything to `<model_dir>.previous-<UTC time>` (one atomic
    rename: nothing is deleted) so that training starts from scratch; returns the new name."""
    if not os.path.isdir(model_dir) or not os.listdir(model_dir):
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    aside = f"{model_dir}.previous-{stamp}"
    os.rename(model_dir, aside)
    get_logger().info("from scratch: moved the previous checkpoints of %s to %s", model_dir, aside)
    return aside


@flow(name="retrain", log_prints=True)
def retrain(
    model_dir: Annotated[Optional[str], Field(description="Checkpoint directory; default ./.prefect-tensorflow/models/iris")] = None,
    model: Annotated[str, Field(description="'module:attr' of the compiled Keras model builder")] = iris.MODEL,
    data: Annotated[str, Field(description="'module:attr' of the dataset loader (split) -> tf.data.Dataset")] = iris.DATA,
    steps: Annotated[int, Field(ge=0, description="Target global step")] = 1000,
    more_steps: Annotated[Optional[int], Field(ge=0, description="Train this many steps past the newest checkpoint instead")] = None,
    batch_size: Annotated[int, Field(ge=1, description="Examples per step")] = 32,
    seed: Annotated[int, Field(ge=0, description="Seed of initialisation and shuffling")] = 0,
    policy: Annotated[Optional[CheckpointPolicy], Field(description="When to checkpoint and what to keep (Estimator defaults)")] = None,
    select: Annotated[str, Field(description="'latest', a step number or 'best:<metric>[:min|max]'")] = "latest",
    from_scratch: Annotated[bool, Field(description="Start at step 0: the model dir's checkpoints are moved aside to <model_dir>.previous-<time>, not deleted")] = False,
    export_base: Annotated[Optional[str], Field(description="Directory of SavedModel versions; default ./.prefect-tensorflow/exports/iris")] = None,
    frozen_dir: Annotated[Optional[str], Field(description="Directory for the frozen .pb; default ./.prefect-tensorflow/frozen/iris")] = None,
    registered_model_name: Annotated[str, Field(min_length=1, description="MLflow registered model to add the export to")] = "iris",
    mlflow: Annotated[Optional[MlflowConnection], Field(description="MLflow connection; default $MLFLOW_TRACKING_URI, else local SQLite")] = None,
    gate_metric: Annotated[Optional[str], Field(description="Checkpoint metric the new version must beat the champion on")] = "accuracy",
    gate_mode: Annotated[Literal["min", "max"], Field(description="'max' if higher is better, 'min' if lower is")] = "max",
    track: Annotated[bool, Field(description="Track in MLflow and register the export")] = True,
) -> RetrainSummary:
    """Train (resuming from the newest valid checkpoint), select the checkpoint to ship,
    freeze it and export it as the next SavedModel version, each verified.

    Then (unless `track=False`) logs everything to MLflow and registers the
    export as the next version of `registered_model_name`, `challenger`, and
    `champion` if it beats the champion on `gate_metric`.

    Publishes a table of the checkpoints, a markdown summary and links to the
    MLflow run and model version as Prefect artifacts.

    Raises:
        ValueError: `select`, a count or a name is malformed (checked before anything is written).
        ImportStringError: `model` or `data` names nothing importable (checked before anything is written).
    """
    selection = Selection.parse(select)
    check_registered_model_name(registered_model_name)
    check_arguments(model=model, data=data, steps=steps, more_steps=more_steps, batch_size=batch_size, seed=seed)
    connection = (mlflow or MlflowConnection()) if track else None
    model_dir = os.path.abspath(model_dir or default_model_dir())
    if from_scratch:
        set_aside(model_dir)
    result = train_with_checkpoints.with_options(**MLFLOW_TASK_RETRIES)(
        model_dir, model=model, data=data, steps=steps, more_steps=more_steps,
        batch_size=batch_size, seed=seed, policy=policy, tracking=connection,
    )
    ref = select_checkpoint(result.model_dir, selection)
    frozen_dir = os.path.abspath(frozen_dir or default_frozen_dir())
    os.makedirs(frozen_dir, exist_ok=True)
    frozen = freeze_graph(
        ref.path, os.path.join(frozen_dir, os.path.basename(ref.path) + ".pb"), model=model,
        data=data,
    )
    exported = export_saved_model(ref.path, export_base or default_export_base(), model=model, data=data)
    registered = None
    if connection is not None:
        log_frozen_graph_to_mlflow.with_options(**MLFLOW_TASK_RETRIES)(connection, result.mlflow_run_id, frozen)
        registered = register_model_version.with_options(**MLFLOW_TASK_RETRIES)(
            exported, registered_model_name, connection=connection, checkpoint=ref, frozen=frozen,
            run_id=result.mlflow_run_id, data=data, gate_metric=gate_metric, gate_mode=gate_mode,
        )
    publish_checkpoint_table(result.model_dir, ref)
    publish_training_summary(result, ref, select, frozen, exported, registered)
    if registered is not None:
        publish_mlflow_links(registered)
    return RetrainSummary(
        training=result, checkpoint=ref, selection=select, frozen_graph=frozen, export=exported,
        registered=registered, flow_run_id=current_flow_run_id(),
    )
