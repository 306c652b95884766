"""Shared fixtures: a real trained iris model dir, TF1 checkpoints, a Prefect test API."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import tempfile

# Nothing a test writes by default lands in the repo, and a user's MLflow server is never touched.
os.environ["PREFECT_TENSORFLOW_HOME"] = tempfile.mkdtemp(prefix="prefect-tensorflow-home-")
# A Prefect home of this process's own (each pytest-xdist worker's): the ephemeral API a CLI subprocess starts
# keeps its SQLite database there, which two workers' servers must not migrate or write at once.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
for _name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_TOKEN"):
    os.environ.pop(_name, None)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# The longest files first (minutes each): pytest-xdist hands its workers whole files in collection order, and a
# long file taken last would leave the other worker idle until it ends.
LONGEST_FIRST = (
    "test_hostile_inputs.py",
    "test_secret_scan.py",
    "test_crash_resubmission.py",
    "test_cli.py",
    "test_cancel_timeout.py",
    "test_many_runs.py",
    "test_unreadable_runs.py",
    "test_remote_training.py",
    "test_browser.py",
    "test_multi_worker.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect API (its own SQLite database) for tests that run flows or tasks."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory) -> Path:
    """A model dir trained for real: 300 steps, a checkpoint every 100, every one kept.

    Shared read-only; tests that damage files use `model_dir_copy`.
    """
    from helpers import train

    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy

    model_dir = tmp_path_factory.mktemp("trained") / "iris"
    policy = CheckpointPolicy(save_checkpoints_steps=100, keep_checkpoint_max=None)
    train(model_dir, steps=300, policy=policy)
    return model_dir


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow SQLite database: migrating one takes seconds, copying it does not."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture(scope="session")
def prefect_database(tmp_path_factory) -> Path:
    """An empty, migrated Prefect SQLite database: a server on a new PREFECT_HOME spends ~7 CPU-s migrating
    one; `served.seed_prefect_home` copies this one there instead."""
    import subprocess

    home = tmp_path_factory.mktemp("prefect-template")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return home / "prefect.db"


@pytest.fixture
def mlflow_store(tmp_path: Path, mlflow_template_db: Path):
    """An `MlflowConnection` to a fresh SQLite store in `tmp_path/mlflow` (artifacts beside it)."""
    from prefect_tensorflow.tasks.blocks import MlflowConnection

    (tmp_path / "mlflow").mkdir()
    shutil.copyfile(mlflow_template_db, tmp_path / "mlflow" / "mlflow.db")
    return MlflowConnection(
        tracking_uri=f"sqlite:///{tmp_path}/mlflow/mlflow.db",
        experiment_name="tests",
        request_retries=0,
        operation_retries=0,
    )


@pytest.fixture
def model_dir_copy(trained_dir: Path, tmp_path: Path) -> Path:
    """A private copy of `trained_dir` (files and the `checkpoint` state file alike)."""
    target = tmp_path / "iris"
    shutil.copytree(trained_dir, target)
    # copytree leaves the directory's mtime after the state file's ctime; make the
    # state file current again, as it is in a model dir written in place.
    state = target / "checkpoint"
    tmp = target / "checkpoint.tmp"
    shutil.copyfile(state, tmp)
    os.replace(tmp, state)
    return target


def write_tf1_checkpoints(model_dir: Path, steps=(100, 200, 300), signature: bool = False) -> None:
    """Write TF1 `Saver` checkpoints (with `.meta` graphs) the Estimator way, in graph mode.

    With `signature`, each `.meta` also carries a `serving_default` signature
    (features -> scores), as an Estimator's exported meta graphs did.
    """
    import tensorflow as tf

    model_dir.mkdir(parents=True, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(0)  # op determinism may be on in this process
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="features")
        w = tf.compat.v1.get_variable("dense/kernel", [4, 3])
        b = tf.compat.v1.get_variable("dense/bias", [3], initializer=tf.compat.v1.zeros_initializer())
        logits = tf.identity(tf.matmul(x, w) + b, name="logits")
        scores = tf.nn.softmax(logits, name="scores")
        global_step = tf.compat.v1.train.get_or_create_global_step()
        saver = tf.compat.v1.train.Saver(max_to_keep=10)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for step in steps:
                sess.run(global_step.assign(step))
                prefix = saver.save(sess, str(model_dir / "model.ckpt"), global_step=step)
                if signature:
                    meta = tf.compat.v1.train.export_meta_graph()
                    meta.signature_def["serving_default"].CopyFrom(
                        tf.compat.v1.saved_model.predict_signature_def(inputs={"features": x}, outputs={"scores": scores})
                    )
                    Path(prefix + ".meta").write_bytes(meta.SerializeToString())


@pytest.fixture
def tf1_checkpoints():
    """`write_tf1_checkpoints(model_dir, steps)`, as a fixture."""
    return write_tf1_checkpoints


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for CLI subprocesses: quiet TensorFlow, the test's Python first on PATH."""
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO / "tests")  # for the test models' import strings
    return env


# --- the team's servers: S3 (moto), a GCS emulator, PostgreSQL, MLflow on both, Prefect on PostgreSQL ----
# Session-scoped and started only by the (slow) tests that ask for them; each is stopped in `finally`.


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server in a process of its own, requests serialized (conditional writes atomic)."""
    from devtools.team_stack import S3Server

    server = S3Server(str(tmp_path_factory.mktemp("s3-server") / "s3.log")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket of the session's S3 server, this process's environment pointing at the server.

    `s3.env` is the environment a subprocess needs (AWS_* keys, AWS_ENDPOINT_URL_S3).
    """
    from team_servers import Bucket

    bucket = Bucket(s3_server)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in bucket.env.items():
        monkeypatch.setenv(name, value)
    return bucket


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A Google Cloud Storage emulator (fake-gcs-server, see tests/gcs_emulator.py) in a process of its own."""
    from gcs_emulator import GcsServer

    # Its objects in memory-backed /dev/shm where there is one: the emulator writes each object's file
    # synchronously, which on a busy disk makes 10,000 objects take minutes instead of seconds.
    data = tempfile.mkdtemp(prefix="gcs-server-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    server = GcsServer(data, str(tmp_path_factory.mktemp("gcs-server") / "gcs.log"))
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def gcs(gcs_server, monkeypatch):
    """A fresh bucket of the session's GCS emulator, this process's environment pointing at it.

    `gcs.env` is the environment a subprocess needs (STORAGE_EMULATOR_HOST).
    """
    from gcs_emulator import GcsBucket

    bucket = GcsBucket(gcs_server)
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "API_ENDPOINT_OVERRIDE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in bucket.env.items():
        monkeypatch.setenv(name, value)
    return bucket


@pytest.fixture(params=["s3", "gcs"])
def bucket(request):
    """A fresh bucket on each object store the package supports: the test runs once on S3 (`s3`), once on
    Google Cloud Storage (`gcs`). Both have the same helpers (`uri`, `objects`, `read`, `put`, `env`,
    `env_via`, `request_pattern`, `count_requests`, `server`)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster (Debian's server binaries) on 127.0.0.1.

    Its directory is a `tempfile.mkdtemp`, not under pytest's base temp: as root the
    server runs as `postgres`, which cannot enter pytest's 0700 per-user directory.
    """
    from devtools.team_stack import PgCluster

    cluster = PgCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def mlflow_team_server(postgres, s3_server, tmp_path_factory):
    """`mlflow server` as the team runs it: PostgreSQL backend, artifacts proxied to s3://mlflow-artifacts/mlflow.

    Only the server holds S3 credentials. One server for the session (start-up is
    30-60 s on 2 cores, mostly imports): tests use names of their own. Yields its URL.
    """
    from team_servers import Bucket

    from devtools.team_stack import clean_environment, mlflow_server_command
    from prefect_tensorflow.flows.servers import free_port, start_server
    from prefect_tensorflow.tasks.child_processes import stop_process_group

    Bucket(s3_server, name="mlflow-artifacts")
    postgres.create_database("mlflow")
    port = free_port()
    log = tmp_path_factory.mktemp("mlflow-team-server") / "mlflow-server.log"
    env = {**clean_environment(), **s3_server.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1"}
    process = start_server(
        mlflow_server_command(postgres.url("mlflow"), "s3://mlflow-artifacts/mlflow", port),
        str(log),
        env=env,
        health_url=f"http://127.0.0.1:{port}/health",
        timeout=300,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(process)


@pytest.fixture(scope="session")
def prefect_pg_server(postgres, tmp_path_factory):
    """`prefect server start` on a PostgreSQL database; yields its API URL."""
    from devtools.team_stack import clean_environment
    from prefect_tensorflow.flows.servers import free_port, start_prefect_server
    from prefect_tensorflow.tasks.child_processes import stop_process_group

    postgres.create_database("prefect")
    root = tmp_path_factory.mktemp("prefect-pg-server")
    port = free_port()
    env = {
        **clean_environment(),
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres.url("prefect", "postgresql+asyncpg"),
        "PREFECT_API_DATABASE_TIMEOUT": "60",
        "PREFECT_API_DATABASE_CONNECTION_TIMEOUT": "30",
        # Expired leases (a killed lock holder's, test_aliases.py) freed within a second, not up to 15 s later.
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1",
    }
    server = start_prefect_server("127.0.0.1", port, str(root / "prefect-server.log"), env=env, timeout=300)
    try:
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop_process_group(server)
