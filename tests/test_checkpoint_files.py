"""The TensorFlow-free readers of the state file and the index, checked against TensorFlow."""

import os

import pytest

from prefect_tensorflow.tasks.checkpoints.files import (
    OBJECT_GRAPH_KEY,
    check_checkpoint,
    checkpoint_prefixes,
    read_index,
    read_state_file,
    step_of,
)
from prefect_tensorflow.tasks.errors import InvalidCheckpointError


def test_index_matches_tensorflows_reader(trained_dir):
    import tensorflow as tf

    prefix = str(trained_dir / "model.ckpt-300")
    num_shards, entries = read_index(prefix)
    assert num_shards == 1
    tf_names = {name for name, _ in tf.train.list_variables(prefix)}
    assert set(entries) == tf_names
    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    for name, (_shard, _offset, size) in entries.items():
        if name == OBJECT_GRAPH_KEY or dtypes[name] == tf.variant:
            continue
        value = reader.get_tensor(name)
        if value.dtype.kind == "f":
            assert size == value.nbytes, name
    data_size = os.path.getsize(prefix + ".data-00000-of-00001")
    assert max(offset + size for _, offset, size in entries.values()) == data_size


def test_check_checkpoint_reports_format_step_and_size(trained_dir):
    files = check_checkpoint(trained_dir / "model.ckpt-200")
    assert files.step == 200
    assert files.format == "tf2"
    assert files.has_meta_graph is False
    assert files.size_bytes == sum(
        os.path.getsize(trained_dir / name) for name in ("model.ckpt-200.index", "model.ckpt-200.data-00000-of-00001")
    )


def test_tf1_saver_checkpoint_is_recognised(tmp_path, tf1_checkpoints):
    tf1_checkpoints(tmp_path)
    files = check_checkpoint(tmp_path / "model.ckpt-300")
    assert files.format == "tf1"
    assert files.has_meta_graph
    assert files.step == 300
    state = read_state_file(tmp_path)
    assert state.model_checkpoint_path == str(tmp_path / "model.ckpt-300")


def test_state_file_resolves_relative_and_moved_absolute_paths(tmp_path):
    (tmp_path / "checkpoint").write_text(
        'model_checkpoint_path: "/elsewhere/old/model.ckpt-20"\n'
        'all_model_checkpoint_paths: "model.ckpt-10"\n'
        'all_model_checkpoint_paths: "/elsewhere/old/model.ckpt-20"\n'
        "all_model_checkpoint_timestamps: 1.5\n"
    )
    state = read_state_file(tmp_path)
    assert state.model_checkpoint_path == str(tmp_path / "model.ckpt-20")
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-10"\n')
    assert read_state_file(tmp_path).model_checkpoint_path == str(tmp_path / "model.ckpt-10")


def test_state_file_reading_stops_at_the_latest_path(tmp_path):
    lines = ['model_checkpoint_path: "model.ckpt-12000"']
    lines += [f'all_model_checkpoint_paths: "model.ckpt-{i}"' for i in range(12001)]
    (tmp_path / "checkpoint").write_text("\n".join(lines) + "\n")  # > 1 MiB
    assert read_state_file(tmp_path).model_checkpoint_path == str(tmp_path / "model.ckpt-12000")


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xff\xfe garbage",
        b"model_checkpoint_path: unquoted\n",
        b'surprise_field: "x"\n',
        b"",
        b'all_model_checkpoint_paths: "a"\n',
    ],
)
def test_garbage_state_file_is_an_error(tmp_path, content):
    (tmp_path / "checkpoint").write_bytes(content)
    with pytest.raises(ValueError):
        read_state_file(tmp_path)


def test_truncated_index_is_invalid(model_dir_copy):
    index = model_dir_copy / "model.ckpt-300.index"
    index.write_bytes(index.read_bytes()[:-20])
    with pytest.raises(InvalidCheckpointError, match="index file is unreadable"):
        check_checkpoint(model_dir_copy / "model.ckpt-300")


def test_random_bytes_index_is_invalid(model_dir_copy):
    (model_dir_copy / "model.ckpt-300.index").write_bytes(os.urandom(300))
    with pytest.raises(InvalidCheckpointError, match=r"model\.ckpt-300: index file is unreadable"):
        check_checkpoint(model_dir_copy / "model.ckpt-300")


def test_truncated_shard_is_invalid_and_named(model_dir_copy):
    shard = model_dir_copy / "model.ckpt-300.data-00000-of-00001"
    size = shard.stat().st_size
    os.truncate(shard, size - 1)
    with pytest.raises(InvalidCheckpointError) as info:
        check_checkpoint(model_dir_copy / "model.ckpt-300")
    assert str(shard) in str(info.value)
    assert f"at least {size} bytes, the file has {size - 1}" in str(info.value)


def test_missing_shard_is_invalid(model_dir_copy):
    shard = model_dir_copy / "model.ckpt-300.data-00000-of-00001"
    shard.unlink()
    with pytest.raises(InvalidCheckpointError, match=r"data shard .* is missing"):
        check_checkpoint(model_dir_copy / "model.ckpt-300")


def test_prefixes_sorted_by_step_not_name(tmp_path):
    for name in ("model.ckpt-9", "model.ckpt-100", "model.ckpt-20", "other"):
        (tmp_path / f"{name}.index").write_bytes(b"")
    (tmp_path / "model.ckpt-500.data-00000-of-00001").write_bytes(b"")  # uncommitted: no index
    names = [os.path.basename(p) for p in checkpoint_prefixes(tmp_path)]
    assert names == ["model.ckpt-100", "model.ckpt-20", "model.ckpt-9", "other"]
    assert step_of("/x/model.ckpt-100") == 100 and step_of("/x/other") is None


def test_uncommitted_saves_and_staged_temporaries_are_not_checkpoints(tmp_path):
    from prefect_tensorflow.tasks.checkpoints.files import uncommitted_temp_dirs
    from prefect_tensorflow.tasks.storage.local import TEMP_MARKER, temporary_sibling

    (tmp_path / "model.ckpt-20_temp").mkdir()  # a save cut short by a crash
    (tmp_path / "model.ckpt-20_temp" / "part-00000-of-00001.index").write_bytes(b"")
    (tmp_path / "notes_temp").mkdir()  # not TensorFlow's
    (tmp_path / "model.ckpt-30_temp").write_bytes(b"")  # a file, not a save's directory
    (tmp_path / "model.ckpt-10.index").write_bytes(b"")
    staged = temporary_sibling(str(tmp_path / "model.ckpt-40.index"))
    assert TEMP_MARKER in os.path.basename(staged) and os.path.dirname(staged) == str(tmp_path)
    open(staged, "wb").close()
    assert uncommitted_temp_dirs(tmp_path) == [str(tmp_path / "model.ckpt-20_temp")]
    assert checkpoint_prefixes(tmp_path) == [str(tmp_path / "model.ckpt-10")]


# --- paths read out of the state file, in a deployment run (issue 19, class 4) ----------------------


def test_an_untrusted_state_file_may_only_name_a_checkpoint_inside_its_model_dir(tmp_path):
    from prefect_tensorflow.tasks.checkpoints.files import resolve_state_path
    from prefect_tensorflow.tasks.errors import UnsafeParameterError

    model_dir = tmp_path / "roots" / "models" / "evil"
    model_dir.mkdir(parents=True)
    state = str(model_dir / "checkpoint")
    outside = tmp_path / "canary" / "model.ckpt-300"
    outside.parent.mkdir()
    (tmp_path / "canary" / "model.ckpt-300.index").write_bytes(b"x")
    for named in (str(outside), "../../../canary/model.ckpt-300", "sub/../../evil/../../../canary/model.ckpt-300"):
        with pytest.raises(UnsafeParameterError) as caught:
            resolve_state_path(model_dir, named, source=state, untrusted=True)
        assert f"{state} names {named}, outside the model dir {model_dir}" in str(caught.value)
        assert str(caught.value).startswith("model_dir: ")
    # trusted callers keep TensorFlow's reading: an absolute path that exists is taken as is
    assert resolve_state_path(model_dir, str(outside), source=state, untrusted=False) == str(outside)
    # inside, relative or absolute, is fine; an absolute path elsewhere is taken by name when that
    # checkpoint is in the model dir (a copied Estimator model dir), without looking at the original
    assert resolve_state_path(model_dir, "model.ckpt-5", source=state, untrusted=True) == str(model_dir / "model.ckpt-5")
    (model_dir / "model.ckpt-300.index").write_bytes(b"x")
    assert resolve_state_path(model_dir, str(outside), source=state, untrusted=True) == str(model_dir / "model.ckpt-300")


def test_an_untrusted_state_file_naming_a_checkpoint_through_a_symlink_out_is_refused(tmp_path):
    from prefect_tensorflow.tasks.errors import UnsafeParameterError

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (tmp_path / "canary").mkdir()
    (model_dir / "sub").symlink_to(tmp_path / "canary")
    (model_dir / "checkpoint").write_text('model_checkpoint_path: "sub/model.ckpt-300"\n')
    with pytest.raises(UnsafeParameterError, match="checkpoint names sub/model.ckpt-300, outside the model dir"):
        read_state_file(model_dir, untrusted=True)
    assert read_state_file(model_dir, untrusted=False).model_checkpoint_path == str(model_dir / "sub" / "model.ckpt-300")


def test_untrusted_checkpoint_files_must_resolve_inside_the_model_dir_or_the_roots(tmp_path, trained_dir):
    import shutil

    from prefect_tensorflow.tasks.checkpoints.files import confine_checkpoint_files
    from prefect_tensorflow.tasks.errors import UnsafeParameterError

    roots, canary = tmp_path / "roots", tmp_path / "canary"
    model_dir = roots / "m"
    model_dir.mkdir(parents=True)
    canary.mkdir()
    for name in ("model.ckpt-300.index", "model.ckpt-300.data-00000-of-00001"):
        shutil.copyfile(trained_dir / name, canary / name)
    shutil.copyfile(trained_dir / "model.ckpt-300.index", model_dir / "model.ckpt-300.index")
    (model_dir / "model.ckpt-300.data-00000-of-00001").symlink_to(canary / "model.ckpt-300.data-00000-of-00001")
    prefix = str(model_dir / "model.ckpt-300")
    with pytest.raises(
        UnsafeParameterError, match=r"model.ckpt-300.data-00000-of-00001 \(-> .*canary.*\) lies outside the model dir"
    ):
        confine_checkpoint_files(prefix, model_dir=str(model_dir), untrusted=True)
    with pytest.raises(UnsafeParameterError, match="lies outside the allowed roots"):
        confine_checkpoint_files(prefix, parameter="checkpoint", untrusted=True, roots=[str(roots)])
    confine_checkpoint_files(prefix, model_dir=str(model_dir), untrusted=False)  # trusted: not checked
    confine_checkpoint_files(str(canary / "model.ckpt-300"), untrusted=True, roots=[str(tmp_path)])
