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
import re
from typing import Annotated, Literal, Optional

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from prefect_tensorflow.tasks import iris
from prefect_tensorflow.tasks.mlflow_connection import MlflowConnection
from prefect_tensorflow.tasks.registry import RegisteredVersion, register_model_version
from prefect_tensorflow.tasks.tracking import log_frozen_graph_to_mlflow
from prefect_tensorflow.tasks.policy import CheckpointPolicy
from prefect_tensorflow.tasks.selection import (
    CheckpointRef,
    select_best_checkpoint,
    select_latest_checkpoint,
)
from prefect_tensorflow.tasks.exporting import ExportResult, export_saved_model
from prefect_tensorflow.tasks.freezing import FreezeResult, freeze_graph
from prefect_tensorflow.tasks.training import TrainResult, train_with_checkpoints

from .artifacts import publish_checkpoint_table, publish_mlflow_links, publish_training_summary
from .defaults import default_export_base, default_frozen_dir, default_model_dir

_BEST = re.compile(r"^best:([A-Za-z0-9_./-]+)(?::(min|max))?$")


class Selection(BaseModel):
    """How the checkpoint to ship is chosen, parsed from `"latest"` or `"best:<metric>[:min|max]"`."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["latest", "best"]
    metric: Optional[str] = None
    mode: Literal["min", "max"] = "max"

    @classmethod
    def parse(cls, text: str) -> "Selection":
        """`"latest"`, `"best:accuracy"` (max) or `"best:loss"` (min: names with "loss" or
        "error" default to min), or an explicit `"best:<metric>:min|max"`.

        Raises:
            ValueError: the text is none of these.
        """
        text = (text or "").strip()
        if text == "latest":
            return cls(kind="latest")
        match = _BEST.match(text)
        if not match:
            raise ValueError(
                f"select: expected 'latest' or 'best:<metric>[:min|max]', received {text!r}"
            )
        metric, mode = match.group(1), match.group(2)
        if mode is None:
            mode = "min" if ("loss" in metric or "error" in metric) else "max"
        return cls(kind="best", metric=metric, mode=mode)


class RetrainSummary(BaseModel):
    """What a `retrain` run produced."""

    model_config = ConfigDict(frozen=True)

    training: TrainResult
    checkpoint: CheckpointRef = Field(description="The checkpoint selected to ship")
    selection: str
    frozen_graph: FreezeResult
    export: ExportResult
    registered: Optional[RegisteredVersion] = Field(default=None, description="None when track=False")


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
    select: Annotated[str, Field(description="'latest' or 'best:<metric>[:min|max]'")] = "latest",
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
        ValueError: `select` is malformed (checked before any training).
    """
    selection = Selection.parse(select)
    connection = (mlflow or MlflowConnection()) if track else None
    result = train_with_checkpoints(
        model_dir or default_model_dir(), model=model, data=data, steps=steps, more_steps=more_steps,
        batch_size=batch_size, seed=seed, policy=policy, tracking=connection,
    )
    if selection.kind == "latest":
        ref = select_latest_checkpoint(result.model_dir)
    else:
        ref = select_best_checkpoint(result.model_dir, selection.metric, selection.mode)
    frozen_dir = os.path.abspath(frozen_dir or default_frozen_dir())
    os.makedirs(frozen_dir, exist_ok=True)
    frozen = freeze_graph(
        ref.path, os.path.join(frozen_dir, os.path.basename(ref.path) + ".pb"), model=model,
        data=data,
    )
    exported = export_saved_model(ref.path, export_base or default_export_base(), model=model, data=data)
    registered = None
    if connection is not None:
        log_frozen_graph_to_mlflow(connection, result.mlflow_run_id, frozen)
        registered = register_model_version(
            exported, registered_model_name, connection=connection, checkpoint=ref, frozen=frozen,
            run_id=result.mlflow_run_id, data=data, gate_metric=gate_metric, gate_mode=gate_mode,
        )
    publish_checkpoint_table(result.model_dir, ref)
    publish_training_summary(result, ref, select, frozen, exported, registered)
    if registered is not None:
        publish_mlflow_links(registered)
    return RetrainSummary(
        training=result, checkpoint=ref, selection=select, frozen_graph=frozen, export=exported,
        registered=registered,
    )
