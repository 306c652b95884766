"""The sweep's own LocalCluster workers skip Python's teardown once closed; their tasks' logs still reach Prefect."""

from __future__ import annotations

import os
import time
import uuid
import weakref
from pathlib import Path

from helpers import pid_alive
from prefect import flow, get_run_logger, task

from prefect_tensorflow.flows.sweep import dask_task_runner
from prefect_tensorflow.tasks.training import sweep_worker_exit

_kept: list[object] = []


class _Alive:
    pass


def _mark_at_teardown(path: str) -> int:
    """On a worker: write `path` when Python's teardown runs weakref's exit finalizers (skipped by `os._exit`)."""
    anchor = _Alive()
    _kept.append(anchor)  # alive until teardown
    weakref.finalize(anchor, Path(path).write_text, "torn down")
    return os.getpid()


@task
def log_marker(marker: str) -> int:
    get_run_logger().info("worker says %s", marker)
    return os.getpid()


@flow
def run_on_the_sweeps_cluster(marker: str, teardown_marker: str) -> list[int]:
    with dask_task_runner(None, 1) as runner:
        runner.client.run(_mark_at_teardown, teardown_marker)
        future = runner.submit(log_marker, parameters={"marker": marker})
        return [future.result()]


def test_a_closed_sweep_worker_exits_without_teardown_and_its_task_logs_reached_the_api(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    marker, teardown = f"marker-{uuid.uuid4().hex}", tmp_path / "teardown.txt"
    state = run_on_the_sweeps_cluster(marker, str(teardown), return_state=True)
    assert state.is_completed()
    (worker_pid,) = state.result()
    deadline = time.monotonic() + 30
    while pid_alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(worker_pid)
    assert not teardown.exists(), "the worker went through Python's teardown"
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        messages = [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))]
        deadline = time.monotonic() + 30  # the server records task runs from the worker's events as they arrive
        while True:
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            states = [run.state.type.value if run.state else None for run in task_runs]
            if states == ["COMPLETED"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert any(marker in message for message in messages), messages
    assert states == ["COMPLETED"]  # the worker's task-run state events were sent before it exited


def test_a_worker_that_did_not_close_keeps_pythons_teardown():
    class Running:
        status = "running"

    keep = Running()
    assert sweep_worker_exit.exit_if_closed(weakref.ref(keep)) is None  # returned: no os._exit
    gone = Running()
    ref = weakref.ref(gone)
    del gone
    assert sweep_worker_exit.exit_if_closed(ref) is None
