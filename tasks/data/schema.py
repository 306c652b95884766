"""The data schema: the contract a window must keep to be trained on, in `<model dir>/data-schema.json`.

It is inferred from the first window (`infer_schema`) and then belongs to
people: the file is pretty-printed JSON with sorted keys, so it can be edited
and reviewed. What each entry means:

- `features`: one entry per column (the label's too), with `name`, `kind`
  (`numeric` or `categorical`), `dtype`, numeric `min` / `max` (a value
  outside them is an anomaly: no margin is added, widen them by hand),
  categorical `vocabulary` (a value outside it is an anomaly; the label's
  values are `label_values` instead), `max_missing_fraction` (0.0 when the
  first window had no missing value, else twice its rate, at most 1), numeric
  `edges` (the histogram bins drift is measured on: 10 equal-width bins over
  the first window's range, plus everything below and above) and
  `drift_threshold` (0.1; drift is recorded, it never blocks);
- `label`, `label_values`: the label column and the values it may take;
- `min_rows`: fewer rows in a window is an anomaly (half the first window's);
- `version`: the file's format (1).

An unknown key, a missing one or a wrong value is a `DataError` naming the
file and the key, so a typo in a hand edit does not silently check nothing.

Example:
    >>> import numpy as np
    >>> from prefect_tensorflow.tasks.data.source import Columns
    >>> from prefect_tensorflow.tasks.data.statistics import compute_statistics
    >>> stats = compute_statistics(Columns({"x": np.array([1.0, 3.0]), "y": np.array(["a", "b"])}, label="y"))
    >>> schema = infer_schema(stats)
    >>> schema.feature("x").min, schema.feature("x").max, schema.label_values, schema.min_rows
    (1.0, 3.0, ['a', 'b'], 1)
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import DataError
from ..storage.locations import parse_location
from ..storage.stores import object_store
from .statistics import WindowStatistics, natural_key

SCHEMA_FILE = "data-schema.json"
DEFAULT_DRIFT_THRESHOLD = 0.1
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class FeatureSchema(BaseModel):
    """What one column must be (see the module docstring for each key)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    kind: Literal["numeric", "categorical"]
    dtype: str = Field(min_length=1)
    min: Optional[float] = None
    max: Optional[float] = None
    vocabulary: Optional[list[str]] = None
    max_missing_fraction: Fraction = 0.0
    edges: Optional[list[float]] = None
    drift_threshold: Fraction = DEFAULT_DRIFT_THRESHOLD

    @model_validator(mode="after")
    def _consistent(self) -> FeatureSchema:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"expected min <= max, received min {self.min} and max {self.max}")
        if self.edges is not None and (len(self.edges) < 2 or any(b <= a for a, b in zip(self.edges, self.edges[1:]))):
            raise ValueError(f"edges: expected at least 2 increasing numbers, received {self.edges}")
        return self


class DataSchema(BaseModel):
    """The contract of a window: its columns, label values and minimum rows (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    features: list[FeatureSchema]
    label: str = Field(min_length=1)
    label_values: list[str]
    min_rows: int = Field(default=1, ge=0)
    version: Literal[1] = 1

    @model_validator(mode="after")
    def _consistent(self) -> DataSchema:
        names = [f.name for f in self.features]
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ValueError(f"features: expected each name once, received {', '.join(doubled)} more than once")
        if self.label not in names:
            raise ValueError(f"label: expected one of the features' names ({', '.join(names)}), received {self.label!r}")
        return self

    def feature(self, name: str) -> FeatureSchema:
        """The entry of column `name` (KeyError if none)."""
        for entry in self.features:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def edges(self) -> dict[str, list[float]]:
        """Column -> histogram edges, for `compute_statistics` (so every window is binned alike)."""
        return {f.name: list(f.edges) for f in self.features if f.edges is not None}

    def to_json(self) -> str:
        """The file's text: pretty-printed, keys sorted, keys without a value (None) left out."""
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2, sort_keys=True) + "\n"


def infer_schema(stats: WindowStatistics) -> DataSchema:
    """The schema a first window implies (see the module docstring for each default).

    Example:
        >>> import numpy as np
        >>> from prefect_tensorflow.tasks.data.source import Columns
        >>> from prefect_tensorflow.tasks.data.statistics import compute_statistics
        >>> stats = compute_statistics(Columns({"s": np.array(["n", None, "s", "s"], dtype=object), "y": np.array([1, 0, 1, 1])}, "y"))
        >>> schema = infer_schema(stats)
        >>> schema.feature("s").vocabulary, schema.feature("s").max_missing_fraction, schema.label_values
        (['n', 's'], 0.5, ['0', '1'])
    """
    features = []
    for stat in stats.features.values():
        is_label = stat.name == stats.label
        features.append(
            FeatureSchema(
                name=stat.name,
                kind="categorical" if is_label else stat.kind,
                dtype=stat.dtype,
                min=stat.min if stat.kind == "numeric" else None,
                max=stat.max if stat.kind == "numeric" else None,
                vocabulary=None if is_label or stat.kind != "categorical" else sorted(stat.values, key=natural_key),
                max_missing_fraction=min(1.0, 2 * stat.missing_fraction),
                edges=list(stat.edges) if stat.kind == "numeric" and stat.edges else None,
            )
        )
    label = stats.features.get(stats.label)
    return DataSchema(
        features=features,
        label=stats.label,
        label_values=sorted(label.values, key=natural_key) if label is not None else [],
        min_rows=max(1, stats.rows // 2),
    )


def parse_schema(text: str | bytes, where: str) -> DataSchema:
    """A schema from the file's text; `where` names the file in errors.

    Raises:
        DataError: naming the file and the key: not JSON, an unknown key, a missing or wrong value.

    Example:
        >>> parse_schema('{"features": [], "label": "y", "label_values": [], "colour": 1}', "/m/data-schema.json")
        Traceback (most recent call last):
        ...
        prefect_tensorflow.tasks.errors.DataError: schema file /m/data-schema.json: key 'colour': unknown key (expected features, label, label_values, min_rows, version)
    """
    try:
        raw = json.loads(text)
    except ValueError as err:
        raise DataError(f"schema file {where}: expected JSON, {err}") from None
    try:
        return DataSchema.model_validate(raw)
    except ValidationError as err:
        raise DataError(f"schema file {where}: {_first_problem(err)}") from None


def _first_problem(err: ValidationError) -> str:
    error = err.errors(include_url=False)[0]
    loc = [str(part) for part in error.get("loc", ())]
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        model = FeatureSchema if loc[0] == "features" else DataSchema
        return f"key {key!r}: unknown key (expected {', '.join(model.model_fields)})"
    message = error.get("msg", "").removeprefix("Value error, ")
    if not key:
        return message
    return f"key {key!r}: {message}" + ("" if error["type"] == "value_error" else f", received {error.get('input')!r}")


def read_schema(location: str) -> Optional[DataSchema]:
    """The schema in `<location>/data-schema.json` (a local path or an object store URI), None when there is none.

    `location` is a model dir the caller has already confined.

    Raises:
        DataError: the file is malformed (see `parse_schema`).
    """
    directory = parse_location(location, parameter="schema location")
    try:
        text = object_store(directory).read_bytes(SCHEMA_FILE)
    except FileNotFoundError:
        return None
    return parse_schema(text, str(directory.join(SCHEMA_FILE)))


def write_schema(location: str, schema: DataSchema) -> str:
    """Write `schema` to `<location>/data-schema.json` atomically (through the storage layer); returns its URI.

    Example:
        >>> import tempfile
        >>> schema = DataSchema(features=[FeatureSchema(name="y", kind="categorical", dtype="int64")], label="y", label_values=["0", "1"])
        >>> with tempfile.TemporaryDirectory() as model_dir:
        ...     _ = write_schema(model_dir, schema)
        ...     read_schema(model_dir) == schema
        True
    """
    directory = parse_location(location, parameter="schema location")
    store = object_store(directory)
    store.put_bytes(SCHEMA_FILE, schema.to_json().encode("utf-8"))
    return store.uri(SCHEMA_FILE)
