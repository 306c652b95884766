"""The cost of lineage: the manifest and digest of a window of 10,000 partition files on S3 vs listing them.

Against moto's S3 server in a process of its own on 127.0.0.1 (`S3Server`, as
the tests and `make team-stack` run it), reached with boto3 over HTTP. The
prefix holds 1,000 daily partitions (`dt=YYYY-MM-DD/`) of 10 small CSV files
each and a `_SUCCESS` marker each: 10,000 data files, 11,000 objects.

- "manifest": `load_partitioned.manifest(window=<the 1,000 days>, prefix=...)`
  and its `.digest`: options checked, one listing through the storage layer,
  the partitions grouped, the window's files sorted, a `ManifestFile` per file,
  the SHA-256 over their names, sizes and etags.
- "listing": the same prefix listed with a plain boto3 `list_objects_v2`
  paginator on the same client, keys and etags collected: the least any
  listing of these objects costs.

Each case runs once per round, rounds in a seeded random order, medians taken.
The manifest's S3 requests are counted (a botocore hook): it must send only
the listing's pages.

How to read it: a ratio near 1 means lineage costs the listing and nothing more.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta

from .common import Scratch, fmt, interleaved, median, ratio_table, report, s3_requests, s3_server_environment

NAME = "data_manifest"
DAYS = 1_000
FILES_PER_DAY = 10
ROUNDS = 10
BUCKET = "bench"
PREFIX = "iris-daily"
START = date(2024, 1, 1)


def _fill(client) -> float:
    """Upload the partitions (8 threads); returns the seconds it took."""
    body = b"sepal_length,sepal_width,petal_length,petal_width,species,site\n5.1,3.5,1.4,0.2,setosa,north\n"
    keys = []
    for n in range(DAYS):
        day = START + timedelta(days=n)
        keys += [f"{PREFIX}/dt={day}/part-{i:05d}.csv" for i in range(FILES_PER_DAY)] + [f"{PREFIX}/dt={day}/_SUCCESS"]
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=BUCKET, Key=k, Body=b"" if k.endswith("_SUCCESS") else body), keys))
    return time.perf_counter() - start


def run() -> dict:
    with Scratch(NAME) as scratch, s3_server_environment(scratch):
        return _run()


def _run() -> dict:
    from prefect_tensorflow.tasks.data.partitioned import load_partitioned
    from prefect_tensorflow.tasks.storage.s3 import default_client

    client = default_client()  # the library's own client: the manifest's requests go through it
    client.create_bucket(Bucket=BUCKET)
    fill_seconds = _fill(client)
    window = {"start": START.isoformat(), "end": (START + timedelta(days=DAYS)).isoformat()}
    prefix = f"s3://{BUCKET}/{PREFIX}"

    def manifest() -> float:
        start = time.perf_counter()
        found = load_partitioned.manifest(window=window, prefix=prefix)
        digest = found.digest
        elapsed = time.perf_counter() - start
        assert len(found.files) == DAYS * FILES_PER_DAY and len(digest) == 64
        return elapsed

    def listing() -> float:
        start = time.perf_counter()
        found = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX + "/"):
            for item in page.get("Contents", []):
                found[item["Key"]] = (item["Size"], item["ETag"])
        elapsed = time.perf_counter() - start
        assert len(found) == DAYS * (FILES_PER_DAY + 1)
        return elapsed

    manifest(), listing()  # warm-up, untimed
    with s3_requests(client) as manifest_requests:
        manifest()
    with s3_requests(client) as listing_requests:
        listing()
    assert manifest_requests == listing_requests, (manifest_requests, listing_requests)
    samples = interleaved({"manifest": manifest, "listing": listing}, ROUNDS)
    med = {k: median(v) for k, v in samples.items()}
    ratio = med["manifest"] / med["listing"]
    files = DAYS * FILES_PER_DAY
    rows = [
        [f"manifest + digest of {files:,} files ({DAYS:,} days)", med["manifest"] * 1e3, sum(manifest_requests.values()), ratio],
        [
            f"boto3 list_objects_v2 of the {DAYS * (FILES_PER_DAY + 1):,} objects",
            med["listing"] * 1e3,
            sum(listing_requests.values()),
            1.0,
        ],
    ]
    out = {
        "parameters": {"days": DAYS, "files_per_day": FILES_PER_DAY, "rounds": ROUNDS},
        "setup": {
            "fill_seconds": fill_seconds,
            "manifest_requests": dict(manifest_requests),
            "listing_requests": dict(listing_requests),
            "s3_server": "moto (serialized), its own process, 127.0.0.1",
        },
        "samples_seconds": samples,
        "median_seconds": med,
        "ratios": {"manifest_over_listing": ratio},
    }
    out["table"] = ratio_table(
        f"data_manifest: medians of {ROUNDS} interleaved rounds",
        ["case", "median ms", "requests", "ratio"],
        rows,
        notes=[
            "ratio: over the plain listing.",
            f"both send {dict(listing_requests)} (1,000 keys a page).",
            f"{DAYS * (FILES_PER_DAY + 1):,} objects uploaded in {fmt(fill_seconds)} s (8 threads).",
        ],
    )
    return out


if __name__ == "__main__":
    report(NAME, run)
