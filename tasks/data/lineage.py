"""What a model dir last trained on (`data-lineage.json`), and the decisions made from it.

A windowed training (a loader that reads a `DataWindow`) records, after it
shipped, the window, the digests of its manifest, the MLflow run and the
directory it trained in, as `<model_dir>/data-lineage.json` (written
atomically through the storage layer, local or object store). The next run
reads it before anything else: the same digest means the same files, so the
run ends early with a stated reason (`unchanged_reason`) unless forced.

Where a windowed training writes: `<model_dir>/windows/<window.name>/<UTC stamp>`
(`window_run_dir`), a fresh directory per run. A window is trained from
scratch, so the same window data and config give the same weights; a re-run
or a backfill never resumes, replaces or deletes an earlier run's checkpoints.

The decisions here are pure functions: which window a run reads
(`effective_window`), whether it is unchanged (`unchanged_reason`).

Example:
    >>> from prefect_tensorflow.tasks.data.lineage import DataLineage, unchanged_reason
    >>> from prefect_tensorflow.tasks.data.window import DataWindow
    >>> w = DataWindow(start="2026-11-30", end="2026-12-01")
    >>> last = DataLineage(window=w, source="s3://team/iris-daily", digest="ab" * 32, train_digest="t", eval_digest="e",
    ...                    run_id="r1", trained_dir="/m/windows/x/1")
    >>> print(unchanged_reason(last, last.model_copy(update={"run_id": None}), force=False))
    data unchanged: window [2026-11-30, 2026-12-01) digest abababababab... was trained by run r1; --force to retrain
    >>> unchanged_reason(last, last, force=True) is None
    True
"""

from __future__ import annotations

import json
from datetime import date, datetime, timezone
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import DataError
from ..storage.locations import Location, parse_location
from ..storage.stores import object_store
from .manifest import DataManifest
from .window import DataWindow

LINEAGE_FILE = "data-lineage.json"
WINDOWS_DIR = "windows"
STATS_DIR = "data-stats"


class DataLineage(BaseModel):
    """The data a training read: its window, the manifest's digests, and (once trained) the run and directory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    window: DataWindow
    source: str = Field(description="Where the data is (the manifest's source)")
    digest: str = Field(description="The manifest's digest (source, window, every file's name, size and etag)")
    train_digest: str
    eval_digest: str
    files: int = 0
    rows: Optional[int] = None
    size: int = 0
    run_id: Optional[str] = Field(default=None, description="The MLflow run that trained on it")
    trained_dir: Optional[str] = Field(default=None, description="The directory the window was trained in")
    trained_at: Optional[str] = Field(default=None, description="When (UTC, ISO 8601)")

    def tags(self) -> dict[str, str]:
        """The `data.*` tags of an MLflow run and model version.

        Example:
            >>> w = DataWindow(start="2026-11-30", end="2026-12-01")
            >>> sorted(DataLineage(window=w, source="s", digest="d", train_digest="t", eval_digest="e").tags())
            ['data.digest', 'data.eval.digest', 'data.files', 'data.source', 'data.train.digest', 'data.window']
        """
        tags = {
            "data.window": self.window.label,
            "data.digest": self.digest,
            "data.train.digest": self.train_digest,
            "data.eval.digest": self.eval_digest,
            "data.source": self.source,
            "data.files": str(self.files),
        }
        if self.rows is not None:
            tags["data.rows"] = str(self.rows)
        return tags


def lineage_of(manifest: DataManifest, window: DataWindow) -> DataLineage:
    """The lineage of a window's manifest (not yet trained: no run, no directory).

    Example:
        >>> from prefect_tensorflow.tasks.data.manifest import ManifestFile
        >>> w = DataWindow(start="2026-11-30", end="2026-12-01")
        >>> m = DataManifest(source="/d", window=w, files=(ManifestFile(name="a.csv", size=3, etag="e", rows=2),))
        >>> lineage_of(m, w).rows, lineage_of(m, w).digest == m.digest
        (2, True)
    """
    return DataLineage(
        window=window,
        source=manifest.source,
        digest=manifest.digest,
        train_digest=manifest.split_digest("train"),
        eval_digest=manifest.split_digest("eval"),
        files=len(manifest.files),
        rows=manifest.rows,
        size=manifest.size,
    )


def effective_window(
    window: Optional[DataWindow],
    configured: Optional[DataWindow],
    *,
    takes_window: bool,
    scheduled: Optional[Union[datetime, date]],
) -> Optional[DataWindow]:
    """The window a run reads: `window` (the flow parameter), else the training's, else one day; resolved
    against `scheduled` (the run's scheduled start). None for a loader that reads no window.

    Example:
        >>> effective_window(None, None, takes_window=True, scheduled=date(2026, 12, 1)).label
        '[2026-11-30, 2026-12-01)'
        >>> effective_window(None, None, takes_window=False, scheduled=None) is None
        True

    Raises:
        ValueError: naming `window`, when a window is given for a loader that reads none.
    """
    if not takes_window:
        given = window if window is not None else configured
        if given is not None:
            raise ValueError(
                f"window: the dataset loader reads no window (it is load(split)); expected no window, received "
                f"{given.model_dump(mode='json', exclude_none=True)}"
            )
        return None
    chosen = window if window is not None else configured if configured is not None else DataWindow()
    return chosen.resolved(scheduled)


def unchanged_reason(previous: Optional[DataLineage], current: DataLineage, *, force: bool) -> Optional[str]:
    """Why a run trains nothing: the model dir last trained on these very files; None: train."""
    if force or previous is None or previous.digest != current.digest:
        return None
    return (
        f"data unchanged: window {current.window.label} digest {current.digest[:12]}... was trained by run "
        f"{previous.run_id or '(unknown)'}; --force to retrain"
    )


def window_run_dir(model_dir: str, window: DataWindow, now: Optional[datetime] = None) -> str:
    """`<model_dir>/windows/<window.name>/<UTC stamp>`: a fresh directory for one run on `window`.

    Example:
        >>> window_run_dir("s3://team/m", DataWindow(start="2026-11-30", end="2026-12-01"), datetime(2026, 12, 1, 2, 0))
        's3://team/m/windows/2026-11-30_2026-12-01/20261201T020000.000000Z'
    """
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S.%fZ")
    return parse_location(model_dir, parameter="model_dir").join(WINDOWS_DIR, window.name, stamp).uri


def read_lineage(model_dir: str) -> Optional[DataLineage]:
    """`<model_dir>/data-lineage.json`, or None when there is none.

    Raises:
        DataError: the file is not a lineage record (naming the file).
    """
    text = _read(parse_location(model_dir, parameter="model_dir"), LINEAGE_FILE)
    if text is None:
        return None
    try:
        return DataLineage.model_validate_json(text)
    except ValidationError as err:
        where = parse_location(model_dir, parameter="model_dir").join(LINEAGE_FILE)
        first = err.errors()[0]
        raise DataError(f"{where}: expected a data lineage record: {'.'.join(map(str, first['loc']))}: {first['msg']}") from err


def write_lineage(model_dir: str, lineage: DataLineage) -> str:
    """Write `<model_dir>/data-lineage.json` atomically (local or object store); returns its location."""
    location = parse_location(model_dir, parameter="model_dir")
    object_store(location).put_bytes(LINEAGE_FILE, lineage.model_dump_json(indent=2).encode())
    return location.join(LINEAGE_FILE).uri


def write_window_statistics(model_dir: str, window: DataWindow, statistics: dict) -> str:
    """Keep a trained window's statistics (JSON) as `<model_dir>/data-stats/<window.name>.json`; returns its location."""
    location = parse_location(model_dir, parameter="model_dir")
    name = f"{STATS_DIR}/{window.name}.json"
    object_store(location).put_bytes(name, json.dumps(statistics, sort_keys=True).encode())
    return location.join(STATS_DIR, f"{window.name}.json").uri


def read_window_statistics(model_dir: str, window: DataWindow) -> Optional[dict]:
    """The statistics kept for `window` (`write_window_statistics`), or None.

    Raises:
        DataError: the file is not JSON (naming the file).
    """
    location = parse_location(model_dir, parameter="model_dir")
    text = _read(location, f"{STATS_DIR}/{window.name}.json")
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as err:
        raise DataError(f"{location.join(STATS_DIR, window.name + '.json')}: expected JSON statistics: {err}") from err
    if not isinstance(value, dict):
        raise DataError(f"{location.join(STATS_DIR, window.name + '.json')}: expected a JSON object of statistics")
    return value


def _read(location: Location, name: str) -> Optional[bytes]:
    try:
        return object_store(location).read_bytes(name)
    except FileNotFoundError:
        return None
