"""Resolve `"module:attr"` import strings, the way model code enters the package,
and call the model builder one names (`build_model`).

A deployment parameter typed into the Prefect UI can only be text, so a model
builder or a dataset loader is named by an import string.

Example:
    >>> from prefect_tensorflow.tasks.importing import load_object
    >>> load_object("os.path:join", parameter="model")("a", "b")
    'a/b'
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Optional

from .errors import ImportStringError, TrainingError

_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def load_object(spec: str, *, parameter: str = "import string", callable_: bool = True) -> Any:
    """Import the object an import string names.

    Args:
        spec: `"package.module:attribute"`; the attribute may be dotted.
        parameter: the parameter's name, used in error messages.
        callable_: require the object to be callable.

    Returns:
        The object.

    Raises:
        ImportStringError: the string is malformed, the module does not import,
            the attribute does not exist or is not callable.
    """
    if not isinstance(spec, str) or not _SPEC.match(spec.strip()):
        raise ImportStringError(
            spec, "expected 'package.module:attribute', e.g. "
            "'prefect_tensorflow.tasks.iris:build_model'", parameter=parameter,
        )
    module_name, _, attr_path = spec.strip().partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportStringError(
            spec, f"module {module_name!r} cannot be imported ({err})", parameter=parameter
        ) from err
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as err:
            raise ImportStringError(
                spec, f"module {module_name!r} has no attribute {attr_path!r}", parameter=parameter
            ) from err
    if callable_ and not callable(obj):
        raise ImportStringError(
            spec, f"expected a callable, got {type(obj).__name__}", parameter=parameter
        )
    return obj


def build_model(model: str, hparams: Optional[dict[str, Any]] = None):
    """Call the model builder named by `model` and check it returned a `keras.Model`."""
    import keras

    builder = load_object(model, parameter="model")
    try:
        net = builder(**dict(hparams or {}))
    except TypeError as err:
        raise TrainingError(f"model {model!r}: calling it with hparams {hparams or {}} failed: {err}") from err
    if not isinstance(net, keras.Model):
        raise TrainingError(f"model {model!r}: expected a keras.Model, received {type(net).__name__}")
    return net
