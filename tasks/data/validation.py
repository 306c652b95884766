"""Anomalies: where a window's statistics break its schema. Pure: statistics and a schema in, a list out.

The kinds (after TFDV's anomaly types, those a training run must not go past):

- `missing_column`: a column of the schema is not in the window;
- `dtype`: a column holds another kind of value (text where numbers were,
  fractions in an integer column);
- `new_category`: a categorical value outside the column's vocabulary;
- `out_of_range`: a numeric value below `min` or above `max` (infinities too);
- `missing_rate`: more missing values than `max_missing_fraction`;
- `unknown_label`: a label value outside `label_values`;
- `too_few_rows`: fewer rows than `min_rows`.

Columns the schema does not name are not checked (a loader may read more).

Example:
    >>> import numpy as np
    >>> from prefect_tensorflow.tasks.data.source import Columns
    >>> from prefect_tensorflow.tasks.data.schema import infer_schema
    >>> from prefect_tensorflow.tasks.data.statistics import compute_statistics
    >>> first = compute_statistics(Columns({"site": np.array(["north", "south"]), "y": np.array([0, 1])}, "y"))
    >>> later = compute_statistics(Columns({"site": np.array(["east", "south"]), "y": np.array([0, 1])}, "y"))
    >>> [str(a) for a in find_anomalies(later, infer_schema(first))]
    ["site: new category 'east' (vocabulary: north, south)"]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from .schema import DataSchema, FeatureSchema
from .statistics import FeatureStatistics, WindowStatistics, natural_key

AnomalyKind = Literal["missing_column", "dtype", "new_category", "out_of_range", "missing_rate", "unknown_label", "too_few_rows"]
ROWS = "rows"  # the `feature` of a too_few_rows anomaly
SHOWN = 5  # values named in one line


class Anomaly(BaseModel):
    """One way a window breaks its schema: the column (`feature`), the `kind`, what was found, what was expected."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    feature: str
    kind: AnomalyKind
    value: str
    expected: str

    def __str__(self) -> str:
        if self.kind in ("missing_column", "out_of_range"):  # the value says it all
            return f"{self.feature}: {self.value}"
        return f"{self.feature}: {self.value} ({self.expected})"


def find_anomalies(stats: WindowStatistics, schema: DataSchema) -> list[Anomaly]:
    """Every anomaly of `stats` against `schema`, column by column in the schema's order, rows last.

    Example:
        >>> from prefect_tensorflow.tasks.data.schema import DataSchema, FeatureSchema
        >>> from prefect_tensorflow.tasks.data.statistics import FeatureStatistics, WindowStatistics
        >>> schema = DataSchema(features=[FeatureSchema(name="y", kind="categorical", dtype="int64")],
        ...                     label="y", label_values=["0", "1"], min_rows=10)
        >>> y = FeatureStatistics(name="y", kind="categorical", dtype="int64", count=3, missing=0, values={"0": 2, "7": 1})
        >>> for a in find_anomalies(WindowStatistics(rows=3, features={"y": y}, label="y"), schema):
        ...     print(a.kind, "|", a)
        unknown_label | y: unknown label '7' (label values: 0, 1)
        too_few_rows | rows: 3 rows (expected at least 10: the schema's min_rows)
    """
    found: list[Anomaly] = []
    for expected in schema.features:
        stat = stats.features.get(expected.name)
        if stat is None:
            found.append(
                Anomaly(feature=expected.name, kind="missing_column", value="column missing", expected="a column of the schema")
            )
            continue
        is_label = expected.name == schema.label
        found.extend(_column_anomalies(stat, expected, schema.label_values if is_label else None))
    if stats.rows < schema.min_rows:
        found.append(
            Anomaly(
                feature=ROWS,
                kind="too_few_rows",
                value=f"{stats.rows} rows",
                expected=f"expected at least {schema.min_rows}: the schema's min_rows",
            )
        )
    return found


def _column_anomalies(stat: FeatureStatistics, expected: FeatureSchema, label_values: Sequence[str] | None) -> list[Anomaly]:
    name = expected.name
    if _wrong_type(stat, expected):
        return [Anomaly(feature=name, kind="dtype", value=f"dtype {stat.dtype}", expected=f"expected {expected.dtype}")]
    found = []
    rate = stat.missing_fraction
    if rate > expected.max_missing_fraction:
        found.append(
            Anomaly(
                feature=name,
                kind="missing_rate",
                value=f"{_percent(rate)} missing",
                expected=f"max {_percent(expected.max_missing_fraction)}",
            )
        )
    if label_values is not None:
        unknown = _outside(stat.values, label_values)
        if unknown:
            found.append(
                Anomaly(
                    feature=name,
                    kind="unknown_label",
                    value=f"unknown label {unknown}",
                    expected=f"label values: {', '.join(label_values)}",
                )
            )
    elif expected.kind == "categorical" and expected.vocabulary is not None:
        new = _outside(stat.values, expected.vocabulary)
        if new:
            word = "categories" if "," in new else "category"
            found.append(
                Anomaly(
                    feature=name,
                    kind="new_category",
                    value=f"new {word} {new}",
                    expected=f"vocabulary: {', '.join(expected.vocabulary)}",
                )
            )
    if expected.kind == "numeric" and stat.kind == "numeric":
        bounds = f"range [{_number(expected.min)}, {_number(expected.max)}]"
        if expected.min is not None and stat.min is not None and stat.min < expected.min:
            found.append(
                Anomaly(
                    feature=name,
                    kind="out_of_range",
                    value=f"{_number(stat.min)} below min {_number(expected.min)}",
                    expected=bounds,
                )
            )
        if expected.max is not None and stat.max is not None and stat.max > expected.max:
            found.append(
                Anomaly(
                    feature=name,
                    kind="out_of_range",
                    value=f"{_number(stat.max)} above max {_number(expected.max)}",
                    expected=bounds,
                )
            )
    return found


def _wrong_type(stat: FeatureStatistics, expected: FeatureSchema) -> bool:
    """Text where numbers were, or fractions where integers were (an int column read as float is fine
    while its values are whole: the label column is counted as categories, so '2.5' is not '2')."""
    if expected.kind == "numeric":
        if stat.kind != "numeric":
            return True
        return expected.dtype.startswith(("int", "uint")) and stat.dtype.startswith("float") and not _whole(stat)
    return expected.dtype == "string" and stat.dtype != "string" and stat.kind == "numeric"


def _whole(stat: FeatureStatistics) -> bool:
    return all(v is None or float(v).is_integer() for v in (stat.min, stat.max, stat.mean))


def _outside(counts: dict[str, int], allowed: Sequence[str]) -> str:
    """The values of `counts` not in `allowed`, quoted, the first `SHOWN` of them ('' if none)."""
    outside = sorted(set(counts) - set(allowed), key=natural_key)
    shown = ", ".join(repr(v) for v in outside[:SHOWN])
    return shown + (f" (+{len(outside) - SHOWN} more)" if len(outside) > SHOWN else "")


def _number(value: float | None) -> str:
    """37.5 -> '37.5', 7.0 -> '7', None -> 'none'."""
    return "none" if value is None else f"{value:.10g}"


def _percent(fraction: float) -> str:
    """0.4 -> '40%', 0.005 -> '0.5%', 1/3 -> '33.3%'."""
    return f"{fraction * 100:.3g}%"


def block_message(source_label: str, anomalies: Sequence[Anomaly]) -> str:
    """Why a window is not trained on: a header naming the data, then one line per anomaly.

    Example:
        >>> a = Anomaly(feature="petal_length", kind="out_of_range", value="37.5 above max 6.9", expected="range [1, 6.9]")
        >>> print(block_message("data 'partitioned' [2026-11-30, 2026-12-01)", [a]))
        data 'partitioned' [2026-11-30, 2026-12-01): 1 anomaly against the data schema; nothing was trained:
          petal_length: 37.5 above max 6.9
    """
    count = f"{len(anomalies)} anomal{'y' if len(anomalies) == 1 else 'ies'}"
    lines = [f"{source_label}: {count} against the data schema; nothing was trained:"]
    lines.extend(f"  {a}" for a in anomalies)
    return "\n".join(lines)
