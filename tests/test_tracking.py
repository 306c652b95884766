"""One MLflow run per tracked training: params, per-step metrics, checkpoint metrics, artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import train

from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy


def train_tracked(model_dir, tracking, **config):
    return train(model_dir, tracking=tracking, **config)


def _runs(conn):
    experiment = conn.client().get_experiment_by_name(conn.resolved_experiment_name())
    if experiment is None:
        return []
    return conn.client().search_runs([experiment.experiment_id])


def test_a_tracked_training_logs_params_the_loss_checkpoint_metrics_and_artifacts(
    model_dir_copy: Path, mlflow_store, tmp_path: Path
):
    policy = CheckpointPolicy(save_checkpoints_steps=50, save_at_start=False)
    result = train_tracked(model_dir_copy, mlflow_store, more_steps=100, policy=policy, seed=3, summary_every_n_steps=10)
    assert (result.start_step, result.final_step) == (300, 400)

    client = mlflow_store.client()
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["policy.save_checkpoints_steps"] == "50"
    assert params["seed"] == "3" and params["more_steps"] == "100"
    assert params["model"] == "iris" and params["data"] == "iris"
    assert run.data.tags["prefect_tensorflow.stage"] == "train"

    loss = client.get_metric_history(result.mlflow_run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(310, 401, 10))  # every summary step, none lost or doubled
    accuracy = client.get_metric_history(result.mlflow_run_id, "eval/accuracy")
    assert sorted(m.step for m in accuracy) == [350, 400]
    last = max(accuracy, key=lambda m: m.step)
    assert last.value == pytest.approx(result.final_metrics["accuracy"])

    listed = client.download_artifacts(result.mlflow_run_id, "checkpoints/checkpoints.json", str(tmp_path))
    steps = [row["step"] for row in json.loads(Path(listed).read_text()) if row["valid"]]
    assert 400 in steps and 350 in steps
    tensorboard = {a.path for a in client.list_artifacts(result.mlflow_run_id, "tensorboard")}
    assert "tensorboard/graph.pbtxt" in tensorboard and "tensorboard/eval" in tensorboard
    assert any(p.startswith("tensorboard/events.out.tfevents.") for p in tensorboard)
    assert result.mlflow_run_url.endswith(f"/runs/{result.mlflow_run_id}")
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(tmp_path / "mlflow" / "artifacts")  # beside the store, not ./mlruns


def test_a_bad_argument_fails_before_any_run_is_created(mlflow_store, tmp_path: Path):
    with pytest.raises(ValueError, match="expected an integer >= 1"):
        train_tracked(tmp_path / "m", mlflow_store, steps=10, batch_size=0)
    with pytest.raises(Exception, match="no_such_module"):
        train_tracked(tmp_path / "m", mlflow_store, steps=10, model="no_such_module:build")
    # hparams the builder does not take (typed into a Run form, say) are refused by its signature
    with pytest.raises(Exception, match=r"^hparams: model 'iris' \(hidden_units=.*does not accept .*__import__"):
        train_tracked(tmp_path / "m", mlflow_store, steps=10, hparams={"__import__": "os"})
    assert _runs(mlflow_store) == []


def test_a_training_that_fails_ends_its_run_failed(mlflow_store, tmp_path: Path):
    from prefect_tensorflow.tasks.errors import TrainingError

    with pytest.raises(TrainingError, match="tf.data.Dataset"):
        train_tracked(tmp_path / "m", mlflow_store, steps=10, data="models_for_tests:not_a_dataset")
    (run,) = _runs(mlflow_store)
    assert run.info.status == "FAILED"


def test_the_token_is_never_written_as_a_param_or_tag(model_dir_copy: Path, mlflow_store):
    from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig

    conn = MlflowConfig(tracking_uri=mlflow_store.tracking_uri, experiment_name="tests", token="tok-9f2c7e")
    result = train_tracked(model_dir_copy, conn, more_steps=5, policy=CheckpointPolicy(save_at_start=False))
    run = conn.client().get_run(result.mlflow_run_id)
    assert "tok-9f2c7e" not in json.dumps({**run.data.params, **run.data.tags})


def test_the_training_task_tags_its_run_with_the_prefect_flow_run(prefect_api, model_dir_copy: Path, mlflow_store):
    from prefect import flow
    from prefect.runtime import flow_run

    from prefect_tensorflow.tasks import TrainingConfig, train_with_checkpoints

    @flow
    def tracked(model_dir: str):
        result = train_with_checkpoints(model_dir, TrainingConfig(more_steps=10), tracking=mlflow_store)
        return result, flow_run.id

    result, flow_run_id = tracked(str(model_dir_copy))
    tags = mlflow_store.client().get_run(result.mlflow_run_id).data.tags
    assert tags["prefect.flow_run_id"] == flow_run_id
    assert tags["prefect.task_run_id"]
    assert tags["prefect.flow_name"] == "tracked"


def test_metrics_that_cannot_be_sent_fail_the_run_naming_the_server():
    from prefect_tensorflow.flows.servers import free_port
    from prefect_tensorflow.tasks.errors import MlflowUnavailableError
    from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
    from prefect_tensorflow.tasks.registry.tracking import MetricBatcher

    port = free_port()  # nothing listens there
    conn = MlflowConfig(
        tracking_uri=f"http://127.0.0.1:{port}", request_retries=0, operation_retries=1, operation_retry_delay=0.1
    )
    batcher = MetricBatcher(conn, "0" * 32, interval=0.1)
    for step in range(1, 51):
        batcher.add("loss", 1.0 / step, step)
    with pytest.raises(MlflowUnavailableError) as info:
        batcher.close()
    assert f"http://127.0.0.1:{port}" in str(info.value) and "logging the metrics" in str(info.value)
