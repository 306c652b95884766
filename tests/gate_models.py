"""Model code for the champion gate tests: shifted iris data, and the iris model with a renamed input.

- `shifted_iris(split)`: iris with its feature columns reordered (petal
  measurements first): the "current data" after a shift. A model trained on
  iris as shipped scores badly on it; one trained on it scores well.
- `renamed_input_model()`: the bundled iris network whose input is named
  `measurements` instead of `features`: its checkpoints are iris
  checkpoints, its SavedModel's signature is not comparable with iris's.
"""

from __future__ import annotations

from prefect_tensorflow.tasks import iris

SHIFT = [2, 3, 0, 1]


def shifted_iris(split: str = "train"):
    """Iris as `iris.load_dataset` gives it, the feature columns in the order `SHIFT`."""
    import tensorflow as tf

    order = tf.constant(SHIFT)
    return iris.load_dataset(split).map(lambda x, y: (tf.gather(x, order), y))


def renamed_input_model():
    """The iris DNN, its input layer named `measurements` (same variables: iris checkpoints restore into it)."""
    import keras

    built = iris.build_model()
    inputs = keras.Input(shape=(len(iris.FEATURE_NAMES),), name="measurements")
    x = inputs
    for layer in built.layers[1:]:
        x = layer(x)
    model = keras.Model(inputs, x, name="iris_dnn")
    model.compile(optimizer=built.optimizer, loss=built.loss, metrics=["accuracy"])
    return model
