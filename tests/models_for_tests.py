"""Model builders and loaders used by the tests through import strings.

Loaded as the top-level module `models_for_tests` (pytest puts tests/ on
sys.path; subprocesses get it through PYTHONPATH).
"""

import os  # noqa: F401 - reachable as `models_for_tests:os.system` by a dotted attribute: refused in deployment runs
from shutil import rmtree  # noqa: F401 - a function imported into an allowed module: refused in deployment runs

from prefect_tensorflow.tasks import iris


def wider_model():
    """The iris classifier with different hidden units: its checkpoints do not fit `iris`."""
    return iris.build_model(hidden_units=(16, 8))


def uncompiled_model():
    import keras

    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(3)(inputs))


def not_a_model():
    return "a string"


def not_a_dataset(split):
    return [[1.0, 2.0, 3.0, 4.0]]


def deeper_model():
    """One more hidden layer than `iris`: its variables have no keys in iris checkpoints."""
    return iris.build_model(hidden_units=(10, 10, 10))


def huge_model():
    """A classifier with 2.16 GB of float32 variables: 4 x 135M kernel, summed, then 3 logits.

    Only built and checkpointed in the tests, never run (one batch would need 17 GB).
    """
    import keras

    inputs = keras.Input((4,), name="features")
    wide = keras.layers.Dense(2**27 + 2**20, use_bias=False, kernel_initializer="zeros", name="wide")(inputs)
    summed = keras.layers.Lambda(lambda t: keras.ops.sum(t, axis=-1, keepdims=True), name="sum")(wide)
    logits = keras.layers.Dense(3, name="logits")(summed)
    model = keras.Model(inputs, logits)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def slow_eval_dataset(split):
    """The iris data whose eval split takes about 0.05 s per example to read: an evaluation of a
    checkpoint lasts ~1.5 s, so a test can catch the sidecar evaluator in the middle of one."""
    import time

    import tensorflow as tf

    dataset = iris.load_dataset(split)
    if split != "eval":
        return dataset

    def slow(features):
        time.sleep(0.05)
        return features

    return dataset.map(lambda x, y: (tf.ensure_shape(tf.numpy_function(slow, [x], tf.float32), [4]), y))


def _private_builder():
    """A private helper: never named from the Run form."""
    return iris.build_model()


class ModelClass:
    """A class in an allowed module: not a builder function, refused in deployment runs."""

    def __init__(self, **hparams):
        self.hparams = hparams


def failing_loader(split):
    """A loader that raises: the error names `data`."""
    raise RuntimeError(f"no partition for split {split}")


def iris_with_nan(split):
    """Iris whose train split ends with one row of NaN features (a bad data window): with `shuffle_buffer=1` and
    `batch_size=8` steps 1-15 are sane and step 16 (rows 120-127) poisons the first kernel with NaN (the loss
    may stay finite: oneDNN's ReLU turns the NaN activations into 0)."""
    return _iris_ending_with(split, float("nan"))


def iris_with_inf(split):
    """As `iris_with_nan`, the last train row's features infinite: the loss itself goes NaN at step 16."""
    return _iris_ending_with(split, float("inf"))


def _iris_ending_with(split, value):
    import tensorflow as tf

    dataset = iris.load_dataset(split)
    if split != "train":
        return dataset
    bad = tf.data.Dataset.from_tensor_slices((tf.fill([1, 4], value), tf.constant([0], tf.int32)))
    return dataset.concatenate(bad)
