"""The champion gate's rule: does a challenger take `champion`? A pure decision: no TensorFlow, no MLflow.

Both versions are scored on the same eval data by the same code
(`promotion.outcomes`), so each example gives a paired improvement of the
challenger over the champion (in the metric's direction). The rule, stated:
**the challenger is promoted when the lower bound of the `confidence`
interval of its mean improvement on `metric` is above `min_improvement`
(and above `-max_regression` when that is set), no guardrail metric regresses
by more than its margin, no slice by more than `slice_max_regression`, and
every floor holds.** Anything else keeps the champion, with the reason.

States (`GateDecision.state`), each with its reason:

- `first_version`: no champion yet: promoted if its outcomes are finite and
  every floor holds;
- `already_champion`: the challenger is the champion (nothing moves);
- `incomparable`: signatures, output names or label sets differ, or the eval
  data differs (`comparability`): a person decides;
- `kept`: no rule configured ("no rule: champion kept"), non-finite outcomes,
  or a rule not met;
- `promoted`.

Example:
    >>> from prefect_tensorflow.tasks.configs import GateConfig
    >>> from prefect_tensorflow.tasks.promotion.outcomes import Outcomes
    >>> def scored(correct):
    ...     return Outcomes(saved_model_digest="sha256:x", eval_digest="sha256:e", n=len(correct), signature={},
    ...                     labels=[0.0] * len(correct), per_example={"accuracy": correct}, finite=True)
    >>> d = decide_gate(scored([1.0] * 29 + [0.0]), scored([1.0] * 27 + [0.0] * 3), GateConfig(),
    ...                 challenger_version=3, champion_version=2)
    >>> d.state, d.reason
    ('kept', "accuracy 0.967 vs champion v2's 0.900: +0.067 [95% CI +0.000, +0.167] does not clear min_improvement 0")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..configs import GateConfig
from ..errors import GateError
from ..metric_order import Mode, default_mode
from ..promotion.outcomes import Outcomes
from ..promotion.paired import improvements, mcnemar, paired_interval

GateState = Literal["first_version", "promoted", "kept", "incomparable", "already_champion"]
ZERO_ONE_METRICS = ("accuracy", "error")  # per-example 0/1: McNemar's p-value is recorded beside the interval
_ROUNDING = 1e-12  # point estimates equal to a margin, up to float rounding of the means, pass


class RuleCheck(BaseModel):
    """One line of a decision: the primary rule, a guardrail, a slice or a floor, and whether it passed."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="'primary', 'guardrail', 'slice <name>' or 'floor'")
    metric: str
    challenger_value: Optional[float]
    champion_value: Optional[float] = None
    difference: Optional[float] = Field(default=None, description="Improvement of the challenger (positive: better)")
    interval: Optional[tuple[float, float]] = None
    threshold: Optional[float] = None
    passed: bool
    gating: bool = True
    reason: str


class GateDecision(BaseModel):
    """Whether `champion` moves to the challenger, in which state, on which figures, and why."""

    model_config = ConfigDict(frozen=True)

    state: GateState = Field(default="kept", description="Left out (a record older than states): from `promoted`")
    promoted: bool
    reason: str
    metric: Optional[str]
    mode: Mode
    challenger_version: int
    champion_version: Optional[int] = Field(description="The champion before the decision; None if there was none")
    challenger_value: Optional[float]
    champion_value: Optional[float]
    difference: Optional[float] = None
    interval: Optional[tuple[float, float]] = None
    confidence: float = 0.95
    method: Optional[str] = None
    p_value: Optional[float] = None
    checks: list[RuleCheck] = []
    eval_digest: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _state_of_older_records(cls, data: Any) -> Any:
        """A decision recorded before states existed: "promoted" or "kept" from `promoted`."""
        if isinstance(data, dict) and "state" not in data and "promoted" in data:
            data = {**data, "state": "promoted" if data["promoted"] else "kept"}
        return data


def comparability(challenger: Outcomes, champion: Outcomes) -> Optional[str]:
    """None if the two outcomes can be compared example by example, else why not.

    They must come from the same eval data (digest), the same head, signatures
    with the same input names and dtypes and the same output names, dtypes and
    shapes (a renamed output or another number of classes is incomparable).

    Example:
        >>> a = Outcomes(saved_model_digest="s", eval_digest="e", n=1, signature={"outputs": {"y": ["float32", [None, 3]]}},
        ...              labels=[0.0], per_example={}, finite=True)
        >>> comparability(a, a) is None
        True
        >>> comparability(a, a.model_copy(update={"signature": {"outputs": {"scores": ["float32", [None, 3]]}}}))
        "output names differ: challenger ['y'], champion ['scores']"
    """
    if challenger.eval_digest != champion.eval_digest:
        return f"scored on different eval data: challenger {challenger.eval_digest}, champion {champion.eval_digest}"
    if challenger.head != champion.head:
        return f"heads differ: challenger {challenger.head}, champion {champion.head}"
    for side in ("inputs", "outputs"):
        ours, theirs = challenger.signature.get(side, {}), champion.signature.get(side, {})
        noun = side[:-1]
        if sorted(ours) != sorted(theirs):
            return f"{noun} names differ: challenger {sorted(ours)}, champion {sorted(theirs)}"
        for name in sorted(ours):
            (dtype, shape), (their_dtype, their_shape) = ours[name], theirs[name]
            if dtype != their_dtype:
                return f"{noun} {name!r} dtypes differ: challenger {dtype}, champion {their_dtype}"
            if side == "outputs" and _non_batch(shape) != _non_batch(their_shape):
                what = "label sets differ (number of classes)" if name in ("probabilities", "logits") else "shapes differ"
                return f"output {name!r} {what}: challenger {shape}, champion {their_shape}"
    if challenger.labels != champion.labels:
        return "label sets differ: the two were scored against different labels"
    return None


def _non_batch(shape: Any) -> Any:
    return None if shape is None else list(shape[1:])


def decide_gate(
    challenger: Outcomes,
    champion: Optional[Outcomes],
    config: GateConfig,
    *,
    challenger_version: int,
    champion_version: Optional[int],
) -> GateDecision:
    """Decide whether the challenger takes `champion` (see the module docstring for the rule and the states).

    Args:
        challenger: the challenger's outcomes on the eval set.
        champion: the champion's outcomes on the same eval set; None if there is no champion.
        config: the rule.
        challenger_version, champion_version: their registry versions (champion None: no champion).

    Raises:
        GateError: a metric of the config (`gate.metric`, `gate.guardrails`, `gate.floors`) that the head
            does not compute.

    Example:
        >>> from prefect_tensorflow.tasks.promotion.outcomes import Outcomes
        >>> o = Outcomes(saved_model_digest="s", eval_digest="e", n=2, signature={}, labels=[0.0, 1.0],
        ...              per_example={"accuracy": [1.0, 1.0]}, finite=True)
        >>> decide_gate(o, None, GateConfig(floors={"accuracy": 0.9}), challenger_version=1, champion_version=None).reason
        'first version: no champion yet; floor accuracy >= 0.9: 1.000 holds'
    """
    metric, mode = config.metric, config.mode or default_mode(config.metric)
    base = _Base(metric, mode, challenger_version, champion_version, config.confidence, challenger.eval_digest)
    for name in [metric, *config.guardrails, *config.floors]:
        if name is not None:
            challenger.values(name)  # a metric the head does not compute fails here, naming it
    if metric is not None:
        challenger_value = _finite_or_none(challenger.value(metric))
        champion_value = _finite_or_none(champion.value(metric)) if champion is not None else None
    else:
        challenger_value = champion_value = None
    base = replace(base, challenger_value=challenger_value, champion_value=champion_value)

    if not challenger.finite:
        where = ", ".join(challenger.non_finite_outputs) or "its per-example outcomes"
        return base.decide(
            "kept", f"challenger v{challenger_version}'s outcomes are not finite (NaN or inf in {where}): never promoted"
        )
    floors = [_floor(challenger, name, limit) for name, limit in config.floors.items()]
    if champion is None or champion_version is None:
        return _first_version(base, floors)
    if champion_version == challenger_version:
        return base.decide("already_champion", "already champion", promoted=True, checks=floors)
    why = comparability(challenger, champion)
    if why is not None:
        return base.decide("incomparable", f"incomparable with champion v{champion_version}: {why}")
    if metric is None or (config.min_improvement is None and config.max_regression is None):
        what = "gate.metric is None" if metric is None else "neither min_improvement nor max_regression is set"
        return base.decide("kept", f"no rule: champion kept ({what})", checks=floors)
    if not champion.finite:
        primary = RuleCheck(
            name="primary",
            metric=metric,
            challenger_value=challenger_value,
            passed=True,
            reason=f"champion v{champion_version}'s outcomes are not finite: any finite challenger is better",
        )
        return _conclude(base, primary, [], floors, p_value=None, method=None)

    interval = paired_interval(
        challenger.values(metric),
        champion.values(metric),
        mode=mode,
        confidence=config.confidence,
        samples=config.bootstrap_samples,
    )
    primary = _primary(metric, mode, challenger_value, champion_value, champion_version, interval, config)
    p_value = mcnemar(challenger.values(metric), champion.values(metric)) if metric in ZERO_ONE_METRICS else None
    others = [_guardrail(challenger, champion, name, margin) for name, margin in config.guardrails.items()]
    others += _slices(challenger, champion, metric, mode, config.slice_max_regression)
    return _conclude(base, primary, others, floors, p_value=p_value, method=interval.method, interval=interval)


@dataclass(frozen=True)
class _Base:
    """What every decision holds, whatever its state."""

    metric: Optional[str]
    mode: Mode
    challenger_version: int
    champion_version: Optional[int]
    confidence: float
    eval_digest: Optional[str]
    challenger_value: Optional[float] = None
    champion_value: Optional[float] = None

    def decide(
        self, state: GateState, reason: str, *, promoted: bool = False, checks: Optional[list[RuleCheck]] = None, **figures: Any
    ) -> GateDecision:
        return GateDecision(
            state=state,
            promoted=promoted,
            reason=reason,
            metric=self.metric,
            mode=self.mode,
            challenger_version=self.challenger_version,
            champion_version=self.champion_version,
            challenger_value=self.challenger_value,
            champion_value=self.champion_value,
            confidence=self.confidence,
            checks=checks or [],
            eval_digest=self.eval_digest,
            **figures,
        )


def _first_version(base: _Base, floors: list[RuleCheck]) -> GateDecision:
    failed = [c for c in floors if not c.passed]
    reason = "first version: no champion yet"
    if floors:
        reason += "; " + "; ".join(c.reason for c in (failed or floors))
    return base.decide("first_version", reason, promoted=not failed, checks=floors)


def _conclude(
    base: _Base,
    primary: RuleCheck,
    others: list[RuleCheck],
    floors: list[RuleCheck],
    *,
    p_value: Optional[float],
    method: Optional[str],
    interval: Any = None,
) -> GateDecision:
    checks = [primary, *others, *floors]
    blocking = [c for c in [*others, *floors] if c.gating and not c.passed]
    promoted = primary.passed and not blocking
    reason = primary.reason
    if primary.passed and blocking:
        reason += "; kept: " + "; ".join(c.reason for c in blocking)
    return base.decide(
        "promoted" if promoted else "kept",
        reason,
        promoted=promoted,
        checks=checks,
        difference=None if interval is None else interval.estimate,
        interval=None if interval is None else (interval.low, interval.high),
        method=method,
        p_value=p_value,
    )


def _primary(
    metric: str,
    mode: Mode,
    challenger_value: Optional[float],
    champion_value: Optional[float],
    champion_version: int,
    interval: Any,
    config: GateConfig,
) -> RuleCheck:
    rules = []  # (name, threshold the lower bound must exceed, its shown value)
    if config.min_improvement is not None:
        rules.append(("min_improvement", config.min_improvement, config.min_improvement))
    if config.max_regression is not None:
        rules.append(("max_regression", -config.max_regression, config.max_regression))
    failed = [(name, shown) for name, bound, shown in rules if not interval.low > bound]
    cleared = [(name, shown) for name, bound, shown in rules if interval.low > bound]
    direction = " (lower is better)" if mode == "min" else ""
    percent = f"{config.confidence * 100:g}%"
    figures = (
        f"{metric} {_value(challenger_value)} vs champion v{champion_version}'s {_value(champion_value)}{direction}: "
        f"{_signed(interval.estimate)} [{percent} CI {_signed(interval.low)}, {_signed(interval.high)}]"
    )
    listed = " and ".join(f"{name} {shown:g}" for name, shown in (failed or cleared))
    reason = f"{figures} {'does not clear' if failed else 'clears'} {listed}"
    return RuleCheck(
        name="primary",
        metric=metric,
        challenger_value=challenger_value,
        champion_value=champion_value,
        difference=interval.estimate,
        interval=(interval.low, interval.high),
        threshold=max(bound for _, bound, _ in rules),
        passed=not failed,
        reason=reason,
    )


def _guardrail(challenger: Outcomes, champion: Outcomes, metric: str, margin: float) -> RuleCheck:
    mode = default_mode(metric)
    ours, theirs = challenger.value(metric), champion.value(metric)
    estimate = float(improvements(challenger.values(metric), champion.values(metric), mode).mean())
    passed = bool(math.isfinite(estimate) and estimate >= -margin - _ROUNDING)
    verdict = "within" if passed else "regresses more than"
    return RuleCheck(
        name="guardrail",
        metric=metric,
        challenger_value=_finite_or_none(ours),
        champion_value=_finite_or_none(theirs),
        difference=estimate,
        threshold=-margin,
        passed=passed,
        reason=f"guardrail {metric} {_value(ours)} vs {_value(theirs)}: {_signed(estimate)} {verdict} the allowed regression {margin:g}",
    )


def _slices(challenger: Outcomes, champion: Outcomes, metric: str, mode: Mode, margin: Optional[float]) -> list[RuleCheck]:
    d = improvements(challenger.values(metric), champion.values(metric), mode)
    ours, theirs = np.asarray(challenger.values(metric)), np.asarray(champion.values(metric))
    checks = []
    for name, indices in sorted(challenger.slices.items()):
        index = np.asarray([i for i in indices if 0 <= i < challenger.n], dtype=np.int64)
        if index.size == 0:
            continue
        estimate = float(d[index].mean())
        # not gating (margin None): passed says whether the slice did not regress at all
        ok = bool(math.isfinite(estimate) and estimate >= -(margin or 0.0) - _ROUNDING)
        figures = f"slice {name} ({index.size} examples): {metric} {_value(ours[index].mean())} vs {_value(theirs[index].mean())}: {_signed(estimate)}"
        if margin is None:
            verdict = "shown, not gating"
        else:
            verdict = f"within slice_max_regression {margin:g}" if ok else f"regresses more than slice_max_regression {margin:g}"
        checks.append(
            RuleCheck(
                name=f"slice {name}",
                metric=metric,
                challenger_value=_finite_or_none(float(ours[index].mean())),
                champion_value=_finite_or_none(float(theirs[index].mean())),
                difference=estimate,
                threshold=None if margin is None else -margin,
                passed=ok,
                gating=margin is not None,
                reason=f"{figures} ({verdict})",
            )
        )
    return checks


def _floor(challenger: Outcomes, metric: str, limit: float) -> RuleCheck:
    mode = default_mode(metric)
    value = challenger.value(metric)
    passed = bool(math.isfinite(value) and (value >= limit if mode == "max" else value <= limit))
    sign = ">=" if mode == "max" else "<="
    return RuleCheck(
        name="floor",
        metric=metric,
        challenger_value=_finite_or_none(value),
        threshold=limit,
        passed=passed,
        reason=f"floor {metric} {sign} {limit:g}: {_value(value)} {'holds' if passed else 'fails'}",
    )


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def _value(value: Optional[float]) -> str:
    if value is None or not math.isfinite(value):
        return "nan" if value is not None else "none"
    return f"{value:.3f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3g}"


def _signed(value: float) -> str:
    if not math.isfinite(value):
        return "nan"
    text = f"{value:+.3f}" if value == 0 or abs(value) >= 1e-3 else f"{value:+.3g}"
    return "+0.000" if text == "-0.000" else text


__all__ = ["GateDecision", "GateError", "GateState", "RuleCheck", "comparability", "decide_gate"]
