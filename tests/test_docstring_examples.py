"""Every `>>>` example in the package's docstrings runs, against the installed package's real names."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import prefect_tensorflow.flows
import prefect_tensorflow.tasks

# Run by MLflow when a logged model loads (it calls mlflow.models.set_model at import); not a library module.
NOT_IMPORTED = {"prefect_tensorflow.tasks.registry.saved_model_pyfunc"}


def _modules() -> list[str]:
    names = []
    for package in (prefect_tensorflow.tasks, prefect_tensorflow.flows):
        names.append(package.__name__)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return sorted(set(names) - NOT_IMPORTED)


@pytest.mark.parametrize("name", _modules())
def test_the_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write go under a scratch directory
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (see the output above)"


def test_every_public_module_has_an_example():
    """The house style: docstrings with a short example."""
    finder = doctest.DocTestFinder()
    without = [name for name in _modules() if not any(t.examples for t in finder.find(importlib.import_module(name)))]
    assert without == [], f"modules without a >>> example: {without}"
