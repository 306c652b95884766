"""Multi-worker training: 2 CPU workers under MultiWorkerMirroredStrategy on 127.0.0.1, killed and resumed.

Every run is real: a supervisor process, two TensorFlow worker processes with
a `TF_CONFIG`, collectives over gRPC. The uninterrupted 2-worker run is the
reference; a run whose worker is SIGKILLed (the supervisor restarts both) and
a run whose caller is SIGKILLed (everything dies; the same call again resumes)
must end with bit-identical weights and optimizer slots.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from prefect_tensorflow.tasks.checkpoints.metrics_log import read_metrics
from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
from prefect_tensorflow.tasks.configs import TrainingConfig
from prefect_tensorflow.tasks.training.loop import train_with_checkpoints
from prefect_tensorflow.tasks.training.multi_worker import (
    MARKER,
    MultiWorkerError,
    MultiWorkerOptions,
    check_config,
    train_multi_worker,
)

STEPS = 600
POLICY = CheckpointPolicy(save_checkpoints_steps=100, keep_checkpoint_max=None)
CONFIG = TrainingConfig(steps=STEPS, workers=2, policy=POLICY, evaluation="in_loop")
WORKER_MODULE = "prefect_tensorflow.tasks.training.multi_worker_main"


def tensors(prefix: str) -> dict:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    names = [n for n in reader.get_variable_to_shape_map() if n.startswith(("model/", "optimizer/", "global_step"))]
    return {n: reader.get_tensor(n) for n in names}


def max_abs_diff(a: str, b: str) -> float:
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb)
    return max(float(np.max(np.abs(ta[k].astype(np.float64) - tb[k].astype(np.float64)))) if ta[k].size else 0.0 for k in ta)


def worker_processes(root: psutil.Process | None = None) -> list[psutil.Process]:
    """The supervisor and worker processes below `root` (default: this test process)."""
    found = []
    for process in (root or psutil.Process()).children(recursive=True):
        try:
            if WORKER_MODULE in process.cmdline():
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def test_settings_a_multi_worker_training_cannot_honour_are_refused_naming_them():
    with pytest.raises(MultiWorkerError, match="batch_size: 30 is not divisible by workers=4"):
        check_config(TrainingConfig(workers=4, batch_size=30))
    with pytest.raises(MultiWorkerError, match="model_dir: s3://bucket/iris: multi-worker training needs a local"):
        train_multi_worker("s3://bucket/iris", TrainingConfig(workers=2))
    with pytest.raises(ValueError, match="max_restarts"):
        MultiWorkerOptions(max_restarts=-1)


@pytest.mark.slow
def test_with_two_workers_and_the_sidecar_every_committed_checkpoint_gets_exactly_one_metrics_line(tmp_path):
    """The chief saves through the same CheckpointWriter as one process: its keep policy (at most 2 kept, a save
    every 5 steps) waits for the sidecar's line before deleting, and the last sweep follows the evaluator."""
    model_dir = tmp_path / "iris"
    config = TrainingConfig(
        steps=40, workers=2, policy=CheckpointPolicy(save_checkpoints_steps=5, keep_checkpoint_max=2), evaluation="sidecar"
    )
    committed: list[int] = []
    result = train_with_checkpoints(str(model_dir), config, on_checkpoint=lambda step, path, metrics: committed.append(step))
    assert committed == list(range(0, 41, 5)) and result.checkpoints_saved == len(committed)
    lines = [json.loads(line) for line in (model_dir / "checkpoint_metrics.jsonl").read_text().splitlines() if line.strip()]
    assert sorted(line["step"] for line in lines) == committed  # one line each, none missing, none twice
    assert all({"accuracy", "loss"} <= set(line["metrics"]) for line in lines)
    assert sorted(p.name for p in model_dir.glob("model.ckpt-*.index")) == ["model.ckpt-35.index", "model.ckpt-40.index"]
    assert result.final_metrics == read_metrics(model_dir)[40]
    assert worker_processes() == []


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mlflow_template_db) -> dict:
    """An uninterrupted 2-worker run (sidecar-free: in-loop evaluation), tracked in an SQLite MLflow store."""
    import shutil

    from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig

    root = tmp_path_factory.mktemp("mw-reference")
    (root / "mlflow").mkdir()
    shutil.copyfile(mlflow_template_db, root / "mlflow" / "mlflow.db")
    connection = MlflowConfig(tracking_uri=f"sqlite:///{root}/mlflow/mlflow.db", experiment_name="mw", operation_retries=0)
    checkpoints: list[tuple[int, str, dict]] = []
    started = time.monotonic()
    result = train_with_checkpoints(
        str(root / "iris"),
        CONFIG,
        connection,
        on_checkpoint=lambda step, path, metrics: checkpoints.append((step, path, metrics)),
    )
    return {
        "dir": root / "iris",
        "result": result,
        "checkpoints": checkpoints,
        "connection": connection,
        "seconds": time.monotonic() - started,
    }


@pytest.mark.slow
def test_two_workers_write_the_layout_selection_and_export_expect(reference, tmp_path):
    from prefect_tensorflow.tasks.checkpoints.selection import list_checkpoints, select_best_checkpoint, select_latest_checkpoint
    from prefect_tensorflow.tasks.export.saved_model import export_saved_model

    model_dir: Path = reference["dir"]
    result = reference["result"]
    assert (result.start_step, result.final_step, result.steps_run, result.checkpoints_saved) == (0, STEPS, STEPS, 7)
    assert result.last_checkpoint == str(model_dir / f"model.ckpt-{STEPS}")
    assert [step for step, _, _ in reference["checkpoints"]] == list(range(0, STEPS + 1, 100))
    assert (model_dir / "checkpoint").read_text().startswith(f'model_checkpoint_path: "model.ckpt-{STEPS}"')
    for step in range(0, STEPS + 1, 100):
        assert (model_dir / f"model.ckpt-{step}.index").exists()
        assert (model_dir / f"model.ckpt-{step}.data-00000-of-00001").exists()
    recorded = read_metrics(model_dir)
    assert sorted(recorded) == list(range(0, STEPS + 1, 100))
    assert all({"accuracy", "loss"} <= set(recorded[s]) for s in recorded)
    assert all("train_loss" in recorded[s] for s in recorded if s > 0)
    assert result.final_metrics == recorded[STEPS]
    assert json.loads((model_dir / MARKER).read_text())["workers"] == 2
    assert not [p for p in os.listdir(model_dir) if p.startswith("ptf-worker")]  # the others' copies are gone
    assert all(info.valid for info in list_checkpoints(model_dir))
    assert select_latest_checkpoint(str(model_dir)).step == STEPS
    best = select_best_checkpoint(str(model_dir), "accuracy", "max")
    assert best.metrics["accuracy"] >= 0.9
    exported = export_saved_model(best.path, str(tmp_path / "export"))
    assert exported.version == 1 and exported.parity.ok
    # The run was tracked like a single-process one: params, the loss, eval metrics per checkpoint.
    run = reference["connection"].client().get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["workers"] == "2" and run.data.params["steps"] == str(STEPS)
    assert {"loss", "eval/accuracy", "eval/loss", "train_loss"} <= set(run.data.metrics)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_ends_bit_identical(reference, tmp_path, caplog):
    """SIGKILL worker 1 after checkpoint 300: the supervisor tears down both, restarts from the chief's
    newest valid checkpoint, and the weights at 600 equal the uninterrupted run's exactly. Meanwhile
    the workers' gRPC ports are not listening in this network namespace."""
    caplog.set_level(logging.INFO, logger="prefect_tensorflow")
    killed: list[int] = []
    visible: list = []

    def kill_worker_1(step: int, path: str, metrics: dict) -> None:
        if step < 300 or killed:
            return
        ports = [int(p) for p in re.findall(r"\d+", re.search(r"ports \[([^\]]*)\]", caplog.text).group(1))]
        visible.extend(c for c in psutil.net_connections(kind="tcp") if c.status == "LISTEN" and c.laddr.port in ports)
        (victim,) = [p for p in worker_processes() if p.cmdline()[-1] == "1"]
        victim.send_signal(signal.SIGKILL)
        killed.append(step)

    model_dir = tmp_path / "iris"
    result = train_multi_worker(str(model_dir), CONFIG, on_checkpoint=kill_worker_1)
    assert killed, "worker 1 was never killed"
    assert "multi-worker attempt 0 failed: worker 1 killed by signal 9" in caplog.text
    assert "multi-worker attempt 1:" in caplog.text
    assert "private network namespace" in caplog.text and visible == []
    assert result.final_step == STEPS
    assert max_abs_diff(str(model_dir / f"model.ckpt-{STEPS}"), str(reference["dir"] / f"model.ckpt-{STEPS}")) == 0.0
    assert read_metrics(model_dir)[STEPS]["accuracy"] == read_metrics(reference["dir"])[STEPS]["accuracy"]
    assert worker_processes() == []


@pytest.mark.slow
def test_a_killed_caller_leaves_no_process_and_running_again_resumes_bit_identical(reference, tmp_path):
    """SIGKILL the process that called train_with_checkpoints(workers=2): the supervisor and both
    workers die with it (PR_SET_PDEATHSIG). The same call again resumes and ends like the reference."""
    model_dir = tmp_path / "iris"
    code = (
        "import sys\n"
        "from prefect_tensorflow.tasks.configs import TrainingConfig\n"
        "from prefect_tensorflow.tasks.training.loop import train_with_checkpoints\n"
        "train_with_checkpoints(sys.argv[1], TrainingConfig.model_validate_json(sys.argv[2]))\n"
    )
    caller = subprocess.Popen([sys.executable, "-c", code, str(model_dir), CONFIG.model_dump_json()], start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (model_dir / "model.ckpt-300.index").exists():
            assert caller.poll() is None, "the training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint 300 in 600 s"
            time.sleep(0.05)
        orphans = worker_processes(psutil.Process(caller.pid))
        assert len(orphans) == 3  # the supervisor and two workers
        caller.send_signal(signal.SIGKILL)
        caller.wait()
    finally:
        if caller.poll() is None:
            caller.kill()
    _, alive = psutil.wait_procs(orphans, timeout=30)
    assert alive == [], f"outlived their caller: {[p.cmdline() for p in alive]}"
    interrupted_at = max(int(p.name.split("-")[-1].split(".")[0]) for p in model_dir.glob("model.ckpt-*.index"))
    assert interrupted_at < STEPS

    result = train_with_checkpoints(str(model_dir), CONFIG)
    assert result.start_step == interrupted_at and result.final_step == STEPS
    assert max_abs_diff(str(model_dir / f"model.ckpt-{STEPS}"), str(reference["dir"] / f"model.ckpt-{STEPS}")) == 0.0


@pytest.mark.slow
def test_a_model_dir_goes_from_one_process_to_two_workers_and_back(tmp_path):
    """workers=1 -> 2: the iterator state is read (strict keys) and replaced by skip(global_step);
    2 -> 1: the checkpoints keep no iterator state, and the single process takes the same
    skip(global_step) position. The weights stay within float summation order of a single-process run."""
    single = TrainingConfig(steps=200, policy=POLICY, evaluation="none")
    model_dir = tmp_path / "iris"
    train_with_checkpoints(str(model_dir), single)
    result = train_with_checkpoints(str(model_dir), single.model_copy(update={"steps": 400, "workers": 2}))
    assert (result.start_step, result.final_step) == (200, 400)
    reference = tmp_path / "single"
    train_with_checkpoints(str(reference), single.model_copy(update={"steps": 500}))
    assert max_abs_diff(str(model_dir / "model.ckpt-400"), str(reference / "model.ckpt-400")) < 1e-3
    back = train_with_checkpoints(str(model_dir), single.model_copy(update={"steps": 500}))
    assert (back.start_step, back.final_step) == (400, 500)
    assert max_abs_diff(str(model_dir / "model.ckpt-500"), str(reference / "model.ckpt-500")) < 1e-3


@pytest.mark.slow
def test_an_error_no_restart_can_cure_fails_at_once_naming_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="prefect_tensorflow")
    model_dir = tmp_path / "iris"
    train_with_checkpoints(str(model_dir), TrainingConfig(steps=10, policy=POLICY, evaluation="none"))
    other_model = TrainingConfig(steps=20, workers=2, hparams={"hidden_units": [5]}, policy=POLICY, evaluation="none")
    with pytest.raises(MultiWorkerError, match="CheckpointMismatchError"):
        train_multi_worker(str(model_dir), other_model)
    assert "multi-worker attempt 1:" not in caplog.text  # not restarted
    assert worker_processes() == []
