"""Bad data that TensorFlow refuses in the middle of training, reported as the README's contract asks.

A label outside the model's classes gets past the loader and into the
training step, where TensorFlow raises `InvalidArgumentError` with a page of
graph traceback, and not always the same page: on CPU the loss op says
"Received a label value of 7 which is outside the valid range of [0, 3)",
but the gradient's op may fail first with "segment_ids[31] = 100 is out of
range". So the message is parsed when it says which label, and otherwise the
splits are scanned for the first label outside `[0, classes)`. Either way the
run ends with one `DataError` line naming the loader (`data 'x'`), the label
and the value; the CLI exits 2 on it.

Example:
    >>> label_out_of_range("Received a label value of 7 which is outside the valid range of [0, 3).  Label values: 0 7")
    (7, 3)
    >>> print(refused_data_error("Matrix size-incompatible: In[0]: [16,5], In[1]: [4,10]\\n\\t [[{{node x}}]]", "mine:load"))
    data 'mine:load': TensorFlow refused a training batch: Matrix size-incompatible: In[0]: [16,5], In[1]: [4,10]
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from ..errors import DataError

LABEL_OUT_OF_RANGE = re.compile(r"Received a label value of (-?\d+) which is outside the valid range of \[0, (\d+)\)")
SCANNED_ROWS = 1_000_000  # a scan for the bad label stops here (it runs once, after training failed)


def label_out_of_range(message: str) -> Optional[tuple[int, int]]:
    """(label, classes) when TensorFlow's message says a label was outside `[0, classes)`, else None."""
    found = LABEL_OUT_OF_RANGE.search(message)
    return (int(found.group(1)), int(found.group(2))) if found else None


def first_label_outside(splits: Mapping[str, Any], classes: int, limit: int = SCANNED_ROWS) -> Optional[tuple[str, int]]:
    """(split, label) of the first label outside `[0, classes)` in the unbatched `(features, label)` `splits`.

    Example:
        >>> import tensorflow as tf
        >>> ds = tf.data.Dataset.from_tensor_slices(([[0.0], [1.0]], [1, 5]))
        >>> first_label_outside({"train": ds}, classes=3)
        ('train', 5)
    """
    for split, dataset in splits.items():
        for _, labels in dataset.take(limit).batch(4096).as_numpy_iterator():
            labels = np.asarray(labels).reshape(-1)
            bad = labels[(labels < 0) | (labels >= classes)]
            if bad.size:
                return split, int(bad[0])
    return None


def output_classes(net: Any) -> Optional[int]:
    """The width of the model's (single) output, the number of classes of a classifier; None if it has no one width."""
    try:
        width = net.outputs[0].shape[-1]
    except (AttributeError, IndexError, TypeError):
        return None
    return int(width) if width else None


def refused_data_error(
    message: str, data: str, splits: Optional[Mapping[str, Any]] = None, classes: Optional[int] = None
) -> DataError:
    """The one-line `DataError` for TensorFlow's `message` about the data of loader `data`.

    A label outside the classes is named (from the message, else from a scan of `splits` when `classes` is
    known); otherwise the line quotes TensorFlow's own reason, without its graph traceback.

    Example:
        >>> str(refused_data_error("... Received a label value of 7 which is outside the valid range of [0, 3). ...", "iris"))
        "data 'iris': label 7 is outside the model's 3 classes (expected 0 to 2); TensorFlow refused it during training"
    """
    parsed = label_out_of_range(message)
    split = ""
    if parsed is None and splits and classes and classes > 1:
        scanned = first_label_outside(splits, classes)
        if scanned is not None:
            split, label = scanned
            parsed = (label, classes)
    if parsed is not None:
        label, classes = parsed
        where = f" (split {split!r})" if split else ""
        return DataError(
            f"data {data!r}: label {label}{where} is outside the model's {classes} classes (expected 0 to {classes - 1}); "
            "TensorFlow refused it during training"
        )
    return DataError(f"data {data!r}: TensorFlow refused a training batch: {_reason(message)}")


def _reason(message: str) -> str:
    """TensorFlow's own reason: the last line that is not graph traceback, node names or the op's name."""
    lines = [line.strip() for line in message.splitlines()]
    reasons = [
        line
        for line in lines
        if line and not line.startswith(("File ", "[[", "Detected at node", "Graph execution error", "Traceback"))
    ]
    reason = reasons[-1] if reasons else "(no message)"
    return re.sub(r"\s*\[Op:[^\]]*\]$", "", reason)
