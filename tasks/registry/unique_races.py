"""Registry writes that two runs may make at once: set again when the store's select-then-insert races.

MLflow's database store sets a tag or an alias by looking for the row, then
inserting it when there is none. Two runs that set the same new tag on the
same version at once (two UI runs of `export-checkpoint` for one checkpoint
share a version, and each records its gate decision on it) can both find
none; the second insert then fails on the table's unique key (SQLite:
`sqlite3.IntegrityError: UNIQUE constraint failed`, PostgreSQL:
`UniqueViolation`), directly or as the tracking server's answer. Setting a
tag or an alias is idempotent, so `retry_unique_race` sets it again: the row
now exists and the store updates it. `UniqueRaceRetries` does that for the
client's `set_model_version_tag`, `set_registered_model_tag` and
`set_registered_model_alias`.

Example:
    >>> from mlflow.exceptions import MlflowException
    >>> calls = []
    >>> def set_tag():
    ...     calls.append(1)
    ...     if len(calls) == 1:
    ...         raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: model_version_tags.key")
    ...     return "set"
    >>> retry_unique_race(set_tag), len(calls)
    ('set', 2)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

MARKERS = ("UniqueViolation", "unique constraint", "UNIQUE constraint", "already exists", "IntegrityError")
"""What the store's error says when two first-time inserts of one key raced (SQLite, PostgreSQL, MySQL)."""
ATTEMPTS = 5


def is_unique_race(err: BaseException) -> bool:
    """Whether `err` is an `MlflowException` saying a unique key was taken (by a concurrent insert)."""
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and any(marker in str(err) for marker in MARKERS)


def retry_unique_race(call: Callable[[], T], attempts: int = ATTEMPTS) -> T:
    """`call()`, called again (up to `attempts` in all, a short pause between) while it loses a unique-key race.

    Only for idempotent writes (setting a tag or an alias): anything else is raised at once.
    """
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:
            if attempt == attempts - 1 or not is_unique_race(err):
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")  # the loop returns or raises


class UniqueRaceRetries:
    """A mixin for an `MlflowClient`: its tag and alias setters retry a lost unique-key race (see the module)."""

    def set_model_version_tag(self, *args: Any, **kwargs: Any) -> Any:
        return retry_unique_race(lambda: super(UniqueRaceRetries, self).set_model_version_tag(*args, **kwargs))  # type: ignore[misc]

    def set_registered_model_tag(self, *args: Any, **kwargs: Any) -> Any:
        return retry_unique_race(lambda: super(UniqueRaceRetries, self).set_registered_model_tag(*args, **kwargs))  # type: ignore[misc]

    def set_registered_model_alias(self, *args: Any, **kwargs: Any) -> Any:
        return retry_unique_race(lambda: super(UniqueRaceRetries, self).set_registered_model_alias(*args, **kwargs))  # type: ignore[misc]
