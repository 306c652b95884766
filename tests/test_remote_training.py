"""Training into an `s3://` or `gs://` model dir, against real servers (conftest's `bucket`: once on
moto's S3 server, once on a GCS emulator), killed for real.

`train_with_checkpoints` trains in a local staging directory and publishes
each checkpoint to the store (data shards, index, metrics log, then the
`checkpoint` state file, which commits it). These tests check that the store
ends with the files a local model dir has, that the keep policy deletes
remote checkpoints, and that a SIGKILL at any point, in the middle of
uploads included, followed by the same command, ends with the weights of an
uninterrupted run bit for bit (tests/test_crash.py is the local version).

To land a kill *between* two uploads every time, `DelayingProxy` (a TCP proxy
in front of the store's server, tests/team_servers.py) holds one kind of
request back for a few seconds: a real, slow network; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import numpy as np
import pytest
from helpers import cli_command, run_and_kill, train
from team_servers import DelayingProxy

from prefect_tensorflow.tasks.checkpoints.files import parse_state_lines, step_of
from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
from prefect_tensorflow.tasks.checkpoints.remote import fetch_checkpoint
from prefect_tensorflow.tasks.checkpoints.selection import list_checkpoints, select_latest_checkpoint

pytestmark = pytest.mark.slow

STEPS = 1000
CHECKPOINT_FILE = re.compile(r"^(.+-\d+)\.(index|meta|data-\d{5}-of-\d{5})$")


def train_cmd(model_dir: str, *extra: str) -> list[str]:
    return cli_command(
        "train",
        "--model-dir",
        model_dir,
        "--steps",
        str(STEPS),
        "--batch-size",
        "16",
        "--seed",
        "7",
        "--save-checkpoints-steps",
        "50",
        "--keep-checkpoint-max",
        "3",
        # Metrics evaluated in the training loop: no sidecar evaluator process to start (and import
        # TensorFlow) on each of the eight runs; the weights do not depend on where evaluation runs.
        "--evaluation",
        "in_loop",
        *extra,
    )


def checkpoint_files(names) -> set[str]:
    return {n for n in names if CHECKPOINT_FILE.match(n)}


def committed_step(bucket, prefix: str):
    """The step the store's state file names (None without one)."""
    try:
        data = bucket.read(f"{prefix}/checkpoint")
    except Exception:  # noqa: BLE001 - no state file yet
        return None
    return step_of(parse_state_lines(data.splitlines(keepends=True), "checkpoint"))


def weights(prefix: str) -> dict[str, np.ndarray]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    return {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if name.endswith("VARIABLE_VALUE") and not name.startswith("save_counter")
    }


def assert_same(actual, expected) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def test_training_to_a_store_writes_what_a_local_run_writes_and_the_keep_policy_deletes_remote_checkpoints(bucket, tmp_path):
    policy = CheckpointPolicy(save_checkpoints_steps=50, keep_checkpoint_max=3)
    remote = train(bucket.uri("models/iris"), steps=300, policy=policy, seed=3)
    local = train(tmp_path / "local", steps=300, policy=policy, seed=3)
    assert remote.model_dir == bucket.uri("models/iris") and remote.last_checkpoint == bucket.uri("models/iris/model.ckpt-300")
    assert (remote.start_step, remote.final_step, remote.checkpoints_saved) == (0, 300, local.checkpoints_saved)

    stored = bucket.objects("models/iris")
    local_files = {str(p.relative_to(tmp_path / "local")) for p in (tmp_path / "local").rglob("*") if p.is_file()}
    assert (
        checkpoint_files(stored)
        == checkpoint_files(local_files)
        == {f"model.ckpt-{s}.{suffix}" for s in (200, 250, 300) for suffix in ("index", "data-00000-of-00001")}
    )
    assert {"checkpoint", "checkpoint_metrics.jsonl", "graph.pbtxt"} <= set(stored)
    events = lambda names: sorted(re.sub(r"tfevents\..*", "tfevents", n) for n in names if "tfevents" in n)  # noqa: E731
    assert events(stored) == events(local_files) and events(stored)  # train and eval event files
    state = bucket.read("models/iris/checkpoint").decode()
    assert 'model_checkpoint_path: "model.ckpt-300"' in state
    assert re.findall(r'all_model_checkpoint_paths: "(.*)"', state) == ["model.ckpt-200", "model.ckpt-250", "model.ckpt-300"]
    # The metrics log: a line for the newest checkpoint with what a local run records (the sidecar
    # evaluator skips checkpoints the keep policy deleted before it got to them, so older lines vary).
    metrics = {m["step"]: m for m in map(json.loads, bucket.read("models/iris/checkpoint_metrics.jsonl").decode().splitlines())}
    local_metrics = {
        m["step"]: m for m in map(json.loads, (tmp_path / "local" / "checkpoint_metrics.jsonl").read_text().splitlines())
    }
    assert 300 in metrics and metrics[300]["metrics"].keys() == local_metrics[300]["metrics"].keys() >= {"accuracy", "loss"}
    assert set(metrics) <= {0, 50, 100, 150, 200, 250, 300}
    ref = select_latest_checkpoint(bucket.uri("models/iris"), verify_checksums=True)
    assert ref.step == 300 and ref.metrics.keys() == local.final_metrics.keys()

    more = train(bucket.uri("models/iris"), steps=450, policy=policy, seed=3)
    assert (more.start_step, more.final_step) == (300, 450)  # resumed from the store
    assert {step_of(n[: -len(".index")]) for n in bucket.keys("models/iris") if n.endswith(".index")} == {350, 400, 450}
    assert [r.step for r in list_checkpoints(bucket.uri("models/iris"))] == [450, 400, 350]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, np.ndarray]:
    """Weights of an uninterrupted run of the same command into a local model dir."""
    model_dir = tmp_path_factory.mktemp("reference") / "m"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(train_cmd(str(model_dir)), env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    ref = select_latest_checkpoint(str(model_dir), verify_checksums=True)
    assert ref.step == STEPS
    files = {p.name for p in model_dir.iterdir()}
    return {"weights": weights(ref.path), "checkpoint_files": checkpoint_files(files)}


def test_sigkill_at_many_points_of_a_remote_training_then_rerun_matches_uninterrupted(bucket, tmp_path, cli_env, reference):
    prefix = "models/iris"
    model_dir = bucket.uri(prefix)
    cmd = train_cmd(model_dir, "--json")

    def stored() -> dict[str, int]:
        return bucket.objects(prefix)

    def shard_without_index() -> bool:
        names = stored()
        return any(n.endswith(".data-00000-of-00001") and n.replace(".data-00000-of-00001", ".index") not in names for n in names)

    def index_not_yet_committed() -> bool:
        committed = committed_step(bucket, prefix)
        steps = [step_of(n[: -len(".index")]) for n in stored() if n.endswith(".index")]
        return any(s > (-1 if committed is None else committed) for s in steps)

    with DelayingProxy(bucket.server.port) as proxy:
        env = {**cli_env, **bucket.env_via(proxy.endpoint), "PREFECT_TENSORFLOW_HOME": str(tmp_path / "home")}
        start = time.monotonic()
        base = {"committed": -1}
        held = lambda: proxy.held > 0  # noqa: E731 - the held request is on its way: the store is between two uploads
        progress = lambda steps: (committed_step(bucket, prefix) or -1) >= base["committed"] + steps  # noqa: E731
        kill_points = [
            ("during start-up, before anything is written", None, lambda: time.monotonic() - start > 1.0),
            (
                "a data shard stored, its index not yet",
                bucket.request_pattern("put", rf"{prefix}/model\.ckpt-\d+\.index"),
                lambda: held() and shard_without_index(),
            ),
            (
                "an index stored, the state file not naming it yet",
                bucket.request_pattern("put", rf"{prefix}/checkpoint"),
                lambda: held() and index_not_yet_committed(),
            ),
            ("mid-training", None, lambda: progress(200)),
            ("a checkpoint committed, the keep policy's deletion not sent yet", bucket.request_pattern("delete"), held),
            (
                "while resuming: the kept checkpoints half downloaded",
                bucket.request_pattern("get", rf"{prefix}/model\.ckpt-\d+\.data"),
                held,
            ),
        ]
        killed = []
        for label, pattern, when in kill_points:
            proxy.hold(pattern, delay=2.0)
            proxy.held = 0
            base["committed"] = committed_step(bucket, prefix) or -1
            start = time.monotonic()
            if run_and_kill(cmd, env, when, timeout=300.0, poll=0.02):
                killed.append(label)
            print(
                f"{label}: killed={label in killed} after {time.monotonic() - start:.1f} s, committed={committed_step(bucket, prefix)}"
            )
            proxy.hold(None)
            if committed_step(bucket, prefix) is not None:  # whatever a kill leaves, the committed checkpoint reads back
                assert select_latest_checkpoint(model_dir).step == committed_step(bucket, prefix)
        assert len(killed) >= 5, f"too few kills landed: {killed}"

    committed = committed_step(bucket, prefix)
    result = subprocess.run(
        cmd,
        env={**cli_env, **bucket.env, "PREFECT_TENSORFLOW_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["start_step"] == committed  # resumed from the newest checkpoint committed on the store
    assert summary["final_step"] == STEPS and summary["last_checkpoint"] == f"{model_dir}/model.ckpt-{STEPS}"
    latest = select_latest_checkpoint(model_dir, verify_checksums=True)
    assert latest.step == STEPS
    assert_same(weights(fetch_checkpoint(latest.path)), reference["weights"])
    # Nothing the kills left behind stays: the store holds the checkpoints an uninterrupted run keeps.
    assert checkpoint_files(bucket.keys(prefix)) == reference["checkpoint_files"]
