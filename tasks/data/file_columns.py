"""The raw columns of a window's files, as they are, for validation: nothing here refuses bad data.

Every column of every file is read (CSV and Parquet with pyarrow, TFRecord's
`tf.train.Example`s with protobuf), then the files' columns are joined
(`merge_columns`): a column is numeric (float64 with NaN for a missing value,
or the declared `float32`/`int64`) when every file holds numbers in it, else
text (a missing value is ""); a column a file lacks is missing for that file's
rows. A dropped column, an extra one, NaNs and unknown categories are all
given back as found: finding them is validation's job (`data.validation`).

Example:
    >>> import numpy as np
    >>> from prefect_tensorflow.tasks.data.file_columns import merge_columns
    >>> merged = merge_columns([({"x": np.array([1.0, np.nan]), "s": np.array(["a", "b"], dtype=object)}, 2),
    ...                         ({"x": np.array(["oops"], dtype=object)}, 1)], {"x": "float32"})
    >>> merged["x"].tolist(), merged["s"].tolist()
    (['1.0', '', 'oops'], ['a', 'b', ''])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from .partitioned_options import PartitionedFiles

# (column name -> values of one file, the file's row count)
FileColumns = tuple[dict[str, Any], int]


def file_columns(path: str, options: PartitionedFiles, keep: Optional[Any] = None) -> FileColumns:
    """Every column of one file as numpy arrays (numbers as float64 with NaN, text as str objects), rows kept by `keep`."""
    if options.format == "tfrecord":
        values, rows = _tfrecord_columns(path)
    else:
        values, rows = _arrow_columns(path, options.format)
    if keep is not None and rows:
        mask = keep(np.arange(rows))
        values, rows = {name: column[mask] for name, column in values.items()}, int(mask.sum())
    return values, rows


def _arrow_columns(path: str, file_format: str) -> FileColumns:
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    if file_format == "csv":
        table = pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(strings_can_be_null=False))
    else:
        table = pq.read_table(path)
    return {name: _numpy(table.column(name)) for name in table.column_names}, table.num_rows


def _numpy(column: Any) -> Any:
    import pyarrow as pa

    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind) or pa.types.is_boolean(kind):
        return column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    return np.asarray(["" if v is None else str(v) for v in column.to_pylist()], dtype=object)


def _tfrecord_columns(path: str) -> FileColumns:
    import tensorflow as tf

    rows: list[dict[str, Any]] = []
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        example = tf.train.Example.FromString(record)
        row = {}
        for name, feature in sorted(example.features.feature.items()):
            kind = feature.WhichOneof("kind")
            values = list(getattr(feature, kind).value) if kind else []
            value = values[0] if values else None
            row[name] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        rows.append(row)
    names = list(dict.fromkeys(name for row in rows for name in row))
    columns = {}
    for name in names:
        found = [row.get(name) for row in rows]
        if any(isinstance(v, str) for v in found):
            columns[name] = np.asarray(["" if v is None else str(v) for v in found], dtype=object)
        else:
            columns[name] = np.asarray([np.nan if v is None else v for v in found], dtype=np.float64)
    return columns, len(rows)


def merge_columns(files: Sequence[FileColumns], declared: Mapping[str, str]) -> dict[str, Any]:
    """The columns of several files joined in file order (pure numpy; see the module docstring)."""
    names = list(dict.fromkeys(name for values, _ in files for name in values))
    merged: dict[str, Any] = {}
    for name in names:
        parts = [values.get(name) for values, _ in files]
        text = any(p is not None and p.dtype == object for p in parts) or declared.get(name) == "string"
        if text:
            pieces = [_as_text(p) if p is not None else np.full(rows, "", dtype=object) for p, (_, rows) in zip(parts, files)]
            merged[name] = np.concatenate(pieces) if pieces else np.asarray([], dtype=object)
            continue
        numbers = np.concatenate([p if p is not None else np.full(rows, np.nan) for p, (_, rows) in zip(parts, files)])
        merged[name] = _as_declared(numbers, declared.get(name))
    return merged


def _as_text(values: Any) -> Any:
    if values.dtype == object:
        return values
    return np.asarray(["" if np.isnan(v) else str(v) for v in values], dtype=object)


def _as_declared(numbers: Any, declared: Optional[str]) -> Any:
    """float32 when declared so; int64 when declared (or every value is) a whole number and none is missing."""
    whole = bool(numbers.size) and not np.isnan(numbers).any() and bool(np.all(numbers == np.round(numbers)))
    if declared == "float32":
        return numbers.astype(np.float32)
    if whole and declared in ("int64", None):
        return numbers.astype(np.int64)
    return numbers
