"""A crashed run continues by itself: real `prefect server`, real `prefect-tensorflow serve`, real SIGKILLs.

One chain of one served `retrain-iris` run: its flow-run process is SIGKILLed
mid-training (the runner marks it Crashed; `resubmit-crashed` starts attempt 2),
then attempt 2's whole serve process group is SIGKILLed (the machine died: nobody
reports the end, the zombie-run automation finds the heartbeats gone and marks
it Crashed), serve starts again and attempt 3 resumes and finishes with the
weights of a run that was never interrupted. The policy itself is tested
without Prefect below.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import cli_command, final_weights, lock_released
from served import ServedDeployments

from prefect_tensorflow.tasks.checkpoints.files import read_state_file, step_of
from prefect_tensorflow.tasks.checkpoints.selection import select_latest_checkpoint
from prefect_tensorflow.tasks.resubmission_policy import (
    CrashedRun,
    attempt_of,
    decide_resubmission,
    resubmitted_parameters,
    training_target,
)
from prefect_tensorflow.tasks.training.model_dir_lease import LOCK_FILE

STEPS = 1500
SAVE_EVERY = 50
ZOMBIE_AFTER = 45  # the test's window (the default is 90): heartbeats come every 30 s
TRAINING = {
    "model": "iris",
    "data": "iris",
    "more_steps": STEPS,  # the deployment's way: a resubmission must still end at the first run's target
    "batch_size": 16,
    "seed": 7,
    "policy": {"save_checkpoints_steps": SAVE_EVERY, "keep_checkpoint_max": 3},
}
NAMES = ("retrain-iris", "resubmit-crashed")


# --- the policy, without Prefect ------------------------------------------------------------------


def test_the_policy_resubmits_a_crash_up_to_the_bound_and_never_a_cancel():
    crash = CrashedRun(run_id="r1", flow_name="retrain", deployment_id="d", state_type="CRASHED", tags=("prefect-tensorflow",))
    first = decide_resubmission(crash, max_resubmissions=2)
    never_ran = decide_resubmission(CrashedRun("r0", "retrain", "d", "CRASHED", started=False), max_resubmissions=2)
    assert not never_ran.resubmit and "before its flow started running" in never_ran.reason  # nothing to resume
    assert (first.resubmit, first.attempt) == (True, 2)
    assert first.tags == ("prefect-tensorflow", "attempt:2", "resubmission-of:r1")
    second = CrashedRun(run_id="r2", flow_name="retrain", deployment_id="d", state_type="CRASHED", tags=first.tags)
    decided = decide_resubmission(second, max_resubmissions=2)
    assert (
        decided.tags == ("prefect-tensorflow", "attempt:3", "resubmission-of:r2") and "attempt 3 of at most 3" in decided.reason
    )
    last = CrashedRun(run_id="r3", flow_name="retrain", deployment_id="d", state_type="CRASHED", tags=decided.tags)
    assert not decide_resubmission(last, 2).resubmit and "attempt 3 was the last" in decide_resubmission(last, 2).reason
    refusals = {
        "policy is off": (crash, 0),
        "being cancelled": (CrashedRun("r", "retrain", "d", "CRASHED", cancelled=True), 2),
        "ended FAILED": (CrashedRun("r", "retrain", "d", "FAILED"), 2),
        "is not one of": (CrashedRun("r", "resubmit-crashed", "d", "CRASHED"), 2),
        "not created from a deployment": (CrashedRun("r", "sweep", None, "CRASHED"), 2),
        "already resubmitted as run x": (CrashedRun("r", "sweep", "d", "CRASHED", resubmitted_as="x"), 2),
    }
    for reason, (run, bound) in refusals.items():
        decision = decide_resubmission(run, bound)
        assert not decision.resubmit and reason in decision.reason, decision
    assert attempt_of(["attempt:2", "attempt:7", "attempt:"]) == 7
    lines = ["training from step 0 to target step 1500", "resumed from /m/model.ckpt-200 (step 200)"]
    assert training_target(lines) == 1500
    params = {"model_dir": "/m", "training": {"more_steps": 1500, "seed": 7}}
    assert resubmitted_parameters(params, training_target(lines)) == {
        "model_dir": "/m",
        "training": {"more_steps": None, "seed": 7, "steps": 1500},
    }
    assert params["training"]["more_steps"] == 1500  # the crashed run's parameters are not changed


# --- the real chain ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The weights of the same training, never interrupted (the CLI, in a process of its own, started
    before the servers and read at the end): a callable."""
    model_dir = tmp_path_factory.mktemp("reference") / "m"
    command = cli_command(
        "train", "--model-dir", model_dir, "--steps", STEPS, "--batch-size", 16, "--seed", 7,
        "--save-checkpoints-steps", SAVE_EVERY, "--keep-checkpoint-max", 3,
    )  # fmt: skip
    output = model_dir.parent / "train.log"
    with open(output, "w") as out:
        process = subprocess.Popen(command, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), stdout=out, stderr=subprocess.STDOUT)

    def weights() -> dict[str, np.ndarray]:
        assert process.wait(timeout=600) == 0, output.read_text()[-3000:]
        return final_weights(model_dir, STEPS)

    try:
        yield weights
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, prefect_database):
    """A Prefect server and `prefect-tensorflow serve` (its zombie window shortened to ZOMBIE_AFTER)."""
    root = tmp_path_factory.mktemp("resubmission")
    (root / "tmp").mkdir()
    environ = ServedDeployments.environ_for(
        root,
        PREFECT_TENSORFLOW_HOME=str(root / "data"),
        PREFECT_TENSORFLOW_ZOMBIE_AFTER_SECONDS=str(ZOMBIE_AFTER),
        PREFECT_TENSORFLOW_RESUBMIT_CRASHED="2",
        MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db",
        TMPDIR=str(root / "tmp"),
    )
    served = ServedDeployments(root, environ, limit=4, database=prefect_database)
    try:
        served.start_server()
        served.start_serve(names=NAMES)
        yield served
    finally:
        served.stop()


def committed_step(model_dir: Path) -> int:
    try:
        return step_of(read_state_file(model_dir).model_checkpoint_path) or 0
    except (FileNotFoundError, ValueError):
        return -1


def run_processes(run_ids: set[str]) -> list[psutil.Process]:
    """The live processes started for these flow runs (the runner gives each PREFECT__FLOW_RUN_ID)."""
    found = []
    for process in psutil.process_iter():
        try:
            environ = process.environ()
        except (psutil.Error, OSError):
            continue
        if environ.get("PREFECT__FLOW_RUN_ID") in run_ids and process.status() != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def flow_run_process(run_id: str) -> psutil.Process:
    (engine,) = [p for p in run_processes({run_id}) if "prefect.engine" in " ".join(p.cmdline())]
    return engine


def wait_for(what: str, check, timeout: float, log: Path, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout} s\n{log.read_text()[-4000:]}")
        time.sleep(poll)


def resubmission_of(served: ServedDeployments, run_id: str):
    """The run created as the resubmission of `run_id` (None yet)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with served.api() as client:
        found = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"resubmission-of:{run_id}"])))
    assert len(found) <= 1, [r.id for r in found]  # never two resubmissions of one crash
    return found[0] if found else None


def read_run(served: ServedDeployments, run_id: str):
    with served.api() as client:
        return client.read_flow_run(run_id)


def run_logs(served: ServedDeployments, run_id: str) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with served.api() as client:
        return [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)]


def resubmission_artifacts(served: ServedDeployments) -> list[str]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with served.api() as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["resubmission"])))
    return [str(artifact.data) for artifact in found]


@pytest.mark.slow
def test_a_crashed_run_is_resubmitted_and_resumes_until_it_finishes_as_if_never_interrupted(reference, stack):
    served, log = stack, stack.serve_log
    model_dir = served.root / "data" / "models" / "crashing"
    parameters = {"model_dir": str(model_dir), "track": False, "registered_model_name": "crashing", "training": TRAINING}
    with served.api() as client:
        # serve creates the zombie automation, and the trigger's, once its deployments exist: not always before
        wait_for(
            "the zombie automation",
            lambda: client.read_automations_by_name("prefect-tensorflow: crash runs without heartbeats"),
            60,
            log,
        )
        wait_for("the resubmission trigger", lambda: client.read_automations_by_name("resubmit-crashed__automation_1"), 60, log)
        first = served.create_run(client, "retrain-iris", parameters)

    # 1. the flow-run process dies (SIGKILL, an OOM kill): the runner reports Crashed, a resubmission follows
    wait_for("a checkpoint past step 100", lambda: committed_step(model_dir) >= 100, 300, log, poll=0.01)
    flow_run_process(first).kill()
    crashed_at = committed_step(model_dir)
    assert crashed_at < STEPS
    run = wait_for("attempt 1 final", lambda: (r := read_run(served, first)).state.is_final() and r, 60, log)
    assert run.state.is_crashed(), run.state
    second = wait_for("attempt 2 created", lambda: resubmission_of(served, first), 120, log)
    assert "attempt:2" in second.tags and "prefect-tensorflow" in second.tags
    assert second.parameters["training"]["steps"] == STEPS and second.parameters["training"]["more_steps"] is None

    # 2. the machine dies under attempt 2 (serve, its flow run and their children at once): only the missing
    # heartbeats tell; the zombie-run automation marks it Crashed, and the resubmission waits for a runner
    wait_for("attempt 2 training", lambda: committed_step(model_dir) > crashed_at, 300, log, poll=0.01)
    assert served.serve is not None
    os.killpg(served.serve.pid, signal.SIGKILL)
    served.serve.wait()
    served.serve = None
    died_at = committed_step(model_dir)
    assert died_at < STEPS
    assert wait_for("attempt 2's processes gone", lambda: not run_processes({str(second.id)}) or None, 10, log, poll=0.1)
    assert read_run(served, str(second.id)).state.is_running()  # nobody left to say otherwise
    run = wait_for(
        "attempt 2 marked", lambda: (r := read_run(served, str(second.id))).state.is_final() and r, ZOMBIE_AFTER + 90, log
    )
    assert run.state.is_crashed() and "No heartbeat" in (run.state.message or ""), run.state
    served.start_serve(names=NAMES)

    # 3. attempt 3 resumes from the newest checkpoint and ends as the uninterrupted run did
    third = wait_for("attempt 3 created", lambda: resubmission_of(served, str(second.id)), 240, log, poll=1)
    assert "attempt:3" in third.tags
    run = wait_for("attempt 3 final", lambda: (r := read_run(served, str(third.id))).state.is_final() and r, 600, log, poll=1)
    assert run.state.is_completed(), f"{run.state}\n{log.read_text()[-4000:]}"
    resumed = [line for line in run_logs(served, str(third.id)) if line.startswith("training from step")]
    assert resumed and int(resumed[0].split()[3]) >= died_at > crashed_at > 0, resumed
    weights, uninterrupted = final_weights(model_dir, STEPS), reference()
    assert weights.keys() == uninterrupted.keys()
    for name in uninterrupted:
        np.testing.assert_array_equal(weights[name], uninterrupted[name], err_msg=name)

    # 4. the decisions are recorded; nothing of the runs is left behind
    decisions = resubmission_artifacts(served)
    assert any("attempt 2 of at most 3" in d and str(second.id) in d for d in decisions), decisions
    assert any("attempt 3 of at most 3" in d and str(third.id) in d for d in decisions), decisions
    runs = {first, str(second.id), str(third.id)}
    wait_for("the runs' processes gone", lambda: not run_processes(runs) or None, 15, log, poll=0.2)  # a final state, then exit
    assert not [p for p in (served.root / "tmp").iterdir() if p.name.startswith("ptf-")]
    assert not [p for p in model_dir.iterdir() if p.name.endswith(("_temp", ".tmp"))]
    assert lock_released(model_dir / LOCK_FILE)  # the killed attempts' lease died with them; the last one released it


@pytest.mark.slow
def test_a_run_marked_crashed_while_still_training_is_resubmitted_but_the_new_run_does_not_train_beside_it(stack):
    """A false zombie (heartbeats lost, process alive): the resubmission finds the model dir's lease held."""
    from prefect.states import Crashed

    served, log = stack, stack.serve_log
    model_dir = served.root / "data" / "models" / "alive"
    training = {**TRAINING, "more_steps": 100_000}
    parameters = {"model_dir": str(model_dir), "track": False, "registered_model_name": "alive", "training": training}
    with served.api() as client:
        alive = served.create_run(client, "retrain-iris", parameters)
    wait_for("a checkpoint past step 0", lambda: committed_step(model_dir) > 0, 300, log, poll=0.1)
    with served.api() as client:  # what the zombie-run automation does to a run whose heartbeats were lost
        client.set_flow_run_state(alive, Crashed(message="heartbeats lost (the test)"), force=True)
    try:
        second = wait_for("the resubmission created", lambda: resubmission_of(served, alive), 120, log)
        run = wait_for("the resubmission final", lambda: (r := read_run(served, str(second.id))).state.is_final() and r, 300, log)
        assert run.state.is_failed(), run.state
        assert "another training holds it" in (run.state.message or "") and alive in (run.state.message or ""), run.state.message
        assert not [line for line in run_logs(served, str(second.id)) if line.startswith("training from step")]
        assert flow_run_process(alive).is_running()  # the first one trains on, alone
    finally:
        for process in run_processes({alive}):
            process.kill()
    wait_for("the first run's processes gone", lambda: not run_processes({alive}) or None, 15, log, poll=0.2)
    decisions = resubmission_artifacts(served)
    assert any("attempt 2 of at most 3" in d and str(second.id) in d for d in decisions), decisions


@pytest.mark.slow
def test_a_crashed_two_worker_run_is_resubmitted_and_its_workers_do_not_outlive_it(stack):
    """workers=2: the flow-run process SIGKILLed takes the supervisor and both workers with it; attempt 2
    resumes with two workers to the first attempt's target step."""
    served, log = stack, stack.serve_log
    model_dir = served.root / "data" / "models" / "two-workers"
    training = {**TRAINING, "more_steps": 400, "workers": 2, "evaluation": "none"}
    parameters = {"model_dir": str(model_dir), "track": False, "registered_model_name": "two-workers", "training": training}
    with served.api() as client:
        first = served.create_run(client, "retrain-iris", parameters)
    wait_for("a checkpoint past step 100", lambda: committed_step(model_dir) >= 100, 300, log, poll=0.01)
    assert len(run_processes({first})) >= 4  # the flow run, the supervisor, two workers
    flow_run_process(first).kill()
    crashed_at = committed_step(model_dir)
    assert crashed_at < 400
    wait_for("attempt 1's processes gone", lambda: not run_processes({first}) or None, 15, log, poll=0.2)
    second = wait_for("attempt 2 created", lambda: resubmission_of(served, first), 120, log)
    assert second.parameters["training"]["steps"] == 400 and second.parameters["training"]["workers"] == 2
    run = wait_for("attempt 2 final", lambda: (r := read_run(served, str(second.id))).state.is_final() and r, 600, log, poll=1)
    assert run.state.is_completed(), f"{run.state}\n{log.read_text()[-4000:]}"
    started = [line for line in run_logs(served, str(second.id)) if line.startswith("training from step")]
    assert started and int(started[0].split()[3]) >= crashed_at > 0, started
    assert select_latest_checkpoint(model_dir, verify_checksums=True).step == 400
    wait_for("attempt 2's processes gone", lambda: not run_processes({str(second.id)}) or None, 15, log, poll=0.2)
    assert not [p for p in (served.root / "tmp").iterdir() if p.name.startswith("ptf-")]
