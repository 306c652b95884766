"""The sidecar's restore straight from a bundle (tasks/checkpoints/bundle_reader.py, storage/direct_io.DirectReader).

It must give the model exactly what TensorFlow's `Checkpoint.read` gives, for
checkpoints of the trainer's shape (model, optimizer, step: the weights named
through the optimizer's shorter path) written by the project's writer (around
the page cache too) and by TensorFlow's own `Checkpoint.write`. Whatever it
cannot vouch for (a changed byte in the data or the index, a cut data file, a
model of other widths, no index) it answers False with nothing assigned, so the
caller's TensorFlow read decides, as before. Real files throughout; the one
simulated fault is a file system that takes `O_DIRECT` at the open and refuses
it at the read (`os.preadv` raising EINVAL), which cannot be mounted here.
"""

from __future__ import annotations

import errno
import os
import shutil

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from prefect_tensorflow.tasks.checkpoints import bundle  # noqa: E402
from prefect_tensorflow.tasks.checkpoints.bundle_reader import VariableRestorer, read_index  # noqa: E402
from prefect_tensorflow.tasks.checkpoints.files import parse_index  # noqa: E402
from prefect_tensorflow.tasks.checkpoints.metrics_log import METRICS_FILE  # noqa: E402
from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy  # noqa: E402
from prefect_tensorflow.tasks.checkpoints.writer import CheckpointWriter  # noqa: E402
from prefect_tensorflow.tasks.iris import build_model  # noqa: E402
from prefect_tensorflow.tasks.storage import direct_io  # noqa: E402
from prefect_tensorflow.tasks.storage.direct_io import ALIGNMENT, DirectReader  # noqa: E402
from prefect_tensorflow.tasks.training.sidecar_evaluator import EvaluationSpec, Evaluator  # noqa: E402


def _trainer_checkpoint(model_dir, writer: str, seed: int = 3) -> tuple[str, list[np.ndarray]]:
    """A checkpoint as a training writes it (model, optimizer, step), its model's weights made distinct."""
    net = build_model()
    for i, variable in enumerate(net.variables):
        variable.assign(tf.random.stateless_uniform(variable.shape, seed=[seed, i]))
    net.optimizer.build(net.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=net, optimizer=net.optimizer, global_step=tf.Variable(7, dtype=tf.int64))
    if writer == "tensorflow":
        prefix = checkpoint.write(str(model_dir / "model.ckpt-7"))
    else:
        save = CheckpointWriter(checkpoint, str(model_dir), CheckpointPolicy(durable_commit=True), untrusted=False)
        prefix = save.save(7)
        save.finish()
    return prefix, [v.numpy() for v in net.variables]


def _evaluator_model():
    net = build_model()
    return net, tf.train.Checkpoint(model=net)


def _values(net) -> list[np.ndarray]:
    return [v.numpy() for v in net.variables]


@pytest.mark.parametrize("writer", ["project", "project-direct", "tensorflow"])
def test_the_model_gets_what_tensorflows_read_gives(tmp_path, monkeypatch, writer):
    if writer == "project-direct":
        monkeypatch.setattr(bundle, "DIRECT_MIN_BYTES", 1)  # the data file written around the page cache
    prefix, weights = _trainer_checkpoint(tmp_path, "tensorflow" if writer == "tensorflow" else "project")
    _, entries = read_index(prefix)
    named = [key for key in entries if "VARIABLE_VALUE" in key]
    assert not any(key.startswith("model/") for key in named)  # the weights are named through the optimizer
    assert sum(key.startswith("optimizer/_trainable_variables/") for key in named) == len(weights)
    ours, ours_checkpoint = _evaluator_model()
    theirs, theirs_checkpoint = _evaluator_model()
    assert VariableRestorer(ours_checkpoint, ours.variables).restore(prefix) is True
    theirs_checkpoint.read(prefix).expect_partial()
    for mine, tensorflows, written in zip(_values(ours), _values(theirs), weights):
        np.testing.assert_array_equal(mine, tensorflows)
        np.testing.assert_array_equal(mine, written)
    second, _ = _trainer_checkpoint(tmp_path / "next", writer="tensorflow", seed=9)  # the buffer is reused
    restorer = VariableRestorer(ours_checkpoint, ours.variables)
    assert restorer.restore(prefix) and restorer.restore(second)
    theirs_checkpoint.read(second).expect_partial()
    for mine, tensorflows in zip(_values(ours), _values(theirs)):
        np.testing.assert_array_equal(mine, tensorflows)


def test_the_index_reads_as_tensorflow_lists_it(tmp_path):
    prefix, _ = _trainer_checkpoint(tmp_path, "project")
    header, entries = read_index(prefix)
    listed = dict(tf.train.list_variables(prefix))
    assert header.num_shards == 1 and set(entries) == set(listed)
    for key, shape in listed.items():
        assert [d.size for d in entries[key].shape.dim] == shape


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def _second_weight_offset(prefix: str) -> int:
    _, entries = parse_index(open(prefix + ".index", "rb").read())
    _, offset, size = entries["optimizer/_trainable_variables/1/.ATTRIBUTES/VARIABLE_VALUE"]
    return offset + size // 2


@pytest.mark.parametrize("damage", ["data byte", "index byte", "data cut", "no index", "other widths"])
def test_what_it_cannot_vouch_for_assigns_nothing_and_leaves_the_read_to_tensorflow(tmp_path, damage):
    prefix, _ = _trainer_checkpoint(tmp_path, "project")
    data = prefix + ".data-00000-of-00001"
    net, checkpoint = _evaluator_model()
    if damage == "data byte":
        _flip(data, _second_weight_offset(prefix))  # the first weight is intact: still nothing may be assigned
    elif damage == "index byte":
        _flip(prefix + ".index", 40)
    elif damage == "data cut":
        os.truncate(data, os.path.getsize(data) - 3)
    elif damage == "no index":
        os.remove(prefix + ".index")
    else:
        net = build_model(hidden_units=(12, 10))
        checkpoint = tf.train.Checkpoint(model=net)
    before = _values(net)
    assert VariableRestorer(checkpoint, net.variables).restore(prefix) is False
    for now, then in zip(_values(net), before):
        np.testing.assert_array_equal(now, then)
    if damage != "other widths":  # TensorFlow's own read refuses them too, with its error
        with pytest.raises((tf.errors.OpError, ValueError)):
            checkpoint.read(prefix).expect_partial().assert_existing_objects_matched()


def test_the_sidecars_evaluator_restores_directly_and_records_the_same_metrics(model_dir_copy, tmp_path):
    """The evaluator's metrics line for a real training's checkpoint is the one TensorFlow's read gives."""
    spec = EvaluationSpec(model="iris", data="iris")
    other = tmp_path / "other"
    shutil.copytree(model_dir_copy, other)
    lines = {}
    for directory, direct in ((model_dir_copy, True), (other, False)):
        (directory / METRICS_FILE).write_text("")
        evaluator = Evaluator(str(directory), spec)
        evaluator.build()
        if not direct:
            evaluator._restorer.usable = False  # TensorFlow's read: the reference
        lines[direct] = evaluator.evaluate(200)
        assert evaluator.restored_directly is direct
        evaluator.close()
    assert lines[True] is not None and lines[True] == lines[False]


def test_direct_reader_reads_any_range_and_reuses_its_buffer(tmp_path):
    path = str(tmp_path / "data")
    content = np.random.default_rng(1).integers(0, 256, 3 * ALIGNMENT + 123, dtype=np.uint8).tobytes()
    with open(path, "wb") as handle:
        handle.write(content)
    reader = DirectReader()
    for start, end in ((0, len(content)), (1, 2), (ALIGNMENT - 1, 2 * ALIGNMENT + 1), (len(content) - 5, len(content))):
        assert bytes(reader.read(path, start, end)) == content[start:end]
    buffer = reader._buffer
    assert bytes(reader.read(path, 10, 20)) == content[10:20] and reader._buffer is buffer  # no new memory per read
    assert buffer.ctypes.data % ALIGNMENT == 0
    with pytest.raises(OSError, match="ends at byte"):
        reader.read(path, 0, len(content) + 1)


def test_direct_reader_falls_back_to_the_page_cache_when_a_read_refuses_o_direct(tmp_path, monkeypatch):
    path = str(tmp_path / "data")
    with open(path, "wb") as handle:
        handle.write(b"abcdefgh" * 1000)
    real_preadv = os.preadv
    refused = []

    def preadv(fd, buffers, offset):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(direct_io.os, "preadv", preadv)
    assert bytes(DirectReader().read(path, 3, 11)) == b"defghabc"
    assert refused == [0]
