"""NaN is never "verified": a non-finite loss stops training before a checkpoint of those weights is saved,
a non-finite output fails every parity check naming the output and the side, and selection never picks a
checkpoint whose recorded metrics are NaN."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import export, train

from prefect_tensorflow.tasks.checkpoints.files import read_state_file
from prefect_tensorflow.tasks.checkpoints.metrics_log import METRICS_FILE, read_metrics
from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
from prefect_tensorflow.tasks.checkpoints.selection import (
    list_checkpoints,
    select_best_checkpoint,
    select_checkpoint_at_step,
    select_latest_checkpoint,
)
from prefect_tensorflow.tasks.errors import NonFiniteLossError, NoValidCheckpointError, ParityError
from prefect_tensorflow.tasks.export.verification import compare_outputs, verify_artifacts


def _all_finite(prefix: str) -> bool:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    for key, dtype in reader.get_variable_to_dtype_map().items():
        if dtype.is_floating and not np.all(np.isfinite(reader.get_tensor(key))):
            return False
    return True


@pytest.mark.parametrize(
    ("data", "summary_every", "evaluation", "stopped_at", "why"),
    [
        # NaN features: the loss stays finite, the weights do not; caught by the save at step 20
        (
            "nan",
            100,
            "in_loop",
            "between steps 15 and 20",
            "the weights hold NaN or infinite values (2 variables; hiddenlayer_0/kernel: 40 of 40",
        ),
        # infinite features: the loss is NaN; caught at the first summary step after it
        ("inf", 2, "none", "at step 16", "the training loss is nan"),
    ],
)
def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(tmp_path, data, summary_every, evaluation, stopped_at, why):
    model_dir = tmp_path / "iris"
    policy = CheckpointPolicy(save_checkpoints_steps=5, keep_checkpoint_max=None)
    with pytest.raises(NonFiniteLossError) as caught:
        train(
            model_dir,
            data=f"models_for_tests:iris_with_{data}",
            steps=40,
            batch_size=8,
            shuffle_buffer=1,
            summary_every_n_steps=summary_every,
            evaluation=evaluation,
            policy=policy,
        )
    message = str(caught.value)
    assert f"training diverged {stopped_at} in {model_dir}: {why}" in message
    assert "the newest checkpoint (step 15) is the last good one" in message
    steps = sorted(info.step for info in list_checkpoints(model_dir))
    assert steps == [0, 5, 10, 15]  # nothing of the NaN weights was written, the good ones were all committed
    assert all(_all_finite(info.path) for info in list_checkpoints(model_dir))
    assert read_state_file(str(model_dir)).model_checkpoint_path.endswith("model.ckpt-15")
    assert select_latest_checkpoint(str(model_dir)).step == 15
    recorded = read_metrics(model_dir)
    assert max(recorded) == 15 and all(np.isfinite(v) for m in recorded.values() for v in m.values())


def test_compare_outputs_names_the_non_finite_output_and_side():
    good = {"logits": np.ones((4, 3)), "class_ids": np.zeros(4)}
    inf = {"logits": np.full((4, 3), np.inf), "class_ids": np.zeros(4)}
    parity = compare_outputs(good, inf, tolerance=1e9, sides=("checkpoint", "frozen graph"))
    assert not parity.ok
    assert parity.non_finite == {"logits": "frozen graph: 12 inf of 12 values"}
    assert "output 'logits' is not finite in frozen graph: 12 inf of 12 values" in parity.explain()
    both = compare_outputs({"y": np.array([np.nan])}, {"y": np.array([np.nan])})
    assert not both.ok and both.non_finite == {"y": "expected: 1 NaN of 1 values, actual: 1 NaN of 1 values"}
    assert compare_outputs(good, good).ok


def _nan_saved_model(source: str, target: str) -> None:
    """`source` re-saved with every float variable overwritten by NaN (same serving signature)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(source)
    for variable in loaded.signatures["serving_default"].variables:
        if variable.dtype.is_floating:
            variable.assign(tf.fill(variable.shape, tf.constant(float("nan"), variable.dtype)))
    tf.saved_model.save(loaded, target, signatures={"serving_default": loaded.signatures["serving_default"]})


def test_saved_model_with_nan_variables_fails_verification(trained_dir, tmp_path):
    checkpoint = str(trained_dir / "model.ckpt-300")
    good = export(checkpoint, tmp_path / "exports")
    assert verify_artifacts(checkpoint, saved_model=good.path).ok
    poisoned = str(tmp_path / "poisoned")
    _nan_saved_model(good.path, poisoned)
    with pytest.raises(ParityError) as caught:
        verify_artifacts(checkpoint, saved_model=poisoned)
    message = str(caught.value)
    assert "output 'probabilities' is not finite in saved_model" in message
    assert "output 'logits' is not finite in saved_model" in message
    report = caught.value.report  # type: ignore[attr-defined]
    assert not report.ok and "logits" in report.pairs["checkpoint vs saved_model"].non_finite


def test_export_of_a_nan_checkpoint_writes_no_version(trained_dir, tmp_path):
    """The original fault: NaN weights exported and verified (`max(0.0, nan)` is 0.0)."""
    import tensorflow as tf

    from prefect_tensorflow.tasks import iris

    model_dir = tmp_path / "nan-model"
    shutil.copytree(trained_dir, model_dir)
    net = iris.build_model()
    ckpt = tf.train.Checkpoint(model=net)
    ckpt.read(str(model_dir / "model.ckpt-300")).expect_partial()
    for variable in net.trainable_variables:
        variable.assign(tf.fill(variable.shape, float("nan")))
    prefix = ckpt.write(str(model_dir / "model.ckpt-400"))
    base = tmp_path / "exports"
    with pytest.raises(
        ParityError,
        match=r"SavedModel of .*model.ckpt-400 fails verification: output 'class_ids'|"
        r"output 'logits' is not finite in checkpoint",
    ):
        export(prefix, base)
    assert not base.exists() or not any(p.name.isdigit() for p in base.iterdir())


def _log_line(model_dir, step: int, metrics: dict) -> None:
    # json.dumps writes NaN as the bare token NaN, as older versions and other tools left it in the log
    with open(model_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": step, "checkpoint": f"model.ckpt-{step}", "time": 0, "metrics": metrics}) + "\n")


def test_selection_skips_checkpoints_with_nan_metrics(model_dir_copy, caplog):
    _log_line(model_dir_copy, 300, {"accuracy": float("nan"), "loss": 0.01})
    _log_line(model_dir_copy, 200, {"accuracy": 2.0, "loss": float("inf")})
    latest = select_latest_checkpoint(str(model_dir_copy))
    assert latest.step == 100
    assert "model.ckpt-300: recorded metrics are not finite: accuracy=nan" in caplog.text
    assert "model.ckpt-200: recorded metrics are not finite: loss=inf" in caplog.text
    assert select_best_checkpoint(str(model_dir_copy), "accuracy", "max").step == 100
    assert select_best_checkpoint(str(model_dir_copy), "loss", "min").step == 100
    with pytest.raises(NoValidCheckpointError, match="step 300 is not selectable: its recorded metrics are not finite"):
        select_checkpoint_at_step(str(model_dir_copy), 300)
    rows = {info.step: info for info in list_checkpoints(model_dir_copy)}
    assert not rows[300].valid and rows[300].reason == "recorded metrics are not finite: accuracy=nan"
    assert rows[100].valid
    _log_line(model_dir_copy, 100, {"loss": float("nan")})
    assert select_latest_checkpoint(str(model_dir_copy)).step == 0
    _log_line(model_dir_copy, 0, {"loss": float("-inf")})
    with pytest.raises(NoValidCheckpointError, match="model.ckpt-100: recorded metrics are not finite: loss=nan"):
        select_latest_checkpoint(str(model_dir_copy))


@pytest.mark.slow
def test_two_workers_stop_together_on_non_finite_weights(tmp_path, monkeypatch):
    """The same loop on each worker: the check's collective gives every worker the same answer, the
    supervisor does not restart a training no restart can cure, and the newest checkpoint is the last good one."""
    from pathlib import Path

    from prefect_tensorflow.tasks.configs import TrainingConfig
    from prefect_tensorflow.tasks.training.multi_worker import MultiWorkerError, train_multi_worker

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the workers import the test loader
    model_dir = tmp_path / "iris"
    config = TrainingConfig(
        steps=40,
        workers=2,
        data="models_for_tests:iris_with_nan",
        batch_size=8,
        shuffle_buffer=1,
        evaluation="none",
        policy=CheckpointPolicy(save_checkpoints_steps=5, keep_checkpoint_max=None),
    )
    with pytest.raises(MultiWorkerError, match="training diverged between steps 15 and 20"):
        train_multi_worker(str(model_dir), config)
    infos = list_checkpoints(model_dir)
    assert sorted(info.step for info in infos) == [0, 5, 10, 15]
    assert all(_all_finite(info.path) for info in infos)
    assert select_latest_checkpoint(str(model_dir)).step == 15
