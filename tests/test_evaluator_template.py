"""Sidecar evaluators forked from a warm template (tasks/training/evaluator_template.py, evaluator_forking_main.py).

Real processes throughout: a real template importing TensorFlow, real trainings
whose evaluators are forked from it, a real SIGKILL of a trainer process. What
must hold: a forked evaluator writes exactly the lines a started one writes
(same seed, same metrics), it is found as a started one is (its command line
names the evaluator's module), it goes when its trainer is killed (and the
template with it), and a training that finds no ready template for its
environment starts its evaluator as a new process, without waiting.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import train

from prefect_tensorflow.tasks.checkpoints.metrics_log import METRICS_FILE, read_metrics
from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
from prefect_tensorflow.tasks.training import evaluator_template
from prefect_tensorflow.tasks.training.sidecar_evaluator import ENTRY_MODULE

POLICY = CheckpointPolicy(save_checkpoints_steps=100, keep_checkpoint_max=None)


@pytest.fixture
def forks(monkeypatch):
    """What `fork_evaluator` answered, per training (the real function, recorded)."""
    answers: list = []
    real = evaluator_template.fork_evaluator

    def recording(request, log_path):
        answers.append(real(request, log_path))
        return answers[-1]

    monkeypatch.setattr(evaluator_template, "fork_evaluator", recording)
    return answers


@pytest.fixture(scope="module")
def template():
    evaluator_template.launch_template()
    assert evaluator_template.wait_until_ready(600), "the evaluator template did not start"
    yield evaluator_template.template_pid()
    evaluator_template.stop_template()


def _lines(model_dir: Path) -> list[dict]:
    """The metrics lines, without the time each was written."""
    lines = [json.loads(line) for line in (model_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    return [{k: v for k, v in line.items() if k != "time"} for line in lines]


def test_a_forked_evaluator_writes_what_a_started_one_writes(tmp_path, template, forks):
    warm = train(tmp_path / "warm", steps=300, policy=POLICY, seed=5)
    assert len(forks) == 1 and forks[0] is not None, "the training's evaluator was not forked from the ready template"
    assert psutil.Process(template).is_running()
    forked_pid = forks[0].pid
    evaluator_template.stop_template()  # the next training finds none: a started evaluator
    try:
        cold = train(tmp_path / "cold", steps=300, policy=POLICY, seed=5)
    finally:
        evaluator_template.launch_template()
        assert evaluator_template.wait_until_ready(600)
    assert forks[1] is None
    assert sorted(read_metrics(tmp_path / "warm")) == [0, 100, 200, 300]
    # same checkpoints, one line each, the same metrics (to the last bits when both were evaluated on one thread;
    # the started one of this short training may not be ready before it ends: the trainer evaluates then, on two)
    warm_lines, cold_lines = _lines(tmp_path / "warm"), _lines(tmp_path / "cold")
    assert [(w["step"], w["checkpoint"]) for w in warm_lines] == [(c["step"], c["checkpoint"]) for c in cold_lines]
    for w, c in zip(warm_lines, cold_lines):
        assert w["metrics"] == pytest.approx(c["metrics"], rel=1e-6)
    assert warm.final_metrics == read_metrics(tmp_path / "warm")[300]
    assert cold.final_metrics == pytest.approx(warm.final_metrics, rel=1e-6)
    log = (tmp_path / "warm" / "eval" / "evaluator.log").read_text()
    assert log.count("evaluating") == 4 or "the trainer evaluates" in log, log
    assert not psutil.pid_exists(forked_pid) or psutil.Process(forked_pid).status() == psutil.STATUS_ZOMBIE


def test_no_ready_template_for_this_environment_means_a_started_evaluator(tmp_path, template, forks, monkeypatch):
    # a variable read when Python starts changed (the rest of the environment goes with each fork request)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(tmp_path)])))
    running = evaluator_template.template_pid()
    assert running is not None and not evaluator_template.template_ready()
    train(tmp_path / "m", steps=200, policy=POLICY)
    assert forks == [None]
    assert sorted(read_metrics(tmp_path / "m")) == [0, 100, 200]
    assert evaluator_template.template_pid() == running and psutil.pid_exists(running)  # a lookup replaces nothing
    monkeypatch.undo()
    assert evaluator_template.template_ready()


TRAINER = """
import sys
from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
from prefect_tensorflow.tasks.configs import TrainingConfig
from prefect_tensorflow.tasks.training import evaluator_template
from prefect_tensorflow.tasks.training.loop import train_with_checkpoints

evaluator_template.launch_template()
assert evaluator_template.wait_until_ready(600)
print(evaluator_template.template_pid(), flush=True)
policy = CheckpointPolicy(save_checkpoints_steps=100, keep_checkpoint_max=None)
config = TrainingConfig(steps=600, data="models_for_tests:slow_eval_dataset", policy=policy)
train_with_checkpoints(sys.argv[1], config)
"""


@pytest.mark.slow
def test_killing_the_trainer_takes_its_forked_evaluator_and_the_template_along(tmp_path, cli_env):
    model_dir = tmp_path / "m"
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER, str(model_dir)], env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert trainer.stdout is not None
        template = int(trainer.stdout.readline())
        log = model_dir / "eval" / "evaluator.log"
        deadline = time.monotonic() + 300
        while not (log.exists() and "evaluating" in log.read_text()):
            assert trainer.poll() is None, trainer.stderr.read()[-3000:] if trainer.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        evaluators = [p for p in psutil.Process(template).children() if ENTRY_MODULE in " ".join(p.cmdline())]
        assert len(evaluators) == 1, "the evaluator is the template's child, named as a started evaluator"
        evaluator = evaluators[0]
        trainer.send_signal(signal.SIGKILL)  # the trainer only
        trainer.wait()
        _, alive = psutil.wait_procs([evaluator, psutil.Process(template)], timeout=30)
        assert alive == [], f"still running after the trainer was killed: {alive}"
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    assert os.path.exists(model_dir / "checkpoint")


def test_a_forked_evaluator_is_stopped_or_taken_over_like_a_started_one(tmp_path, template):
    from prefect_tensorflow.tasks.training.sidecar_evaluator import TAKEN_OVER, EvaluationSpec, SidecarEvaluator

    spec = EvaluationSpec(model="iris", data="iris")
    failed = SidecarEvaluator(str(tmp_path / "failed"), spec)  # a training that failed: stop() ends it at once
    assert failed.forked
    failed.stop()
    assert failed._process.returncode is not None and failed._held == []

    short = SidecarEvaluator(str(tmp_path / "short"), spec, take_over=spec)  # ends before its evaluator is ready
    assert short.forked
    short.finish()
    assert short._process.returncode is not None
    assert TAKEN_OVER in (tmp_path / "short" / "eval" / "evaluator.log").read_text()


def test_an_evaluator_that_cannot_start_leaves_no_descriptor_open(tmp_path, monkeypatch):
    from prefect_tensorflow.tasks.training import sidecar_evaluator
    from prefect_tensorflow.tasks.training.sidecar_evaluator import EvaluationSpec, SidecarEvaluator

    def refuse(*args, **kwargs):
        raise OSError(24, "Too many open files")  # what a full process table or fd table gives

    monkeypatch.setattr(evaluator_template, "fork_evaluator", lambda request, log_path: None)  # the started path
    monkeypatch.setattr(sidecar_evaluator, "start_process", refuse)
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="Too many open files"):
        SidecarEvaluator(str(tmp_path / "m"), EvaluationSpec(model="iris", data="iris"))
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_two_trainings_at_once_each_get_their_own_forked_evaluator(tmp_path, template, forks):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda name: train(tmp_path / name, steps=200, policy=POLICY, seed=3), ["a", "b"]))
    assert len(forks) == 2 and all(f is not None for f in forks) and forks[0].pid != forks[1].pid
    for name, result in zip(["a", "b"], results):
        assert sorted(read_metrics(tmp_path / name)) == [0, 100, 200]
        assert result.final_metrics == read_metrics(tmp_path / name)[200]
