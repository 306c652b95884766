"""The `retrain` flow: train with checkpoints, select the checkpoint to ship, export, freeze, register.

This is the main job `make run` runs: the flows' prelude (`flows.prelude`),
then train (resuming from the newest valid checkpoint) in an MLflow run,
select (latest, a step or best by a metric), and ship it as every flow does
(`flows.shipping`): export it as a verified SavedModel version, freeze it to a
verified `.pb` (logged to the run), log the export as an MLflow model and
register it, then run the champion gate. Without an `mlflow` block the worker's `MLFLOW_TRACKING_URI`
is used, else the local SQLite store.

With a dataset loader that reads a window (`flows.windows`), the run reads the
window closed against its scheduled start time, lists it (its manifest and
digest), and trains nothing when `<model_dir>/data-lineage.json` says these very
files were trained already (`SkippedRetrain`, unless `force`); otherwise it
trains the window from scratch in `<model_dir>/windows/<window>/<stamp>`, ships
it, and records the data on the MLflow run and version (`data.*` tags, inputs,
`data/manifest.json`) and in `data-lineage.json`.

Example:
    >>> from prefect_tensorflow.flows.retrain import retrain
    >>> retrain.name
    'retrain'
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Annotated, Literal, Optional, Union

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from prefect_tensorflow.tasks import prefect_tasks as tasks
from prefect_tensorflow.tasks.blocks import MlflowConnection
from prefect_tensorflow.tasks.checkpoints.model_dir import ModelDir
from prefect_tensorflow.tasks.checkpoints.selection import CheckpointSelection
from prefect_tensorflow.tasks.configs import ExportConfig, GateConfig, RegisteredModelName, TrainingConfig
from prefect_tensorflow.tasks.data.lineage import DataLineage
from prefect_tensorflow.tasks.data.window import DataWindow
from prefect_tensorflow.tasks.errors import StorageError
from prefect_tensorflow.tasks.export.frozen_graph import FreezeResult
from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
from prefect_tensorflow.tasks.run_context import current_flow_run_id, get_logger
from prefect_tensorflow.tasks.security import check_can_move_aside, check_is_model_dir
from prefect_tensorflow.tasks.storage.locations import parse_location
from prefect_tensorflow.tasks.training.loop import TrainResult
from prefect_tensorflow.tasks.training.model_dir_lease import hold_model_dir

from .artifacts import publish_manifest_table
from .parameters import ParsedBy
from .prelude import flow_prelude
from .shipping import Destination, Shipped, check_decision, check_gate_metrics, publish_shipped, ship_checkpoint
from .windows import WindowRun, plan_window_run, record_window_run, window_lease, windowed_training


class RetrainSummary(Shipped):
    """What a `retrain` run produced: the training, then what was shipped."""

    training: TrainResult
    frozen_graph: FreezeResult  # retrain always freezes
    data: Optional[DataLineage] = Field(default=None, description="The window trained on (a loader that reads one)")
    skipped: None = None


class SkippedRetrain(BaseModel):
    """A `retrain` run that trained, exported and registered nothing, and why (`skipped`)."""

    model_config = ConfigDict(frozen=True)

    skipped: str = Field(description="Why nothing was trained, e.g. 'data unchanged: window [...) ... --force to retrain'")
    data: DataLineage = Field(description="The window this run read")
    previous: Optional[DataLineage] = Field(default=None, description="What the model dir last trained on")
    flow_run_id: Optional[str] = None


def set_aside(model_dir: str) -> Optional[str]:
    """Rename a model dir that holds checkpoints to `<model_dir>.previous-<UTC time>` (one atomic
    rename: nothing is deleted) so that training starts from scratch; returns the new name.

    Raises:
        UnsafeParameterError: the directory holds more than checkpoints and their companions.
        ModelDirBusyError: a training holds the model dir (naming it).
    """
    if not parse_location(model_dir, parameter="model_dir").is_local:
        raise StorageError(
            f"model_dir {model_dir}: from_scratch moves a local model dir aside; an object store has no rename "
            "(train into a new prefix instead)"
        )
    if not os.path.isdir(model_dir) or not os.listdir(model_dir):
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    aside = f"{model_dir}.previous-{stamp}"
    # Checked before the lease too: its lock file is never made in a directory that is refused.
    check_is_model_dir(model_dir)
    check_can_move_aside(model_dir, aside)
    with hold_model_dir(ModelDir.parse(model_dir), what="moving it aside (from_scratch)"):  # not under a training
        check_is_model_dir(model_dir)
        check_can_move_aside(model_dir, aside)
        os.rename(model_dir, aside)  # the lease's lock file goes with it
    get_logger().info("from scratch: moved the previous checkpoints of %s to %s", model_dir, aside)
    return aside


@flow(name="retrain", flow_run_name="retrain-{registered_model_name}", log_prints=True)
def retrain(
    model_dir: str = "",
    training: TrainingConfig = TrainingConfig(),
    select: Annotated[str, ParsedBy(CheckpointSelection.parse)] = "latest",
    from_scratch: bool = False,
    export_base: str = "",
    frozen_dir: str = "",
    registered_model_name: RegisteredModelName = "iris",
    gate: GateConfig = GateConfig(),
    mlflow: Optional[MlflowConnection] = None,
    track: bool = True,
    decision: Optional[Literal["approve", "reject"]] = None,
    window: Optional[DataWindow] = None,
    force: bool = False,
) -> Union[RetrainSummary, SkippedRetrain]:
    """Train (resuming from the newest valid checkpoint), select the checkpoint to ship,
    freeze it and export it as the next SavedModel version, each verified.

    Then (unless `track` is off) logs everything to MLflow and registers the
    export as the next version of `registered_model_name`, `challenger`; the
    champion gate scores it and the champion on the same eval data and moves
    `champion` if the rule (and the serving check) says so. Publishes a table
    of the checkpoints, a markdown summary and links to the MLflow run and
    model version as Prefect artifacts.

    Args:
        model_dir: Checkpoint directory (or s3://bucket/prefix). Empty: models/iris under the data
            home (the worker's PREFECT_TENSORFLOW_HOME). In a deployment run it must be under the
            worker's PREFECT_TENSORFLOW_ROOTS (default: the data home).
        training: What to train: the model and data (registered names), steps (the target step)
            or more_steps (past the newest checkpoint), batch size, seed, hyperparameters and the
            checkpoint policy.
        select: The checkpoint to ship: 'latest', a step number (e.g. '2000'), or 'best:METRIC'
            for the best by a recorded metric (e.g. 'best:accuracy'; lowest wins for names with
            'loss' or 'error'; add ':min' or ':max' to choose).
        from_scratch: Start at step 0. The model dir's checkpoints are moved aside to a sibling
            directory named MODEL_DIR.previous-TIME, never deleted. (A windowed run always starts
            at step 0, in a directory of its own.)
        export_base: Directory of SavedModel versions for TF Serving. Empty: exports/<registered_model_name>
            under the data home. In a deployment run it must be under PREFECT_TENSORFLOW_ROOTS.
        frozen_dir: Directory for the frozen .pb (never replaced by other bytes). Empty: frozen/<registered_model_name>
            under the data home. In a deployment run it must be under PREFECT_TENSORFLOW_ROOTS.
        registered_model_name: The MLflow registered model the export becomes a version of.
        gate: Champion gate: both versions are scored on the data's eval split; the metric, the
            margin the new version must clear (the interval's lower bound), guardrails, floors and
            serving limits. No rule: the champion is kept.
        mlflow: A saved MLflow Connection block. Leave it on None for the worker's
            MLFLOW_TRACKING_URI (else a local SQLite store).
        track: Track in MLflow and register the export.
        decision: The answer, given in advance, for a gate that cannot compare the versions
            (a renamed output, other labels): 'approve' or 'reject'. Empty: the run pauses with
            an approval form in the Prefect UI. Refused in a deployment run (use the form).
        window: The data window, for a dataset loader that reads one: start and end (UTC days,
            end exclusive), or days before the end, or a version. Empty: training.window, else
            the day before the run's scheduled start. Refused for a loader that reads none (iris).
        force: Train even when the window's data is what the model dir last trained on
            (same digest); otherwise such a run ends early, training nothing.

    Raises:
        ValueError: `select`, a path, a count or a name is malformed (checked before anything is written).
        ImportStringError: the model or data is refused or names nothing importable.
        UnsafeParameterError: in a deployment run, a path outside the roots or an inline MLflow connection.
    """
    check_decision(decision)
    if track:
        check_gate_metrics(gate, ExportConfig().head)  # before training, not after it
    selection = CheckpointSelection.parse(select)
    paths = {"model_dir": model_dir, "export_base": export_base, "frozen_dir": frozen_dir}
    prelude = flow_prelude(paths, registered_model_name, model=training.model, data=training.data, mlflow=mlflow, track=track)
    training = windowed_training(training, window)
    model_dir = prelude.paths["model_dir"]
    with window_lease(model_dir, training.window):  # one run of a window at a time (see flows.windows)
        plan = None
        if training.window is not None:
            plan = plan_window_run(
                model_dir, training, force=force, connection=prelude.connection, registered_model_name=registered_model_name
            )
        if plan is not None and plan.skipped is not None:
            return skipped_run(plan)
        if plan is not None and plan.manifest is not None and plan.lineage is not None:
            publish_manifest_table(plan.manifest, plan.lineage)
        if prelude.connection is not None:
            tasks.check_can_register(registered_model_name, prelude.connection)
        if from_scratch and plan is None:
            set_aside(model_dir)
        train_dir = plan.trained_dir if plan is not None else model_dir
        result = tasks.train_with_checkpoints(train_dir, training, tracking=prelude.connection)
        ref = tasks.select_checkpoint(result.model_dir, selection)
        data_tags = plan.tags() if plan is not None else {}
        if plan is not None and prelude.connection is not None and result.mlflow_run_id is not None:
            log_window_lineage(plan, prelude.connection, result.mlflow_run_id)
        shipped = ship_checkpoint(
            ref,
            str(selection),
            training.export_config(),
            Destination(
                export_base=prelude.paths["export_base"],
                frozen_dir=prelude.paths["frozen_dir"],
                connection=prelude.connection,
                registered_model_name=registered_model_name,
                gate=gate,
                decision=decision,
            ),
            run_id=result.mlflow_run_id,
            version_tags=data_tags,
            gate_context={k: v for k, v in data_tags.items() if k.startswith("data.drift.")},
        )
        publish_shipped(result, shipped)
        trained = record_window_run(model_dir, plan, result.mlflow_run_id) if plan is not None else None
        return RetrainSummary(**dict(shipped), training=result, data=trained)


def skipped_run(plan: WindowRun) -> SkippedRetrain:
    """The answer of a run whose window was trained already: stated in the log and a `data-skipped` artifact."""
    from .artifacts import publish_data_skipped

    assert plan.skipped is not None and plan.lineage is not None and plan.previous is not None
    get_logger().info("%s", plan.skipped)
    publish_data_skipped(plan.skipped, plan.lineage, plan.previous)
    return SkippedRetrain(skipped=plan.skipped, data=plan.lineage, previous=plan.previous, flow_run_id=current_flow_run_id())


def log_window_lineage(plan: WindowRun, connection: MlflowConfig, run_id: str) -> None:
    """The window's data on the training's MLflow run: tags, inputs, `data/` artifacts."""
    from prefect_tensorflow.tasks.registry.data_lineage import log_data_lineage

    if plan.manifest is None or plan.lineage is None:
        return
    log_data_lineage(connection, run_id, plan.manifest, plan.lineage, artifacts=plan.documents(), tags=plan.tags())
