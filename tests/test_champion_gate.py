"""gate_champion: both registered versions scored on the same (current) eval data, decided, served, moved under a lock.

Real parts: SavedModels exported from short trainings (the session's iris
model dir, one 200-step training on shifted iris per module), a real MLflow
registry (`mlflow_store`; `mlflow_team_server` on PostgreSQL for the race),
`mlflow models serve` for the serving check, the Prefect API for the lock and
the pause. The data shift: `gate_models.shifted_iris` reorders iris's feature
columns, so the model trained on iris as shipped (its recorded training-time
accuracy the higher one) is worse on today's data than one trained on it.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from pathlib import Path

import pytest
from helpers import export, train

from prefect_tensorflow.tasks import iris
from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
from prefect_tensorflow.tasks.checkpoints.selection import select_checkpoint_at_step
from prefect_tensorflow.tasks.configs import GateConfig, ServingLimits
from prefect_tensorflow.tasks.promotion import champion_gate, outcomes
from prefect_tensorflow.tasks.promotion.champion_gate import gate_champion
from prefect_tensorflow.tasks.registry.aliases import alias_history, current_alias_version, move_alias, registry_lock
from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
from prefect_tensorflow.tasks.registry.model_versions import recorded_decision, register_model_version

SHIFTED = "gate_models:shifted_iris"
RENAMED = "gate_models:renamed_input_model"


@pytest.fixture(scope="module")
def exports(trained_dir: Path, tmp_path_factory):
    """name -> (checkpoint ref, export): iris as shipped (step 300), shifted iris (steps 100, 200), renamed input."""
    root = tmp_path_factory.mktemp("gate")
    shifted_dir = root / "shifted"
    policy = CheckpointPolicy(save_checkpoints_steps=100, keep_checkpoint_max=None)
    train(shifted_dir, steps=200, data=SHIFTED, evaluation="in_loop", policy=policy)  # the sidecar process cannot import tests/
    out = {}
    for key, model_dir, step, model, data in (
        ("iris", trained_dir, 300, iris.MODEL, iris.DATA),
        ("shifted", shifted_dir, 200, iris.MODEL, SHIFTED),
        ("shifted-100", shifted_dir, 100, iris.MODEL, SHIFTED),
        ("renamed", trained_dir, 300, RENAMED, iris.DATA),
    ):
        ref = select_checkpoint_at_step(str(model_dir), step)  # with its recorded metrics
        out[key] = (ref, export(ref.path, root / "exports" / key, model=model, data=data))
    return out


def register(exports, key: str, name: str, connection) -> object:
    ref, exported = exports[key]
    return register_model_version(exported, name, connection, checkpoint=ref, data=SHIFTED if "shifted" in key else iris.DATA)


def make_champion(connection, name: str, version: int) -> None:
    with registry_lock(name):
        move_alias(connection.client(), name, "champion", version, expected_from=None, reason="test setup", kind="manual")


@pytest.fixture
def scored(monkeypatch, tmp_path):
    """The SavedModels scored (not taken from the cache) during the test, in order; a cache of its own."""
    monkeypatch.setenv("PREFECT_TENSORFLOW_HOME", str(tmp_path / "home"))
    calls: list[str] = []
    real = outcomes.score_saved_model

    def counting(local_path, eval_set, **kwargs):
        calls.append(local_path)
        return real(local_path, eval_set, **kwargs)

    monkeypatch.setattr(outcomes, "score_saved_model", counting)
    return calls


def test_data_shift_a_champion_worse_on_todays_data_is_replaced_and_only_the_challenger_is_rescored(
    exports, mlflow_store, prefect_api, scored
):
    name = "gate-shift"
    old, new = exports["iris"], exports["shifted-100"]
    # the champion's training-time loss (recorded on the data it was trained for) is the better one
    assert old[0].metrics["loss"] < new[0].metrics["loss"]
    client = mlflow_store.client()
    by_loss = GateConfig(metric="loss")  # mode "min", from the metric

    v1 = register(exports, "iris", name, mlflow_store)
    first = gate_champion(v1, mlflow_store, by_loss, data=SHIFTED)
    assert (first.state, first.promoted, current_alias_version(client, name, "champion")) == ("first_version", True, 1), (
        first.reason
    )
    assert scored == [old[1].path]  # the challenger's own export, scored once

    v2 = register(exports, "shifted-100", name, mlflow_store)
    scored.clear()
    decision = gate_champion(v2, mlflow_store, by_loss, data=SHIFTED)
    assert scored == [new[1].path]  # the champion's outcomes on this eval data came from the cache
    assert (decision.state, decision.promoted, decision.champion_version) == ("promoted", True, 1), decision.reason
    assert decision.challenger_value < decision.champion_value and decision.interval[0] > 0  # lower loss, better
    assert current_alias_version(client, name, "champion") == 2
    moves = [m for m in alias_history(client, name, "champion")]
    assert [(m.from_version, m.to_version, m.kind) for m in moves] == [(None, 1, "gate"), (1, 2, "gate")]

    mv = client.get_model_version(name, "2")
    assert recorded_decision(mv) == decision
    assert mv.tags["prefect_tensorflow.gate.state"] == "promoted"
    assert mv.tags["prefect_tensorflow.gate.champion_version"] == "1"
    assert mv.tags["prefect_tensorflow.serving.ok"] == "true"
    run = client.get_run(mv.tags["prefect_tensorflow.gate.evaluation_run_id"])
    [logged] = run.inputs.dataset_inputs
    assert logged.dataset.digest == decision.eval_digest[:36] and logged.dataset.name == outcomes.load_eval_set(SHIFTED).source
    assert {t.key: t.value for t in logged.tags}["mlflow.data.context"] == "evaluation"
    metrics = run.data.metrics
    assert metrics["challenger.loss"] == pytest.approx(decision.challenger_value)
    assert metrics["champion.loss"] == pytest.approx(decision.champion_value)
    assert metrics["champion.accuracy"] < metrics["challenger.accuracy"]
    assert (metrics["ci_low"], metrics["ci_high"]) == pytest.approx(decision.interval)
    assert run.data.tags["prefect_tensorflow.gate.state"] == "promoted"


def test_the_reverse_keeps_the_champion_and_a_failed_serving_check_never_promotes(exports, mlflow_store, prefect_api, scored):
    name = "gate-reverse"
    client = mlflow_store.client()
    v1 = register(exports, "shifted-100", name, mlflow_store)
    slow = GateConfig(metric="loss", serving=ServingLimits(max_load_seconds=0.001))
    broken = gate_champion(v1, mlflow_store, slow, data=SHIFTED)
    assert (broken.state, broken.promoted) == ("kept", False), broken.reason
    assert "serving check failed" in broken.reason and "load" in broken.reason
    assert current_alias_version(client, name, "champion") is None
    assert client.get_model_version(name, "1").tags["prefect_tensorflow.serving.ok"] == "false"

    make_champion(mlflow_store, name, 1)
    v2 = register(exports, "iris", name, mlflow_store)  # the better training-time loss, worse on today's data
    kept = gate_champion(v2, mlflow_store, GateConfig(metric="loss"), data=SHIFTED)
    assert (kept.state, kept.promoted, kept.champion_version) == ("kept", False, 1), kept.reason
    assert kept.challenger_value > kept.champion_value
    assert current_alias_version(client, name, "champion") == 1
    assert client.get_model_version(name, "2").tags["prefect_tensorflow.gate.state"] == "kept"


def _resume_when_paused(answer: dict, started: float) -> threading.Thread:
    """Resume the next flow run that pauses (after `started`) with `answer`, through the Prefect API."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    def resume() -> None:
        with get_client(sync_client=True) as client:
            for _ in range(600):
                paused = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
                )
                if paused:
                    resume_flow_run(paused[0].id, run_input=answer)
                    return
                time.sleep(0.2)

    thread = threading.Thread(target=resume, daemon=True)
    thread.start()
    return thread


def test_an_incomparable_challenger_pauses_for_approval(exports, mlflow_store, prefect_api, scored):
    from prefect import flow

    from prefect_tensorflow.tasks import prefect_tasks

    name = "gate-renamed"
    client = mlflow_store.client()
    make_champion_after = register(exports, "iris", name, mlflow_store)
    make_champion(mlflow_store, name, make_champion_after.version)
    v2 = register(exports, "renamed", name, mlflow_store)

    outside = gate_champion(v2, mlflow_store, GateConfig(), data=iris.DATA)  # not in a flow run: nobody to ask
    assert (outside.state, outside.promoted) == ("kept", False)
    assert "input names differ" in outside.reason and "nobody was asked" in outside.reason

    @flow
    def gate_flow(timeout: int):
        return prefect_tasks.gate_champion(v2, mlflow_store, GateConfig(approval_timeout_seconds=timeout), data=iris.DATA)

    timed_out = gate_flow(1)
    assert (timed_out.state, timed_out.promoted) == ("kept", False) and "no approval within 1 s" in timed_out.reason

    waiter = _resume_when_paused({"approve": False, "reason": "clients still send 'features'"}, time.time())
    rejected = gate_flow(120)
    waiter.join(5)
    assert (rejected.state, rejected.promoted) == ("kept", False)
    assert "rejected" in rejected.reason and "clients still send 'features'" in rejected.reason
    assert current_alias_version(client, name, "champion") == 1

    waiter = _resume_when_paused({"approve": True, "reason": "serving clients renamed the input"}, time.time())
    approved = gate_flow(120)
    waiter.join(5)
    assert (approved.state, approved.promoted) == ("promoted", True), approved.reason
    assert "approved" in approved.reason and "serving clients renamed the input" in approved.reason
    assert current_alias_version(client, name, "champion") == 2
    assert recorded_decision(client.get_model_version(name, "2")) == approved
    assert len(scored) == 2  # each version scored once; every later gate read the cache


@pytest.mark.slow
def test_two_gates_at_once_end_with_one_champion_and_two_recorded_decisions(exports, mlflow_team_server, prefect_api, scored):
    connection = MlflowConfig(tracking_uri=mlflow_team_server, experiment_name=f"gate-race-{uuid.uuid4().hex[:8]}")
    name = f"gate-race-{uuid.uuid4().hex[:8]}"
    client = connection.client()
    v1 = register(exports, "iris", name, connection)
    make_champion(connection, name, v1.version)
    challengers = [register(exports, key, name, connection) for key in ("shifted", "shifted-100")]
    decisions: dict[int, object] = {}
    errors: list[BaseException] = []

    def run(registered) -> None:
        try:
            decisions[registered.version] = gate_champion(registered, connection, GateConfig(), data=SHIFTED)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(r,)) for r in challengers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not errors, errors
    champion = current_alias_version(client, name, "champion")
    assert champion in (2, 3)
    for version in (2, 3):  # both decisions recorded, each on its version
        assert recorded_decision(client.get_model_version(name, str(version))) == decisions[version]
    moves = alias_history(client, name, "champion")
    chain = [(m.from_version, m.to_version) for m in moves]
    assert chain[0] == (None, 1) and chain[-1][1] == champion
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chain)), chain  # every move started where the last ended
    promoted = [v for v, d in decisions.items() if d.promoted]
    assert champion in promoted and len(chain) == 1 + len(promoted)


def test_gate_tags_and_markdown_show_the_decision():
    from prefect_tensorflow.flows.artifacts import gate_decision_markdown

    decision = champion_gate.stated_decision("kept", "no eval data", GateConfig(), 4, 3)
    tags = champion_gate.decision_tags(decision)
    assert tags["prefect_tensorflow.gate.decision"] == "champion kept"
    assert "| version | v4 | v3 |" in gate_decision_markdown(decision)


def test_the_cli_answers_an_incomparable_gate_in_advance_with_approve_or_reject():
    from typer.testing import CliRunner

    from prefect_tensorflow.flows.cli import app
    from prefect_tensorflow.flows.flow_commands import _choice

    shown = CliRunner().invoke(app, ["export-checkpoint", "--help"], terminal_width=200).output
    assert "--approve" in shown and "--reject" in shown
    assert [_choice(v, "approve", "reject") for v in (True, False, None)] == [(True, "approve"), (True, "reject"), (False, None)]
