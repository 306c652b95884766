"""Served `export-checkpoint` runs forked from the warm template (`flows/warm_runs.py`), against a real server.

One `prefect server start` and one `prefect-tensorflow serve` for the module (`served.ServedDeployments`),
runs created as the UI's Run form does. Resubmission of crashed runs is off here (a killed run must stay
the one run this module looks at).
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from helpers import pid_alive
from served import ServedDeployments

pytestmark = pytest.mark.slow
FORKED = re.compile(r"Flow run ([0-9a-f-]{36}): forked from the warm template \(pid (\d+), template (\d+)\)")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, prefect_database, trained_dir):
    root = tmp_path_factory.mktemp("warm-path")
    environ = ServedDeployments.environ_for(
        root,
        PREFECT_TENSORFLOW_HOME=str(root / "data"),
        PREFECT_TENSORFLOW_ROOTS=f"{root / 'data'},{trained_dir}",
        PREFECT_TENSORFLOW_RESUBMIT_CRASHED="0",
        MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow/mlflow.db",
    )
    served = ServedDeployments(root, environ, database=prefect_database)
    try:
        served.start_server()
        served.start_serve()
        yield served
    finally:
        served.stop()


def _parameters(trained_dir: Path, name: str, **extra) -> dict:
    return {"model_dir": str(trained_dir), "checkpoint": "latest", "registered_model_name": name, "model": "iris", **extra}


def _fork_pids(stack: ServedDeployments, run_id: str, timeout: float = 300) -> tuple[int, int]:
    """(the pid of `run_id`'s forked process, the pid of the template it was forked from), once serve's log says so."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for found, child, template in FORKED.findall(stack.serve_log.read_text(errors="replace")):
            if found == run_id:
                return int(child), int(template)
        time.sleep(0.05)
    pytest.fail(f"run {run_id} was not forked from the warm template:\n{stack.serve_log.read_text()[-3000:]}")


def _forked(stack: ServedDeployments, run_id: str, timeout: float = 300) -> int:
    """The pid of the template serve forked `run_id`'s process from, once its log says so."""
    return _fork_pids(stack, run_id, timeout)[1]


def _processes_naming(run_id: str) -> list[int]:
    """Processes started with PREFECT__FLOW_RUN_ID=`run_id` in their environment (what a warm run spawns, e.g.
    its serving check's template; the forked run itself keeps the template's environment block)."""
    needle = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0") and pid_alive(int(environ.parent.name)):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def _descendants(pid: int) -> list[int]:
    """The live processes below `pid` (children, theirs, ...), from /proc's parent pids."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = parents.get(todo.pop(), [])
        found += below
        todo += below
    return found


def test_a_ui_run_is_forked_warm_checked_first_and_registers(stack, trained_dir):
    import mlflow

    with stack.api() as client:
        bad = stack.create_run(client, "export-checkpoint", _parameters(trained_dir, "warm-bad", model_dir="/etc"))
        good = stack.create_run(client, "export-checkpoint", _parameters(trained_dir, "warm-iris", aliases=["staging"]))
        runs = stack.wait(client, [bad, good], timeout=600, poll=0.5)
    _forked(stack, bad, timeout=1)
    _forked(stack, good, timeout=1)
    assert runs[bad].state.is_failed() and "model_dir" in runs[bad].state.message, runs[bad].state
    assert runs[good].state.is_completed(), f"{runs[good].state}\n{stack.serve_log.read_text()[-3000:]}"
    registry = mlflow.MlflowClient(stack.environ["MLFLOW_TRACKING_URI"])
    version = registry.get_model_version_by_alias("warm-iris", "staging")
    assert version.tags["prefect.flow_run_id"] == good


def test_killing_the_template_mid_run_crashes_that_run_and_the_next_run_gets_a_new_one(stack, trained_dir):
    with stack.api() as client:
        doomed = stack.create_run(client, "export-checkpoint", _parameters(trained_dir, "warm-killed"))
        template = _forked(stack, doomed)
        os.kill(template, signal.SIGKILL)
        runs = stack.wait(client, [doomed], timeout=300, poll=0.5)
        assert runs[doomed].state.is_crashed(), runs[doomed].state
        assert "-9" in (runs[doomed].state.message or ""), runs[doomed].state.message

        after = stack.create_run(client, "export-checkpoint", _parameters(trained_dir, "warm-after"))
        assert _forked(stack, after) != template
        runs = stack.wait(client, [after], timeout=600, poll=0.5)
    assert runs[after].state.is_completed(), f"{runs[after].state}\n{stack.serve_log.read_text()[-3000:]}"


def test_changed_code_is_not_run_by_the_old_template(stack, trained_dir):
    import prefect_tensorflow.flows.warm_runs_main as program

    with stack.api() as client:
        first = stack.create_run(client, "export-checkpoint", _parameters(trained_dir, "warm-code-1", model_dir="/etc"))
        old = _forked(stack, first)
        stack.wait(client, [first], timeout=300, poll=0.5)
        os.utime(program.__file__)  # what an upgrade does to the installed files
        second = stack.create_run(client, "export-checkpoint", _parameters(trained_dir, "warm-code-2", model_dir="/etc"))
        new = _forked(stack, second)
        runs = stack.wait(client, [second], timeout=300, poll=0.5)
    assert new != old
    assert "the installed code changed" in stack.serve_log.read_text()
    assert runs[second].state.is_failed() and "model_dir" in runs[second].state.message
    deadline = time.monotonic() + 30  # the old template had no run left: it is stopped
    while os.path.exists(f"/proc/{old}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{old}") or "Z" in Path(f"/proc/{old}/stat").read_text().split()[2]


def test_cancelling_a_warm_run_ends_it_cancelled_and_the_template_forks_the_next(stack, trained_dir):
    """Cancel as the UI does (the run set to CANCELLING) while the forked run works: the run ends Cancelled,
    its process and what it started are gone, nothing half-written is left in its export and frozen dirs,
    and the same template forks the next run, which registers."""
    from prefect.states import Cancelling

    data = Path(stack.environ["PREFECT_TENSORFLOW_HOME"])
    with stack.api() as client:
        run_id = stack.create_run(client, "export-checkpoint", _parameters(trained_dir, "warm-cancelled"))
        child, template = _fork_pids(stack, run_id)
        deadline = time.monotonic() + 120
        while not client.read_flow_run(run_id).state.is_running():
            assert time.monotonic() < deadline, client.read_flow_run(run_id).state
            time.sleep(0.1)
        started = _descendants(child)  # its serving template at least, forked before the run began
        assert started, "the running warm run has no serving template of its own"
        client.set_flow_run_state(run_id, Cancelling(message="cancelled from the test"))
        runs = stack.wait(client, [run_id], timeout=120, poll=0.2)
        assert runs[run_id].state.is_cancelled(), f"{runs[run_id].state}\n{stack.serve_log.read_text()[-3000:]}"
        deadline = time.monotonic() + 30
        left = lambda: [p for p in started if pid_alive(p)] + _processes_naming(run_id)  # noqa: E731
        while (pid_alive(child) or left()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not pid_alive(child), "the cancelled run's forked process is still running"
        assert left() == [], "processes the cancelled run started are left"
        half_done = [
            p
            for d in ("exports", "frozen")
            for p in (data / d).glob("warm-cancelled/**/*")
            if "_temp" in p.name or p.name.endswith(".tmp")
        ]
        assert half_done == []
        assert pid_alive(template), "cancelling a run took the warm template down"

        after = stack.create_run(client, "export-checkpoint", _parameters(trained_dir, "warm-after-cancel"))
        assert _forked(stack, after) == template
        runs = stack.wait(client, [after], timeout=600, poll=0.5)
    assert runs[after].state.is_completed(), f"{runs[after].state}\n{stack.serve_log.read_text()[-3000:]}"
