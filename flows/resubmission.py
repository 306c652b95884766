"""The `resubmit-crashed` flow: a crashed training run starts again by itself, resuming its checkpoints.

The `resubmit-crashed` deployment (prefect.yaml) runs on every
`prefect.flow-run.Crashed` event of a run tagged `prefect-tensorflow` (the flow-run
process was killed, or the zombie-run automation of `flows.zombie_runs` found it
silent). It reads the crashed run (flow, deployment, tags, state history, logs),
applies the policy of `tasks.resubmission_policy` and, when it says so, creates a
new run of the same deployment with the same parameters, tagged `attempt:<k>` and
`resubmission-of:<crashed run id>`. The training of that run resumes from the
model dir's newest valid checkpoint, as every training does. The decision and
its reason are logged and published as the run's `resubmission` artifact; a
second event for the same crash finds the run made for the first ("not
resubmitted again"; two at the same moment: the request's idempotency key
returns the same run), never a second one. If the crashed run's process is in
fact still alive (its heartbeats were lost, not its process), the new run finds
the model dir's trainer lease held and fails naming the holder: two attempts
never train one model dir at once.

Example:
    >>> from prefect_tensorflow.flows.resubmission import resubmit_crashed
    >>> resubmit_crashed.name
    'resubmit-crashed'
"""

from __future__ import annotations

from typing import Any, Optional
from uuid import UUID

from prefect import flow
from pydantic import BaseModel

from prefect_tensorflow.tasks.resubmission_policy import (
    RESUBMISSION_OF_TAG,
    CrashedRun,
    ResubmissionDecision,
    decide_resubmission,
    resubmitted_parameters,
    training_target,
)
from prefect_tensorflow.tasks.run_context import get_logger
from prefect_tensorflow.tasks.settings import get_settings

RESOURCE_PREFIX = "prefect.flow-run."


class Resubmission(BaseModel):
    """What `resubmit-crashed` decided for one crashed run."""

    crashed_run_id: str
    resubmit: bool
    reason: str
    new_run_id: Optional[str] = None
    attempt: Optional[int] = None


def parse_flow_run_id(value: str) -> UUID:
    """A flow run id, bare or as the event's resource id (`prefect.flow-run.<id>`).

    Raises:
        ValueError: not a flow run id (naming the parameter and the value).

    Example:
        >>> str(parse_flow_run_id("prefect.flow-run.6a0c2e43-5d0a-4b8e-9a3e-0f7f2f6b2a10"))
        '6a0c2e43-5d0a-4b8e-9a3e-0f7f2f6b2a10'
    """
    try:
        return UUID(value.removeprefix(RESOURCE_PREFIX))
    except (ValueError, AttributeError) as err:
        raise ValueError(f"flow_run_id: expected a flow run id (or prefect.flow-run.<id>), received {value!r}") from err


def read_crashed_run(client: Any, run_id: UUID) -> tuple[CrashedRun, Any]:
    """The facts the policy needs about run `run_id`, and the run itself (a sync Prefect client)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.objects import StateType

    run = client.read_flow_run(run_id)
    flow_name = client.read_flow(run.flow_id).name
    history = client.read_flow_run_states(run_id)
    cancelled = any(state.type == StateType.CANCELLING for state in history)
    started = any(state.type == StateType.RUNNING for state in history)
    tag = FlowRunFilterTags(all_=[f"{RESUBMISSION_OF_TAG}{run_id}"])
    earlier = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=tag), limit=1)
    return (
        CrashedRun(
            run_id=str(run.id),
            flow_name=flow_name,
            deployment_id=str(run.deployment_id) if run.deployment_id else None,
            state_type=run.state.type.value if run.state else "UNKNOWN",
            tags=tuple(run.tags or ()),
            cancelled=cancelled,
            started=started,
            resubmitted_as=str(earlier[0].id) if earlier else None,
        ),
        run,
    )


def logged_training_target(client: Any, run_id: UUID) -> Optional[int]:
    """The target step the run's training logged (`training from step S to target step T`), if it did."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTextSearch

    logs = client.read_logs(
        LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]), text=LogFilterTextSearch(query='"target step"')), limit=200
    )
    return training_target(log.message for log in logs)


def resubmit(client: Any, crashed: CrashedRun, run: Any, decision: ResubmissionDecision) -> tuple[str, str]:
    """Create the new run of the crashed run's deployment (idempotent per crashed run); its id and a note
    on its parameters."""
    parameters = dict(run.parameters or {})
    target = None
    note = "same parameters"
    if isinstance(parameters.get("training"), dict) and parameters["training"].get("more_steps") is not None:
        target = logged_training_target(client, UUID(crashed.run_id))
        note = (
            f"same parameters, training.more_steps replaced by the crashed run's target step {target}"
            if target is not None
            else "same parameters (the crashed run logged no target step: more_steps counts from the newest checkpoint)"
        )
    assert crashed.deployment_id is not None
    new = client.create_flow_run_from_deployment(
        UUID(crashed.deployment_id),
        parameters=resubmitted_parameters(parameters, target),
        tags=list(decision.tags),
        idempotency_key=f"{RESUBMISSION_OF_TAG}{crashed.run_id}",
    )
    return str(new.id), note


def publish_resubmission(answer: Resubmission, crashed_name: str) -> None:
    """The decision as the run's `resubmission` markdown artifact (what the UI's Artifacts tab shows)."""
    from prefect.artifacts import create_markdown_artifact

    new = f"\n- new run: `{answer.new_run_id}` (attempt {answer.attempt})" if answer.new_run_id else ""
    create_markdown_artifact(
        key="resubmission",
        markdown=f"# Crashed run `{crashed_name}`\n\n- run id: `{answer.crashed_run_id}`\n- decision: {answer.reason}{new}\n",
        description=f"resubmission of crashed run {crashed_name}",
    )


@flow(name="resubmit-crashed", flow_run_name="resubmit-crashed-{flow_run_id}", log_prints=True)
def resubmit_crashed(flow_run_id: str) -> Resubmission:
    """Resubmit a crashed run of a training deployment, if the policy (`PREFECT_TENSORFLOW_RESUBMIT_CRASHED`)
    allows it, as a new run of the same deployment with the same parameters.

    Args:
        flow_run_id: The crashed run: its id, or its event's resource id (`prefect.flow-run.<id>`, what the
            deployment's trigger passes).

    Raises:
        ValueError: `flow_run_id` is not a flow run id.
    """
    from prefect.client.orchestration import get_client

    run_id = parse_flow_run_id(flow_run_id)
    with get_client(sync_client=True) as client:
        crashed, run = read_crashed_run(client, run_id)
        decision = decide_resubmission(crashed, get_settings().resubmit_crashed)
        answer = Resubmission(crashed_run_id=str(run_id), resubmit=decision.resubmit, reason=decision.reason)
        if decision.resubmit:
            new_id, note = resubmit(client, crashed, run, decision)
            answer = answer.model_copy(
                update={"new_run_id": new_id, "attempt": decision.attempt, "reason": f"{decision.reason} as run {new_id}; {note}"}
            )
    get_logger().info("crashed run %s (%s): %s", run.name, run_id, answer.reason)
    publish_resubmission(answer, run.name)
    return answer
