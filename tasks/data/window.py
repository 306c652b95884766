"""`DataWindow`: the whole UTC days a training reads, `[start, end)`, or a dataset version.

A window is days, not instants: daily partitions (`dt=YYYY-MM-DD/`) are the
unit data arrives in, and a day is in the window when `start <= day < end`.
`end` is exclusive, as Airflow's data interval and TFX's spans are: the run
scheduled on 2026-12-01 at 02:00 trains the days before 2026-12-01.

A window left open is closed by `resolved(scheduled)`: `end` defaults to the
*scheduled* start day of the flow run (not the wall clock), so a late run, a
retry or a backfill trains exactly what the on-time run would have; `start`
defaults to `end - days`. A `version` label names a dataset version instead
of dates, for loaders whose data is versioned rather than dated.

Example:
    >>> from prefect_tensorflow.tasks.data.window import DataWindow
    >>> w = DataWindow(end="2026-12-01", days=3).resolved(scheduled=None)
    >>> w.start.isoformat(), w.end.isoformat(), w.name
    ('2026-11-28', '2026-12-01', '2026-11-28_2026-12-01')
    >>> [d.isoformat() for d in w.dates()]
    ['2026-11-28', '2026-11-29', '2026-11-30']
    >>> w.contains(w.start), w.contains(w.end)
    (True, False)
    >>> DataWindow(version="v3").name
    'version-v3'
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Annotated, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from ..config_checks import integer_between, text_matching

MAX_DAYS = 3660
VersionLabel = Annotated[
    str,
    AfterValidator(text_matching(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", "a version label of letters, digits, '.', '_' or '-'", 64)),
]


def _day(value: object) -> object:
    """A date from a date, a `YYYY-MM-DD` string or a datetime (its UTC day); anything else is left to pydantic."""
    if isinstance(value, datetime):
        return (value.astimezone(timezone.utc) if value.tzinfo else value).date()
    if isinstance(value, str) and "T" in value:
        try:
            return _day(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return value
    return value


Day = Annotated[date, BeforeValidator(_day)]


class DataWindow(BaseModel):
    """The UTC days `[start, end)` a training reads (or a dataset `version`); see the module docstring."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start: Optional[Day] = Field(default=None, description="First day read (YYYY-MM-DD); default: end - days")
    end: Optional[Day] = Field(
        default=None, description="Day after the last day read (YYYY-MM-DD, exclusive); default: the run's scheduled start day"
    )
    days: Annotated[int, Field(ge=1, le=MAX_DAYS), BeforeValidator(integer_between(1, MAX_DAYS))] = Field(
        default=1, description="Days in the window when start is left out"
    )
    version: Optional[VersionLabel] = Field(default=None, description="A dataset version label instead of dates")

    @model_validator(mode="after")
    def _consistent(self) -> DataWindow:
        if self.version is not None and (self.start is not None or self.end is not None):
            raise ValueError(f"window: expected either dates (start, end) or a version, received both (version {self.version!r})")
        if self.start is not None and self.end is not None and self.start >= self.end:
            raise ValueError(
                f"window: expected start before end (end is exclusive), received start {self.start} and end {self.end}"
            )
        return self

    @property
    def is_resolved(self) -> bool:
        """Whether the window names its data on its own (both dates, or a version)."""
        return self.version is not None or (self.start is not None and self.end is not None)

    def resolved(self, scheduled: Optional[Union[datetime, date]]) -> DataWindow:
        """This window with its open ends closed: `end` from `scheduled` (the run's scheduled start;
        None: today, UTC), `start` from `end - days`."""
        if self.is_resolved:
            return self
        if self.end is not None:
            end = self.end
        elif self.start is not None:
            end = self.start + timedelta(days=self.days)
        else:
            day = _day(scheduled) if scheduled is not None else datetime.now(timezone.utc).date()
            assert isinstance(day, date)
            end = day
        start = self.start if self.start is not None else end - timedelta(days=self.days)
        return DataWindow(start=start, end=end)

    def contains(self, day: date) -> bool:
        """Whether the partition of `day` is in the window (a resolved date window)."""
        self._need_dates()
        assert self.start is not None and self.end is not None
        return self.start <= day < self.end

    def dates(self) -> list[date]:
        """The days of a resolved date window, in order."""
        self._need_dates()
        assert self.start is not None and self.end is not None
        return [self.start + timedelta(days=n) for n in range((self.end - self.start).days)]

    @property
    def name(self) -> str:
        """A path- and tag-safe name: `2026-11-30_2026-12-01` (end exclusive) or `version-v3`."""
        if self.version is not None:
            return f"version-{self.version}"
        self._need_dates()
        return f"{self.start}_{self.end}"

    @property
    def label(self) -> str:
        """How people read it: `[2026-11-30, 2026-12-01)` or `version v3`."""
        return f"version {self.version}" if self.version is not None else f"[{self.start}, {self.end})"

    def _need_dates(self) -> None:
        if self.version is not None or self.start is None or self.end is None:
            raise ValueError(f"window {self.model_dump(mode='json', exclude_none=True)}: expected a resolved date window")
