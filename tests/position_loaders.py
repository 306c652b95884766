"""Loaders for tests/test_input_position.py, used through import strings (`position_loaders:...`).

Loaded as the top-level module `position_loaders` (pytest puts tests/ on sys.path).
"""

from prefect_tensorflow.tasks import iris


def iris_unknown_length(split: str = "train"):
    """The bundled iris split through a keep-everything `filter`: the same examples in the same order,
    but `cardinality()` is unknown, so training takes the iterator mode (shuffle buffer, `input_iterator`)."""
    return iris.load_dataset(split).filter(lambda features, label: True)
