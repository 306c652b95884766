"""register_model_version: a verified export becomes a registered version, once, with lineage and aliases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import register_export

from prefect_tensorflow.flows.servers import free_port
from prefect_tensorflow.tasks import iris
from prefect_tensorflow.tasks.checkpoints.selection import checkpoint_ref
from prefect_tensorflow.tasks.errors import MlflowSettingsError, RegistryError
from prefect_tensorflow.tasks.registry.model_versions import FINGERPRINT_TAG

NAME = "tests-iris"


@pytest.fixture(scope="module")
def exports(trained_dir: Path, tmp_path_factory):
    """Checkpoints 100 and 300 of the trained iris dir, each exported and verified."""
    from helpers import export

    base = tmp_path_factory.mktemp("exports") / "iris"
    out = {}
    for step in (100, 300):
        ref = checkpoint_ref(str(trained_dir / f"model.ckpt-{step}"))
        out[step] = (ref, export(ref.path, base, model=iris.MODEL, data=iris.DATA))
    return out


def _iris_features(n: int = 30) -> np.ndarray:
    batch = [x.numpy() for x, _ in iris.load_dataset("eval").take(n)]
    return np.stack(batch).astype(np.float32)


def _versions(conn, name: str = NAME):
    return conn.client().search_model_versions(f"name = '{name}'")


def test_an_export_becomes_a_registered_version_that_pyfunc_runs_like_the_saved_model(
    exports, mlflow_store, tmp_path: Path, monkeypatch
):
    import mlflow
    import tensorflow as tf

    ref, exported = exports[300]
    registered = register_export(exported, NAME, connection=mlflow_store, checkpoint=ref, data=iris.DATA)
    assert (registered.version, registered.reused) == (1, False)
    assert registered.aliases == ["challenger"]  # champion moves only by the gate (test_champion_gate.py)
    assert registered.gate is None
    assert registered.pyfunc_parity.max_abs_diff == 0.0

    mv = mlflow_store.client().get_model_version(NAME, "1")
    tags = mv.tags
    assert tags[FINGERPRINT_TAG] == exported.fingerprint
    assert tags["prefect_tensorflow.checkpoint.path"] == ref.path
    assert tags["prefect_tensorflow.checkpoint.step"] == "300"
    assert tags["prefect_tensorflow.export.dir"] == exported.path
    assert tags["prefect_tensorflow.export.sha256"] == exported.digest
    # the version page's description says where it came from (tags sit below a scroll area there)
    assert f"`{ref.path}`" in mv.description and f"`{exported.digest}`" in mv.description
    assert float(tags["prefect_tensorflow.parity.checkpoint_vs_saved_model"]) == exported.parity.max_abs_diff
    assert float(tags["prefect_tensorflow.metric.accuracy"]) == pytest.approx(ref.metrics["accuracy"])
    assert not any(key.startswith("prefect_tensorflow.gate.") for key in tags)
    run = mlflow_store.client().get_run(mv.run_id)
    assert run.data.tags["prefect_tensorflow.stage"] == "export"

    features = _iris_features()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store.tracking_uri)  # as a serving team loads it
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")
    predicted = model.predict({"features": features})
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path / "dl")))
    expected = tf.saved_model.load(exported.path).signatures["serving_default"](features=tf.constant(features))
    for key in ("logits", "probabilities", "class_ids"):
        np.testing.assert_array_equal(predicted[key], expected[key].numpy())

    # Pinned from the running environment, signature and input example recorded.
    requirements = (local / "requirements.txt").read_text().split()
    assert f"tensorflow=={tf.__version__}" in requirements
    assert f"mlflow=={mlflow.__version__}" in requirements
    mlmodel = (local / "MLmodel").read_text()
    assert '"name": "features"' in mlmodel and '"name": "class_ids"' in mlmodel
    assert json.loads((local / "serving_input_example.json").read_text())["inputs"]["features"]
    # The pyfunc needs no prefect_tensorflow: its code is a standalone file in the model.
    assert "prefect_tensorflow" not in (local / "saved_model_pyfunc.py").read_text().split('"""', 2)[2]


def test_registering_the_same_export_again_returns_the_existing_version(exports, mlflow_store):
    ref, exported = exports[300]
    first = register_export(exported, NAME, connection=mlflow_store, checkpoint=ref, data=iris.DATA)
    again = register_export(exported, NAME, connection=mlflow_store, checkpoint=ref, data=iris.DATA)
    assert again.reused and again.version == first.version == 1
    assert again.gate == first.gate  # the decision recorded on the version, read back
    assert len(_versions(mlflow_store)) == 1


def test_registering_moves_challenger_never_champion(exports, mlflow_store):
    (ref100, exp100), (ref300, exp300) = exports[100], exports[300]
    first = register_export(exp100, NAME, connection=mlflow_store, checkpoint=ref100, data=iris.DATA)
    second = register_export(exp300, NAME, connection=mlflow_store, checkpoint=ref300, data=iris.DATA)
    assert (first.version, second.version) == (1, 2)
    client = mlflow_store.client()
    assert {alias: str(v) for alias, v in client.get_registered_model(NAME).aliases.items()} == {"challenger": "2"}
    tags = client.get_model_version(NAME, "2").tags
    assert float(tags["prefect_tensorflow.metric.loss"]) == pytest.approx(ref300.metrics["loss"])  # lineage, not a decision


@pytest.mark.parametrize("name", ["", "  ", "team/iris"])
def test_a_bad_registered_model_name_is_refused(exports, mlflow_store, name):
    ref, exported = exports[300]
    with pytest.raises(MlflowSettingsError, match="registered_model_name: expected"):
        register_export(exported, name, connection=mlflow_store, checkpoint=ref)


def test_an_export_changed_since_it_was_verified_is_never_registered(exports, mlflow_store, tmp_path: Path):
    ref, exported = exports[300]
    copy = tmp_path / "exports" / "7"
    shutil.copytree(exported.path, copy)
    data = next((copy / "variables").glob("variables.data-*"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    tampered = exported.model_copy(update={"path": str(copy), "export_base": str(copy.parent)})
    with pytest.raises(RegistryError, match="files differ from what was exported"):
        register_export(tampered, NAME, connection=mlflow_store, checkpoint=ref, data=iris.DATA)
    assert mlflow_store.client().search_registered_models() == []


@pytest.mark.slow
def test_two_processes_registering_one_export_end_with_one_version(exports, mlflow_store, tmp_path: Path):
    ref, exported = exports[300]
    (tmp_path / "export.json").write_text(exported.model_dump_json())
    (tmp_path / "ref.json").write_text(ref.model_dump_json())
    script = f"""
import json, sys
from prefect_tensorflow.tasks.export.saved_model import ExportResult
from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig as MlflowConnection
from prefect_tensorflow.tasks.registry.model_versions import register_model_version
from prefect_tensorflow.tasks.checkpoints.selection import CheckpointRef
exported = ExportResult.model_validate_json(open({str(tmp_path / "export.json")!r}).read())
ref = CheckpointRef.model_validate_json(open({str(tmp_path / "ref.json")!r}).read())
conn = MlflowConnection(tracking_uri={mlflow_store.tracking_uri!r}, experiment_name="tests")
print(json.dumps({{"version": register_model_version(exported, {NAME!r}, conn, checkpoint=ref).version}}))
"""
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    versions = {json.loads(out.strip().splitlines()[-1])["version"] for out in outs}
    assert versions == {1}
    assert len(_versions(mlflow_store)) == 1


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_real_http_request_like_the_saved_model(exports, mlflow_store, tmp_path: Path):
    import tensorflow as tf

    ref, exported = exports[300]
    register_export(exported, NAME, connection=mlflow_store, checkpoint=ref, data=iris.DATA)
    port = free_port()
    bin_dir = os.path.dirname(sys.executable)  # `mlflow models serve` execs `uvicorn` from PATH, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store.tracking_uri, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [
            os.path.join(bin_dir, "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{NAME}@challenger",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow models serve did not start:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
                time.sleep(1)
        features = _iris_features(10)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": {"features": features.tolist()}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        server.wait(timeout=60)
        log.close()
    predictions = answer["predictions"]
    expected = tf.saved_model.load(exported.path).signatures["serving_default"](features=tf.constant(features))
    np.testing.assert_allclose(np.array(predictions["probabilities"]), expected["probabilities"].numpy(), rtol=0, atol=1e-6)
    assert predictions["class_ids"] == expected["class_ids"].numpy().tolist()
