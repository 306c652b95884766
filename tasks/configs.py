"""The configurations passed down whole: what to train, how to export, the champion gate.

Each is a frozen pydantic model validated where it is built (a flow's
parameters, the CLI's options, a library call), so a bad value fails at once
naming the field, and every stage below receives settings that are already
checked. `model` and `data` are registered names or import strings
(`model_code`); they are only checked for shape here and imported when used.

Example:
    >>> from prefect_tensorflow.tasks.configs import GateConfig, TrainingConfig
    >>> TrainingConfig(steps=500, batch_size=16).policy.save_checkpoints_secs
    600.0
    >>> GateConfig(metric="loss").mode, GateConfig(metric="loss", mode="max").mode
    ('min', 'max')
    >>> gate = GateConfig(guardrails={"loss": 0.05}, floors={"accuracy": 0.8}, serving={"max_load_seconds": 30})
    >>> gate.min_improvement, gate.confidence, gate.serving.max_load_seconds
    (0.0, 0.95, 30.0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, JsonValue, ValidationInfo, field_validator

from . import model_code
from .checkpoints.policy import CheckpointPolicy
from .config_checks import (
    FiniteNumber,
    PositiveNumber,
    finite_number_at_least,
    integer_between,
    number_in_open_interval,
    one_of,
    text_matching,
)
from .data.window import DataWindow
from .metric_order import Mode, default_mode

if TYPE_CHECKING:
    from .data.source import DataSource

ModelRef = Annotated[
    str, AfterValidator(lambda ref: model_code.check_syntax(ref, "model")), model_code.RegisteredChoices("model")
]
DataRef = Annotated[str, AfterValidator(lambda ref: model_code.check_syntax(ref, "data")), model_code.RegisteredChoices("data")]
MetricName = Annotated[
    str, AfterValidator(text_matching(r"[A-Za-z0-9_./-]{1,128}", "a metric name of letters, digits, '_', '.', '/' or '-'", 128))
]
RegisteredModelName = Annotated[
    str,
    AfterValidator(
        text_matching(
            r"[A-Za-z0-9_.-][A-Za-z0-9 _.-]{0,254}",
            "a registered model name of letters, digits, ' ', '_', '.' or '-' (no '/', which breaks models:/ URIs)",
            255,
        )
    ),
]
AliasName = Annotated[
    str,
    AfterValidator(
        text_matching(
            r"(?!(?i:latest|v\d+)$)[A-Za-z_][A-Za-z0-9_-]{0,254}",
            "alias names like 'staging' (a letter or '_' first, then letters, digits, '_' or '-'; not 'latest' or 'v<N>')",
            255,
        )
    ),
]
TensorName = Annotated[str, AfterValidator(text_matching(r"[A-Za-z0-9_./:-]{1,256}", "a tensor or node name", 256))]
MAX_STEPS = 10**12
# The validator gives the package's one-line message; `Field` puts the bounds in the JSON schema (the UI form).
Steps = Annotated[int, Field(ge=0, le=MAX_STEPS), BeforeValidator(integer_between(0, MAX_STEPS))]
BatchSize = Annotated[int, Field(ge=1, le=2**20), BeforeValidator(integer_between(1, 2**20))]
Seed = Annotated[int, Field(ge=0, le=2**31 - 1), BeforeValidator(integer_between(0, 2**31 - 1))]
ShuffleBuffer = Annotated[int, Field(ge=1, le=10**8), BeforeValidator(integer_between(1, 10**8))]
Workers = Annotated[int, Field(ge=1, le=64), BeforeValidator(integer_between(1, 64))]
EveryNSteps = Annotated[int, Field(ge=1, le=MAX_STEPS), BeforeValidator(integer_between(1, MAX_STEPS))]
GateMode = Annotated[Literal["min", "max"], BeforeValidator(one_of("min", "max"))]
Head = Annotated[Literal["classifier", "raw"], BeforeValidator(one_of("classifier", "raw"))]


class TrainingConfig(BaseModel):
    """Everything that decides what a training computes, but where it writes.

    `steps` is the target global step (the Estimator's `max_steps`); with
    `more_steps`, the target is that many steps past the newest checkpoint.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelRef = Field(default="iris", description="Registered model builder name, or 'module:attr' (library and CLI)")
    data: DataRef = Field(default="iris", description="Registered dataset loader name, or 'module:attr' (library and CLI)")
    data_options: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="Keyword arguments of the dataset loader (e.g. the partitioned loader's prefix and columns)",
    )
    window: Optional[DataWindow] = Field(
        default=None,
        description="The data window, for loaders that read one: whole UTC days [start, end), or a version; "
        "default: the `days` before the run's scheduled start day",
    )
    hparams: dict[str, JsonValue] = Field(default_factory=dict, description="Keyword arguments of the model builder")
    steps: Steps = Field(default=1000, description="Target global step")
    more_steps: Optional[Steps] = Field(
        default=None, description="Train this many steps past the newest checkpoint instead of to `steps`"
    )
    batch_size: BatchSize = Field(default=32, description="Examples per step")
    seed: Seed = Field(default=0, description="Seed of initialisation and shuffling")
    shuffle_buffer: ShuffleBuffer = Field(
        default=1000,
        description="Examples in the shuffle buffer; 1: no shuffle (data of known length is shuffled a whole epoch at a time whatever the size above 1)",
    )
    summary_every_n_steps: EveryNSteps = Field(
        default=100, description="Write the loss to TensorBoard (and log it) every this many steps"
    )
    policy: CheckpointPolicy = Field(default_factory=CheckpointPolicy, description="When to checkpoint, what to keep")
    evaluation: Annotated[Literal["sidecar", "in_loop", "none"], BeforeValidator(one_of("sidecar", "in_loop", "none"))] = Field(
        default="sidecar",
        description="Where checkpoints are evaluated: 'sidecar' (a low-priority process beside training), 'in_loop' "
        "(before each save, in the training loop), 'none'",
    )
    workers: Workers = Field(
        default=1,
        description="TensorFlow worker processes training this one model (MultiWorkerMirroredStrategy); 1: this process",
    )

    def target_step(self, start_step: int) -> int:
        """The global step this training ends at when it starts (or resumes) at `start_step`."""
        return start_step + self.more_steps if self.more_steps is not None else self.steps

    def mlflow_params(self) -> dict[str, Any]:
        """The config as MLflow params (nested keys are flattened by the tracker)."""
        return self.model_dump(mode="json")

    def export_config(self, hparams: Optional[dict[str, Any]] = None) -> ExportConfig:
        """How a checkpoint of this training is rebuilt and verified: its model, hparams (or `hparams`), data and window."""
        return ExportConfig(
            model=self.model,
            hparams=dict(self.hparams) if hparams is None else hparams,
            data=self.data,
            data_options=dict(self.data_options),
            window=self.window,
        )

    def data_source(self) -> DataSource:
        """The data this config trains on: its loader, options and window."""
        from .data.source import DataSource

        return DataSource(data=self.data, options=dict(self.data_options), window=self.window)


class ExportConfig(BaseModel):
    """How a checkpoint becomes a serving graph (frozen `.pb` or SavedModel) and how it is verified."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Optional[ModelRef] = Field(
        default=None, description="Model builder of a TF2 checkpoint (default: the bundled iris); none for a TF1 one with .meta"
    )
    hparams: dict[str, JsonValue] = Field(default_factory=dict, description="Keyword arguments of the model builder")
    head: Head = Field(
        default="classifier", description="'classifier': logits, probabilities, class_ids; 'raw': the model's output"
    )
    input_nodes: Optional[list[TensorName]] = Field(default=None, description="TF1 only: input tensor names")
    output_nodes: Optional[list[TensorName]] = Field(default=None, description="TF1 only: output node names")
    data: Optional[DataRef] = Field(
        default=None, description="Dataset loader for the verification batch (default: iris for iris, else random values)"
    )
    data_options: dict[str, JsonValue] = Field(default_factory=dict, description="Keyword arguments of the dataset loader")
    window: Optional[DataWindow] = Field(default=None, description="The data window the loader reads (see TrainingConfig)")
    tolerance: PositiveNumber = Field(default=1e-5, description="Largest absolute difference accepted in verification")

    def model_for(self, checkpoint_format: str) -> Optional[str]:
        """The model builder a checkpoint of this format is rebuilt with: None means its TF1 meta graph."""
        if checkpoint_format == "tf1" and self.model is None:
            return None
        return self.model or "iris"

    def verification_data(self, model: Optional[str]) -> Optional[str]:
        """`data`, or the bundled iris loader for the bundled iris model, else None (seeded random values)."""
        if self.data is not None:
            return self.data
        if model is not None and model_code.import_string(model, "model") == model_code.import_string("iris", "model"):
            return "iris"
        return None

    def data_source(self, model: Optional[str] = None) -> Optional[DataSource]:
        """`verification_data(model)` with this config's options and window; None: no loader."""
        from .data.source import DataSource

        data = self.verification_data(model if model is not None else self.model)
        return None if data is None else DataSource(data=data, options=dict(self.data_options), window=self.window)


# The per-example metrics the champion gate computes from a SavedModel's serving outputs
# (`promotion.outcomes`): the classifier head's from `probabilities`/`class_ids`, the raw head's from its one output.
GATE_METRICS = ("accuracy", "error", "loss", "mse", "mae")
GateMetric = Annotated[Literal["accuracy", "error", "loss", "mse", "mae"], BeforeValidator(one_of(*GATE_METRICS))]
Margin = Annotated[float, BeforeValidator(finite_number_at_least(0.0))]


class ServingLimits(BaseModel):
    """Limits of the serving check before a version may take `champion` (None: recorded, not a limit)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_load_seconds: Optional[PositiveNumber] = Field(
        default=None, description="Longest cold load of the SavedModel in a fresh process, in seconds"
    )
    max_p99_latency_ms: Optional[PositiveNumber] = Field(
        default=None, description="Largest p99 latency of one scoring request, in milliseconds"
    )
    max_peak_memory_mb: Optional[PositiveNumber] = Field(
        default=None, description="Largest peak resident memory of the serving process, in MB"
    )


class GateConfig(BaseModel):
    """The champion gate: the rule a challenger must pass, both versions scored on the same eval data.

    The primary rule is on `metric`: the paired bootstrap interval (at
    `confidence`) of the challenger's improvement over the champion must have
    its lower bound above `min_improvement` (superiority) and/or above
    `-max_regression` (non-inferiority); both set, both must hold; neither set
    (or `metric` None) is the stated decision "no rule: champion kept".
    Guardrails and slices compare point estimates with their margins; floors
    are absolute and apply to the first version too.

    `mode` left out (or None) follows the metric as `best:<metric>` does
    (`metric_order.default_mode`: `loss`/`error`/`mse`/`mae` -> "min", else
    "max"); a mode given explicitly wins. The rule itself is `registry.gate`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: Optional[GateMetric] = Field(
        default="accuracy",
        description="Primary metric, scored on the same eval data for both versions: "
        + ", ".join(GATE_METRICS)
        + "; None: no rule (champion kept)",
    )
    mode: Optional[GateMode] = Field(
        default=None,
        validate_default=True,
        description="'max' if higher is better, 'min' if lower is; default: 'min' for a metric named like a loss "
        "or an error, else 'max'",
    )
    min_improvement: Optional[Margin] = Field(
        default=0.0,
        description="Superiority: the interval's lower bound of the improvement must exceed this; None: no such rule",
    )
    max_regression: Optional[Margin] = Field(
        default=None,
        description="Non-inferiority: the interval's lower bound of the improvement must exceed minus this; None: no such rule",
    )
    guardrails: dict[GateMetric, Margin] = Field(
        default_factory=dict, description="Other metrics, each with the regression allowed (point estimate)"
    )
    slice_max_regression: Optional[Margin] = Field(
        default=None,
        description="Regression allowed on the primary metric in each slice (per class by default); None: slices shown, not gating",
    )
    floors: dict[GateMetric, FiniteNumber] = Field(
        default_factory=dict,
        description="Absolute limits: at least this for a metric where higher is better, at most for one where lower is; "
        "the first version too",
    )
    confidence: Annotated[float, BeforeValidator(number_in_open_interval(0.5, 1.0))] = Field(
        default=0.95, description="Confidence of the interval of the improvement"
    )
    bootstrap_samples: Annotated[int, Field(ge=100, le=100_000), BeforeValidator(integer_between(100, 100_000))] = Field(
        default=2000, description="Bootstrap resamples of the paired differences"
    )
    approval_timeout_seconds: Annotated[int, Field(ge=0, le=7 * 86400), BeforeValidator(integer_between(0, 7 * 86400))] = Field(
        default=3600, description="An incomparable decision waits this long for approval, then the champion is kept"
    )
    serving: ServingLimits = Field(default_factory=ServingLimits, description="Limits of the serving check")

    @field_validator("mode", mode="after")
    @classmethod
    def _mode_follows_metric(cls, mode: Optional[Mode], info: ValidationInfo) -> Mode:
        return mode if mode is not None else default_mode(info.data.get("metric"))
