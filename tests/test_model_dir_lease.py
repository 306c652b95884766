"""One trainer per model dir: real `prefect-tensorflow train` processes racing for one model dir, locally
and on S3 from two data homes; the holder SIGKILLed (a local lock frees at once) or frozen (an S3 lease is
taken over after its TTL); no lock left after a normal end."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from helpers import cli_command

from prefect_tensorflow.tasks.checkpoints.files import read_state_file, step_of
from prefect_tensorflow.tasks.training.model_dir_lease import LOCK_FILE

pytestmark = pytest.mark.slow


def train_cmd(model_dir: str, *extra: str) -> list[str]:
    return cli_command(
        "train", "--model-dir", model_dir, "--batch-size", "16", "--seed", "3", "--save-checkpoints-steps", "50", *extra
    )


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:] if proc.stderr else ''}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def local_committed(model_dir: Path) -> int:
    try:
        return step_of(read_state_file(model_dir).model_checkpoint_path) or 0
    except (FileNotFoundError, ValueError):
        return -1


def holders_among(processes: list[psutil.Process], path: Path) -> list[int]:
    """The pids among `processes` with `path` open."""
    found = []
    for process in processes:
        try:
            if any(f.path == str(path) for f in process.open_files()):
                found.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def refused_line(result: subprocess.CompletedProcess, holder: subprocess.Popen) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert f"another training holds it (pid {holder.pid} on " in errors[0], errors[0]
    return errors[0]


def test_a_second_local_trainer_refuses_or_waits_and_a_sigkilled_holder_frees_the_model_dir_at_once(tmp_path, cli_env):
    model_dir = tmp_path / "m"
    lock = model_dir / LOCK_FILE
    env = {**cli_env, "PREFECT_TENSORFLOW_HOME": str(tmp_path / "home")}
    holder = subprocess.Popen(train_cmd(str(model_dir), "--steps", "100000"), env=env, stderr=subprocess.PIPE, text=True)
    waiter = None
    try:
        wait_for(lambda: local_committed(model_dir) >= 0, holder, "the holder's first checkpoint")
        record = json.loads(lock.read_text())
        assert record["pid"] == holder.pid and record["what"] == "training" and record["since"]
        # The one that refuses and the one that waits start together (their start-up overlaps).
        waiter = subprocess.Popen(
            train_cmd(str(model_dir), "--more-steps", "20", "--lease-wait", "300", "--json"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        refused = subprocess.run(
            train_cmd(str(model_dir), "--more-steps", "10"), env=env, capture_output=True, text=True, timeout=300
        )
        line = refused_line(refused, holder)
        assert str(model_dir) in line and "PREFECT_TENSORFLOW_LEASE_WAIT" in line
        # The sidecar evaluator (a child of the holder) is part of its training: it does not hold the lock.
        children = psutil.Process(holder.pid).children(recursive=True)
        assert children, "expected the sidecar evaluator beside the holder"
        assert holders_among(children, lock) == []
        assert holders_among([psutil.Process(holder.pid)], lock) == [holder.pid]
        assert waiter.poll() is None  # still waiting
        wait_for(lambda: local_committed(model_dir) >= 100, holder, "the holder's step 100")
        holder.kill()
        holder.wait()
        at_kill = local_committed(model_dir)
        out, err = waiter.communicate(timeout=300)
        assert waiter.returncode == 0, err[-3000:]
        result = json.loads(out)
        # It trained only once the holder was gone, from the holder's last checkpoint: never beside it.
        assert result["start_step"] == at_kill and result["final_step"] == at_kill + 20
        assert "after waiting" in err and "holds it" in err  # both decisions are logged
        assert not lock.exists()  # a normal end leaves no lock behind
    finally:
        for process in (holder, waiter):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
