"""A served runner that looks for new runs often without writing to the Prefect database as often.

Prefect's runner asks `POST /deployments/get_scheduled_flow_runs` every `query_seconds`, and the
server answers that request with a write: it marks the deployments ready (`status`, `last_polled`).
`serve` polls every 0.5 s (warm runs) or 2 s so that a press of Run starts soon; at 0.5 s that is two
writes a second. On a SQLite-backed Prefect server (serve's own local server, `prefect server start`
by default) a write that lands between another request's read and its write fails that request with
503 Service Unavailable (SQLite's BUSY_SNAPSHOT: Prefect opens those transactions deferred). The UI's
"Resume" of a paused run answered 503 that way beside a warm serve.

`probe_before_poll` makes the runner ask a read first (`POST /flow_runs/filter`: is any run of these
deployments scheduled to start?) and send the writing poll only when the read finds one, or when the
last writing poll is `full_poll_seconds` old (Prefect's own default poll, 10 s: the deployments stay
"Ready"), or when the read fails (the writing poll then answers, with the quarantine of
`unreadable_runs` around it). A run is found as soon as before; the writes are those of a runner
polling at Prefect's default.

Example:
    >>> from prefect_tensorflow.flows.poll_probe import FULL_POLL_SECONDS
    >>> FULL_POLL_SECONDS
    10.0
"""

from __future__ import annotations

import time
from typing import Any, Optional
from uuid import UUID

import httpx
from prefect.logging import get_logger

FULL_POLL_SECONDS = 10.0
"""How old the last writing poll may grow while the read finds nothing (Prefect's default poll)."""

logger = get_logger("prefect_tensorflow.poll_probe")


def probe_before_poll(client: Any, full_poll_seconds: float = FULL_POLL_SECONDS) -> bool:
    """Wrap `client.get_scheduled_flow_runs_for_deployments` (the runner's poll) so that it asks a read-only
    query first and answers `[]` without polling while the read finds no scheduled run and the last
    writing poll is younger than `full_poll_seconds`. Returns False (and changes nothing) when the client
    has no such method."""
    original = getattr(client, "get_scheduled_flow_runs_for_deployments", None)
    if original is None:
        return False
    last_poll = [float("-inf")]

    async def get_scheduled_flow_runs_for_deployments(
        deployment_ids: list[UUID], scheduled_before: Any = None, limit: Optional[int] = None
    ) -> Any:
        if time.monotonic() - last_poll[0] < full_poll_seconds:
            try:
                if not await any_scheduled(client, deployment_ids, scheduled_before):
                    return []
            except (httpx.HTTPError, ValueError) as err:  # the writing poll below answers, and reports, this too
                logger.debug("The read-only probe for scheduled runs failed (%s): polling", err)
        last_poll[0] = time.monotonic()
        return await original(deployment_ids, scheduled_before=scheduled_before, limit=limit)

    get_scheduled_flow_runs_for_deployments.__dict__.update(original.__dict__)  # keeps the quarantine's mark
    get_scheduled_flow_runs_for_deployments.probes_first = True  # type: ignore[attr-defined]
    client.get_scheduled_flow_runs_for_deployments = get_scheduled_flow_runs_for_deployments
    return True


async def any_scheduled(client: Any, deployment_ids: list[UUID], scheduled_before: Any = None) -> bool:
    """Whether a run of one of `deployment_ids` is Scheduled to start before `scheduled_before` (any time when
    None): the runner poll's own filter, asked through `POST /flow_runs/filter`, which writes nothing."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterNextScheduledStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    if not deployment_ids:
        return False
    runs = await client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=list(deployment_ids))),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
            next_scheduled_start_time=FlowRunFilterNextScheduledStartTime(before_=scheduled_before),
        ),
        limit=1,
    )
    return bool(runs)
