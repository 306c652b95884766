"""Reading a window's files as `tf.data`: CSV, Parquet and TFRecord, into `(float32[n_features], int32 label)`.

- CSV: `tf.data.experimental.CsvDataset` on each file, the feature and label
  columns found by the file's own header (files may order columns differently);
- TFRecord: `TFRecordDataset` + `parse_single_example` (`tf.train.Example`s
  with one value per feature);
- Parquet: read with pyarrow, then `from_tensor_slices`.

Files are read in the manifest's order (day, then name) and rows in file
order, so a re-run reads the same examples in the same order. Before a file is
streamed its header (or first record, or schema) must hold every feature and
the label, and its labels are checked against `label_classes`: a bad file is a
`DataError` naming it, not an error deep inside TensorFlow later. Remote files
are downloaded once to a local cache keyed by (URI, etag) (`local_copy`).

Example:
    >>> from prefect_tensorflow.tasks.data.file_formats import csv_header
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "part-0.csv")
    >>> _ = open(path, "w").write("a,b,species\\n1,2,setosa\\n")
    >>> csv_header(path, "dt=2026-11-30/part-0.csv")
    ['a', 'b', 'species']
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import DataError
from ..storage.backend import StorageBackend
from .manifest import ManifestFile
from .partitioned_options import PartitionedFiles

CACHE_DIR = "partitioned-files"
LABEL_CHECK_BATCH = 8192


def local_copy(store: StorageBackend, file: ManifestFile) -> str:
    """A local path holding `file`: the file itself on local disk, else a cached download keyed by (URI, etag).

    The download is staged and renamed into place, so the cache holds whole files only; bytes whose
    etag is not the listing's (the object changed since) are refused rather than cached under the old one.

    Raises:
        DataError: the object changed or vanished since it was listed.
    """
    from ..storage.local import staged_file
    from ..storage.locations import scratch_dir

    if store.location.is_local:
        return store.uri(file.name)
    key = hashlib.sha256(f"{store.uri(file.name)}\n{file.etag}".encode()).hexdigest()[:40]
    final = os.path.join(scratch_dir(), CACHE_DIR, key + os.path.splitext(file.name)[1])
    if os.path.exists(final):
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    try:
        data, info = store.read_with_info(file.name)
    except FileNotFoundError:
        raise DataError(f"{store.uri(file.name)}: deleted since it was listed; list the window again") from None
    if info.etag != file.etag:
        raise DataError(
            f"{store.uri(file.name)}: changed since it was listed (etag {info.etag}, listed {file.etag}); list the window again"
        )
    with staged_file(final) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
    return final


def csv_header(path: str, name: str) -> list[str]:
    """The column names on the first line of a CSV file (`name`: how errors name it)."""
    with open(path, newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise DataError(f"{name}: empty CSV file; expected a header line naming the columns")
    return [column.strip() for column in header]


def require_columns(present: Sequence[str], options: PartitionedFiles, name: str) -> None:
    """Every feature and the label are among the file's columns, else a DataError naming the file and column."""
    for column in [*options.features, options.label]:
        if column not in present:
            role = "label" if column == options.label else "feature"
            raise DataError(f"{name}: no {role} column {column!r} (data_options.features / label); the file has {list(present)}")


def check_labels(values: Any, options: PartitionedFiles, name: str) -> None:
    """The label values of one file are classes of `label_classes` (or integers >= 0 without it).

    Example:
        >>> check_labels(["setosa", "rose"], PartitionedFiles(), "dt=2026-11-30/part-0.csv")
        Traceback (most recent call last):
        ...
        prefect_tensorflow.tasks.errors.DataError: dt=2026-11-30/part-0.csv: label column 'species' holds 'rose'; expected one of ['setosa', 'versicolor', 'virginica'] (data_options.label_classes)
    """
    found = np.unique(np.asarray(values, dtype=object if options.label_classes is not None else None))
    if options.label_classes is not None:
        classes = set(options.label_classes)
        bad = [v for v in found.tolist() if (v.decode() if isinstance(v, bytes) else v) not in classes]
        expected = f"one of {options.label_classes} (data_options.label_classes)"
    else:
        bad = [v for v in found.tolist() if v is None or v != v or int(v) != v or v < 0]
        expected = "integer class indices >= 0 (or give data_options.label_classes)"
    if bad:
        value = bad[0].decode() if isinstance(bad[0], bytes) else bad[0]
        more = f" (and {len(bad) - 1} other values)" if len(bad) > 1 else ""
        raise DataError(f"{name}: label column {options.label!r} holds {value!r}{more}; expected {expected}")


def label_index(label: Any, options: PartitionedFiles) -> Any:
    """The int32 class index of a label tensor (a string's position in `label_classes`)."""
    import tensorflow as tf

    if options.label_classes is None:
        return tf.cast(label, tf.int32)
    classes = tf.constant(options.label_classes)
    return tf.argmax(tf.cast(tf.equal(classes, label), tf.int32), output_type=tf.int32)


def keep_rows(split: str, options: PartitionedFiles) -> Any:
    """A predicate on a row's index in its file (the `every` rule), or None when `split` reads whole files.

    Example:
        >>> [keep_rows("eval", PartitionedFiles())(i) for i in range(5)]
        [False, False, False, False, True]
    """
    every = options.eval.every
    if options.eval.last_days is not None or every is None:
        return None
    return (lambda i: i % every == every - 1) if split == "eval" else (lambda i: i % every != every - 1)


def dataset_of(files: Sequence[tuple[ManifestFile, str]], options: PartitionedFiles, split: str) -> Any:
    """The examples of `split` in `files` ((manifest entry, local path), in reading order) as one `tf.data.Dataset`."""
    readers = {"csv": _csv_dataset, "parquet": _parquet_dataset, "tfrecord": _tfrecord_dataset}
    return readers[options.format](files, options, split)


def _csv_dataset(files: Sequence[tuple[ManifestFile, str]], options: PartitionedFiles, split: str) -> Any:
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    # consecutive files with the same header are read by one flat_map; another header starts a new run
    runs: list[tuple[list[str], list[str]]] = []
    keep = keep_rows(split, options)
    rows = 0
    for file, path in files:
        header = csv_header(path, file.name)
        require_columns(header, options, file.name)
        label_type = pa.string() if options.label_classes is not None else pa.float64()
        convert = pa_csv.ConvertOptions(
            include_columns=[options.label], column_types={options.label: label_type}, strings_can_be_null=False
        )
        labels = pa_csv.read_csv(path, convert_options=convert).column(0).to_numpy(zero_copy_only=False)
        check_labels(labels, options, file.name)
        rows += kept_rows(len(labels), keep)
        if runs and runs[-1][0] == header:
            runs[-1][1].append(path)
        else:
            runs.append((header, [path]))
    datasets = [_csv_run(header, paths, options, keep) for header, paths in runs]
    dataset = datasets[0]
    for more in datasets[1:]:
        dataset = dataset.concatenate(more)
    return with_length(dataset, rows)


def kept_rows(rows: int, keep: Any) -> int:
    """How many of a file's `rows` the split reads (`keep`: `keep_rows`'s predicate, None for all).

    Example:
        >>> kept_rows(10, keep_rows("eval", PartitionedFiles())), kept_rows(10, None)
        (2, 10)
    """
    return rows if keep is None else int(np.count_nonzero(keep(np.arange(rows))))


def with_length(dataset: Any, rows: int) -> Any:
    """`dataset` saying its length (`cardinality()`), counted while its files were checked: training can
    then read it in the stateless input order (`training.input_position`)."""
    import tensorflow as tf

    return dataset.apply(tf.data.experimental.assert_cardinality(rows))


def _csv_run(header: list[str], paths: list[str], options: PartitionedFiles, keep: Any) -> Any:
    import tensorflow as tf

    wanted = [*options.features, options.label]
    columns = sorted({header.index(c) for c in wanted})
    position = {c: columns.index(header.index(c)) for c in wanted}
    label_default = tf.constant([""], tf.string) if options.label_classes is not None else tf.constant([-1], tf.int64)
    defaults = [label_default if header[i] == options.label else tf.constant([np.nan], tf.float32) for i in columns]

    def read(path: Any) -> Any:
        rows = tf.data.experimental.CsvDataset(path, defaults, header=True, select_cols=columns)
        if keep is None:
            return rows
        return rows.enumerate().filter(lambda i, fields: keep(i)).map(lambda i, fields: fields)

    def example(*fields: Any) -> Any:
        features = tf.stack([fields[position[c]] for c in options.features])
        return features, label_index(fields[position[options.label]], options)

    return tf.data.Dataset.from_tensor_slices(paths).flat_map(read).map(example)


def _parquet_dataset(files: Sequence[tuple[ManifestFile, str]], options: PartitionedFiles, split: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tensorflow as tf

    features, labels = [], []
    for file, path in files:
        table = pq.read_table(path)
        require_columns(table.column_names, options, file.name)
        stacked = np.stack(
            [table.column(c).cast(pa.float32()).to_numpy(zero_copy_only=False) for c in options.features], axis=1
        ).astype(np.float32)
        label = table.column(options.label).to_numpy(zero_copy_only=False)
        check_labels(label, options, file.name)
        keep = keep_rows(split, options)
        if keep is not None:
            mask = keep(np.arange(len(label)))
            stacked, label = stacked[mask], label[mask]
        features.append(stacked)
        labels.append(_label_indices(label, options))
    return tf.data.Dataset.from_tensor_slices((np.concatenate(features), np.concatenate(labels)))


def _label_indices(values: Any, options: PartitionedFiles) -> Any:
    if options.label_classes is None:
        return np.asarray(values, dtype=np.int32)
    index = {name: i for i, name in enumerate(options.label_classes)}
    return np.asarray([index[v.decode() if isinstance(v, bytes) else v] for v in values], dtype=np.int32)


def _tfrecord_dataset(files: Sequence[tuple[ManifestFile, str]], options: PartitionedFiles, split: str) -> Any:
    import tensorflow as tf

    label_spec = (
        tf.io.FixedLenFeature([], tf.string, default_value="")
        if options.label_classes is not None
        else tf.io.FixedLenFeature([], tf.int64, default_value=-1)
    )
    keep = keep_rows(split, options)
    rows = sum(kept_rows(_check_tfrecord_file(path, file.name, options, label_spec), keep) for file, path in files)
    spec = {
        c: tf.io.FixedLenFeature([], tf.float32, default_value=np.nan)
        if kind == "float32"
        else tf.io.FixedLenFeature([], tf.int64)
        for c, kind in options.features.items()
    }
    spec[options.label] = label_spec

    def read(path: Any) -> Any:
        records = tf.data.TFRecordDataset(path)
        if keep is None:
            return records
        return records.enumerate().filter(lambda i, r: keep(i)).map(lambda i, r: r)

    def example(record: Any) -> Any:
        parsed = tf.io.parse_single_example(record, spec)
        features = tf.stack([tf.cast(parsed[c], tf.float32) for c in options.features])
        return features, label_index(parsed[options.label], options)

    return with_length(tf.data.Dataset.from_tensor_slices([path for _, path in files]).flat_map(read).map(example), rows)


def _check_tfrecord_file(path: str, name: str, options: PartitionedFiles, label_spec: Any) -> int:
    """Every feature and the label are in some record of the file (a record may leave a value out), and
    the labels are classes: one pass over the file, parsed in batches. Returns its number of records."""
    import tensorflow as tf

    kinds = {"float32": tf.float32, "int64": tf.int64}
    spec = {options.label: label_spec, **{c: tf.io.VarLenFeature(kinds[kind]) for c, kind in options.features.items()}}
    present: set[str] = set()
    labels: list[Any] = []
    try:
        for batch in tf.data.TFRecordDataset(path).batch(LABEL_CHECK_BATCH).map(lambda b: tf.io.parse_example(b, spec)):
            labels.append(batch[options.label].numpy())
            present.update(c for c in options.features if int(tf.size(batch[c].values)) > 0)
    except tf.errors.OpError as err:
        raise DataError(
            f"{name}: its records do not parse as data_options.features and label: {err.message.splitlines()[0]}"
        ) from None
    if not labels:
        return 0
    values = np.concatenate(labels)
    if np.any(values != (b"" if options.label_classes is not None else -1)):
        present.add(options.label)
    require_columns(sorted(present, key=[*options.features, options.label].index), options, name)
    check_labels(values, options, name)
    return len(values)
