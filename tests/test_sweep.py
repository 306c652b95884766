"""The `sweep` flow on Dask: an embedded LocalCluster, and a real `dask scheduler` + 2 `dask worker`s on 127.0.0.1.

The uninterrupted sweep (LocalCluster, tracked in an SQLite MLflow store) is
the reference. On the real cluster, the Dask worker process training one
candidate is SIGKILLed mid-training: its trainer dies with it, Dask runs the
task again, the candidate resumes from its newest valid checkpoint, and the
sweep ends with the reference's winner and bit-identical weights. Running a
sweep again trains nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import sweep_trainer_of
from pydantic import TypeAdapter, ValidationError

from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
from prefect_tensorflow.tasks.configs import TrainingConfig
from prefect_tensorflow.tasks.errors import UnsafeParameterError
from prefect_tensorflow.tasks.training.sweep_candidates import (
    ATTEMPTS_FILE,
    Candidate,
    Candidates,
    SweepError,
    candidate_config,
    candidate_id,
    plan_candidates,
    rank_candidates,
    train_candidate,
)

STEPS = 1200  # small: what the tests check (ranking, resuming, bit-equal weights) does not depend on it
SAVE_EVERY = 200
KILL_AT = 400  # the victim's worker dies once this checkpoint exists: a third of the way
BASE = TrainingConfig(
    steps=STEPS, policy=CheckpointPolicy(save_checkpoints_steps=SAVE_EVERY, keep_checkpoint_max=None), evaluation="in_loop"
)
CANDIDATES = [Candidate(hparams={"learning_rate": 0.05}, seed=0), Candidate(hparams={"learning_rate": 0.2}, seed=1)]
TRAINER_MODULE = "prefect_tensorflow.tasks.training.sweep_trainer_main"
FORKING_MODULE = "prefect_tensorflow.tasks.training.sweep_forking_main"
DASK = str(Path(sys.executable).with_name("dask"))


# --- settings, checked before anything runs ---------------------------------------------------


def test_candidates_are_typed_and_bounded_for_the_ui_form():
    schema = TypeAdapter(Candidates).json_schema()
    assert (schema["minItems"], schema["maxItems"]) == (1, 64)
    candidate = schema["$defs"]["Candidate"]["properties"]
    assert candidate["hparams"]["maxProperties"] == 32
    assert all(candidate[name].get("description") for name in ("hparams", "seed", "steps"))
    with pytest.raises(ValidationError, match="seed"):
        Candidate(seed=-1)
    with pytest.raises(ValidationError, match="Extra inputs"):
        Candidate.model_validate({"learning_rate": 0.1})
    with pytest.raises(ValidationError):
        TypeAdapter(Candidates).validate_python([])


def test_a_candidate_id_is_stable_and_changes_with_what_decides_the_checkpoints(tmp_path):
    config = candidate_config(BASE, CANDIDATES[0])
    assert candidate_id(config) == candidate_id(candidate_config(BASE, CANDIDATES[0]))
    assert candidate_id(config) != candidate_id(candidate_config(BASE, CANDIDATES[1]))
    assert candidate_id(config) != candidate_id(config.model_copy(update={"batch_size": 16}))
    assert candidate_id(config) == candidate_id(config.model_copy(update={"summary_every_n_steps": 7}))
    specs = plan_candidates(str(tmp_path), BASE, CANDIDATES)
    assert [s.model_dir for s in specs] == [str(tmp_path / candidate_id(candidate_config(BASE, c))) for c in CANDIDATES]
    assert specs[0].config.model == "prefect_tensorflow.tasks.iris:build_model"  # resolved where trust is decided
    with pytest.raises(SweepError, match="candidates: 0 and 1 have the same settings"):
        plan_candidates(str(tmp_path), BASE, [CANDIDATES[0], CANDIDATES[0]])
    with pytest.raises(SweepError, match="training.more_steps"):
        candidate_config(BASE.model_copy(update={"more_steps": 10}), CANDIDATES[0])
    with pytest.raises(SweepError, match="training.workers"):
        candidate_config(BASE.model_copy(update={"workers": 2}), CANDIDATES[0])


def test_ranking_and_the_flow_parameters_that_are_refused(monkeypatch):
    from prefect_tensorflow.flows import sweep as sweep_module

    assert rank_candidates({0: 0.9, 1: 0.97, 2: 0.97}, "max") == [1, 2, 0]
    assert rank_candidates({0: 0.3, 1: 0.1}, "min") == [1, 0]
    with pytest.raises(ValueError, match="select: a sweep compares its candidates by a metric"):
        sweep_module.sweep_selection("latest")
    assert str(sweep_module.sweep_selection("best:loss")) == "best:loss:min"
    with pytest.raises(ValueError, match="dask_address: expected a scheduler address"):
        sweep_module.checked_dask_address("http://x:1; rm -rf /")
    monkeypatch.setenv("PREFECT_TENSORFLOW_DASK_ADDRESS", "tcp://10.0.0.5:8786")
    assert sweep_module.checked_dask_address("") == "tcp://10.0.0.5:8786"
    monkeypatch.setattr(sweep_module, "in_deployment_run", lambda: True)
    with pytest.raises(UnsafeParameterError, match="dask_address: deployment runs use the scheduler in PREFECT_TENSORFLOW_DASK"):
        sweep_module.checked_dask_address("tcp://203.0.113.9:8786")
    assert sweep_module.checked_dask_address("tcp://10.0.0.5:8786") == "tcp://10.0.0.5:8786"


# --- the uninterrupted sweep on an embedded LocalCluster ---------------------------------------


def final_tensors(model_dir: Path) -> dict:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(model_dir / f"model.ckpt-{STEPS}"))
    names = [n for n in reader.get_variable_to_shape_map() if n.startswith(("model/", "optimizer/", "global_step"))]
    return {n: reader.get_tensor(n) for n in names}


def attempts(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / ATTEMPTS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, mlflow_template_db) -> dict:
    from prefect_tensorflow.tasks.blocks import MlflowConnection

    root = tmp_path_factory.mktemp("sweep")
    (root / "mlflow").mkdir()
    shutil.copyfile(mlflow_template_db, root / "mlflow" / "mlflow.db")
    connection = MlflowConnection(
        tracking_uri=f"sqlite:///{root}/mlflow/mlflow.db", experiment_name="sweeps", operation_retries=0
    )
    return {"root": root, "mlflow": connection}


def run_sweep(outputs: dict, sweep_root: Path, **options):
    from prefect_tensorflow.flows.sweep import sweep

    defaults = {
        "candidates": CANDIDATES,
        "sweep_root": str(sweep_root),
        "training": BASE,
        "export_base": str(outputs["root"] / "export"),
        "frozen_dir": str(outputs["root"] / "frozen"),
        "registered_model_name": "sweep-iris",
        "mlflow": outputs["mlflow"],
    }
    return sweep(**{**defaults, **options})


@pytest.fixture(scope="module")
def uninterrupted(prefect_api, outputs) -> dict:
    started = time.monotonic()
    summary = run_sweep(outputs, outputs["root"] / "local")
    return {"summary": summary, "root": outputs["root"] / "local", "seconds": time.monotonic() - started}


@pytest.mark.slow
def test_a_local_cluster_sweep_ships_the_best_candidate_and_tracks_parent_and_child_runs(uninterrupted, outputs):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    summary = uninterrupted["summary"]
    results = {r.index: r for r in summary.candidates}
    assert sorted(results) == [0, 1] and not any(r.skipped for r in results.values())
    assert all(r.training.final_step == STEPS and r.training.start_step == 0 for r in results.values())
    assert all(r.forked for r in results.values())  # each forked from its worker's warm template, tracked in MLflow
    best = {row["candidate"]: row["accuracy"] for row in summary.comparison}
    winner = max(best, key=lambda i: (best[i], -i))
    assert summary.winner == results[winner].candidate_id
    assert summary.checkpoint.model_dir == results[winner].model_dir
    assert [row["winner"] for row in summary.comparison] == ["yes" if i == winner else "" for i in (0, 1)]
    assert summary.export.version == 1 and summary.export.parity.ok and summary.frozen_graph.parity.ok
    registered = summary.registered
    assert (registered.name, registered.version) == ("sweep-iris", 1)
    assert registered.aliases == ["challenger", "champion"]
    assert registered.run_id == results[winner].training.mlflow_run_id  # logged into the winner's own run

    client = outputs["mlflow"].client()
    parent = client.get_run(summary.mlflow_parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect_tensorflow.winner"] == summary.winner
    assert parent.data.metrics["best_accuracy"] == pytest.approx(best[winner], abs=1e-6)
    assert {f"accuracy/{r.candidate_id}" for r in results.values()} <= set(parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert artifacts == {"sweep/comparison.json", "sweep/comparison.csv"}
    for result in results.values():
        child = client.get_run(result.training.mlflow_run_id)
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["prefect_tensorflow.candidate_id"] == result.candidate_id
        assert child.data.tags["prefect.flow_run_id"] == summary.flow_run_id
        assert {"eval/accuracy", "loss"} <= set(child.data.metrics)
        assert child.data.params["hparams.learning_rate"] == str(result.hparams["learning_rate"])

    with get_client(sync_client=True) as prefect:
        tables = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sweep-comparison"])))
    assert any(str(t.flow_run_id) == summary.flow_run_id for t in tables)


@pytest.mark.slow
def test_running_the_sweep_again_trains_nothing(uninterrupted, outputs):
    before = Counter(a["candidate_id"] for a in attempts(uninterrupted["root"]) if a["event"] == "started")
    started = time.monotonic()
    again = run_sweep(outputs, uninterrupted["root"])
    assert all(r.skipped for r in again.candidates)
    assert again.winner == uninterrupted["summary"].winner
    assert again.export.reused and again.registered.version == 1
    after = Counter(a["candidate_id"] for a in attempts(uninterrupted["root"]) if a["event"] == "started")
    assert after == before == Counter({r.candidate_id: 1 for r in again.candidates})
    # A finished candidate's task (what Dask would run again after a worker death) starts nothing.
    spec = plan_candidates(str(uninterrupted["root"]), BASE, CANDIDATES)[0]
    t0 = time.monotonic()
    assert train_candidate(spec).skipped and time.monotonic() - t0 < 5
    print(f"uninterrupted sweep {uninterrupted['seconds']:.0f} s, again {time.monotonic() - started:.0f} s")


# --- a real cluster: `dask scheduler` + 2 `dask worker` processes on 127.0.0.1 --------------------


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory, prefect_api):
    from distributed import Client
    from prefect.settings import PREFECT_API_URL

    from prefect_tensorflow.tasks.child_processes import stop_process_group

    state = tmp_path_factory.mktemp("dask-cluster")
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_HOME": str(state / "prefect-home"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    scheduler_file = state / "scheduler.json"
    local = ["--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]  # Dask's HTTP server is on :8787 otherwise
    processes = []

    def directory(i: int) -> list[str]:
        return ["--local-directory", str(state / f"w{i}")]

    def start(name: str, command: list[str]) -> None:
        with open(state / f"{name}.log", "ab") as log:
            processes.append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=state, start_new_session=True)
            )

    try:
        start("scheduler", [DASK, "scheduler", *local, "--port", "0", "--scheduler-file", str(scheduler_file)])
        deadline = time.monotonic() + 180
        while not (scheduler_file.exists() and scheduler_file.stat().st_size):
            assert processes[0].poll() is None and time.monotonic() < deadline, (state / "scheduler.log").read_text()[-2000:]
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        for i in range(2):
            start(
                f"worker{i}",
                [
                    DASK,
                    "worker",
                    address,
                    *local,
                    "--nworkers",
                    "1",
                    "--nthreads",
                    "1",
                    "--nanny",
                    "--name",
                    f"w{i}",
                    *directory(i),
                ],
            )
        with Client(address, timeout=120) as client:
            client.wait_for_workers(2, timeout=300)
        yield {"address": address, "state": state}
    finally:
        for process in reversed(processes):
            stop_process_group(process)


@pytest.mark.slow
def test_killing_a_dask_worker_mid_sweep_resumes_its_candidate_and_ends_like_an_uninterrupted_sweep(
    dask_cluster, uninterrupted, outputs, tmp_path
):
    root = tmp_path / "sweep"
    victim_dir = root / uninterrupted["summary"].candidates[0].candidate_id
    killed: dict = {}

    def kill_when_a_third_trained() -> None:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not killed:
            if (victim_dir / f"model.ckpt-{KILL_AT}.index").exists():
                trainer = sweep_trainer_of(victim_dir)
                if trainer is not None:
                    worker = trainer.parent()
                    forked = FORKING_MODULE in worker.cmdline()  # forked from its worker's warm template
                    if forked:
                        worker = worker.parent()
                    killed.update(trainer=trainer.pid, worker=worker.pid, nanny_cmd=worker.parent().cmdline(), forked=forked)
                    worker.send_signal(signal.SIGKILL)
                    killed["trainer_gone"] = psutil.wait_procs([trainer], timeout=10)[1] == []
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_a_third_trained, daemon=True)
    killer.start()
    summary = run_sweep(outputs, root, dask_address=dask_cluster["address"], track=False)
    killer.join(timeout=5)

    assert killed, "the Dask worker was never killed"
    assert killed["nanny_cmd"][1:3] == [DASK, "worker"]  # the killed process is a Dask worker (its nanny restarts it)
    assert killed["trainer_gone"], "the trainer outlived its Dask worker"
    assert killed["forked"], "the trainer was not forked from its worker's warm template"
    reference = uninterrupted["summary"]
    assert summary.winner == reference.winner
    by_id = {r.candidate_id: r for r in summary.candidates}
    victim = by_id[victim_dir.name]
    assert victim.training.start_step >= KILL_AT  # resumed, not retrained from scratch
    for result in reference.candidates:
        mine, theirs = final_tensors(root / result.candidate_id), final_tensors(uninterrupted["root"] / result.candidate_id)
        assert set(mine) == set(theirs)
        assert all(np.array_equal(mine[k], theirs[k]) for k in mine), f"{result.candidate_id} differs"
    started = Counter(a["candidate_id"] for a in attempts(root) if a["event"] == "started")
    assert started[victim_dir.name] == 2
    assert all(count == 1 for cid, count in started.items() if cid != victim_dir.name)  # never trained twice
    assert sweep_trainer_of(victim_dir) is None


def test_the_cli_checks_the_candidates_before_anything_runs(tmp_path, capsys):
    from prefect_tensorflow.flows.cli import main

    for text, message in (
        ('[{"seed": -1}]', "--candidates: 0.seed: expected an integer >= 0"),
        ("not json", "--candidates: expected a JSON list"),
        ("[]", "--candidates: "),
        (f"@{tmp_path / 'missing.json'}", "--candidates: cannot read"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(["sweep", "--candidates", text, "--sweep-root", str(tmp_path / "root")])
        assert exited.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "root").exists()
