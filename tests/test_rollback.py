"""The `rollback` flow and command: `@champion` back to the previous champion or a named version, recorded.

Real parts: the session's Prefect test API (the flow runs, the lock, the
artifacts) and an MLflow SQLite store. The versions are registry rows with
the serving check's tag, as `record_serving_report` writes it; the served
deployment is in tests/test_deployments.py.
"""

from __future__ import annotations

import json
import uuid

import pytest
from typer.testing import CliRunner

from prefect_tensorflow.flows.artifacts import alias_history_key
from prefect_tensorflow.flows.cli import app
from prefect_tensorflow.flows.rollback import SERVING_OK_TAG, SERVING_REASON_TAG, rollback
from prefect_tensorflow.tasks.errors import RegistryError, RollbackError
from prefect_tensorflow.tasks.registry.aliases import alias_history, current_alias_version, move_alias, registry_lock

runner = CliRunner()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def registry(client, name: str, served: dict[int, str | None], champions: list[int]) -> None:
    """`name` with a version per key of `served` (its serving.ok tag, None: no check recorded), and
    `@champion` moved through `champions` by the gate."""
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment(unique("rollback")))
    for version in sorted(served):
        client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
        if served[version] is not None:
            client.set_model_version_tag(name, str(version), SERVING_OK_TAG, served[version])
    before = None
    for version in champions:
        with registry_lock(name):
            move_alias(client, name, "champion", version, expected_from=before, reason=f"gate promoted {version}")
        before = version


def test_rollback_moves_champion_back_to_the_previous_one_and_the_history_shows_both_moves(mlflow_store, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    client = mlflow_store.client()
    name = unique("back")
    registry(client, name, {1: "true", 2: "true"}, champions=[1, 2])

    result = rollback(registered_model_name=name, reason="version 2 answers wrong in production", mlflow=mlflow_store)
    assert (result.moved, result.from_version, result.to_version) == (True, 2, 1)
    assert current_alias_version(client, name, "champion") == 1
    history = alias_history(client, name, "champion")
    assert [(m.from_version, m.to_version, m.kind) for m in history] == [(None, 1, "gate"), (1, 2, "gate"), (2, 1, "rollback")]
    assert history[-1].reason == "version 2 answers wrong in production"
    assert history[-1].by == f"rollback-{name}" and history[-1].run_url  # the flow run's name and UI URL
    assert result.history == history

    with get_client(sync_client=True) as prefect:
        table = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[alias_history_key(name)])))
        summary = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["rollback-summary"])))
    rows = json.loads(table[0].data) if isinstance(table[0].data, str) else table[0].data
    assert [(r["from"], r["to"], r["kind"]) for r in rows] == [("none", 1, "gate"), ("1", 2, "gate"), ("2", 1, "rollback")]
    assert any(f"@champion of {name}: version 2 →" in (a.data or "") for a in summary)

    again = rollback(registered_model_name=name, mlflow=mlflow_store)  # the previous champion is now 2
    assert (again.from_version, again.to_version, again.reason) == (1, 2, "rolled back by hand")


def test_rollback_to_a_named_version_and_to_the_champion_itself(mlflow_store, prefect_api):
    client = mlflow_store.client()
    name = unique("named")
    registry(client, name, {1: "true", 2: "true", 3: "true"}, champions=[2, 3])
    assert rollback(registered_model_name=name, to_version=1, mlflow=mlflow_store).to_version == 1
    assert current_alias_version(client, name, "champion") == 1
    same = rollback(registered_model_name=name, to_version=1, mlflow=mlflow_store)
    assert not same.moved and same.reason == "version 1 is champion already: nothing moved"
    assert [m.to_version for m in alias_history(client, name, "champion")] == [2, 3, 1]


@pytest.mark.parametrize(
    ("served", "to_version", "message"),
    [
        ({1: None, 2: "true"}, 1, "version 1 may not become champion: it has no serving check recorded"),
        ({1: "false", 2: "true"}, 1, "version 1 may not become champion: its serving check failed: load took 31 s"),
        ({1: "true", 2: "true"}, 7, "to_version: registered model '{name}' has no version 7"),
    ],
    ids=["no-serving-check", "failed-serving-check", "no-such-version"],
)
def test_a_target_that_may_not_serve_is_refused_and_nothing_moves(mlflow_store, prefect_api, served, to_version, message):
    client = mlflow_store.client()
    name = unique("refused")
    registry(client, name, served, champions=[1, 2] if served[1] is not None else [2])
    if served[1] == "false":
        client.set_model_version_tag(name, "1", SERVING_REASON_TAG, "load took 31 s (limit 30 s)")
    with pytest.raises(RollbackError, match=message.format(name=name)):
        rollback(registered_model_name=name, to_version=to_version, mlflow=mlflow_store)
    assert current_alias_version(client, name, "champion") == 2
    assert all(m.kind == "gate" for m in alias_history(client, name))


def test_no_previous_champion_and_an_unknown_model_are_named(mlflow_store, prefect_api):
    client = mlflow_store.client()
    name = unique("first")
    registry(client, name, {1: "true"}, champions=[1])
    with pytest.raises(RollbackError, match="no previous champion to roll back to: version 1 has been champion since"):
        rollback(registered_model_name=name, mlflow=mlflow_store)
    with pytest.raises(RegistryError, match="registered_model_name: no registered model 'no-such-model'"):
        rollback(registered_model_name="no-such-model", mlflow=mlflow_store)


def test_the_command_rolls_back_and_refuses_bad_versions_before_the_flow_runs(mlflow_store, prefect_api):
    client = mlflow_store.client()
    name = unique("cli")
    registry(client, name, {1: "true", 2: "true"}, champions=[1, 2])
    uri = mlflow_store.tracking_uri
    for bad, expected in (
        ("two", "--to-version"),
        ("-1", "--to-version: "),
        ("0", "--to-version: "),
    ):
        result = runner.invoke(app, ["rollback", "--registered-model-name", name, "--to-version", bad, "--tracking-uri", uri])
        assert result.exit_code == 2 and expected in result.output, result.output
    missing = runner.invoke(app, ["rollback", "--tracking-uri", uri])
    assert missing.exit_code == 2 and "--registered-model-name" in missing.output
    assert current_alias_version(client, name, "champion") == 2

    result = runner.invoke(app, ["rollback", "--registered-model-name", name, "--tracking-uri", uri, "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert (answer["moved"], answer["from_version"], answer["to_version"]) == (True, 2, 1)
    text = runner.invoke(app, ["rollback", "--registered-model-name", name, "--to-version", "1", "--tracking-uri", uri])
    assert text.exit_code == 0 and "version 1 is champion already: nothing moved" in text.stdout, text.output
    refused = runner.invoke(app, ["rollback", "--registered-model-name", name, "--to-version", "9", "--tracking-uri", uri])
    assert refused.exit_code == 2 and f"error: to_version: registered model '{name}' has no version 9" in refused.output


def test_bad_parameters_of_the_flow_are_refused(mlflow_store, prefect_api):
    from prefect.exceptions import ParameterTypeError

    for to_version in (-1, 0, "two", 1.5, True, 2**31):
        with pytest.raises(ParameterTypeError, match="to_version"):
            rollback(registered_model_name="iris", to_version=to_version, mlflow=mlflow_store)
    with pytest.raises(ParameterTypeError, match="registered_model_name"):
        rollback(registered_model_name="a/b", mlflow=mlflow_store)
    with pytest.raises(ParameterTypeError, match="reason"):
        rollback(registered_model_name="iris", reason="x" * 501, mlflow=mlflow_store)
