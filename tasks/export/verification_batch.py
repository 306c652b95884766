"""The batch every artifact of one checkpoint is run on: eval examples of a dataset, else seeded random values.

`signature.trace_checkpoint` computes the checkpoint's outputs on it and
`verification` runs the frozen graph and the SavedModel on the same batch;
it lives apart from both so neither imports the other for it.

Example:
    >>> import tensorflow as tf
    >>> from prefect_tensorflow.tasks.export.verification_batch import verification_batch
    >>> [x.shape for x in verification_batch([tf.TensorSpec([None, 4], tf.float32)], size=8)]
    [(8, 4)]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

import numpy as np

from .. import model_code
from ..errors import ParityError

if TYPE_CHECKING:
    from ..data.source import DataSource


def verification_batch(
    specs: list, data: Optional[Union[str, DataSource]] = None, size: int = 32, seed: int = 0
) -> list[np.ndarray]:
    """One batch per input spec: the first `size` examples of `data`'s eval split, else seeded random values.

    Args:
        specs: `tf.TensorSpec`s (or objects with `.shape` and `.dtype`) of the inputs.
        data: `"module:attr"` of a dataset loader, a `DataSource` (a loader with its options and window), or None.
    """
    import tensorflow as tf

    if data is not None:
        features = []
        dataset = model_code.load_split(data, "eval") if isinstance(data, str) else data.load("eval")
        for element in dataset.take(size):
            x = element[0] if isinstance(element, tuple) else element
            features.append(x if isinstance(x, (list, tuple)) else [x])
        if features:
            return [np.stack([np.asarray(f[i]) for f in features]) for i in range(len(features[0]))]
    rng = np.random.default_rng(seed)
    batch = []
    for spec in specs:
        shape = [size if d is None else d for d in tf.TensorShape(spec.shape).as_list()]
        dtype = tf.as_dtype(spec.dtype)
        if dtype.is_floating:
            batch.append(rng.normal(size=shape).astype(dtype.as_numpy_dtype))
        elif dtype.is_integer:
            batch.append(rng.integers(0, 10, size=shape).astype(dtype.as_numpy_dtype))
        else:
            raise ParityError(f"cannot make verification values for input of dtype {dtype.name}; pass data")
    return batch
