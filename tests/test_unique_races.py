"""Registry writes two runs make at once (tasks/registry/unique_races.py): a lost unique-key race is set again.

The race for real, made to happen every time: a SQLite trigger on MLflow's
own store inserts the same tag row just before MLflow's insert, as a
concurrent run's insert between MLflow's lookup and its insert would. A plain
`MlflowClient` then fails with the `IntegrityError` a fresh-clone test run met
(two UI runs of one checkpoint, each recording its gate decision on the shared
version). The project's client, given the same race, sets the tag again and
ends with its value; that second half wraps the store's first call (the one
simulated fault: a trigger's row is rolled back with the insert it fails, so
it cannot stay for the retry as a concurrent commit does).
"""

from __future__ import annotations

import sqlite3

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from prefect_tensorflow.tasks.registry.mlflow_client import ConfinedMlflowClient
from prefect_tensorflow.tasks.registry.unique_races import is_unique_race, retry_unique_race

KEY = "prefect_tensorflow.gate.champion_version"


def _store_with_one_version(tmp_path) -> tuple[str, str]:
    database = tmp_path / "mlflow.db"
    uri = f"sqlite:///{database}"
    client = MlflowClient(uri, uri)
    client.create_registered_model("raced")
    client.create_model_version("raced", source=str(tmp_path / "model"))
    return uri, str(database)


def _race_the_next_insert(database: str, table: str) -> None:
    """Every insert into `table` finds its row already there (a concurrent writer's)."""
    with sqlite3.connect(database) as db:
        columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
        values = ", ".join("'theirs'" if c == "value" else f"NEW.{c}" for c in columns)
        db.execute(
            f"CREATE TRIGGER concurrent_insert BEFORE INSERT ON {table} "
            f"BEGIN INSERT INTO {table} ({', '.join(columns)}) VALUES ({values}); END"
        )


def test_a_plain_client_loses_the_race_and_the_projects_client_sets_the_tag_again(tmp_path, monkeypatch):
    uri, database = _store_with_one_version(tmp_path)
    _race_the_next_insert(database, "model_version_tags")
    with pytest.raises(MlflowException, match="UNIQUE constraint failed") as lost:
        MlflowClient(uri, uri).set_model_version_tag("raced", "1", KEY, "")
    assert is_unique_race(lost.value)
    with sqlite3.connect(database) as db:
        db.execute("DROP TRIGGER concurrent_insert")

    # The project's client, the same race: the other writer's row is committed between MLflow's lookup and its
    # insert. The trigger cannot replay that for a retry (the failed insert rolls its row back with it), so the
    # store's first call is wrapped: it commits the other writer's row through a connection of its own, then
    # fails as MLflow's insert did above. The retry goes to MLflow's real store.
    client = ConfinedMlflowClient(uri, uri)
    store = client._get_registry_client().store
    real, calls = store.set_model_version_tag, []

    def raced_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            real(*args[:2], type(args[2])(KEY, "theirs"))  # the other writer's row, committed
            raise MlflowException(str(lost.value))
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "set_model_version_tag", raced_once)
    client.set_model_version_tag("raced", "1", KEY, "ours")
    assert len(calls) == 2
    assert MlflowClient(uri, uri).get_model_version("raced", "1").tags[KEY] == "ours"  # set again over theirs


def test_only_a_unique_race_is_retried_and_not_forever():
    calls = []

    def refused():
        calls.append(1)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: Registered Model with name=x not found")

    with pytest.raises(MlflowException, match="not found"):
        retry_unique_race(refused)
    assert len(calls) == 1  # not a race: raised at once

    def always_raced():
        calls.append(1)
        raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: model_version_tags.key")

    calls.clear()
    with pytest.raises(MlflowException, match="UNIQUE constraint failed"):
        retry_unique_race(always_raced, attempts=3)
    assert len(calls) == 3
