"""`CheckpointPolicy`: when to save checkpoints and how many to keep, and the save decision itself.

The defaults are the Estimator's: save every 600 seconds, at the start and at
the end of training, keep the 5 newest (and one every 10,000 hours). The
policy decides (`is_due`), the training loop only asks, as Orbax's save
decision policies do; so the rule is testable without TensorFlow.

Example:
    >>> from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    >>> policy = CheckpointPolicy(save_checkpoints_steps=100)
    >>> policy.save_checkpoints_secs is None, policy.is_due(step=200, seconds_since_save=1.0)
    (True, True)
    >>> CheckpointPolicy(save_checkpoints_secs=60).is_due(step=7, seconds_since_save=61.0)
    True
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from ..config_checks import PositiveNumber, integer_between, text_matching

DEFAULT_SAVE_SECS = 600.0
SaveEverySteps = Annotated[int, Field(ge=1), BeforeValidator(integer_between(1))]
KeepMax = Annotated[int, Field(ge=1), BeforeValidator(integer_between(1, none_means="keep every checkpoint"))]
CheckpointName = Annotated[
    str, AfterValidator(text_matching(r"[A-Za-z0-9_.]+", "a file name prefix of letters, digits, '_' and '.'", 128))
]


class CheckpointPolicy(BaseModel):
    """When checkpoints are written and which are kept.

    Set one of `save_checkpoints_secs` and `save_checkpoints_steps`; with
    neither, checkpoints are saved every 600 seconds.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    save_checkpoints_secs: Optional[PositiveNumber] = Field(
        default=None, description="Save a checkpoint every this many seconds (default 600)."
    )
    save_checkpoints_steps: Optional[SaveEverySteps] = Field(
        default=None, description="Save a checkpoint every this many global steps."
    )
    keep_checkpoint_max: Optional[KeepMax] = Field(default=5, description="Keep this many newest checkpoints; None keeps all.")
    keep_checkpoint_every_n_hours: Optional[PositiveNumber] = Field(
        default=10000.0, description="Also keep one checkpoint every this many hours of training."
    )
    save_at_start: bool = Field(default=True, description="Save before the first step.")
    save_at_end: bool = Field(default=True, description="Save after the last step.")
    async_save: bool = Field(
        default=True,
        description=(
            "Write checkpoints in a background thread: the training loop only takes a snapshot of the "
            "variables and the input position (checkpoint_writer.py); the files and the commit follow "
            "in order. False: the same work, before training goes on."
        ),
    )
    durable_commit: bool = Field(
        default=True,
        description=(
            "fsync each checkpoint's files and the model dir before the state file names it, and the model dir "
            "after: a power cut never leaves a state file pointing at data that never reached the disk. False: "
            "no fsync (faster on slow disks; after a power cut the newest checkpoints may be lost or unreadable)."
        ),
    )
    checkpoint_name: CheckpointName = Field(
        default="model.ckpt", description="File name prefix: checkpoints are MODEL_DIR/NAME-STEP.index"
    )

    @model_validator(mode="before")
    @classmethod
    def _one_save_trigger(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        secs = data.get("save_checkpoints_secs")
        steps = data.get("save_checkpoints_steps")
        if secs is not None and steps is not None:
            raise ValueError(
                f"expected one of save_checkpoints_secs or save_checkpoints_steps, received both (secs={secs!r}, steps={steps!r})"
            )
        if secs is None and steps is None:
            data = {**data, "save_checkpoints_secs": DEFAULT_SAVE_SECS}
        return data

    def is_due(self, step: int, seconds_since_save: float) -> bool:
        """Whether a checkpoint is due after global step `step`, `seconds_since_save` after the last one."""
        if self.save_checkpoints_steps is not None:
            return step % self.save_checkpoints_steps == 0
        return seconds_since_save >= (self.save_checkpoints_secs or DEFAULT_SAVE_SECS)

    def is_due_at_start(self, step: int, target: int, last_saved_step: Optional[int]) -> bool:
        """Whether to save before the first step: asked for, something to train, no checkpoint at `step` yet."""
        return self.save_at_start and step < target and last_saved_step != step

    def is_due_at_end(self, step: int, last_saved_step: Optional[int], *, preempted: bool) -> bool:
        """Whether to save after the last step (always after a preemption), unless `step` is saved already."""
        return (self.save_at_end or preempted) and last_saved_step != step
