"""Drift: how far a window's distributions moved from a baseline window's, with TFDV's formulas. Pure numpy.

Why our own code: TFDV (TensorFlow Data Validation) cannot be installed
beside TensorFlow 2.21 (each release pins its TensorFlow and Apache Beam),
and pandera validates a dataframe's values but measures no drift. The two
measures are a few lines each, so they are written here after TFDV's own
implementation (`tensorflow_data_validation/anomalies/metrics.cc`) and its
drift comparators:

- categorical columns, the label among them: the L-infinity distance between
  the two windows' value frequencies, each normalized by its own total:
  `max over values v of |p(v) - q(v)|` (a value absent from one window has
  frequency 0 there); in [0, 1].
- numeric columns: the Jensen-Shannon divergence, base 2, between the two
  histograms on the same bin edges (the schema's), each normalized:
  `JSD = (KL(P||M) + KL(Q||M)) / 2`, `M = (P + Q) / 2`,
  `KL(P||M) = sum over bins with P > 0 of P log2(P / M)`, capped at 1 as
  TFDV does; 0 for identical histograms, 1 for disjoint ones. Missing values
  are left out (the missing rate is validation's concern).

A measure above its column's `drift_threshold` (schema; default 0.1, TFDV's
usual setting) marks the column `exceeded`. Drift never blocks a run: it is
recorded (tags, the champion gate's context). A column that cannot be
compared (absent from a window, no values, histograms on different edges)
is listed in `skipped` with the reason.

Example:
    >>> jensen_shannon([1, 0], [0, 1]), jensen_shannon([3, 1], [6, 2]), l_infinity({"a": 1, "b": 1}, {"a": 3, "b": 1})
    (1.0, 0.0, 0.25)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .schema import DataSchema
from .statistics import FeatureStatistics, WindowStatistics

Measure = Literal["l_infinity", "jensen_shannon"]


class FeatureDrift(BaseModel):
    """The drift of one column: the `measure`, its `value`, the column's `threshold`, and whether it `exceeded` it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    feature: str
    measure: Measure
    value: float
    threshold: float
    exceeded: bool


class DriftReport(BaseModel):
    """The drift of every comparable column of a window `against` a baseline (e.g. "previous", "champion")."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    against: str
    features: list[FeatureDrift]
    skipped: dict[str, str] = Field(default_factory=dict, description="Column -> why it was not compared")

    @property
    def max(self) -> float:
        """The largest drift of any column (0.0 when none was compared)."""
        return max((f.value for f in self.features), default=0.0)

    @property
    def exceeded(self) -> list[str]:
        """The columns whose drift is above their threshold (empty: none)."""
        return [f.feature for f in self.features if f.exceeded]


def l_infinity(counts_a: dict[str, int], counts_b: dict[str, int]) -> float:
    """The L-infinity distance between two value counts, each normalized by its own total.

    Example:
        >>> l_infinity({"north": 30, "south": 30}, {"north": 30, "south": 20, "east": 10})
        0.16666666666666669
    """
    total_a, total_b = sum(counts_a.values()), sum(counts_b.values())
    if not total_a or not total_b:
        raise ValueError("l_infinity: expected two non-empty value counts")
    return max(abs(counts_a.get(v, 0) / total_a - counts_b.get(v, 0) / total_b) for v in set(counts_a) | set(counts_b))


def jensen_shannon(histogram_a: Sequence[float], histogram_b: Sequence[float]) -> float:
    """The Jensen-Shannon divergence (base 2, capped at 1) between two histograms on the same bins.

    Example:
        >>> round(jensen_shannon([1, 1], [1, 0]), 4)
        0.3113
    """
    p, q = np.asarray(histogram_a, dtype=np.float64), np.asarray(histogram_b, dtype=np.float64)
    if p.shape != q.shape or not p.sum() or not q.sum():
        raise ValueError(
            f"jensen_shannon: expected two non-empty histograms on the same bins, received {len(p)} and {len(q)} bins"
        )
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    return min(1.0, float((_kl(p, m) + _kl(q, m)) / 2))


def _kl(p: np.ndarray, m: np.ndarray) -> float:
    """KL(P||M) in bits over the bins where P > 0 (there M > 0 too)."""
    where = p > 0
    return float(np.sum(p[where] * np.log2(p[where] / m[where])))


def measure_drift(current: WindowStatistics, baseline: WindowStatistics, schema: DataSchema, against: str) -> DriftReport:
    """The drift of `current` from `baseline`, column by column in the schema's order.

    Both statistics should be computed on the schema's edges (`compute_statistics(columns, schema.edges())`).

    Example:
        >>> import numpy as np
        >>> from prefect_tensorflow.tasks.data.source import Columns
        >>> from prefect_tensorflow.tasks.data.schema import infer_schema
        >>> from prefect_tensorflow.tasks.data.statistics import compute_statistics
        >>> before = compute_statistics(Columns({"x": np.array([0.0, 1.0]), "y": np.array(["a", "b"])}, "y"))
        >>> schema = infer_schema(before)
        >>> after = compute_statistics(Columns({"x": np.array([0.0, 0.0]), "y": np.array(["a", "a"])}, "y"), schema.edges())
        >>> report = measure_drift(after, before, schema, against="previous")
        >>> [(f.feature, f.measure, round(f.value, 3), f.exceeded) for f in report.features], report.exceeded
        ([('x', 'jensen_shannon', 0.311, True), ('y', 'l_infinity', 0.5, True)], ['x', 'y'])
    """
    features: list[FeatureDrift] = []
    skipped: dict[str, str] = {}
    for expected in schema.features:
        now, before = current.features.get(expected.name), baseline.features.get(expected.name)
        if now is None or before is None:
            skipped[expected.name] = f"not in the {'current' if now is None else 'baseline'} window"
            continue
        categorical = expected.kind == "categorical" or expected.name == schema.label
        measured, reason = _measure(now, before, categorical)
        if measured is None:
            skipped[expected.name] = reason
            continue
        threshold = expected.drift_threshold
        features.append(
            FeatureDrift(
                feature=expected.name,
                measure="l_infinity" if categorical else "jensen_shannon",
                value=measured,
                threshold=threshold,
                exceeded=measured > threshold,
            )
        )
    return DriftReport(against=against, features=features, skipped=skipped)


def _measure(now: FeatureStatistics, before: FeatureStatistics, categorical: bool) -> tuple[Optional[float], str]:
    """The drift of one column, or None and why it cannot be measured."""
    if categorical:
        if not now.values or not before.values:
            return None, "no values in one of the windows"
        return l_infinity(now.values, before.values), ""
    if not now.histogram or not before.histogram or not sum(now.histogram) or not sum(before.histogram):
        return None, "no histogram in one of the windows"
    if now.edges != before.edges:
        return None, "histograms on different bin edges (compute both on the schema's edges)"
    return jensen_shannon(now.histogram, before.histogram), ""
