"""Helpers of the tests that run against the team's servers (see conftest: `s3_server`, `s3`, `postgres`,
`mlflow_team_server`, `prefect_pg_server`).

- `Bucket`: one fresh bucket of the session's S3 server (moto, serialized), the
  environment a client needs to reach it, and a boto3 client for the checks.
- `Bucket.count_requests`: how many requests of each kind ("list", "get",
  ...) the library's S3 client sends during a block, counted by a botocore
  event hook on that very client (nothing is replaced);
  `gcs_emulator.GcsBucket` counts the same kinds for Cloud Storage.
- `DelayingProxy`: a TCP proxy in front of the S3 server that holds back the
  requests whose request line matches a pattern for a while: a slow network,
  real bytes, real requests. It widens the window between two uploads (a data
  shard stored, its index not yet) so that a SIGKILL lands inside it every
  time; a stock server offers no way to pause between two requests.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

_counter = itertools.count(1)


def client_for(endpoint: str, env: dict[str, str]) -> Any:
    import boto3

    return boto3.session.Session(
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    ).client("s3", endpoint_url=endpoint)


class Bucket:
    """A new bucket on the S3 server: `uri(path)`, `keys(prefix)`, `read(key)`, `put(key, data)`, `env`.

    `gcs_emulator.GcsBucket` has the same helpers for Cloud Storage (conftest's `bucket` is either).
    """

    scheme = "s3"

    def __init__(self, server: Any, name: Optional[str] = None):
        self.server = server
        self.name = name or f"t{next(_counter)}-{uuid.uuid4().hex[:8]}"
        self.env = {**server.env, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        self.client = client_for(server.endpoint, self.env)
        self.client.create_bucket(Bucket=self.name)

    def uri(self, path: str = "") -> str:
        return f"s3://{self.name}/{path.strip('/')}".rstrip("/")

    def env_via(self, endpoint: str) -> dict[str, str]:
        """`env` with the store reached at `endpoint` (a proxy in front of the server)."""
        return {**self.env, "AWS_ENDPOINT_URL_S3": endpoint}

    def request_pattern(self, operation: str, key: str = "") -> bytes:
        """A regex (bytes) for `DelayingProxy.hold` matching the request line of `operation` on `key`.

        `key` is a regex of the object's whole key ("" for any); "delete" is a batch delete (any keys).
        """
        bucket = re.escape(self.name).encode()
        if operation == "put":
            return rb"PUT /%s/%s%s" % (bucket, key.encode(), b" " if key else b"")
        if operation == "get":
            return rb"GET /%s/%s" % (bucket, key.encode())
        if operation == "delete":
            return rb"POST /%s\?delete" % bucket
        raise ValueError(operation)

    @contextmanager
    def count_requests(self) -> Iterator[Counter]:
        """Count the requests the library's own S3 client sends during the block, by kind.

        Kinds: "list", "get", "head", "put", "delete" (other operations by their S3 name),
        counted by a botocore event hook on that very client (nothing is replaced).
        """
        from prefect_tensorflow.tasks.storage.s3 import default_client

        client = default_client()
        counts: Counter = Counter()

        def hook(model: Any, **_: Any) -> None:
            counts[_S3_KINDS.get(model.name, model.name)] += 1

        client.meta.events.register("before-call.s3", hook)
        try:
            yield counts
        finally:
            client.meta.events.unregister("before-call.s3", hook)

    def objects(self, prefix: str = "") -> dict[str, int]:
        """key -> size of every object under `prefix` (keys relative to it)."""
        start = prefix.strip("/") + "/" if prefix.strip("/") else ""
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=start):
            for item in page.get("Contents", []):
                found[item["Key"][len(start) :]] = int(item["Size"])
        return found

    def keys(self, prefix: str = "") -> set[str]:
        return set(self.objects(prefix))

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key.strip("/"))["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.name, Key=key.strip("/"))
            return True
        except Exception:  # noqa: BLE001 - 404
            return False

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key.strip("/"), Body=data)

    def put_many(self, objects: dict[str, bytes]) -> None:
        """Many objects at once (8 threads)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda item: self.put(*item), objects.items()))

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=key.strip("/"))

    def upload_dir(self, local: str, prefix: str) -> None:
        for root, _, names in os.walk(local):
            for name in names:
                path = os.path.join(root, name)
                relative = os.path.relpath(path, local).replace(os.sep, "/")
                self.client.upload_file(path, self.name, f"{prefix.strip('/')}/{relative}")

    def download_dir(self, prefix: str, local: str) -> None:
        for key in self.objects(prefix):
            target = os.path.join(local, key)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            self.client.download_file(self.name, f"{prefix.strip('/')}/{key}", target)


_S3_KINDS = {
    "ListObjectsV2": "list",
    "GetObject": "get",
    "HeadObject": "head",
    "PutObject": "put",
    "DeleteObject": "delete",
    "DeleteObjects": "delete",
}


def new_bucket(server: Any, name: Optional[str] = None) -> Any:
    """A new bucket on `server`: a `Bucket` on the S3 server, a `gcs_emulator.GcsBucket` on the GCS emulator."""
    from gcs_emulator import GcsBucket, GcsServer

    return GcsBucket(server, name) if isinstance(server, GcsServer) else Bucket(server, name)


class DelayingProxy:
    """A TCP proxy on 127.0.0.1 to `upstream_port` that holds back requests matching `pattern` by `delay` s.

    The pattern is a regex (bytes) searched in each chunk the client sends,
    e.g. rb"PUT /bucket/models/m/model\\.ckpt-\\d+\\.index" (a request line;
    boto3 sends the request line and headers in one write). `pattern` and
    `delay` may be changed while it runs; `held` counts the requests held.
    """

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.pattern: Optional[re.Pattern[bytes]] = None
        self.delay = 0.0
        self.held = 0
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="delaying-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hold(self, pattern: Optional[bytes], delay: float = 0.0) -> None:
        self.pattern = re.compile(pattern) if pattern else None
        self.delay = delay

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, outgoing: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                pattern = self.pattern
                if outgoing and pattern is not None and pattern.search(data):
                    self.held += 1
                    time.sleep(self.delay)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def __enter__(self) -> DelayingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._server.close()
        self._thread.join(timeout=5)


def move_aliases(server, name, index, raw_rounds, safe_rounds, barrier, stop, results) -> None:
    """One process of tests/test_team_mlflow.py's alias race. Each round: wait for the others at
    `barrier`, then point a fresh alias at a version. First with the plain client call, until a
    call fails (every process then stops at the next round) or `raw_rounds` are done; then with
    `registry.set_alias` for `safe_rounds`. Reports (index, raw calls, raw errors, safe calls, safe
    errors) on `results`. Here, not in the test module, so that the spawned processes import only MLflow."""
    from mlflow import MlflowClient

    from prefect_tensorflow.tasks.registry.model_versions import set_alias

    client = MlflowClient(server, server)
    version = index % 3 + 1
    counts = {"raw": [0, []], "safe": [0, []]}
    for number in range(raw_rounds):
        barrier.wait(timeout=300)
        if stop.value:
            break
        counts["raw"][0] += 1
        try:
            client.set_registered_model_alias(name, f"raw{number}", str(version))
        except Exception as err:  # noqa: BLE001 - counted and reported by the test
            counts["raw"][1].append(" ".join(str(err).split())[:400])
            stop.value = 1  # the race was seen
    for number in range(safe_rounds):
        barrier.wait(timeout=300)
        counts["safe"][0] += 1
        try:
            set_alias(client, name, f"safe{number}", version)
        except Exception as err:  # noqa: BLE001 - counted and reported by the test
            counts["safe"][1].append(" ".join(str(err).split())[:400])
    results.put((index, *counts["raw"], *counts["safe"]))
