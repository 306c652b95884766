"""A tiny windowed dataset loader for the flow tests: one CSV per day under `<root>/dt=YYYY-MM-DD/part-0.csv`.

Files have a header, `f0,f1,f2,f3,site,label` (iris-like: four floats, a `site` text column read for
validation only, an integer class); row i of a file with i % 5 == 4 is eval. `write_days(root, start, days)`
writes iris rows, a few per day; `broken=` spoils a day's rows as a test asks.
"""

from __future__ import annotations

import csv
import hashlib
import os
from datetime import date, timedelta

import numpy as np

from prefect_tensorflow.tasks.data.manifest import DataManifest, ManifestFile
from prefect_tensorflow.tasks.data.source import Columns
from prefect_tensorflow.tasks.iris import read_iris

FEATURES = ("f0", "f1", "f2", "f3")
COLUMNS = (*FEATURES, "site", "label")


def write_days(root, start: date, days: int, rows_per_day: int = 40, offset: int = 0, broken: str = "") -> list[date]:
    """Write `days` daily files of iris rows from `start` on (another slice of iris each day, shifted by `offset`).

    `broken`: "new_category" (site 'east'), "nan_burst" (f1 missing in half the rows), "dropped_column" (no f3),
    "out_of_range" (f2 at 99), "drift" (every row from the south, f2 squeezed into its lower half).
    """
    features, labels = read_iris()
    # every day's train rows (not i % 5 == 4) hold iris's extremes: a day's range is the first day's
    matrix = np.asarray(features, np.float32)
    extremes = sorted({int(f(matrix[:, j])) for j in range(4) for f in (np.argmin, np.argmax)})
    written = []
    for n in range(days):
        day = start + timedelta(days=n)
        folder = os.path.join(root, f"dt={day.isoformat()}")
        os.makedirs(folder, exist_ok=True)
        header = [c for c in COLUMNS if not (broken == "dropped_column" and c == "f3")]
        with open(os.path.join(folder, "part-0.csv"), "w", newline="") as handle:
            out = csv.writer(handle)
            out.writerow(header)
            for i in range(rows_per_day):
                train_slot = i - i // 5  # the i-th row is the train_slot-th train row (when not eval)
                extreme = i % 5 != 4 and train_slot < len(extremes)
                index = extremes[train_slot] if extreme else (n * 37 + i * 3 + offset) % len(labels)
                row = dict(zip(FEATURES, (f"{v:.2f}" for v in features[index])))
                row.update(site="north" if i % 2 else "south", label=str(int(labels[index])))
                if broken == "new_category" and i == 3:
                    row["site"] = "east"
                elif broken == "nan_burst" and i % 2:
                    row["f1"] = "nan"
                elif broken == "out_of_range" and i == 5:
                    row["f2"] = "99"
                elif broken == "drift":
                    row.update(site="south", f2=f"{float(row['f2']) * 0.5 + 0.5:.2f}")
                out.writerow([row[c] for c in header])
        written.append(day)
    return written


def _files(root: str, window) -> list[tuple[date, str]]:
    return [
        (day, os.path.join(root, f"dt={day.isoformat()}", "part-0.csv"))
        for day in window.dates()
        if os.path.exists(os.path.join(root, f"dt={day.isoformat()}", "part-0.csv"))
    ]


def _table(root: str, window, split: str) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    for _, path in _files(root, window):
        with open(path, newline="") as handle:
            for i, row in enumerate(csv.DictReader(handle)):
                if (i % 5 == 4) == (split == "eval"):
                    for key, value in row.items():
                        table.setdefault(key, []).append(value)
    return table


def _rows(root: str, window, split: str) -> tuple[np.ndarray, np.ndarray]:
    table = _table(root, window, split)
    x = np.stack([np.asarray(table.get(f, []), np.float32) for f in FEATURES], axis=1) if table else np.zeros((0, 4))
    return x.astype(np.float32), np.asarray(table.get("label", []), np.int32)


def load(split: str, window=None, root: str = ""):
    """The window's rows of `split` as `(features[4], label)`."""
    import tensorflow as tf

    x, y = _rows(root, window, split)
    if not len(y):
        raise ValueError(f"no data in window {window.label} under {root}")
    return tf.data.Dataset.from_tensor_slices((x, y))


def manifest(window=None, root: str = "") -> DataManifest:
    """The window's files: size, content hash, rows."""
    files = []
    for day, path in _files(root, window):
        with open(path, "rb") as handle:
            content = handle.read()
        files.append(
            ManifestFile(
                name=os.path.relpath(path, root),
                size=len(content),
                etag=hashlib.sha256(content).hexdigest(),
                rows=content.count(b"\n") - 1,
                partition=day.isoformat(),
            )
        )
    return DataManifest(source=root, window=window, files=tuple(files), split_rule="row i % 5 == 4 is eval")


def columns(split: str, window=None, root: str = "") -> Columns:
    """The raw columns of `split`: floats, the site as text, the label as integers."""
    table = _table(root, window, split)
    values = {name: np.asarray(column, np.float64 if name in FEATURES else object) for name, column in table.items()}
    if "label" in values:
        values["label"] = values["label"].astype(np.int64)
    return Columns(values=values, label="label")


load.manifest = manifest  # type: ignore[attr-defined]
load.columns = columns  # type: ignore[attr-defined]
load.feature_names = FEATURES  # type: ignore[attr-defined]
