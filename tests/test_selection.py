"""select_latest_checkpoint / select_best_checkpoint on real checkpoints and real damage."""

import json
import logging
import os
import shutil

import pytest

from prefect_tensorflow.tasks.checkpoints import selection
from prefect_tensorflow.tasks.checkpoints.files import read_index
from prefect_tensorflow.tasks.checkpoints.metrics_log import read_metrics
from prefect_tensorflow.tasks.checkpoints.selection import (
    list_checkpoints,
    select_best_checkpoint,
    select_latest_checkpoint,
)
from prefect_tensorflow.tasks.errors import (
    MetricNotFoundError,
    ModelDirError,
    NoValidCheckpointError,
)


def _write_state_atomically(model_dir, name):
    tmp = model_dir / "checkpoint.tmp"
    tmp.write_text(f'model_checkpoint_path: "{name}"\nall_model_checkpoint_paths: "{name}"\n')
    os.replace(tmp, model_dir / "checkpoint")


def _commit_copy(model_dir, source_step, new_step):
    """Commit a new checkpoint the way TensorFlow does: data first, index renamed in last."""
    src = model_dir / f"model.ckpt-{source_step}"
    dst = model_dir / f"model.ckpt-{new_step}"
    shutil.copyfile(f"{src}.data-00000-of-00001", f"{dst}.data-00000-of-00001")
    shutil.copyfile(f"{src}.index", f"{dst}.index.tmp")
    os.replace(f"{dst}.index.tmp", f"{dst}.index")


def test_sound_state_file_is_answered_without_listing(model_dir_copy, monkeypatch):
    def no_listing(_):
        raise AssertionError("listed the directory although the state file is sound")

    monkeypatch.setattr(selection, "checkpoint_prefixes", no_listing)
    ref = select_latest_checkpoint(model_dir_copy)
    assert ref.step == 300
    assert ref.path == str(model_dir_copy / "model.ckpt-300")
    assert ref.format == "tf2"
    assert ref.metrics == read_metrics(model_dir_copy)[300]
    assert set(ref.metrics) >= {"loss", "accuracy"}


def test_agrees_with_tf_latest_checkpoint_when_sound(trained_dir):
    import tensorflow as tf

    assert select_latest_checkpoint(trained_dir).path == tf.train.latest_checkpoint(str(trained_dir))


def test_missing_state_file_falls_back_to_highest_step(model_dir_copy):
    (model_dir_copy / "checkpoint").unlink()
    assert select_latest_checkpoint(model_dir_copy).step == 300


@pytest.mark.parametrize("content", [b"\x00\x01garbage\xff", b"model_checkpoint_path: 12\n", b"nonsense"])
def test_garbage_state_file_falls_back_and_logs(model_dir_copy, content, caplog):
    (model_dir_copy / "checkpoint").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="prefect_tensorflow"):
        assert select_latest_checkpoint(model_dir_copy).step == 300
    assert "state file is unreadable" in caplog.text


def test_stale_state_after_crash_between_commit_and_state_update(model_dir_copy, caplog):
    _write_state_atomically(model_dir_copy, "model.ckpt-300")
    _commit_copy(model_dir_copy, 300, 400)  # committed; the state file was never updated
    import tensorflow as tf

    assert tf.train.latest_checkpoint(str(model_dir_copy)).endswith("model.ckpt-300")
    with caplog.at_level(logging.WARNING, logger="prefect_tensorflow"):
        ref = select_latest_checkpoint(model_dir_copy)
    assert ref.step == 400
    assert "model.ckpt-400 is the newest valid checkpoint" in caplog.text


def test_stale_state_file_copied_over_in_place(model_dir_copy):
    # An old state file copied back over the current one names step 100.
    (model_dir_copy / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-100"\n')
    assert select_latest_checkpoint(model_dir_copy).step == 300


def test_state_naming_deleted_checkpoint(model_dir_copy, caplog):
    for suffix in (".index", ".data-00000-of-00001"):
        (model_dir_copy / f"model.ckpt-300{suffix}").unlink()
    with caplog.at_level(logging.WARNING, logger="prefect_tensorflow"):
        assert select_latest_checkpoint(model_dir_copy).step == 200
    assert "model.ckpt-300, which is invalid: index file is missing" in caplog.text


def test_state_naming_truncated_checkpoint(model_dir_copy, caplog):
    shard = model_dir_copy / "model.ckpt-300.data-00000-of-00001"
    os.truncate(shard, shard.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="prefect_tensorflow"):
        assert select_latest_checkpoint(model_dir_copy).step == 200
    assert "is truncated" in caplog.text


def test_deleted_index_is_uncommitted(model_dir_copy):
    (model_dir_copy / "model.ckpt-300.index").unlink()
    assert select_latest_checkpoint(model_dir_copy).step == 200


def test_skips_every_invalid_newer_checkpoint_and_says_why(model_dir_copy, caplog):
    (model_dir_copy / "checkpoint").unlink()
    (model_dir_copy / "model.ckpt-300.data-00000-of-00001").unlink()
    (model_dir_copy / "model.ckpt-200.index").write_bytes(b"not a table")
    with caplog.at_level(logging.WARNING, logger="prefect_tensorflow"):
        assert select_latest_checkpoint(model_dir_copy).step == 100
    assert "skipping checkpoint" in caplog.text and "model.ckpt-300" in caplog.text
    assert "model.ckpt-200" in caplog.text


def test_none_valid_is_a_clear_error_and_nothing_is_deleted(model_dir_copy):
    for step in (0, 100, 200, 300):
        shard = model_dir_copy / f"model.ckpt-{step}.data-00000-of-00001"
        if shard.exists():
            os.truncate(shard, 3)
    before = sorted(os.listdir(model_dir_copy))
    with pytest.raises(NoValidCheckpointError) as info:
        select_latest_checkpoint(model_dir_copy)
    assert str(model_dir_copy) in str(info.value)
    assert "model.ckpt-300: data shard" in str(info.value)
    assert sorted(os.listdir(model_dir_copy)) == before


def test_empty_dir(tmp_path):
    with pytest.raises(NoValidCheckpointError, match=r"no valid checkpoint in .*no <prefix>-<step>\.index files"):
        select_latest_checkpoint(tmp_path)


def test_model_dir_is_a_file(tmp_path):
    path = tmp_path / "model_dir"
    path.write_text("oops")
    with pytest.raises(ModelDirError, match="is a file; expected a directory"):
        select_latest_checkpoint(path)
    with pytest.raises(ModelDirError, match="does not exist"):
        select_latest_checkpoint(tmp_path / "absent")


def _flip_byte_in(model_dir, step, tensor_fragment):
    prefix = str(model_dir / f"model.ckpt-{step}")
    _, entries = read_index(prefix)
    name = next(n for n in entries if tensor_fragment in n)
    _, offset, size = entries[name]
    with open(prefix + ".data-00000-of-00001", "r+b") as handle:
        handle.seek(offset + size // 2)
        byte = handle.read(1)
        handle.seek(offset + size // 2)
        handle.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("tensor", ["_trainable_variables/0/", "optimizer/"])
def test_verify_checksums_catches_a_flipped_byte(model_dir_copy, tensor, caplog):
    _flip_byte_in(model_dir_copy, 300, tensor)
    assert select_latest_checkpoint(model_dir_copy).step == 300  # sizes are still right
    with caplog.at_level(logging.WARNING, logger="prefect_tensorflow"):
        assert select_latest_checkpoint(model_dir_copy, verify_checksums=True).step == 200
    assert "does not read back" in caplog.text


def test_tf1_saver_model_dir(tmp_path, tf1_checkpoints):
    tf1_checkpoints(tmp_path, steps=(100, 200, 300))
    ref = select_latest_checkpoint(tmp_path)
    assert (ref.step, ref.format, ref.has_meta_graph) == (300, "tf1", True)
    (tmp_path / "checkpoint").unlink()
    (tmp_path / "model.ckpt-300.index").unlink()
    assert select_latest_checkpoint(tmp_path, verify_checksums=True).step == 200


def test_best_by_metric(trained_dir):
    recorded = read_metrics(trained_dir)
    best_loss_step = min(recorded, key=lambda s: (recorded[s]["loss"], -s))
    ref = select_best_checkpoint(trained_dir, "loss", "min")
    assert ref.step == best_loss_step
    assert ref.metrics["loss"] == recorded[best_loss_step]["loss"]
    best_acc = max(v["accuracy"] for v in recorded.values())
    ref = select_best_checkpoint(trained_dir, "accuracy", "max")
    assert ref.metrics["accuracy"] == best_acc
    assert ref.step == max(s for s, v in recorded.items() if v["accuracy"] == best_acc)


def test_best_skips_invalid_checkpoints(model_dir_copy):
    recorded = read_metrics(model_dir_copy)
    best = min(recorded, key=lambda s: (recorded[s]["loss"], -s))
    os.truncate(model_dir_copy / f"model.ckpt-{best}.data-00000-of-00001", 0)
    ref = select_best_checkpoint(model_dir_copy, "loss", "min")
    assert ref.step != best


def test_best_unknown_metric_lists_recorded_ones(trained_dir):
    with pytest.raises(MetricNotFoundError) as info:
        select_best_checkpoint(trained_dir, "f1", "max")
    assert "metric 'f1' was not recorded" in str(info.value)
    assert "accuracy, loss" in str(info.value)


def test_best_bad_mode(trained_dir):
    with pytest.raises(ValueError, match="mode: expected 'min' or 'max', received 'up'"):
        select_best_checkpoint(trained_dir, "loss", "up")


def test_metrics_log_survives_a_torn_last_line(model_dir_copy):
    with open(model_dir_copy / "checkpoint_metrics.jsonl", "a") as handle:
        handle.write('{"step": 400, "metrics": {"loss": 0.0')  # a crash mid-append
    assert 400 not in read_metrics(model_dir_copy)
    assert select_best_checkpoint(model_dir_copy, "loss", "min").step in (0, 100, 200, 300)


def test_list_checkpoints_reports_validity(model_dir_copy):
    os.truncate(model_dir_copy / "model.ckpt-200.data-00000-of-00001", 10)
    rows = list_checkpoints(model_dir_copy)
    assert [r.step for r in rows] == [300, 200, 100, 0]
    by_step = {r.step: r for r in rows}
    assert by_step[300].valid and by_step[300].size_bytes > 0 and by_step[300].metrics
    assert not by_step[200].valid and "truncated" in by_step[200].reason
    json.dumps([r.model_dump() for r in rows])


def test_tasks_run_in_a_flow(prefect_api, trained_dir):
    from prefect import flow

    from prefect_tensorflow.tasks import select_best_checkpoint, select_latest_checkpoint

    @flow
    def pick(model_dir: str):
        return select_latest_checkpoint(model_dir), select_best_checkpoint(model_dir, "loss", "min")

    assert select_latest_checkpoint.fn is selection.select_latest_checkpoint  # the task is the plain function
    assert select_best_checkpoint.name == "select-best-checkpoint"
    latest, best = pick(str(trained_dir))
    assert latest.step == 300
    assert best == select_best_checkpoint(trained_dir, "loss", "min")


def test_checkpoint_selection_parsing():
    from prefect_tensorflow.tasks.checkpoints.selection import CheckpointSelection

    assert CheckpointSelection.parse("latest").kind == "latest"
    assert CheckpointSelection.parse("200") == CheckpointSelection(kind="step", step=200)
    assert CheckpointSelection.parse(300).step == 300
    assert CheckpointSelection.parse("best:accuracy") == CheckpointSelection(kind="best", metric="accuracy", mode="max")
    assert CheckpointSelection.parse("best:loss") == CheckpointSelection(kind="best", metric="loss", mode="min")
    assert CheckpointSelection.parse("best:accuracy:min").mode == "min"
    assert str(CheckpointSelection.parse("best:loss")) == "best:loss:min"
    with pytest.raises(ValueError, match="select: expected 'latest', a step number or 'best:<metric>"):
        CheckpointSelection.parse("best")
    for bad in ("-5", "newest", "best:", "12.5", "", True):
        with pytest.raises(ValueError, match="checkpoint: expected 'latest', a step number"):
            CheckpointSelection.parse(bad, parameter="checkpoint")


def test_select_checkpoint_at_a_step_and_by_selection(model_dir_copy):
    from prefect_tensorflow.tasks.checkpoints.selection import select_checkpoint, select_checkpoint_at_step

    ref = select_checkpoint_at_step(model_dir_copy, 100)
    assert (ref.step, ref.path) == (100, str(model_dir_copy / "model.ckpt-100")) and ref.metrics
    assert select_checkpoint(model_dir_copy, "200").step == 200
    assert select_checkpoint(model_dir_copy, "latest").step == 300
    assert select_checkpoint(model_dir_copy, "best:loss") == select_best_checkpoint(model_dir_copy, "loss", "min")
    with pytest.raises(NoValidCheckpointError, match=r"has no checkpoint at step 150; steps present: \[0, 100, 200, 300\]"):
        select_checkpoint_at_step(model_dir_copy, 150)
    os.truncate(model_dir_copy / "model.ckpt-200.data-00000-of-00001", 10)
    with pytest.raises(NoValidCheckpointError, match=r"the checkpoint at step 200 is invalid: .*truncated"):
        select_checkpoint_at_step(model_dir_copy, 200)
    # through select_checkpoint the errors name the flow parameter the selection came from
    with pytest.raises(NoValidCheckpointError, match=r"checkpoint '150': has no checkpoint at step 150"):
        select_checkpoint(model_dir_copy, "150", parameter="checkpoint")
    with pytest.raises(MetricNotFoundError, match=r"^select 'best:f1:max': metric 'f1' was not recorded"):
        select_checkpoint(model_dir_copy, "best:f1")


# --- paths read out of the model dir's files, in a deployment run (issue 19, class 4) ---------------


@pytest.fixture
def deployment_run(monkeypatch, tmp_path):
    """Selection as a deployment run does it (untrusted), with the roots at `<tmp>/roots`."""
    from prefect_tensorflow.tasks import security
    from prefect_tensorflow.tasks.checkpoints import files as checkpoint_files

    for module in (selection, checkpoint_files, security):
        monkeypatch.setattr(module, "in_deployment_run", lambda: True)
    monkeypatch.setenv("PREFECT_TENSORFLOW_ROOTS", str(tmp_path / "roots"))
    return tmp_path / "roots"


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_a_state_file_naming_a_checkpoint_outside_is_refused_in_a_deployment_run(trained_dir, tmp_path, how):
    from prefect_tensorflow.tasks import security
    from prefect_tensorflow.tasks.checkpoints import files as checkpoint_files
    from prefect_tensorflow.tasks.errors import UnsafeParameterError

    canary = tmp_path / "canary"
    shutil.copytree(trained_dir, canary)
    model_dir = tmp_path / "roots" / "models" / "evil"
    model_dir.mkdir(parents=True)
    named = str(canary / "model.ckpt-300") if how == "absolute" else "../../../canary/model.ckpt-300"
    _write_state_atomically(model_dir, named)  # the last change: TensorFlow would trust it without listing
    # a library caller reads the state file as TensorFlow does (and is trusted)
    assert os.path.normpath(select_latest_checkpoint(model_dir).path) == str(canary / "model.ckpt-300")

    with pytest.MonkeyPatch.context() as patch:
        for module in (selection, checkpoint_files, security):
            patch.setattr(module, "in_deployment_run", lambda: True)
        patch.setenv("PREFECT_TENSORFLOW_ROOTS", str(tmp_path / "roots"))
        _write_state_atomically(model_dir, named)
        opened = []
        real_open = open

        def spying_open(path, *args, **kwargs):
            opened.append(str(path))
            return real_open(path, *args, **kwargs)

        patch.setattr("builtins.open", spying_open)
        with pytest.raises(UnsafeParameterError) as caught:
            selection.select_checkpoint(str(model_dir), "latest")
    message = str(caught.value)
    assert message.startswith(f"model_dir: {model_dir}/checkpoint names {named}, outside the model dir {model_dir}"), message
    assert not [p for p in opened if str(canary) in os.path.realpath(p)], opened  # nothing outside was read


def test_a_checkpoint_whose_files_link_out_of_the_model_dir_is_refused_in_a_deployment_run(trained_dir, tmp_path, deployment_run):
    from prefect_tensorflow.tasks.errors import UnsafeParameterError

    canary = tmp_path / "canary"
    shutil.copytree(trained_dir, canary)
    model_dir = deployment_run / "models" / "linked"
    shutil.copytree(trained_dir, model_dir)
    (model_dir / "checkpoint").unlink()
    for name in ("model.ckpt-900.index", "model.ckpt-900.data-00000-of-00001"):
        (model_dir / name).symlink_to(canary / name.replace("900", "300"))
    for select in (lambda: select_latest_checkpoint(model_dir), lambda: select_best_checkpoint(model_dir, "accuracy", "max")):
        with pytest.raises(
            UnsafeParameterError, match=r"model.ckpt-900\.(index|data-00000-of-00001) \(-> .*canary.*\) lies outside"
        ):
            select()
    with pytest.raises(UnsafeParameterError, match="lies outside the model dir"):
        selection.select_checkpoint_at_step(str(model_dir), 900)


def test_a_metrics_log_linking_out_of_the_model_dir_is_refused_in_a_deployment_run(trained_dir, tmp_path, deployment_run):
    from prefect_tensorflow.tasks.errors import UnsafeParameterError

    model_dir = deployment_run / "models" / "iris"
    shutil.copytree(trained_dir, model_dir)
    (tmp_path / "outside.jsonl").write_text((model_dir / "checkpoint_metrics.jsonl").read_text())
    (model_dir / "checkpoint_metrics.jsonl").unlink()
    (model_dir / "checkpoint_metrics.jsonl").symlink_to(tmp_path / "outside.jsonl")
    with pytest.raises(UnsafeParameterError, match=r"metrics log .*checkpoint_metrics.jsonl leads to .*outside.jsonl, outside"):
        select_latest_checkpoint(model_dir)


def test_a_sound_model_dir_selects_as_before_in_a_deployment_run(trained_dir, deployment_run):
    model_dir = deployment_run / "models" / "iris"
    shutil.copytree(trained_dir, model_dir)
    assert select_latest_checkpoint(model_dir).step == 300
    assert select_best_checkpoint(model_dir, "accuracy", "max").step is not None
    assert selection.select_checkpoint_at_step(str(model_dir), 200).step == 200
    (model_dir / "checkpoint").unlink()
    assert select_latest_checkpoint(model_dir).step == 300
