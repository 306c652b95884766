"""`register_model_version`: a verified SavedModel export as a version of an MLflow registered model.

The export directory is logged as an MLflow pyfunc model whose artifact is
that very directory (`saved_model_pyfunc.py`, "models from code"), with its
signature, an input example and requirements pinned to the running
environment. Before a version is created the logged model is downloaded back,
its SavedModel digest compared with the export's, and
`mlflow.pyfunc.load_model(...).predict` compared with the SavedModel on the
verification batch: a version is only ever created for artifacts that are
there and compute what the export computes. The version is created in one
request with all its tags, so it never exists half-tagged.

Registering is idempotent: the export's fingerprint is a version tag, and an
export already registered returns its version. A lock on the export base
makes two processes registering one export end with one version.

Aliases, not stages: every new version gets `challenger`; `champion` moves to
it only when its evaluation metric beats the champion's (the first version
becomes champion). The decision and both figures are recorded as version tags
(`prefect_tensorflow.gate.*`).

Example:
    >>> from prefect import flow
    >>> from prefect_tensorflow.tasks.registry import register_model_version
    >>> @flow
    ... def ship(export, checkpoint) -> int:
    ...     return register_model_version(export, "iris", checkpoint=checkpoint).version
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from importlib import metadata
from typing import Iterator, Literal, Optional

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from .errors import MetricNotFoundError, MlflowSettingsError, RegistryError
from .exporting import ExportResult, export_lock, saved_model_digest
from .freezing import FreezeResult
from .logs import get_logger
from .mlflow_connection import MlflowConnection
from .selection import CheckpointRef
from .tracking import TAG_PREFIX, prefect_tags
from .verification import DEFAULT_TOLERANCE, Parity, compare_outputs, run_saved_model, verification_batch

CHALLENGER = "challenger"
CHAMPION = "champion"
MODEL_NAME_IN_RUN = "model"
PYFUNC_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "saved_model_pyfunc.py")
FINGERPRINT_TAG = TAG_PREFIX + "fingerprint"
_DISTRIBUTIONS = (("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tensorflow-intel"), ("mlflow",), ("numpy",), ("pandas",))


class GateDecision(BaseModel):
    """Whether `champion` moved to the new version, and on which figures."""

    model_config = ConfigDict(frozen=True)

    metric: Optional[str]
    mode: Literal["min", "max"]
    challenger_version: int
    challenger_value: Optional[float]
    champion_version: Optional[int] = Field(description="The champion before the decision; None if there was none")
    champion_value: Optional[float]
    promoted: bool
    reason: str


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
    gate: Optional[GateDecision]


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
        return Schema([
            TensorSpec(np.dtype(info.dtype), tuple(-1 if d is None else d for d in (info.shape or [])), name)
            for name, info in sorted(tensors.items())
        ])

    return ModelSignature(inputs=schema(export.signature.inputs), outputs=schema(export.signature.outputs))


def find_registered_version(client, name: str, fingerprint: str):
    """The version of `name` tagged with `fingerprint`, or None (oldest first if several)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{_quote(name)}' and tags.`{FINGERPRINT_TAG}` = '{fingerprint}'")
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return min(found, key=lambda mv: int(mv.version)) if found else None


def check_registered_model_name(name: str) -> str:
    """A registered model name: non-empty, no '/' (it would break `models:/<name>/<version>` URIs).

    Raises:
        MlflowSettingsError: naming `registered_model_name`.
    """
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise MlflowSettingsError(f"registered_model_name: expected a non-empty name without '/', received {name!r}")
    return name


def gate_value(checkpoint: Optional[CheckpointRef], metric: Optional[str]) -> Optional[float]:
    """The checkpoint's recorded value of the gate metric.

    Raises:
        MetricNotFoundError: the checkpoint has no such metric.
    """
    if metric is None:
        return None
    metrics = checkpoint.metrics if checkpoint is not None else {}
    if metric not in metrics:
        where = checkpoint.model_dir if checkpoint is not None else "(no checkpoint given)"
        raise MetricNotFoundError(where, metric, sorted(metrics))
    return float(metrics[metric])


def _better(value: float, than: float, mode: str) -> bool:
    return value > than if mode == "max" else value < than


def decide_champion(
    client, name: str, version: int, value: Optional[float], metric: Optional[str], mode: str
) -> GateDecision:
    """Move `champion` to `version` if it beats the champion on `metric` (or there is none)."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    champion_version = int(champion.version) if champion is not None else None
    champion_value = None
    if champion is not None and metric is not None:
        recorded = champion.tags.get(f"{TAG_PREFIX}metric.{metric}")
        champion_value = float(recorded) if recorded not in (None, "") else None
    if champion is None:
        promoted, reason = True, "first version: no champion yet"
    elif champion_version == version:
        promoted, reason = True, "already champion"
    elif metric is None:
        promoted, reason = False, "no gate metric: champion stays"
    elif champion_value is None:
        promoted, reason = True, f"champion v{champion_version} has no recorded {metric}"
    elif _better(value, champion_value, mode):
        promoted, reason = True, f"{metric} {value:.6g} beats champion v{champion_version}'s {champion_value:.6g} ({mode})"
    else:
        promoted, reason = False, (
            f"{metric} {value:.6g} does not beat champion v{champion_version}'s {champion_value:.6g} ({mode})"
        )
    if promoted and champion_version != version:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    decision = GateDecision(
        metric=metric, mode=mode, challenger_version=version, challenger_value=value,
        champion_version=champion_version, champion_value=champion_value, promoted=promoted, reason=reason,
    )
    tags = {
        "gate.decision": "promoted to champion" if promoted else "champion kept",
        "gate.reason": reason,
        "gate.metric": str(metric),
        "gate.mode": mode,
        "gate.challenger_value": str(value),
        "gate.previous_champion_version": str(champion_version),
        "gate.previous_champion_value": str(champion_value),
    }
    for key, tag_value in tags.items():
        client.set_model_version_tag(name, str(version), TAG_PREFIX + key, tag_value)
    return decision


def recorded_decision(mv) -> Optional[GateDecision]:
    """The gate decision stored on a version's tags, or None if it was never made."""
    tags = mv.tags

    def number(key: str, cast=float):
        value = tags.get(TAG_PREFIX + key)
        return None if value in (None, "None", "") else cast(value)

    if TAG_PREFIX + "gate.decision" not in tags:
        return None
    metric = tags.get(TAG_PREFIX + "gate.metric")
    return GateDecision(
        metric=None if metric in (None, "None") else metric,
        mode=tags.get(TAG_PREFIX + "gate.mode", "max"),
        challenger_version=int(mv.version),
        challenger_value=number("gate.challenger_value"),
        champion_version=number("gate.previous_champion_version", int),
        champion_value=number("gate.previous_champion_value"),
        promoted=tags[TAG_PREFIX + "gate.decision"].startswith("promoted"),
        reason=tags.get(TAG_PREFIX + "gate.reason", ""),
    )


def log_export_model(
    connection: MlflowConnection, export: ExportResult, run_id: str, data: Optional[str], tolerance: float
) -> tuple[str, str, Parity]:
    """Log the export as a pyfunc model in `run_id`, download it back and check it.

    Returns:
        The logged model's URI and id, and the parity of its predictions with the SavedModel.

    Raises:
        RegistryError: the downloaded SavedModel differs from the export, or predicts differently.
    """
    import mlflow
    import tensorflow as tf

    if not os.path.isdir(export.path) or saved_model_digest(export.path) != export.digest:
        raise RegistryError(
            f"export {export.path}: missing, or its files differ from what was exported and verified "
            f"(expected digest {export.digest}); export the checkpoint again. Nothing was registered"
        )
    loaded = tf.saved_model.load(export.path)
    specs = loaded.signatures["serving_default"].structured_input_signature[1]
    names = sorted(specs)
    batch = verification_batch([specs[n] for n in names], data)
    expected = run_saved_model(export.path, batch, input_names=names, loaded=loaded)
    example = {name: value[:5] for name, value in zip(names, batch)}

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=PYFUNC_CODE,
            artifacts={"saved_model": export.path},
            signature=mlflow_signature(export),
            input_example=example,
            pip_requirements=pinned_requirements(),
            tags={FINGERPRINT_TAG: export.fingerprint},
        )
    with tempfile.TemporaryDirectory(prefix="prefect-tensorflow-check-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=tmp)
        copied = os.path.join(local, "artifacts", os.path.basename(os.path.normpath(export.path)))
        if not os.path.isdir(copied) or saved_model_digest(copied) != export.digest:
            raise RegistryError(
                f"logged model {info.model_uri}: its SavedModel artifact is missing or differs from "
                f"{export.path} (expected digest {export.digest}); no version was registered"
            )
        predicted = mlflow.pyfunc.load_model(local).predict(dict(zip(names, batch)))
    parity = compare_outputs(expected, predicted, tolerance)
    if not parity.ok:
        raise RegistryError(
            f"logged model {info.model_uri}: mlflow.pyfunc predictions differ from {export.path} by "
            f"{parity.max_abs_diff:.3g} (tolerance {tolerance:g}); no version was registered"
        )
    return info.model_uri, info.model_id, parity


def register_export(
    export: ExportResult,
    registered_model_name: str,
    *,
    connection: Optional[MlflowConnection] = None,
    checkpoint: Optional[CheckpointRef] = None,
    frozen: Optional[FreezeResult] = None,
    run_id: Optional[str] = None,
    data: Optional[str] = None,
    gate_metric: Optional[str] = "accuracy",
    gate_mode: Literal["min", "max"] = "max",
    tolerance: float = DEFAULT_TOLERANCE,
) -> RegisteredVersion:
    """The plain function behind `register_model_version`; see the module docstring."""
    check_registered_model_name(registered_model_name)
    if gate_mode not in ("min", "max"):
        raise RegistryError(f"gate_mode: expected 'min' or 'max', received {gate_mode!r}")
    connection = connection or MlflowConnection()
    value = gate_value(checkpoint, gate_metric)
    name = registered_model_name
    experiment_id = connection.experiment_id()
    log = get_logger()
    with export_lock(export.export_base):
        return connection.call(
            f"registering {export.path} as {name!r}",
            _register_locked,
            connection, export, name, experiment_id, checkpoint, frozen, run_id, data, value,
            gate_metric, gate_mode, tolerance, log,
        )


def _register_locked(
    connection, export, name, experiment_id, checkpoint, frozen, run_id, data, value, gate_metric, gate_mode,
    tolerance, log,
) -> RegisteredVersion:
    from mlflow.exceptions import MlflowException

    client = connection.client()
    existing = find_registered_version(client, name, export.fingerprint)
    if existing is not None:
        decision = recorded_decision(existing)
        if decision is None:  # created, then interrupted (or its answer lost) before the aliases
            client.set_registered_model_alias(name, CHALLENGER, str(existing.version))
            decision = decide_champion(client, name, int(existing.version), value, gate_metric, gate_mode)
        log.info("%s is already registered as %s version %s", export.path, name, existing.version)
        return _result(connection, client, existing, experiment_id, reused=True, parity=None, gate=decision)

    if run_id is None:
        tags = {**prefect_tags(), TAG_PREFIX + "stage": "export"}
        run_id = client.create_run(experiment_id, run_name=f"export-{name}-{export.version}", tags=tags).info.run_id
    model_uri, model_id, parity = log_export_model(connection, export, run_id, data, tolerance)
    for key, tag_value in prefect_tags().items():
        client.set_tag(run_id, key, tag_value)
    try:
        client.create_registered_model(name, description="Registered by prefect-tensorflow")
    except MlflowException as err:
        if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = version_tags(export, checkpoint, frozen, parity, gate_metric, value)
    # Not retried by MLflow's HTTP client: if the version was created but the answer lost, a
    # resend would create a second one. The operation retry (connection.call) looks the
    # fingerprint up first instead. A server checks that `model_id` holds the source.
    with _no_request_retries():
        mv = client.create_model_version(name, model_uri, run_id=run_id, tags=tags, model_id=model_id)
    log.info("registered %s version %s from %s", name, mv.version, export.path)
    client.set_registered_model_alias(name, CHALLENGER, str(mv.version))
    decision = decide_champion(client, name, int(mv.version), value, gate_metric, gate_mode)
    log.info("champion gate for %s version %s: %s", name, mv.version, decision.reason)
    return _result(connection, client, mv, experiment_id, reused=False, parity=parity, gate=decision)


def version_tags(
    export: ExportResult,
    checkpoint: Optional[CheckpointRef],
    frozen: Optional[FreezeResult],
    parity: Parity,
    gate_metric: Optional[str],
    value: Optional[float],
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
        **prefect_tags(),
    }
    if checkpoint is not None:
        tags[TAG_PREFIX + "checkpoint.step"] = str(checkpoint.step)
        for key, metric in checkpoint.metrics.items():
            tags[f"{TAG_PREFIX}metric.{key}"] = repr(metric)
    if frozen is not None:
        tags[TAG_PREFIX + "frozen_graph.path"] = frozen.path
        tags[TAG_PREFIX + "frozen_graph.sha256"] = frozen.digest
        tags[TAG_PREFIX + "parity.checkpoint_vs_frozen_graph"] = repr(frozen.parity.max_abs_diff)
    if gate_metric is not None:
        tags[f"{TAG_PREFIX}metric.{gate_metric}"] = repr(value)
    return tags


def _result(connection, client, mv, experiment_id, *, reused, parity, gate) -> RegisteredVersion:
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


def registered_version_for(
    export: ExportResult, registered_model_name: str, connection: Optional[MlflowConnection] = None
) -> Optional[RegisteredVersion]:
    """The version of `registered_model_name` this export is already registered as, or None.

    Lets a flow skip work (freezing, logging) for an export that is already in the registry.
    """
    connection = connection or MlflowConnection()
    experiment_id = connection.experiment_id()

    def lookup() -> Optional[RegisteredVersion]:
        client = connection.client()
        existing = find_registered_version(client, registered_model_name, export.fingerprint)
        decision = recorded_decision(existing) if existing is not None else None
        if decision is None:
            return None  # not registered, or registered but interrupted before the gate
        return _result(connection, client, existing, experiment_id, reused=True, parity=None, gate=decision)

    return connection.call(f"looking up {export.path} in {registered_model_name!r}", lookup)


def set_aliases(
    registered: RegisteredVersion, aliases: list[str], connection: Optional[MlflowConnection] = None
) -> RegisteredVersion:
    """Point each of `aliases` at `registered`'s version (as asked by a user), recorded on the version."""
    if not aliases:
        return registered
    connection = connection or MlflowConnection()

    def apply() -> list[str]:
        client = connection.client()
        for alias in aliases:
            client.set_registered_model_alias(registered.name, alias, str(registered.version))
        client.set_model_version_tag(
            registered.name, str(registered.version), TAG_PREFIX + "aliases_requested", ",".join(aliases)
        )
        return sorted(client.get_model_version(registered.name, str(registered.version)).aliases)

    current = connection.call(f"setting aliases {aliases} on {registered.name!r}", apply)
    get_logger().info("%s version %s: aliases %s", registered.name, registered.version, ", ".join(current))
    return registered.model_copy(update={"aliases": current})


@contextmanager
def _no_request_retries() -> Iterator[None]:
    previous = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = previous


def _quote(text: str) -> str:
    return text.replace("'", "\\'")


@task(name="register-model-version")
def register_model_version(
    export: ExportResult,
    registered_model_name: str,
    connection: Optional[MlflowConnection] = None,
    checkpoint: Optional[CheckpointRef] = None,
    frozen: Optional[FreezeResult] = None,
    run_id: Optional[str] = None,
    data: Optional[str] = None,
    gate_metric: Optional[str] = "accuracy",
    gate_mode: Literal["min", "max"] = "max",
    tolerance: float = DEFAULT_TOLERANCE,
) -> RegisteredVersion:
    """Log a verified export as an MLflow model and register it (idempotent), then run the champion gate.

    Args:
        export: the `export_saved_model` result.
        registered_model_name: the registered model to add a version to (created if missing).
        connection: the MLflow connection; default `MlflowConnection()` (env, else local SQLite).
        checkpoint: the checkpoint the export came from: its step and metrics are tagged,
            and its `gate_metric` decides the champion.
        frozen: the `freeze_graph` result, tagged on the version (path, digest, parity).
        run_id: the MLflow run to log the model in (e.g. the training run); default a new run.
        data: dataset loader for the verification batch (default: seeded random values).
        gate_metric: checkpoint metric that must beat the champion's; None to never move `champion`
            once there is one.
        gate_mode: "max" when higher is better, "min" when lower is.
        tolerance: largest difference accepted between pyfunc and SavedModel predictions.

    Returns:
        The version, its URIs and aliases, the pyfunc parity and the gate's decision.

    Raises:
        MetricNotFoundError: the checkpoint has no `gate_metric` (checked before anything is logged).
        MlflowSettingsError: a bad registered model name.
        RegistryError: the export changed since it was verified, or the logged model failed its check
            (nothing registered).
        MlflowUnavailableError: the server still failed after the retries.

    Example:
        >>> from prefect import flow
        >>> @flow
        ... def ship(export, checkpoint) -> str:
        ...     return register_model_version(export, "iris", checkpoint=checkpoint).model_uri
    """
    return register_export(
        export, registered_model_name, connection=connection, checkpoint=checkpoint, frozen=frozen,
        run_id=run_id, data=data, gate_metric=gate_metric, gate_mode=gate_mode, tolerance=tolerance,
    )


@task(name="set-model-version-aliases")
def set_model_version_aliases(
    registered: RegisteredVersion, aliases: list[str], connection: Optional[MlflowConnection] = None
) -> RegisteredVersion:
    """Set the aliases a user asked for (e.g. `staging`, or `champion` by hand) on a registered version.

    Args:
        registered: the `register_model_version` result.
        aliases: alias names; each is moved to this version.
        connection: the MLflow connection; default `MlflowConnection()`.

    Returns:
        `registered` with its aliases as they are now.

    Raises:
        MlflowUnavailableError: the server still failed after the retries.

    Example:
        >>> from prefect import flow
        >>> @flow
        ... def promote(registered) -> list[str]:
        ...     return set_model_version_aliases(registered, ["staging"]).aliases
    """
    return set_aliases(registered, aliases, connection)
