"""Checks of flow parameters, run before anything is written.

Names, counts and choices are typed (pydantic validates them when the run
starts); what needs the caller's trust is checked here: paths against the
configured roots, model code against the allowlist, the MLflow connection
against "saved blocks only" (see `prefect_tensorflow.tasks.security`). Each
failure names the parameter. `ParsedBy` marks a text parameter the flow
parses, so the command line parses it too before the flow runs.

Example:
    >>> from prefect_tensorflow.flows.parameters import checked_paths
    >>> checked_paths(model_dir="/tmp/m")["model_dir"]
    '/tmp/m'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from prefect_tensorflow.tasks import model_code
from prefect_tensorflow.tasks.security import confine
from prefect_tensorflow.tasks.storage.confined_dirs import open_directory
from prefect_tensorflow.tasks.storage.locations import parse_location


@dataclass(frozen=True)
class ParsedBy:
    """Annotation metadata of a text parameter the flow parses (`Annotated[str, ParsedBy(parse)]`).

    Prefect and pydantic ignore it (the Run form shows a text field; the flow parses the value
    itself); the command line calls `parse(value)` before the flow runs, so a bad value is one line.
    """

    parse: Callable[[str], Any]


def checked_paths(**paths: str) -> dict[str, str]:
    """Each path parameter parsed and, in a deployment run, confined to the roots.

    Raises:
        StorageError, UnsafeParameterError: naming the parameter.
    """
    return {name: confine(value, parameter=name) for name, value in paths.items()}


def checked_code(*, model: Optional[str], data: Optional[str]) -> None:
    """Refuse model code a deployment run may not load, then import what is left (to fail early).

    Raises:
        ImportStringError: naming `model` or `data`.
    """
    for kind, ref in (("model", model), ("data", data)):
        if ref is not None:
            model_code.load(ref, kind)  # type: ignore[arg-type]


def frozen_graph_path(frozen_dir: str, checkpoint: str) -> str:
    """`<frozen_dir>/<checkpoint name>.pb` (the directory created if it is local).

    A local directory is created through `confined_dirs.open_directory`: in a deployment run each
    missing component is made inside its parent, reached from the root without following a
    symlink, so a `frozen_dir` whose path was swapped for a symlink creates nothing outside the roots.

    Raises:
        StorageError, UnsafeParameterError: naming `frozen_dir`.
    """
    location = parse_location(frozen_dir, parameter="frozen_dir")
    if location.is_local:
        open_directory(location.uri, parameter="frozen_dir", create=True).close()
    return location.join(checkpoint.rstrip("/").rsplit("/", 1)[-1] + ".pb").uri
