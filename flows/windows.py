"""The data window in a flow: which window a run reads, whether it is new, where it trains, what it records.

`retrain` and `sweep` read a window when their dataset loader takes one
(`DataSource.takes_window`): the `window` parameter, else `training.window`,
else one day, closed against the flow run's *scheduled* start time
(`prefect.runtime.flow_run.scheduled_start_time`; a CLI or library call's
run is scheduled now), so a late run, a retry or a backfill reads what the
on-time run would have. The resolved window goes into `training.window`:
training, the sidecar evaluator, export verification and the champion gate
read it from there. A loader that reads no window (iris) runs as it always
did; a window given to it is refused, naming `window`.

`plan_window_run` lists the window (`DataSource.manifest`), compares its
digest with `<model_dir>/data-lineage.json` (`data.lineage.unchanged_reason`)
and names a fresh directory for the run, `<model_dir>/windows/<window>/<stamp>`.
A window that is new is then checked (`data.window_checks.check_window`):
against the schema in `<model_dir>/data-schema.json` (an anomaly blocks the
run before anything is trained: `DataValidationError`, and a table artifact
naming each column and value), and for drift against the previous trained
window's statistics (`<model_dir>/data-stats/<window>.json`) and the
champion's (its training run's `data/statistics.json`). `record_window_run`
(after the training shipped) keeps the window's statistics and writes
`data-lineage.json`.

Two runs of one window at once (a scheduled run beside a manual one, a
retry beside a run still alive): `retrain` holds the window's lease
(`window_lease`: `<model_dir>/windows/.ptf-window-<window>.lock`, or a
lease object on object storage) from planning until the lineage is written.
The second run waits up to `PREFECT_TENSORFLOW_LEASE_WAIT` seconds: if the
first finished meanwhile, it plans against the lineage the first wrote and
skips ("data unchanged"); otherwise it fails with `ModelDirBusyError` naming
the holder. It never trains the same window a second time beside the first.

Example:
    >>> from prefect_tensorflow.flows.windows import windowed_training
    >>> from prefect_tensorflow.tasks.configs import TrainingConfig
    >>> windowed_training(TrainingConfig(), None).window is None  # iris reads no window
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from prefect_tensorflow.tasks.checkpoints.model_dir import ModelDir
from prefect_tensorflow.tasks.configs import TrainingConfig
from prefect_tensorflow.tasks.data.lineage import (
    WINDOWS_DIR,
    DataLineage,
    effective_window,
    lineage_of,
    read_lineage,
    read_window_statistics,
    unchanged_reason,
    window_run_dir,
    write_lineage,
    write_window_statistics,
)
from prefect_tensorflow.tasks.data.manifest import DataManifest
from prefect_tensorflow.tasks.data.window import DataWindow
from prefect_tensorflow.tasks.data.window_checks import WindowCheck, check_window, train_statistics
from prefect_tensorflow.tasks.errors import DataValidationError
from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
from prefect_tensorflow.tasks.run_context import get_logger
from prefect_tensorflow.tasks.training.model_dir_lease import hold_model_dir


def scheduled_start() -> datetime:
    """The flow run's scheduled start time (outside a flow run: now, UTC)."""
    from prefect.runtime import flow_run

    scheduled = flow_run.scheduled_start_time
    return scheduled if isinstance(scheduled, datetime) else datetime.now(timezone.utc)


def windowed_training(training: TrainingConfig, window: Optional[DataWindow]) -> TrainingConfig:
    """`training` with its effective window resolved into `training.window` (unchanged for a loader that reads none).

    Raises:
        ValueError: naming `window`, when a window is given for a loader that reads none.
    """
    source = training.data_source()
    takes = source.takes_window()
    if not takes and window is None and training.window is None:
        return training
    resolved = effective_window(window, training.window, takes_window=takes, scheduled=scheduled_start() if takes else None)
    return training.model_copy(update={"window": resolved})


@contextmanager
def window_lease(model_dir: str, window: Optional[DataWindow]) -> Iterator[None]:
    """Hold `window`'s lease in `<model_dir>/windows/` for the block (nothing for a run without a window).

    Raises:
        ModelDirBusyError: another run of this window held it for `PREFECT_TENSORFLOW_LEASE_WAIT` seconds.
    """
    if window is None:
        yield
        return
    windows = ModelDir.parse(model_dir).location.join(WINDOWS_DIR)
    subject = f"{windows.join(window.name).uri} (window {window.label})"
    with hold_model_dir(ModelDir(windows), what=f"window {window.name}", name=window_lease_name(window), subject=subject):
        yield


def window_lease_name(window: DataWindow) -> str:
    """The name of a window's lease in `<model_dir>/windows/` (beside, not in, the window's run directories).

    Example:
        >>> from datetime import date
        >>> window_lease_name(DataWindow(start=date(2026, 11, 30), end=date(2026, 12, 1)))
        '.ptf-window-2026-11-30_2026-12-01'
    """
    return f".ptf-window-{window.name}"


@dataclass(frozen=True)
class WindowRun:
    """A windowed run's plan: its training, the window's manifest and lineage, the last trained one, where it trains."""

    training: TrainingConfig
    trained_dir: str
    manifest: Optional[DataManifest]
    lineage: Optional[DataLineage]
    previous: Optional[DataLineage]
    skipped: Optional[str] = None
    checked: Optional[WindowCheck] = None

    @property
    def window(self) -> DataWindow:
        assert self.training.window is not None
        return self.training.window

    def tags(self) -> dict[str, str]:
        """The `data.*` tags of the run and the version: lineage, then drift."""
        return {
            **(self.lineage.tags() if self.lineage is not None else {}),
            **(self.checked.tags() if self.checked is not None else {}),
        }

    def documents(self) -> dict[str, Any]:
        """The `data/` artifacts beside the manifest: statistics, drift, schema."""
        return self.checked.documents() if self.checked is not None else {}


def plan_window_run(
    model_dir: str,
    training: TrainingConfig,
    *,
    force: bool,
    connection: Optional[MlflowConfig] = None,
    registered_model_name: str = "",
) -> WindowRun:
    """List the window, compare it with what `model_dir` last trained on, check a new one, name the run's directory.

    Raises:
        DataError, TrainingError: the loader cannot list or read the window (naming it).
        DataError: `data-lineage.json` or `data-schema.json` is malformed.
        DataValidationError: the window breaks the schema (one line per anomaly; a table artifact names them).
    """
    assert training.window is not None
    manifest = training.data_source().manifest()
    lineage = lineage_of(manifest, training.window) if manifest is not None else None
    previous = read_lineage(model_dir)
    skipped = unchanged_reason(previous, lineage, force=force) if lineage is not None else None
    if skipped is None and lineage is not None and previous is not None and previous.digest == lineage.digest:
        get_logger().info("window %s is unchanged since run %s; retraining (force)", lineage.window.label, previous.run_id)
    checked = None
    if skipped is None:
        baselines = {
            "previous": train_statistics(read_window_statistics(model_dir, previous.window)) if previous is not None else None,
            "champion": _champion_statistics(connection, registered_model_name),
        }
        try:
            checked = check_window(training.data_source(), model_dir, baselines)
        except DataValidationError as err:
            from .artifacts import publish_anomalies

            publish_anomalies(err.anomalies, training.window)
            raise
        if lineage is not None and lineage.rows is None:  # a listing knows no rows; the statistics just counted them
            lineage = lineage.model_copy(update={"rows": sum(stats.rows for stats in checked.statistics.values())})
    return WindowRun(
        training=training,
        trained_dir=window_run_dir(model_dir, training.window),
        manifest=manifest,
        lineage=lineage,
        previous=previous,
        skipped=skipped,
        checked=checked,
    )


def _champion_statistics(connection: Optional[MlflowConfig], name: str) -> Any:
    if connection is None or not name:
        return None
    from prefect_tensorflow.tasks.registry.data_lineage import champion_document

    return train_statistics(champion_document(connection, name))


def record_window_run(model_dir: str, plan: WindowRun, run_id: Optional[str]) -> Optional[DataLineage]:
    """After a windowed training shipped: `data-lineage.json` names the window, its digests, the run and directory."""
    if plan.checked is not None:
        write_window_statistics(model_dir, plan.window, plan.documents()["statistics.json"])
    if plan.lineage is None:
        return None
    trained = plan.lineage.model_copy(
        update={
            "run_id": run_id,
            "trained_dir": plan.trained_dir,
            "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    write_lineage(model_dir, trained)
    return trained
