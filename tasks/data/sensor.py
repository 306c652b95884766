"""The data sensor's decisions: which daily windows of a partitioned prefix to announce (pure).

A window `[end - days, end)` closes when the partition of its last day
(`end - 1`) is complete (`_SUCCESS`). Each pass of the sensor
(`flows/data_sensor.py`) lists the prefix once and decides, for every window
whose last day has a partition, within `catch_up_days` of the run's scheduled
day and not before the sensor's first announced window (`SensorMemory.since`),
oldest first:

- `incomplete`: a partition of the window has no `_SUCCESS` yet: asked again next pass;
- `same digest`: the window's digest (the loader's manifest digest, which
  `retrain` compares with what the model dir last trained on) was announced
  already: nothing is sent, so one digest is never announced twice;
- `announce`: the event `prefect-tensorflow.data.window.closed` is emitted,
  with an id derived from (dataset, window, digest): sent again, it is the same
  event. A window whose files changed after it was announced has a new digest
  and is announced again.

On the first pass (no memory), only the newest complete window is announced
(`before start` for the older ones): deploying a sensor on a prefix with a
year of partitions starts one training, not 365. A sensor that was down
catches up on every window it missed within `catch_up_days`, oldest first.

Example:
    >>> from datetime import date
    >>> from prefect_tensorflow.tasks.data.partition_listing import partitions_of
    >>> from prefect_tensorflow.tasks.data.partitioned_options import PartitionedFiles
    >>> from prefect_tensorflow.tasks.storage.backend import ObjectInfo
    >>> listing = {f"dt=2026-11-{d}/a.csv": ObjectInfo(3, f"e{d}") for d in (28, 29, 30)}
    >>> listing.update({f"dt=2026-11-{d}/_SUCCESS": ObjectInfo(0, "s") for d in (28, 29)})
    >>> parts, options = partitions_of(listing, ".csv"), PartitionedFiles(prefix="/data")
    >>> first = decide_windows(parts, options, "/data", SensorMemory(), today=date(2026, 12, 1))
    >>> [(d.window.name, d.action) for d in first]
    [('2026-11-28_2026-11-29', 'before start'), ('2026-11-29_2026-11-30', 'announce'), ('2026-11-30_2026-12-01', 'incomplete')]
    >>> memory = SensorMemory().remember([d for d in first if d.action == "announce"], today=date(2026, 12, 1))
    >>> [(d.window.name, d.action) for d in decide_windows(parts, options, "/data", memory, today=date(2026, 12, 1))]
    [('2026-11-29_2026-11-30', 'same digest'), ('2026-11-30_2026-12-01', 'incomplete')]
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..errors import DataError
from .partition_listing import Partition, manifest_of
from .partitioned_options import PartitionedFiles
from .window import DataWindow

WINDOW_CLOSED = "prefect-tensorflow.data.window.closed"
EVENT_NAMESPACE = uuid.UUID("0b7c6f5e-2a1d-4c3b-8e9f-5d4c3b2a1f0e")  # event ids from (dataset, window, digest)
Action = Literal["announce", "same digest", "incomplete", "before start"]


class Announcement(BaseModel):
    """One window the sensor announced: its dates, digest and event id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start: date
    end: date
    digest: str
    event_id: str


class SensorMemory(BaseModel):
    """What a sensor announced (windows within its horizon), and its first announced window's end (`since`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = 1
    since: Optional[date] = Field(default=None, description="End of the first window announced; older ones never are")
    announced: tuple[Announcement, ...] = ()

    def digests(self) -> set[str]:
        return {a.digest for a in self.announced}

    def remember(self, decisions: Sequence[WindowDecision], today: date, catch_up_days: int = 30) -> SensorMemory:
        """This memory with the `announce` decisions added and announcements past the horizon dropped."""
        new = [
            Announcement(start=d.window.start, end=d.window.end, digest=d.digest, event_id=str(d.event_id))
            for d in decisions
            if d.action == "announce" and d.window.start is not None and d.window.end is not None and d.digest is not None
        ]
        horizon = today - timedelta(days=catch_up_days)
        kept = tuple(a for a in (*self.announced, *new) if a.end > horizon)
        since = self.since if self.since is not None else min((a.end for a in new), default=None)
        return SensorMemory(since=since, announced=kept)


@dataclass(frozen=True)
class WindowDecision:
    """What the sensor decided about one window, and why (`reason`, as people read it)."""

    window: DataWindow
    action: Action
    reason: str
    digest: Optional[str] = None
    files: int = 0
    event_id: Optional[uuid.UUID] = None


def event_id(dataset: str, window: DataWindow, digest: str) -> uuid.UUID:
    """The announcement's event id: the same (dataset, window, digest) is the same event.

    Example:
        >>> w = DataWindow(start="2026-11-30", end="2026-12-01")
        >>> event_id("iris-daily", w, "ab") == event_id("iris-daily", w, "ab") != event_id("iris-daily", w, "cd")
        True
    """
    return uuid.uuid5(EVENT_NAMESPACE, f"{dataset}|{window.name}|{digest}")


def window_event(options: PartitionedFiles, source: str, decision: WindowDecision) -> dict[str, Any]:
    """The keywords of `prefect.events.emit_event` announcing `decision`'s window (the contract's event)."""
    window = decision.window
    return {
        "event": WINDOW_CLOSED,
        "resource": {"prefect.resource.id": f"prefect-tensorflow.dataset.{options.name}", "prefect.resource.name": options.name},
        "payload": {
            "window": {"start": str(window.start), "end": str(window.end)},
            "digest": decision.digest,
            "prefix": source,
            "files": decision.files,
        },
        "id": decision.event_id,
    }


def decide_windows(
    partitions: Mapping[date, Partition],
    options: PartitionedFiles,
    source: str,
    memory: SensorMemory,
    *,
    today: date,
    days: int = 1,
    catch_up_days: int = 30,
) -> list[WindowDecision]:
    """The decision for every window in reach, oldest first (see the module docstring)."""
    horizon = today - timedelta(days=catch_up_days)
    ends = [day + timedelta(days=1) for day in sorted(partitions) if day >= horizon]
    ends = [end for end in ends if memory.since is None or end >= memory.since]
    announced = memory.digests()
    decisions: list[WindowDecision] = []
    for end in ends:
        window = DataWindow(start=end - timedelta(days=days), end=end)
        incomplete = [day for day in window.dates() if day in partitions and not partitions[day].complete]
        if incomplete and options.require_success:
            decisions.append(WindowDecision(window, "incomplete", f"partition dt={incomplete[0]} has no _SUCCESS marker yet"))
            continue
        try:
            manifest = manifest_of(partitions, options, window, source=source)
        except DataError as err:  # a complete partition without data files
            decisions.append(WindowDecision(window, "incomplete", str(err)))
            continue
        files = len(manifest.files)
        if manifest.digest in announced:
            decisions.append(WindowDecision(window, "same digest", "announced before", manifest.digest, files))
            continue
        decisions.append(
            WindowDecision(
                window, "announce", f"{files} files", manifest.digest, files, event_id(options.name, window, manifest.digest)
            )
        )
    if memory.since is None:  # the first pass: the newest window only
        newest = max((i for i, d in enumerate(decisions) if d.action == "announce"), default=None)
        decisions = [
            WindowDecision(d.window, "before start", "older than the sensor's first window", d.digest, d.files)
            if d.action == "announce" and i != newest
            else d
            for i, d in enumerate(decisions)
        ]
    return decisions
