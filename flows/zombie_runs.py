"""Zombie-run detection: flow runs send heartbeats, and a run that falls silent is marked Crashed.

A flow run whose process died with its worker (the machine, an OOM kill of the
container) stays Running forever: nobody is left to report its end. The flow
engine sends a `prefect.flow-run.heartbeat` event every
`PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds (`HEARTBEAT_SECONDS`, the least
Prefect accepts, set by `serve` and in prefect.yaml's work pool environment), and
the automation Prefect documents for zombie flows ("detect zombie flows") marks a
run of the project's deployments (tag `prefect-tensorflow`) Crashed when neither
a heartbeat nor a final state follows a heartbeat within
`PREFECT_TENSORFLOW_ZOMBIE_AFTER_SECONDS` (default 90: three missed heartbeats).
Its Crashed event then starts the resubmission (`flows.resubmission`).
`serve` and `deployments/deploy.py` create or update it (`ensure_zombie_automation`).

Example:
    >>> automation = zombie_automation(90)
    >>> automation.name, automation.trigger.posture.value, automation.trigger.within.total_seconds()
    ('prefect-tensorflow: crash runs without heartbeats', 'Proactive', 90.0)
    >>> automation.actions[0].type, automation.actions[0].state.value
    ('change-flow-run-state', 'CRASHED')
"""

from __future__ import annotations

import os
from typing import Any
from uuid import UUID

AUTOMATION_NAME = "prefect-tensorflow: crash runs without heartbeats"
HEARTBEAT_SECONDS = 30  # Prefect's minimum (flows.heartbeat_frequency, ge=30)
PROJECT_TAG = "prefect-tensorflow"
FINAL_EVENTS = ("prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed")


def zombie_automation(within_seconds: float) -> Any:
    """The automation (not yet created) that marks a silent run of the project's deployments Crashed."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return AutomationCore(
        name=AUTOMATION_NAME,
        description="Marks a flow run of prefect-tensorflow's deployments Crashed when its heartbeats stop "
        "(its process died with its worker); a crashed training run is then resubmitted.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *FINAL_EVENTS},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.id": f"prefect.tag.{PROJECT_TAG}"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                name="Crashed",
                state=StateType.CRASHED,
                message=f"No heartbeat for {within_seconds:g} s: the flow-run process or its worker died "
                "(marked by the zombie-run automation)",
                force=False,
            )
        ],
    )


def ensure_zombie_automation(client: Any, within_seconds: float) -> UUID:
    """Create the automation on the API `client` (a sync Prefect client) talks to, or update the one that
    exists by that name; its id."""
    automation = zombie_automation(within_seconds)
    found = client.read_automations_by_name(AUTOMATION_NAME)
    if found:
        client.update_automation(found[0].id, automation)
        return found[0].id
    return client.create_automation(automation)


def heartbeat_seconds() -> int:
    """The flow runs' heartbeat period: `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` when the environment sets it,
    else `HEARTBEAT_SECONDS` (what `serve` gives its flow runs).

    Example:
        >>> "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" in os.environ or heartbeat_seconds() == 30
        True
    """
    for name in ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY"):
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return HEARTBEAT_SECONDS


def check_zombie_window(within_seconds: float, heartbeat: int) -> None:
    """Refuse a silence window that a live run's heartbeat period does not fit in (it would crash live runs).

    Raises:
        ValueError: `within_seconds` is not longer than `heartbeat`.
    """
    if within_seconds <= heartbeat:
        raise ValueError(
            f"PREFECT_TENSORFLOW_ZOMBIE_AFTER_SECONDS: expected more than the heartbeat period "
            f"(PREFECT_FLOWS_HEARTBEAT_FREQUENCY={heartbeat}), received {within_seconds:g}: live runs would be marked Crashed"
        )
