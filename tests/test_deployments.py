"""The deployments against a real `prefect server start` on 127.0.0.1, runs triggered as the UI does.

One Prefect server for the module; `prefect-tensorflow serve` serves both
deployments as `make serve` does; flow runs are created from the deployment
with custom parameters through the API (what the UI's Run form posts) and
waited for.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from served import seed_prefect_home

from prefect_tensorflow.flows.servers import free_port, start_prefect_server
from prefect_tensorflow.tasks.child_processes import stop_process_group

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = os.path.dirname(sys.executable)


# The Prefect server's database. Every test runs against a server on SQLite (its own database in
# the module's directory); the ones marked `ALSO_ON_POSTGRESQL` run against a server on PostgreSQL
# too (`prefect_pg_server`: the team's setup). Not all of them: each deployment run costs about a
# minute on 2 cores, and the whole suite must stay under 30 minutes; these cover deploying, a run
# triggered as the UI does it, and two runs at once (the concurrency PostgreSQL changes).
ALSO_ON_POSTGRESQL = pytest.mark.parametrize("env", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture(scope="module", params=["sqlite"])
def env(request, tmp_path_factory):
    """A real Prefect server (on SQLite, or the session's on PostgreSQL); the environment of processes that talk to it."""
    root = tmp_path_factory.mktemp(f"deployments-{request.param}")
    environ = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_TENSORFLOW_HOME": str(root / "data"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow/mlflow.db",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    if request.param == "postgresql":
        environ["PREFECT_API_URL"] = request.getfixturevalue("prefect_pg_server")
        yield {"environ": environ, "root": root, "database": "postgresql"}
        return
    port = free_port()
    environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    seed_prefect_home(root / "prefect-home", request.getfixturevalue("prefect_database"))
    server = start_prefect_server("127.0.0.1", port, str(root / "prefect-server.log"), env=environ)
    try:
        yield {"environ": environ, "root": root, "database": "sqlite"}
    finally:
        stop_process_group(server)


@pytest.fixture(scope="module")
def served(env, trained_dir):
    """`prefect-tensorflow serve` against the server, as `make serve` runs it.

    Deployment runs reach only paths under PREFECT_TENSORFLOW_ROOTS: the data home, and the
    trained model dir that pytest made elsewhere. Model code: the registered names, and the
    test builders' module (PREFECT_TENSORFLOW_ALLOWED_MODULES).
    """
    log = env["root"] / "serve.log"
    environ = {
        **env["environ"],
        "PREFECT_TENSORFLOW_ROOTS": f"{env['root'] / 'data'},{trained_dir}",
        "PREFECT_TENSORFLOW_ALLOWED_MODULES": "models_for_tests",
        "PYTHONPATH": str(REPO / "tests"),
    }
    with open(log, "w") as out:
        process = subprocess.Popen(
            [f"{BIN}/prefect-tensorflow", "serve"],
            env=environ,
            cwd=env["root"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while not {"retrain-iris", "export-checkpoint"} <= set(_deployments(env)):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serve did not create the deployments:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield {**env, "log": log}
    finally:
        stop_process_group(process)


@contextmanager
def api(env):
    """A sync Prefect client on the test server (and the settings that point there)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = env["environ"]["PREFECT_API_URL"]
    with temporary_settings(updates={PREFECT_API_URL: url}), SyncPrefectClient(url) as client:
        yield client


def _deployments(env) -> dict:
    with api(env) as client:
        return {d.name: d for d in client.read_deployments()}


def _run_from_ui(env, name: str, parameters: dict, timeout: float = 600, copies: int = 1):
    """Create flow runs from the deployment with custom parameters, as the Run form does, and wait.

    Returns the finished run, or the list of them when `copies` > 1 (created at once).
    """
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with api(env) as client:
        (deployment,) = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
        runs = [client.create_flow_run_from_deployment(deployment.id, parameters=parameters) for _ in range(copies)]
        deadline = time.monotonic() + timeout
        while True:
            runs = [client.read_flow_run(run.id) for run in runs]
            if all(run.state is not None and run.state.is_final() for run in runs):
                return runs[0] if copies == 1 else runs
            if time.monotonic() > deadline:
                pytest.fail(f"flow runs still {[str(r.state) for r in runs]} after {timeout} s")
            time.sleep(1)


def _assert_data_event_deployments(env, deployments: dict) -> None:
    """Issue 21: the sensor's interval schedule, and the automations of retrain-daily's and sync-exports' triggers."""
    assert [s.schedule.interval.total_seconds() for s in deployments["data-sensor"].schedules] == [600]
    with api(env) as client:
        for name, event in (
            ("retrain-daily", "prefect-tensorflow.data.window.closed"),
            ("sync-exports", "mlflow.model_version_alias.created"),
        ):
            (automation,) = client.read_automations_by_name(f"{name}__automation_1")
            assert automation.trigger.expect == {event}
            assert str(deployments[name].id) in str(automation.actions[0].deployment_id)


@ALSO_ON_POSTGRESQL
def test_prefect_deploy_all_creates_both_deployments_with_their_schedules(env, request):
    environ = env["environ"]
    subprocess.run(
        [f"{BIN}/prefect", "work-pool", "create", "tensorflow-process", "--type", "process"],
        env=environ,
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=120,
    )
    result = subprocess.run(
        [f"{BIN}/prefect", "--no-prompt", "deploy", "--all"],
        env=environ,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    deployments = _deployments(env)
    nightly = deployments["retrain-iris"]
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.work_pool_name == "tensorflow-process"
    assert nightly.parameters["training"] == {"model": "iris", "data": "iris", "more_steps": 1000}
    assert nightly.parameters["model_dir"] == ""  # the default under the worker's data home
    export = deployments["export-checkpoint"]
    assert export.schedules == [] and export.work_pool_name == "tensorflow-process"
    schema = export.parameter_openapi_schema
    assert schema.get("required", []) == []  # every parameter has a default
    assert schema["properties"]["model"]["enum"] == ["iris"]  # the Run form offers the registered names
    _assert_data_event_deployments(env, deployments)
    if env["database"] == "postgresql":  # the server keeps them in PostgreSQL
        stored = request.getfixturevalue("postgres").sql("SELECT name FROM deployment", "prefect").split()
        assert {"retrain-iris", "export-checkpoint"} <= set(stored)


def test_the_python_deploy_script_applies_an_environments_overrides(env):
    result = subprocess.run(
        [sys.executable, "deployments/deploy.py", "--env", "prod"],
        env=env["environ"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    deployments = _deployments(env)
    try:
        nightly = deployments["retrain-iris"]
        assert nightly.parameters["model_dir"] == "/srv/models/iris" and nightly.parameters["select"] == "best:accuracy"
        assert nightly.parameters["training"]["more_steps"] == 1000
        assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
        assert deployments["export-checkpoint"].work_pool_name == "tensorflow-process"
        _assert_data_event_deployments(env, deployments)
        with api(env) as client:  # issue 22: the zombie-run automation, and the resubmission's trigger
            (zombie,) = client.read_automations_by_name("prefect-tensorflow: crash runs without heartbeats")
            assert zombie.trigger.within.total_seconds() == 90 and zombie.actions[0].state.value == "CRASHED"
            (resubmit,) = client.read_automations_by_name("resubmit-crashed__automation_1")
            assert resubmit.trigger.expect == {"prefect.flow-run.Crashed"}
        assert deployments["retrain-iris"].job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    finally:
        # Prefect keeps parameters an upsert leaves out: the served deployments must not inherit /srv paths.
        with api(env) as client:
            for deployment in deployments.values():
                client.delete_deployment(deployment.id)
    bad = subprocess.run(
        [sys.executable, "deployments/deploy.py", "--env", "staging"],
        env=env["environ"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "--env: expected one of ['dev', 'prod', 'team-stack'], received 'staging'" in bad.stderr


@ALSO_ON_POSTGRESQL
def test_export_checkpoint_triggered_like_the_ui_registers_a_version(served, trained_dir):
    import mlflow

    run = _run_from_ui(
        served,
        "export-checkpoint",
        {
            "model_dir": str(trained_dir),
            "checkpoint": "200",
            "registered_model_name": "ui-iris",
            "aliases": ["staging"],
            "model": "iris",
            "data": "iris",
        },
    )
    assert run.state.is_completed(), f"{run.state}\n{served['log'].read_text()[-3000:]}"
    assert run.name == "export-ui-iris-200"  # the flow_run_name template
    export_dir = served["root"] / "data" / "exports" / "ui-iris" / "1"  # the default export base is the registered model's
    assert (export_dir / "saved_model.pb").exists()
    client = mlflow.MlflowClient(served["environ"]["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias("ui-iris", "staging")
    assert str(version.version) == "1" and set(version.aliases) == {"challenger", "champion", "staging"}
    assert version.tags["prefect_tensorflow.checkpoint.step"] == "200"
    assert version.tags["prefect_tensorflow.export.dir"] == str(export_dir)
    assert version.tags["prefect.flow_run_id"] == str(run.id)


@ALSO_ON_POSTGRESQL
def test_two_ui_runs_at_once_then_a_re_run_end_with_one_version(served, trained_dir, request):
    import mlflow

    parameters = {"model_dir": str(trained_dir), "checkpoint": "300", "registered_model_name": "ui-twice"}
    runs = _run_from_ui(served, "export-checkpoint", parameters, copies=2)
    assert all(run.state.is_completed() for run in runs), [str(r.state) for r in runs]
    again = _run_from_ui(served, "export-checkpoint", parameters)
    assert again.state.is_completed()
    client = mlflow.MlflowClient(served["environ"]["MLFLOW_TRACKING_URI"])
    versions = client.search_model_versions("name = 'ui-twice'")
    assert [str(v.version) for v in versions] == ["1"]
    exports = served["root"] / "data" / "exports" / "ui-twice"
    sources = [(exports / v / "assets.extra" / "prefect_tensorflow.json").read_text() for v in os.listdir(exports) if v.isdigit()]
    assert sum("model.ckpt-300" in text for text in sources) == 1  # one SavedModel version for the checkpoint
    if served["database"] == "postgresql":  # the three runs are rows of PostgreSQL's flow_run table
        count = request.getfixturevalue("postgres").sql(
            "SELECT count(*) FROM flow_run WHERE parameters->>'registered_model_name' = 'ui-twice'", "prefect"
        )
        assert int(count) == 3


def test_the_served_retrain_deployment_has_its_nightly_schedule(served):
    deployments = _deployments(served)
    assert [s.schedule.cron for s in deployments["retrain-iris"].schedules] == ["0 2 * * *"]
    assert deployments["export-checkpoint"].schedules == []


@pytest.mark.parametrize(
    "name, parameters, message",
    [
        ("export-checkpoint", {"model_dir": "{data}/models/nowhere"}, "does not exist"),
        ("export-checkpoint", {"model_dir": "/etc"}, "model_dir: resolves to /etc, outside the allowed roots"),
        ("export-checkpoint", {"export_base": "{data}/../elsewhere"}, "export_base: resolves to"),
        ("export-checkpoint", {"checkpoint": "999"}, "has no checkpoint at step 999"),
        ("export-checkpoint", {"model": "not_a_module:build"}, "deployment runs accept the registered names"),
        (
            "export-checkpoint",
            {"mlflow": {"tracking_uri": "sqlite:////tmp/elsewhere.db"}},
            "accept a saved MLflow Connection block",
        ),
        (
            "retrain-iris",
            {"training": {"model": "not_a_module:build", "steps": 10}},
            "deployment runs accept the registered names",
        ),
    ],
    ids=[
        "missing-dir",
        "outside-roots",
        "export-outside-roots",
        "no-such-step",
        "module-not-allowed",
        "inline-mlflow",
        "retrain-module-not-allowed",
    ],
)
def test_bad_ui_parameters_fail_the_run_naming_them(served, trained_dir, name, parameters, message):
    import mlflow

    data = str(served["root"] / "data")
    parameters = {k: (v.replace("{data}", data) if isinstance(v, str) else v) for k, v in parameters.items()}
    if name == "export-checkpoint":
        parameters = {"model_dir": str(trained_dir), **parameters}
    run = _run_from_ui(served, name, {**parameters, "registered_model_name": "bad-iris"})
    assert run.state.is_failed(), f"{run.state}\n{served['log'].read_text()[-3000:]}"
    assert message in (run.state.message or ""), run.state.message
    assert not (served["root"] / "elsewhere").exists()
    assert mlflow.MlflowClient(served["environ"]["MLFLOW_TRACKING_URI"]).search_registered_models("name = 'bad-iris'") == []


def test_an_allowed_module_is_loaded_in_a_deployment_run(served, trained_dir):
    """Model code under PREFECT_TENSORFLOW_ALLOWED_MODULES is imported: a builder whose variables do
    not fit the checkpoint fails the run with the mismatch, not with a refusal."""
    run = _run_from_ui(
        served,
        "export-checkpoint",
        {
            "model_dir": str(trained_dir),
            "model": "models_for_tests:wider_model",
            "registered_model_name": "bad-iris",
        },
    )
    assert run.state.is_failed()
    assert "does not match the model being restored" in (run.state.message or ""), run.state.message


def test_rollback_from_the_ui_deployment_then_the_history_shows_both_moves(served):
    """The `rollback-champion` deployment, run as the UI's Run form runs it, moves @champion back under the
    model's lock; the alias history then shows the gate's move and the rollback. An inline MLflow
    connection is refused as in the other deployments."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from prefect_tensorflow.tasks.registry.aliases import alias_history, current_alias_version, move_alias, registry_lock
    from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig

    deadline = time.monotonic() + 120
    while "rollback-champion" not in _deployments(served):  # serve creates the deployments in turn
        assert time.monotonic() < deadline, served["log"].read_text()[-3000:]
        time.sleep(1)
    client = MlflowConfig(tracking_uri=served["environ"]["MLFLOW_TRACKING_URI"]).client()
    name = "ui-rollback"
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment("ui-rollback"))
    for version in ("1", "2"):
        client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
        client.set_model_version_tag(name, version, "prefect_tensorflow.serving.ok", "true")
    with temporary_settings(updates={PREFECT_API_URL: served["environ"]["PREFECT_API_URL"]}):
        for before, version in ((None, 1), (1, 2)):  # what the gate does: under the lock, compare-and-set
            with registry_lock(name):
                move_alias(client, name, "champion", version, expected_from=before, reason="gate: better")

    inline = _run_from_ui(
        served, "rollback-champion", {"registered_model_name": name, "mlflow": {"tracking_uri": "sqlite:////tmp/elsewhere.db"}}
    )
    assert inline.state.is_failed() and "accept a saved MLflow Connection block" in (inline.state.message or "")
    rolled = _run_from_ui(served, "rollback-champion", {"registered_model_name": name, "reason": "v2 misbehaves"})
    assert rolled.state.is_completed(), f"{rolled.state}\n{served['log'].read_text()[-3000:]}"
    assert rolled.name == f"rollback-{name}"
    assert current_alias_version(client, name, "champion") == 1
    moves = [(m.from_version, m.to_version, m.kind, m.by) for m in alias_history(client, name, "champion")]
    assert [move[:3] for move in moves] == [(None, 1, "gate"), (1, 2, "gate"), (2, 1, "rollback")]
    assert moves[-1][3] == rolled.name


def test_the_sync_deployment_reaches_no_path_or_server_beyond_its_configuration(served):
    """`sync-exports` run as the Run form runs it: a target or an export base outside the roots, or an inline
    MLflow connection, fails the run naming the parameter, and nothing is created outside."""
    deadline = time.monotonic() + 120
    while "sync-exports" not in _deployments(served):  # serve creates the deployments in turn
        assert time.monotonic() < deadline, served["log"].read_text()[-3000:]
        time.sleep(1)
    inside = str(served["root"] / "data" / "serving" / "ui-sync")
    cases = [
        ({}, "export_base: expected the s3:// or gs:// export base to mirror"),  # the deployment's default: unset
        ({"target_dir": str(served["root"] / "elsewhere"), "export_base": "s3://team/exports/iris"}, "target_dir: resolves to"),
        ({"target_dir": inside, "export_base": "s3://elsewhere/exports/iris"}, "export_base: resolves to s3://elsewhere"),
        (
            {
                "target_dir": inside,
                "export_base": f"{served['root']}/data/exports/iris",
                "mlflow": {"tracking_uri": "sqlite:////tmp/elsewhere.db"},
            },
            "accept a saved MLflow Connection block",
        ),
    ]
    for parameters, message in cases:
        run = _run_from_ui(served, "sync-exports", {**parameters, "registered_model_name": "ui-sync"})
        assert run.state.is_failed() and message in (run.state.message or ""), (parameters, run.state.message)
    assert not (served["root"] / "elsewhere").exists()
    assert not os.path.exists(inside)  # refused before anything was created
