"""Checkpoints on an S3-compatible store: publishing one, and selecting the latest of 10,000 vs 1.

Against a real S3 server on 127.0.0.1: moto's S3 app in a process of its own,
requests serialized (`S3Server`, as `make team-stack` and the tests run it),
reached with boto3 over HTTP. Every case runs once per round, rounds in a
seeded random order, medians taken.

1. Publishing a checkpoint. The files are a real one's: `train_with_checkpoints(steps=1,
   save_at_start)` commits `model.ckpt-0` (index, one data shard) with its
   metrics line and `checkpoint` state file. Each round, to a fresh prefix:
   - "publish": `RemoteModelDir.publish_committed()`, what training's background
     publisher does per checkpoint: the data shard, the index and the metrics log
     with `upload_file`, then the state file (the commit) with `put_object`.
   - "plain": the same four files, one `put_object` each (bytes read from disk
     inside the timed region), with the same client: the least any upload of
     these files can cost.
   The ratio is publish over plain.
2. `select_latest_checkpoint` on a model dir of 10,000 checkpoints vs one of 1.
   The 10,000: `.index` objects copied from the real checkpoint's, as
   `model.ckpt-<step>` for steps 0, 100, ..., 999,900; a data shard for the
   newest only; a metrics log with its line; a state file naming the newest
   (and the 5 before it). The 1: the same with one checkpoint. Each call's S3
   requests are counted by operation (a botocore event hook on the library's
   client); the fast path must send no listing and as many requests on both. A
   third case deletes the state file before each call (untimed) and restores it
   after: the fallback, which lists the directory.

How to read it: ratios near 1 mean publishing costs what the uploads cost,
and selection does not grow with the number of checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from .common import Scratch, fmt, interleaved, median, ratio_table, report, s3_requests, s3_server_environment

NAME = "remote_storage"
CHECKPOINTS = 10_000
STEP_GAP = 100
PUBLISH_ROUNDS = 30
SELECT_ROUNDS = 40
FALLBACK_ROUNDS = 5
BUCKET = "bench"


def _build_dir(client, prefix: str, index: bytes, shard: bytes, metrics_line: dict, count: int) -> str:
    from prefect_tensorflow.tasks.checkpoints.files import state_file_text

    steps = [i * STEP_GAP for i in range(count)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda s: client.put_object(Bucket=BUCKET, Key=f"{prefix}/model.ckpt-{s}.index", Body=index), steps))
    newest = f"model.ckpt-{steps[-1]}"
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/{newest}.data-00000-of-00001", Body=shard)
    line = json.dumps({**metrics_line, "step": steps[-1], "checkpoint": newest}) + "\n"
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/checkpoint_metrics.jsonl", Body=line.encode())
    state = state_file_text(newest, [f"model.ckpt-{s}" for s in steps[-6:]]).encode()
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/checkpoint", Body=state)
    return f"s3://{BUCKET}/{prefix}"


def run() -> dict:
    with Scratch(NAME) as scratch, s3_server_environment(scratch) as server:
        return _run(server, scratch)


def _run(server, scratch: Scratch) -> dict:
    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.checkpoints.remote import RemoteModelDir
    from prefect_tensorflow.tasks.checkpoints.selection import select_latest_checkpoint
    from prefect_tensorflow.tasks.configs import TrainingConfig
    from prefect_tensorflow.tasks.storage.s3 import default_client
    from prefect_tensorflow.tasks.training.loop import train_with_checkpoints

    client = default_client()
    client.create_bucket(Bucket=BUCKET)
    one = os.path.join(scratch.path, "one")
    policy = CheckpointPolicy(save_at_start=True, save_at_end=False)
    result = train_with_checkpoints(one, TrainingConfig(steps=1, policy=policy, evaluation="in_loop"))
    assert result.checkpoints_saved == 1, result
    files = ["model.ckpt-0.data-00000-of-00001", "model.ckpt-0.index", "checkpoint_metrics.jsonl", "checkpoint"]
    sizes = {name: os.path.getsize(os.path.join(one, name)) for name in files}

    # --- 1. publishing one checkpoint ---
    rounds = {"n": 0}

    def publish() -> float:
        rounds["n"] += 1
        mirror = RemoteModelDir(f"s3://{BUCKET}/publish/{rounds['n']}")
        local = mirror.pull()
        for name in files:
            shutil.copyfile(os.path.join(one, name), os.path.join(local, name))
        start = time.perf_counter()
        assert mirror.publish_committed()
        elapsed = time.perf_counter() - start
        mirror.close()
        return elapsed

    def plain() -> float:
        rounds["n"] += 1
        start = time.perf_counter()
        for name in files:
            with open(os.path.join(one, name), "rb") as handle:
                client.put_object(Bucket=BUCKET, Key=f"plain/{rounds['n']}/{name}", Body=handle.read())
        return time.perf_counter() - start

    publish(), plain()  # warm-up, untimed
    with s3_requests(client) as publish_requests:
        publish()
    publish_samples = interleaved({"publish": publish, "plain": plain}, PUBLISH_ROUNDS)

    # --- 2. select_latest on 10,000 remote checkpoints vs 1 ---
    with open(os.path.join(one, "model.ckpt-0.index"), "rb") as handle:
        index = handle.read()
    with open(os.path.join(one, "model.ckpt-0.data-00000-of-00001"), "rb") as handle:
        shard = handle.read()
    with open(os.path.join(one, "checkpoint_metrics.jsonl"), encoding="utf-8") as handle:
        metrics_line = json.loads(handle.readline())
    build_start = time.perf_counter()
    many = _build_dir(client, "many", index, shard, metrics_line, CHECKPOINTS)
    build_seconds = time.perf_counter() - build_start
    single = _build_dir(client, "one", index, shard, metrics_line, 1)
    state_key = "many/checkpoint"
    state = client.get_object(Bucket=BUCKET, Key=state_key)["Body"].read()

    requests: dict[str, Counter] = {}
    for key, uri in (("one", single), ("many", many)):
        select_latest_checkpoint(uri)
        with s3_requests(client) as counts:
            ref = select_latest_checkpoint(uri)
        requests[key] = counts
        expected = (CHECKPOINTS - 1) * STEP_GAP if key == "many" else 0
        assert ref.step == expected and ref.metrics, (key, ref)
    assert "ListObjectsV2" not in requests["many"] and requests["many"] == requests["one"], requests

    def call(uri):
        def go() -> float:
            start = time.perf_counter()
            select_latest_checkpoint(uri)
            return time.perf_counter() - start

        return go

    def fallback() -> float:
        client.delete_object(Bucket=BUCKET, Key=state_key)
        try:
            start = time.perf_counter()
            ref = select_latest_checkpoint(many)
            elapsed = time.perf_counter() - start
        finally:
            client.put_object(Bucket=BUCKET, Key=state_key, Body=state)
        assert ref.step == (CHECKPOINTS - 1) * STEP_GAP
        return elapsed

    with s3_requests(client) as fallback_requests:
        fallback()
    select_samples = interleaved({"one": call(single), "many": call(many)}, SELECT_ROUNDS, seed=1)
    select_samples["fallback"] = interleaved({"fallback": fallback}, FALLBACK_ROUNDS)["fallback"]

    med = {**{k: median(v) for k, v in publish_samples.items()}, **{k: median(v) for k, v in select_samples.items()}}
    publish_ratio = med["publish"] / med["plain"]
    select_ratio = med["many"] / med["one"]
    rows = [
        ["publish one checkpoint (RemoteModelDir)", med["publish"] * 1e3, sum(publish_requests.values()), publish_ratio],
        ["4 plain boto3 put_object, same files", med["plain"] * 1e3, len(files), 1.0],
        ["select_latest, 1 remote checkpoint", med["one"] * 1e3, sum(requests["one"].values()), 1.0],
        [f"select_latest, {CHECKPOINTS:,} remote checkpoints", med["many"] * 1e3, sum(requests["many"].values()), select_ratio],
        [
            f"select_latest, {CHECKPOINTS:,}, no state file (fallback)",
            med["fallback"] * 1e3,
            sum(fallback_requests.values()),
            med["fallback"] / med["one"],
        ],
    ]
    out = {
        "parameters": {
            "checkpoints": CHECKPOINTS,
            "publish_rounds": PUBLISH_ROUNDS,
            "select_rounds": SELECT_ROUNDS,
            "fallback_rounds": FALLBACK_ROUNDS,
            "file_sizes": sizes,
        },
        "setup": {
            "build_seconds": build_seconds,
            "publish_requests": dict(publish_requests),
            "select_requests": {k: dict(v) for k, v in requests.items()},
            "fallback_requests": dict(fallback_requests),
            "s3_server": "moto (serialized), its own process, 127.0.0.1",
        },
        "samples_seconds": {**publish_samples, **select_samples},
        "median_seconds": med,
        "ratios": {"publish_over_plain_puts": publish_ratio, "select_10000_over_1": select_ratio},
    }
    out["table"] = ratio_table(
        f"remote_storage: medians of {PUBLISH_ROUNDS} (publish) and {SELECT_ROUNDS} (select) interleaved rounds",
        ["case", "median ms", "requests", "ratio"],
        rows,
        notes=[
            "ratios: publish over the plain puts; select rows over select_latest on 1 checkpoint.",
            f"checkpoint files: {', '.join(f'{k} {v:,} B' for k, v in sizes.items())}.",
            f"publish sends {dict(publish_requests)}.",
            f"select_latest sends {dict(requests['many'])} on {CHECKPOINTS:,} and on 1 (no listing);",
            f"the fallback {dict(fallback_requests)} ({FALLBACK_ROUNDS} rounds).",
            f"{CHECKPOINTS:,} index objects uploaded in {fmt(build_seconds)} s (8 threads).",
        ],
    )
    return out


if __name__ == "__main__":
    report(NAME, run)
