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
    with pytest.raises(ValueError, match="select: expected 'latest' or 'best:<metric>"):
        Selection.parse("best")


def outputs(tmp_path):
    return {"export_base": str(tmp_path / "export"), "frozen_dir": str(tmp_path / "frozen")}


def test_retrain_trains_selects_freezes_and_exports(prefect_api, tmp_path):
    policy = CheckpointPolicy(save_checkpoints_steps=50, keep_checkpoint_max=None)
    summary = retrain(model_dir=str(tmp_path / "m"), steps=150, policy=policy, **outputs(tmp_path))
    assert summary.training.final_step == 150
    assert summary.checkpoint.step == 150 and summary.checkpoint.path.endswith("model.ckpt-150")
    assert summary.frozen_graph.path == str(tmp_path / "frozen" / "model.ckpt-150.pb")
    assert summary.frozen_graph.parity.ok and (tmp_path / "frozen" / "model.ckpt-150.pb").exists()
    assert (summary.export.version, summary.export.reused) == (1, False)
    assert (tmp_path / "export" / "1" / "saved_model.pb").exists()
    again = retrain(model_dir=str(tmp_path / "m"), steps=150, policy=policy, **outputs(tmp_path))
    assert again.training.steps_run == 0 and again.export.reused and again.export.version == 1
    best = retrain(model_dir=str(tmp_path / "m"), steps=150, policy=policy, select="best:loss", **outputs(tmp_path))
    assert best.training.steps_run == 0
    losses = {s: m["loss"] for s, m in __import__(
        "prefect_tensorflow.tasks.metrics_log", fromlist=["read_metrics"]).read_metrics(tmp_path / "m").items()}
    assert best.checkpoint.step == min(losses, key=lambda s: (losses[s], -s))


def test_retrain_publishes_artifacts(prefect_api, tmp_path):
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    policy = CheckpointPolicy(save_checkpoints_steps=40)
    state = retrain(model_dir=str(tmp_path / "m"), steps=80, policy=policy, return_state=True, **outputs(tmp_path))
    summary = state.result()
    run_filter = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts(artifact_filter=run_filter)}
    assert {"checkpoints", "training-summary"} <= set(artifacts)
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
