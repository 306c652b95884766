"""A small drifting daily dataset for examples and tests: `iris-daily`.

Each day's rows are bundled iris rows drawn with seeded noise (sepal and
petal sizes, `species`), plus a `site` column (north or south), written as
`<prefix>/dt=YYYY-MM-DD/part-00000.<csv|parquet|tfrecord>` then that
partition's empty `_SUCCESS`, through the storage layer (a local directory,
s3:// or gs://). Two days may be made bad on purpose:

- `drift_day`: petal_length shifted by +2.0 cm, capped at 6.0 cm: a clear change of its
  distribution inside the range ordinary days hold (drift to measure, not an anomaly);
- `broken_day`: sepal_width missing in about a quarter of the rows, one row of
  an unknown species (`unknown`) and one out-of-range petal_width (42.0), both
  in rows the default eval rule leaves to training.

Ordinary days look alike to validation: balanced species, alternating sites,
values within the bundled data's range, and each feature's extremes in every day.

A day's rows depend only on (seed, day), so re-writing a day writes the same rows.
`IRIS_DAILY_OPTIONS` are the `data_options` that read it (`prefix` left "").

Example:
    >>> import tempfile
    >>> from prefect_tensorflow.tasks.data.synthetic import daily_rows, write_daily_dataset
    >>> [d.isoformat() for d in write_daily_dataset(tempfile.mkdtemp(), "2026-11-28", 2, rows_per_day=5)]
    ['2026-11-28', '2026-11-29']
    >>> rows = daily_rows("2026-11-28", 8, broken=True)
    >>> sorted({r["species"] for r in rows})[-1], max(r["petal_width"] for r in rows)
    ('virginica', 42.0)
"""

from __future__ import annotations

import io
import os
import tempfile
from datetime import date, timedelta
from typing import Any, Optional, Union

import numpy as np

from ..errors import DataError
from .partition_listing import SUCCESS
from .partitioned_options import EXTENSIONS, IRIS_CLASSES, IRIS_COLUMNS, IRIS_FEATURES

DRIFT_SHIFT = 2.0
DRIFT_CEILING = 6.0
NOISE = 0.1
UNKNOWN_SPECIES = "unknown"
OUT_OF_RANGE = 42.0
MISSING_FRACTION = 0.25
SITES = ("north", "south")
IRIS_DAILY_OPTIONS: dict[str, Any] = {
    "prefix": "",
    "name": "iris-daily",
    "format": "csv",
    "features": dict(IRIS_FEATURES),
    "label": "species",
    "label_classes": list(IRIS_CLASSES),
    "columns": dict(IRIS_COLUMNS),
    "eval": {"every": 5},
    "require_success": True,
}
DayLike = Union[date, str]


def _day(value: DayLike, parameter: str) -> date:
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise DataError(f"{parameter}: expected a day as YYYY-MM-DD, received {value!r}") from None


def daily_rows(day: DayLike, rows: int, *, seed: int = 0, drift: bool = False, broken: bool = False) -> list[dict[str, Any]]:
    """One day's rows as dicts (None for a missing value); see the module docstring for drift and broken days.

    So that ordinary days look alike to validation: the species are balanced (row i is of class i % 3),
    sites alternate, every value stays within the bundled data's range, and the rows holding each
    feature's minimum and maximum come first, unchanged, in rows the default eval rule leaves to training.
    """
    from ..iris import read_iris

    when = _day(day, "day")
    features, labels = read_iris()
    table = np.asarray(features)
    low, high = table.min(axis=0), table.max(axis=0)
    extremes = list(dict.fromkeys(int(i) for f in range(table.shape[1]) for i in (table[:, f].argmin(), table[:, f].argmax())))
    by_class = [[i for i, label in enumerate(labels) if label == c] for c in range(len(IRIS_CLASSES))]
    rng = np.random.default_rng([seed, when.toordinal()])
    out = []
    for i in range(rows):
        if extremes and i % 5 != 4:
            pick, noise = extremes.pop(0), np.zeros(len(IRIS_FEATURES))
        else:
            pick, noise = int(rng.choice(by_class[i % len(by_class)])), rng.normal(0.0, NOISE, size=len(IRIS_FEATURES))
        values = np.clip(table[pick] + noise, low, high)
        row: dict[str, Any] = {name: round(float(v), 1) for name, v in zip(IRIS_FEATURES, values)}
        if drift:
            row["petal_length"] = min(round(row["petal_length"] + DRIFT_SHIFT, 1), DRIFT_CEILING)
        row["species"], row["site"] = IRIS_CLASSES[labels[pick]], SITES[(i // len(by_class)) % len(SITES)]
        out.append(row)
    if broken and out:
        for missing in np.flatnonzero(rng.random(rows) < MISSING_FRACTION):
            out[int(missing)]["sepal_width"] = None
        out[0]["species"] = UNKNOWN_SPECIES
        out[max(i for i in range(rows) if i % 5 != 4 or rows < 5)]["petal_width"] = OUT_OF_RANGE  # a training row
    return out


def encode_rows(rows: list[dict[str, Any]], file_format: str) -> bytes:
    """The rows as one file's bytes in `file_format` (csv, parquet or tfrecord).

    Example:
        >>> encode_rows(daily_rows("2026-11-30", 1), "csv").decode().splitlines()[0]
        'sepal_length,sepal_width,petal_length,petal_width,species,site'
    """
    columns = [*IRIS_FEATURES, "species", "site"]
    if file_format == "csv":
        lines = [",".join(columns)] + [",".join("" if r[c] is None else str(r[c]) for c in columns) for r in rows]
        return ("\n".join(lines) + "\n").encode()
    if file_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({c: [r[c] for r in rows] for c in columns})
        sink = io.BytesIO()
        pq.write_table(table, sink)
        return sink.getvalue()
    if file_format == "tfrecord":
        return _tfrecord_bytes(rows)
    raise DataError(f"format: expected one of {', '.join(EXTENSIONS)}, received {file_format!r}")


def _tfrecord_bytes(rows: list[dict[str, Any]]) -> bytes:
    import tensorflow as tf

    def feature(value: Any) -> Any:
        if isinstance(value, str):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
        return tf.train.Feature(float_list=tf.train.FloatList(value=[value]))

    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "rows.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for row in rows:
                example = tf.train.Example(
                    features=tf.train.Features(feature={k: feature(v) for k, v in row.items() if v is not None})
                )
                writer.write(example.SerializeToString())
        with open(path, "rb") as handle:
            return handle.read()


def write_daily_dataset(
    prefix: str,
    start: DayLike,
    days: int,
    *,
    rows_per_day: int = 60,
    drift_day: Optional[DayLike] = None,
    broken_day: Optional[DayLike] = None,
    seed: int = 0,
    format: str = "csv",
) -> list[date]:
    """Write `days` daily partitions from `start` under `prefix` (each file, then its `_SUCCESS`); returns the days.

    Raises:
        DataError: naming the parameter: a bad day, count or format.
        StorageError: naming `prefix`, when it is not a location.
    """
    from ..storage.locations import parse_location
    from ..storage.stores import object_store

    first = _day(start, "start")
    drift = _day(drift_day, "drift_day") if drift_day is not None else None
    broken = _day(broken_day, "broken_day") if broken_day is not None else None
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 3660:
        raise DataError(f"days: expected a whole number of days from 1 to 3660, received {days!r}")
    if isinstance(rows_per_day, bool) or not isinstance(rows_per_day, int) or not 1 <= rows_per_day <= 10_000_000:
        raise DataError(f"rows_per_day: expected a whole number from 1 to 10000000, received {rows_per_day!r}")
    if format not in EXTENSIONS:
        raise DataError(f"format: expected one of {', '.join(EXTENSIONS)}, received {format!r}")
    store = object_store(parse_location(prefix, parameter="prefix"))
    written = [first + timedelta(days=n) for n in range(days)]
    for day in written:
        rows = daily_rows(day, rows_per_day, seed=seed, drift=day == drift, broken=day == broken)
        store.put_bytes(f"dt={day}/part-00000{EXTENSIONS[format]}", encode_rows(rows, format))
        store.put_bytes(f"dt={day}/{SUCCESS}", b"")
    return written
