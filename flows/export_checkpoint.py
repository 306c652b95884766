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

from functools import partial
from typing import Annotated, Literal, Optional

from prefect import flow

from prefect_tensorflow.tasks import prefect_tasks as tasks
from prefect_tensorflow.tasks.blocks import MlflowConnection
from prefect_tensorflow.tasks.checkpoints.selection import CheckpointSelection
from prefect_tensorflow.tasks.configs import AliasName, DataRef, ExportConfig, GateConfig, ModelRef, RegisteredModelName
from prefect_tensorflow.tasks.promotion.warm_template import launch_template
from prefect_tensorflow.tasks.registry.model_versions import RegisteredVersion

from .artifacts import publish_checkpoint_table, publish_export_summary, publish_mlflow_links
from .parameters import ParsedBy
from .prelude import flow_prelude
from .shipping import Destination, Shipped, check_decision, ship_checkpoint


class ExportSummary(Shipped):
    """What an `export-checkpoint` run shipped."""

    registered: RegisteredVersion  # export-checkpoint always registers


@flow(name="export-checkpoint", flow_run_name="export-{registered_model_name}-{checkpoint}", log_prints=True)
def export_checkpoint(
    model_dir: str = "",
    checkpoint: Annotated[str, ParsedBy(partial(CheckpointSelection.parse, parameter="checkpoint"))] = "latest",
    registered_model_name: RegisteredModelName = "iris",
    aliases: list[AliasName] = [],  # noqa: B006 - Prefect copies parameters
    model: ModelRef = "iris",
    data: DataRef = "iris",
    export_base: str = "",
    frozen_dir: str = "",
    gate: GateConfig = GateConfig(),
    mlflow: Optional[MlflowConnection] = None,
    decision: Optional[Literal["approve", "reject"]] = None,
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
        aliases: Aliases to point at the new version besides challenger (and champion if the gate
            promotes it), e.g. 'staging'.
        model: The model builder the checkpoint was trained with (a registered name).
        data: The dataset loader whose eval split is the verification batch (a registered name).
        export_base: Directory of SavedModel versions for TF Serving. Empty: exports/<registered_model_name>
            under the data home. In a deployment run it must be under PREFECT_TENSORFLOW_ROOTS.
        frozen_dir: Directory for the frozen .pb (never replaced by other bytes). Empty: frozen/<registered_model_name>
            under the data home. In a deployment run it must be under PREFECT_TENSORFLOW_ROOTS.
        gate: Champion gate: both versions are scored on the data's eval split; the metric, the
            margin the new version must clear (the interval's lower bound), guardrails, floors and
            serving limits. No rule: the champion is kept.
        mlflow: A saved MLflow Connection block. Leave it on None for the worker's
            MLFLOW_TRACKING_URI (else a local SQLite store).
        decision: The answer, given in advance, for a gate that cannot compare the versions
            (a renamed output, other labels): 'approve' or 'reject'. Empty: the run pauses with
            an approval form in the Prefect UI. Refused in a deployment run (use the form).

    Raises:
        ValueError: a malformed `checkpoint`, path, name or alias (before anything is written).
        ImportStringError: `model` or `data` is refused or names nothing importable.
        UnsafeParameterError: in a deployment run, a path outside the roots or an inline MLflow connection.
        ModelDirError, NoValidCheckpointError, MetricNotFoundError: nothing to ship.
    """
    check_decision(decision)
    selection = CheckpointSelection.parse(checkpoint, parameter="checkpoint")
    paths = {"model_dir": model_dir, "export_base": export_base, "frozen_dir": frozen_dir}
    prelude = flow_prelude(paths, registered_model_name, model=model, data=data or None, mlflow=mlflow)
    aliases = list(dict.fromkeys(aliases))
    connection = prelude.connection or MlflowConnection()  # export-checkpoint always registers
    launch_template()  # the serving template's imports (seconds) overlap the selection, export and freeze

    ref = tasks.select_checkpoint(prelude.paths["model_dir"], selection, parameter="checkpoint")
    tasks.check_can_register(registered_model_name, connection)
    publish_checkpoint_table(ref.model_dir, ref)
    shipped = ship_checkpoint(
        ref,
        str(selection),
        ExportConfig(model=model, data=data or None),
        Destination(
            export_base=prelude.paths["export_base"],
            frozen_dir=prelude.paths["frozen_dir"],
            connection=connection,
            registered_model_name=registered_model_name,
            gate=gate,
            aliases=tuple(aliases),
            decision=decision,
        ),
        run_name=f"export-checkpoint-{registered_model_name}-step-{ref.step}",
        skip_registered=True,
    )
    summary = ExportSummary(**dict(shipped))
    publish_export_summary(ref, summary.selection, summary.export, summary.frozen_graph, summary.registered)
    publish_mlflow_links(summary.registered)
    return summary
