"""What a deployment run's parameters may reach: the configured roots and saved MLflow blocks.

Who can press Run in the Prefect UI can type any parameter value, and the
run acts with the worker's rights. So in a flow run started from a deployment
(`run_context.in_deployment_run`):

- every path parameter is resolved (`..` and symlinks included) and must fall
  under one of `PREFECT_TENSORFLOW_ROOTS` (default: the data home); an object
  store URI must start with one of the roots that are URIs;
- the MLflow connection must be a saved block (or none: the worker's own
  environment), never one typed inline, and a `file:`/`sqlite:` store must
  be under the roots too;
- model code is chosen by name (see `model_code`).

Library and CLI callers run their own code: their paths are only parsed.

Example:
    >>> from prefect_tensorflow.tasks.security import confine
    >>> confine("/etc/passwd", parameter="model_dir", untrusted=True, roots=["/srv/models"])
    Traceback (most recent call last):
    ...
    prefect_tensorflow.tasks.errors.UnsafeParameterError: model_dir: resolves to /etc/passwd, outside the allowed roots (/srv/models; PREFECT_TENSORFLOW_ROOTS), received '/etc/passwd'
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

from .errors import StorageError, UnsafeParameterError
from .run_context import in_deployment_run
from .settings import get_settings
from .storage.locations import Location, parse_location

URI_SPECIAL = "%?#"


def _resolved_roots(roots: Sequence[str]) -> list[Location]:
    resolved = []
    for root in roots:
        location = parse_location(root, parameter="PREFECT_TENSORFLOW_ROOTS")
        resolved.append(Location(os.path.realpath(location.uri), "file") if location.is_local else location)
    return resolved


def _under(location: Location, root: Location) -> bool:
    if location.scheme != root.scheme:
        return False
    if location.is_local:
        return os.path.commonpath([location.uri, root.uri]) == root.uri
    return location.uri == root.uri or location.uri.startswith(root.uri.rstrip("/") + "/")


def confine(value: Any, *, parameter: str, untrusted: Optional[bool] = None, roots: Optional[Sequence[str]] = None) -> str:
    """Parse a path parameter and, for an untrusted caller, check it resolves under the roots.

    Args:
        value: a local path or an `s3://` / `gs://` URI.
        parameter: the parameter's name, for the error.
        untrusted: default: whether this runs in a deployment's flow run.
        roots: default: `PREFECT_TENSORFLOW_ROOTS`, else the data home.

    Returns:
        The absolute path (symlinks resolved when untrusted) or the normalised URI.

    Raises:
        StorageError: malformed, or an unsupported scheme.
        UnsafeParameterError: outside the roots (the message names the resolved path and the roots), or
            (untrusted) holding a character a URI parser reads differently (`%`, `?`, `#`, control).
    """
    location = parse_location(value, parameter=parameter)
    if not (untrusted if untrusted is not None else in_deployment_run()):
        return location.uri
    reparsed = sorted({c for c in location.uri if c in URI_SPECIAL or ord(c) < 0x20 or ord(c) == 0x7F})
    if reparsed:
        raise UnsafeParameterError(
            parameter,
            value,
            f"holds {', '.join(repr(c) for c in reparsed)}, which MLflow and other URI parsers read "
            "differently from the file system (percent-decoding, query, fragment); deployment runs "
            "accept paths without them",
        )
    allowed = list(roots) if roots is not None else get_settings().allowed_roots()
    if location.is_local:
        location = Location(os.path.realpath(location.uri), "file")
    if not any(_under(location, root) for root in _resolved_roots(allowed)):
        raise UnsafeParameterError(
            parameter,
            value,
            f"resolves to {location.uri}, outside the allowed roots ({', '.join(allowed)}; PREFECT_TENSORFLOW_ROOTS)",
        )
    return location.uri


def check_mlflow_connection(connection: Any, *, parameter: str = "mlflow", untrusted: Optional[bool] = None) -> None:
    """Refuse, in a deployment run, an MLflow connection typed inline or a local store outside the roots.

    A saved block (chosen in the Run form by name) was configured by whoever
    may save blocks; a connection typed into the form could point the
    worker at any server or file. `None` means the worker's own environment.

    Raises:
        UnsafeParameterError: naming `parameter`.
    """
    if connection is None or not (untrusted if untrusted is not None else in_deployment_run()):
        return
    if getattr(connection, "_block_document_id", None) is None:
        raise UnsafeParameterError(
            parameter,
            "an inline connection",
            "deployment runs accept a saved MLflow Connection block (or none, "
            "for the worker's MLFLOW_TRACKING_URI), not one typed into the form",
        )
    for field in ("tracking_uri", "registry_uri"):
        uri = getattr(connection, field, None)
        if uri:
            check_store_uri(uri, parameter=f"{parameter}.{field}")


def check_store_uri(uri: str, *, parameter: str) -> None:
    """Refuse an MLflow store URI that names a local path outside the roots, read as MLflow reads it.

    The URI is parsed as MLflow and SQLAlchemy do (`registry.store_uri.local_store_path`:
    scheme in any case, relative SQLite paths against the working directory,
    percent-decoding), and the database's directory, where MLflow also puts the
    artifacts, is confined. SQLite options after `?` (`uri=true` makes the
    database a `file:` URI of its own) are refused: their meaning is SQLite's.

    Raises:
        UnsafeParameterError: naming `parameter`.

    Example:
        >>> check_store_uri("sqlite:///relative/mlflow.db", parameter="mlflow.tracking_uri")
        Traceback (most recent call last):
        ...
        prefect_tensorflow.tasks.errors.UnsafeParameterError: mlflow.tracking_uri: resolves to .../relative/mlflow.db, outside the allowed roots (...), received '...
    """
    from urllib.parse import urlsplit

    from .registry.store_uri import local_store_path

    try:
        path = local_store_path(uri)
    except Exception as err:  # SQLAlchemy's parser: whatever it cannot read, MLflow cannot either
        raise UnsafeParameterError(parameter, uri, f"is not a store URI MLflow can read ({err})") from err
    if path is None:
        return
    if urlsplit(uri).query:
        raise UnsafeParameterError(parameter, uri, "a local store URI with options ('?...') is not accepted in deployment runs")
    try:
        confine(path, parameter=parameter, untrusted=True)
    except StorageError as err:
        raise UnsafeParameterError(parameter, uri, str(err)) from err


MODEL_DIR_ENTRIES = ("checkpoint", "checkpoint_metrics.jsonl", "graph.pbtxt", "eval", ".evaluator.lock")
# what a windowed training keeps beside them (tasks/data/lineage.py; data/schema.py's data-schema.json)
MODEL_DIR_DATA_ENTRIES = ("windows", "data-lineage.json", "data-schema.json", "data-stats")
MODEL_DIR_SUFFIXES = (".index", ".meta", "_temp")


def check_is_model_dir(path: str, *, parameter: str = "model_dir") -> None:
    """Refuse to move aside a directory that holds anything but checkpoints and their companions.

    `from_scratch` renames the model dir; a typo'd or hostile `model_dir`
    must not rename an unrelated directory.

    Raises:
        UnsafeParameterError: the directory holds other entries (the first few are named).
    """
    strangers = []
    for name in sorted(os.listdir(path)):
        if name in MODEL_DIR_ENTRIES or name in MODEL_DIR_DATA_ENTRIES or name.endswith(MODEL_DIR_SUFFIXES) or ".data-" in name:
            continue
        if name.startswith(("events.out.tfevents.", ".ptf-", ".prefect-tensorflow")) or ".ptf-tmp-" in name:
            continue
        strangers.append(name)
    if strangers:
        raise UnsafeParameterError(
            parameter,
            path,
            f"is not a model dir (it holds {', '.join(strangers[:5])}"
            f"{' and more' if len(strangers) > 5 else ''}); only a directory of checkpoints is moved aside",
        )


def check_can_move_aside(
    path: str,
    destination: str,
    *,
    parameter: str = "model_dir",
    untrusted: Optional[bool] = None,
    roots: Optional[Sequence[str]] = None,
) -> None:
    """Refuse, in a deployment run, to rename `path` when it is a configured root or `destination` is outside the roots.

    A run never creates, moves or deletes anything outside the roots: moving a
    root aside would put its sibling (outside) in its place, and take the root
    itself away from what the deployment's configuration names.

    Raises:
        UnsafeParameterError: naming `parameter`.

    Example:
        >>> check_can_move_aside("/srv/models/iris", "/srv/models/iris.previous-1", untrusted=True, roots=["/srv/models"])
        >>> check_can_move_aside("/srv/models", "/srv/models.previous-1", untrusted=True, roots=["/srv/models"])
        Traceback (most recent call last):
        ...
        prefect_tensorflow.tasks.errors.UnsafeParameterError: model_dir: is one of the allowed roots (/srv/models; PREFECT_TENSORFLOW_ROOTS); from_scratch would move it out of them: give a model dir below a root, received '/srv/models'
    """
    if not (untrusted if untrusted is not None else in_deployment_run()):
        return
    allowed = list(roots) if roots is not None else get_settings().allowed_roots()
    real = os.path.realpath(path)
    if any(root.is_local and root.uri == real for root in _resolved_roots(allowed)):
        raise UnsafeParameterError(
            parameter,
            path,
            f"is one of the allowed roots ({', '.join(allowed)}; PREFECT_TENSORFLOW_ROOTS); from_scratch would move "
            "it out of them: give a model dir below a root",
        )
    try:
        confine(destination, parameter=parameter, untrusted=True, roots=allowed)
    except UnsafeParameterError as err:
        raise UnsafeParameterError(
            parameter, path, f"from_scratch would move it to {destination}, outside the allowed roots"
        ) from err
