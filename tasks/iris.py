"""The bundled example: the TensorFlow guide's iris classifier and its data.

A DNN with hidden units [10, 10] and 3 classes (what the guide built with
`tf.estimator.DNNClassifier`), trained with Adagrad at learning rate 0.05 as
the Estimator did, on the 150-row iris data shipped in `data/iris.csv`
(Fisher's iris data, in the guide's CSV layout). Every fifth row is held out
for evaluation (120 training rows, 30 evaluation rows, as in the guide).

Both functions follow the contracts of the `model` and `data` import strings:

- model builder: `build_model(**hparams) -> keras.Model`, compiled with an
  optimizer and a loss.
- dataset loader: `load_dataset(split) -> tf.data.Dataset` of unbatched
  `(features, label)` pairs, for `split` in `"train"` and `"eval"`.

Example:
    >>> from prefect_tensorflow.tasks.iris import build_model, load_dataset
    >>> build_model().name
    'iris_dnn'
    >>> features, label = next(iter(load_dataset("train")))
    >>> features.shape.as_list(), label.dtype.name
    ([4], 'int32')
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from importlib import resources

FEATURE_NAMES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
CLASS_NAMES = ("setosa", "versicolor", "virginica")
MODEL = "prefect_tensorflow.tasks.iris:build_model"
DATA = "prefect_tensorflow.tasks.iris:load_dataset"


def read_iris() -> tuple[list[list[float]], list[int]]:
    """The 150 rows of the bundled CSV as (features, labels)."""
    text = resources.files(__package__).joinpath("data/iris.csv").read_text(encoding="utf-8")
    rows = list(csv.reader(text.splitlines()))
    header, body = rows[0], rows[1:]
    if int(header[0]) != len(body):
        raise ValueError(f"iris.csv: header says {header[0]} rows, found {len(body)}")
    return [[float(v) for v in row[:4]] for row in body], [int(row[4]) for row in body]


def load_dataset(split: str = "train"):
    """Iris as a `tf.data.Dataset` of `(float32[4], int32)` pairs.

    Args:
        split: "train" (120 rows) or "eval" (30 rows, every fifth row).
    """
    import tensorflow as tf

    if split not in ("train", "eval"):
        raise ValueError(f"split: expected 'train' or 'eval', received {split!r}")
    features, labels = read_iris()
    keep = [i for i in range(len(labels)) if (i % 5 == 4) == (split == "eval")]
    return tf.data.Dataset.from_tensor_slices(
        (
            tf.constant([features[i] for i in keep], tf.float32),
            tf.constant([labels[i] for i in keep], tf.int32),
        )
    )


def iris_manifest():
    """The bundled CSV as a one-file `DataManifest` (its content's SHA-256 as the etag): the lineage of iris.

    Set as `load_dataset.manifest`, the loader attribute `data.source.DataSource.manifest` reads.
    """
    import hashlib

    from .data.manifest import DataManifest, ManifestFile

    content = resources.files(__package__).joinpath("data/iris.csv").read_bytes()
    _, labels = read_iris()
    return DataManifest(
        source="prefect_tensorflow.tasks.iris (bundled data/iris.csv)",
        files=(
            ManifestFile(name="data/iris.csv", size=len(content), etag=hashlib.sha256(content).hexdigest(), rows=len(labels)),
        ),
        split_rule="every fifth row (row index % 5 == 4) is eval",
    )


load_dataset.manifest = iris_manifest  # type: ignore[attr-defined]
load_dataset.feature_names = FEATURE_NAMES  # type: ignore[attr-defined]


def build_model(hidden_units: Sequence[int] = (10, 10), n_classes: int = 3, learning_rate: float = 0.05):
    """The guide's DNN classifier as a compiled Keras functional model that outputs logits."""
    import keras

    inputs = keras.Input(shape=(len(FEATURE_NAMES),), name="features")
    x = inputs
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dense(units, activation="relu", name=f"hiddenlayer_{i}")(x)
    logits = keras.layers.Dense(n_classes, name="logits")(x)
    model = keras.Model(inputs, logits, name="iris_dnn")
    model.compile(
        optimizer=keras.optimizers.Adagrad(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model
