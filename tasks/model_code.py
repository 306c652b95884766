"""Model code by name: the registered model builders and dataset loaders, and import strings.

A model builder (`build(**hparams) -> compiled keras.Model`) or a dataset
loader (`load(split) -> tf.data.Dataset` of `(features, label)`) is named
either

- by a registered name: a Python entry point in the group
  `prefect_tensorflow.models` (builders) or `prefect_tensorflow.datasets`
  (loaders); this package registers `iris` in both; or
- by an import string `"package.module:attr"`.

Library and CLI callers run their own code: any import string is accepted
(except standard-library callables, which are never a model builder or a
loader: `shutil:rmtree` as a loader would delete a directory named `train`).
In a flow run started from a deployment, parameters were typed into the
Prefect UI and are untrusted. There a builder or loader is

- a registered name (the entry point is trusted as it stands), or
- `module:function` where `module` is under a prefix of
  `PREFECT_TENSORFLOW_ALLOWED_MODULES` and `function` is one plain name (no
  dots: nothing is reached *through* the module), public (no leading `_`),
  listed in the module's `__all__` when it has one, and a Python function
  *defined in that module* (`def` at its top level): not a class, a builtin,
  or a function imported into it from elsewhere (`from os import system`).

Everything else is refused before it is called, naming the parameter, and
modules outside the allowlist are not even imported to check them. What the
function returns is checked after the call: a builder must return a
`keras.Model`, a loader a `tf.data.Dataset`; an exception it raises is
reported naming the parameter (`model` or `data`).

Example:
    >>> from prefect_tensorflow.tasks.model_code import import_string, registered_names
    >>> "iris" in registered_names("model")
    True
    >>> import_string("iris", "data")
    'prefect_tensorflow.tasks.iris:load_dataset'
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable
from importlib import metadata
from typing import Any, Literal, Optional

from .errors import DataError, ImportStringError, TrainingError, UnsafeParameterError
from .run_context import in_deployment_run
from .settings import get_settings

Kind = Literal["model", "data"]
ENTRY_POINT_GROUPS: dict[str, str] = {"model": "prefect_tensorflow.models", "data": "prefect_tensorflow.datasets"}
WHAT = {"model": "model builder", "data": "dataset loader"}
IMPORT_STRING = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
CODE_REF_PATTERN = rf"(?:{NAME.pattern})|(?:{IMPORT_STRING.pattern})"
MAX_LENGTH = 256


def registered_names(kind: Kind) -> dict[str, str]:
    """Registered name -> import string of every `kind` entry point (nothing is imported)."""
    found = metadata.entry_points(group=ENTRY_POINT_GROUPS[kind])
    return {ep.name: ep.value.replace(" ", "") for ep in sorted(found, key=lambda ep: ep.name)}


class RegisteredChoices:
    """Pydantic metadata: the JSON schema of a model-code field lists the registered names (`enum`),
    so the Prefect UI shows a choice, not a text box. Computed when a deployment is built. With
    `PREFECT_TENSORFLOW_ALLOWED_MODULES` set, import strings under those prefixes are allowed too,
    so the field stays free text (with the names as examples)."""

    def __init__(self, kind: Kind):
        self.kind = kind

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        schema = handler(core_schema)
        names = list(registered_names(self.kind))
        if get_settings().allowed_modules:
            schema["examples"] = names
        else:
            schema["enum"] = names
        return schema


def check_syntax(ref: Any, kind: Kind) -> str:
    """`ref` is a registered-name-shaped word or an import string; nothing is looked up.

    Raises:
        ImportStringError: naming the parameter (`model` or `data`).
    """
    if not isinstance(ref, str) or len(ref) > MAX_LENGTH or not re.fullmatch(CODE_REF_PATTERN, ref):
        raise ImportStringError(
            ref,
            f"expected a registered {WHAT[kind]} name (e.g. 'iris') or 'package.module:attribute', "
            f"e.g. 'prefect_tensorflow.tasks.iris:build_model'",
            parameter=kind,
        )
    return ref


def import_string(ref: str, kind: Kind, *, untrusted: Optional[bool] = None) -> str:
    """The import string `ref` stands for, checked against who is asking; nothing is imported.

    Args:
        ref: a registered name or an import string.
        kind: "model" (builders) or "data" (loaders); also the parameter named in errors.
        untrusted: True in deployment runs; default: detected from the Prefect run context.

    Raises:
        ImportStringError: malformed, an unknown name, a standard-library module,
            or (untrusted) a module outside `PREFECT_TENSORFLOW_ALLOWED_MODULES`.
    """
    check_syntax(ref, kind)
    names = registered_names(kind)
    if ref in names:
        return names[ref]
    if ":" not in ref:
        raise ImportStringError(
            ref,
            f"no {WHAT[kind]} is registered under this name; registered: {', '.join(names) or 'none'} "
            f"(entry point group {ENTRY_POINT_GROUPS[kind]!r})",
            parameter=kind,
        )
    module, _, attr = ref.partition(":")
    if module.split(".")[0] in sys.stdlib_module_names:
        raise ImportStringError(
            ref,
            f"{module!r} is a standard-library module; expected your own {WHAT[kind]}",
            parameter=kind,
        )
    if untrusted if untrusted is not None else in_deployment_run():
        allowed = get_settings().allowed_modules
        if not any(module == prefix or module.startswith(prefix.rstrip(".") + ".") for prefix in allowed):
            raise ImportStringError(
                ref,
                f"deployment runs accept the registered names ({', '.join(names)}) or modules under "
                f"PREFECT_TENSORFLOW_ALLOWED_MODULES ({', '.join(allowed) or 'none set'}); nothing was imported",
                parameter=kind,
            )
        if "." in attr or attr.startswith("_"):
            raise ImportStringError(
                ref,
                f"deployment runs accept 'module:function' with one public function name defined in the module "
                f"(no dots, no leading underscore), received attribute {attr!r}; nothing was imported",
                parameter=kind,
            )
    return ref


def load(ref: str, kind: Kind, *, untrusted: Optional[bool] = None) -> Callable[..., Any]:
    """Import the builder or loader `ref` names, once `import_string` has accepted it.

    Raises:
        ImportStringError: refused (see `import_string`), or it does not import, or it is not callable.
    """
    untrusted = untrusted if untrusted is not None else in_deployment_run()
    spec = import_string(ref, kind, untrusted=untrusted)
    module_name, _, attr_path = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportStringError(ref, f"module {module_name!r} cannot be imported ({err})", parameter=kind) from err
    if untrusted and spec != registered_names(kind).get(ref):
        return defined_function(obj, attr_path, ref, kind)
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as err:
            raise ImportStringError(ref, f"module {module_name!r} has no attribute {attr_path!r}", parameter=kind) from err
    if not callable(obj):
        raise ImportStringError(ref, f"expected a callable, got {type(obj).__name__}", parameter=kind)
    return obj


def defined_function(module: Any, name: str, ref: str, kind: Kind) -> Callable[..., Any]:
    """The public function `name` defined at the top level of `module` itself (the untrusted rule).

    Read from the module's own namespace (no `__getattr__`, no dotted path),
    and checked to be a plain Python function whose `__module__` and
    `__qualname__` say it was defined there under that name.

    Raises:
        ImportStringError: naming `kind`'s parameter, with what was found instead.

    Example:
        >>> import prefect_tensorflow.tasks.iris as iris
        >>> defined_function(iris, "build_model", "prefect_tensorflow.tasks.iris:build_model", "model").__name__
        'build_model'
        >>> defined_function(iris, "os", "prefect_tensorflow.tasks.iris:os", "model")
        Traceback (most recent call last):
        ...
        prefect_tensorflow.tasks.errors.ImportStringError: model 'prefect_tensorflow.tasks.iris:os': deployment runs accept a function defined in the module itself; 'os' is not one (no such function)
    """
    obj = vars(module).get(name)
    exported = getattr(module, "__all__", None)
    if not inspect.isfunction(obj):
        found = "no such function" if obj is None or inspect.ismodule(obj) else f"a {type(obj).__name__}"
    elif obj.__module__ != module.__name__ or obj.__qualname__ != name:
        found = f"it is {obj.__module__}.{obj.__qualname__}, imported into the module"
    elif exported is not None and name not in exported:
        found = "not listed in the module's __all__"
    else:
        return obj
    raise ImportStringError(
        ref,
        f"deployment runs accept a function defined in the module itself; {name!r} is not one ({found})",
        parameter=kind,
    )


def check_hparams(ref: str, hparams: Optional[dict[str, Any]]) -> None:
    """Check that the model builder `ref` names accepts `hparams` as keyword arguments, without calling it.

    Raises:
        ImportStringError: see `load`.
        TrainingError: naming `hparams`, with the builder's signature, when it does not accept them.

    Example:
        >>> check_hparams("iris", {"hidden_units": [16, 16]})
        >>> check_hparams("iris", {"__import__": "os"})
        Traceback (most recent call last):
        ...
        prefect_tensorflow.tasks.errors.TrainingError: hparams: model 'iris' (hidden_units=(10, 10), n_classes=3, learning_rate=0.05) does not accept {'__import__': 'os'}: got an unexpected keyword argument '__import__'
    """
    builder = load(ref, "model")
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):
        return  # no signature to check against (a builtin or C callable): the call decides
    try:
        signature.bind(**dict(hparams or {}))
    except TypeError as err:
        raise TrainingError(f"hparams: model {ref!r} ({_parameters(signature)}) does not accept {hparams}: {err}") from None


def _parameters(signature: inspect.Signature) -> str:
    """`a, b=1, **kwargs`: the builder's parameters without their annotations."""
    return ", ".join(str(p.replace(annotation=inspect.Parameter.empty)) for p in signature.parameters.values())


def build_model(ref: str, hparams: Optional[dict[str, Any]] = None) -> Any:
    """Call the model builder `ref` names with `hparams` and check it returned a `keras.Model`.

    Raises:
        ImportStringError: see `load`.
        TrainingError: the builder refused the hparams or returned something else.
    """
    import keras

    builder = load(ref, "model")
    try:
        net = builder(**dict(hparams or {}))
    except TypeError as err:
        raise TrainingError(f"model {ref!r}: calling it with hparams {hparams or {}} failed: {err}") from err
    except Exception as err:
        raise TrainingError(f"model {ref!r}: the model builder raised {type(err).__name__}: {err}") from err
    if not isinstance(net, keras.Model):
        raise TrainingError(f"model {ref!r}: expected a keras.Model, received {type(net).__name__}")
    return net


def loader_parameters(ref: str) -> Optional[set[str]]:
    """The keyword names the loader `ref` names accepts beside `split` (None: any, it takes `**kwargs`)."""
    loader = load(ref, "data")
    try:
        parameters = inspect.signature(loader).parameters.values()
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)} - {
        "split"
    }


def takes_window(ref: str) -> bool:
    """Whether the loader `ref` names reads a data window (`load(split, window=...)`)."""
    accepted = loader_parameters(ref)
    return accepted is None or "window" in accepted


def loader_keywords(ref: str, window: Any = None, options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The keyword arguments a call of loader `ref` gets: its `options`, and `window` if it reads one.

    Raises:
        TrainingError: naming `data_options`, when the loader does not accept one of them.
    """
    accepted = loader_parameters(ref)
    unknown = sorted(set(options or {}) - (accepted or set())) if accepted is not None else []
    if unknown or "window" in (options or {}):
        raise TrainingError(
            f"data_options: loader {ref!r} accepts {sorted((accepted or set()) - {'window'}) or 'no options'}, "
            f"received {sorted(options or {})}"
        )
    keywords = dict(options or {})
    if window is not None and (accepted is None or "window" in accepted):
        keywords["window"] = window
    return keywords


def load_split(ref: str, split: str, *, window: Any = None, options: Optional[dict[str, Any]] = None) -> Any:
    """Call the dataset loader `ref` names for `split` and check it gave a `tf.data.Dataset`.

    A loader that takes a `window` keyword gets `window`; `options` are its
    keyword arguments (`TrainingConfig.data_options`). A `load(split)` loader is
    called as it always was.

    Raises:
        ImportStringError: see `load`.
        TrainingError: naming `data`: the loader raised, or returned something else; naming
            `data_options`: options it does not accept.
    """
    import tensorflow as tf

    loader = load(ref, "data")
    keywords = loader_keywords(ref, window, options)
    try:
        dataset = loader(split, **keywords)
    except (DataError, UnsafeParameterError):
        raise  # they name the option, partition or file at fault already
    except Exception as err:
        raise TrainingError(f"data {ref!r}: the dataset loader raised {type(err).__name__} for split {split!r}: {err}") from err
    if not isinstance(dataset, tf.data.Dataset):
        raise TrainingError(
            f"data {ref!r}: expected {split!r} to give a tf.data.Dataset of (features, label), received {type(dataset).__name__}"
        )
    return dataset
