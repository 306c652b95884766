"""Guarded alias moves and their history: one lock per registered model, compare-and-set, a tag per move.

What serving reads is an alias (`models:/iris@champion`), so every move of
one is deliberate and recorded:

- `registry_lock(name)`: one lock per registered model, a Prefect global
  concurrency limit of 1 named after the model (created on first use). Its
  slot is held with a lease of `LEASE_SECONDS` that a thread renews while the
  block runs; a holder that dies stops renewing, and a `prefect server`
  frees the slot when the lease has expired (its repossessor looks every
  15 s). Prefect's ephemeral API (no `PREFECT_API_URL`) runs no repossessor:
  there a killed holder's slot stays taken, and the timeout's error says how
  to free it.
- `move_alias(...)`: inside the lock, the alias is read again; if it no
  longer names the version the caller decided against (`expected_from`),
  `AliasMovedError` says where it is now (re-decide, or give up), else it is
  set (the first-time PostgreSQL unique-violation race retried) and recorded.
- every move this project makes (`champion`, `challenger`, the aliases users
  ask for) is a tag on the version that received it,
  `prefect_tensorflow.alias_move.<alias>.<epoch ms>-<random>` = the `AliasMove` as
  short JSON: who (the Prefect flow run, else `user@host`), from and to,
  when, why, kind. `alias_history` reads them back, oldest first.

Example:
    >>> from prefect_tensorflow.tasks.registry.aliases import AliasMove, lock_name
    >>> lock_name("iris")
    'prefect-tensorflow-registry-iris-47612b3175fe'
    >>> move = AliasMove(alias="champion", from_version=1, to_version=2, when="2026-12-06T17:00:00.000Z",
    ...                  by="export-iris-200", run_url=None, reason="promoted", kind="gate")
    >>> AliasMove.from_tag(move.tag_value()) == move
    True
"""

from __future__ import annotations

import getpass
import hashlib
import re
import secrets
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..errors import AliasMovedError, RegistryError
from ..run_context import get_logger, prefect_run_tags
from .tracking import TAG_PREFIX
from .unique_races import retry_unique_race

__all__ = [
    "LEASE_SECONDS",
    "MOVE_TAG_PREFIX",
    "AliasMove",
    "AliasMovedError",
    "alias_history",
    "current_alias_version",
    "lock_name",
    "move_alias",
    "point_alias",
    "registry_lock",
]

MOVE_TAG_PREFIX = TAG_PREFIX + "alias_move."
# The lease on the lock's slot: renewed every 45 s while held (Prefect renews at 3/4 of it);
# 60 s is the shortest the Prefect API accepts.
LEASE_SECONDS = 60
REASON_LIMIT = 500  # characters of a move's reason kept in its tag (the tag stays short)

MoveKind = Literal["gate", "rollback", "manual"]


class AliasMove(BaseModel):
    """One move of an alias, as recorded on the version that received it."""

    model_config = ConfigDict(frozen=True)

    alias: str
    from_version: Optional[int] = Field(description="The version the alias named before; None: it was new")
    to_version: int
    when: str = Field(description="ISO 8601 UTC, milliseconds")
    by: str = Field(description="The Prefect flow run's name, else user@host")
    run_url: Optional[str] = Field(default=None, description="The Prefect flow run's UI URL")
    reason: str
    kind: MoveKind

    def tag_value(self) -> str:
        """Compact JSON (the tag's value)."""
        return self.model_dump_json()

    @classmethod
    def from_tag(cls, value: str) -> AliasMove:
        """Parse a tag's value (raises `pydantic.ValidationError` or `ValueError` on a malformed one)."""
        return cls.model_validate_json(value)


def lock_name(name: str) -> str:
    """The Prefect global concurrency limit that is the lock of registered model `name`.

    A limit's name may not hold '/', '%', '&', '<' or '>' and goes into URLs: the model's name
    is kept to letters, digits, '.', '_' and '-' (at most 40), and a hash of the whole name keeps
    two models whose names differ only elsewhere apart.
    """
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:40] or "model"
    return f"prefect-tensorflow-registry-{readable}-{hashlib.sha256(name.encode('utf-8')).hexdigest()[:12]}"


def _ensure_limit(limit: str) -> None:
    """Create the limit (1 slot) unless it exists: Prefect 3.9 skips an unknown limit without blocking."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
        except ObjectAlreadyExists:
            pass


@contextmanager
def registry_lock(name: str, *, timeout_seconds: float = 600) -> Iterator[None]:
    """Hold the lock of registered model `name` (one holder at a time, across processes and machines).

    A Prefect global concurrency limit of 1 slot (`lock_name(name)`), on the Prefect API this
    process uses. The slot is leased for `LEASE_SECONDS` and renewed while the block runs: a
    holder that dies is out after at most that plus the server's repossessor interval (15 s).

    Raises:
        RegistryError: the lock was not free within `timeout_seconds` (naming the model and the
            limit), or the Prefect API refused.

    Example:
        >>> from prefect import flow
        >>> @flow
        ... def careful() -> None:
        ...     with registry_lock("iris"):
        ...         pass  # read the alias, decide, move it
    """
    from prefect.concurrency.sync import concurrency

    limit = lock_name(name)
    stack = ExitStack()
    try:
        _ensure_limit(limit)
        stack.enter_context(
            concurrency(limit, occupy=1, timeout_seconds=timeout_seconds, lease_duration=LEASE_SECONDS, strict=True)
        )
    except TimeoutError as err:
        raise RegistryError(
            f"registered model {name!r}: its lock (Prefect global concurrency limit {limit!r}) was not free "
            f"within {timeout_seconds:g} s: another run is moving its aliases. A holder that died is freed by a "
            f"Prefect server {LEASE_SECONDS} s after its last renewal; on Prefect's ephemeral API, free it with "
            f"`prefect global-concurrency-limit update {limit} --active-slots 0`"
        ) from err
    except Exception as err:
        if isinstance(err, RegistryError):
            raise
        raise RegistryError(f"registered model {name!r}: cannot take its lock {limit!r} on the Prefect API: {err}") from err
    with stack:
        yield


def current_alias_version(client: Any, name: str, alias: str) -> Optional[int]:
    """The version `alias` of registered model `name` names now, or None when it names none.

    Raises:
        RegistryError: no registered model `name`.
    """
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"registered_model_name: no registered model {name!r} in the MLflow registry") from err
        raise
    version = (model.aliases or {}).get(alias)
    return int(version) if version is not None else None


def _set_alias(client: Any, name: str, alias: str, version: int) -> None:
    """`set_registered_model_alias`, set again when two first-time sets of one alias race (`unique_races`)."""
    retry_unique_race(lambda: client.set_registered_model_alias(name, alias, str(version)))


def _who() -> tuple[str, Optional[str]]:
    """(the Prefect flow run's name, its UI URL), else (`user@host`, None)."""
    tags = prefect_run_tags()
    if tags.get("prefect.flow_run_name"):
        return tags["prefect.flow_run_name"], tags.get("prefect.flow_run_url")
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (a container's numeric uid): still say where
        user = "unknown"
    return f"{user}@{socket.gethostname()}", None


def _record(client: Any, name: str, move: AliasMove, epoch_ms: int) -> None:
    # A random part: two unlocked moves of one alias to one version in the same millisecond
    # (challenger, user aliases) are two tags, not one key written twice at once.
    key = f"{MOVE_TAG_PREFIX}{move.alias[:120]}.{epoch_ms}-{secrets.token_hex(3)}"
    client.set_model_version_tag(name, str(move.to_version), key, move.tag_value())


def point_alias(
    client: Any, name: str, alias: str, to_version: int, *, reason: str, kind: MoveKind = "manual"
) -> Optional[AliasMove]:
    """Point `alias` at `to_version` whatever it names now, and record the move (no compare-and-set).

    For the aliases nobody decides against (`challenger`, a user's `staging`); `champion`
    moves with `move_alias`, under `registry_lock`.

    Returns:
        The recorded move, or None when the alias already named `to_version` (nothing is set or recorded).
    """
    before = current_alias_version(client, name, alias)
    if before == to_version:
        return None
    _set_alias(client, name, alias, to_version)
    return _recorded(client, name, alias, before, to_version, reason, kind)


def _recorded(
    client: Any, name: str, alias: str, before: Optional[int], to_version: int, reason: str, kind: MoveKind
) -> AliasMove:
    now = datetime.now(timezone.utc)
    by, url = _who()
    move = AliasMove(
        alias=alias,
        from_version=before,
        to_version=to_version,
        when=now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        by=by,
        run_url=url,
        reason=" ".join(reason.split())[:REASON_LIMIT],
        kind=kind,
    )
    _record(client, name, move, int(now.timestamp() * 1000))
    get_logger().info("%s: @%s moved from version %s to %s (%s): %s", name, alias, before, to_version, kind, move.reason)
    return move


def move_alias(
    client: Any,
    name: str,
    alias: str,
    to_version: int,
    *,
    expected_from: Optional[int],
    reason: str,
    kind: MoveKind = "gate",
) -> AliasMove:
    """Move `alias` to `to_version` if it still names `expected_from`; record the move. Call it inside `registry_lock(name)`.

    Args:
        client: an `MlflowClient` (`MlflowConfig.client()`).
        name: the registered model.
        alias: e.g. `champion`.
        to_version: the version it moves to.
        expected_from: the version the caller read and decided against (None: the alias was unset).
        reason: why (kept in the history, at most 500 characters).
        kind: `gate`, `rollback` or `manual`.

    Returns:
        The move. When the alias already names `to_version` (and that was expected), nothing is set
        or recorded and the move returned has `from_version == to_version`.

    Raises:
        AliasMovedError: the alias names another version than `expected_from` now (`err.current`).
        RegistryError: no registered model `name`.

    Example:
        >>> from prefect import flow
        >>> from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
        >>> @flow
        ... def promote(version: int, decided_against: int) -> None:
        ...     client = MlflowConfig().client()
        ...     with registry_lock("iris"):
        ...         move_alias(client, "iris", "champion", version, expected_from=decided_against, reason="better")
    """
    current = current_alias_version(client, name, alias)
    if current != expected_from:
        raise AliasMovedError(name, alias, expected_from, current)
    if current == to_version:
        by, url = _who()
        return AliasMove(
            alias=alias,
            from_version=current,
            to_version=to_version,
            when=datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            by=by,
            run_url=url,
            reason="already there: nothing moved",
            kind=kind,
        )
    _set_alias(client, name, alias, to_version)
    return _recorded(client, name, alias, current, to_version, reason, kind)


def alias_history(client: Any, name: str, alias: Optional[str] = None) -> list[AliasMove]:
    """Every recorded move of `alias` (None: of every alias) of registered model `name`, oldest first.

    Read from the `alias_move` tags of all its versions; a tag that does not parse is skipped
    with a warning naming it.

    Raises:
        RegistryError: no registered model `name`.
    """
    current_alias_version(client, name, alias or "champion")  # an unknown model fails here, naming it
    found: list[tuple[int, str, AliasMove]] = []
    for mv in client.search_model_versions(f"name = '{_quote(name)}'"):
        for key, value in (mv.tags or {}).items():
            if not key.startswith(MOVE_TAG_PREFIX):
                continue
            try:
                move = AliasMove.from_tag(value)
                stamp = int(key.rsplit(".", 1)[1].split("-", 1)[0])
            except ValueError as err:  # pydantic's ValidationError is a ValueError
                get_logger().warning("%s version %s: tag %s is not an alias move (%s); skipped", name, mv.version, key, err)
                continue
            if alias is None or move.alias == alias:
                found.append((stamp, move.when, move))
    return [move for _, _, move in sorted(found, key=lambda item: (item[0], item[1]))]


def _quote(text: str) -> str:
    return text.replace("'", "\\'")
