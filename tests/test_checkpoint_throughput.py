"""The checkpoint write path's own bundle writer (tasks/checkpoints/bundle.py): TensorFlow's files, byte for byte.

`CheckpointWriter` writes a snapshot's data file and index itself (no copy
through a buffer, hardware CRC32C) instead of `SaveV2`; the speed is measured
in bench/checkpoint_save.py (case g). Here: the files are exactly those
`SaveV2` writes for the same tensors (every dtype family, strings, a dataset
iterator's variant state, an index of several table blocks), through the
page cache and around it (`O_DIRECT`, from `bundle.DIRECT_MIN_BYTES` on: a data
file of several buffer pieces, the last one short), TensorFlow restores them,
and its checksums catch a changed byte.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from prefect_tensorflow.tasks.checkpoints import bundle  # noqa: E402
from prefect_tensorflow.tasks.checkpoints.files import parse_index  # noqa: E402
from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy  # noqa: E402
from prefect_tensorflow.tasks.checkpoints.writer import CheckpointWriter  # noqa: E402
from prefect_tensorflow.tasks.storage.direct_io import BUFFER_BYTES  # noqa: E402


def _iterator_state() -> tuple[object, object]:
    iterator = iter(tf.data.Dataset.range(100).shuffle(10, seed=1).batch(3))
    next(iterator)
    (state,) = iterator._serialize_to_tensors().values()
    return iterator, state


class _RecordingDirectFile(bundle.DirectFile):
    """`bundle.DirectFile`, each opened file's path and whether it was written around the page cache recorded."""

    opened: list = []

    def close(self) -> None:
        super().close()
        self.opened.append((os.path.basename(self.path), self.direct))


@pytest.mark.parametrize("direct_min_bytes", [None, 0], ids=["page-cache", "o-direct"])
def test_bundle_is_savev2s_files_byte_for_byte(tmp_path, monkeypatch, direct_min_bytes):
    monkeypatch.setattr(bundle, "DirectFile", _RecordingDirectFile)
    monkeypatch.setattr(_RecordingDirectFile, "opened", [])
    _, state = _iterator_state()
    tensors = {
        "_CHECKPOINTABLE_OBJECT_GRAPH": tf.constant(b"graph\x00proto" * 50),
        "b/w": tf.random.uniform([3, 5], seed=1),
        "a/x": tf.constant(3, tf.int64),
        "bool": tf.constant([True, False]),
        "bf16": tf.constant([1.5, 2.0], tf.bfloat16),
        "f16": tf.constant([[1.0]], tf.float16),
        "empty": tf.zeros([0, 4]),
        "strings": tf.constant([b"", b"abc", b"x" * 300]),
        "u8": tf.constant([1, 255], tf.uint8),
        "complex": tf.constant([1 + 2j], tf.complex64),
        "it/ITERATOR": state,
        "big": tf.random.stateless_uniform([2 * BUFFER_BYTES // 4 + 1001], seed=[5, 6]),  # three pieces, the last short
    }
    for i in range(3000):  # long unshared keys: an index of two 256 KiB table blocks (a separator between them)
        tensors[f"layer/{i:05d}/{'k' * 100}"] = tf.constant([float(i)])
    assert bundle.can_write(tensors.values())

    bundle.write_bundle(str(tmp_path / "ours"), tensors, direct_min_bytes=direct_min_bytes)
    assert _RecordingDirectFile.opened == [("ours.data-00000-of-00001", direct_min_bytes is not None), ("ours.index", False)]
    tf.raw_ops.SaveV2(
        prefix=str(tmp_path / "tf"),
        tensor_names=list(tensors),
        shape_and_slices=[""] * len(tensors),
        tensors=list(tensors.values()),
    )

    for suffix in (".index", ".data-00000-of-00001"):
        ours, theirs = (tmp_path / f"ours{suffix}").read_bytes(), (tmp_path / f"tf{suffix}").read_bytes()
        assert ours == theirs, f"{suffix}: {len(ours)} bytes vs SaveV2's {len(theirs)}"
    assert len((tmp_path / "ours.index").read_bytes()) > bundle.BLOCK_SIZE
    reader = tf.train.load_checkpoint(str(tmp_path / "ours"))
    assert reader.get_tensor("strings").tolist() == [b"", b"abc", b"x" * 300]
    np.testing.assert_array_equal(reader.get_tensor("b/w"), tensors["b/w"].numpy())


def test_writer_checkpoint_restores_with_tensorflow_and_its_checksums(tmp_path, monkeypatch):
    written: list[str] = []
    write_bundle = bundle.write_bundle
    monkeypatch.setattr(
        bundle,
        "write_bundle",
        lambda prefix, tensors, **options: (written.append(prefix), write_bundle(prefix, tensors, **options)),
    )
    iterator, _ = _iterator_state()
    weights = tf.Variable(tf.random.uniform([1000], seed=2))
    model_dir = tmp_path / "m"
    writer = CheckpointWriter(
        tf.train.Checkpoint(w=weights, it=iterator), str(model_dir), CheckpointPolicy(keep_checkpoint_max=2), untrusted=False
    )
    writer.save(1)
    writer.finish()
    assert len(written) == 1, "the write path did not use bundle.write_bundle"
    expected_next = next(iterator).numpy().tolist()

    fresh_iterator = iter(tf.data.Dataset.range(100).shuffle(10, seed=1).batch(3))
    fresh = tf.Variable(tf.zeros([1000]))
    tf.train.Checkpoint(w=fresh, it=fresh_iterator).restore(str(model_dir / "model.ckpt-1")).assert_consumed()
    np.testing.assert_array_equal(fresh.numpy(), weights.numpy())
    assert next(fresh_iterator).numpy().tolist() == expected_next  # the input position came back too

    key = "w/.ATTRIBUTES/VARIABLE_VALUE"
    _, entries = parse_index((model_dir / "model.ckpt-1.index").read_bytes())
    _, offset, size = entries[key]
    with open(model_dir / "model.ckpt-1.data-00000-of-00001", "r+b") as handle:  # one byte of the weights changed
        handle.seek(offset + size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(tf.errors.OpError, match="Checksum does not match"):
        tf.train.load_checkpoint(str(model_dir / "model.ckpt-1")).get_tensor(key)


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "not-durable"])
def test_a_large_durable_checkpoint_is_written_around_the_page_cache_and_restores(tmp_path, monkeypatch, durable):
    """From `DIRECT_MIN_BYTES` of variables a durable commit's data file goes around the page cache (one that is not
    durable through it); two saves in a row (the second while the first is written) each keep their step's values."""
    monkeypatch.setattr(bundle, "DirectFile", _RecordingDirectFile)
    monkeypatch.setattr(_RecordingDirectFile, "opened", [])
    weights = tf.Variable(tf.random.stateless_uniform([bundle.DIRECT_MIN_BYTES // 4 + 7], seed=[7, 8]))
    model_dir = tmp_path / "m"
    policy = CheckpointPolicy(durable_commit=durable)
    writer = CheckpointWriter(tf.train.Checkpoint(w=weights), str(model_dir), policy, untrusted=False)
    values = {}
    for step in (1, 2):
        writer.save(step)
        values[step] = weights.numpy()
        weights.assign_add(tf.ones_like(weights))  # the next step: the snapshot, not the live variable, is written
    writer.finish()
    assert [direct for name, direct in _RecordingDirectFile.opened if name.endswith(".data-00000-of-00001")] == [durable] * 2
    for step, saved in values.items():
        fresh = tf.Variable(tf.zeros_like(weights))
        tf.train.Checkpoint(w=fresh).restore(str(model_dir / f"model.ckpt-{step}")).assert_consumed()
        np.testing.assert_array_equal(fresh.numpy(), saved)
