"""The TF Serving warmup file: written into the staged export, read back, covered by the digest."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import export

from prefect_tensorflow.tasks import iris
from prefect_tensorflow.tasks.errors import ExportError
from prefect_tensorflow.tasks.export.export_base import saved_model_digest
from prefect_tensorflow.tasks.export.warmup import WARMUP_FILE, read_warmup_requests, write_warmup_requests


@pytest.fixture(scope="module")
def exported(trained_dir: Path, tmp_path_factory):
    base = tmp_path_factory.mktemp("warmup") / "iris-serving"
    return export(trained_dir / "model.ckpt-300", base, model=iris.MODEL, data=iris.DATA)


def test_the_export_carries_warmup_requests_built_from_the_verification_batch(exported):
    import tensorflow as tf

    requests = read_warmup_requests(exported.path, ["features"])
    eval_rows = np.stack([x.numpy() for x, _ in iris.load_dataset("eval").take(8)]).astype(np.float32)
    sizes = [r.inputs["features"].tensor_shape.dim[0].size for r in requests]
    assert sizes == [1, 1, 1, 8]
    for i in range(3):
        np.testing.assert_array_equal(tf.make_ndarray(requests[i].inputs["features"]), eval_rows[i : i + 1])
    np.testing.assert_array_equal(tf.make_ndarray(requests[3].inputs["features"]), eval_rows)
    assert {(r.model_spec.name, r.model_spec.signature_name) for r in requests} == {("iris-serving", "serving_default")}
    # TensorFlow's own reader sees the same records: the file is a TFRecord TF Serving can replay
    assert len(list(tf.data.TFRecordDataset(os.path.join(exported.path, WARMUP_FILE)))) == 4


def test_the_export_digest_covers_the_warmup_file(exported, tmp_path):
    copy = tmp_path / "1"
    shutil.copytree(exported.path, copy)
    assert saved_model_digest(str(copy)) == exported.digest
    requests = read_warmup_requests(str(copy))
    write_warmup_requests(str(copy), {"features": np.ones((2, 4), np.float32)}, model_name="other")
    assert len(read_warmup_requests(str(copy))) == 3 != len(requests)
    assert saved_model_digest(str(copy)) != exported.digest


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data[:-3], "is truncated"),
        (lambda data: data + b"x", "truncated record header"),
        (lambda data: data[:20] + bytes([data[20] ^ 1]) + data[21:], "checksum mismatch"),
        (lambda data: b"", "holds no request"),
    ],
    ids=["truncated", "trailing-byte", "flipped-bit", "empty"],
)
def test_a_damaged_warmup_file_is_refused_naming_it(tmp_path, damage, message):
    path = write_warmup_requests(str(tmp_path), {"features": np.zeros((3, 4), np.float32)}, model_name="m")
    data = Path(path).read_bytes()
    Path(path).write_bytes(damage(data))
    with pytest.raises(ExportError, match=message) as err:
        read_warmup_requests(str(tmp_path), ["features"])
    assert path in str(err.value)


def test_requests_for_other_inputs_or_a_missing_file_are_refused(tmp_path):
    with pytest.raises(ExportError, match="warmup file .* cannot be read"):
        read_warmup_requests(str(tmp_path))
    write_warmup_requests(str(tmp_path), {"x": np.zeros((2, 4), np.float32)}, model_name="m")
    with pytest.raises(ExportError, match=r"request 0 has inputs \['x'\], the signature \['features'\]"):
        read_warmup_requests(str(tmp_path), ["features"])


def test_an_export_whose_warmup_file_does_not_read_back_writes_no_version(trained_dir, tmp_path, monkeypatch):
    """The written file is damaged (its last byte cut) before the read-back: the export fails naming it."""
    from prefect_tensorflow.tasks.export import saved_model as exporting

    def damaged(export_dir, inputs, **kwargs):
        path = write_warmup_requests(export_dir, inputs, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:-1])
        return path

    monkeypatch.setattr(exporting, "write_warmup_requests", damaged)
    with pytest.raises(ExportError, match="tf_serving_warmup_requests: record 3 is truncated"):
        export(trained_dir / "model.ckpt-100", tmp_path / "export", model=iris.MODEL, data=iris.DATA)
    base = tmp_path / "export"
    assert not base.exists() or [n for n in os.listdir(base) if not n.startswith(".")] == []
