"""Evaluation off the training loop: the sidecar evaluator, its one line per checkpoint, and waiting for it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from helpers import cli_command, train

from prefect_tensorflow.tasks.checkpoints.files import checkpoint_prefixes, read_state_file, step_of
from prefect_tensorflow.tasks.checkpoints.metrics_log import METRICS_FILE, read_metrics
from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
from prefect_tensorflow.tasks.errors import MetricsTimeoutError

EVALUATOR_MODULE = "prefect_tensorflow.tasks.training.sidecar_evaluator_main"


def line_steps(model_dir: Path) -> Counter:
    """How many metrics lines each step has (raw lines, duplicates counted)."""
    counts: Counter = Counter()
    path = model_dir / METRICS_FILE
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                counts[json.loads(line)["step"]] += 1
    return counts


def committed_steps(model_dir: Path) -> list[int]:
    return sorted(s for s in (step_of(p) for p in checkpoint_prefixes(model_dir)) if s is not None)


def test_the_sidecar_writes_one_line_per_checkpoint_with_the_training_loss(tmp_path):
    policy = CheckpointPolicy(save_checkpoints_steps=50, keep_checkpoint_max=None)
    result = train(tmp_path / "m", steps=200, policy=policy)  # evaluation="sidecar" is the default
    counts = line_steps(tmp_path / "m")
    assert sorted(counts) == committed_steps(tmp_path / "m") == [0, 50, 100, 150, 200]
    assert set(counts.values()) == {1}
    recorded = read_metrics(tmp_path / "m")
    assert {"loss", "accuracy", "train_loss"} <= set(recorded[200])
    assert "train_loss" not in recorded[0]  # no step had run before the first checkpoint
    assert result.final_metrics == recorded[200]  # train() waits for the evaluator before it returns
    assert any(n.startswith("events.out.tfevents.") for n in os.listdir(tmp_path / "m" / "eval"))


def test_in_loop_and_no_evaluation_remain_available(tmp_path):
    policy = CheckpointPolicy(save_checkpoints_steps=50)
    train(tmp_path / "in", steps=100, policy=policy, evaluation="in_loop")
    assert {"loss", "accuracy", "train_loss"} <= set(read_metrics(tmp_path / "in")[100])
    train(tmp_path / "none", steps=100, policy=policy, evaluation="none")
    assert set(read_metrics(tmp_path / "none")[100]) == {"train_loss"}


def test_best_is_never_chosen_from_incomplete_metrics(tmp_path, monkeypatch):
    from prefect_tensorflow.tasks.checkpoints.selection import select_best_checkpoint
    from prefect_tensorflow.tasks.training.sidecar_evaluator import EvaluationSpec, evaluate_missing, evaluator_lock

    model_dir = tmp_path / "m"
    train(model_dir, steps=150, policy=CheckpointPolicy(save_checkpoints_steps=50, keep_checkpoint_max=None), evaluation="none")
    lines = (model_dir / METRICS_FILE).read_text().splitlines(keepends=True)
    evaluated = {100: 0.1}
    (model_dir / METRICS_FILE).write_text(
        "".join(
            line.replace('"metrics": {', f'"metrics": {{"loss": {evaluated[100]}, ') for line in lines if '"step": 100' in line
        )
    )  # only step 100 has an evaluation: the others are missing
    with pytest.raises(MetricsTimeoutError) as info:
        select_best_checkpoint(str(model_dir), "loss", "min")
    assert "[0, 50, 150]" in str(info.value) and "no evaluator is running" in str(info.value)

    monkeypatch.setenv("PREFECT_TENSORFLOW_METRICS_TIMEOUT", "1")
    with evaluator_lock(str(model_dir)):  # an evaluator at work that never finishes: a bounded wait
        started = time.monotonic()
        with pytest.raises(MetricsTimeoutError, match="did not record them within 1 s"):
            select_best_checkpoint(str(model_dir), "loss", "min")
        assert time.monotonic() - started >= 1.0

    assert (
        evaluate_missing(
            str(model_dir),
            EvaluationSpec(model="prefect_tensorflow.tasks.iris:build_model", data="prefect_tensorflow.tasks.iris:load_dataset"),
        )
        == 3
    )
    assert select_best_checkpoint(str(model_dir), "loss", "min").step in (0, 50, 100, 150)


def slow_eval_training_command(model_dir) -> list[str]:
    """`prefect-tensorflow train` of 600 steps, a checkpoint every 100, all kept, with an eval split
    that takes ~1.5 s per checkpoint (`slow_eval_dataset`): a test can catch the sidecar mid-checkpoint."""
    return cli_command(
        "train",
        "--model-dir",
        str(model_dir),
        "--steps",
        "600",
        "--save-checkpoints-steps",
        "100",
        "--keep-checkpoint-max",
        "0",
        "--data",
        "models_for_tests:slow_eval_dataset",
    )


@pytest.mark.slow
def test_killing_the_trainer_while_the_evaluator_is_mid_checkpoint_leaves_one_line_per_checkpoint(tmp_path, cli_env):
    model_dir = tmp_path / "m"
    cmd = slow_eval_training_command(model_dir)
    trainer = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = model_dir / "eval" / "evaluator.log"
    deadline = time.monotonic() + 300
    try:
        while True:  # the evaluator has started on a checkpoint and the trainer has committed more
            started = log.read_text().count("evaluating") if log.exists() else 0
            if started >= 2 and len(line_steps(model_dir)) < started:
                break
            assert trainer.poll() is None, "training finished before the evaluator could be caught mid-checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        trainer.send_signal(signal.SIGKILL)  # the trainer only: its evaluator dies with it (PR_SET_PDEATHSIG)
        trainer.wait()
        killed_at = committed_steps(model_dir)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    result = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=900)  # resume to the end
    assert result.returncode == 0, result.stderr[-3000:]
    deadline = time.monotonic() + 300
    while set(line_steps(model_dir)) != set(committed_steps(model_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)  # the first evaluator may still be finishing what it was told
    counts = line_steps(model_dir)
    assert committed_steps(model_dir) == [0, 100, 200, 300, 400, 500, 600]
    assert sorted(counts) == committed_steps(model_dir), (counts, killed_at)
    assert set(counts.values()) == {1}, counts  # exactly one line each: no checkpoint evaluated twice
    assert step_of(read_state_file(model_dir).model_checkpoint_path) == 600


def test_the_keep_policy_waits_for_the_sidecar_so_every_checkpoint_gets_its_line(tmp_path):
    """A training faster than the evaluator's start-up: the checkpoints the keep policy drops are
    still evaluated first, then deleted; the model dir ends with the newest `keep_checkpoint_max`."""
    model_dir = tmp_path / "m"
    train(model_dir, steps=1500, policy=CheckpointPolicy(save_checkpoints_steps=250, keep_checkpoint_max=2))
    assert line_steps(model_dir) == Counter({step: 1 for step in range(0, 1501, 250)})
    assert all("accuracy" in metrics for metrics in read_metrics(str(model_dir)).values())
    assert committed_steps(model_dir) == [1250, 1500]  # the files
    state = (model_dir / "checkpoint").read_text()
    assert state.count("all_model_checkpoint_paths:") == 2 and 'model_checkpoint_path: "model.ckpt-1500"' in state


@pytest.mark.slow
def test_a_model_dir_swapped_for_a_symlink_while_the_sidecar_evaluates_gets_nothing_written_where_it_leads(tmp_path, cli_env):
    """Issue 19, class 6: the evaluator writes through the model dir the trainer opened (its descriptor),
    and checks before each line that the path still names it: the swapped-in symlink leads nowhere."""
    from prefect_tensorflow.tasks.training.sidecar_evaluator import TAKEN_OVER, evaluator_running

    model_dir, outside = tmp_path / "m", tmp_path / "outside"
    outside.mkdir()
    moved = tmp_path / "m.moved"
    cmd = slow_eval_training_command(model_dir)
    trainer = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = model_dir / "eval" / "evaluator.log"
    deadline = time.monotonic() + 300
    try:
        while True:  # the evaluator is in the middle of a checkpoint (~1.5 s each): swap now
            started = log.read_text().count("evaluating") if log.exists() else 0
            if started >= 1 and len(line_steps(model_dir)) < started:
                break
            assert trainer.poll() is None, "training finished before the evaluator could be caught mid-checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        evaluators = [p for p in psutil.Process(trainer.pid).children(recursive=True) if EVALUATOR_MODULE in p.cmdline()]
        os.rename(model_dir, moved)
        os.symlink(outside, model_dir)
        swapped_with = len(line_steps(moved))
        assert (moved / "eval" / "evaluator.log").read_text().count("evaluating") > swapped_with  # caught mid-checkpoint
        _, stderr = trainer.communicate(timeout=300)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    # The trainer may be saving still (its own verify then fails the run) or already waiting for the evaluator.
    assert trainer.returncode == 0 or b"was moved or replaced" in stderr, stderr[-3000:]
    # The sidecar, or the trainer itself when the training ended before the sidecar was ready (issue 23).
    assert len(evaluators) == 1 or TAKEN_OVER in (moved / "eval" / "evaluator.log").read_text()
    _, alive = psutil.wait_procs(evaluators, timeout=120)  # it finishes the checkpoint it was evaluating, then stops
    assert not alive and not evaluator_running(str(moved))
    assert os.listdir(outside) == []  # no metrics line, event file or lock where the symlink leads
    assert len(line_steps(moved)) == swapped_with  # and no line after the swap in the moved dir either
    assert "the evaluator stops" in (moved / "eval" / "evaluator.log").read_text()


def test_the_evaluator_lock_and_log_follow_no_symlink(tmp_path):
    from prefect_tensorflow.tasks.errors import StorageError
    from prefect_tensorflow.tasks.training.sidecar_evaluator import LOCK_FILE, evaluator_lock, prepare

    outside = tmp_path / "outside.txt"
    outside.write_text("")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / LOCK_FILE).symlink_to(outside)
    with pytest.raises(StorageError, match="is a symbolic link"):
        with evaluator_lock(str(tmp_path / "m")):
            pass
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / METRICS_FILE).symlink_to(outside)
    with pytest.raises(StorageError, match="is a symbolic link"):
        prepare(str(tmp_path / "n"))
    assert outside.read_text() == ""


def test_a_save_that_cannot_be_prepared_fails_the_training_before_its_first_step_and_stops_the_evaluator(tmp_path, monkeypatch):
    """A mocked fault (a checkpoint whose snapshot cannot be traced cannot be built for real here): the error
    reaches the caller, no step ran, nothing was committed, and the sidecar this process started is gone."""
    import threading

    from prefect_tensorflow.tasks.checkpoints.writer import CheckpointWriter

    def cannot_prepare(self):
        raise RuntimeError("tracing the snapshot failed")

    monkeypatch.setattr(CheckpointWriter, "prepare", cannot_prepare)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(RuntimeError, match="tracing the snapshot failed"):
        train(tmp_path / "m", steps=100, policy=CheckpointPolicy(save_checkpoints_steps=50))
    evaluators = [
        p for p in psutil.Process().children(recursive=True) if p.pid not in before and EVALUATOR_MODULE in " ".join(p.cmdline())
    ]
    assert evaluators == []
    assert committed_steps(tmp_path / "m") == []
    assert not any(t.name == "checkpoint-writer" for t in threading.enumerate())
