"""MLflow as the team runs it: `mlflow server` on PostgreSQL with artifacts proxied to S3 (moto).

One server for the session (`mlflow_team_server` in conftest): PostgreSQL
(Debian's binaries, a throwaway cluster), artifacts under
s3://mlflow-artifacts/mlflow, only the server holding S3 credentials. Model
dirs and export bases are on the same S3 server (`s3`: a bucket per test).
Nothing is mocked: registrations and alias moves run in separate processes at
once against the real server.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import export, register_export

from prefect_tensorflow.tasks.checkpoints.selection import checkpoint_ref
from prefect_tensorflow.tasks.errors import RegistryError
from prefect_tensorflow.tasks.export.export_base import saved_model_digest
from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
from prefect_tensorflow.tasks.registry.model_versions import CHAMPION, FINGERPRINT_TAG

pytestmark = pytest.mark.slow


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def connection(server: str, **extra) -> MlflowConfig:
    return MlflowConfig(tracking_uri=server, experiment_name=unique("team"), **extra)


def client_of(server: str):
    from mlflow import MlflowClient

    return MlflowClient(server, server)


@pytest.fixture
def remote_model_dir(s3, trained_dir) -> str:
    s3.upload_dir(str(trained_dir), "models/iris")
    return s3.uri("models/iris")


def test_a_remote_export_is_registered_with_the_bytes_that_were_verified(mlflow_team_server, s3, remote_model_dir, tmp_path):
    import mlflow

    exported = export(f"{remote_model_dir}/model.ckpt-300", s3.uri("exports/iris"))
    assert exported.path == s3.uri("exports/iris/1")
    name = unique("remote-export")
    registered = register_export(
        exported, name, connection=connection(mlflow_team_server), checkpoint=checkpoint_ref(exported.source)
    )
    assert (registered.version, registered.reused) == (1, False)
    source = client_of(mlflow_team_server).get_model_version_download_uri(name, "1")
    downloaded = mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=str(tmp_path / "dl"), tracking_uri=mlflow_team_server
    )
    saved_model = Path(downloaded) / "artifacts" / "1"
    assert (saved_model / "saved_model.pb").exists()
    assert saved_model_digest(str(saved_model)) == exported.digest  # the registered bytes are the verified ones
    version = client_of(mlflow_team_server).get_model_version(name, "1")
    assert version.tags[FINGERPRINT_TAG] == exported.fingerprint
    assert version.tags["prefect_tensorflow.export.dir"] == exported.path

    # The artifacts went through the server to its S3 bucket (the client holds no bucket of its own).
    from team_servers import client_for

    artifacts = client_for(s3.server.endpoint, s3.env).list_objects_v2(Bucket="mlflow-artifacts", Prefix="mlflow/")
    assert any(item["Key"].endswith("/saved_model.pb") for item in artifacts.get("Contents", []))

    # A remote export changed after it was verified is never registered.
    other = export(f"{remote_model_dir}/model.ckpt-200", s3.uri("exports/iris"))
    key = "exports/iris/2/variables/variables.data-00000-of-00001"
    data = bytearray(s3.read(key))
    data[len(data) // 2] ^= 0xFF  # one byte of one weight flipped
    s3.put(key, bytes(data))
    with pytest.raises(RegistryError, match="differ"):
        register_export(other, name, connection=connection(mlflow_team_server), checkpoint=checkpoint_ref(other.source))
    assert [v.version for v in client_of(mlflow_team_server).search_model_versions(f"name = '{name}'")] == ["1"]


def test_the_flows_with_s3_paths_register_on_the_team_server_and_the_gate_decides(
    prefect_api, mlflow_team_server, s3, remote_model_dir, tmp_path
):
    from prefect_tensorflow.flows.export_checkpoint import export_checkpoint
    from prefect_tensorflow.flows.retrain import retrain
    from prefect_tensorflow.tasks.blocks import MlflowConnection
    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.configs import TrainingConfig

    name = unique("team-flows")
    mlflow = MlflowConnection(tracking_uri=mlflow_team_server, experiment_name=unique("team"))
    paths = {"export_base": s3.uri("exports/iris"), "frozen_dir": s3.uri("frozen/iris")}

    # export-checkpoint: step 0 (barely trained) becomes the first version, and champion.
    first = export_checkpoint(model_dir=remote_model_dir, checkpoint="0", registered_model_name=name, mlflow=mlflow, **paths)
    assert first.export.path == s3.uri("exports/iris/1") and s3.exists("exports/iris/1/saved_model.pb")
    assert first.registered.version == 1 and first.registered.gate.promoted

    # retrain continues the s3 model dir, ships its latest checkpoint, and the gate scores both versions on the eval data.
    policy = CheckpointPolicy(save_checkpoints_steps=100, keep_checkpoint_max=None)
    summary = retrain(
        model_dir=remote_model_dir,
        training=TrainingConfig(steps=400, policy=policy),
        registered_model_name=name,
        mlflow=mlflow,
        **paths,
    )
    assert summary.training.start_step == 300 and summary.training.final_step == 400
    assert summary.checkpoint.path == f"{remote_model_dir}/model.ckpt-400"
    assert summary.export.path == s3.uri("exports/iris/2") and s3.exists("exports/iris/2/saved_model.pb")
    decision = summary.registered.gate
    assert summary.registered.version == 2 and decision.champion_version == 1
    # both scored on iris' eval split through their SavedModels: what the evaluator measured on the same 30 rows
    accuracy_0 = checkpoint_ref(f"{remote_model_dir}/model.ckpt-0").metrics["accuracy"]
    assert decision.champion_value == pytest.approx(accuracy_0, abs=1e-6)
    assert decision.challenger_value == pytest.approx(summary.checkpoint.metrics["accuracy"], abs=1e-6)
    assert decision.promoted == (decision.interval[0] > 0), decision.reason  # the rule: the interval clears 0
    client = client_of(mlflow_team_server)
    champion = client.get_model_version_by_alias(name, CHAMPION)
    assert champion.version == ("2" if decision.promoted else "1")

    # Shipping step 0 again is the existing version: nothing new is exported or registered.
    again = export_checkpoint(model_dir=remote_model_dir, checkpoint="0", registered_model_name=name, mlflow=mlflow, **paths)
    assert again.export.reused and again.registered.reused and again.registered.version == 1
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    assert client.get_model_version_by_alias(name, CHAMPION).version == champion.version  # a re-run moves nothing


REGISTER_SCRIPT = """
import json, sys
from prefect_tensorflow.tasks.export.saved_model import ExportResult
from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
from prefect_tensorflow.tasks.registry.model_versions import register_model_version
from prefect_tensorflow.tasks.checkpoints.selection import checkpoint_ref
server, name, experiment, *paths = sys.argv[1:]
connection = MlflowConfig(tracking_uri=server, experiment_name=experiment)
for path in paths:
    export = ExportResult.model_validate_json(open(path).read())
    version = register_model_version(export, name, connection, checkpoint=checkpoint_ref(export.source))
    print(json.dumps({"export": export.path, "version": version.version, "reused": version.reused}), flush=True)
"""


def test_registrations_from_three_processes_at_once_end_with_one_version_per_export(
    mlflow_team_server, s3, remote_model_dir, tmp_path, cli_env
):
    exports = [export(f"{remote_model_dir}/model.ckpt-{step}", s3.uri("exports/iris")) for step in (200, 300)]
    files = []
    for result in exports:
        files.append(tmp_path / f"export-{result.version}.json")
        files[-1].write_text(result.model_dump_json())
    name, experiment = unique("concurrent"), unique("team")
    env = {**cli_env, **s3.env, "PREFECT_TENSORFLOW_HOME": str(tmp_path / "home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    orders = [files, files[::-1], files]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", REGISTER_SCRIPT, mlflow_team_server, name, experiment, *map(str, order)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for order in orders
    ]
    outputs = [p.communicate(timeout=900) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    lines = [json.loads(line) for out, _ in outputs for line in out.splitlines()]
    assert len(lines) == 6
    by_export = {}
    for line in lines:
        by_export.setdefault(line["export"], set()).add(line["version"])
    assert all(len(versions) == 1 for versions in by_export.values()), by_export  # one version per export
    assert sum(not line["reused"] for line in lines) == 2
    versions = client_of(mlflow_team_server).search_model_versions(f"name = '{name}'")
    assert sorted(v.tags[FINGERPRINT_TAG] for v in versions) == sorted(e.fingerprint for e in exports)


# --- alias moves from several processes ---------------------------------------------------------


def test_concurrent_alias_moves_from_several_processes_never_fail(mlflow_team_server):
    """Six processes move fresh aliases at once, round after round (a barrier per round). First with
    the plain `set_registered_model_alias`, until the race shows (two first-time sets of one alias on
    PostgreSQL: one gets a unique violation), so that this test is known to be able to fail; then
    with `registry.set_alias`, which retries it, for 30 rounds: no call fails."""
    from team_servers import move_aliases

    client = client_of(mlflow_team_server)
    name = unique("aliases")
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment(unique("aliases")))
    for _ in range(3):
        client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)

    processes, raw_rounds, safe_rounds = 6, 100, 30
    context = multiprocessing.get_context("spawn")
    barrier, stop, results = context.Barrier(processes), context.Value("i", 0), context.Queue()
    workers = [
        context.Process(target=move_aliases, args=(mlflow_team_server, name, i, raw_rounds, safe_rounds, barrier, stop, results))
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        reports = [results.get(timeout=900) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()
    raw_calls = sum(r[1] for r in reports)
    raw_errors = [e for r in reports for e in r[2]]
    print(f"plain set_registered_model_alias: {len(raw_errors)} of {raw_calls} calls failed")
    assert raw_errors, f"the unique-violation race was not reproduced in {raw_calls} calls"
    assert all("UniqueViolation" in e or "registered_model_alias_pk" in e for e in raw_errors), raw_errors[:3]
    safe_errors = [e for r in reports for e in r[4]]
    assert safe_errors == [] and sum(r[3] for r in reports) == processes * safe_rounds
    for number in range(safe_rounds):
        assert client.get_model_version_by_alias(name, f"safe{number}").version in ("1", "2", "3")
