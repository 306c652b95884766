"""`register_model_version`: a verified SavedModel export as a version of an MLflow registered model.

The export directory is logged as an MLflow pyfunc model whose artifact is
that very directory (`saved_model_pyfunc.py`, "models from code"), with its
signature, an input example and requirements pinned to the running
environment. Before a version is created the logged model is downloaded back,
its SavedModel digest compared with the export's, and
`mlflow.pyfunc.load_model(...).predict` compared with the SavedModel on the
verification batch: a version is only ever created for artifacts that are
there and compute what the export computes; before anything is logged, the
export is loaded cold in a fresh process with no project code
(`promotion.serving_check`). The version is created in one
request with all its tags, so it never exists half-tagged.

Registering is idempotent: the export's fingerprint is a version tag, and an
export already registered returns its version. A lock on the export base
makes two processes registering one export end with one version.

Aliases, not stages: every new version gets `challenger`, and registering
never moves `champion`: the champion gate does, after registration
(`promotion/champion_gate.py`, which scores both versions on the same eval
data). Its decision is recorded on the version (`prefect_tensorflow.gate.*`;
`recorded_decision` reads it back).

Every call goes through the connection's own client (`MlflowConfig.client`):
the model is saved locally, uploaded as a logged model and registered
without MLflow's fluent API, so registrations to two servers can run side by
side in threads.

Example:
    >>> from prefect_tensorflow.tasks.registry.model_versions import pinned_requirements
    >>> sorted(pin.split("==")[0] for pin in pinned_requirements())
    ['mlflow', 'numpy', 'pandas', 'tensorflow']
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ..checkpoints.selection import CheckpointRef
from ..config_checks import one_line
from ..configs import RegisteredModelName, ServingLimits
from ..errors import MlflowSettingsError, RegistryError
from ..export.export_base import local_export, saved_model_digest
from ..export.frozen_graph import FreezeResult
from ..export.saved_model import ExportResult, export_lock
from ..export.verification import Parity, compare_outputs, run_saved_model
from ..export.verification_batch import verification_batch
from ..promotion.serving_check import load_check_tags, require_loads
from ..run_context import get_logger, prefect_run_tags
from .aliases import MoveKind, current_alias_version, move_alias, point_alias, registry_lock
from .gate import GateDecision
from .mlflow_connection import MlflowConfig
from .tracking import TAG_PREFIX

CHALLENGER = "challenger"
CHAMPION = "champion"
MODEL_NAME_IN_RUN = "model"
PYFUNC_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "saved_model_pyfunc.py")
FINGERPRINT_TAG = TAG_PREFIX + "fingerprint"
DECISION_JSON = TAG_PREFIX + "gate.json"  # the whole gate decision; `gate.*` beside it are its figures for people
_DISTRIBUTIONS = (("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tensorflow-intel"), ("mlflow",), ("numpy",), ("pandas",))


class RegisteredVersion(BaseModel):
    """A registered model version and where to find it."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: int
    model_uri: str = Field(description="models:/<name>/<version>")
    source: str
    run_id: Optional[str]
    run_url: Optional[str]
    version_url: str
    fingerprint: str
    aliases: list[str]
    reused: bool = Field(description="True when this export was already registered")
    pyfunc_parity: Optional[Parity] = Field(description="mlflow.pyfunc predictions vs the SavedModel")
    gate: Optional[GateDecision] = Field(
        default=None, description="The champion gate's decision (`gate_champion`); None until the gate ran"
    )


def pinned_requirements() -> list[str]:
    """`name==version` of TensorFlow, MLflow, NumPy and pandas as installed: nothing is re-resolved."""
    pins = []
    for candidates in _DISTRIBUTIONS:
        for name in candidates:
            try:
                pins.append(f"{name}=={metadata.version(name)}")
                break
            except metadata.PackageNotFoundError:
                continue
    return pins


def mlflow_signature(export: ExportResult):
    """The export's `serving_default` as an MLflow tensor-based `ModelSignature`."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def schema(tensors) -> Schema:
        return Schema(
            [
                TensorSpec(np.dtype(info.dtype), tuple(-1 if d is None else d for d in (info.shape or [])), name)
                for name, info in sorted(tensors.items())
            ]
        )

    return ModelSignature(inputs=schema(export.signature.inputs), outputs=schema(export.signature.outputs))


def _version_by_fingerprint(client, name: str, fingerprint: str):
    """The version of `name` tagged with `fingerprint`, or None (oldest first if several)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{_quote(name)}' and tags.`{FINGERPRINT_TAG}` = '{fingerprint}'")
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return min(found, key=lambda mv: int(mv.version)) if found else None


def check_registered_model_name(name: Any) -> str:
    """A registered model name (see `configs.RegisteredModelName`: no '/', which breaks `models:/` URIs).

    Raises:
        MlflowSettingsError: naming `registered_model_name`.
    """
    try:
        return TypeAdapter(RegisteredModelName).validate_python(name)
    except ValidationError as err:
        raise MlflowSettingsError(f"registered_model_name: {one_line(err).split(': ', 1)[-1]}") from err


def recorded_decision(mv) -> Optional[GateDecision]:
    """The champion gate's decision recorded on a version (`gate.json`), or None: never gated (or by an older release).

    Example:
        >>> from types import SimpleNamespace
        >>> recorded_decision(SimpleNamespace(tags={}, version="1")) is None
        True
    """
    text = mv.tags.get(DECISION_JSON)
    if not text:
        return None
    try:
        return GateDecision.model_validate_json(text)
    except ValidationError:
        return None


def check_export_unchanged(export: ExportResult, local_path: str) -> None:
    """The export's files (at `local_path`: itself, or a download of a remote one) are still the ones verified.

    Raises:
        RegistryError: the version directory is gone or its files changed.
    """
    if (
        not os.path.isdir(local_path)
        or not os.path.exists(os.path.join(local_path, "saved_model.pb"))
        or (saved_model_digest(local_path) != export.digest)
    ):
        raise RegistryError(
            f"export {export.path}: missing, or its files differ from what was exported and verified "
            f"(expected digest {export.digest}); export the checkpoint again. Nothing was registered"
        )


def log_export_model(
    connection: MlflowConfig,
    client: Any,
    export: ExportResult,
    local_path: str,
    run_id: str,
    data: Optional[Any],
    tolerance: float,
) -> tuple[Any, Parity]:
    """Log the export (its verified files at `local_path`) as a pyfunc model in `run_id`, download it back and check it.

    Returns:
        The logged model (`mlflow.entities.LoggedModel`) and the parity of its predictions with the SavedModel.

    Raises:
        RegistryError: the downloaded SavedModel differs from the export, or predicts differently.
    """
    import mlflow
    import tensorflow as tf

    from . import mlflow_client

    loaded = tf.saved_model.load(local_path)
    specs = loaded.signatures["serving_default"].structured_input_signature[1]
    names = sorted(specs)
    batch = verification_batch([specs[n] for n in names], data)
    expected = run_saved_model(local_path, batch, input_names=names, loaded=loaded)
    example = {name: value[:5] for name, value in zip(names, batch)}

    info, logged = mlflow_client.log_pyfunc_model(
        client,
        run_id,
        name=MODEL_NAME_IN_RUN,
        tags={FINGERPRINT_TAG: export.fingerprint},
        python_model=PYFUNC_CODE,
        # a file URI, percent-encoded: MLflow parses the value as a URI and decodes it, so a bare
        # path holding '%2e%2e', '?' or '#' would name another directory there
        artifacts={"saved_model": pathlib.Path(local_path).absolute().as_uri()},
        signature=mlflow_signature(export),
        input_example=example,
        pip_requirements=pinned_requirements(),
    )
    with tempfile.TemporaryDirectory(prefix="prefect-tensorflow-check-") as tmp:
        local = mlflow_client.download_logged_model(client, logged.model_id, os.path.join(tmp, "model"))
        copied = os.path.join(local, "artifacts", os.path.basename(os.path.normpath(local_path)))
        if not os.path.isdir(copied) or saved_model_digest(copied) != export.digest:
            raise RegistryError(
                f"logged model {info.model_uri}: its SavedModel artifact is missing or differs from "
                f"{export.path} (expected digest {export.digest}); no version was registered"
            )
        predicted = mlflow.pyfunc.load_model(local).predict(dict(zip(names, batch)))
    parity = compare_outputs(expected, predicted, tolerance, sides=("SavedModel", "mlflow.pyfunc"))
    if not parity.ok:
        raise RegistryError(
            f"logged model {info.model_uri}: mlflow.pyfunc predictions of {export.path} fail verification: "
            f"{parity.explain()}; no version was registered"
        )
    return logged, parity


def register_model_version(
    export: ExportResult,
    registered_model_name: str,
    connection: Optional[MlflowConfig] = None,
    *,
    checkpoint: Optional[CheckpointRef] = None,
    frozen: Optional[FreezeResult] = None,
    run_id: Optional[str] = None,
    data: Optional[Any] = None,
    tolerance: float = 1e-5,
    serving: Optional[ServingLimits] = None,
    tags: Optional[dict[str, str]] = None,
) -> RegisteredVersion:
    """Log a verified export as an MLflow model and register it (idempotent), as `challenger`.

    `champion` never moves here: the champion gate (`gate_champion`) decides that after registration.

    Args:
        export: the `export_saved_model` result.
        registered_model_name: the registered model to add a version to (created if missing).
        connection: the MLflow connection; default `MlflowConfig()` (env, else local SQLite).
        checkpoint: the checkpoint the export came from: its step and metrics are tagged.
        frozen: the `freeze_graph` result, tagged on the version (path, digest, parity).
        run_id: the MLflow run to log the model in (e.g. the training run); default a new run.
        data: dataset loader (a name or a `DataSource`, with its options and window) for the
            verification batch (default: seeded random values).
        tolerance: largest difference accepted between pyfunc and SavedModel predictions.
        serving: limits of the cold load checked before anything is logged (`GateConfig.serving`,
            which the gate checks again behind `mlflow models serve`); None: it must load, no limits.
        tags: more version tags, set in the same request (the training data's `data.*`).

    Returns:
        The version, its URIs and aliases, the pyfunc parity, and the gate decision already
        recorded on it (an export registered and gated before), else None.

    Raises:
        MlflowSettingsError: a bad registered model name.
        RegistryError: the export changed since it was verified, does not load cold in a fresh process
            (`promotion.serving_check.check_loads`), the logged model failed its check, or the server
            refused (e.g. not allowed to register): nothing is registered.
        MlflowUnavailableError: the server still failed after the retries.

    Example:
        >>> from prefect import flow
        >>> from prefect_tensorflow.tasks import register_model_version
        >>> @flow
        ... def ship(export, checkpoint) -> str:
        ...     return register_model_version(export, "iris", checkpoint=checkpoint).model_uri
    """
    name = check_registered_model_name(registered_model_name)
    connection = connection or MlflowConfig()
    experiment_id = connection.experiment_id()
    job = _Registration(
        connection, export, name, experiment_id, checkpoint, frozen, run_id, data, tolerance, serving, dict(tags or {})
    )
    with export_lock(export.export_base):
        return connection.retrying(f"registering {export.path} as {name!r}", _register_locked, job)


@dataclass(frozen=True)
class _Registration:
    """One `register_model_version` call, its arguments checked."""

    connection: MlflowConfig
    export: ExportResult
    name: str
    experiment_id: str
    checkpoint: Optional[CheckpointRef]
    frozen: Optional[FreezeResult]
    run_id: Optional[str]
    data: Optional[Any]
    tolerance: float
    serving: Optional[ServingLimits]
    tags: dict[str, str]


def _register_locked(job: _Registration) -> RegisteredVersion:
    log = get_logger()
    connection, export, name = job.connection, job.export, job.name
    client = connection.client()
    existing = _version_by_fingerprint(client, name, export.fingerprint)
    if existing is not None:
        decision = recorded_decision(existing)
        if decision is None:  # created, then interrupted (or its answer lost) before the gate
            set_alias(client, name, CHALLENGER, int(existing.version), reason="registered: the newest version")
        log.info("%s is already registered as %s version %s", export.path, name, existing.version)
        return _result(connection, client, existing, job.experiment_id, reused=True, parity=None, gate=decision)

    with local_export(export.path) as local_path:
        return _log_and_register(job, client, local_path)


def _log_and_register(job: _Registration, client: Any, local_path: str) -> RegisteredVersion:
    from mlflow.exceptions import MlflowException

    connection, export, name, run_id = job.connection, job.export, job.name, job.run_id
    log = get_logger()
    check_export_unchanged(export, local_path)
    loads = require_loads(local_path, f"export {export.path}", job.serving)  # a cold load, no project code
    _ensure_registrable(client, name)
    if run_id is None:
        tags = {**prefect_run_tags(), TAG_PREFIX + "stage": "export"}
        run_id = client.create_run(job.experiment_id, run_name=f"export-{name}-{export.version}", tags=tags).info.run_id
    logged, parity = log_export_model(connection, client, export, local_path, run_id, job.data, job.tolerance)
    for key, tag_value in prefect_run_tags().items():
        client.set_tag(run_id, key, tag_value)
    tags = {**job.tags, **version_tags(export, job.checkpoint, job.frozen, parity), **load_check_tags(loads)}
    from . import mlflow_client  # imported here: MLflow costs ~1.2 s, and a refused run never gets this far

    # Sent once (mlflow_client.NO_RESEND): if the version was created but the answer lost, a resend
    # would create a second one. The operation retry (connection.retrying) looks the fingerprint up first.
    try:
        mv = mlflow_client.register_logged_model(client, name, logged, run_id, tags=tags, description=version_description(tags))
    except MlflowException as err:
        raise _refused(err, name) from err
    log.info("registered %s version %s from %s", name, mv.version, export.path)
    set_alias(client, name, CHALLENGER, int(mv.version), reason="registered: the newest version")
    return _result(connection, client, mv, job.experiment_id, reused=False, parity=parity, gate=None)


def check_can_register(registered_model_name: str, connection: Optional[MlflowConfig] = None) -> None:
    """Check this connection may add versions to the registered model (when it exists; nothing is created).

    Flows call it before training or exporting, so that a user without EDIT
    permission on the model learns it at once, and nothing is logged or
    registered for it.

    Args:
        registered_model_name: the registered model.
        connection: the MLflow connection; default `MlflowConfig()`.

    Raises:
        MlflowSettingsError: a bad name.
        RegistryError: not allowed to register to this model (the server refused).
        MlflowUnavailableError: the server still failed after the retries.

    Example:
        >>> from prefect import flow
        >>> from prefect_tensorflow.tasks import check_can_register
        >>> @flow
        ... def guarded() -> None:
        ...     check_can_register("iris")
    """
    name = check_registered_model_name(registered_model_name)
    connection = connection or MlflowConfig()

    def probe() -> None:
        from mlflow.exceptions import MlflowException

        client = connection.client()
        try:
            client.get_registered_model(name)
        except MlflowException as err:
            if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return  # any user may create a new registered model
            raise _refused(err, name) from err
        _ensure_registrable(client, name)

    connection.retrying(f"checking that {name!r} can be registered", probe)


def _ensure_registrable(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Registered by prefect-tensorflow")
    except MlflowException as err:
        if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise _refused(err, name) from err
    try:  # a write that needs EDIT on the model: refused now, before a run or a logged model exists
        client.set_registered_model_tag(name, TAG_PREFIX + "registered_by", "prefect-tensorflow")
    except MlflowException as err:
        raise _refused(err, name) from err


def _refused(err: Exception, name: str) -> Exception:
    """A permission refusal as a `RegistryError` naming the model; anything else as it is."""
    if getattr(err, "error_code", "") in ("PERMISSION_DENIED", "UNAUTHENTICATED") or "Permission denied" in str(err):
        return RegistryError(
            f"not allowed to register {name!r}: the MLflow server refused it ({getattr(err, 'error_code', '')}); "
            "the connection's user needs EDIT permission on this registered model. Nothing was registered"
        )
    return err


def set_alias(client: Any, name: str, alias: str, version: int, *, reason: str = "", kind: MoveKind = "gate") -> None:
    """Point `alias` of `name` at `version` (no compare-and-set) and record the move in the alias history.

    Safe when several clients move the same alias at once (the first-time PostgreSQL
    unique-violation race is retried: `aliases.point_alias`). `champion` moves under
    `aliases.registry_lock` with `aliases.move_alias`.
    """
    point_alias(client, name, alias, version, reason=reason or f"set to version {version}", kind=kind)


def version_tags(
    export: ExportResult,
    checkpoint: Optional[CheckpointRef],
    frozen: Optional[FreezeResult],
    parity: Parity,
) -> dict[str, str]:
    """Lineage of a version: checkpoint, export, parity figures and the Prefect run."""
    tags = {
        FINGERPRINT_TAG: export.fingerprint,
        TAG_PREFIX + "export.dir": export.path,
        TAG_PREFIX + "export.version": str(export.version),
        TAG_PREFIX + "export.sha256": export.digest,
        TAG_PREFIX + "checkpoint.path": export.source,
        TAG_PREFIX + "parity.checkpoint_vs_saved_model": repr(export.parity.max_abs_diff),
        TAG_PREFIX + "parity.saved_model_vs_pyfunc": repr(parity.max_abs_diff),
        **prefect_run_tags(),
    }
    if checkpoint is not None:
        tags[TAG_PREFIX + "checkpoint.step"] = str(checkpoint.step)
        for key, metric in checkpoint.metrics.items():
            tags[f"{TAG_PREFIX}metric.{key}"] = repr(metric)
    if frozen is not None:
        tags[TAG_PREFIX + "frozen_graph.path"] = frozen.path
        tags[TAG_PREFIX + "frozen_graph.sha256"] = frozen.digest
        tags[TAG_PREFIX + "parity.checkpoint_vs_frozen_graph"] = repr(frozen.parity.max_abs_diff)
    return tags


def version_description(tags: dict[str, str]) -> str:
    """The version page's Markdown description: where the export came from, with a link to the Prefect run.

    MLflow shows the description at the top of the version page; the tags sit in a scroll area below.

    Example:
        >>> version_description({TAG_PREFIX + "checkpoint.path": "/m/model.ckpt-200",
        ...     TAG_PREFIX + "export.version": "1", TAG_PREFIX + "export.sha256": "sha256:ab",
        ...     "prefect.flow_run_name": "export-iris-200", "prefect.flow_run_url": "http://p/runs/1"})
        'From checkpoint `/m/model.ckpt-200`, SavedModel version 1 (`sha256:ab`); exported by Prefect flow run [export-iris-200](http://p/runs/1).'
    """
    text = (
        f"From checkpoint `{tags.get(TAG_PREFIX + 'checkpoint.path', '?')}`, SavedModel version "
        f"{tags.get(TAG_PREFIX + 'export.version', '?')} (`{tags.get(TAG_PREFIX + 'export.sha256', '?')}`)"
    )
    url, run_name = tags.get("prefect.flow_run_url"), tags.get("prefect.flow_run_name")
    if url and run_name:
        text += f"; exported by Prefect flow run [{run_name}]({url})"
    return text + "."


def _result(
    connection: MlflowConfig,
    client: Any,
    mv: Any,
    experiment_id: str,
    *,
    reused: bool,
    parity: Optional[Parity],
    gate: Optional[GateDecision],
) -> RegisteredVersion:
    fresh = client.get_model_version(mv.name, str(mv.version))
    return RegisteredVersion(
        name=mv.name,
        version=int(mv.version),
        model_uri=f"models:/{mv.name}/{mv.version}",
        source=fresh.source,
        run_id=fresh.run_id,
        run_url=connection.run_url(experiment_id, fresh.run_id) if fresh.run_id else None,
        version_url=connection.model_version_url(mv.name, mv.version),
        fingerprint=fresh.tags.get(FINGERPRINT_TAG, ""),
        aliases=sorted(fresh.aliases),
        reused=reused,
        pyfunc_parity=parity,
        gate=gate,
    )


def find_registered_version(
    export: ExportResult, registered_model_name: str, connection: Optional[MlflowConfig] = None
) -> Optional[RegisteredVersion]:
    """The version of `registered_model_name` this export is already registered as, or None.

    Lets a flow skip work (freezing, logging) for an export that is already in the registry.

    Args:
        export: the `export_saved_model` result.
        registered_model_name: the registered model.
        connection: the MLflow connection; default `MlflowConfig()`.

    Returns:
        The registered version (with the gate decision recorded on it, else `gate` None: the gate has
        not run for it), or None if this export is not registered.

    Example:
        >>> from prefect import flow
        >>> from prefect_tensorflow.tasks import find_registered_version
        >>> @flow
        ... def lookup(export) -> bool:
        ...     return find_registered_version(export, "iris") is not None
    """
    connection = connection or MlflowConfig()
    experiment_id = connection.experiment_id()

    def lookup() -> Optional[RegisteredVersion]:
        client = connection.client()
        existing = _version_by_fingerprint(client, registered_model_name, export.fingerprint)
        decision = recorded_decision(existing) if existing is not None else None
        if decision is None:
            return None
        return _result(connection, client, existing, experiment_id, reused=True, parity=None, gate=decision)

    return connection.retrying(f"looking up {export.path} in {registered_model_name!r}", lookup)


def version_aliases(registered: RegisteredVersion, connection: Optional[MlflowConfig] = None) -> list[str]:
    """The aliases `registered` holds now (e.g. after the gate moved `champion`), sorted."""
    connection = connection or MlflowConfig()

    def read() -> list[str]:
        return sorted(connection.client().get_model_version(registered.name, str(registered.version)).aliases)

    return connection.retrying(f"reading the aliases of {registered.name!r} version {registered.version}", read)


def set_model_version_aliases(
    registered: RegisteredVersion, aliases: list[str], connection: Optional[MlflowConfig] = None
) -> RegisteredVersion:
    """Set the aliases a user asked for (e.g. `staging`, or `champion` by hand) on a registered version.

    Args:
        registered: the `register_model_version` result.
        aliases: alias names; each is moved to this version.
        connection: the MLflow connection; default `MlflowConfig()`.

    Returns:
        `registered` with its aliases as they are now.

    Raises:
        MlflowUnavailableError: the server still failed after the retries.

    Example:
        >>> from prefect import flow
        >>> from prefect_tensorflow.tasks import set_model_version_aliases
        >>> @flow
        ... def promote(registered) -> list[str]:
        ...     return set_model_version_aliases(registered, ["staging"]).aliases
    """
    if not aliases:
        return registered
    connection = connection or MlflowConfig()

    def apply() -> list[str]:
        client = connection.client()
        for alias in aliases:
            if alias == CHAMPION:  # what serving reads moves under the model's lock, as the gate moves it
                with registry_lock(registered.name):
                    before = current_alias_version(client, registered.name, CHAMPION)
                    move_alias(
                        client,
                        registered.name,
                        CHAMPION,
                        registered.version,
                        expected_from=before,
                        reason="asked for (aliases)",
                        kind="manual",
                    )
                continue
            set_alias(client, registered.name, alias, registered.version, reason="asked for (aliases)", kind="manual")
        client.set_model_version_tag(
            registered.name, str(registered.version), TAG_PREFIX + "aliases_requested", ",".join(aliases)
        )
        return sorted(client.get_model_version(registered.name, str(registered.version)).aliases)

    current = connection.retrying(f"setting aliases {aliases} on {registered.name!r}", apply)
    get_logger().info("%s version %s: aliases %s", registered.name, registered.version, ", ".join(current))
    return registered.model_copy(update={"aliases": current})


def _quote(text: str) -> str:
    return text.replace("'", "\\'")
