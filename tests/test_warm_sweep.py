"""Sweep trainers forked from a warm template per Dask worker: kills stay contained, the child gets the worker's
environment and cwd. (The sweeps themselves, a killed worker and a cancelled sweep: test_sweep.py,
test_cancel_timeout.py.)"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from helpers import sweep_trainer_of

from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
from prefect_tensorflow.tasks.configs import TrainingConfig
from prefect_tensorflow.tasks.training import sweep_template
from prefect_tensorflow.tasks.training.sweep_candidates import (
    TRAINER_MODULE,
    Candidate,
    SweepError,
    plan_candidates,
    train_candidate,
)

LONG = TrainingConfig(steps=1_000_000, policy=CheckpointPolicy(save_checkpoints_steps=50, keep_checkpoint_max=2))
SHORT = TrainingConfig(steps=40, policy=CheckpointPolicy(save_checkpoints_steps=20, keep_checkpoint_max=2))


def _trainer_holding(model_dir: str, timeout: float = 300.0, child=None) -> psutil.Process:
    """The process that holds `model_dir`'s training lock, once it trains (its first checkpoint exists);
    `child`: the forked trainer, whose exit ends the wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (child is None or child.poll() is None):
        if Path(model_dir, "checkpoint").exists() and (trainer := sweep_trainer_of(model_dir)) is not None:
            return trainer
        time.sleep(0.1)
    raise AssertionError(f"no trainer of {model_dir}: it exited, or did not checkpoint within {timeout:g} s")


@pytest.fixture(scope="module")
def dask_client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster:
        with Client(cluster) as client:
            yield client


def test_a_sigkilled_trainer_fails_its_candidate_only_the_worker_and_template_go_on(dask_client, tmp_path):
    long_spec = plan_candidates(str(tmp_path), LONG, [Candidate(seed=0)])[0]
    short_spec = plan_candidates(str(tmp_path), SHORT, [Candidate(seed=1)])[0]
    (worker_pid,) = dask_client.run(os.getpid).values()
    running = dask_client.submit(train_candidate, long_spec, pure=False)
    trainer = _trainer_holding(long_spec.model_dir)
    template = trainer.parent()
    assert template.parent().pid == worker_pid  # forked from the worker's template, shown as a trainer
    assert TRAINER_MODULE not in template.cmdline()

    trainer.send_signal(signal.SIGKILL)
    with pytest.raises(SweepError, match="was killed by signal 9"):
        running.result(timeout=120)
    assert list(dask_client.run(os.getpid).values()) == [worker_pid]  # the same worker
    assert list(dask_client.run(sweep_template.template_pid).values()) == [template.pid]  # and the same template
    result = dask_client.submit(train_candidate, short_spec, pure=False).result(timeout=300)
    assert result.forked and result.training.final_step == SHORT.steps
    assert list(dask_client.run(sweep_template.template_pid).values()) == [template.pid]


def test_a_forked_trainer_sees_the_environment_and_cwd_a_started_one_would(tmp_path, monkeypatch):
    """A changed environment (or cwd) replaces the template: its trainers never see a stale one."""
    seen = []
    try:
        for mark in ("first", "second"):
            monkeypatch.setenv("PTF_WARM_SWEEP_MARK", mark)
            workdir = tmp_path / mark
            workdir.mkdir()
            monkeypatch.chdir(workdir)
            spec = plan_candidates(str(tmp_path / "sweep"), LONG, [Candidate(seed=len(seen))])[0]
            os.makedirs(spec.model_dir)  # as train_candidate does
            payload = {"spec": spec.model_dump(mode="json"), "connection": None}
            log = tmp_path / f"{mark}.log"
            child = sweep_template.fork_trainer(payload, 1, str(log), str(tmp_path / f"{mark}.out"))
            assert child is not None, "no template"
            trainer = _trainer_holding(spec.model_dir, child=child)
            assert trainer.pid == child.pid and trainer.cwd() == str(workdir)
            environ = trainer.environ()
            assert environ["PTF_WARM_SWEEP_MARK"] == mark and environ["TF_NUM_INTRAOP_THREADS"] == "1"
            seen.append(sweep_template.template_pid())
            trainer.send_signal(signal.SIGKILL)
            assert child.wait(timeout=60) == -signal.SIGKILL
        assert seen[0] != seen[1]
    finally:
        sweep_template.stop_template()


def test_the_trainer_template_and_a_cold_trainer_import_tensorflow_without_keras_optional_extras():
    """Both trainer programs are processes of ours: Keras' scikit-learn, plotting and pandas extras (a second
    of a 2-core machine's CPU per worker) stay out of the TensorFlow import, as in the sidecar evaluator."""
    import subprocess
    import sys

    programs = {
        "template": "from prefect_tensorflow.tasks.training.sweep_forking_main import _imports; _imports(True)",
        "cold": (  # `trainer_main` up to its training, which here only imports TensorFlow; no exit, so we can look
            "import io, os, sys\n"
            "from prefect_tensorflow.tasks.training import sweep_candidates\n"
            "sweep_candidates.train_from_payload = lambda payload, started: 0 if __import__('tensorflow') else 1\n"
            "os._exit = lambda code: None\n"
            "sys.stdin = io.StringIO('{}')\n"
            "sweep_candidates.trainer_main()"
        ),
    }
    for name, program in programs.items():
        check = program + "\nimport sys\nprint(sorted(m for m in ('sklearn', 'matplotlib', 'tensorflow') if m in sys.modules))"
        done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (name, done.stderr[-3000:])
        assert done.stdout.split("\n")[-2] == "['tensorflow']", (name, done.stdout)


def test_an_untracked_sweeps_template_leaves_mlflow_out_and_a_tracked_candidate_forked_from_it_still_logs(tmp_path, mlflow_store):
    """MLflow's client is a second of CPU per worker while the first candidates wait: only a tracked sweep's
    template imports it. A tracked candidate that meets an untracked template imports it in its own child."""
    import subprocess
    import sys

    import mlflow

    seen = {}
    for tracked in (False, True):
        program = (
            f"from prefect_tensorflow.tasks.training.sweep_forking_main import _imports; _imports({tracked})\n"
            "import sys; print('mlflow' in sys.modules)"
        )
        done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        seen[tracked] = done.stdout.split("\n")[-2]
    assert seen == {False: "False", True: "True"}

    try:
        sweep_template.launch_template(1, tracked=False)
        template = psutil.Process(sweep_template.template_pid())
        assert sweep_template.WITH_MLFLOW not in template.cmdline()
        spec = plan_candidates(str(tmp_path / "sweep"), SHORT, [Candidate(seed=2)], tracking=mlflow_store.plain())[0]
        result = train_candidate(spec)
        assert result.forked and result.training.final_step == SHORT.steps
        assert sweep_template.template_pid() == template.pid  # the same template: not replaced for MLflow
    finally:
        sweep_template.stop_template()
    run = mlflow.MlflowClient(mlflow_store.tracking_uri).get_run(result.training.mlflow_run_id)
    assert run.data.metrics and run.info.status == "FINISHED"


def test_a_tracked_sweeps_template_is_started_with_mlflow():
    try:
        sweep_template.launch_template(1, tracked=True)
        assert sweep_template.WITH_MLFLOW in psutil.Process(sweep_template.template_pid()).cmdline()
    finally:
        sweep_template.stop_template()
