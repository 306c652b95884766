"""The served runner's poll: a read-only probe every `query_seconds`, the writing poll only when it finds a run.

Through a real Prefect API (`prefect_api`): a deployment with no scheduled run is probed without a
writing poll (`POST /deployments/get_scheduled_flow_runs`, which marks the deployment ready: a write
that made the UI's Resume answer 503 on SQLite beside a warm serve); a run created from it is found by
the next probe and handed to the runner by a writing poll; a writing poll still goes out once the last
one is `full_poll_seconds` old; and `serve`'s runner installs the probe when it polls faster than that.
"""

from __future__ import annotations

import asyncio
import time

import pytest


async def _deployment(client, name: str):
    flow_id = await client.create_flow_from_name(f"probe-{name}")
    return await client.create_deployment(flow_id=flow_id, name=name)


def test_the_probe_sends_the_writing_poll_only_for_a_scheduled_run_or_when_it_is_due(prefect_api):
    from prefect.client.orchestration import get_client

    from prefect_tensorflow.flows.poll_probe import probe_before_poll

    async def scenario() -> dict:
        async with get_client() as client:
            deployment_id = await _deployment(client, "probed")
            writing_polls = []
            original = client.get_scheduled_flow_runs_for_deployments

            async def counted(deployment_ids, scheduled_before=None, limit=None):
                writing_polls.append(time.monotonic())
                return await original(deployment_ids, scheduled_before=scheduled_before, limit=limit)

            client.get_scheduled_flow_runs_for_deployments = counted
            assert probe_before_poll(client, full_poll_seconds=3.0)
            poll = client.get_scheduled_flow_runs_for_deployments
            seen = {"first": await poll([deployment_id])}  # nothing polled yet: a writing poll
            seen["idle"] = [await poll([deployment_id]) for _ in range(5)]
            seen["idle_writes"] = len(writing_polls)
            run = await client.create_flow_run_from_deployment(deployment_id)
            seen["found"] = [r.id for r in await poll([deployment_id])]
            seen["found_writes"] = len(writing_polls)
            seen["run"] = run.id
            await client.delete_flow_run(run.id)
            await poll([deployment_id])  # due again only after 3 s
            seen["before_due"] = len(writing_polls)
            await asyncio.sleep(3.2)
            await poll([deployment_id])
            seen["after_due"] = len(writing_polls)
            seen["other_deployment"] = await poll([await _deployment(client, "other")])
            return seen

    seen = asyncio.run(scenario())
    assert seen["first"] == [] and seen["idle"] == [[]] * 5
    assert seen["idle_writes"] == 1, "an idle probe sent the writing poll"
    assert seen["found"] == [seen["run"]], "the scheduled run was not handed to the runner on the next poll"
    assert seen["found_writes"] == 2
    assert seen["before_due"] == 2 and seen["after_due"] == 3, "the writing poll did not go out once due"
    assert seen["other_deployment"] == []


@pytest.mark.parametrize("query_seconds, probes", [(0.5, True), (10, False)])
def test_serve_runner_probes_when_it_polls_faster_than_prefects_default(prefect_api, query_seconds, probes):
    from prefect_tensorflow.flows.unreadable_runs import QuarantiningRunner

    async def enter() -> tuple[bool, bool]:
        runner = QuarantiningRunner(name=f"probe-check-{query_seconds}", limit=1, query_seconds=query_seconds)
        async with runner:
            poll = runner._client.get_scheduled_flow_runs_for_deployments
            return getattr(poll, "probes_first", False), getattr(poll, "guards_unreadable_runs", False)

    probed, guarded = asyncio.run(enter())
    assert probed is probes
    assert guarded, "the probe hid the quarantine of unreadable runs"
