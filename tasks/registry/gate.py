"""The champion gate's rule: does a new version take `champion`? A pure decision, no MLflow.

The inputs are two metric records, the challenger's (the new version and
its value of the gate metric) and the champion's (its version and the value
recorded on it, or no champion at all), and the `GateConfig` (metric and
mode). The answer is a `GateDecision` with its reason, in one of these
states:

- first version: there is no champion yet -> promoted;
- already champion: the challenger is the champion -> promoted (nothing moves);
- no gate metric (`GateConfig(metric=None)`) -> kept;
- the champion has no recorded value of the metric -> promoted;
- the challenger is `better` (`metric_order`) -> promoted; otherwise (a tie
  included) -> kept.

`model_versions.decide_champion` reads the champion from the registry, calls
`decide_gate` and moves the alias; changing the rule is a change here.

Example:
    >>> from prefect_tensorflow.tasks.configs import GateConfig
    >>> from prefect_tensorflow.tasks.registry.gate import MetricRecord, decide_gate
    >>> decision = decide_gate(MetricRecord(3, 0.2), MetricRecord(2, 0.3), GateConfig(metric="loss"))
    >>> decision.promoted, decision.reason
    (True, "loss 0.2 beats champion v2's 0.3 (min)")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from ..configs import GateConfig
from ..metric_order import Mode, better, default_mode


class GateDecision(BaseModel):
    """Whether `champion` moved to the new version, and on which figures."""

    model_config = ConfigDict(frozen=True)

    metric: Optional[str]
    mode: Mode
    challenger_version: int
    challenger_value: Optional[float]
    champion_version: Optional[int] = Field(description="The champion before the decision; None if there was none")
    champion_value: Optional[float]
    promoted: bool
    reason: str


@dataclass(frozen=True)
class MetricRecord:
    """A registered version and its value of the gate metric (None: not recorded, or no gate metric)."""

    version: int
    value: Optional[float]


def decide_gate(challenger: MetricRecord, champion: Optional[MetricRecord], config: GateConfig) -> GateDecision:
    """Whether `challenger` takes `champion` from `champion` (None: there is no champion), and why.

    Example:
        >>> from prefect_tensorflow.tasks.configs import GateConfig
        >>> decide_gate(MetricRecord(1, 0.9), None, GateConfig()).reason
        'first version: no champion yet'
    """
    metric = config.metric
    mode = config.mode or default_mode(metric)
    value = challenger.value
    champion_value = champion.value if champion is not None and metric is not None else None
    if champion is None:
        promoted, reason = True, "first version: no champion yet"
    elif champion.version == challenger.version:
        promoted, reason = True, "already champion"
    elif metric is None:
        promoted, reason = False, "no gate metric: champion stays"
    elif champion_value is None:
        promoted, reason = True, f"champion v{champion.version} has no recorded {metric}"
    elif value is not None and better(value, champion_value, mode):
        promoted, reason = True, f"{metric} {value:.6g} beats champion v{champion.version}'s {champion_value:.6g} ({mode})"
    else:
        shown = "none" if value is None else f"{value:.6g}"
        promoted, reason = (
            False,
            f"{metric} {shown} does not beat champion v{champion.version}'s {champion_value:.6g} ({mode})",
        )
    return GateDecision(
        metric=metric,
        mode=mode,
        challenger_version=challenger.version,
        challenger_value=value,
        champion_version=champion.version if champion is not None else None,
        champion_value=champion_value,
        promoted=promoted,
        reason=reason,
    )
