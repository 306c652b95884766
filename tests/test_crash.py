"""Real subprocess kills: SIGKILL at any moment, then the same command again, must end
with the weights of a run that was never interrupted; SIGTERM saves before exiting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import cli_command, final_weights, run_and_kill

from prefect_tensorflow.tasks.checkpoints.files import read_state_file, step_of
from prefect_tensorflow.tasks.checkpoints.selection import list_checkpoints, select_latest_checkpoint

pytestmark = pytest.mark.slow

STEPS = 1500


def train_cmd(model_dir: Path, *extra: str) -> list[str]:
    return cli_command(
        "train",
        "--model-dir",
        str(model_dir),
        "--steps",
        str(STEPS),
        "--batch-size",
        "16",
        "--seed",
        "7",
        "--save-checkpoints-steps",
        "50",
        "--keep-checkpoint-max",
        "3",
        *extra,
    )


def committed_step(model_dir: Path) -> int:
    """The step of the newest committed checkpoint (the state file names it), -1 before the first.

    (The kill points used to count metrics lines; with the sidecar evaluator those follow the
    commit a little later, so the commit itself is the progress marker now.)"""
    try:
        return step_of(read_state_file(model_dir).model_checkpoint_path) or 0
    except (FileNotFoundError, ValueError):
        return -1


def event_file_size(model_dir: Path) -> int:
    """The size of the training's TensorBoard event file (0 before it exists)."""
    return sum(p.stat().st_size for p in model_dir.glob("events.out.tfevents.*"))


def wait_until_past_start(model_dir: Path, proc: subprocess.Popen, timeout: float, output) -> None:
    """Wait until training has run past step 0 with no checkpoint due: its event file grows (the losses of the
    first summary steps, flushed as they queue up), beyond its size when checkpoint 0 was committed."""
    deadline = time.monotonic() + timeout
    while not (model_dir / "model.ckpt-0.index").exists():
        assert proc.poll() is None and time.monotonic() < deadline, output()
        time.sleep(0.01)
    at_start = event_file_size(model_dir)
    while event_file_size(model_dir) <= at_start:
        assert proc.poll() is None and time.monotonic() < deadline, output()
        time.sleep(0.01)


def run_to_end(cmd, env) -> None:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory, request) -> dict[str, np.ndarray]:
    """Weights of an uninterrupted run (in a subprocess, like the interrupted ones)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    model_dir = tmp_path_factory.mktemp("reference") / "m"
    run_to_end(train_cmd(model_dir), env)
    return final_weights(model_dir, STEPS)


def assert_same(weights, reference):
    assert weights.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(weights[name], reference[name], err_msg=name)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigkill_at_many_points_then_rerun_matches_uninterrupted(tmp_path, cli_env, reference, async_save):
    model_dir = tmp_path / "m"
    # The sync case kills runs with their sidecar evaluator; the async case kills the async writer, which
    # works alike wherever evaluation runs: in the loop, its six runs start no second TensorFlow process
    # (the weights do not depend on where evaluation runs: both end equal to the same reference).
    extra = ["--async-save", "--evaluation", "in_loop"] if async_save else ["--no-async-save"]
    cmd = train_cmd(model_dir, *extra)
    start = time.monotonic()
    kill_points = [
        ("during start-up, before anything is written", lambda: time.monotonic() - start > 1.0),
        ("just after the first checkpoint", lambda: committed_step(model_dir) >= 0),
        ("mid-training", lambda: committed_step(model_dir) >= 250),
        ("right after resuming", lambda: committed_step(model_dir) >= 350),
        ("late in training", lambda: committed_step(model_dir) >= 950),
    ]
    killed = []
    for label, when in kill_points:
        start = time.monotonic()
        if run_and_kill(cmd, cli_env, when):
            killed.append(label)
        if list(model_dir.glob("*.index")):  # whatever a kill leaves, the newest valid one reads back
            select_latest_checkpoint(model_dir, verify_checksums=True)
    assert len(killed) >= 4, f"too few kills landed: {killed}"
    run_to_end(cmd, cli_env)
    assert_same(final_weights(model_dir, STEPS), reference)
    steps = [row.step for row in list_checkpoints(model_dir) if row.valid]
    assert steps[0] == STEPS


def test_sigkill_during_saves(tmp_path, cli_env, reference):
    """Saving every step makes most random kill times land inside a checkpoint write."""
    model_dir = tmp_path / "m"
    cmd = train_cmd(model_dir)
    cmd[cmd.index("--save-checkpoints-steps") + 1] = "1"
    for step in (30, 90, 150):
        run_and_kill(cmd, cli_env, lambda step=step: committed_step(model_dir) >= step)
    every_step = train_cmd(model_dir)  # finish with the usual policy
    run_to_end(every_step, cli_env)
    assert_same(final_weights(model_dir, STEPS), reference)


def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path, cli_env):
    model_dir = tmp_path / "m"
    cmd = cli_command(
        "train",
        "--model-dir",
        str(model_dir),
        "--steps",
        "100000000",  # default policy: every 600 s
    )
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until_past_start(model_dir, proc, 120, lambda: proc.stderr.read()[-2000:])
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGTERM  # it still exits as a SIGTERM'd process would
    ref = select_latest_checkpoint(model_dir, verify_checksums=True)
    assert ref.step > 0, "no checkpoint was saved on SIGTERM"
    assert ref.metrics, "the preemption checkpoint has no recorded metrics"


FLOW_SCRIPT = """
import sys
from prefect import flow
from prefect_tensorflow.tasks import TrainingConfig, train_with_checkpoints

@flow
def long_training(model_dir: str):
    return train_with_checkpoints(model_dir, TrainingConfig(steps=100_000_000))

long_training(sys.argv[1])
"""


def test_sigterm_in_a_prefect_flow_run_saves_then_prefect_marks_it_crashed(tmp_path, cli_env, prefect_api):
    """The preemption path of a deployment: the flow-run process gets SIGTERM mid-training."""
    from prefect.settings import PREFECT_API_URL

    model_dir = tmp_path / "m"
    script = tmp_path / "flow_run.py"
    script.write_text(FLOW_SCRIPT)
    # The session's test API (as a deployment run reports to its server): without one, the process
    # would start a temporary server of its own and migrate a new database first.
    env = dict(cli_env, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=PREFECT_API_URL.value())
    log = tmp_path / "flow_run.log"
    # A file, not a pipe: whatever the flow-run process leaves behind inherits the output; its
    # process group is cleaned up below.
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(model_dir)], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_past_start(model_dir, proc, 300, lambda: log.read_text()[-3000:])
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group: the flow run and anything it started
        except ProcessLookupError:
            pass
    output = log.read_text()
    assert "SIGTERM received at step" in output
    assert "Crashed" in output  # Prefect still learns the run was terminated
    ref = select_latest_checkpoint(model_dir, verify_checksums=True)
    assert ref.step > 0 and f"saved checkpoint {ref.path}" in output
