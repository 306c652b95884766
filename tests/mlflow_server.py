"""A real `mlflow server` process for tests, and a real HTTP fault injector in front of it.

`MlflowServer` runs `mlflow server` on 127.0.0.1 with an SQLite backend and
`--serve-artifacts`, in its own session (process group) so that `stop()` can
kill the server and every worker it forked. `start()` after `stop()` brings it
back on the same port with the same database and artifact directory, as a
restarted production server would. Its output goes to a log file, never to a
pipe nobody reads; `log_tail()` is for failure messages.

A new server's SQLite database starts as a copy of one migrated database
(`migrated_database()`, made once per process): each `mlflow server` creating
its tables and running MLflow's migrations cost ~6 CPU-s of its start-up.
`start_all(servers)` starts several at once and waits for each (their
start-ups are imports, one core each).

`MlflowServer(root, auth=True)` is the same server behind MLflow's basic-auth
app (`mlflow server --app-name basic-auth`, `mlflow[auth]`): an admin user
(`admin_username`/`admin_password`), `default_permission = READ`, its own
SQLite user database, a random Flask secret key, and `admin()`, an auth client
that creates users and grants permissions with the admin's explicit
credentials (MLflow's own `get_app_client` reads them from the environment).
With `token_users`, the server also accepts `Authorization: Bearer <token>`
for those users (`mlflow_token_auth.py`; only the tokens' SHA-256 reach it).

`FaultyProxy` is a tiny reverse proxy (http.server + http.client) in a thread
that answers 503 to the first N requests (or to all of them) and forwards the
rest to the real server. It is a real HTTP fault injector, not a mock: MLflow's
client talks real HTTP to it and gets real 503 responses, which a stock
`mlflow server` cannot be made to produce on demand.
"""

from __future__ import annotations

import atexit
import hashlib
import http.client
import http.server
import os
import secrets
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Optional

from prefect_tensorflow.flows.servers import free_port, port_is_open
from prefect_tensorflow.tasks.child_processes import log_tail, stop_process_group

MLFLOW = Path(sys.executable).with_name("mlflow")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy


@lru_cache(maxsize=1)
def migrated_database() -> Path:
    """An empty MLflow SQLite database with every table and migration, made once per process (read-only:
    copy it)."""
    from mlflow import MlflowClient

    directory = tempfile.mkdtemp(prefix="mlflow-migrated-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    db = Path(directory) / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()  # opening a store creates and migrates it
    return db


def start_all(servers: Iterable[MlflowServer]) -> list[MlflowServer]:
    """Start every server at once, then wait until each answers `/health`; stops them all if one fails.

    Example:
        a, b = start_all([MlflowServer(tmp_path / "a"), MlflowServer(tmp_path / "b")])
    """
    servers = list(servers)
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_healthy()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


class MlflowServer:
    """`mlflow server` on 127.0.0.1:<port>, SQLite backend, artifacts served by the server.

    Example:
        server = MlflowServer(tmp_path)
        server.start()
        ...  # MlflowConfig(tracking_uri=server.uri)
        server.stop()
        server.start()  # same port, same db and artifacts
        server.stop()
    """

    def __init__(
        self,
        root: Path,
        port: Optional[int] = None,
        startup_timeout: float = 120.0,
        *,
        auth: bool = False,
        admin_username: str = "admin",
        admin_password: Optional[str] = None,
        token_users: Optional[dict[str, str]] = None,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.db = self.root / "mlflow.db"
        self.artifacts = self.root / "artifacts"
        self.log_path = self.root / "mlflow-server.log"
        self.startup_timeout = startup_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0
        # Taken now, without MLFLOW_*: a test may point its own fluent-API calls at the server with
        # MLFLOW_TRACKING_URI, which the server process must not inherit.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        self.env["PYTHONUNBUFFERED"] = "1"
        self.auth = auth
        self.admin_username = admin_username
        self.admin_password = admin_password or "admin-" + secrets.token_hex(12)  # >= 12 characters
        if auth:
            self._configure_auth(token_users or {})

    def _configure_auth(self, token_users: dict[str, str]) -> None:
        """The basic-auth app's ini file and environment (written once: the admin is created on first start)."""
        function = "mlflow.server.auth:authenticate_request_basic_auth"
        if token_users:
            function = "mlflow_token_auth:authenticate_request_basic_or_token"
            digests = {hashlib.sha256(token.encode()).hexdigest(): user for token, user in token_users.items()}
            self.env["MLFLOW_TEST_TOKEN_USERS"] = ",".join(f"{digest}={user}" for digest, user in digests.items())
            tests = str(Path(__file__).resolve().parent)
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, self.env.get("PYTHONPATH")]))
        config = self.root / "basic_auth.ini"
        config.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{self.root / 'basic_auth.db'}\n"
            f"admin_username = {self.admin_username}\n"
            f"admin_password = {self.admin_password}\n"
            f"authorization_function = {function}\n"
            "auth_cache_ttl_seconds = 0\n"
        )
        config.chmod(0o600)
        self.env["MLFLOW_AUTH_CONFIG_PATH"] = str(config)
        self.env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(16)
        self.env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # 2 processes instead of 9

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(MLFLOW),
            "server",
            *(["--app-name", "basic-auth"] if self.auth else []),
            "--backend-store-uri",
            f"sqlite:///{self.db}",
            "--artifacts-destination",
            str(self.artifacts),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> MlflowServer:
        """Start the server and wait until `GET /health` answers 200.

        Raises:
            RuntimeError: the server exited, or did not answer within `startup_timeout`
                (the log tail is in the message).
        """
        self.launch()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> None:
        """Start the server process (on a copy of `migrated_database()` the first time); `wait_healthy`
        waits until it answers."""
        if self.running:
            raise RuntimeError(f"mlflow server on {self.uri} is already running (pid {self.proc.pid})")
        deadline = time.monotonic() + 30
        while port_is_open(self.port):  # a killed server's socket, or a stray process
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {self.port} is still taken; cannot start mlflow server\n{self.log_tail()}")
            time.sleep(0.2)
        if not self.db.exists():
            shutil.copyfile(migrated_database(), self.db)
        self.starts += 1
        with open(self.log_path, "a") as log:
            log.write(f"\n===== start #{self.starts}: {' '.join(self.command())}\n")
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.root,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server on {self.uri} exited with {self.proc.returncode} while starting\n{self.log_tail()}"
                )
            try:
                with _DIRECT.open(self.uri + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status}"
            except (urllib.error.URLError, OSError) as err:
                last = str(err)
            time.sleep(0.25)
        raise RuntimeError(
            f"mlflow server on {self.uri} did not answer /health within {self.startup_timeout:.0f} s "
            f"(last: {last})\n{self.log_tail()}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Signal the server's process group (`sig`, SIGKILL after `timeout`) and wait until it is gone."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_process_group(proc, sig, timeout)  # workers may outlive the parent: the whole group
        deadline = time.monotonic() + 10
        while port_is_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def admin(self):
        """An `mlflow.server.auth.client.AuthServiceClient` acting as the admin, with explicit credentials."""
        return auth_client(self.uri, self.admin_username, self.admin_password)

    def log_tail(self, chars: int = 4000) -> str:
        if not self.log_path.exists():
            return f"(no log at {self.log_path})"
        return f"--- tail of {self.log_path} ---\n{log_tail(str(self.log_path), chars)}"


def auth_client(uri: str, username: str, password: str):
    """MLflow's auth client (users, permissions) with these credentials, not the environment's.

    `AuthServiceClient._request` calls `get_default_host_creds`, i.e. `MLFLOW_TRACKING_USERNAME`
    and `..._PASSWORD`; this subclass sends the given ones through the project's explicit
    connection (`prefect_tensorflow.tasks.registry.mlflow_client`).
    """
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.utils.rest_utils import verify_rest_response

    from prefect_tensorflow.tasks.registry.mlflow_client import Connection, _request

    connection = Connection(uri, uri, username=username, password=password, max_retries=0)

    class ExplicitAuthClient(AuthServiceClient):
        def _request(self, endpoint, method, *, expected_status: int = 200, **kwargs):
            response = _request(connection, self.tracking_uri, endpoint, method, **kwargs)
            response = verify_rest_response(response, endpoint, expected_status=expected_status)
            return {} if response.status_code == 204 or not response.content else response.json()

    return ExplicitAuthClient(uri)


class FaultyProxy:
    """A reverse proxy on 127.0.0.1 in front of a real MLflow server, answering some requests 503.

    A real HTTP fault injector, used where a stock `mlflow server` cannot be
    made to fail on demand: the client under test sends real requests over TCP
    and receives real `503 Service Unavailable` responses; every other request
    is forwarded to the real server on `upstream_port` and its real response
    returned. Which requests fail:

    - `failures`: the first N requests overall (a large N: a server that never recovers);
    - `failures_per_path`: the first K requests to each (method, path), so that every
      endpoint the client uses (REST calls, artifact uploads and downloads) fails first;
    - `lost_responses`: {path: n}: the first n requests to `path` are forwarded and done
      by the server, but the client gets `504 Gateway Timeout` instead of the answer.

    The 503 body is a gateway's HTML page, or MLflow's own JSON error
    (`TEMPORARILY_UNAVAILABLE`) with `json_body=True`. `log` lists
    (method, path, status) of every request.
    """

    def __init__(
        self,
        upstream_port: int,
        failures: int = 0,
        failures_per_path: int = 0,
        json_body: bool = False,
        lost_responses: Optional[dict[str, int]] = None,
    ):
        self.upstream_port = upstream_port
        self.failures = failures
        self.failures_per_path = failures_per_path
        self.lost_responses = dict(lost_responses or {})
        self.json_body = json_body
        self.requests = 0
        self.failed = 0
        self.seen: dict[tuple[str, str], int] = {}
        self.log: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _read_body(self) -> Optional[bytes]:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    del self.headers["Transfer-Encoding"]
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            def _send_error(self, status: int, reason: str) -> None:
                if proxy.json_body:  # what MLflow's own server sends for TEMPORARILY_UNAVAILABLE
                    payload = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected %d"}' % status
                    kind = "application/json"
                else:  # what a load balancer or gateway in front of it sends
                    payload = b"<html><body><h1>%d %s</h1></body></html>" % (status, reason.encode())
                    kind = "text/html"
                self.send_response(status, reason)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _handle(self) -> None:
                body = self._read_body()
                key = (self.command, self.path.split("?", 1)[0])
                with proxy._lock:
                    proxy.requests += 1
                    proxy.seen[key] = seen = proxy.seen.get(key, 0) + 1
                    fail = proxy.failed < proxy.failures or seen <= proxy.failures_per_path
                    if fail:
                        proxy.failed += 1
                if fail:
                    proxy.log.append((*key, 503))
                    self._send_error(503, "Service Unavailable")
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                    headers["Host"] = f"127.0.0.1:{proxy.upstream_port}"
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                finally:
                    conn.close()
                with proxy._lock:
                    lose = proxy.lost_responses.get(key[1], 0) > 0
                    if lose:
                        proxy.lost_responses[key[1]] -= 1
                if lose:  # the server did the work; the client never learns it
                    proxy.log.append((*key, 504))
                    self._send_error(504, "Gateway Timeout")
                    return
                proxy.log.append((*key, response.status))
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length", "keep-alive"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
