"""The `rollback` flow: move `@champion` back, in one step, under the registered model's lock.

The target is `to_version`, else the version `@champion` named before its
latest move (the alias history, `tasks/registry/aliases.py`). It must exist,
and must have passed its serving check (its `prefect_tensorflow.serving.ok`
tag is `"true"`): a version never shown to load and answer in a serving
process does not become what serving reads. A target that is champion
already is a stated no-op. The move is a compare-and-set inside
`registry_lock`, so a gate promoting at the same moment waits for it (and
then finds `@champion` moved), and it is recorded like every alias move:
who, from, to, when, why, kind `rollback`. The run publishes the model's
alias history as a table and the move as markdown.

Example:
    >>> from prefect_tensorflow.flows.rollback import rollback
    >>> rollback.name
    'rollback'
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

from prefect import flow
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from prefect_tensorflow.tasks.blocks import MlflowConnection
from prefect_tensorflow.tasks.config_checks import integer_between
from prefect_tensorflow.tasks.configs import RegisteredModelName
from prefect_tensorflow.tasks.errors import RollbackError
from prefect_tensorflow.tasks.promotion.serving_check import SERVING_TAGS, passed_serving_check
from prefect_tensorflow.tasks.registry.aliases import (
    AliasMove,
    alias_history,
    current_alias_version,
    move_alias,
    registry_lock,
)
from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
from prefect_tensorflow.tasks.registry.model_versions import CHAMPION
from prefect_tensorflow.tasks.run_context import current_flow_run_id, get_logger

from .artifacts import publish_alias_history, publish_rollback_summary
from .prelude import flow_prelude

SERVING_OK_TAG = SERVING_TAGS["ok"]  # written by the serving check (`record_serving_report`)
SERVING_REASON_TAG = SERVING_TAGS["reason"]
MAX_VERSION = 2**31 - 1
VersionNumber = Annotated[int, Field(ge=1, le=MAX_VERSION), BeforeValidator(integer_between(1, MAX_VERSION))]
Reason = Annotated[str, Field(max_length=500)]


class RollbackResult(BaseModel):
    """What a rollback did: the champion before and after, why, and the history of `@champion`."""

    model_config = ConfigDict(frozen=True)

    registered_model_name: str
    moved: bool = Field(description="False when the target was champion already")
    from_version: Optional[int] = Field(description="The champion before")
    to_version: int = Field(description="The champion after")
    reason: str
    move: Optional[AliasMove] = Field(default=None, description="The recorded move (None when nothing moved)")
    history: list[AliasMove] = Field(description="Every recorded move of @champion, oldest first")
    flow_run_id: Optional[str] = None


def previous_champion(history: list[AliasMove], current: Optional[int]) -> int:
    """The version `@champion` named before its latest recorded move.

    Raises:
        RollbackError: no recorded move of `@champion` came from a version ("no previous champion"),
            or the latest recorded move is not to the current champion (moved outside this project).

    Example:
        >>> move = AliasMove(alias="champion", from_version=1, to_version=2, when="2026-12-06T17:00:00.000Z",
        ...                  by="gate", reason="promoted", kind="gate")
        >>> previous_champion([move], 2)
        1
    """
    latest = history[-1] if history else None
    if latest is None or latest.from_version is None:
        held = f"version {current} has been champion since it was first set" if latest else "no move of @champion is recorded"
        raise RollbackError(f"no previous champion to roll back to: {held}; name a version with to_version")
    if latest.to_version != current:
        raise RollbackError(
            f"@champion names version {current}, but its latest recorded move went to version {latest.to_version}: "
            "it was moved outside prefect-tensorflow, so its previous champion is unknown; name a version with to_version"
        )
    return latest.from_version


def check_target(client: Any, name: str, version: int) -> None:
    """The version exists and passed its serving check.

    Raises:
        RollbackError: naming the version and why it may not become champion.
    """
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            raise RollbackError(f"to_version: registered model {name!r} has no version {version}") from err
        raise
    if not passed_serving_check(mv):
        ok = (mv.tags or {}).get(SERVING_OK_TAG)
        why = (
            f"its serving check failed: {mv.tags.get(SERVING_REASON_TAG, 'no reason recorded')}"
            if ok is not None
            else "it has no serving check recorded"
        )
        raise RollbackError(
            f"{name!r} version {version} may not become champion: {why} ({SERVING_OK_TAG} is {ok!r}, expected 'true')"
        )


def roll_back(connection: MlflowConfig, name: str, to_version: Optional[int], reason: str) -> RollbackResult:
    """Under the lock of `name`: choose the target, check it, move `@champion` there (kind `rollback`).

    Raises:
        RegistryError: no such registered model; the lock not free in time.
        RollbackError: no previous champion, the target missing or without a passed serving check.
    """
    client = connection.client()
    with registry_lock(name):
        current = current_alias_version(client, name, CHAMPION)
        history = alias_history(client, name, CHAMPION)
        target = to_version if to_version is not None else previous_champion(history, current)
        if target == current:
            get_logger().info("%s: version %s is champion already; nothing moved", name, target)
            return RollbackResult(
                registered_model_name=name,
                moved=False,
                from_version=current,
                to_version=target,
                reason=f"version {target} is champion already: nothing moved",
                history=history,
                flow_run_id=current_flow_run_id(),
            )
        check_target(client, name, target)
        move = move_alias(client, name, CHAMPION, target, expected_from=current, reason=reason, kind="rollback")
    return RollbackResult(
        registered_model_name=name,
        moved=True,
        from_version=current,
        to_version=target,
        reason=move.reason,
        move=move,
        history=[*history, move],
        flow_run_id=current_flow_run_id(),
    )


@flow(name="rollback", flow_run_name="rollback-{registered_model_name}", log_prints=True)
def rollback(
    registered_model_name: RegisteredModelName,
    to_version: Optional[VersionNumber] = None,
    reason: Reason = "rolled back by hand",
    mlflow: Optional[MlflowConnection] = None,
) -> RollbackResult:
    """Move @champion back to the previous champion, or to a named version that passed its serving check.

    Publishes the registered model's alias history (a table) and the move (markdown).

    Args:
        registered_model_name: The MLflow registered model whose @champion moves.
        to_version: The version to make champion. Empty: the version @champion named before its
            latest move. It must have passed its serving check.
        reason: Why (recorded with the move in the alias history; at most 500 characters).
        mlflow: A saved MLflow Connection block. Leave it on None for the worker's
            MLFLOW_TRACKING_URI (else a local SQLite store).

    Raises:
        RegistryError: no such registered model, or its lock was not free in time.
        RollbackError: no previous champion; the version does not exist or has not passed its serving check.
        UnsafeParameterError: in a deployment run, an inline MLflow connection.
    """
    prelude = flow_prelude({}, registered_model_name, model=None, data=None, mlflow=mlflow)
    connection = prelude.connection or MlflowConnection()
    result = connection.retrying(
        f"rolling back @champion of {registered_model_name!r}",
        roll_back,
        connection,
        registered_model_name,
        to_version,
        reason,
    )
    client = connection.client()
    publish_alias_history(registered_model_name, alias_history(client, registered_model_name))
    publish_rollback_summary(
        registered_model_name,
        result.move,
        result.history,
        champion=result.to_version,
        note=result.reason,
        version_url=connection.model_version_url(registered_model_name, result.to_version),
    )
    return result
