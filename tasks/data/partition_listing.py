"""The partitions under a prefix, and the manifest of a window of them, from one listing.

Layout: `<prefix>/dt=YYYY-MM-DD/<file>.<csv|parquet|tfrecord>`, and an empty
`_SUCCESS` in a partition once it is complete (written last, Hadoop's
convention). Files whose name starts with `_` or `.` are not data. A window's
manifest is its complete partitions' files, ordered by day then name (the
order the loader reads them in), with the etags of the listing: one listing
names the data, nothing is read.

Example:
    >>> from prefect_tensorflow.tasks.data.partition_listing import partitions_of
    >>> from prefect_tensorflow.tasks.storage.backend import ObjectInfo
    >>> found = partitions_of({"dt=2026-11-30/part-0.csv": ObjectInfo(10, "e1"), "dt=2026-11-30/_SUCCESS": ObjectInfo(0, "e0"),
    ...                        "dt=2026-12-01/part-0.csv": ObjectInfo(12, "e2"), "README": ObjectInfo(1, "e3")}, ".csv")
    >>> [(str(p.day), p.complete, list(p.files)) for p in found.values()]
    [('2026-11-30', True, ['dt=2026-11-30/part-0.csv']), ('2026-12-01', False, ['dt=2026-12-01/part-0.csv'])]
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Optional

from ..errors import DataError
from ..storage.backend import ObjectInfo, StorageBackend
from .manifest import DataManifest, ManifestFile
from .partitioned_options import PartitionedFiles
from .window import DataWindow

SUCCESS = "_SUCCESS"
_PARTITION_FILE = re.compile(r"dt=(\d{4}-\d{2}-\d{2})/([^/]+)")


@dataclass(frozen=True)
class Partition:
    """One day's partition: whether its `_SUCCESS` marker is there, and its data files (name -> size, etag)."""

    day: date
    complete: bool
    files: dict[str, ObjectInfo] = field(default_factory=dict)


def partitions_of(listing: Mapping[str, ObjectInfo], extension: str) -> dict[date, Partition]:
    """The partitions a listing holds, by day (sorted); names that are not `dt=<date>/<file>` are left out."""
    complete: set[date] = set()
    files: dict[date, dict[str, ObjectInfo]] = {}
    for name, info in listing.items():
        match = _PARTITION_FILE.fullmatch(name)
        if match is None:
            continue
        try:
            day = date.fromisoformat(match.group(1))
        except ValueError:
            continue
        base = match.group(2)
        files.setdefault(day, {})
        if base == SUCCESS:
            complete.add(day)
        elif base.endswith(extension) and not base.startswith(("_", ".")):
            files[day][name] = info
    return {day: Partition(day, day in complete, dict(sorted(files[day].items()))) for day in sorted(files)}


def list_partitions(options: PartitionedFiles, store: Optional[StorageBackend] = None) -> dict[date, Partition]:
    """The partitions under `options.prefix`, by day: one listing through the storage layer.

    Example:
        >>> import tempfile
        >>> from prefect_tensorflow.tasks.data.partitioned_options import PartitionedFiles
        >>> list_partitions(PartitionedFiles(prefix=tempfile.mkdtemp()))
        {}
    """
    return partitions_of((store or prefix_store(options)).listing(), options.extension)


def prefix_store(options: PartitionedFiles) -> StorageBackend:
    """The storage backend of the (confined) prefix."""
    from ..storage.locations import parse_location
    from ..storage.stores import object_store

    return object_store(parse_location(options.location(), parameter="data_options.prefix"))


def window_manifest(options: PartitionedFiles, window: Any = None) -> tuple[StorageBackend, DataManifest]:
    """The store of the prefix and the manifest of `window` (None: every complete partition): one listing.

    Raises:
        DataError: no partitions under the prefix; a version window; an incomplete partition inside
            the window (naming it); no data file in the window.
    """
    store = prefix_store(options)
    return store, manifest_of(list_partitions(options, store), options, resolved_window(window), source=store.uri())


def resolved_window(window: Any) -> Optional[DataWindow]:
    """`window` as a resolved date window (an open end closed on today, UTC), or None.

    Example:
        >>> resolved_window({"start": "2026-11-29", "days": 2}).label
        '[2026-11-29, 2026-12-01)'
    """
    if window is None:
        return None
    window = window if isinstance(window, DataWindow) else DataWindow.model_validate(window)
    if window.version is not None:
        raise DataError(
            f"window: the partitioned loader reads date windows (dt=YYYY-MM-DD/), received version {window.version!r}"
        )
    return window.resolved(scheduled=None)


def manifest_of(
    partitions: Mapping[date, Partition], options: PartitionedFiles, window: Optional[DataWindow], *, source: str
) -> DataManifest:
    """The manifest of `window`'s partitions (pure: from a listing already made).

    Example:
        >>> from prefect_tensorflow.tasks.data.partitioned_options import PartitionedFiles
        >>> from prefect_tensorflow.tasks.storage.backend import ObjectInfo
        >>> parts = partitions_of({"dt=2026-11-30/a.csv": ObjectInfo(3, "e"), "dt=2026-11-30/_SUCCESS": ObjectInfo(0, "s")}, ".csv")
        >>> m = manifest_of(parts, PartitionedFiles(), DataWindow(start="2026-11-30", end="2026-12-01"), source="/data")
        >>> [(f.name, f.partition, f.splits) for f in m.files]
        [('dt=2026-11-30/a.csv', '2026-11-30', ('train', 'eval'))]
    """
    if not partitions:
        raise DataError(f"data_options.prefix: no partitions (dt=YYYY-MM-DD/ holding *{options.extension} files) under {source}")
    if window is None:
        days = [d for d, p in partitions.items() if p.complete or not options.require_success]
    else:
        days = [d for d in window.dates() if d in partitions]
        incomplete = [d for d in days if not partitions[d].complete]
        if incomplete and options.require_success:
            raise DataError(
                f"data_options.prefix: partition dt={incomplete[0]} in window {window.label} under {source} has no "
                f"{SUCCESS} marker (incomplete); expected complete partitions (or data_options.require_success false)"
            )
    files = [(day, name, info) for day in days for name, info in partitions[day].files.items()]
    if not files:
        where = f"window {window.label}" if window is not None else "any complete partition"
        present = f"partitions from {min(partitions)} to {max(partitions)}"
        raise DataError(f"data_options.prefix: no data in {where} under {source} ({present})")
    last_day = window.dates()[-1] if window is not None else days[-1]
    return DataManifest(
        source=source,
        window=window,
        files=tuple(
            ManifestFile(
                name=name,
                size=info.size,
                etag=info.etag,
                partition=day.isoformat(),
                splits=options.eval.file_splits(day, last_day),
            )
            for day, name, info in files
        ),
        split_rule=options.eval.description,
    )
