"""The `retrain` flow (the main job) under a Prefect test API."""

from __future__ import annotations

import json

import pytest

from prefect_tensorflow.flows.retrain import retrain
from prefect_tensorflow.tasks.checkpoints.metrics_log import read_metrics
from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
from prefect_tensorflow.tasks.configs import GateConfig, TrainingConfig


def outputs(tmp_path, mlflow_store=None):
    out = {"export_base": str(tmp_path / "export"), "frozen_dir": str(tmp_path / "frozen")}
    if mlflow_store is not None:
        out.update(mlflow=mlflow_store, registered_model_name="flow-iris")
    else:
        out.update(track=False)
    return out


def test_retrain_trains_selects_freezes_exports_and_registers(prefect_api, tmp_path, mlflow_store):
    policy = CheckpointPolicy(save_checkpoints_steps=50, keep_checkpoint_max=None)
    training = TrainingConfig(steps=150, policy=policy)
    summary = retrain(model_dir=str(tmp_path / "m"), training=training, **outputs(tmp_path, mlflow_store))
    assert summary.training.final_step == 150
    assert summary.checkpoint.step == 150 and summary.checkpoint.path.endswith("model.ckpt-150")
    assert summary.frozen_graph.path == str(tmp_path / "frozen" / "model.ckpt-150.pb")
    assert summary.frozen_graph.parity.ok and (tmp_path / "frozen" / "model.ckpt-150.pb").exists()
    assert (summary.export.version, summary.export.reused) == (1, False)
    assert (tmp_path / "export" / "1" / "saved_model.pb").exists()
    registered = summary.registered
    assert (registered.name, registered.version, registered.reused) == ("flow-iris", 1, False)
    assert registered.aliases == ["challenger", "champion"]
    assert registered.run_id == summary.training.mlflow_run_id  # the model is logged in the training run
    run = mlflow_store.client().get_run(registered.run_id)
    assert run.data.tags["prefect_tensorflow.frozen_graph.sha256"] == summary.frozen_graph.digest
    assert {a.path for a in mlflow_store.client().list_artifacts(registered.run_id)} >= {
        "checkpoints",
        "tensorboard",
        "frozen_graph",
    }
    again = retrain(model_dir=str(tmp_path / "m"), training=training, **outputs(tmp_path, mlflow_store))
    assert again.training.steps_run == 0 and again.export.reused and again.export.version == 1
    assert again.registered.reused and again.registered.version == 1
    # The training settings may also be given as a dict (what a deployment's parameters hold).
    best = retrain(
        model_dir=str(tmp_path / "m"),
        training={"steps": 150, "policy": policy.model_dump()},
        select="best:loss",
        gate=GateConfig(metric="loss", mode="min"),
        **outputs(tmp_path, mlflow_store),
    )
    assert best.training.steps_run == 0
    losses = {s: m["loss"] for s, m in read_metrics(tmp_path / "m").items()}
    assert best.checkpoint.step == min(losses, key=lambda s: (losses[s], -s))
    assert best.selection == "best:loss:min"
    if best.checkpoint.step != 150:  # another checkpoint: a new version, gated by loss on the eval data
        gate = best.registered.gate
        assert best.registered.version == 2 and gate.champion_version == 1 and gate.metric == "loss"
        assert ("champion" in best.registered.aliases) == gate.promoted


def test_retrain_publishes_artifacts_and_links_mlflow_and_prefect_both_ways(prefect_api, tmp_path, mlflow_store):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from prefect_tensorflow.flows.artifacts import alias_history_key

    training = TrainingConfig(steps=80, policy=CheckpointPolicy(save_checkpoints_steps=40))
    state = retrain(model_dir=str(tmp_path / "m"), training=training, return_state=True, **outputs(tmp_path, mlflow_store))
    summary = state.result()
    flow_run_id = str(state.state_details.flow_run_id)
    assert summary.flow_run_id == flow_run_id
    run_filter = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts(artifact_filter=run_filter)}
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    assert flow_run.name == "retrain-flow-iris"  # the flow_run_name template
    registered = summary.registered
    history_key = alias_history_key(registered.name)
    assert {"checkpoints", "training-summary", "mlflow-model-version", "mlflow-run", "champion-gate", history_key} <= set(
        artifacts
    )
    history = artifacts[history_key].data
    history_rows = json.loads(history) if isinstance(history, str) else history
    assert [(r["alias"], r["to"], r["kind"]) for r in history_rows if r["alias"] == "champion"] == [
        ("champion", registered.version, "gate")
    ]  # the first version's promotion, recorded as it happened
    assert f"({registered.version_url})" in artifacts["mlflow-model-version"].data
    assert f"({registered.run_url})" in artifacts["mlflow-run"].data
    assert registered.version_url in artifacts["training-summary"].data
    client_ml = mlflow_store.client()
    assert client_ml.get_run(registered.run_id).data.tags["prefect.flow_run_id"] == flow_run_id
    version_tags = client_ml.get_model_version(registered.name, str(registered.version)).tags
    assert version_tags["prefect.flow_run_id"] == flow_run_id
    assert flow_run_id in version_tags["prefect.flow_run_url"]
    table = artifacts["checkpoints"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["step"] for r in rows] == [80, 40, 0]
    assert rows[0]["selected"] == "yes" and rows[0]["valid"] == "yes" and "loss" in rows[0]
    note = artifacts["training-summary"].data
    assert summary.checkpoint.path in note
    assert summary.export.path in note and summary.frozen_graph.digest in note


def test_bad_parameters_fail_before_training(prefect_api, tmp_path):
    with pytest.raises(Exception, match="select: expected"):
        retrain(model_dir=str(tmp_path / "m"), training={"steps": 10}, select="worst", **outputs(tmp_path))
    assert not (tmp_path / "m").exists()
    # A bad training setting fails Prefect's parameter validation, naming the field.
    with pytest.raises(Exception, match=r"training\.steps: .*expected an integer >= 0.*received -1"):
        retrain(model_dir=str(tmp_path / "m"), training={"steps": -1}, **outputs(tmp_path))
    assert not (tmp_path / "m").exists()


def test_bad_import_strings_and_names_fail_before_anything_is_written(prefect_api, tmp_path):
    for params, message in (
        ({"training": {"steps": 10, "model": "no_such_module:build"}}, "model 'no_such_module:build': module"),
        ({"training": {"steps": 10, "data": "prefect_tensorflow.tasks.iris:missing"}}, "no attribute 'missing'"),
        ({"training": {"steps": 10, "more_steps": -3}}, r"training\.more_steps: .*received -3"),
        ({"training": {"steps": 10}, "registered_model_name": "team/iris"}, "registered_model_name: .*no '/'"),
        ({"training": {"steps": 10}, "gate": {"metric": "loss", "mode": "lowest"}}, r"gate\.mode: .*'min' or 'max'"),
    ):
        with pytest.raises(Exception, match=message):
            retrain(model_dir=str(tmp_path / "m"), **{**outputs(tmp_path), **params})
        assert not (tmp_path / "m").exists() and not (tmp_path / "export").exists()


def test_from_scratch_moves_the_old_checkpoints_aside_and_starts_at_step_zero(prefect_api, model_dir_copy, tmp_path):
    before = sorted(p.name for p in model_dir_copy.iterdir())
    summary = retrain(
        model_dir=str(model_dir_copy),
        training=TrainingConfig(steps=40, policy=CheckpointPolicy(save_checkpoints_steps=20)),
        from_scratch=True,
        **outputs(tmp_path),
    )
    assert (summary.training.start_step, summary.training.final_step) == (0, 40)
    (aside,) = [p for p in model_dir_copy.parent.iterdir() if p.name.startswith(model_dir_copy.name + ".previous-")]
    assert sorted(p.name for p in aside.iterdir()) == before  # nothing lost
    assert summary.checkpoint.path == str(model_dir_copy / "model.ckpt-40")


def test_empty_paths_default_under_the_data_home(prefect_api, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PREFECT_TENSORFLOW_HOME", str(home))
    summary = retrain(training=TrainingConfig(steps=20, policy=CheckpointPolicy(save_checkpoints_steps=20)), track=False)
    assert summary.training.model_dir == str(home / "models" / "iris")
    assert summary.export.path == str(home / "exports" / "iris" / "1")
    assert summary.frozen_graph.path == str(home / "frozen" / "iris" / "model.ckpt-20.pb")
