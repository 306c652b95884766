"""One trainer per model dir: real `prefect-tensorflow train` processes racing for one model dir, locally
and on S3 from two data homes; the holder SIGKILLed (a local lock frees at once) or frozen (an S3 lease is
taken over after its TTL); no lock left after a normal end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from helpers import cli_command, lock_released

from prefect_tensorflow.tasks.checkpoints.files import read_state_file, step_of
from prefect_tensorflow.tasks.checkpoints.selection import select_latest_checkpoint
from prefect_tensorflow.tasks.configs import TrainingConfig
from prefect_tensorflow.tasks.errors import ModelDirBusyError
from prefect_tensorflow.tasks.training.loop import train_with_checkpoints
from prefect_tensorflow.tasks.training.model_dir_lease import LOCK_FILE, REMOTE_LEASE

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


def lock_record(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):  # not there yet, or being written
        return {}


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
        wait_for(lambda: lock_record(lock).get("pid") == holder.pid, holder, "the holder's lease")
        record = lock_record(lock)
        assert record["what"] == "training" and record["since"] and record["host"]
        # The one that waits starts at once: its start-up overlaps the holder's.
        waiter_log = tmp_path / "waiter.err"
        waiter = subprocess.Popen(
            train_cmd(str(model_dir), "--more-steps", "20", "--lease-wait", "300", "--json"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=waiter_log.open("w"),
            text=True,
        )
        # The one that refuses, in this process (the command line's exit status 2 is checked on S3 below).
        with pytest.raises(ModelDirBusyError) as refused:
            train_with_checkpoints(str(model_dir), TrainingConfig(more_steps=10), lease_wait=0)
        assert str(refused.value) == (
            f"model dir {model_dir}: another training holds it (pid {holder.pid} on {record['host']}, "
            f"since {record['since']}); refused (PREFECT_TENSORFLOW_LEASE_WAIT)"
        )
        wait_for(lambda: local_committed(model_dir) >= 0, holder, "the holder's first checkpoint")
        # The sidecar evaluator (a child of the holder) is part of its training: it does not hold the lock.
        children = psutil.Process(holder.pid).children(recursive=True)
        assert children, "expected the sidecar evaluator beside the holder"
        assert holders_among(children, lock) == []
        assert holders_among([psutil.Process(holder.pid)], lock) == [holder.pid]
        wait_for(lambda: local_committed(model_dir) >= 50, holder, "the holder's step 50")
        # the CLI imports TensorFlow before it asks for the lease: kill the holder once the waiter is waiting
        wait_for(lambda: "waiting up to" in waiter_log.read_text(), holder, "the waiter waiting for the lease")
        assert waiter.poll() is None  # still waiting
        holder.kill()
        holder.wait()
        # the newest valid checkpoint, what a resume takes: the kill may land after a checkpoint's files are
        # complete and before the state file names it (then that checkpoint is the newest valid one)
        at_kill = select_latest_checkpoint(str(model_dir)).step
        out, _ = waiter.communicate(timeout=300)
        err = waiter_log.read_text()
        assert waiter.returncode == 0, err[-3000:]
        result = json.loads(out)
        # It trained only once the holder was gone, from the holder's last checkpoint: never beside it.
        assert result["start_step"] == at_kill and result["final_step"] == at_kill + 20
        assert "after waiting" in err and "holds it" in err  # both decisions are logged
        assert lock_released(lock)  # a normal end leaves no lock behind (the file stays, emptied and unlocked)
    finally:
        for process in (holder, waiter):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def test_two_data_homes_on_one_s3_model_dir_one_trains_and_a_frozen_holders_lease_is_taken_over_after_its_ttl(
    s3, tmp_path, cli_env
):
    import hashlib

    prefix = "models/iris"
    model_dir = s3.uri(prefix)
    base = {**cli_env, **s3.env, "PREFECT_TENSORFLOW_LEASE_TTL": "4"}
    home = {name: tmp_path / name for name in ("home-a", "home-b")}
    env = {name: {**base, "PREFECT_TENSORFLOW_HOME": str(path)} for name, path in home.items()}
    staging = {name: path / "staging" / hashlib.sha256(model_dir.encode()).hexdigest()[:16] for name, path in home.items()}

    def committed() -> int:
        try:
            return step_of(s3.read(f"{prefix}/checkpoint").decode().splitlines()[0].split('"')[1]) or 0
        except Exception:  # noqa: BLE001 - no state file yet
            return -1

    holder = subprocess.Popen(train_cmd(model_dir, "--steps", "100000"), env=env["home-a"], stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: s3.exists(f"{prefix}/{REMOTE_LEASE}"), holder, "the holder's lease object")
        record = json.loads(s3.read(f"{prefix}/{REMOTE_LEASE}"))
        assert record["holder"]["pid"] == holder.pid and record["process"]["pid"] == holder.pid
        refused = subprocess.run(
            train_cmd(model_dir, "--more-steps", "10"), env=env["home-b"], capture_output=True, text=True, timeout=300
        )
        assert model_dir in refused_line(refused, holder)
        wait_for(lambda: committed() >= 50, holder, "the holder's checkpoint 50 on the store")
        assert not staging["home-b"].exists()  # refused before pulling anything
        # The holder hangs (alive, no heartbeat): the lease is taken over once its TTL ran out.
        holder.send_signal(signal.SIGSTOP)
        at_stop = committed()
        stored = s3.objects(prefix)
        # Summaries went up with the checkpoints, not only at the end (this run never ends).
        assert "graph.pbtxt" in stored and any(n.startswith("events.out.tfevents.") for n in stored), stored
        assert any(n.startswith("eval/events.out.tfevents.") for n in stored), stored
        started = time.monotonic()
        taker = subprocess.run(
            train_cmd(model_dir, "--more-steps", "20", "--lease-wait", "120", "--json"),
            env=env["home-b"],
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert taker.returncode == 0, taker.stderr[-3000:]
        assert "taking over the lock" in taker.stderr and "stopped renewing it" in taker.stderr
        result = json.loads(taker.stdout)
        assert result["start_step"] == at_stop and result["final_step"] == at_stop + 20
        took = time.monotonic() - started
        assert took >= 4.0
        assert committed() == at_stop + 20
        assert f"{REMOTE_LEASE}" not in s3.objects(prefix)  # released at the end
        assert not staging["home-b"].exists()  # the staging copy went with the end of training
        # The frozen holder wakes up: its lease is gone, so it stops at its next checkpoint, commits nothing.
        after_taker = {name: s3.read(f"{prefix}/{name}") for name in ("checkpoint", "checkpoint_metrics.jsonl")}
        woken = time.monotonic()
        holder.send_signal(signal.SIGCONT)
        _, err = holder.communicate(timeout=300)
        print(f"taken over after {took:.1f} s; the woken holder stopped after {time.monotonic() - woken:.1f} s")
        assert holder.returncode == 2, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert "Traceback" not in err and len(errors) == 1 and "taken over" in errors[0], err[-3000:]
        assert {name: s3.read(f"{prefix}/{name}") for name in after_taker} == after_taker
        assert committed() == at_stop + 20
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_two_retrains_of_one_window_the_second_is_refused_naming_the_holder_or_waits_and_skips(
    prefect_api, tmp_path, monkeypatch
):
    import threading
    from datetime import date

    from windowed_loader import write_days

    from prefect_tensorflow.flows.retrain import RetrainSummary, SkippedRetrain, retrain
    from prefect_tensorflow.flows.windows import window_lease, window_lease_name
    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.configs import TrainingConfig
    from prefect_tensorflow.tasks.data.window import DataWindow

    write_days(tmp_path / "daily", date(2026, 11, 28), 1)
    training = TrainingConfig(
        data="windowed_loader:load",
        data_options={"root": str(tmp_path / "daily")},
        steps=30,
        batch_size=16,
        evaluation="in_loop",
        policy=CheckpointPolicy(save_checkpoints_steps=30, save_checkpoints_secs=None),
    )
    window = DataWindow(end=date(2026, 11, 29))
    model_dir = tmp_path / "m"
    runs = model_dir / "windows" / window.resolved(None).name
    shipping = {"export_base": str(tmp_path / "export"), "frozen_dir": str(tmp_path / "frozen"), "track": False}

    def run() -> object:
        return retrain(model_dir=str(model_dir), training=training, window=window, return_state=True, **shipping)

    # Another run of this window holds it: refused at once (the default wait is 0), naming the holder.
    with window_lease(str(model_dir), window.resolved(None)):
        refused = run()
    assert refused.is_failed()
    assert f"another training holds it (pid {os.getpid()} on " in refused.message, refused.message
    assert str(runs) in refused.message
    assert not (model_dir / "data-lineage.json").exists() and not runs.exists()  # nothing trained
    assert [n for n in os.listdir(model_dir / "windows") if not n.endswith(".lock")] == []
    assert all(lock_released(p) for p in (model_dir / "windows").iterdir())  # no lock left behind
    # With a wait: the second run waits for the first, then sees its lineage and skips the window.
    monkeypatch.setenv("PREFECT_TENSORFLOW_LEASE_WAIT", "300")
    first: list = []
    thread = threading.Thread(target=lambda: first.append(run()))
    thread.start()
    try:
        deadline = time.monotonic() + 240
        lock = model_dir / "windows" / f"{window_lease_name(window.resolved(None))}.lock"
        while not lock_record(lock):
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        assert lock_record(lock)["flow_run_name"] == "retrain-iris" and lock_record(lock)["flow_run_id"]
        second = run()
    finally:
        thread.join(600)
    assert first[0].is_completed() and isinstance(first[0].result(), RetrainSummary)
    assert second.is_completed() and isinstance(second.result(), SkippedRetrain)
    assert second.result().skipped.startswith("data unchanged")
    assert len(os.listdir(runs)) == 1  # trained once
    assert [n for n in os.listdir(model_dir / "windows") if not n.endswith(".lock")] == [runs.name]
    assert lock_released(lock)  # no lock left behind: its file stays, emptied and unlocked


def test_from_scratch_does_not_move_a_model_dir_a_training_holds(tmp_path):
    from prefect_tensorflow.flows.retrain import set_aside
    from prefect_tensorflow.tasks.checkpoints.model_dir import ModelDir
    from prefect_tensorflow.tasks.training.model_dir_lease import hold_model_dir

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-5"\n')
    with hold_model_dir(ModelDir.parse(str(model_dir))):
        with pytest.raises(ModelDirBusyError, match=f"another training holds it \\(pid {os.getpid()} on "):
            set_aside(str(model_dir))
        assert sorted(os.listdir(model_dir)) == [LOCK_FILE, "checkpoint"]
    aside = set_aside(str(model_dir))
    assert aside is not None and not model_dir.exists() and sorted(os.listdir(aside)) == [LOCK_FILE, "checkpoint"]
    assert lock_released(Path(aside) / LOCK_FILE)
