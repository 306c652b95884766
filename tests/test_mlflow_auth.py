"""A real `mlflow server --app-name basic-auth`: a READ user may not register, an EDIT user may.

The server runs on 127.0.0.1 (SQLite backend, `--serve-artifacts`,
`default_permission = READ`). The admin, with explicit credentials, creates a
registered model and an experiment and two users: `reader` with READ on the
model (and EDIT on the experiment, so that it *could* log a run: the half-done
registration MLflow allows), and `editor` with EDIT on both.

Each user reaches the server through `MlflowConfig(username=..., password=...)`
only: the test's environment holds a wrong `MLFLOW_TRACKING_USERNAME`,
`..._PASSWORD` and `..._TOKEN`, and an `MLFLOW_TRACKING_URI` where nothing
listens, so that anything taking them from the environment fails.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from mlflow_server import MlflowServer

from prefect_tensorflow.tasks import iris
from prefect_tensorflow.tasks.checkpoints.selection import checkpoint_ref
from prefect_tensorflow.tasks.errors import RegistryError
from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig

pytestmark = pytest.mark.slow
MODEL = "guarded-iris"
EXPERIMENT = "guarded"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """The basic-auth server, its admin, a READ and an EDIT user on `MODEL`."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-auth"), auth=True)
    server.start()
    try:
        admin_auth = server.admin()
        admin = MlflowConfig(tracking_uri=server.uri, username=server.admin_username, password=server.admin_password)
        client = admin.client()
        experiment_id = client.create_experiment(EXPERIMENT)
        client.create_registered_model(MODEL)
        users = {}
        for role, model_permission in (("reader", "READ"), ("editor", "EDIT")):
            name, password = f"{role}-{secrets.token_hex(3)}", secrets.token_urlsafe(18)
            admin_auth.create_user(name, password)
            admin_auth.grant_user_permission(name, "registered_model", MODEL, model_permission)
            admin_auth.grant_user_permission(name, "experiment", experiment_id, "EDIT")
            users[role] = (name, password)
        yield {"server": server, "admin": admin, "users": users, "experiment_id": experiment_id}
    except BaseException:
        print(server.log_tail())
        raise
    finally:
        server.stop()


@pytest.fixture(scope="module")
def exported(trained_dir: Path, tmp_path_factory):
    """Checkpoint 300 of the trained iris dir, exported and verified."""
    from helpers import export

    ref = checkpoint_ref(str(trained_dir / "model.ckpt-300"))
    return ref, export(ref.path, tmp_path_factory.mktemp("auth-exports") / "iris", model=iris.MODEL, data=iris.DATA)


@pytest.fixture
def poisoned_env(monkeypatch):
    """Wrong credentials and a dead tracking URI in the environment: explicit settings must win."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "poison-user")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "poison-password")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "poison-token")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")


def connection(auth_server, role: str) -> MlflowConfig:
    username, password = auth_server["users"][role]
    return MlflowConfig(
        tracking_uri=auth_server["server"].uri,
        username=username,
        password=password,
        experiment_name=EXPERIMENT,
        request_retries=0,
        operation_retries=0,
    )


def server_state(auth_server) -> dict:
    """What the admin sees: versions and aliases of `MODEL`, every run and logged model of every experiment."""
    from mlflow.entities import ViewType

    client = auth_server["admin"].client()
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    model = client.get_registered_model(MODEL)
    return {
        "versions": sorted(int(v.version) for v in client.search_model_versions(f"name = '{MODEL}'")),
        "aliases": dict(model.aliases),
        "runs": sorted(r.info.run_id for r in client.search_runs(experiments, run_view_type=ViewType.ALL)),
        "logged_models": sorted(m.model_id for m in client.search_logged_models(experiment_ids=experiments)),
    }


def test_a_read_user_is_refused_before_anything_is_logged(auth_server, exported, poisoned_env):
    from helpers import register_export

    ref, export = exported
    before = server_state(auth_server)
    with pytest.raises(RegistryError) as info:
        register_export(export, MODEL, connection=connection(auth_server, "reader"), checkpoint=ref, data=iris.DATA)
    message = str(info.value)
    assert f"not allowed to register '{MODEL}'" in message
    assert "PERMISSION_DENIED" in message  # the server knew the user (not a 401 from env credentials)
    after = server_state(auth_server)
    assert after == before, f"the refused registration left {after} (before: {before})"
    assert after["versions"] == [] and after["aliases"] == {}


def test_the_check_before_a_flow_refuses_a_read_user_and_accepts_an_edit_user(auth_server, poisoned_env):
    from prefect_tensorflow.tasks.registry.model_versions import check_can_register

    with pytest.raises(RegistryError, match=f"not allowed to register '{MODEL}'.*PERMISSION_DENIED"):
        check_can_register(MODEL, connection(auth_server, "reader"))
    check_can_register(MODEL, connection(auth_server, "editor"))
    check_can_register("a-model-nobody-created-yet", connection(auth_server, "reader"))  # any user may create one


def test_an_edit_user_registers_version_1_with_its_aliases(auth_server, exported, poisoned_env):
    from helpers import register_export

    ref, export = exported
    registered = register_export(export, MODEL, connection=connection(auth_server, "editor"), checkpoint=ref, data=iris.DATA)
    assert (registered.name, registered.version, registered.reused) == (MODEL, 1, False)
    assert registered.aliases == ["challenger"]  # champion moves only by the gate
    version = auth_server["admin"].client().get_model_version(MODEL, "1")
    assert sorted(version.aliases) == ["challenger"]
    editor = auth_server["users"]["editor"][0]
    logged = auth_server["admin"].client().get_logged_model(version.source.removeprefix("models:/"))
    assert logged.tags["mlflow.user"] == editor  # the connection's user, not MLFLOW_TRACKING_USERNAME


def test_the_export_checkpoint_flow_of_a_read_user_fails_before_freezing_or_exporting(
    prefect_api, auth_server, model_dir_copy, tmp_path, poisoned_env
):
    from prefect_tensorflow.flows.export_checkpoint import export_checkpoint
    from prefect_tensorflow.tasks.blocks import MlflowConnection

    reader = connection(auth_server, "reader")
    before = server_state(auth_server)
    state = export_checkpoint(
        model_dir=str(model_dir_copy),
        registered_model_name=MODEL,
        export_base=str(tmp_path / "exports"),
        frozen_dir=str(tmp_path / "frozen"),
        mlflow=MlflowConnection(**reader.model_dump()),
        return_state=True,
    )
    assert state.is_failed(), state
    assert f"not allowed to register '{MODEL}'" in state.message, state.message
    exports = tmp_path / "exports"
    assert not exports.exists() or not [p for p in exports.iterdir() if p.name.isdigit()]  # no SavedModel version
    assert not list(tmp_path.rglob("*.pb"))  # no frozen graph, no saved_model.pb
    assert server_state(auth_server) == before


def test_the_artifact_repository_reads_what_a_real_server_says_it_supports(auth_server, poisoned_env):
    """MLflow >= 3.18 asks `/api/3.0/mlflow/server-info` before some transfers; the project's repository asks it
    itself (with the connection's credentials: `test_mlflow_connection.py` checks the header) and reads the answer."""
    from prefect_tensorflow.tasks.registry.mlflow_client import Connection, artifact_repository

    uri, (username, password) = auth_server["server"].uri, auth_server["users"]["editor"]
    conn = Connection(tracking_uri=uri, registry_uri=uri, username=username, password=password, max_retries=0)
    answered = artifact_repository(conn, f"mlflow-artifacts:/{auth_server['experiment_id']}/x")._fetch_server_capabilities()
    assert "multipart_uploads_enabled" in answered and all(isinstance(v, bool) for v in answered.values()), answered
