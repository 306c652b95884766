"""An MLflow pyfunc model that serves a SavedModel directory exactly as it was exported.

This file is handed to `mlflow.pyfunc.log_model(python_model=<this file>, ...)`
("models from code"): MLflow copies it into the logged model and runs it when
the model is loaded, so loading needs only `mlflow`, `tensorflow`, `numpy` and
`pandas`, not this project. The SavedModel itself is a pyfunc artifact
(`saved_model`): the bytes that were verified against the checkpoint are the
bytes MLflow serves, never a re-saved copy.

It imports nothing from `prefect_tensorflow` and nothing in the package
imports it; the `set_model` call at the end is how MLflow finds the model.

Example:
    >>> import mlflow
    >>> model = mlflow.pyfunc.load_model("models:/iris@champion")  # doctest: +SKIP
    >>> model.predict({"features": [[5.1, 3.5, 1.4, 0.2]]})["class_ids"]  # doctest: +SKIP
    array([0])
"""

from __future__ import annotations

import mlflow
import numpy as np

SIGNATURE_KEY = "serving_default"


class SavedModelPyfunc(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined]
    """Calls the `serving_default` signature of the `saved_model` artifact.

    `predict` takes a dict of input name -> array (or a single array for a
    one-input signature) and returns a dict of output name -> numpy array.
    """

    # No type-hint validation (MLflow would warn that predict() has none): the
    # tensor signature logged with the model describes and checks the inputs.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import tensorflow as tf

        self._loaded = tf.saved_model.load(context.artifacts["saved_model"])
        self._function = self._loaded.signatures[SIGNATURE_KEY]
        _, specs = self._function.structured_input_signature
        self._specs = dict(specs)

    def predict(self, context, model_input, params=None):
        import tensorflow as tf

        feeds = self._feeds(model_input)
        outputs = self._function(**{name: tf.constant(value) for name, value in feeds.items()})
        return {name: tensor.numpy() for name, tensor in outputs.items()}

    def _feeds(self, model_input) -> dict[str, np.ndarray]:
        names = sorted(self._specs)
        if not isinstance(model_input, dict):
            if len(names) != 1:
                raise ValueError(f"expected a dict with the inputs {names}, received {type(model_input).__name__}")
            model_input = {names[0]: model_input}
        missing = sorted(set(names) - set(model_input))
        unknown = sorted(set(model_input) - set(names))
        if missing or unknown:
            raise ValueError(f"expected the inputs {names}; missing {missing}, unknown {unknown}")
        return {name: np.asarray(model_input[name], dtype=self._specs[name].dtype.as_numpy_dtype) for name in names}


mlflow.models.set_model(SavedModelPyfunc())
