"""Model dirs, export bases and frozen graphs on `s3://bucket/prefix` and `gs://bucket/prefix`, against real servers.

Every test that takes `bucket` runs twice (conftest): on moto's S3 app in a
process of its own (`S3Server`, requests serialized so that conditional
writes are atomic, as on AWS), which the library talks to with boto3 over
HTTP as it would to AWS; and on fake-gcs-server (tests/gcs_emulator.py),
which it talks to with google-cloud-storage as it would to Cloud Storage.
Nothing is mocked. The only fault injector is `DelayingProxy`
(tests/team_servers.py), a TCP proxy that holds an upload back for a moment
so that a reader is sure to look while an export is half uploaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import export, freeze
from team_servers import DelayingProxy

from prefect_tensorflow.tasks.checkpoints.selection import list_checkpoints, select_best_checkpoint, select_latest_checkpoint
from prefect_tensorflow.tasks.errors import NoValidCheckpointError, StorageError
from prefect_tensorflow.tasks.export.export_base import SERVED_FILE, open_export_base, saved_model_digest
from prefect_tensorflow.tasks.storage.backend import PreconditionFailedError
from prefect_tensorflow.tasks.storage.locations import parse_location
from prefect_tensorflow.tasks.storage.s3 import lease
from prefect_tensorflow.tasks.storage.stores import object_store

BIN = os.path.dirname(sys.executable)
MANY = 10_000


def cli(args, env, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([f"{BIN}/prefect-tensorflow", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def subprocess_env(bucket, tmp_path: Path, cli_env: dict, endpoint: str | None = None) -> dict:
    """The environment of a CLI subprocess using `bucket`'s store (at `endpoint`, a proxy, if given)."""
    return {
        **cli_env,
        **(bucket.env_via(endpoint) if endpoint else bucket.env),
        "PREFECT_TENSORFLOW_HOME": str(tmp_path / "home"),
    }


def upload_model_dir(bucket, local: Path, prefix: str = "models/iris") -> str:
    bucket.upload_dir(str(local), prefix)
    return bucket.uri(prefix)


# --- URIs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_dir, message",
    [
        ("s3:/team/models/iris", "model_dir: expected s3://bucket/prefix"),
        ("hdfs://namenode/models/iris", "model_dir: unsupported scheme 'hdfs'"),
    ],
    ids=["s3-one-slash", "hdfs"],
)
def test_a_malformed_or_unsupported_uri_exits_2_naming_model_dir_and_writes_nothing(tmp_path, cli_env, model_dir, message):
    work = tmp_path / "work"
    work.mkdir()
    env = {**cli_env, "PREFECT_TENSORFLOW_HOME": str(tmp_path / "home")}
    result = cli(["train", "--model-dir", model_dir, "--steps", "10"], env, cwd=work, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr, result.stderr[-2000:]
    assert list(work.iterdir()) == []  # no ./s3: or ./hdfs: directory
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*.index"))


def test_gs_locations_get_the_gcs_store_and_nothing_loads_google_cloud_before_a_request():
    code = (
        "import sys\n"
        "from prefect_tensorflow.tasks.checkpoints import remote\n"
        "from prefect_tensorflow.tasks.export import export_base, frozen_graph, verification\n"
        "from prefect_tensorflow.tasks.storage.locations import parse_location\n"
        "from prefect_tensorflow.tasks.storage.stores import object_store\n"
        "store = object_store(parse_location('gs://team/models/iris', parameter='model_dir'))\n"
        "print(type(store).__name__, store.uri('checkpoint'), sorted(m for m in sys.modules if m.startswith('google.cloud')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["GcsStore", "gs://team/models/iris/checkpoint", "[]"], result.stdout + result.stderr


# --- selecting and listing on object storage -------------------------------------------------------


@pytest.mark.slow
def test_latest_on_a_store_agrees_with_the_local_dir_and_skips_damaged_checkpoints_saying_why(bucket, trained_dir, caplog):
    model_dir = upload_model_dir(bucket, trained_dir)
    local = select_latest_checkpoint(str(trained_dir))
    remote = select_latest_checkpoint(model_dir)
    assert remote.path == f"{model_dir}/model.ckpt-300" and remote.step == 300
    assert remote.metrics == local.metrics and remote.size_bytes == local.size_bytes
    assert [r.step for r in list_checkpoints(model_dir)] == [300, 200, 100, 0]
    assert all(r.valid for r in list_checkpoints(model_dir))

    # The newest shard shorter than its index says, the next one's shard gone.
    shard = "models/iris/model.ckpt-300.data-00000-of-00001"
    bucket.put(shard, bucket.read(shard)[:1000])
    bucket.delete("models/iris/model.ckpt-200.data-00000-of-00001")
    rows = {r.step: r for r in list_checkpoints(model_dir)}
    assert not rows[300].valid and "truncated" in rows[300].reason and "1000" in rows[300].reason
    assert not rows[200].valid and "missing" in rows[200].reason
    assert rows[100].valid and rows[0].valid
    caplog.clear()
    fallback = select_latest_checkpoint(model_dir)
    assert fallback.step == 100  # the state file names 300, which is invalid: the newest valid one
    assert "model.ckpt-300, which is invalid" in caplog.text and "skipping checkpoint" in caplog.text
    best = select_best_checkpoint(model_dir, "accuracy", "max")
    assert best.step == 100  # only valid checkpoints compete

    bucket.delete("models/iris/model.ckpt-100.index")  # uncommitted: not even listed
    assert [r.step for r in list_checkpoints(model_dir)] == [300, 200, 0]
    assert select_latest_checkpoint(model_dir).step == 0
    bucket.delete("models/iris/model.ckpt-0.data-00000-of-00001")
    with pytest.raises(NoValidCheckpointError, match="truncated"):
        select_latest_checkpoint(model_dir)


def _many_checkpoints(server, local: Path, name: str, count: int) -> str:
    """A model dir of `count` checkpoints in a bucket of its own: every index a copy of a real one's,
    a data shard for the newest only, a state file naming the newest (and the 5 before it)."""
    from team_servers import new_bucket

    from prefect_tensorflow.tasks.checkpoints.files import state_file_text

    bucket = new_bucket(server, name=name)
    index = (local / "model.ckpt-300.index").read_bytes()
    steps = [i * 100 for i in range(count)]
    bucket.put_many({f"m/model.ckpt-{s}.index": index for s in steps})
    newest = f"model.ckpt-{steps[-1]}"
    bucket.put(f"m/{newest}.data-00000-of-00001", (local / "model.ckpt-300.data-00000-of-00001").read_bytes())
    line = json.loads((local / "checkpoint_metrics.jsonl").read_text().splitlines()[-1])
    bucket.put("m/checkpoint_metrics.jsonl", (json.dumps({**line, "step": steps[-1], "checkpoint": newest}) + "\n").encode())
    bucket.put("m/checkpoint", state_file_text(newest, [f"model.ckpt-{s}" for s in steps[-6:]]).encode())
    return bucket.uri("m")


@pytest.fixture(scope="session")
def many_remote_checkpoints(trained_dir):
    """For a store's server: (model dir of 10,000 checkpoints, model dir of 1), built once a session (~1 min)."""
    built: dict[str, tuple[str, str]] = {}

    def on(server) -> tuple[str, str]:
        if server.endpoint not in built:
            built[server.endpoint] = (
                _many_checkpoints(server, trained_dir, "many-checkpoints", MANY),
                _many_checkpoints(server, trained_dir, "one-checkpoint", 1),
            )
        return built[server.endpoint]

    return on


@pytest.mark.slow
def test_latest_of_10000_remote_checkpoints_sends_no_listing_and_as_many_requests_as_for_one(bucket, many_remote_checkpoints):
    many, one = many_remote_checkpoints(bucket.server)
    select_latest_checkpoint(one)  # the client made, untimed
    with bucket.count_requests() as on_one:
        ref_one = select_latest_checkpoint(one)
    with bucket.count_requests() as on_many:
        ref_many = select_latest_checkpoint(many)
    assert ref_one.step == 0 and ref_many.step == (MANY - 1) * 100
    assert ref_many.metrics and ref_many.metrics == ref_one.metrics
    assert "list" not in on_many, on_many
    assert sum(on_many.values()) <= sum(on_one.values()), (on_many, on_one)
    assert on_many == on_one == {"get": 3, "head": 2}, on_many  # state file, index, metrics log; the shard, no .meta

    # The counter does see listings: without a state file the same selection lists the directory.
    store = object_store(parse_location(many, parameter="model_dir"))
    state = store.read_bytes("checkpoint")
    store.delete(["checkpoint"])
    try:
        with bucket.count_requests() as fallback:
            assert select_latest_checkpoint(many).step == (MANY - 1) * 100
        assert fallback["list"] >= MANY // 1000, fallback  # pages of 1,000
    finally:
        store.put_bytes("checkpoint", state)


@pytest.mark.slow
def test_cli_checkpoints_list_latest_best_on_an_object_store(bucket, trained_dir, tmp_path, cli_env):
    model_dir = upload_model_dir(bucket, trained_dir)
    env = subprocess_env(bucket, tmp_path, cli_env)
    listed = cli(["checkpoints", "list", model_dir, "--json"], env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    rows = json.loads(listed.stdout)
    assert [(r["step"], r["valid"]) for r in rows] == [(300, True), (200, True), (100, True), (0, True)]
    assert rows[0]["path"] == f"{model_dir}/model.ckpt-300" and rows[0]["metrics"]["accuracy"] > 0.5
    latest = cli(["checkpoints", "latest", model_dir, "--json"], env)
    assert latest.returncode == 0, latest.stderr[-2000:]
    assert json.loads(latest.stdout)["path"] == f"{model_dir}/model.ckpt-300"
    best = cli(["checkpoints", "best", model_dir, "--metric", "loss", "--mode", "min", "--json"], env)
    assert best.returncode == 0, best.stderr[-2000:]
    local_best = select_best_checkpoint(str(trained_dir), "loss", "min")
    assert json.loads(best.stdout)["step"] == local_best.step
    table = cli(["checkpoints", "list", model_dir], env)
    assert table.returncode == 0 and "yes" in table.stdout and "300" in table.stdout
    missing = cli(["checkpoints", "latest", bucket.uri("models/nowhere")], env)
    assert missing.returncode == 2 and "holds nothing" in missing.stderr


# --- exporting to object storage -------------------------------------------------------------------


def _version_objects(bucket, prefix: str) -> dict[str, int]:
    return bucket.objects(prefix)


@pytest.mark.slow
def test_a_poller_never_sees_saved_model_pb_before_the_rest_of_the_version(bucket, trained_dir, tmp_path, cli_env):
    model_dir = upload_model_dir(bucket, trained_dir)
    with DelayingProxy(bucket.server.port) as proxy:
        # saved_model.pb held back 2 s: the poller is sure to look while the rest is there without it.
        proxy.hold(bucket.request_pattern("put", r"exports/iris/1/saved_model\.pb"), delay=2.0)
        env = subprocess_env(bucket, tmp_path, cli_env, endpoint=proxy.endpoint)
        process = subprocess.Popen(
            [
                f"{BIN}/prefect-tensorflow",
                "export",
                f"{model_dir}/model.ckpt-300",
                "--export-base",
                bucket.uri("exports/iris"),
                "--json",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        snapshots = []
        try:
            while process.poll() is None:
                snapshots.append(_version_objects(bucket, "exports/iris/1"))
                time.sleep(0.005)
            out, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
        assert proxy.held >= 1
    assert process.returncode == 0, err[-3000:]
    final = _version_objects(bucket, "exports/iris/1")
    assert SERVED_FILE in final and "variables/variables.index" in final and "assets.extra/prefect_tensorflow.json" in final
    with_pb = [snap for snap in snapshots if SERVED_FILE in snap]
    partial = [snap for snap in snapshots if snap and SERVED_FILE not in snap]
    assert partial, "the poller never saw the upload in progress"
    assert all(snap == final for snap in with_pb), [sorted(set(final) - set(s)) for s in with_pb if s != final][:3]
    result = json.loads(out)
    assert result["path"] == bucket.uri("exports/iris/1") and not result["reused"]
    with open_export_base(bucket.uri("exports/iris")).local_copy(result["path"]) as local:
        assert saved_model_digest(local) == result["digest"]


@pytest.mark.slow
def test_export_to_an_object_store_is_idempotent_and_verifiable(bucket, trained_dir, tmp_path):
    model_dir = upload_model_dir(bucket, trained_dir)
    base = bucket.uri("exports/iris")
    first = export(f"{model_dir}/model.ckpt-300", base)
    assert (first.version, first.reused, first.path) == (1, False, f"{base}/1")
    before = _version_objects(bucket, "exports/iris")
    again = export(f"{model_dir}/model.ckpt-300", base)
    assert again.reused and again.version == 1 and again.digest == first.digest
    assert _version_objects(bucket, "exports/iris") == before  # nothing uploaded, no lock object left
    other = export(f"{model_dir}/model.ckpt-100", base)
    assert (other.version, other.reused) == (2, False)
    assert sorted(open_export_base(base).versions()) == [1, 2]

    from prefect_tensorflow.tasks.errors import ParityError
    from prefect_tensorflow.tasks.export.verification import verify_artifacts

    report = verify_artifacts(f"{model_dir}/model.ckpt-300", saved_model=first.path)
    assert report.ok and report.pairs["checkpoint vs saved_model"].max_abs_diff <= 1e-5
    with pytest.raises(ParityError):  # the stored SavedModel is what is compared: step 100's differs
        verify_artifacts(f"{model_dir}/model.ckpt-300", saved_model=other.path)


@pytest.mark.slow
def test_two_processes_exporting_one_checkpoint_to_one_remote_base_make_one_version(bucket, trained_dir, tmp_path, cli_env):
    model_dir = upload_model_dir(bucket, trained_dir)
    env = subprocess_env(bucket, tmp_path, cli_env)
    command = [
        f"{BIN}/prefect-tensorflow",
        "export",
        f"{model_dir}/model.ckpt-200",
        "--export-base",
        bucket.uri("exports/iris"),
        "--json",
    ]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    results = [json.loads(out) for out, _ in outputs]
    assert sorted(r["reused"] for r in results) == [False, True]
    assert {r["path"] for r in results} == {bucket.uri("exports/iris/1")}
    keys = bucket.keys("exports/iris")
    assert {k.split("/")[0] for k in keys} == {"1"}, sorted(keys)  # one version, the lease object removed


@pytest.mark.slow
def test_a_version_left_without_saved_model_pb_is_never_listed_reused_or_kept(bucket, trained_dir):
    model_dir = upload_model_dir(bucket, trained_dir)
    base = bucket.uri("exports/iris")
    first = export(f"{model_dir}/model.ckpt-300", base)
    # An upload cut short just before its last file: everything (its fingerprint too) but saved_model.pb.
    bucket.delete("exports/iris/1/saved_model.pb")
    bucket.put("exports/iris/2/variables/variables.index", b"half an upload")
    assert open_export_base(base).versions() == {}
    again = export(f"{model_dir}/model.ckpt-300", base)
    assert not again.reused  # not taken for the export it would have been
    assert again.version == 1 and again.fingerprint == first.fingerprint
    keys = bucket.keys("exports/iris")
    assert not any(k.startswith("2/") for k in keys)
    assert "1/saved_model.pb" in keys
    with open_export_base(base).local_copy(again.path) as local:
        assert saved_model_digest(local) == again.digest


@pytest.mark.slow
def test_lease_excludes_a_second_holder_and_is_taken_over_when_its_holder_stopped_renewing(bucket):
    store = object_store(parse_location(bucket.uri("exports/iris"), parameter="export_base"))
    with lease(store, "lock", ttl=30):
        with pytest.raises(StorageError, match="held by"):
            with lease(store, "lock", wait=1.0):
                pass
    assert not bucket.exists("exports/iris/lock")  # released
    store.put_bytes("lock", json.dumps({"owner": "gone:1:dead", "expires": time.time() - 1}).encode())
    started = time.monotonic()
    with lease(store, "lock", wait=10):
        assert json.loads(bucket.read("exports/iris/lock"))["owner"] != "gone:1:dead"
    assert time.monotonic() - started < 5

    # Mutual exclusion under contention: read-modify-write of one object by 4 threads, 3 times each.
    store.put_bytes("counter", b"0")

    def bump() -> None:
        for _ in range(3):
            with lease(store, "lock", ttl=30, wait=120):
                value = int(store.read_bytes("counter"))
                time.sleep(0.01)
                store.put_bytes("counter", str(value + 1).encode())

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert store.read_bytes("counter") == b"12"


def test_conditional_writes_refuse_another_version_and_name_the_uri(bucket):
    store = object_store(parse_location(bucket.uri("locks"), parameter="export_base"))
    assert type(store).__name__ == {"s3": "ObjectStore", "gs": "GcsStore"}[bucket.scheme]
    first = store.put_bytes("lock", b"one", create_only=True)
    with pytest.raises(FileExistsError, match=f"{bucket.scheme}://"):
        store.put_bytes("lock", b"two", create_only=True)
    data, info = store.read_with_info("lock")
    assert (data, info.etag, info.size) == (b"one", first, 3) and info.modified > 1e9
    head = store.head("lock")
    assert head is not None and (head.size, head.etag) == (3, first) and abs(head.modified - info.modified) < 5
    assert store.head("nothing") is None
    second = store.put_bytes("lock", b"three", if_match=first)  # replaces the version it names...
    assert second != first and store.read_bytes("lock") == b"three"
    with pytest.raises(PreconditionFailedError, match=store.uri("lock")):
        store.put_bytes("lock", b"four", if_match=first)  # ...and only that one
    with pytest.raises(PreconditionFailedError):
        store.put_bytes("gone", b"five", if_match=second)  # an object that is not there has no version
    assert store.read_bytes("lock") == b"three" and not bucket.exists("locks/gone")
    with pytest.raises(FileNotFoundError, match=store.uri("nothing")):
        store.read_bytes("nothing")
    store.put_bytes("dir/a", b"a")
    assert set(store.listing(delimiter=True)) == {"lock", "dir/"} and set(store.listing("dir")) == {"dir/a"}
    assert store.delete_if_match("lock", second) and not bucket.exists("locks/lock")


# --- freezing to object storage --------------------------------------------------------------------


@pytest.mark.slow
def test_freeze_to_an_object_store_uploads_the_verified_graph(bucket, trained_dir, tmp_path):
    model_dir = upload_model_dir(bucket, trained_dir)
    output = bucket.uri("frozen/iris/model.ckpt-300.pb")
    remote = freeze(f"{model_dir}/model.ckpt-300", output, as_text=True)
    assert remote.path == output and remote.parity.ok
    data = bucket.read("frozen/iris/model.ckpt-300.pb")
    assert "sha256:" + hashlib.sha256(data).hexdigest() == remote.digest and len(data) == remote.size_bytes
    assert remote.pbtxt_path == bucket.uri("frozen/iris/model.ckpt-300.pbtxt") and bucket.exists(
        "frozen/iris/model.ckpt-300.pbtxt"
    )
    from prefect_tensorflow.tasks.export.verification import verify_artifacts

    downloaded = tmp_path / "downloaded.pb"
    downloaded.write_bytes(data)
    report = verify_artifacts(str(trained_dir / "model.ckpt-300"), frozen_graph=str(downloaded))
    assert report.ok  # the uploaded graph computes what the checkpoint computes


@pytest.mark.slow
def test_verify_reads_a_frozen_graph_on_an_object_store(bucket, trained_dir):
    from prefect_tensorflow.tasks.export.verification import verify_artifacts

    model_dir = upload_model_dir(bucket, trained_dir)
    output = bucket.uri("frozen/iris/model.ckpt-300.pb")
    freeze(f"{model_dir}/model.ckpt-300", output)
    assert verify_artifacts(f"{model_dir}/model.ckpt-300", frozen_graph=output).ok


@pytest.mark.slow
def test_a_frozen_graph_on_an_object_store_is_logged_to_mlflow(bucket, trained_dir, mlflow_store, tmp_path):
    from prefect_tensorflow.tasks.registry.tracking import log_frozen_graph_to_mlflow

    model_dir = upload_model_dir(bucket, trained_dir)
    frozen = freeze(f"{model_dir}/model.ckpt-300", bucket.uri("frozen/iris/model.ckpt-300.pb"))
    run_id = log_frozen_graph_to_mlflow(mlflow_store, None, frozen, run_name=f"frozen-on-{bucket.scheme}")
    local = mlflow_store.client().download_artifacts(run_id, "frozen_graph/model.ckpt-300.pb", str(tmp_path))
    assert "sha256:" + hashlib.sha256(Path(local).read_bytes()).hexdigest() == frozen.digest


def test_the_s3_test_server_answers_while_a_client_is_stopped_mid_upload(s3):
    """The session's S3 server takes one request at a time; a client stopped half-way through sending a body
    (a SIGSTOPped trainer in `test_model_dir_lease`) must not hold that turn, or every other client times out."""
    import socket

    import boto3
    import botocore.config

    endpoint = s3.env["AWS_ENDPOINT_URL_S3"]
    stalled = socket.create_connection(("127.0.0.1", int(endpoint.rsplit(":", 1)[1])))
    try:
        stalled.sendall(f"PUT /{s3.name}/stalled HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n0123".encode())
        time.sleep(0.5)
        client = boto3.session.Session(
            aws_access_key_id=s3.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=s3.env["AWS_SECRET_ACCESS_KEY"],
            region_name=s3.env["AWS_DEFAULT_REGION"],
        ).client(  # no retries, a short read timeout: a stalled server fails it
            "s3", endpoint_url=endpoint, config=botocore.config.Config(read_timeout=10, retries={"max_attempts": 1})
        )
        client.put_object(Bucket=s3.name, Key="other", Body=b"1")
        assert [o["Key"] for o in client.list_objects_v2(Bucket=s3.name)["Contents"]] == ["other"]
    finally:
        stalled.close()
