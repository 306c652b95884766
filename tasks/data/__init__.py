"""Data: which examples a training reads, what they were, and whether they may be trained on.

- `window`: `DataWindow`, the whole UTC days (or the version) a training reads;
- `manifest`: `DataManifest`, the files of a window with their sizes, etags and
  row counts, and the digests that name them (lineage, "no new data");
- `source`: `DataSource`, a dataset loader with its options and window, loaded
  the same way by training, verification and the champion gate.

Example:
    >>> from prefect_tensorflow.tasks.data.window import DataWindow
    >>> DataWindow(end="2026-12-01").resolved(scheduled=None).name
    '2026-11-30_2026-12-01'
"""
