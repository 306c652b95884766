"""The one way a flow ships a selected checkpoint: export -> freeze -> register -> gate -> aliases.

`retrain`, `sweep` and `export-checkpoint` end the same way once they hold
the checkpoint to ship; `ship_checkpoint` is that end, made of the Prefect
tasks, so every flow ships alike (a new export format or shipping step is
added here, once):

- the next verified SavedModel version, then a verified frozen `.pb`;
- with an MLflow connection, the frozen graph logged (to the given run, else
  a new one) and the export registered as `challenger`; then the champion
  gate (`gate_champion`: both versions scored on the same eval data, the
  rule, the serving check, the guarded move of `champion`), its decision
  published as an artifact (`publish_gate_decision`) and, when `champion`
  moved, the alias history table (`publish_alias_history`); then the extra
  aliases asked for. With `skip_registered`, an export that was already
  there, registered and gated returns that version and its recorded
  decision without freezing, logging or gating again.

`publish_shipped` publishes the Prefect artifacts of a shipped training: the
checkpoint table, the training summary, the links to the MLflow version and run.

Example:
    >>> from prefect_tensorflow.flows.shipping import Shipped
    >>> sorted(Shipped.model_fields)
    ['checkpoint', 'export', 'flow_run_id', 'frozen_graph', 'registered', 'selection']
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from prefect_tensorflow.tasks import prefect_tasks as tasks
from prefect_tensorflow.tasks.checkpoints.selection import CheckpointRef
from prefect_tensorflow.tasks.configs import ExportConfig, GateConfig
from prefect_tensorflow.tasks.errors import UnsafeParameterError
from prefect_tensorflow.tasks.export.frozen_graph import FreezeResult
from prefect_tensorflow.tasks.export.saved_model import ExportResult
from prefect_tensorflow.tasks.promotion.warm_template import launch_template
from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
from prefect_tensorflow.tasks.registry.model_versions import RegisteredVersion, version_aliases
from prefect_tensorflow.tasks.run_context import current_flow_run_id, get_logger, in_deployment_run
from prefect_tensorflow.tasks.training.loop import TrainResult

from .artifacts import (
    publish_alias_history,
    publish_checkpoint_table,
    publish_gate_decision,
    publish_mlflow_links,
    publish_training_summary,
)
from .parameters import frozen_graph_path


class Shipped(BaseModel):
    """What shipping a checkpoint produced; every flow's summary starts with these fields."""

    model_config = ConfigDict(frozen=True)

    checkpoint: CheckpointRef = Field(description="The checkpoint that was shipped")
    selection: str = Field(description="How it was selected: 'latest', a step or 'best:<metric>:<mode>'")
    export: ExportResult
    frozen_graph: Optional[FreezeResult] = Field(default=None, description="None when the export was already registered")
    registered: Optional[RegisteredVersion] = Field(default=None, description="None without MLflow (track=False)")
    flow_run_id: Optional[str] = Field(default=None, description="The Prefect flow run that produced this")


@dataclass(frozen=True)
class Destination:
    """Where a flow ships to: its export base and frozen-graph directory, and the MLflow registry."""

    export_base: str
    frozen_dir: str
    connection: Optional[MlflowConfig]
    registered_model_name: str
    gate: GateConfig
    aliases: tuple[str, ...] = ()
    decision: Optional[Literal["approve", "reject"]] = None  # an incomparable gate's answer, given in advance


def check_decision(decision: Optional[str]) -> Optional[str]:
    """An incomparable gate's answer given in advance: none in a deployment run, whose UI user gets the pause form.

    Raises:
        UnsafeParameterError: `decision` given in a deployment run.
    """
    if decision is not None and in_deployment_run():
        raise UnsafeParameterError(
            "decision",
            decision,
            "a deployment run asks for approval in its pause form (the Prefect UI), with the "
            "gate's evidence in view; leave decision empty",
        )
    return decision


def check_gate_metrics(gate: GateConfig, head: str) -> None:
    """Every metric `gate` names (primary, guardrails, floors) is one the head's outcomes have.

    Example:
        >>> check_gate_metrics(GateConfig(metric="loss"), "classifier")

    Raises:
        GateError: naming the field and the metrics the head computes.
    """
    from prefect_tensorflow.tasks.promotion.outcomes import check_metric

    if gate.metric is not None:
        check_metric(gate.metric, head)
    for field in ("guardrails", "floors"):
        for metric in getattr(gate, field):
            check_metric(metric, head, parameter=f"gate.{field}")


def ship_checkpoint(
    ref: CheckpointRef,
    selection: str,
    config: ExportConfig,
    to: Destination,
    *,
    run_id: Optional[str] = None,
    run_name: str = "freeze",
    skip_registered: bool = False,
    version_tags: Optional[Mapping[str, str]] = None,
    gate_context: Optional[Mapping[str, str]] = None,
) -> Shipped:
    """Export and freeze `ref` (each verified), then log, register, gate and alias it when `to` has a connection.

    The gate scores both versions on `config.data`'s eval split, with the config's loader options and
    window (the challenger's training window; no `data`: the champion is kept, stated).

    Args:
        ref: the checkpoint to ship.
        selection: how it was selected (for the summary).
        config: how to rebuild and verify the model (model, hparams, data).
        to: the export base, frozen-graph directory and registry.
        run_id: the MLflow run the frozen graph and the model are logged to (the training's run);
            None: a new run named `run_name`.
        run_name: the name of that new run.
        skip_registered: an export that already existed and is registered returns that version
            without freezing or logging again.
        version_tags: more tags of a new version (the training data's `data.*`).
        gate_context: figures shown beside the gate's decision, not deciding it (the data's drift).

    Raises:
        GateError: a metric of `to.gate` that the export's head does not compute (before anything is written).
    """
    if to.connection is not None:
        check_gate_metrics(to.gate, config.head)
        launch_template()  # the registration's load check forks from it: its imports overlap the export and freeze
    source = config.data_source() if config.data is not None else None
    exported = tasks.export_saved_model(ref.path, to.export_base, config)
    registered = None
    if skip_registered and exported.reused and to.connection is not None:
        registered = tasks.find_registered_version(exported, to.registered_model_name, to.connection)
    frozen = None
    if registered is not None:
        get_logger().info("%s is already exported and registered as %s version %d", ref.path, registered.name, registered.version)
    else:
        frozen = tasks.freeze_graph(ref.path, frozen_graph_path(to.frozen_dir, ref.path), config)
        if to.connection is not None:
            run_id = tasks.log_frozen_graph_to_mlflow(to.connection, run_id, frozen, run_name=run_name)
            registered = tasks.register_model_version(
                exported,
                to.registered_model_name,
                to.connection,
                checkpoint=ref,
                frozen=frozen,
                run_id=run_id,
                data=source,
                serving=to.gate.serving,
                tags=dict(version_tags or {}),
            )
    if registered is not None and registered.gate is None and to.connection is not None:
        decision = tasks.gate_champion(registered, to.connection, to.gate, data=source, head=config.head, decision=to.decision)
        registered = registered.model_copy(update={"gate": decision, "aliases": version_aliases(registered, to.connection)})
        publish_gate_decision(decision, registered, context=gate_context)
        if decision.promoted and decision.state != "already_champion":
            moves = to.connection.retrying("reading the alias history", _alias_history, to.connection, registered.name)
            publish_alias_history(registered.name, moves)
    if registered is not None and to.aliases:
        registered = tasks.set_model_version_aliases(registered, list(to.aliases), to.connection)
    return Shipped(
        checkpoint=ref,
        selection=selection,
        export=exported,
        frozen_graph=frozen,
        registered=registered,
        flow_run_id=current_flow_run_id(),
    )


def _alias_history(connection: MlflowConfig, name: str) -> list:
    from prefect_tensorflow.tasks.registry.aliases import alias_history

    return alias_history(connection.client(), name)


def publish_shipped(result: TrainResult, shipped: Shipped) -> None:
    """The Prefect artifacts of a shipped training: checkpoint table, training summary, MLflow links."""
    publish_checkpoint_table(result.model_dir, shipped.checkpoint)
    publish_training_summary(
        result, shipped.checkpoint, shipped.selection, shipped.frozen_graph, shipped.export, shipped.registered
    )
    if shipped.registered is not None:
        publish_mlflow_links(shipped.registered)
