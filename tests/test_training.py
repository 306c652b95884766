"""train_with_checkpoints on the real iris model: files, resume, policies and bad inputs."""

import os

import numpy as np
import pytest
from helpers import train

from prefect_tensorflow.tasks.checkpoints.metrics_log import read_metrics
from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
from prefect_tensorflow.tasks.checkpoints.selection import select_latest_checkpoint
from prefect_tensorflow.tasks.errors import (
    CheckpointMismatchError,
    ImportStringError,
    ModelDirError,
    TrainingError,
)


def weights(prefix):
    """Every variable in a checkpoint except TF's own save counter."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    return {
        name: reader.get_tensor(name)
        for name, dtype in reader.get_variable_to_dtype_map().items()
        if name.endswith("VARIABLE_VALUE") and not name.startswith("save_counter")
    }


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


def test_model_dir_layout_is_the_guides(trained_dir):
    names = set(os.listdir(trained_dir))
    for step in (0, 100, 200, 300):
        assert f"model.ckpt-{step}.index" in names
        assert f"model.ckpt-{step}.data-00000-of-00001" in names
    assert {"checkpoint", "graph.pbtxt", "checkpoint_metrics.jsonl", "eval"} <= names
    assert any(n.startswith("events.out.tfevents.") for n in names)
    assert any(n.startswith("events.out.tfevents.") for n in os.listdir(trained_dir / "eval"))
    assert "node {" in (trained_dir / "graph.pbtxt").read_text()[:10000]


def test_checkpoint_holds_stable_keys(trained_dir):
    import tensorflow as tf

    keys = {name for name, _ in tf.train.list_variables(str(trained_dir / "model.ckpt-300"))}
    assert "global_step/.ATTRIBUTES/VARIABLE_VALUE" in keys
    assert "input_iterator/.ATTRIBUTES/ITERATOR_STATE" not in keys  # iris has a known length: stateless input order
    assert "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE" in keys
    reader = tf.train.load_checkpoint(str(trained_dir / "model.ckpt-300"))
    assert reader.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE") == 300


def test_metrics_recorded_for_every_checkpoint(trained_dir):
    recorded = read_metrics(trained_dir)
    assert sorted(recorded) == [0, 100, 200, 300]
    assert {"loss", "accuracy"} <= set(recorded[300])
    assert "train_loss" in recorded[300]
    assert recorded[300]["loss"] < recorded[0]["loss"]  # it learned


def test_summaries_written_to_event_files(trained_dir):
    import tensorflow as tf

    tags = set()
    for name in os.listdir(trained_dir):
        if name.startswith("events.out.tfevents."):
            for event in tf.compat.v1.train.summary_iterator(str(trained_dir / name)):
                tags.update(v.tag for v in event.summary.value)
    assert "loss" in tags


def test_resume_reaches_the_same_weights(tmp_path, trained_dir):
    policy = CheckpointPolicy(save_checkpoints_steps=100, keep_checkpoint_max=None)
    first = train(tmp_path / "a", steps=150, policy=policy)
    assert first.final_step == 150 and first.last_checkpoint.endswith("model.ckpt-150")
    second = train(tmp_path / "a", steps=300, policy=policy)
    assert (second.start_step, second.final_step, second.steps_run) == (150, 300, 150)
    assert_same_weights(tmp_path / "a" / "model.ckpt-300", trained_dir / "model.ckpt-300")


def test_target_already_reached_trains_nothing(tmp_path):
    policy = CheckpointPolicy(save_checkpoints_steps=50)
    train(tmp_path / "m", steps=50, policy=policy)
    again = train(tmp_path / "m", steps=50, policy=policy)
    assert again.steps_run == 0 and again.checkpoints_saved == 0
    assert again.last_checkpoint.endswith("model.ckpt-50")


def test_more_steps_counts_from_the_newest_checkpoint(tmp_path):
    policy = CheckpointPolicy(save_checkpoints_steps=1000)
    train(tmp_path / "m", steps=40, policy=policy)
    result = train(tmp_path / "m", more_steps=25, policy=policy)
    assert (result.start_step, result.final_step) == (40, 65)
    assert select_latest_checkpoint(tmp_path / "m").step == 65


def test_keep_checkpoint_max(tmp_path):
    train(tmp_path / "m", steps=60, policy=CheckpointPolicy(save_checkpoints_steps=10, keep_checkpoint_max=2))
    indexes = sorted(n for n in os.listdir(tmp_path / "m") if n.endswith(".index"))
    assert indexes == ["model.ckpt-50.index", "model.ckpt-60.index"]


def test_async_save_writes_valid_checkpoints_and_same_weights(tmp_path):
    sync = train(tmp_path / "sync", steps=60, policy=CheckpointPolicy(save_checkpoints_steps=20))
    asyn = train(tmp_path / "async", steps=60, policy=CheckpointPolicy(save_checkpoints_steps=20, async_save=True))
    assert asyn.checkpoints_saved == sync.checkpoints_saved == 4
    assert select_latest_checkpoint(tmp_path / "async", verify_checksums=True).step == 60
    for step in (20, 40, 60):  # each async checkpoint holds the values of its own step
        assert_same_weights(tmp_path / "sync" / f"model.ckpt-{step}", tmp_path / "async" / f"model.ckpt-{step}")


def test_different_model_in_model_dir_names_the_keys(tmp_path, trained_dir):
    import shutil

    shutil.copytree(trained_dir, tmp_path / "m")
    before = sorted(os.listdir(tmp_path / "m"))
    with pytest.raises(CheckpointMismatchError) as info:
        train(tmp_path / "m", model="models_for_tests:wider_model", steps=400)
    message = str(info.value)
    assert "model.ckpt-300 does not match the model being restored" in message
    assert "incompatible tensor with shape (4, 10)" in message and "(4, 16)" in message
    assert sorted(os.listdir(tmp_path / "m")) == before  # nothing written, nothing removed


def test_extra_layer_is_reported_as_missing_keys(tmp_path, trained_dir):
    import shutil

    shutil.copytree(trained_dir, tmp_path / "m")
    with pytest.raises(CheckpointMismatchError) as info:
        train(tmp_path / "m", model="models_for_tests:deeper_model", steps=400)
    assert info.value.missing, "the extra layer's variables should be listed as missing"
    assert "keys the model expects but the checkpoint lacks" in str(info.value)


def test_restore_strict_names_missing_and_unexpected_keys(trained_dir):
    import tensorflow as tf

    from prefect_tensorflow.tasks.checkpoints.restore import restore_strict

    ckpt = tf.train.Checkpoint(global_step=tf.Variable(0, dtype=tf.int64), extra=tf.Variable([1.0, 2.0]))
    with pytest.raises(CheckpointMismatchError) as info:
        restore_strict(ckpt, str(trained_dir / "model.ckpt-300"))
    assert info.value.missing == ["extra/.ATTRIBUTES/VARIABLE_VALUE"]
    assert "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE" in info.value.unexpected
    assert "keys the model expects but the checkpoint lacks: extra/.ATTRIBUTES/VARIABLE_VALUE" in str(info.value)


def test_model_dir_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ModelDirError, match="is a file"):
        train(path, steps=1)


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"model": "nope"}, ImportStringError, "model 'nope': no model builder is registered under this name"),
        (
            {"model": "bad name!"},
            ValueError,
            "expected a registered model builder name (e.g. 'iris') or 'package.module:attribute'",
        ),
        ({"data": "shutil:rmtree"}, ImportStringError, "'shutil' is a standard-library module"),
        ({"model": "missing_module_q:f"}, ImportStringError, "cannot be imported"),
        ({"data": "prefect_tensorflow.tasks.iris:nothing"}, ImportStringError, "data 'prefect_tensorflow.tasks.iris:nothing'"),
        ({"model": "models_for_tests:not_a_model"}, TrainingError, "expected a keras.Model, received str"),
        ({"model": "models_for_tests:uncompiled_model"}, TrainingError, "expected a compiled model"),
        ({"data": "models_for_tests:not_a_dataset"}, TrainingError, "expected 'train' to give a tf.data.Dataset"),
        (
            {"hparams": {"depth": 3}},
            TrainingError,
            "hparams: model 'iris' (hidden_units=(10, 10), n_classes=3, learning_rate=0.05) does not accept {'depth': 3}",
        ),
        ({"steps": -1}, ValueError, "steps: expected an integer >= 0 and <= 1000000000000, received -1"),
        ({"more_steps": -5}, ValueError, "more_steps: expected an integer >= 0 and <= 1000000000000, received -5"),
        ({"batch_size": 0}, ValueError, "batch_size: expected an integer >= 1 and <= 1048576, received 0"),
        ({"steps": True}, ValueError, "steps: expected an integer >= 0 and <= 1000000000000, received True"),
    ],
)
def test_bad_inputs_fail_before_writing(tmp_path, kwargs, error, fragment):
    from prefect_tensorflow.tasks.config_checks import one_line

    target = tmp_path / "m"
    with pytest.raises(error) as info:
        train(target, **{"steps": 5, **kwargs})
    assert fragment in one_line(info.value)
    if isinstance(info.value, (ImportStringError, ValueError)) and not isinstance(info.value, TrainingError):
        assert not target.exists()  # rejected before anything was created
    else:  # refused before the model dir was made (hparams), or after, before any checkpoint
        assert not target.exists() or not any(n.endswith(".index") for n in os.listdir(target))


def test_corrupt_newest_checkpoint_resumes_from_previous(tmp_path, caplog):
    import logging

    policy = CheckpointPolicy(save_checkpoints_steps=20, keep_checkpoint_max=None)
    train(tmp_path / "m", steps=40, policy=policy)
    os.truncate(tmp_path / "m" / "model.ckpt-40.data-00000-of-00001", 5)
    with caplog.at_level(logging.INFO, logger="prefect_tensorflow"):
        result = train(tmp_path / "m", steps=60, policy=policy)
    assert result.start_step == 20
    assert "resumed from" in caplog.text and "model.ckpt-20" in caplog.text
    assert select_latest_checkpoint(tmp_path / "m").step == 60


def test_task_in_a_flow_returns_a_small_result(prefect_api, tmp_path):
    from prefect import flow

    from prefect_tensorflow.tasks import TrainingConfig, TrainResult, train_with_checkpoints

    @flow
    def nightly(model_dir: str) -> TrainResult:
        config = TrainingConfig(steps=30, policy=CheckpointPolicy(save_checkpoints_steps=10))
        return train_with_checkpoints(model_dir, config)

    result = nightly(str(tmp_path / "m"))
    assert isinstance(result, TrainResult)
    assert result.final_step == 30 and result.checkpoints_saved == 4
    assert set(result.final_metrics) >= {"loss", "accuracy"}
    assert result.model_dump_json()  # serialisable, no TF objects


def test_leftover_temp_dir_of_a_cut_short_save_is_removed(tmp_path):
    policy = CheckpointPolicy(save_checkpoints_steps=10)
    train(tmp_path / "m", steps=10, policy=policy)
    leftover = tmp_path / "m" / "model.ckpt-20_temp"
    leftover.mkdir()
    (leftover / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"partial")
    keep = tmp_path / "m" / "notes_temp"  # not TensorFlow's: left alone
    keep.mkdir()
    train(tmp_path / "m", steps=20, policy=policy)
    assert not leftover.exists() and keep.exists()
    assert select_latest_checkpoint(tmp_path / "m").step == 20


def test_state_file_is_the_last_write_so_selection_needs_no_listing(tmp_path):
    from prefect_tensorflow.tasks.checkpoints.files import read_state_file, state_file_is_last_change

    for save_at_end in (True, False):
        model_dir = tmp_path / f"m{save_at_end}"
        policy = CheckpointPolicy(save_checkpoints_steps=10, save_at_end=save_at_end)
        train(model_dir, steps=20, policy=policy)
        assert state_file_is_last_change(model_dir, read_state_file(model_dir))
        train(model_dir, steps=20, policy=policy)  # nothing to do: writes nothing
        assert state_file_is_last_change(model_dir, read_state_file(model_dir))


def _flip_a_weight_byte(prefix):
    from prefect_tensorflow.tasks.checkpoints.files import read_index

    _, entries = read_index(str(prefix))
    name = next(n for n in entries if "_trainable_variables/0/" in n)
    _, offset, size = entries[name]
    with open(f"{prefix}.data-00000-of-00001", "r+b") as handle:
        handle.seek(offset + size // 2)
        byte = handle.read(1)
        handle.seek(offset + size // 2)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_resume_skips_a_checkpoint_that_fails_its_checksum(tmp_path, trained_dir, caplog):
    import logging

    policy = CheckpointPolicy(save_checkpoints_steps=20, keep_checkpoint_max=None)
    train(tmp_path / "m", steps=40, policy=policy)
    _flip_a_weight_byte(tmp_path / "m" / "model.ckpt-40")  # sizes intact: passes the cheap check
    with caplog.at_level(logging.INFO, logger="prefect_tensorflow"):
        result = train(tmp_path / "m", steps=60, policy=policy)
    assert result.start_step == 20
    assert "cannot resume from" in caplog.text and "model.ckpt-40" in caplog.text


def test_model_dir_with_only_broken_checkpoints_is_not_silently_restarted(tmp_path):
    policy = CheckpointPolicy(save_checkpoints_steps=20, keep_checkpoint_max=None)
    train(tmp_path / "m", steps=20, policy=policy)
    for step in (0, 20):
        os.truncate(tmp_path / "m" / f"model.ckpt-{step}.data-00000-of-00001", 1)
    before = sorted(os.listdir(tmp_path / "m"))
    with pytest.raises(TrainingError, match="Move them aside to train from scratch"):
        train(tmp_path / "m", steps=40, policy=policy)
    assert sorted(os.listdir(tmp_path / "m")) == before


def test_the_cli_process_imports_tensorflow_without_kerass_optional_extras():
    """CLI, evaluator and deployment-run processes skip sklearn/matplotlib/pandas during TensorFlow's import
    (tasks/lean_import.py); afterwards they import normally, and TensorFlow works."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from prefect_tensorflow.flows.defaults import apply_environment_defaults\n"
        "apply_environment_defaults()\n"
        "import tensorflow as tf\n"
        "skipped = [m for m in ('sklearn', 'matplotlib', 'pandas') if m in sys.modules]\n"
        "import pandas\n"
        "print(skipped, float(tf.reduce_sum(tf.constant([1.0, 2.0]))), pandas.DataFrame({'a': [1]}).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[] 3.0 (1, 1)"


# --- issue 19, classes 4 and 6: the model dir's own reads, deletes and writes ---------------------


def _state_naming_outside(model_dir, outside, latest=None):
    """A state file whose kept list names checkpoints outside the model dir, with recent timestamps."""
    import time as _time

    outside.mkdir(parents=True, exist_ok=True)
    for step in (100, 200):
        (outside / f"model.ckpt-{step}.index").write_bytes(b"index")
        (outside / f"model.ckpt-{step}.data-00000-of-00001").write_bytes(b"data")
    (outside / "model.ckpt-150.index").write_bytes(b"index")
    named = [
        str(outside / "model.ckpt-100"),
        os.path.join(os.path.relpath(outside, model_dir), "model.ckpt-150"),
        str(outside / "model.ckpt-200"),
    ]
    named += [latest] if latest else []
    now = _time.time()
    lines = [f'model_checkpoint_path: "{named[-1]}"']
    lines += [f'all_model_checkpoint_paths: "{p}"' for p in named]
    lines += [f"all_model_checkpoint_timestamps: {now - 30 + i}" for i in range(len(named))]
    lines.append(f"last_preserved_timestamp: {now - 3600}")
    (model_dir / "checkpoint").write_text("\n".join(lines) + "\n")
    return sorted(os.listdir(outside))


@pytest.mark.parametrize("untrusted", [False, True])
def test_a_state_file_naming_checkpoints_outside_never_makes_the_keep_policy_delete_them(tmp_path, untrusted):
    import tensorflow as tf

    from prefect_tensorflow.tasks.checkpoints.writer import CheckpointWriter
    from prefect_tensorflow.tasks.errors import UnsafeParameterError
    from prefect_tensorflow.tasks.storage.confined_dirs import open_directory

    roots, outside = tmp_path / "roots", tmp_path / "outside"
    model_dir = roots / "iris"
    model_dir.mkdir(parents=True)
    before = _state_naming_outside(model_dir, outside, None)
    step = tf.Variable(0, dtype=tf.int64)
    policy = CheckpointPolicy(keep_checkpoint_max=1, async_save=False)
    with open_directory(str(model_dir), parameter="model_dir", untrusted=untrusted, roots=[str(roots)]) as d:
        if untrusted:  # a deployment run: refused, naming the state file and the entry
            with pytest.raises(UnsafeParameterError, match=rf"{model_dir}/checkpoint names {outside}/model.ckpt-100, outside"):
                CheckpointWriter(tf.train.Checkpoint(global_step=step), str(model_dir), policy, directory=d, untrusted=True)
        else:  # a library caller: dropped from the kept list, left alone
            writer = CheckpointWriter(tf.train.Checkpoint(global_step=step), str(model_dir), policy, directory=d)
            assert writer.checkpoints == []
            for n in (1, 2):
                step.assign(n)
                writer.save(n)
            writer.finish()
            writer.apply_keep_policy()
            assert writer.checkpoints == [str(model_dir / "model.ckpt-2")]
            assert "outside" not in (model_dir / "checkpoint").read_text()
    assert sorted(os.listdir(outside)) == before


def test_training_resumed_under_a_state_file_naming_checkpoints_outside_deletes_nothing_there(tmp_path, trained_dir):
    import shutil

    model_dir = tmp_path / "iris"
    shutil.copytree(trained_dir, model_dir)
    outside = tmp_path / "outside"
    before = _state_naming_outside(model_dir, outside, "model.ckpt-300")
    train(model_dir, steps=320, policy=CheckpointPolicy(save_checkpoints_steps=10, keep_checkpoint_max=1), evaluation="none")
    assert sorted(os.listdir(outside)) == before
    assert sorted(f for f in os.listdir(model_dir) if f.endswith(".index"))[-1] == "model.ckpt-320.index"


@pytest.mark.parametrize("untrusted", [True, False])
def test_a_model_dir_swapped_for_a_symlink_mid_training_gets_nothing_more(tmp_path, untrusted):
    import tensorflow as tf

    from prefect_tensorflow.tasks.checkpoints.writer import CheckpointWriter
    from prefect_tensorflow.tasks.storage.confined_dirs import open_directory

    roots, outside = tmp_path / "roots", tmp_path / "outside"
    model_dir = roots / "iris"
    model_dir.mkdir(parents=True)
    outside.mkdir()
    step = tf.Variable(0, dtype=tf.int64)
    with open_directory(str(model_dir), parameter="model_dir", untrusted=untrusted, roots=[str(roots)]) as d:
        writer = CheckpointWriter(
            tf.train.Checkpoint(global_step=step), str(model_dir), CheckpointPolicy(keep_checkpoint_max=1), directory=d
        )
        writer.save(1)
        writer.finish()
        assert d.entry("x").startswith(f"/proc/self/fd/{d.fd}/")
        os.rename(model_dir, str(model_dir) + ".moved")
        os.symlink(outside, model_dir)
        step.assign(2)
        writer.save(2)
        with pytest.raises(TrainingError, match=rf"model_dir {model_dir} was (moved or )?replaced.* while the run used it"):
            writer.finish()
    assert os.listdir(outside) == []
    moved = sorted(os.listdir(str(model_dir) + ".moved"))
    assert "model.ckpt-1.index" in moved and "model.ckpt-2.index" not in moved


def test_training_in_a_model_dir_swapped_for_a_symlink_by_the_builder_writes_nothing_there(tmp_path, monkeypatch):
    import json

    model_dir, outside = tmp_path / "runs" / "iris", tmp_path / "outside"
    outside.mkdir()
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([{"path": str(model_dir), "to": str(outside)}]))
    monkeypatch.setenv("PTF_TEST_SWAP_PLAN", str(plan))
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    with pytest.raises(
        (TrainingError, Exception), match=rf"model_dir {model_dir} was (moved or )?replaced.* while the run used it"
    ):
        train(
            model_dir,
            steps=30,
            model="swap_models:build_after_swapping",
            evaluation="in_loop",
            policy=CheckpointPolicy(save_checkpoints_steps=10),
        )
    assert os.listdir(outside) == []
    assert not [f for f in os.listdir(str(model_dir) + ".moved") if f.endswith(".index") or f == "checkpoint"]


def test_event_files_and_graph_symlinked_out_of_the_model_dir_are_not_logged(tmp_path):
    from prefect_tensorflow.tasks.registry.tracking import log_checkpoint_artifacts

    model_dir, outside = tmp_path / "iris", tmp_path / "outside"
    (model_dir / "eval").mkdir(parents=True)
    (outside / "sub").mkdir(parents=True)
    for path in (
        model_dir / "events.out.tfevents.1",
        outside / "events.out.tfevents.secret",
        outside / "sub" / "events.out.tfevents.2",
        outside / "graph.pbtxt",
    ):
        path.write_bytes(b"x")
    (model_dir / "eval" / "events.out.tfevents.3").symlink_to(outside / "events.out.tfevents.secret")
    (model_dir / "linked").symlink_to(outside / "sub")
    (model_dir / "graph.pbtxt").symlink_to(outside / "graph.pbtxt")
    logged = []

    class Connection:
        def retrying(self, what, fn, *args):
            return fn(*args)

    class Client:
        def log_artifact(self, run_id, path, target):
            logged.append((os.path.basename(path), target))

    log_checkpoint_artifacts(Connection(), Client(), "run", str(model_dir))
    assert logged == [("checkpoints.json", "checkpoints"), ("events.out.tfevents.1", "tensorboard")]


@pytest.mark.parametrize("untrusted", [False, True])
def test_multi_worker_training_hands_its_chiefs_writer_no_kept_checkpoint_outside(tmp_path, untrusted):
    """The multi-worker caller checks the state file before any worker starts (`read_kept_list`), and the
    chief's CheckpointWriter (the one writer) keeps and deletes only checkpoints directly in the model dir."""
    import tensorflow as tf

    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.checkpoints.writer import CheckpointWriter, read_kept_list
    from prefect_tensorflow.tasks.errors import UnsafeParameterError

    model_dir, outside = tmp_path / "iris", tmp_path / "outside"
    model_dir.mkdir()
    step = tf.Variable(0, dtype=tf.int64)
    tf.train.Checkpoint(global_step=step).write(str(model_dir / "model.ckpt-300"))
    before = _state_naming_outside(model_dir, outside, "model.ckpt-300")
    if untrusted:
        with pytest.raises(UnsafeParameterError, match=rf"{model_dir}/checkpoint names {outside}/model.ckpt-100, outside"):
            read_kept_list(str(model_dir), untrusted=True)
    else:
        read_kept_list(str(model_dir), untrusted=False)
        writer = CheckpointWriter(
            tf.train.Checkpoint(global_step=step), str(model_dir), CheckpointPolicy(keep_checkpoint_max=1), untrusted=False
        )
        writer.save(301)
        writer.finish()
        assert writer.checkpoints == [str(model_dir / "model.ckpt-301")]
        assert "outside" not in (model_dir / "checkpoint").read_text()
    assert sorted(os.listdir(outside)) == before


def test_the_cli_training_options_take_the_numbers_as_typed():
    """Optional numbers with a default (`--keep-checkpoint-max 3`) come from the command line as text."""
    from prefect_tensorflow.flows.cli_options import training_config

    config = training_config({"steps": 10, "keep_checkpoint_max": "3", "keep_checkpoint_every_n_hours": "2.5"})
    assert (config.steps, config.policy.keep_checkpoint_max, config.policy.keep_checkpoint_every_n_hours) == (10, 3, 2.5)
    assert training_config({"keep_checkpoint_max": "0"}).policy.keep_checkpoint_max is None  # 0 keeps every one
    assert training_config({"keep_checkpoint_max": ""}).policy.keep_checkpoint_max is None
    with pytest.raises(ValueError, match="--keep-checkpoint-max: expected an integer or '' for none, received 'x'"):
        training_config({"keep_checkpoint_max": "x"})
