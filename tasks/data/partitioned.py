"""The bundled `partitioned` loader: CSV, Parquet or TFRecord files in daily partitions, read by window.

Registered as `partitioned` (entry point group `prefect_tensorflow.datasets`),
so a training names it with `data="partitioned"` and gives its spec as
`data_options` (`PartitionedFiles`: prefix, format, features, label, ...):

    <prefix>/dt=2026-11-30/part-00000.csv
    <prefix>/dt=2026-11-30/_SUCCESS        (empty; written last: the partition is complete)
    <prefix>/dt=2026-12-01/...

`load_partitioned(split, window=None, **options)` lists the prefix once
through the storage layer (local, s3://, gs://), takes the window's complete
partitions (`partition_listing`), and streams their files with `tf.data`
(`file_formats`) as `(float32[len(features)], int32 label)` pairs: the
features stacked in the order `features` gives them, the label a class index.
Its attributes `manifest(window=None, **options)` (the files, sizes and etags
of the window, from the same one listing) and `columns(split, window=None,
**options)` (every column as the files hold it, for validation) are the
loader contract's (`data.source.DataSource`). With no window, every complete
partition is read.

Example:
    >>> import tempfile
    >>> from prefect_tensorflow.tasks.data.partitioned import load_partitioned
    >>> from prefect_tensorflow.tasks.data.synthetic import write_daily_dataset
    >>> prefix = tempfile.mkdtemp()
    >>> _ = write_daily_dataset(prefix, "2026-11-28", 3, rows_per_day=10)
    >>> manifest = load_partitioned.manifest(window={"start": "2026-11-29", "end": "2026-12-01"}, prefix=prefix)
    >>> [f.name for f in manifest.files]
    ['dt=2026-11-29/part-00000.csv', 'dt=2026-11-30/part-00000.csv']
    >>> columns = load_partitioned.columns("eval", window={"start": "2026-11-29", "end": "2026-12-01"}, prefix=prefix)
    >>> len(columns.values["species"]), sorted(columns.values)[:2]
    (4, ['petal_length', 'petal_width'])
"""

from __future__ import annotations

from typing import Any

from ..errors import DataError
from .file_columns import file_columns, merge_columns
from .file_formats import dataset_of, keep_rows, local_copy
from .manifest import DataManifest, ManifestFile
from .partition_listing import Partition, list_partitions, window_manifest
from .partitioned_options import PartitionedFiles, partitioned_options
from .source import Columns

__all__ = ["Partition", "PartitionedFiles", "list_partitions", "load_partitioned", "partitioned_columns", "partitioned_manifest"]
SPLITS = ("train", "eval")


def load_partitioned(split: str = "train", window: Any = None, **options: Any) -> Any:
    """The `split` of the window's files as a `tf.data.Dataset` of `(float32[n_features], int32)` pairs.

    Raises:
        DataError: a bad option (naming `data_options.<key>`), no data or an incomplete partition in
            the window, a file without a feature or label column or with a label outside `label_classes`
            (naming the file).
    """
    spec = partitioned_options(options)
    files = _split_files(spec, window, split)
    return dataset_of(files, spec, split)


def partitioned_manifest(window: Any = None, **options: Any) -> DataManifest:
    """The files of the window (names, sizes, etags, partitions, splits) from one listing; nothing is read.

    Raises:
        DataError: see `load_partitioned`.
    """
    return window_manifest(partitioned_options(options), window)[1]


def partitioned_columns(split: str = "train", window: Any = None, **options: Any) -> Columns:
    """Every column of the `split`'s rows as the files hold them (missing values NaN or ""), for validation.

    Never refuses a dropped or extra column, NaNs or unknown categories: those are validation's to report.

    Raises:
        DataError: a bad option, or no data / an incomplete partition in the window.
    """
    spec = partitioned_options(options)
    keep = keep_rows(split, spec)
    parts = [file_columns(path, spec, keep) for _, path in _split_files(spec, window, split)]
    return Columns(values=merge_columns(parts, {**spec.columns, **spec.features}), label=spec.label)


def _split_files(spec: PartitionedFiles, window: Any, split: str) -> list[tuple[ManifestFile, str]]:
    """(manifest entry, local path) of each file `split` reads, in reading order."""
    if split not in SPLITS:
        raise DataError(f"split: expected one of {', '.join(SPLITS)}, received {split!r}")
    store, manifest = window_manifest(spec, window)
    files = [f for f in manifest.files if split in f.splits]
    if not files:
        raise DataError(
            f"data_options.eval: no {split} files in window {manifest.window.label if manifest.window else '(all)'} under {manifest.source} with the rule '{spec.eval.description}'"
        )
    return [(f, local_copy(store, f)) for f in files]


load_partitioned.manifest = partitioned_manifest  # type: ignore[attr-defined]
load_partitioned.columns = partitioned_columns  # type: ignore[attr-defined]
