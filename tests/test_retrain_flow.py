"""The `retrain` flow (the main job) under a Prefect test API."""

from __future__ import annotations

import pytest

from prefect_tensorflow.flows.retrain import Selection, retrain
from prefect_tensorflow.tasks.policy import CheckpointPolicy


def test_selection_parsing():
    assert Selection.parse("latest").kind == "latest"
    assert Selection.parse("best:accuracy") == Selection(kind="best", metric="accuracy", mode="max")
    assert Selection.parse("best:loss") == Selection(kind="best", metric="loss", mode="min")
    assert Selection.parse("best:accuracy:min").mode == "min"
    with pytest.raises(ValueError, match="select: expected 'latest', a step number or 'best:<metric>"):
        Selection.parse("best")


def outputs(tmp_path, mlflow_store=None):
    out = {"export_base": str(tmp_path / "export"), "frozen_dir": str(tmp_path / "frozen")}
    if mlflow_store is not None:
        out.update(mlflow=mlflow_store, registered_model_name="flow-iris")
    else:
        out.update(track=False)
    return out


def test_retrain_trains_selects_freezes_exports_and_registers(prefect_api, tmp_path, mlflow_store):
    policy = CheckpointPolicy(save_checkpoints_steps=50, keep_checkpoint_max=None)
    summary = retrain(model_dir=str(tmp_path / "m"), steps=150, policy=policy, **outputs(tmp_path, mlflow_store))
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
        "checkpoints", "tensorboard", "frozen_graph"
    }
    again = retrain(model_dir=str(tmp_path / "m"), steps=150, policy=policy, **outputs(tmp_path, mlflow_store))
    assert again.training.steps_run == 0 and again.export.reused and again.export.version == 1
    assert again.registered.reused and again.registered.version == 1
    best = retrain(
        model_dir=str(tmp_path / "m"), steps=150, policy=policy, select="best:loss", gate_metric="loss",
        gate_mode="min", **outputs(tmp_path, mlflow_store),
    )
    assert best.training.steps_run == 0
    losses = {s: m["loss"] for s, m in __import__(
        "prefect_tensorflow.tasks.metrics_log", fromlist=["read_metrics"]).read_metrics(tmp_path / "m").items()}
    assert best.checkpoint.step == min(losses, key=lambda s: (losses[s], -s))
    if best.checkpoint.step != 150:  # another checkpoint: a new version, champion by loss
        assert best.registered.version == 2 and best.registered.gate.promoted
        assert best.registered.gate.champion_version == 1


def test_retrain_publishes_artifacts_and_links_mlflow_and_prefect_both_ways(prefect_api, tmp_path, mlflow_store):
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    policy = CheckpointPolicy(save_checkpoints_steps=40)
    state = retrain(
        model_dir=str(tmp_path / "m"), steps=80, policy=policy, return_state=True, **outputs(tmp_path, mlflow_store)
    )
    summary = state.result()
    run_filter = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts(artifact_filter=run_filter)}
    assert {"checkpoints", "training-summary", "mlflow-model-version", "mlflow-run"} <= set(artifacts)
    registered = summary.registered
    assert f"({registered.version_url})" in artifacts["mlflow-model-version"].data
    assert f"({registered.run_url})" in artifacts["mlflow-run"].data
    assert registered.version_url in artifacts["training-summary"].data
    flow_run_id = str(state.state_details.flow_run_id)
    client_ml = mlflow_store.client()
    assert client_ml.get_run(registered.run_id).data.tags["prefect.flow_run_id"] == flow_run_id
    version_tags = client_ml.get_model_version(registered.name, str(registered.version)).tags
    assert version_tags["prefect.flow_run_id"] == flow_run_id
    assert flow_run_id in version_tags["prefect.flow_run_url"]
    tables, notes = [artifacts["checkpoints"]], [artifacts["training-summary"]]
    table = tables[-1].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["step"] for r in rows] == [80, 40, 0]
    assert rows[0]["selected"] == "yes" and rows[0]["valid"] == "yes" and "loss" in rows[0]
    assert summary.checkpoint.path in notes[-1].data
    assert summary.export.path in notes[-1].data and summary.frozen_graph.digest in notes[-1].data


def test_bad_parameters_fail_before_training(prefect_api, tmp_path):
    with pytest.raises(Exception, match="select: expected"):
        retrain(model_dir=str(tmp_path / "m"), steps=10, select="worst", **outputs(tmp_path))
    assert not (tmp_path / "m").exists()
    with pytest.raises(Exception, match="steps"):
        retrain(model_dir=str(tmp_path / "m"), steps=-1, **outputs(tmp_path))
    assert not (tmp_path / "m").exists()


def test_bad_import_strings_and_names_fail_before_anything_is_written(prefect_api, tmp_path):
    for params, message in (
        ({"model": "no_such_module:build"}, "no_such_module"),
        ({"data": "prefect_tensorflow.tasks.iris:missing"}, "missing"),
        ({"registered_model_name": "team/iris"}, "registered_model_name: expected"),
        ({"more_steps": -3}, "more_steps"),
    ):
        with pytest.raises(Exception, match=message):
            retrain(model_dir=str(tmp_path / "m"), steps=10, **{**outputs(tmp_path), **params})
        assert not (tmp_path / "m").exists() and not (tmp_path / "export").exists()


def test_from_scratch_moves_the_old_checkpoints_aside_and_starts_at_step_zero(prefect_api, model_dir_copy, tmp_path):
    before = sorted(p.name for p in model_dir_copy.iterdir())
    summary = retrain(
        model_dir=str(model_dir_copy), steps=40, from_scratch=True, policy=CheckpointPolicy(save_checkpoints_steps=20),
        **outputs(tmp_path),
    )
    assert (summary.training.start_step, summary.training.final_step) == (0, 40)
    (aside,) = [p for p in model_dir_copy.parent.iterdir() if p.name.startswith(model_dir_copy.name + ".previous-")]
    assert sorted(p.name for p in aside.iterdir()) == before  # nothing lost
    assert summary.checkpoint.path == str(model_dir_copy / "model.ckpt-40")
