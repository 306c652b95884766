"""`watch_data`: the data sensor flow (deployment `data-sensor`, on an interval schedule).

Each pass lists the partitioned prefix once (the partitioned loader's
`list_partitions`), decides about every daily window in reach
(`tasks/data/sensor.py`: announce, same digest, incomplete, before start),
emits `prefect-tensorflow.data.window.closed` for each window to announce,
oldest first, logs every decision and shows them as a table artifact.

Its memory (what it announced, `SensorMemory`) is a JSON file under the data
home, `<home>/sensors/<dataset>-<hash of the prefix>.json`, written through
the storage layer with a conditional write (`if_match`): of two passes that
overlap, the second fails its write instead of overwriting the first's
memory, and its events, the same (dataset, window, digest), have the same ids,
which the Prefect server drops as replays. A file, not a Prefect Variable: a
Variable holds at most 5,000 characters (about 40 windows) and has no
conditional update. The file lives with the worker that runs the sensor: run
the `data-sensor` deployment on one worker (or a data home on a shared
volume). Delete the file to start over (the next pass announces the newest
window only). A pass that announces nothing writes nothing.

The memory is written after the events left this process (the events worker
is drained first): a pass that dies in between sends the same events again
on the next pass, under the same ids.

Example:
    >>> from prefect_tensorflow.flows.data_sensor import memory_name
    >>> memory_name("iris-daily", "s3://team/iris-daily")
    'iris-daily-c877a8699957.json'
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import date, datetime, timezone
from typing import Any, Optional

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict

from prefect_tensorflow.tasks.data.partition_listing import list_partitions, prefix_store
from prefect_tensorflow.tasks.data.partitioned_options import partitioned_options
from prefect_tensorflow.tasks.data.sensor import SensorMemory, WindowDecision, decide_windows, window_event
from prefect_tensorflow.tasks.data.window import MAX_DAYS
from prefect_tensorflow.tasks.errors import DataError
from prefect_tensorflow.tasks.settings import get_settings
from prefect_tensorflow.tasks.storage.backend import PreconditionFailedError, StorageBackend
from prefect_tensorflow.tasks.storage.locations import parse_location
from prefect_tensorflow.tasks.storage.stores import object_store

EVENTS_FLUSH_SECONDS = 60


class SensorReport(BaseModel):
    """What one pass decided: the prefix, each window's decision, and the windows it announced."""

    model_config = ConfigDict(frozen=True)

    prefix: str
    decisions: list[dict[str, Any]]
    announced: list[str]


def memory_name(dataset: str, source: str) -> str:
    """The memory file's name: the dataset's name and a hash of its prefix (two prefixes never share one)."""
    return f"{dataset}-{hashlib.sha256(source.encode()).hexdigest()[:12]}.json"


def read_memory(store: StorageBackend, name: str) -> tuple[SensorMemory, Optional[str]]:
    """The memory in `name` and its etag; an empty memory (etag None) if there is none.

    Raises:
        DataError: the file is not a sensor memory (naming it).
    """
    try:
        data, info = store.read_with_info(name)
    except FileNotFoundError:
        return SensorMemory(), None
    try:
        return SensorMemory.model_validate_json(data), info.etag
    except ValueError as err:
        raise DataError(f"{store.uri(name)}: expected the data sensor's memory (JSON); delete it to start over ({err})") from err


def write_memory(store: StorageBackend, name: str, memory: SensorMemory, etag: Optional[str]) -> None:
    """Write the memory, only if the file is still the one read (`etag`; None: only if there is none).

    Raises:
        FileExistsError, PreconditionFailedError: another pass wrote it in between.
    """
    data = json.dumps(memory.model_dump(mode="json"), indent=1).encode()
    if etag is None:
        store.put_bytes(name, data, create_only=True)
    else:
        store.put_bytes(name, data, if_match=etag)


def scheduled_day() -> date:
    """The UTC day of this flow run's scheduled start (today outside a run): a late pass decides as the on-time one."""
    from prefect.runtime import flow_run

    scheduled = flow_run.scheduled_start_time
    if isinstance(scheduled, datetime):
        return scheduled.astimezone(timezone.utc).date()
    return datetime.now(timezone.utc).date()


def flush_events(timeout: float = EVENTS_FLUSH_SECONDS) -> None:
    """Wait until the events emitted so far left this process (Prefect's events worker drained)."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=timeout)


def _check_days(value: object, parameter: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DAYS:
        raise DataError(f"{parameter}: expected a whole number of days from 1 to {MAX_DAYS}, received {value!r}")
    return value


def _row(decision: WindowDecision, short: bool = False) -> dict[str, Any]:
    digest = decision.digest or ""
    row = {
        "window": decision.window.label,
        "decision": decision.action,
        "reason": decision.reason,
        "files": decision.files,
        "digest": digest[:16] if short else digest,
    }
    if not short:
        row["event_id"] = str(decision.event_id) if decision.event_id else None
    return row


@flow(name="watch-data", log_prints=True)
def watch_data(data_options: Optional[dict[str, Any]] = None, days: int = 1, catch_up_days: int = 30) -> SensorReport:
    """List a partitioned prefix and announce every daily window that closed since the last pass.

    Args:
        data_options: The partitioned loader's options (`prefix`, `name`, ...; None: its defaults, the
            synthetic iris-daily data under the data home); the prefix must be under
            PREFECT_TENSORFLOW_ROOTS in a deployment run.
        days: Days in each window (the window ending on each complete day).
        catch_up_days: How far back a pass looks (a sensor down longer misses the older windows).

    Returns:
        The pass's decisions and the windows it announced.

    Raises:
        DataError: naming `data_options.<key>`, `days` or `catch_up_days`; a memory file that is not one,
            or one another pass wrote meanwhile.
        UnsafeParameterError: naming `data_options.prefix`, outside the roots in a deployment run.

    Example:
        >>> from prefect_tensorflow.flows.data_sensor import watch_data
        >>> watch_data.name, list(watch_data.parameters.properties)
        ('watch-data', ['data_options', 'days', 'catch_up_days'])
    """
    from prefect.artifacts import create_table_artifact
    from prefect.events import emit_event

    logger = get_run_logger()
    days, catch_up_days = _check_days(days, "days"), _check_days(catch_up_days, "catch_up_days")
    options = partitioned_options(data_options or {})
    store = prefix_store(options)
    source = store.uri()
    memory_store = object_store(parse_location(os.path.join(get_settings().home, "sensors"), parameter="sensor memory"))
    name = memory_name(options.name, source)
    memory, etag = read_memory(memory_store, name)
    today = scheduled_day()
    decisions = decide_windows(
        list_partitions(options, store), options, source, memory, today=today, days=days, catch_up_days=catch_up_days
    )
    for decision in decisions:
        logger.info("%s %s: %s (%s)", options.name, decision.window.label, decision.action, decision.reason)
    announce = [d for d in decisions if d.action == "announce"]
    for decision in announce:
        emit_event(**window_event(options, source, decision))
    if announce:
        flush_events()
        try:
            write_memory(memory_store, name, memory.remember(announce, today, catch_up_days), etag)
        except (FileExistsError, PreconditionFailedError) as err:
            raise DataError(
                f"{memory_store.uri(name)}: another pass of the sensor wrote its memory meanwhile; this pass's events "
                "have the ids of that pass's, which the Prefect server drops"
            ) from err
    if not decisions:
        logger.info("%s: no partition under %s within %d days", options.name, source, catch_up_days)
    create_table_artifact(
        [_row(d, short=True) for d in decisions],
        key=f"data-sensor-{options.name.lower().replace('.', '-').replace('_', '-')}",
        description=f"Data sensor on {source}: {len(announce)} window(s) announced",
    )
    return SensorReport(prefix=source, decisions=[_row(d) for d in decisions], announced=[d.window.name for d in announce])
