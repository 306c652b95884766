"""`CheckpointPolicy`: when to save checkpoints and how many to keep.

The defaults are the Estimator's: save every 600 seconds, at the start and at
the end of training, keep the 5 newest (and one every 10,000 hours).

Example:
    >>> from prefect_tensorflow.tasks.policy import CheckpointPolicy
    >>> CheckpointPolicy(save_checkpoints_steps=100).save_checkpoints_secs is None
    True
    >>> CheckpointPolicy(keep_checkpoint_max=0)
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for CheckpointPolicy
    keep_checkpoint_max
      Value error, expected an integer >= 1 (or None to keep every checkpoint), received 0 ...
"""

from __future__ import annotations

import re
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_SAVE_SECS = 600.0
_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


class CheckpointPolicy(BaseModel):
    """When checkpoints are written and which are kept.

    Set one of `save_checkpoints_secs` and `save_checkpoints_steps`; with
    neither, checkpoints are saved every 600 seconds.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    save_checkpoints_secs: Optional[float] = Field(
        default=None, description="Save a checkpoint every this many seconds (default 600)."
    )
    save_checkpoints_steps: Optional[int] = Field(
        default=None, description="Save a checkpoint every this many global steps."
    )
    keep_checkpoint_max: Optional[int] = Field(
        default=5, description="Keep this many newest checkpoints; None keeps all."
    )
    keep_checkpoint_every_n_hours: Optional[float] = Field(
        default=10000.0,
        description="Also keep one checkpoint every this many hours of training.",
    )
    save_at_start: bool = Field(default=True, description="Save before the first step.")
    save_at_end: bool = Field(default=True, description="Save after the last step.")
    async_save: bool = Field(
        default=False,
        description=(
            "Write checkpoints in a background thread (TensorFlow async checkpointing). "
            "It pays off when variables live on an accelerator; on the CPU the copy is "
            "deferred to the next variable update, so a step stalls about as long "
            "as a synchronous save would (see bench/checkpoint_save.py)."
        ),
    )
    checkpoint_name: str = Field(
        default="model.ckpt", description="File name prefix: <model_dir>/<name>-<step>.index"
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
                "expected one of save_checkpoints_secs or save_checkpoints_steps, "
                f"received both (secs={secs!r}, steps={steps!r})"
            )
        if secs is None and steps is None:
            data = {**data, "save_checkpoints_secs": DEFAULT_SAVE_SECS}
        return data

    @field_validator("save_checkpoints_secs", "keep_checkpoint_every_n_hours", mode="before")
    @classmethod
    def _positive_number(cls, value: Any, info) -> Any:
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"expected a number > 0, received {value!r}")
        return value

    @field_validator("save_checkpoints_steps", mode="before")
    @classmethod
    def _positive_steps(cls, value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"expected an integer >= 1, received {value!r}")
        return value

    @field_validator("keep_checkpoint_max", mode="before")
    @classmethod
    def _keep_max(cls, value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"expected an integer >= 1 (or None to keep every checkpoint), received {value!r}"
            )
        return value

    @field_validator("checkpoint_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                "expected a file name prefix of letters, digits, '_' and '.', "
                f"received {value!r}"
            )
        return value
