"""Statistics of a window's columns: what validation checks and drift compares.

Per column: its kind (numeric, or categorical: strings, booleans and the
label), dtype, rows with a value and rows without one (None, NaN, ""),
min/max/mean of numeric columns, value counts of categorical ones, and a
histogram of numeric ones on bin edges. Edges come from the schema
(`FeatureSchema.edges`), so two windows are binned alike; without them a
column gets `default_edges` over its own finite range (what `infer_schema`
keeps for later windows). A histogram over edges `e0 < ... < en` has
`n + 2` counts: below `e0`, the `n` bins `[e_i, e_i+1)` (the last one closed),
and above `en`.

Floats are kept at the precision of their dtype as people read them
(a float32 6.9 is 6.9, not 6.900000095367432), so a schema written from
these statistics does not flag the very values it was inferred from.

Only `statistics_of` imports TensorFlow, and only for a loader without a
`columns` attribute: it reads the loader's `tf.data` split.

Example:
    >>> import numpy as np
    >>> from prefect_tensorflow.tasks.data.source import Columns
    >>> from prefect_tensorflow.tasks.data.statistics import compute_statistics
    >>> stats = compute_statistics(Columns({"x": np.array([1.0, 2.0, np.nan]), "y": np.array(["a", "b", "a"])}, label="y"))
    >>> stats.rows, stats.features["x"].missing, stats.features["x"].max, stats.features["y"].values
    (3, 1, 2.0, {'a': 2, 'b': 1})
    >>> stats.features["x"].histogram
    [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..errors import DataError

if TYPE_CHECKING:
    from .source import Columns, DataSource

Kind = Literal["numeric", "categorical"]
DEFAULT_BINS = 10
LABEL = "label"  # the label's name when it is read from a tf.data split


class FeatureStatistics(BaseModel):
    """The statistics of one column (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: Kind
    dtype: str = Field(description="numpy dtype name, or 'string'")
    count: int = Field(description="Rows with a value")
    missing: int = Field(description="Rows without one (None, NaN, '')")
    min: Optional[float] = None
    max: Optional[float] = None
    mean: Optional[float] = None
    values: dict[str, int] = Field(default_factory=dict, description="Categorical: count of each value")
    histogram: list[int] = Field(default_factory=list, description="Numeric: counts on `edges` (under, bins, over)")
    edges: list[float] = Field(default_factory=list, description="Numeric: the bin edges of `histogram`")

    @property
    def missing_fraction(self) -> float:
        """Missing rows over all rows (0.0 for an empty column)."""
        total = self.count + self.missing
        return self.missing / total if total else 0.0


class WindowStatistics(BaseModel):
    """The statistics of every column of one split of a window; `label` names the label column."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rows: int
    features: dict[str, FeatureStatistics]
    label: str


def default_edges(low: float, high: float, bins: int = DEFAULT_BINS) -> list[float]:
    """`bins` equal-width bins over `[low, high]` (a one-value range is widened by 0.5 each side).

    Example:
        >>> default_edges(1.0, 6.9)
        [1.0, 1.59, 2.18, 2.77, 3.36, 3.95, 4.54, 5.13, 5.72, 6.31, 6.9]
        >>> default_edges(3.0, 3.0, bins=2)
        [2.5, 3.0, 3.5]
    """
    if low == high:
        low, high = low - 0.5, high + 0.5
    return [float(f"{e:.12g}") for e in np.linspace(low, high, bins + 1)]  # 2.77, not 2.7700000000000005: people edit them


def histogram(values: Any, edges: list[float]) -> list[int]:
    """Counts of `values` below `edges[0]`, in each bin (the last one closed), and above `edges[-1]`.

    Example:
        >>> histogram([-1.0, 0.0, 0.5, 1.0, 2.0], [0.0, 0.5, 1.0])
        [1, 1, 2, 1]
    """
    x = np.asarray(values, dtype=np.float64)
    where = np.searchsorted(np.asarray(edges, dtype=np.float64), x, side="right")
    where[x == edges[-1]] = len(edges) - 1  # the top edge belongs to the last bin, not to the overflow
    return [int(c) for c in np.bincount(where, minlength=len(edges) + 1)]


def compute_statistics(columns: Columns, edges: Optional[dict[str, list[float]]] = None) -> WindowStatistics:
    """The statistics of `columns`; numeric histograms on `edges[name]` (default: `default_edges` of the column).

    Raises:
        DataError: columns of different lengths, or a column that is not one value per row.

    Example:
        >>> import numpy as np
        >>> from prefect_tensorflow.tasks.data.source import Columns
        >>> s = compute_statistics(Columns({"x": np.array([0.5, 1.5], np.float32), "y": np.array([0, 1])}, "y"),
        ...                        edges={"x": [0.0, 1.0, 2.0]})
        >>> s.features["x"].histogram, s.features["y"].kind, s.features["y"].values
        ([0, 1, 1, 0], 'categorical', {'0': 1, '1': 1})
    """
    lengths = {name: len(np.asarray(v)) for name, v in columns.values.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"columns: expected one value per row in every column, received lengths {lengths}")
    features = {
        name: column_statistics(name, np.asarray(values), categorical=name == columns.label, edges=(edges or {}).get(name))
        for name, values in columns.values.items()
    }
    return WindowStatistics(rows=next(iter(lengths.values()), 0), features=features, label=columns.label)


def column_statistics(
    name: str, values: Any, *, categorical: bool = False, edges: Optional[list[float]] = None
) -> FeatureStatistics:
    """The statistics of one column; `categorical` counts values of a numeric column (the label).

    Example:
        >>> import numpy as np
        >>> column_statistics("site", np.array(["north", None, "south", ""], dtype=object)).values
        {'north': 1, 'south': 1}
    """
    values = np.asarray(values)
    if values.ndim != 1:
        raise DataError(f"column {name!r}: expected one value per row, received shape {values.shape}")
    dtype, numbers = _kind_of(values)
    if categorical or numbers is None:
        return _categorical(name, values, dtype)
    return _numeric(name, numbers, dtype, edges)


def _kind_of(values: np.ndarray) -> tuple[str, Optional[np.ndarray]]:
    """The column's dtype name, and its values as float64 when it is numeric (None: it is not)."""
    if values.dtype.kind in "iuf":
        return values.dtype.name, values.astype(np.float64)
    if values.dtype.kind == "b":
        return "bool", None
    if values.dtype.kind in "US":
        return "string", None
    present = [v for v in values.tolist() if not _is_missing(v)]
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "float64", np.array([np.nan if _is_missing(v) else v for v in values.tolist()], dtype=np.float64)
    return "string", None


def _is_missing(value: Any) -> bool:
    return value is None or value == "" or value == b"" or (isinstance(value, float) and math.isnan(value))


def _numeric(name: str, numbers: np.ndarray, dtype: str, edges: Optional[list[float]]) -> FeatureStatistics:
    present = numbers[~np.isnan(numbers)]
    finite = present[np.isfinite(present)]
    if edges is None and finite.size:
        edges = default_edges(_as_read(finite.min(), dtype), _as_read(finite.max(), dtype))
    return FeatureStatistics(
        name=name,
        kind="numeric",
        dtype=dtype,
        count=int(present.size),
        missing=int(numbers.size - present.size),
        min=_as_read(present.min(), dtype) if present.size else None,
        max=_as_read(present.max(), dtype) if present.size else None,
        mean=float(finite.mean()) if finite.size else None,
        histogram=histogram(present, edges) if edges else [],
        edges=list(edges or []),
    )


def _as_read(value: float, dtype: str) -> float:
    """`value` as its dtype prints it: float32 6.9 stays 6.9 (see the module docstring)."""
    return float(str(np.float32(value))) if dtype in ("float32", "float16") else float(value)


def _categorical(name: str, values: np.ndarray, dtype: str) -> FeatureStatistics:
    counts: dict[str, int] = {}
    missing = 0
    for value in values.tolist():
        if _is_missing(value):
            missing += 1
            continue
        key = category(value)
        counts[key] = counts.get(key, 0) + 1
    return FeatureStatistics(
        name=name,
        kind="categorical",
        dtype=dtype,
        count=len(values) - missing,
        missing=missing,
        values=dict(sorted(counts.items(), key=lambda kv: natural_key(kv[0]))),
    )


def category(value: Any) -> str:
    """A categorical value as text: bytes decoded, integral floats without `.0` (a label 2.0 is '2').

    Example:
        >>> category(b"north"), category(2.0), category(np.int32(1)), category(True)
        ('north', '2', '1', 'True')
    """
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def natural_key(value: str) -> tuple[int, Any]:
    """Sort key that puts integers in numeric order before other text: 2 before 10, 10 before 'a'.

    Example:
        >>> sorted(["10", "b", "2", "a"], key=natural_key)
        ['2', '10', 'a', 'b']
    """
    try:
        return (0, int(value))
    except ValueError:
        return (1, value)


def statistics_of(source: DataSource, split: str = "train", edges: Optional[dict[str, list[float]]] = None) -> WindowStatistics:
    """The statistics of `split` of `source`: its loader's raw `columns`, else its `tf.data` split.

    A `tf.data` split's features become columns by the loader's `feature_names`
    (else `feature_0`, `feature_1`, ...; a dict of features by its keys); its
    label is the column `label`.

    Raises:
        DataError: naming `data`, when the split's elements are not `(features, label)`.
        TrainingError: the loader raised (see `DataSource`).
    """
    columns = source.columns(split)
    if columns is None:
        columns = _columns_of_split(source, split)
    return compute_statistics(columns, edges)


def _columns_of_split(source: DataSource, split: str) -> Columns:
    from .. import model_code
    from .source import Columns

    dataset = source.load(split)
    names = getattr(model_code.load(source.data, "data"), "feature_names", None)
    features: list[Any] = []
    labels: list[Any] = []
    for element in dataset.batch(4096).as_numpy_iterator():
        if not isinstance(element, tuple) or len(element) != 2:
            raise DataError(f"data {source.data!r}: expected split {split!r} to give (features, label) pairs")
        features.append(element[0])
        labels.append(element[1])
    values = _feature_columns(features, names)
    values[LABEL] = np.concatenate(labels) if labels else np.array([], dtype=np.int64)
    return Columns(values=values, label=LABEL)


def _feature_columns(batches: list[Any], names: Any) -> dict[str, np.ndarray]:
    """Feature batches (a dict of arrays, a `[batch]` array or a `[batch, n]` matrix) as named columns."""
    if not batches:
        return {}
    if isinstance(batches[0], dict):
        return {key: np.concatenate([b[key] for b in batches]).reshape(-1) for key in batches[0]}
    matrix = np.concatenate(batches)
    matrix = matrix.reshape(len(matrix), -1)
    width = matrix.shape[1]
    labels = list(names) if names is not None and len(names) == width else [f"feature_{i}" for i in range(width)]
    return {label: matrix[:, i] for i, label in enumerate(labels)}
