"""A tiny windowed dataset loader for the flow tests: one CSV per day under `<root>/dt=YYYY-MM-DD/part-0.csv`.

Rows are `f0,f1,f2,f3,label` (iris-like: four floats, an integer class); row i of a file with
i % 5 == 4 is eval. `write_days(root, days)` writes iris rows, a few per day.
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


def write_days(root, start: date, days: int, rows_per_day: int = 40, offset: int = 0) -> list[date]:
    """Write `days` daily files of iris rows from `start` on (a different slice of iris each day, shifted by `offset`)."""
    features, labels = read_iris()
    written = []
    for n in range(days):
        day = start + timedelta(days=n)
        folder = os.path.join(root, f"dt={day.isoformat()}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "part-0.csv"), "w", newline="") as handle:
            out = csv.writer(handle)
            for i in range(rows_per_day):
                row = (n * 37 + i * 3 + offset) % len(labels)
                out.writerow([*(f"{v:.2f}" for v in features[row]), int(labels[row])])
        written.append(day)
    return written


def _files(root: str, window) -> list[tuple[date, str]]:
    return [
        (day, os.path.join(root, f"dt={day.isoformat()}", "part-0.csv"))
        for day in window.dates()
        if os.path.exists(os.path.join(root, f"dt={day.isoformat()}", "part-0.csv"))
    ]


def _rows(root: str, window, split: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for _, path in _files(root, window):
        with open(path, newline="") as handle:
            for i, row in enumerate(csv.reader(handle)):
                if (i % 5 == 4) == (split == "eval"):
                    xs.append([float(v) for v in row[:4]])
                    ys.append(int(row[4]))
    return np.asarray(xs, np.float32).reshape(-1, 4), np.asarray(ys, np.int32)


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
        content = open(path, "rb").read()
        files.append(
            ManifestFile(
                name=os.path.relpath(path, root),
                size=len(content),
                etag=hashlib.sha256(content).hexdigest(),
                rows=content.count(b"\n"),
                partition=day.isoformat(),
            )
        )
    return DataManifest(source=root, window=window, files=tuple(files), split_rule="row i % 5 == 4 is eval")


def columns(split: str, window=None, root: str = "") -> Columns:
    """The raw columns of `split`."""
    x, y = _rows(root, window, split)
    return Columns(values={**{name: x[:, i] for i, name in enumerate(FEATURES)}, "label": y}, label="label")


load.manifest = manifest  # type: ignore[attr-defined]
load.columns = columns  # type: ignore[attr-defined]
load.feature_names = FEATURES  # type: ignore[attr-defined]
