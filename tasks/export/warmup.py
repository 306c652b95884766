"""TensorFlow Serving's warmup file: requests it replays when it loads a version, before the version takes traffic.

`<version>/assets.extra/tf_serving_warmup_requests` is a TFRecord of
`PredictionLog` protos (`tensorflow-serving-api`), each a `PredictRequest`
for `serving_default`. `export_saved_model` writes one, built from the
verification batch (single rows, then a larger batch), into the staged
version before it is published, reads it back and parses it; the version's
digest (`export_base.saved_model_digest`) covers it.

Example:
    >>> import numpy as np, tempfile
    >>> from prefect_tensorflow.tasks.export.warmup import read_warmup_requests, write_warmup_requests
    >>> export_dir = tempfile.mkdtemp()
    >>> path = write_warmup_requests(export_dir, {"features": np.zeros((5, 4), np.float32)}, model_name="iris")
    >>> [r.inputs["features"].tensor_shape.dim[0].size for r in read_warmup_requests(export_dir, ["features"])]
    [1, 1, 1, 5]
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from ..errors import ExportError

WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
SIGNATURE_KEY = "serving_default"
SINGLE_ROWS = 3
LARGEST_BATCH = 8


def warmup_batches(inputs: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The requests' inputs: the first `SINGLE_ROWS` rows one at a time, then up to `LARGEST_BATCH` rows together."""
    rows = min(len(np.asarray(v)) for v in inputs.values()) if inputs else 0
    if rows == 0:
        return [dict(inputs)] if inputs else []
    batches = [{k: np.asarray(v)[i : i + 1] for k, v in inputs.items()} for i in range(min(SINGLE_ROWS, rows))]
    if rows > 1:
        batches.append({k: np.asarray(v)[: min(LARGEST_BATCH, rows)] for k, v in inputs.items()})
    return batches


def write_warmup_requests(
    export_dir: str, inputs: Mapping[str, np.ndarray], *, model_name: str, signature_name: str = SIGNATURE_KEY
) -> str:
    """Write `<export_dir>/assets.extra/tf_serving_warmup_requests` from `inputs` (input name -> batch); its path.

    Raises:
        ExportError: no inputs, or a value TensorFlow cannot turn into a tensor proto (naming the input).
    """
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    if not inputs:
        raise ExportError(f"warmup file for {export_dir}: no inputs to build requests from")
    path = os.path.join(export_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for batch in warmup_batches(inputs):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = signature_name
            for name, value in batch.items():
                try:
                    request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
                except (TypeError, ValueError) as err:
                    raise ExportError(f"warmup file {path}: input {name!r} cannot be a tensor proto: {err}") from err
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path


def tfrecords(data: bytes, what: str) -> list[bytes]:
    """The records of TFRecord bytes, each length and payload checked against its masked CRC32C.

    TensorFlow's own readers stop quietly at a truncated last record; this one raises.

    Raises:
        ExportError: a truncated record, trailing bytes, or a checksum mismatch (`what` names the file).

    Example:
        >>> tfrecords(b"", "f")
        []
    """
    import struct

    import google_crc32c

    def masked(chunk: bytes) -> int:
        crc = google_crc32c.value(chunk)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    records: list[bytes] = []
    offset = 0
    while offset < len(data):
        if offset + 12 > len(data):
            raise ExportError(f"{what}: truncated record header at byte {offset}")
        (length,) = struct.unpack_from("<Q", data, offset)
        (length_crc,) = struct.unpack_from("<I", data, offset + 8)
        if length_crc != masked(data[offset : offset + 8]):
            raise ExportError(f"{what}: record {len(records)} has a corrupt length (checksum mismatch)")
        end = offset + 12 + length
        if end + 4 > len(data):
            raise ExportError(f"{what}: record {len(records)} is truncated")
        (data_crc,) = struct.unpack_from("<I", data, end)
        if data_crc != masked(data[offset + 12 : end]):
            raise ExportError(f"{what}: record {len(records)} is corrupt (checksum mismatch)")
        records.append(data[offset + 12 : end])
        offset = end + 4
    return records


def read_warmup_requests(export_dir: str, input_names: Optional[list[str]] = None) -> list[Any]:
    """Parse the warmup file of `export_dir`: its `PredictRequest`s, each checked to name exactly `input_names`.

    Raises:
        ExportError: the file is missing, unreadable, corrupt, holds no request, or a request is not for
            `serving_default` or names other inputs (the file is named).
    """
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(export_dir, WARMUP_FILE)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise ExportError(f"warmup file {path} cannot be read: {err.strerror or err}") from err
    requests = []
    for i, record in enumerate(tfrecords(data, f"warmup file {path}")):
        try:
            log = prediction_log_pb2.PredictionLog.FromString(record)
            if log.WhichOneof("log_type") != "predict_log":
                raise ExportError(f"warmup file {path}: record {i} is not a predict_log")
            request = log.predict_log.request
            for proto in request.inputs.values():
                tf.make_ndarray(proto)  # every tensor parses
        except ExportError:
            raise
        except Exception as err:  # a proto that does not parse (DecodeError), a tensor that does not
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise ExportError(f"warmup file {path}: record {i} does not parse: {first}") from err
        if request.model_spec.signature_name != SIGNATURE_KEY:
            raise ExportError(
                f"warmup file {path}: request {i} is for {request.model_spec.signature_name!r}, not {SIGNATURE_KEY!r}"
            )
        if input_names is not None and sorted(request.inputs) != sorted(input_names):
            raise ExportError(
                f"warmup file {path}: request {i} has inputs {sorted(request.inputs)}, the signature {sorted(input_names)}"
            )
        requests.append(request)
    if not requests:
        raise ExportError(f"warmup file {path} holds no request")
    return requests
