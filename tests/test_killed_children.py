"""What a training leaves in $TMPDIR when it ends, fails or loses a child; a sweep whose Dask scheduler is absent.

Every process is real: a supervisor and two TensorFlow workers (one SIGKILLed
mid-training), the sidecar evaluator, a CLI sweep. Each test points $TMPDIR at
a directory of its own (the children inherit it) and asserts what is left there.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
from prefect_tensorflow.tasks.configs import TrainingConfig
from prefect_tensorflow.tasks.errors import NonFiniteLossError
from prefect_tensorflow.tasks.training.loop import train_with_checkpoints
from prefect_tensorflow.tasks.training.multi_worker import MultiWorkerError, train_multi_worker

WORKER_MODULE = "prefect_tensorflow.tasks.training.multi_worker_main"
POLICY = CheckpointPolicy(save_checkpoints_steps=100, keep_checkpoint_max=None)


@pytest.fixture
def own_tmpdir(tmp_path, monkeypatch) -> Path:
    """$TMPDIR for this test and the processes it starts (tempfile's cached choice reset)."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    return tmp


def left_in(tmp: Path) -> list[str]:
    """What is in `tmp`, but for the sources TensorFlow's autograph writes there for this (test) process and
    removes when it exits (`__autograph_generated_file*.py`): the package's own leftovers."""
    return sorted(name for name in os.listdir(tmp) if not name.startswith("__autograph_generated_file"))


def descendants(module: str) -> list[psutil.Process]:
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if module in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.slow
def test_a_killed_worker_a_failed_training_and_a_killed_caller_leave_nothing_in_tmpdir(own_tmpdir, tmp_path):
    # A killed caller's run dir (its pid is gone) is removed by the next training; a live caller's stays.
    abandoned = own_tmpdir / f"ptf-multi-worker-{dead_pid()}-abcd1234"
    (abandoned / "attempt0-tmp-x" / "ptf-worker1-y").mkdir(parents=True)
    live = own_tmpdir / f"ptf-multi-worker-{os.getpid()}-keepme"
    live.mkdir()

    # SIGKILL worker 1 after checkpoint 100: its throwaway checkpoint dir exists then (the test sees
    # what it must see removed), the supervisor restarts both workers and the training finishes.
    seen: list[list[Path]] = []

    def kill_worker_1(step: int, path: str, metrics: dict) -> None:
        if step < 100 or seen:
            return
        seen.append(sorted(own_tmpdir.glob("ptf-multi-worker-*/attempt0-tmp-*/ptf-worker1-*")))
        (victim,) = [p for p in descendants(WORKER_MODULE) if p.cmdline()[-1] == "1"]
        victim.send_signal(signal.SIGKILL)

    model_dir = tmp_path / "iris"
    config = TrainingConfig(steps=200, workers=2, policy=POLICY, evaluation="sidecar")
    result = train_multi_worker(str(model_dir), config, on_checkpoint=kill_worker_1)
    assert seen and len(seen[0]) == 1, f"worker 1's throwaway dir was not where expected: {seen}"
    assert result.final_step == 200 and (model_dir / "model.ckpt-200.index").exists()
    assert left_in(own_tmpdir) == [live.name]  # no ptf-worker*, no run dir, the abandoned one gone
    assert descendants(WORKER_MODULE) == [] and descendants("sidecar_evaluator") == []

    # A failure no restart cures (another model's checkpoint): the error names it, nothing is left.
    other_model = TrainingConfig(steps=300, workers=2, hparams={"hidden_units": [5]}, policy=POLICY, evaluation="none")
    with pytest.raises(MultiWorkerError, match="CheckpointMismatchError") as failed:
        train_multi_worker(str(model_dir), other_model)
    assert "Logs in" not in str(failed.value)
    assert left_in(own_tmpdir) == [live.name]
    assert descendants(WORKER_MODULE) == []


def test_a_single_process_training_leaves_nothing_in_tmpdir_when_it_ends_or_fails(own_tmpdir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the sidecar imports the test loader
    result = train_with_checkpoints(str(tmp_path / "iris"), TrainingConfig(steps=20, policy=POLICY, evaluation="sidecar"))
    assert result.final_step == 20
    failing = TrainingConfig(
        steps=40,
        data="models_for_tests:iris_with_inf",
        batch_size=8,
        shuffle_buffer=1,
        summary_every_n_steps=2,
        policy=POLICY,
        evaluation="sidecar",
    )
    with pytest.raises(NonFiniteLossError, match="the training loss is nan"):
        train_with_checkpoints(str(tmp_path / "poisoned"), failing)
    assert left_in(own_tmpdir) == []
    assert descendants("sidecar_evaluator") == []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_sweep_whose_dask_scheduler_is_absent_fails_at_once_and_writes_nothing(prefect_api, tmp_path, monkeypatch, capsys):
    """Nobody listens at the address: one line naming it, exit 2, within seconds; no MLflow store, run or sweep root."""
    from prefect_tensorflow.flows.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("PREFECT_TENSORFLOW_HOME", str(home))
    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(SystemExit) as exited:
        main(["sweep", "--candidates", '[{"seed": 0}]', "--steps", "20", "--dask-address", address])
    elapsed = time.monotonic() - started
    assert exited.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: dask_address: {address}: the Dask scheduler does not answer (connection refused, 5 s timeout); "
        "expected it listening there"
    ]
    assert elapsed < 30, f"took {elapsed:.0f} s"  # the Dask client's own connect gave up after ~70 s
    assert not home.exists()  # no sweep root, no MLflow store (so no FAILED parent run)
