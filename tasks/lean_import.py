"""Make this process's first `import tensorflow` skip what Keras imports only because it is installed.

At import, Keras 3 tries `sklearn` (for its scikit-learn wrappers),
`matplotlib.pyplot` (for its image-gallery plots) and `pandas` (for DataFrame
inputs to `fit`), and uses each only if the import succeeds. This project
installs all three (MLflow depends on them), and together they are about 40%
of `import tensorflow` on a 2-core machine (`python -m bench first_run`):
seconds that every CLI call, evaluator process and deployment run would pay
for Keras features it never uses (training reads `tf.data`, never a DataFrame).

`skip_keras_optional_imports()` arranges that, when TensorFlow is first
imported (lazily, by whatever needs it), the three are hidden for the length
of that import only, so Keras takes its "not installed" branch; afterwards
they import normally for anyone who wants them (MLflow does). It is called
only in processes this package owns (the CLI, the sidecar evaluator,
deployment runs), never by the library functions, which may run inside a
user's process that wants Keras's scikit-learn wrappers.

Example:
    >>> import sys
    >>> from prefect_tensorflow.tasks.lean_import import skip_keras_optional_imports
    >>> skip_keras_optional_imports()  # does nothing once TensorFlow is imported
    >>> import tensorflow as tf
    >>> sys.modules.get("sklearn", "importable") is not None
    True
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Iterator
from typing import Any

KERAS_OPTIONAL = ("sklearn", "matplotlib", "pandas")


def skip_keras_optional_imports() -> None:
    """Hide `KERAS_OPTIONAL` during this process's first `import tensorflow` (nothing if it happened)."""
    if "tensorflow" in sys.modules or any(isinstance(f, _TensorFlowFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TensorFlowFinder())


@contextlib.contextmanager
def _hidden(names: tuple[str, ...]) -> Iterator[None]:
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


class _TensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` once, with the usual finders, and wraps its loader in `_hidden`."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _HidingLoader(spec.loader)
        return spec


class _HidingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any):
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        with _hidden(KERAS_OPTIONAL):
            self._loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)
