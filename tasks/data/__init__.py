"""Data: which examples a training reads, what they were, and whether they may be trained on.

- `window`: `DataWindow`, the whole UTC days (or the version) a training reads;
- `source`: `DataSource`, a dataset loader with its options and window, read the
  same way by training, the sidecar evaluator, verification and the champion gate;
- `manifest`: `DataManifest`, a window's files (sizes, etags) and the digests that
  name them; `lineage`: what a model dir last trained on (`data-lineage.json`) and
  the no-new-data rule;
- the bundled `partitioned` loader: `partitioned` (the loader), `partitioned_options`
  (its spec), `partition_listing` (one listing -> partitions, manifest),
  `file_formats` (CSV, Parquet, TFRecord through tf.data), `file_columns` (the raw
  columns validation reads); `synthetic` writes a drifting daily iris-like dataset;
- validation before training: `statistics`, `schema` (`data-schema.json`),
  `validation` (anomalies: the pure rule), `drift` (TFDV's measures),
  `window_checks` (the three together for one window); `training_errors` (bad data
  TensorFlow refuses mid-training, as one line);
- `sensor`: the data sensor's pure decisions (which closed windows to announce).

Example:
    >>> from prefect_tensorflow.tasks.data.window import DataWindow
    >>> DataWindow(end="2026-12-01").resolved(scheduled=None).name
    '2026-11-30_2026-12-01'
"""
