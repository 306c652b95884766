"""A training shorter than its sidecar evaluator's start-up (a TensorFlow import): the trainer evaluates what is
left itself once the loop has ended, so the call returns soon, with every kept checkpoint's metrics."""

from __future__ import annotations

import os
import time

import psutil
from helpers import train
from test_evaluation import committed_steps, line_steps

from prefect_tensorflow.tasks.checkpoints.metrics_log import METRICS_FILE, read_metrics
from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
from prefect_tensorflow.tasks.configs import TrainingConfig
from prefect_tensorflow.tasks.training.sidecar_evaluator import TAKEN_OVER, SidecarEvaluator, evaluation_spec

EVALUATOR_MODULE = "sidecar_evaluator_main"


def evaluators() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if EVALUATOR_MODULE in " ".join(p.cmdline())]


def test_a_training_shorter_than_the_evaluators_start_up_is_evaluated_by_the_trainer(tmp_path):
    model_dir = tmp_path / "m"
    policy = CheckpointPolicy(save_checkpoints_steps=50, keep_checkpoint_max=2)
    result = train(model_dir, steps=200, policy=policy)  # ~0.5 s of steps; the evaluator's import takes seconds
    log = (model_dir / "eval" / "evaluator.log").read_text()
    assert TAKEN_OVER in log and log.count("evaluating") == 5, log
    counts = line_steps(model_dir)
    assert counts == {step: 1 for step in (0, 50, 100, 150, 200)}, counts  # one line each, none lost or doubled
    recorded = read_metrics(str(model_dir))
    assert all({"loss", "accuracy"} <= set(recorded[step]) for step in counts), recorded
    assert {"loss", "accuracy", "train_loss"} <= set(recorded[200])  # the loss the sidecar was told is kept
    assert result.final_metrics == recorded[200]
    assert committed_steps(model_dir) == [150, 200]  # the keep policy's last sweep ran after the evaluations
    assert evaluators() == []  # the evaluator that was still starting is gone


def test_the_trainers_take_over_in_a_deployment_run_builds_the_model_by_its_registered_name(tmp_path, monkeypatch):
    """In a deployment run only registered names import (`model_code`'s untrusted rule): the take-over builds the
    model and data as the config names them (`iris`), not as the import strings the sidecar's own process gets."""
    from prefect_tensorflow.tasks import model_code

    monkeypatch.setattr(model_code, "in_deployment_run", lambda: True)
    model_dir = tmp_path / "m"
    train(model_dir, steps=100, policy=CheckpointPolicy(save_checkpoints_steps=50))
    log = (model_dir / "eval" / "evaluator.log").read_text()
    assert TAKEN_OVER in log, log
    assert line_steps(model_dir) == {0: 1, 50: 1, 100: 1}, log


def test_an_evaluator_that_is_ready_evaluates_to_the_end(tmp_path):
    """The usual path of a longer training: the evaluator says it is ready; `finish` leaves the work to it."""
    model_dir = tmp_path / "m"
    config = TrainingConfig(steps=100, policy=CheckpointPolicy(save_checkpoints_steps=50))
    train(model_dir, **config.model_dump())
    (model_dir / METRICS_FILE).write_text("")  # as if a killed training's evaluator had died with it
    evaluator = SidecarEvaluator(str(model_dir), evaluation_spec(config), take_over=evaluation_spec(config, resolved=False))
    deadline = time.monotonic() + 300
    while not evaluator.ready():
        assert evaluator.alive() and time.monotonic() < deadline, (model_dir / "eval" / "evaluator.log").read_text()
        time.sleep(0.05)
    evaluator.finish()
    log = (model_dir / "eval" / "evaluator.log").read_text()
    assert log.count(TAKEN_OVER) == 1 and log.rstrip().endswith("model.ckpt-100"), log  # the first training's only
    assert line_steps(model_dir) == {0: 1, 50: 1, 100: 1}
    assert evaluators() == [] and os.path.exists(model_dir / "checkpoint")
