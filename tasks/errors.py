"""The package's exceptions: one base, one subclass per kind of fault.

Every error names the file, parameter or key at fault and says what was
expected, so that a failed Prefect run explains itself.

Example:
    >>> from prefect_tensorflow.tasks.errors import PrefectTensorFlowError
    >>> try:
    ...     raise NoValidCheckpointError("/models/iris", "no checkpoint files")
    ... except PrefectTensorFlowError as err:
    ...     print(err)
    no valid checkpoint in /models/iris: no checkpoint files
"""

from __future__ import annotations

from typing import Optional

from .config_checks import short_repr


class PrefectTensorFlowError(Exception):
    """Base class of every error raised by prefect-tensorflow."""


class ImportStringError(PrefectTensorFlowError, ValueError):
    """A `"module:attr"` import string is malformed or names nothing."""

    def __init__(self, spec: object, reason: str, *, parameter: str = "import string"):
        self.spec = spec
        self.parameter = parameter
        super().__init__(f"{parameter} {short_repr(spec)}: {reason}")


class ModelDirError(PrefectTensorFlowError, ValueError):
    """A model directory is missing, not a directory, or not writable."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        super().__init__(f"model dir {self.path}: {reason}")


class ModelDirBusyError(ModelDirError):
    """Another training holds the model dir's lease (`training.model_dir_lease`); the holder is named."""

    def __init__(self, path: object, holder: str, waited: float):
        self.holder = holder
        self.waited = waited
        wait = f" after waiting {waited:.0f} s" if waited >= 1 else ""
        super().__init__(path, f"another training holds it ({holder}); refused{wait} (PREFECT_TENSORFLOW_LEASE_WAIT)")


class InvalidCheckpointError(PrefectTensorFlowError):
    """One checkpoint is unreadable, incomplete or corrupt."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"checkpoint {self.path}: {reason}")


class NoValidCheckpointError(PrefectTensorFlowError):
    """A model directory holds no checkpoint that passes validation."""

    def __init__(self, model_dir: object, reason: str):
        self.model_dir = str(model_dir)
        self.reason = reason
        super().__init__(f"no valid checkpoint in {self.model_dir}: {reason}")


class MetricNotFoundError(PrefectTensorFlowError, KeyError):
    """No checkpoint recorded the metric a selection asked for."""

    def __init__(self, model_dir: object, metric: str, available: list[str], *, parameter: str = ""):
        self.model_dir = str(model_dir)
        self.metric = metric
        self.available = available
        shown = ", ".join(available) if available else "none recorded"
        super().__init__(
            f"{parameter + ': ' if parameter else ''}metric {metric!r} was not recorded for any valid checkpoint"
            f" in {self.model_dir}; recorded metrics: {shown}"
        )

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class CheckpointMismatchError(PrefectTensorFlowError):
    """A checkpoint's keys do not match the objects restoring it."""

    def __init__(self, path: object, missing: list[str], unexpected: list[str], detail: str = ""):
        self.path = str(path)
        self.missing = missing
        self.unexpected = unexpected
        parts = [f"checkpoint {self.path} does not match the model being restored"]
        if detail:
            parts.append(detail)
        if missing:
            parts.append(f"keys the model expects but the checkpoint lacks: {_few(missing)}")
        if unexpected:
            parts.append(f"keys in the checkpoint the model does not have: {_few(unexpected)}")
        parts.append("was it written by a different model builder or different key names?")
        super().__init__("; ".join(parts))


class TrainingError(PrefectTensorFlowError):
    """Training could not start or could not go on (bad model, data or settings)."""


class NonFiniteLossError(TrainingError):
    """The training loss or the weights went NaN or infinite: training stopped before a checkpoint of them was saved.

    Example:
        >>> print(NonFiniteLossError("/models/iris", float("nan"), 120, last_good_step=100))
        training diverged at step 120 in /models/iris: the training loss is nan; training stopped and no checkpoint of these weights was saved; the newest checkpoint (step 100) is the last good one. Look for NaN or infinite features or labels in the data, or lower the learning rate
    """

    def __init__(
        self,
        model_dir: object,
        loss: Optional[float],
        step: int,
        *,
        last_good_step: Optional[int] = None,
        since: Optional[int] = None,
        weights: str = "",
    ):
        self.model_dir, self.loss, self.step, self.last_good_step = str(model_dir), loss, step, last_good_step
        when = f"at step {step}" if since is None else f"between steps {since} and {step}"
        what = [f"the training loss is {loss}"] if loss is not None else []
        if weights:
            what.append(f"the weights hold NaN or infinite values ({weights})")
        good = (
            "the model dir has no checkpoint of this training"
            if last_good_step is None
            else f"the newest checkpoint (step {last_good_step}) is the last good one"
        )
        super().__init__(
            f"training diverged {when} in {self.model_dir}: {' and '.join(what)}; training stopped and no checkpoint "
            f"of these weights was saved; {good}. Look for NaN or infinite features or labels in the data, or lower "
            "the learning rate"
        )


class FreezeError(PrefectTensorFlowError):
    """A graph cannot be frozen (missing `.meta`, unknown output node, unwritable output)."""


class GraphTooLargeError(FreezeError):
    """The frozen graph would pass protobuf's 2 GB limit for a GraphDef."""


class ExportError(PrefectTensorFlowError):
    """An export base is unusable, or a TF1 graph lacks what an export needs."""


class ParityError(PrefectTensorFlowError):
    """A frozen graph or SavedModel does not compute what its checkpoint computes."""


class MlflowSettingsError(PrefectTensorFlowError, ValueError):
    """An MLflow connection setting is malformed (a URI, an experiment or model name)."""


class MlflowUnavailableError(PrefectTensorFlowError):
    """The MLflow tracking or registry server still failed after the retries."""

    def __init__(self, server: str, operation: str, attempts: int, detail: str):
        self.server, self.operation, self.attempts = server, operation, attempts
        super().__init__(
            f"MLflow server {server}: {operation} failed after {attempts} attempt(s): {detail}. "
            "Check that the server is running and reachable (MLFLOW_TRACKING_URI, or the "
            "connection's tracking_uri); nothing was registered."
        )


class ServerUnreachableError(PrefectTensorFlowError):
    """A server a flow needs (a Dask scheduler, ...) does not accept a connection: checked before anything is written."""

    def __init__(self, setting: str, address: str, detail: str):
        self.setting, self.address = setting, address
        super().__init__(f"{setting}: {address}: {detail}; expected it listening there")


class RegistryError(PrefectTensorFlowError):
    """The MLflow model registry refused an operation, or a logged model failed its check."""


class AliasMovedError(RegistryError):
    """An alias no longer names the version a decision was made against: it moved since it was read."""

    def __init__(self, name: str, alias: str, expected: object, current: object):
        self.name, self.alias, self.expected, self.current = name, alias, expected, current
        super().__init__(
            f"registered model {name!r}: @{alias} names version {current} now, not {expected} as when it was "
            "read: another run moved it meanwhile; nothing was moved (decide again against the new version)"
        )


class RollbackError(RegistryError):
    """A rollback has no target, or its target may not take the alias (missing, or no passed serving check)."""


class StorageError(PrefectTensorFlowError, ValueError):
    """A location (path or URI) is malformed, of an unsupported scheme, or cannot be written."""


class UnsafeParameterError(PrefectTensorFlowError, ValueError):
    """A parameter of a deployment run reaches outside what the deployment's configuration allows."""

    def __init__(self, parameter: str, value: object, reason: str):
        self.parameter = parameter
        super().__init__(f"{parameter}: {reason}, received {short_repr(value)}")


class MetricsTimeoutError(PrefectTensorFlowError):
    """Selection waited for checkpoint metrics that the evaluator did not record in time."""


def _few(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    if len(keys) > limit:
        shown += f" (+{len(keys) - limit} more)"
    return shown


class GateError(PrefectTensorFlowError, ValueError):
    """The champion gate cannot score or compare: eval data, a SavedModel's signature, or a metric do not fit."""


class DataError(PrefectTensorFlowError, ValueError):
    """The data of a window cannot be read as configured: a prefix, a partition, a file, a column or a value."""


class DataValidationError(DataError):
    """A window breaks its schema contract: training is blocked before anything is written.

    `anomalies` holds what was found (feature, kind, value, expected), for the artifact and the tags.
    """

    def __init__(self, message: str, anomalies: tuple = ()):
        super().__init__(message)
        self.anomalies = anomalies


class WebhookRefusedError(PrefectTensorFlowError):
    """A webhook delivery is refused: `status` is the HTTP answer (401 bad signature or stale, 400 malformed)."""

    def __init__(self, status: int, reason: str):
        self.status = status
        self.reason = reason
        super().__init__(f"webhook delivery refused ({status}): {reason}")
