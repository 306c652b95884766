"""Faults of a real tracking server: a real `mlflow server` process on 127.0.0.1 (SQLite
backend, `--serve-artifacts`), stopped and started again in the middle of training and of
registration, down for good, and answering HTTP 503/504 through a real reverse proxy.

Nothing is mocked: TensorFlow trains for real, the server is killed for real (SIGTERM or
SIGKILL of its process group) and restarted on the same port with the same database and
artifact directory. The only fault injector is `FaultyProxy` (tests/mlflow_server.py), a
real HTTP proxy, for the 5xx responses a stock server cannot be made to send on demand.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
from helpers import export, register_export, train
from mlflow_server import FaultyProxy, MlflowServer

from prefect_tensorflow.flows.servers import free_port
from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
from prefect_tensorflow.tasks.checkpoints.selection import checkpoint_ref
from prefect_tensorflow.tasks.errors import MlflowUnavailableError
from prefect_tensorflow.tasks.export.saved_model import ExportResult, saved_model_digest
from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
from prefect_tensorflow.tasks.registry.model_versions import CHALLENGER, CHAMPION, FINGERPRINT_TAG
from prefect_tensorflow.tasks.registry.tracking import TAG_PREFIX
from prefect_tensorflow.tasks.run_context import LOGGER_NAME

pytestmark = pytest.mark.slow

# Long enough to wait out a restart (a few seconds down, then ~15-30 s of start-up on 2 cores):
# each attempt's HTTP retries wait 0 + 2 s, the attempts 1, 2, 4, 8, 16, 32 s: ~75 s in all.
PATIENT = dict(request_retries=2, request_backoff_factor=1, operation_retries=6, operation_retry_delay=1)
# Gives up within a few seconds.
IMPATIENT = dict(request_retries=1, request_backoff_factor=0, operation_retries=1, operation_retry_delay=0.2)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` for the module; always stopped at the end."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def server(mlflow_server: MlflowServer, request):
    """The module's server, running (restarted if a failed test left it stopped); its log tail on failure."""
    if not mlflow_server.running:
        mlflow_server.start()
    failed_before = request.session.testsfailed
    yield mlflow_server
    if request.session.testsfailed > failed_before:
        print(mlflow_server.log_tail())  # shown with the failure ("Captured stdout teardown")


def connection(uri: str, experiment: str, **retries: Any) -> MlflowConfig:
    return MlflowConfig(tracking_uri=uri, experiment_name=experiment, **retries)


def train_tracked(model_dir: str, conn: MlflowConfig, **config: Any):
    return train(model_dir, tracking=conn, **config)


def direct_client(server: MlflowServer):
    """A client straight to the server (for checks, with the server up)."""
    from mlflow import MlflowClient

    return MlflowClient(server.uri, server.uri)


def export_checkpoint(trained_dir: Path, step: int, tmp_path: Path) -> ExportResult:
    """A verified SavedModel of `trained_dir`'s checkpoint at `step` (each step: its own fingerprint)."""
    return export(str(trained_dir / f"model.ckpt-{step}"), str(tmp_path / "export"))


def versions_with(server: MlflowServer, name: str, fingerprint: str) -> list:
    client = direct_client(server)
    if not client.search_registered_models(f"name = '{name}'"):
        return []
    return client.search_model_versions(f"name = '{name}' and tags.`{FINGERPRINT_TAG}` = '{fingerprint}'")


@pytest.fixture
def consumer(monkeypatch, server: MlflowServer):
    """Call it to point MLflow's fluent API at the server, as a team that loads the models has it
    (MLFLOW_TRACKING_URI); only once the code under test is done, so that nothing it does can lean on it."""

    def point_at_server() -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)

    return point_at_server


def download_version(name: str, version: int, dst: Path) -> Path:
    """`models:/name/version` downloaded as a consumer does (after `consumer()`)."""
    import mlflow

    assert os.environ.get("MLFLOW_TRACKING_URI"), "call consumer() first: MLflow would fall back to ./mlflow.db"
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)))


def assert_complete(name: str, version: int, exported: ExportResult, dst: Path) -> Path:
    """The version's model downloads from the server and holds the export's very SavedModel."""
    local = download_version(name, version, dst)
    copied = local / "artifacts" / os.path.basename(exported.path)
    assert copied.is_dir(), f"models:/{name}/{version} has no SavedModel artifact: {sorted(os.listdir(local))}"
    assert saved_model_digest(str(copied)) == exported.digest
    return local


class Background:
    """`fn()` in a thread; `result()` joins it and returns its value or re-raises its error."""

    def __init__(self, fn: Callable[[], Any], name: str):
        self._value: Any = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._value = fn()
        except BaseException as err:  # noqa: BLE001 - handed to result()
            self._error = err

    def alive(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout: float, server: MlflowServer) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"{self._thread.name} still running after {timeout:.0f} s\n{server.log_tail()}")
        if self._error is not None:
            raise self._error
        return self._value


def wait_for(condition: Callable[[], bool], what: str, job: Background, server: MlflowServer, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while not condition():
        if not job.alive():
            job.result(0, server)  # raises what the job raised
            raise AssertionError(f"the job ended before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s\n{server.log_tail()}")
        time.sleep(0.02)


class RetryWarnings(logging.Handler):
    """The package's "... failed (...); retrying in N s" warnings (`MlflowConfig.retrying`), from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "; retrying in " in message:
            self.messages.append(message)


@contextmanager
def retry_warnings() -> Iterator[RetryWarnings]:
    """Collect the retry warnings logged (outside a Prefect run) while the block runs."""
    handler, logger = RetryWarnings(), logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def artifact_files(root: Path) -> set[str]:
    return {os.path.join(d, f) for d, _, files in os.walk(root) for f in files}


# 1. The whole flow against the real server -----------------------------------------------------------


def test_retrain_flow_tracks_and_registers_on_a_real_server(prefect_api, server, tmp_path, consumer):
    import mlflow
    import tensorflow as tf

    from prefect_tensorflow.flows.retrain import retrain
    from prefect_tensorflow.tasks.blocks import MlflowConnection
    from prefect_tensorflow.tasks.configs import TrainingConfig
    from prefect_tensorflow.tasks.iris import read_iris

    conn = MlflowConnection(tracking_uri=server.uri, experiment_name="flow")
    policy = CheckpointPolicy(save_checkpoints_steps=100, keep_checkpoint_max=None)
    summary = retrain(
        model_dir=str(tmp_path / "m"),
        training=TrainingConfig(steps=200, policy=policy, summary_every_n_steps=10),
        export_base=str(tmp_path / "export"),
        frozen_dir=str(tmp_path / "frozen"),
        registered_model_name="iris-flow",
        mlflow=conn,
    )
    client = direct_client(server)

    # The training run: params, the loss at every summary step, checkpoint metrics, artifacts.
    run = client.get_run(summary.training.mlflow_run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["steps"] == "200" and params["policy.save_checkpoints_steps"] == "100"
    assert params["model"] == "iris" and params["seed"] == "0" and params["summary_every_n_steps"] == "10"
    assert run.data.tags[TAG_PREFIX + "stage"] == "train" and "prefect.flow_run_id" in run.data.tags
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert summary.training.steps_run == 200
    assert sorted(m.step for m in losses) == list(range(10, 201, 10))  # none lost or doubled
    for key in ("eval/accuracy", "eval/loss"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [0, 100, 200]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == [100, 200]

    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "tensorboard", "frozen_graph"} <= top
    listed = client.download_artifacts(run.info.run_id, "checkpoints/checkpoints.json", str(tmp_path))
    rows = json.loads(Path(listed).read_text())
    assert sorted(row["step"] for row in rows) == [0, 100, 200]
    board = {a.path: a for a in client.list_artifacts(run.info.run_id, "tensorboard")}
    assert any(os.path.basename(p).startswith("events.out.tfevents.") for p in board)
    assert "tensorboard/graph.pbtxt" in board
    evals = [a.path for a in client.list_artifacts(run.info.run_id, "tensorboard/eval")]
    assert any(os.path.basename(p).startswith("events.out.tfevents.") for p in evals)
    frozen = {os.path.basename(a.path) for a in client.list_artifacts(run.info.run_id, "frozen_graph")}
    assert {"model.ckpt-200.pb", "frozen_graph.json"} <= frozen

    # The version: lineage tags, aliases, and artifacts that are on the server and predict as the export does.
    registered = summary.registered
    assert registered is not None and (registered.name, registered.version) == ("iris-flow", 1)
    mv = client.get_model_version("iris-flow", "1")
    assert mv.run_id == run.info.run_id
    tags = mv.tags
    assert tags[FINGERPRINT_TAG] == summary.export.fingerprint
    assert tags[TAG_PREFIX + "checkpoint.path"] == summary.checkpoint.path == str(tmp_path / "m" / "model.ckpt-200")
    assert tags[TAG_PREFIX + "checkpoint.step"] == "200"
    for key in ("parity.checkpoint_vs_saved_model", "parity.saved_model_vs_pyfunc", "parity.checkpoint_vs_frozen_graph"):
        assert 0 <= float(tags[TAG_PREFIX + key]) <= 1e-5, key
    assert tags[TAG_PREFIX + "frozen_graph.sha256"] == summary.frozen_graph.digest
    assert {CHALLENGER, CHAMPION} <= set(mv.aliases)

    on_server = [Path(d) for d, _, files in os.walk(server.artifacts) if "saved_model.pb" in files]
    assert any(saved_model_digest(str(d)) == summary.export.digest for d in on_server), (
        f"no copy of the export's SavedModel in the server's artifact store {server.artifacts}"
    )
    consumer()
    local = assert_complete("iris-flow", 1, summary.export, tmp_path / "download")
    features = np.asarray(read_iris()[0], dtype=np.float32)
    (input_name,) = summary.export.signature.inputs
    predicted = mlflow.pyfunc.load_model(str(local)).predict({input_name: features})
    expected = tf.saved_model.load(summary.export.path).signatures["serving_default"](**{input_name: tf.constant(features)})
    assert set(predicted) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(predicted[key], value.numpy(), rtol=0, atol=1e-6, err_msg=key)


# 2. Stopped in the middle and started again ----------------------------------------------------------


def test_tracked_training_survives_a_server_restart(server, tmp_path):
    conn = connection(server.uri, "restart-training", **PATIENT)
    model_dir = tmp_path / "m"
    steps = 1500
    policy = CheckpointPolicy(save_checkpoints_steps=250)
    every = 10  # the loss is logged at every summary step
    job = Background(
        lambda: train_tracked(str(model_dir), conn, steps=steps, policy=policy, summary_every_n_steps=every), "train"
    )
    wait_for(lambda: (model_dir / "model.ckpt-250.index").exists(), "checkpoint at step 250", job, server)
    assert job.alive() and not (model_dir / f"model.ckpt-{steps}.index").exists()
    server.stop(signal.SIGKILL)
    # Training goes on without the server (metrics queue for the sender); its last checkpoint is the event
    # that says training is over, with the rest still to send: the job must be waiting, not done.
    wait_for(lambda: (model_dir / f"model.ckpt-{steps}.index").exists(), "the last checkpoint, server down", job, server)
    assert job.alive(), "training ended while the server was down; it should have waited to send the rest"
    server.start()
    result = job.result(300, server)

    assert result.final_step == steps and result.steps_run == steps
    client = direct_client(server)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED", server.log_tail()
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert len(losses) == steps // every, f"{len(losses)} loss values for {steps // every} summary steps"
    assert sorted(m.step for m in losses) == list(range(every, steps + 1, every))
    accuracy = client.get_metric_history(run.info.run_id, "eval/accuracy")
    assert sorted(m.step for m in accuracy) == list(range(0, steps + 1, 250))
    assert {"checkpoints", "tensorboard"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_registration_waits_for_a_server_restart(server, trained_dir, tmp_path, consumer):
    exported = export_checkpoint(trained_dir, 100, tmp_path)
    ref = checkpoint_ref(exported.source)
    conn = connection(server.uri, "restart-registration", **PATIENT)
    server.stop(signal.SIGTERM)
    with retry_warnings() as retries:
        job = Background(lambda: register_export(exported, "iris-restart", connection=conn, checkpoint=ref), "register")
        wait_for(lambda: len(retries.messages) >= 2, "two retry warnings, server down", job, server)
    assert job.alive(), "register_export gave up while the server was down"
    assert all(server.uri in message for message in retries.messages), retries.messages  # naming the server
    server.start()
    registered = job.result(300, server)

    assert (registered.version, registered.reused) == (1, False)
    found = versions_with(server, "iris-restart", exported.fingerprint)
    assert [int(mv.version) for mv in found] == [1]
    # registration sets challenger; champion is the gate's (flows/shipping.py runs it after registering)
    assert set(direct_client(server).get_model_version("iris-restart", "1").aliases) == {CHALLENGER}
    consumer()
    assert_complete("iris-restart", 1, exported, tmp_path / "download")


# 3. Down for good -----------------------------------------------------------------------------------


def test_server_down_for_good_raises_naming_it_and_registers_nothing(server, trained_dir, tmp_path):
    exported = export_checkpoint(trained_dir, 200, tmp_path)
    ref = checkpoint_ref(exported.source)
    conn = connection(server.uri, "down", **IMPATIENT)

    # Killed while the logged model's files are being uploaded.
    before = artifact_files(server.artifacts)
    job = Background(lambda: register_export(exported, "iris-down", connection=conn, checkpoint=ref), "register")
    wait_for(lambda: bool(artifact_files(server.artifacts) - before), "upload to the server", job, server)
    server.stop(signal.SIGKILL)
    with pytest.raises(MlflowUnavailableError) as info:
        job.result(120, server)
    assert server.uri in str(info.value) and f"127.0.0.1:{server.port}" in str(info.value)

    # Down: a new call gives up quickly, naming the server.
    started = time.monotonic()
    with pytest.raises(MlflowUnavailableError) as info:
        register_export(exported, "iris-down", connection=conn, checkpoint=ref)
    assert server.uri in str(info.value)
    assert time.monotonic() - started < 30

    # A wrong port: the error names it.
    wrong = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(MlflowUnavailableError) as info:
        register_export(exported, "iris-down", connection=connection(wrong, "down", **IMPATIENT), checkpoint=ref)
    assert wrong in str(info.value)
    assert time.monotonic() - started < 30

    # Back up: nothing half-registered.
    server.start()
    assert versions_with(server, "iris-down", exported.fingerprint) == []
    client = direct_client(server)
    if client.search_registered_models("name = 'iris-down'"):
        assert client.search_model_versions("name = 'iris-down'") == []


# 4. HTTP 5xx through a real proxy -------------------------------------------------------------------


def test_503_on_every_endpoint_is_retried(server, trained_dir, tmp_path, consumer):
    exported = export_checkpoint(trained_dir, 300, tmp_path)
    with FaultyProxy(server.port, failures_per_path=1) as proxy:
        conn = connection(
            proxy.uri, "http-503", request_retries=2, request_backoff_factor=0, operation_retries=2, operation_retry_delay=0.2
        )
        trained = train_tracked(
            str(tmp_path / "m"), conn, steps=50, policy=CheckpointPolicy(save_checkpoints_steps=25), summary_every_n_steps=5
        )
        registered = register_export(exported, "iris-503", connection=conn, checkpoint=checkpoint_ref(exported.source))
    failed = {(method, path) for method, path, status in proxy.log if status == 503}
    assert ("POST", "/api/2.0/mlflow/runs/log-batch") in failed
    assert ("POST", "/api/2.0/mlflow/model-versions/create") in failed
    assert any(m == "PUT" and "/mlflow-artifacts/artifacts/" in p for m, p in failed)
    assert any(m == "GET" and "/mlflow-artifacts/artifacts/" in p for m, p in failed)

    client = direct_client(server)
    assert sorted(m.step for m in client.get_metric_history(trained.mlflow_run_id, "loss")) == list(range(5, 51, 5))
    assert client.get_run(trained.mlflow_run_id).info.status == "FINISHED"
    assert [int(mv.version) for mv in versions_with(server, "iris-503", exported.fingerprint)] == [registered.version]
    consumer()
    assert_complete("iris-503", registered.version, exported, tmp_path / "dl")


def test_permanent_503_raises_naming_the_proxy(server, trained_dir, tmp_path):
    exported = export_checkpoint(trained_dir, 300, tmp_path)
    with FaultyProxy(server.port, failures=10**9) as proxy:
        conn = connection(proxy.uri, "http-503-forever", **IMPATIENT)
        started = time.monotonic()
        with pytest.raises(MlflowUnavailableError) as info:
            register_export(exported, "iris-503-forever", connection=conn, checkpoint=checkpoint_ref(exported.source))
    message = str(info.value)
    assert proxy.uri in message and "503" in message, message
    assert time.monotonic() - started < 30
    assert proxy.requests == (IMPATIENT["operation_retries"] + 1) * (IMPATIENT["request_retries"] + 1)
    assert versions_with(server, "iris-503-forever", exported.fingerprint) == []


def test_lost_create_model_version_response_leaves_one_complete_version(server, trained_dir, tmp_path, consumer):
    """A gateway answers 504 after the server created the version (a timeout on the way back):
    the retry must find that version, not create a second one with the same fingerprint."""
    exported = export_checkpoint(trained_dir, 0, tmp_path)
    with FaultyProxy(server.port, lost_responses={"/api/2.0/mlflow/model-versions/create": 1}) as proxy:
        conn = connection(
            proxy.uri,
            "lost-response",
            request_retries=2,
            request_backoff_factor=0,
            operation_retries=2,
            operation_retry_delay=0.2,
        )
        registered = register_export(exported, "iris-lost", connection=conn, checkpoint=checkpoint_ref(exported.source))
    assert ("POST", "/api/2.0/mlflow/model-versions/create", 504) in proxy.log

    found = versions_with(server, "iris-lost", exported.fingerprint)
    assert sorted(int(mv.version) for mv in found) == [registered.version] == [1], (
        f"versions with the export's fingerprint: {sorted(int(mv.version) for mv in found)}"
    )
    mv = direct_client(server).get_model_version("iris-lost", "1")
    assert set(mv.aliases) == {CHALLENGER}, mv.aliases  # champion is the gate's, after registration
    consumer()
    assert_complete("iris-lost", 1, exported, tmp_path / "dl")
