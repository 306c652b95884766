"""Flow parameters typed in the Prefect UI: how a checkpoint is chosen, alias names.

Example:
    >>> from prefect_tensorflow.flows.parameters import Selection
    >>> Selection.parse("best:loss")
    Selection(kind='best', metric='loss', mode='min', step=None)
    >>> Selection.parse("2000").step
    2000
"""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict

from prefect_tensorflow.tasks.registry import check_registered_model_name  # noqa: F401 - flows use it from here
from prefect_tensorflow.tasks.selection import (
    CheckpointRef,
    select_best_checkpoint,
    select_checkpoint_at_step,
    select_latest_checkpoint,
)

_BEST = re.compile(r"^best:([A-Za-z0-9_./-]+)(?::(min|max))?$")
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,254}$")
_RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)


class Selection(BaseModel):
    """How the checkpoint to ship is chosen: `"latest"`, a step number, or `"best:<metric>[:min|max]"`."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["latest", "best", "step"]
    metric: Optional[str] = None
    mode: Literal["min", "max"] = "max"
    step: Optional[int] = None

    @classmethod
    def parse(cls, text: str | int, *, parameter: str = "select") -> "Selection":
        """`"latest"`, a step (`2000` or `"2000"`), `"best:accuracy"` (max) or `"best:loss"`
        (min: names with "loss" or "error" default to min), or an explicit `"best:<metric>:min|max"`.

        Raises:
            ValueError: the text is none of these; the message names `parameter`.
        """
        if isinstance(text, int) and not isinstance(text, bool):
            text = str(text)
        text = (text or "").strip() if isinstance(text, str) else text
        if text == "latest":
            return cls(kind="latest")
        if isinstance(text, str) and text.isdigit():
            return cls(kind="step", step=int(text))
        match = _BEST.match(text) if isinstance(text, str) else None
        if not match:
            raise ValueError(
                f"{parameter}: expected 'latest', a step number or 'best:<metric>[:min|max]', received {text!r}"
            )
        metric, mode = match.group(1), match.group(2)
        if mode is None:
            mode = "min" if ("loss" in metric or "error" in metric) else "max"
        return cls(kind="best", metric=metric, mode=mode)


def select_checkpoint(model_dir: str, selection: Selection) -> CheckpointRef:
    """Run the selection task that `selection` asks for."""
    if selection.kind == "latest":
        return select_latest_checkpoint(model_dir)
    if selection.kind == "step":
        return select_checkpoint_at_step(model_dir, selection.step)
    return select_best_checkpoint(model_dir, selection.metric, selection.mode)


def check_aliases(aliases: list[str], parameter: str = "aliases") -> list[str]:
    """MLflow alias names: a letter or `_` first, then letters, digits, `_` or `-`; not `latest` or `v<N>`.

    Raises:
        ValueError: an alias breaks these rules; the message names it.
    """
    for alias in aliases:
        if not isinstance(alias, str) or not _ALIAS.match(alias) or _RESERVED_ALIAS.match(alias):
            raise ValueError(
                f"{parameter}: expected alias names like 'staging' (a letter or '_' first, then letters, "
                f"digits, '_' or '-'; not 'latest' or 'v<N>'), received {alias!r}"
            )
    return list(dict.fromkeys(aliases))


def current_flow_run_id() -> Optional[str]:
    """The id of the Prefect flow run this is called from, or None outside one."""
    from prefect.runtime import flow_run

    return flow_run.id or None
