"""Windows, lineage and retraining only on new data: the `retrain` flow on daily data.

Tiny trainings (30 steps of 16 examples, evaluated in the loop) on a windowed loader, one MLflow
SQLite store for the module. Eleven tiny trainings, the blocked windows train nothing; ~4 min on 2 shared cores.
"""

from __future__ import annotations

import json
import shutil
from datetime import date

import numpy as np
import pytest
from windowed_loader import write_days

from prefect_tensorflow.flows.retrain import RetrainSummary, SkippedRetrain, retrain
from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
from prefect_tensorflow.tasks.configs import TrainingConfig
from prefect_tensorflow.tasks.data.lineage import read_lineage
from prefect_tensorflow.tasks.data.window import DataWindow
from prefect_tensorflow.tasks.security import check_is_model_dir

START = date(2026, 11, 28)
LOADER = "windowed_loader:load"


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_template_db):
    """One MLflow SQLite store for the module (artifacts beside it)."""
    from prefect_tensorflow.tasks.blocks import MlflowConnection

    root = tmp_path_factory.mktemp("mlflow-windows")
    shutil.copyfile(mlflow_template_db, root / "mlflow.db")
    return MlflowConnection(
        tracking_uri=f"sqlite:///{root}/mlflow.db", experiment_name="windows", request_retries=0, operation_retries=0
    )


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("daily")
    write_days(root, START, 3)
    return root


def training(root, **more) -> TrainingConfig:
    return TrainingConfig(
        data=LOADER,
        data_options={"root": str(root)},
        steps=30,
        batch_size=16,
        evaluation="in_loop",
        policy=CheckpointPolicy(save_checkpoints_steps=30, save_checkpoints_secs=None),
        **more,
    )


def day_window(n: int) -> DataWindow:
    return DataWindow(end=date.fromordinal(START.toordinal() + n + 1))


def shipping(tmp_path, name, store=None):
    out = {"export_base": str(tmp_path / f"export-{name}"), "frozen_dir": str(tmp_path / f"frozen-{name}")}
    return {**out, "mlflow": store, "registered_model_name": name} if store is not None else {**out, "track": False}


def variables(checkpoint: str) -> dict[str, np.ndarray]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(checkpoint)
    return {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if name.startswith(("optimizer/_trainable_variables/", "optimizer/_variables/", "global_step/"))
    }


def test_backfill_three_days_then_the_middle_again_trains_the_same_weights(prefect_api, tmp_path, data_root):
    model_dir = tmp_path / "m"
    first = [
        retrain(model_dir=str(model_dir), training=training(data_root), window=day_window(n), **shipping(tmp_path, "b"))
        for n in range(3)
    ]
    assert all(isinstance(s, RetrainSummary) for s in first)
    assert [s.data.window.label for s in first] == [
        "[2026-11-28, 2026-11-29)",
        "[2026-11-29, 2026-11-30)",
        "[2026-11-30, 2026-12-01)",
    ]
    assert len({s.data.digest for s in first}) == 3
    for s in first:  # each window trained from scratch in a directory of its own
        assert s.training.start_step == 0 and s.training.model_dir.startswith(str(model_dir / "windows" / s.data.window.name))
    assert read_lineage(str(model_dir)).digest == first[2].data.digest
    again = retrain(model_dir=str(model_dir), training=training(data_root), window=day_window(1), **shipping(tmp_path, "b"))
    assert isinstance(again, RetrainSummary)
    assert again.data.digest == first[1].data.digest and again.data.train_digest == first[1].data.train_digest
    assert again.training.model_dir != first[1].training.model_dir  # the first run's checkpoints are kept
    before, after = variables(first[1].checkpoint.path), variables(again.checkpoint.path)
    assert sorted(before) == sorted(after) and before
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    kernel = "optimizer/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE"
    assert not np.array_equal(*(variables(first[n].checkpoint.path)[kernel] for n in (0, 2)))  # other data, other weights


def test_the_same_window_twice_trains_and_registers_nothing_the_second_time(prefect_api, tmp_path, data_root, store):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    def artifacts_of(state) -> dict:
        run_filter = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        with get_client(sync_client=True) as client:
            return {a.key: a for a in client.read_artifacts(artifact_filter=run_filter)}

    model_dir = str(tmp_path / "m")
    trained = retrain(
        model_dir=model_dir,
        training=training(data_root),
        window=day_window(2),
        return_state=True,
        **shipping(tmp_path, "twice", store),
    )
    first = trained.result()
    assert first.registered.version == 1
    files = json.loads(artifacts_of(trained)["data-manifest"].data)  # the window's files, as a table in Prefect
    assert [(row["file"], row["partition"], row["rows"]) for row in files] == [("dt=2026-11-30/part-0.csv", "2026-11-30", 40)]
    state = retrain(
        model_dir=model_dir,
        training=training(data_root),
        window=day_window(2),
        return_state=True,
        **shipping(tmp_path, "twice", store),
    )
    second = state.result()
    assert isinstance(second, SkippedRetrain) and state.is_completed()
    assert second.skipped.startswith(
        f"data unchanged: window {day_window(2).resolved(None).label} digest {first.data.digest[:12]}"
    )
    assert first.training.mlflow_run_id in second.skipped and second.skipped.endswith("--force to retrain")
    versions = store.client().search_model_versions("name = 'twice'")
    assert [int(v.version) for v in versions] == [1]
    artifacts = artifacts_of(state)
    assert set(artifacts) == {"data-skipped"} and second.skipped in artifacts["data-skipped"].data


def test_partitioned_days_a_drifted_one_runs_with_its_drift_on_the_version_a_broken_one_is_blocked(prefect_api, tmp_path, store):
    """The bundled `partitioned` loader on the synthetic iris-daily data: lineage, drift and a block, in MLflow."""
    from prefect_tensorflow.tasks.data.synthetic import IRIS_DAILY_OPTIONS, write_daily_dataset
    from prefect_tensorflow.tasks.errors import DataValidationError

    root = tmp_path / "iris-daily"
    write_daily_dataset(str(root), START, 3, rows_per_day=60, drift_day=date(2026, 11, 29), broken_day=date(2026, 11, 30))
    daily = training(root).model_copy(update={"data": "partitioned", "data_options": {**IRIS_DAILY_OPTIONS, "prefix": str(root)}})
    model_dir = tmp_path / "m"
    first = retrain(model_dir=str(model_dir), training=daily, window=day_window(0), **shipping(tmp_path, "lineage", store))
    assert first.registered.aliases == ["challenger", "champion"]
    assert (model_dir / "data-schema.json").exists() and (model_dir / "data-stats" / f"{first.data.window.name}.json").exists()
    summary = retrain(model_dir=str(model_dir), training=daily, window=day_window(1), **shipping(tmp_path, "lineage", store))
    check_is_model_dir(str(model_dir))  # windows/, the lineage, schema and statistics are a model dir's own
    client = store.client()
    version = client.get_model_version("lineage", str(summary.registered.version))
    lineage = summary.data
    assert summary.registered.version == 2 and version.tags["data.window"] == lineage.window.label == "[2026-11-29, 2026-11-30)"
    assert version.tags["data.digest"] == lineage.digest and version.tags["data.train.digest"] == lineage.train_digest
    assert version.tags["data.eval.digest"] == lineage.eval_digest and version.tags["data.source"] == lineage.source
    assert version.tags["data.rows"] == "60"
    assert str(root) in lineage.source and lineage.files == 1 and lineage.rows == 60  # counted by the statistics
    # drift recorded against the previous window and the champion's (the same window here), never blocking
    for against in ("previous", "champion"):
        assert float(version.tags[f"data.drift.{against}.max"]) > 0.1
        assert "petal_length" in version.tags[f"data.drift.{against}.exceeded"].split(",")
    run = client.get_run(version.run_id)
    assert run.data.tags["data.digest"] == lineage.digest and run.data.tags["data.drift.champion.max"]
    inputs = {{t.key: t.value for t in i.tags}["mlflow.data.context"]: i.dataset for i in run.inputs.dataset_inputs}
    assert inputs["training"].digest == lineage.train_digest[:36] and inputs["eval"].digest == lineage.eval_digest[:36]
    assert str(root) in inputs["training"].source
    documents = {}
    for name in ("manifest", "drift", "statistics", "data-schema"):
        with open(client.download_artifacts(version.run_id, f"data/{name}.json", str(tmp_path))) as handle:
            documents[name] = json.load(handle)
    assert [f["name"] for f in documents["manifest"]["files"]] == ["dt=2026-11-29/part-00000.csv"]
    petal = next(f for f in documents["drift"]["champion"]["features"] if f["feature"] == "petal_length")
    assert (
        petal["measure"] == "jensen_shannon"
        and petal["exceeded"]
        and f"{petal['value']:.6g}" == version.tags["data.drift.champion.max"]
    )
    assert documents["statistics"]["train"]["rows"] == 48 and "site" in documents["statistics"]["train"]["features"]
    assert {f["name"] for f in documents["data-schema"]["features"]} >= {"petal_length", "site", "species"}
    gate = summary.registered.gate
    assert gate is not None and gate.eval_digest is not None  # both versions scored on the challenger's window
    with pytest.raises(DataValidationError) as blocked:
        retrain(model_dir=str(model_dir), training=daily, window=day_window(2), **shipping(tmp_path, "lineage", store))
    named = {line.split(":")[0].strip() for line in str(blocked.value).splitlines()[1:]}
    assert {"sepal_width", "species", "petal_width"} <= named
    assert sorted(int(v.version) for v in client.search_model_versions("name = 'lineage'")) == [1, 2]
    assert read_lineage(str(model_dir)).digest == lineage.digest  # the blocked window is not recorded as trained


@pytest.fixture(scope="module")
def schema_dir(tmp_path_factory, prefect_api):
    """A model dir that trained one good window: its schema is the contract the broken windows break."""
    base = tmp_path_factory.mktemp("schema")
    write_days(base / "daily", START, 1)
    retrain(model_dir=str(base / "m"), training=training(base / "daily"), window=day_window(0), **shipping(base, "schema"))
    return base / "m"


@pytest.mark.parametrize(
    "broken, line",
    [
        ("new_category", "site: new category 'east' (vocabulary: north, south)"),
        ("nan_burst", "f1: 50% missing (max 0%)"),
        ("dropped_column", "f3: column missing"),
        ("out_of_range", "f2: 99 above max 6.9"),
    ],
)
def test_a_broken_window_is_blocked_before_anything_is_trained(prefect_api, tmp_path, schema_dir, broken, line):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from prefect_tensorflow.tasks.errors import DataValidationError

    write_days(tmp_path / "daily", date(2026, 11, 29), 1, broken=broken)
    state = retrain(
        model_dir=str(schema_dir),
        training=training(tmp_path / "daily"),
        window=day_window(1),
        return_state=True,
        **shipping(tmp_path, "x"),
    )
    assert state.is_failed()
    with pytest.raises(DataValidationError) as blocked:
        state.result()
    assert str(blocked.value).splitlines()[1:] == [f"  {line}"]
    assert not (schema_dir / "windows" / "2026-11-29_2026-11-30").exists() and not (tmp_path / "export-x").exists()
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    table = json.loads(next(a for a in found if a.key == "data-anomalies").data)
    assert [row["feature"] for row in table] == [line.split(":")[0]] and line.split(": ", 1)[1].split(" (")[0] in table[0][
        "value"
    ]


def test_iris_runs_without_a_window_and_refuses_one(prefect_api, tmp_path):
    plain = TrainingConfig(steps=20, batch_size=16, evaluation="in_loop")
    summary = retrain(model_dir=str(tmp_path / "m"), training=plain, **shipping(tmp_path, "iris"))
    assert summary.data is None and summary.training.model_dir == str(tmp_path / "m")
    with pytest.raises(ValueError, match=r"^window: the dataset loader reads no window"):
        retrain(model_dir=str(tmp_path / "m"), training=plain, window=DataWindow(end="2026-12-01"), **shipping(tmp_path, "iris"))


def test_the_command_line_takes_the_window_end_and_force_and_states_a_skip(prefect_api, tmp_path, data_root, schema_dir):
    from typer.testing import CliRunner

    from prefect_tensorflow.flows.cli import app

    runner = CliRunner()
    common = [
        "retrain", "--model-dir", str(tmp_path / "m"), "--data", LOADER, "--data-options", f"root={data_root}",
        "--steps", "30", "--batch-size", "16", "--evaluation", "in_loop", "--export-base", str(tmp_path / "e"),
        "--frozen-dir", str(tmp_path / "f"), "--no-mlflow", "--window-end", "2026-11-30",
    ]  # fmt: skip
    trained = runner.invoke(app, common)
    assert trained.exit_code == 0, trained.output
    assert "data:                 window [2026-11-29, 2026-11-30), 1 files, 40 rows, digest" in trained.stdout
    again = runner.invoke(app, common)
    assert again.exit_code == 0, again.output
    assert "skipped: data unchanged: window [2026-11-29, 2026-11-30) digest" in again.stdout
    assert "--force to retrain\nnothing was trained, exported or registered" in again.stdout
    forced = runner.invoke(app, [*common, "--force", "--json"])
    assert forced.exit_code == 0, forced.output
    assert '"steps_run": 30' in forced.stdout and '"skipped": null' in forced.stdout
    write_days(tmp_path / "broken", date(2026, 11, 29), 1, broken="new_category")
    broken = [*common[:2], str(schema_dir), *common[3:6], f"root={tmp_path / 'broken'}", *common[7:]]
    blocked = runner.invoke(app, broken)
    assert blocked.exit_code == 2, blocked.output
    assert blocked.stderr.splitlines()[-2:] == [
        "error: data 'windowed_loader:load' [2026-11-29, 2026-11-30): 1 anomaly against the data schema; nothing was trained:",
        "  site: new category 'east' (vocabulary: north, south)",
    ]
    refused = runner.invoke(app, ["retrain", "--model-dir", str(tmp_path / "iris"), "--no-mlflow", "--window-end", "2026-11-30"])
    assert refused.exit_code == 2 and refused.stderr.startswith("error: window: the dataset loader reads no window"), (
        refused.output
    )


def test_a_window_trains_into_an_s3_model_dir_and_its_lineage_lives_there(prefect_api, tmp_path, data_root, s3):
    model_dir = s3.uri("models/daily")
    first = retrain(model_dir=model_dir, training=training(data_root), window=day_window(0), **shipping(tmp_path, "s3"))
    assert first.training.model_dir.startswith(f"{model_dir}/windows/2026-11-28_2026-11-29/")
    assert first.checkpoint.path.startswith(first.training.model_dir)
    assert {"data-lineage.json", "data-schema.json", "data-stats/2026-11-28_2026-11-29.json"} <= {
        key.removeprefix("models/daily/") for key in s3.keys("models/daily/")
    }
    again = retrain(model_dir=model_dir, training=training(data_root), window=day_window(0), **shipping(tmp_path, "s3"))
    assert isinstance(again, SkippedRetrain) and again.previous.trained_dir == first.training.model_dir


def test_a_sweep_refuses_a_window_for_a_loader_that_reads_none(prefect_api, tmp_path):
    from prefect_tensorflow.flows.sweep import sweep

    with pytest.raises(ValueError, match=r"^window: the dataset loader reads no window"):
        sweep(sweep_root=str(tmp_path / "s"), window=DataWindow(end="2026-12-01"), track=False)


def test_a_late_run_reads_the_window_of_its_scheduled_time_not_the_wall_clock(prefect_api, tmp_path, schema_dir):
    """A flow run scheduled for 2026-11-29 02:00 and run now reads [2026-11-28, 2026-11-29): the window
    `schema_dir` trained, so it skips, naming that window."""
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import Scheduled

    parameters = {
        "model_dir": str(schema_dir),
        "training": training(schema_dir.parent / "daily").model_dump(mode="json"),
        **shipping(tmp_path, "late"),
    }
    with get_client(sync_client=True) as client:
        scheduled = Scheduled(scheduled_time=datetime(2026, 11, 29, 2, 0, tzinfo=timezone.utc))
        flow_run = client.create_flow_run(retrain, parameters=parameters, state=scheduled)
    late = run_flow(retrain, flow_run=flow_run, parameters=parameters)
    assert isinstance(late, SkippedRetrain), late
    assert late.data.window.label == "[2026-11-28, 2026-11-29)" and late.skipped.startswith(
        "data unchanged: window [2026-11-28, 2026-11-29)"
    )


@pytest.mark.slow
def test_a_windowed_run_killed_mid_training_records_nothing_and_the_next_run_trains(
    tmp_path, data_root, cli_env, prefect_database
):
    """The skip decision is only as true as `data-lineage.json`: a run SIGKILLed while training (its own process,
    Prefect's ephemeral API) must not have written it, so the next run of that window trains instead of skipping."""
    import os
    import signal
    import subprocess
    import time

    from helpers import cli_command
    from served import seed_prefect_home

    model_dir = tmp_path / "m"
    args = [
        "retrain", "--model-dir", str(model_dir), "--data", LOADER, "--data-options", f"root={data_root}",
        "--batch-size", "16", "--evaluation", "none", "--export-base", str(tmp_path / "e"),
        "--frozen-dir", str(tmp_path / "f"), "--no-mlflow", "--window-end", "2026-11-30",
    ]  # fmt: skip
    env = dict(cli_env, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_TENSORFLOW_HOME=str(tmp_path / "home"))
    seed_prefect_home(tmp_path / "prefect-home", prefect_database)
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(
            cli_command(*args, "--steps", "1000000", "--save-checkpoints-steps", "200"),
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while not list((model_dir / "windows").glob("*/*/model.ckpt-200.index")):
                assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint after 300 s"
                time.sleep(0.5)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert read_lineage(str(model_dir)) is None  # nothing claims the window was trained
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        code = subprocess.run(
            cli_command(*args, "--steps", "30", "--json"), env=env, stdout=out, stderr=err, timeout=600
        ).returncode
    assert code == 0, (tmp_path / "err").read_text()[-3000:]
    summary = json.loads((tmp_path / "out").read_text())
    assert summary["skipped"] is None and summary["training"]["steps_run"] == 30
    lineage = read_lineage(str(model_dir))
    assert lineage is not None and lineage.window.name == "2026-11-29_2026-11-30"
