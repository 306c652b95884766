"""Look inside a checkpoint with TensorFlow's reader: variables, shapes, dtypes, checksums.

Example:
    >>> import os, tempfile
    >>> import tensorflow as tf
    >>> from prefect_tensorflow.tasks.checkpoints.inspection import list_variables
    >>> step = tf.Variable(0, dtype=tf.int64)
    >>> prefix = tf.train.Checkpoint(global_step=step).write(os.path.join(tempfile.mkdtemp(), "model.ckpt-0"))
    >>> list_variables(prefix)[0]
    VariableInfo(name='global_step/.ATTRIBUTES/VARIABLE_VALUE', shape=[], dtype='int64')
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict

from ..errors import InvalidCheckpointError
from .files import OBJECT_GRAPH_KEY


class VariableInfo(BaseModel):
    """A tensor stored in a checkpoint."""

    model_config = ConfigDict(frozen=True)

    name: str
    shape: list[int]
    dtype: str


def _reader(prefix: str):
    import tensorflow as tf

    try:
        return tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as err:
        raise InvalidCheckpointError(prefix, f"TensorFlow cannot open it: {err}") from err


def list_variables(prefix: str | os.PathLike) -> list[VariableInfo]:
    """The tensors in a checkpoint, sorted by name (the object graph itself left out)."""
    prefix = os.fspath(prefix)
    reader = _reader(prefix)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    return [
        VariableInfo(name=name, shape=list(shapes[name]), dtype=dtypes[name].name)
        for name in sorted(shapes)
        if name != OBJECT_GRAPH_KEY
    ]


def read_all_tensors(prefix: str | os.PathLike) -> int:
    """Read every tensor back with `RestoreV2`, which checks each one's CRC32C.

    `RestoreV2` reads every dtype, the variant-typed input-iterator state
    included (the Python checkpoint reader cannot). Returns the number of
    tensors read.

    Raises:
        InvalidCheckpointError: a tensor cannot be read or its checksum is wrong.
    """
    import tensorflow as tf

    prefix = os.fspath(prefix)
    dtypes = _reader(prefix).get_variable_to_dtype_map()
    names = sorted(name for name in dtypes if name != OBJECT_GRAPH_KEY)
    for name in names:
        try:
            tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=[name], shape_and_slices=[""], dtypes=[dtypes[name]])
        except (tf.errors.OpError, ValueError) as err:
            detail = getattr(err, "message", str(err)).strip().splitlines()[0]
            raise InvalidCheckpointError(prefix, f"tensor {name!r} does not read back: {detail}") from err
    return len(names)
