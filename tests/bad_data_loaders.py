"""Dataset loaders with bad data, for the tests of how training reports it (not registered; named by import string)."""

from __future__ import annotations


def label_seven(split: str = "train"):
    """Iris with one label 7 where the model has 3 classes: TensorFlow refuses it inside the training step."""
    import tensorflow as tf

    from prefect_tensorflow.tasks.iris import load_dataset

    return load_dataset(split).map(lambda x, y: (x, tf.where(y == 2, tf.constant(7, tf.int32), y)))


def with_columns(split: str = "train"):
    """Iris, with a `columns` attribute giving raw columns the model does not read (a site, text labels)."""
    from prefect_tensorflow.tasks.iris import load_dataset

    return load_dataset(split)


def _columns(split: str):
    import numpy as np

    from prefect_tensorflow.tasks.data.source import Columns
    from prefect_tensorflow.tasks.iris import CLASS_NAMES, read_iris

    features, labels = read_iris()
    keep = [i for i in range(len(labels)) if (i % 5 == 4) == (split == "eval")]
    return Columns(
        {
            "petal_length": np.array([features[i][2] for i in keep], np.float32),
            "site": np.array(["north" if i % 2 else "south" for i in keep], dtype=object),
            "species": np.array([CLASS_NAMES[labels[i]] for i in keep]),
        },
        label="species",
    )


with_columns.columns = _columns  # type: ignore[attr-defined]
