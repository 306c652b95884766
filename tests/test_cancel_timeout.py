"""Cancel and timeout of long trainings through a real `prefect server` and `prefect-tensorflow serve`.

One server and one serve for the module (`ServedDeployments`, seeded with the migrated database). A
`retrain-iris` run cancelled as the UI cancels (the run set to CANCELLING) saves a checkpoint, stops its
evaluator and ends Cancelled; the next run resumes from that checkpoint. A `workers=2` training and a
sweep cancelled leave no process behind. A served flow with a short `timeout_seconds` ends TimedOut
with a checkpoint saved at the stop.
"""

from __future__ import annotations

import datetime
import glob
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from served import ServedDeployments

from prefect_tensorflow.tasks.checkpoints.selection import list_checkpoints, select_latest_checkpoint
from prefect_tensorflow.tasks.child_processes import log_tail, stop_process_group
from prefect_tensorflow.tasks.configs import TrainingConfig
from prefect_tensorflow.tasks.training.loop import train_with_checkpoints

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
STOP_BOUND_SECONDS = 10.0
"""Cancel to the flow-run engine done: the stop at the next step, one checkpoint write, the evaluator stopped,
at most 2 s for the metric sender (measured ~4 s on 2 cores at load 9)."""
FINAL_BOUND_SECONDS = 30.0
"""Cancel to Cancelled: then the process exits (TensorFlow's teardown) and Prefect's runner, which looks every
3 s, records Cancelled; 30 s is the runner's grace before it SIGKILLs (measured 6-16 s at load 9)."""
LONG_TRAINING = {"more_steps": 10_000_000, "policy": {"save_checkpoints_steps": 500, "save_checkpoints_secs": None}}


@pytest.fixture(scope="module")
def served(tmp_path_factory, prefect_database):
    root = tmp_path_factory.mktemp("cancel")
    (root / "tmp").mkdir()
    environ = ServedDeployments.environ_for(
        root,
        PREFECT_TENSORFLOW_HOME=str(root / "data"),
        MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db",
        TMPDIR=str(root / "tmp"),  # what the runs leave in $TMPDIR is checked
        PYTHONPATH=str(TESTS),
    )
    deployments = ServedDeployments(root, environ, limit=2, database=prefect_database)
    deployments.start_server()
    try:
        deployments.start_serve()
        yield deployments
    finally:
        deployments.stop()


def processes_of(run_id: str) -> list[str]:
    """`pid command` of every process whose environment names flow run `run_id` (the runner sets
    PREFECT__FLOW_RUN_ID; every child of the flow-run process inherits it)."""
    found = []
    needle = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    for environ in glob.glob("/proc/[0-9]*/environ"):
        try:
            with open(environ, "rb") as handle:
                if needle not in handle.read().split(b"\0"):
                    continue
            with open(environ.replace("environ", "cmdline"), "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append(f"{environ.split('/')[2]} {command[:160]}")
    return found


def checkpoints_in(model_dir: Path) -> list:
    return list_checkpoints(str(model_dir)) if (model_dir / "checkpoint").exists() else []


def wait_for(condition, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} after {timeout} s:\n{log_tail(str(log))}")
        time.sleep(0.2)


def cancel_and_wait(served: ServedDeployments, client, run_id: str) -> tuple[object, float, float]:
    """Cancel as the UI does (the run set to CANCELLING); its final state, the seconds until the flow-run
    engine was done (its log line "Flow run was cancelled.") and until the final state."""
    from prefect.states import Cancelling

    started, wall = time.monotonic(), datetime.datetime.now()
    client.set_flow_run_state(run_id, Cancelling(message="cancelled from the test"))
    run = served.wait(client, [run_id], 120, poll=0.2)[run_id]
    final = time.monotonic() - started
    stamps = re.findall(r"^(\d\d):(\d\d):(\d\d\.\d+) \| INFO .* - Flow run was cancelled\.$", served.serve_log.read_text(), re.M)
    hours, minutes, seconds = stamps[-1] if stamps else ("99", "0", "0")
    done = (int(hours) * 3600 + int(minutes) * 60 + float(seconds)) - (
        wall.hour * 3600 + wall.minute * 60 + wall.second + wall.microsecond / 1e6
    )
    return run.state, done % 86400, final


def assert_nothing_left(run_id: str, served: ServedDeployments, *dirs: Path) -> None:
    deadline = time.monotonic() + 10  # the runner reaps the process group a moment after the final state
    while processes_of(run_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(run_id) == [], "processes of the cancelled run are left"
    leftovers = [p for d in dirs for p in glob.glob(f"{d}/**/*", recursive=True) if "_temp" in p or p.endswith(".tmp")]
    assert leftovers == []
    assert glob.glob(f"{served.root / 'tmp'}/ptf-*") == []


def test_a_cancelled_retrain_saves_stops_everything_ends_cancelled_and_the_next_run_resumes(served):
    model_dir = served.root / "data" / "models" / "cancel"
    with served.api() as client:
        run_id = served.create_run(
            client, "retrain-iris", {"model_dir": str(model_dir), "training": LONG_TRAINING, "registered_model_name": "cancel"}
        )
        wait_for(lambda: len(checkpoints_in(model_dir)) >= 2, 300, "no periodic checkpoint", served.serve_log)
        assert any("sidecar_evaluator_main" in p for p in processes_of(run_id))
        periodic = max(ref.step for ref in list_checkpoints(str(model_dir)))
        state, stopped_after, final_after = cancel_and_wait(served, client, run_id)
        assert state.is_cancelled(), f"{state}: {state.message}\n{log_tail(str(served.serve_log))}"
        assert stopped_after < STOP_BOUND_SECONDS and final_after < FINAL_BOUND_SECONDS
        assert_nothing_left(run_id, served, model_dir)
        stopped = select_latest_checkpoint(str(model_dir), verify_checksums=True)
        # saved at the stop: the newest checkpoint is the step the log names (a stop that lands on a periodic step,
        # 1000 say, saves that one step once, so `step % 500 != 0` is not the sign of it)
        assert stopped.step is not None and stopped.step > periodic
        log = served.serve_log.read_text()
        assert f"flow run cancelled at step {stopped.step}: saving a checkpoint" in log
        import mlflow

        tracking = mlflow.MlflowClient(served.environ["MLFLOW_TRACKING_URI"])
        runs = tracking.search_runs([e.experiment_id for e in tracking.search_experiments()])
        assert [r.info.status for r in runs if r.data.params.get("model_dir") == str(model_dir)] == ["KILLED"]

    # The next training resumes from the checkpoint saved at the cancel (here in this process: the served
    # path to the training is the one above).
    result = train_with_checkpoints(str(model_dir), TrainingConfig(more_steps=20, evaluation="none"))
    assert (result.start_step, result.final_step) == (stopped.step, stopped.step + 20)


def test_a_cancelled_two_worker_training_leaves_no_supervisor_or_worker_and_ends_cancelled(served):
    model_dir = served.root / "data" / "models" / "two-workers"
    training = {**LONG_TRAINING, "workers": 2, "evaluation": "none"}
    with served.api() as client:
        run_id = served.create_run(client, "retrain-iris", {"model_dir": str(model_dir), "training": training, "track": False})
        wait_for(lambda: len(checkpoints_in(model_dir)) >= 2, 300, "no periodic checkpoint", served.serve_log)
        running = processes_of(run_id)
        assert any("multi_worker_main supervise" in p for p in running) and sum(" worker " in p for p in running) == 2
        state, _, final_after = cancel_and_wait(served, client, run_id)
        assert state.is_cancelled(), f"{state}: {state.message}\n{log_tail(str(served.serve_log))}"
        assert final_after < FINAL_BOUND_SECONDS
        assert_nothing_left(run_id, served, model_dir)
        select_latest_checkpoint(str(model_dir), verify_checksums=True)  # what was committed restores


def test_a_cancelled_sweep_checkpoints_its_candidates_leaves_no_trainer_and_ends_cancelled(served):
    sweep_root = served.root / "data" / "sweeps" / "cancel"
    candidates = [{"hparams": {"learning_rate": 0.05}, "seed": 0}, {"hparams": {"learning_rate": 0.1}, "seed": 0}]
    parameters = {
        "sweep_root": str(sweep_root),
        "candidates": candidates,
        "training": {"steps": 10_000_000, "evaluation": "none", "policy": LONG_TRAINING["policy"]},
        "dask_workers": 2,
        "track": False,
    }
    with served.api() as client:
        deadline = time.monotonic() + 120  # serve creates its deployments one after another
        while "sweep-iris" not in served.deployments and time.monotonic() < deadline:
            served.deployments.update({d.name: str(d.id) for d in client.read_deployments()})
            time.sleep(0.5)
        run_id = served.create_run(client, "sweep-iris", parameters)
        wait_for(lambda: len(glob.glob(f"{sweep_root}/*/checkpoint")) == 2, 300, "no candidate checkpoints", served.serve_log)
        assert sum("sweep_trainer_main" in p for p in processes_of(run_id)) == 2
        state, _, final_after = cancel_and_wait(served, client, run_id)
        assert state.is_cancelled(), f"{state}: {state.message}\n{log_tail(str(served.serve_log))}"
        assert final_after < FINAL_BOUND_SECONDS
        assert_nothing_left(run_id, served, sweep_root)
    assert "sweep stopped: 2 trainer(s) saved a checkpoint and stopped" in served.serve_log.read_text()
    steps = [select_latest_checkpoint(model_dir, verify_checksums=True).step for model_dir in glob.glob(f"{sweep_root}/*/")]
    assert len(steps) == 2 and None not in steps, steps
    # Saved at the stop: off the every-500 grid. A stop that lands just after a periodic save has nothing newer to
    # save (seen once on a loaded machine: step 500), so one candidate of the two is enough to show the stop's save.
    assert any(step % 500 for step in steps), steps


TIMED_FLOW = """
import sys
from prefect import flow
from prefect_tensorflow.tasks import TrainingConfig, prefect_tasks

@flow(name="timed-training", timeout_seconds=float(sys.argv[2]))
def timed_training(model_dir: str):
    config = TrainingConfig(more_steps=10_000_000, policy={"save_checkpoints_steps": 500, "save_checkpoints_secs": None})
    return prefect_tasks.train_with_checkpoints(model_dir, config)

timed_training(sys.argv[1])
"""


def test_a_flow_timeout_stops_the_training_with_a_checkpoint_and_the_run_ends_timed_out(served, tmp_path):
    """A flow run on the module's server whose `timeout_seconds` passes mid-training: Prefect's alarm stops
    the loop at the next step, a checkpoint is saved, the evaluator is stopped, the run ends TimedOut."""
    model_dir = tmp_path / "timed"
    script = tmp_path / "timed_flow.py"
    script.write_text(TIMED_FLOW)
    log = tmp_path / "timed_flow.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, str(script), str(model_dir), "40"],
            env=served.environ,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        process.wait(timeout=240)
    finally:
        stop_process_group(process, grace=5)
    output = log.read_text()
    assert process.returncode == 1, output[-3000:]
    match = re.search(r"timeout reached at step (\d+): saving a checkpoint", output)
    assert match, output[-3000:]
    stopped = select_latest_checkpoint(str(model_dir), verify_checksums=True)
    assert stopped.step == int(match.group(1))  # saved at the step the log names
    assert "Finished in state TimedOut('Flow run exceeded timeout of 40.0 second(s)', type=FAILED)" in output
    with served.api() as client:
        (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name(output)])))
    assert run.state.name == "TimedOut" and run.state.is_failed()
    deadline = time.monotonic() + 10
    while [p for p in running_commands() if str(model_dir) in p] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [p for p in running_commands() if str(model_dir) in p] == []  # the sidecar evaluator is gone
    leftovers = [p for p in glob.glob(f"{model_dir}/**/*", recursive=True) if "_temp" in p or p.endswith(".tmp")]
    assert leftovers == []


def run_name(output: str) -> str:
    (name,) = set(re.findall(r"Beginning flow run '([^']+)'", output))
    return name


def running_commands() -> list[str]:
    commands = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as handle:
                commands.append(handle.read().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return commands


class Raised(BaseException):
    """What the stand-in for Prefect's handlers raises."""


def test_the_guard_holds_a_timeouts_alarm_and_a_cancels_sigterm_until_the_block_ends():
    """No server, in this process: what the served tests rely on, signal by signal. Inside the guard a signal only sets `requested`;
    leaving the block sends it again to the handler that was there (Prefect's), and a cancel is told to
    Prefect's control listener first, so that its flow engine calls the SIGTERM a cancel."""
    import os
    import signal

    from prefect._internal import control_listener

    from prefect_tensorflow.tasks.training.preemption import PreemptionGuard

    def raise_it(signum, frame):
        raise Raised(signum)

    previous = {sig: signal.signal(sig, raise_it) for sig in (signal.SIGALRM, signal.SIGTERM)}
    try:
        for sig, cancelling, reason in (
            (signal.SIGALRM, False, "timed out"),
            (signal.SIGTERM, False, "preempted"),
            (signal.SIGTERM, True, "cancelled"),
        ):
            control_listener.clear_intent()
            held = False
            with pytest.raises(Raised):
                with PreemptionGuard(cancelling=lambda c=cancelling: c) as guard:
                    os.kill(os.getpid(), sig)
                    time.sleep(0.05)  # the handler runs here: it must not raise
                    assert guard.requested and guard.reason() == reason
                    held = True
            assert held  # raised when the block ended, not inside it
            assert control_listener.get_intent() == ("cancel" if cancelling else None)
            assert signal.getsignal(sig) is raise_it  # the previous handler is back
    finally:
        control_listener.clear_intent()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.mark.timeout(600, method="thread")  # pytest-timeout's own SIGALRM handler would make Prefect inject its timeout
def test_a_task_timeout_stops_the_training_with_a_checkpoint_and_the_task_ends_timed_out(served, tmp_path):
    """In this process (a flow on the module's server, no flow timeout): the training task's own
    `timeout_seconds` arms Prefect's alarm in the main thread; the loop stops at the next step with a
    checkpoint and the task run ends TimedOut."""
    from prefect import flow

    from prefect_tensorflow.tasks import prefect_tasks

    model_dir = tmp_path / "task-timeout"
    config = TrainingConfig(more_steps=10_000_000, evaluation="none", policy=LONG_TRAINING["policy"])

    @flow(name="task-timeout")
    def bounded_training():
        bounded = prefect_tasks.train_with_checkpoints.with_options(timeout_seconds=20)
        state = bounded(str(model_dir), config, return_state=True)
        return state.name, state.message

    with served.api():
        name, message = bounded_training()
    assert name == "TimedOut" and message == "Task run exceeded timeout of 20.0 second(s)"
    stopped = select_latest_checkpoint(str(model_dir), verify_checksums=True)
    assert stopped.step is not None and stopped.step > 0 and stopped.step % 500 != 0  # saved at the stop
