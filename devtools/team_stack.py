"""The team's production shape on one machine: PostgreSQL, an S3-compatible store, `mlflow server`, `prefect server`.

    python -m devtools.team_stack            # start all (from the repository's root), run `retrain` on it, keep serving
    python -m devtools.team_stack --no-run   # start all, print the environment, wait for Ctrl-C
    make team-stack

Everything binds 127.0.0.1 on free ports, lives under one directory
(`--root`, default `<data home>/team-stack`) and stops on Ctrl-C:

- **PostgreSQL** (`PgCluster`): Debian's `postgresql` server binaries (the
  Makefile installs them when missing), a throwaway cluster made with
  `initdb` (as the `postgres` user when run as root: PostgreSQL refuses root),
  durability off (it is for tests and demos). Databases `mlflow` and `prefect`.
- **S3** (`S3Server`): moto's S3 server (`moto[server]`, a test extra), with
  requests handled one at a time so that conditional writes (`If-None-Match`,
  `If-Match`) are atomic as they are on AWS S3. In memory: lost on stop.
- **MLflow**: `mlflow server --backend-store-uri postgresql+psycopg2://...
  --artifacts-destination s3://team/mlflow --serve-artifacts` (clients need no
  S3 credentials: the server proxies artifacts).
- **Prefect**: `prefect server start` with `PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...`,
  and a process worker on the pool `tensorflow-process`, to which the
  deployments of `prefect.yaml` are deployed.

Example:
    >>> from devtools.team_stack import find_postgres_bindir
    >>> (find_postgres_bindir() / "initdb").exists()
    True
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

from prefect_tensorflow.flows.servers import free_port, start_server
from prefect_tensorflow.tasks.child_processes import start_process, stop_process_group

REPO = Path(__file__).resolve().parents[1]

BUCKET = "team"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "team-stack", "AWS_SECRET_ACCESS_KEY": "team-stack-secret", "AWS_DEFAULT_REGION": "us-east-1"}
FAST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "shared_buffers": "64MB",
    "max_connections": "200",
    "autovacuum": "off",
    "log_min_messages": "warning",
    "unix_socket_permissions": "0777",
}


def find_postgres_bindir() -> Path:
    """Where `initdb` and `postgres` are: `$PG_BINDIR`, PATH, or the newest `/usr/lib/postgresql/<N>/bin`.

    Raises:
        FileNotFoundError: no PostgreSQL server is installed (`apt-get install postgresql`).
    """
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    found = shutil.which("initdb")
    if found and (Path(os.path.realpath(found)).parent / "postgres").exists():
        return Path(os.path.realpath(found)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(re.findall(r"\d+", p.split("/")[4])[0]), reverse=True
    )
    if candidates:
        return Path(candidates[0]).parent
    raise FileNotFoundError("PostgreSQL server binaries not found: apt-get install postgresql (or set PG_BINDIR)")


class PgCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1:<port>, socket and data under `root`.

    Example:
        with PgCluster() as pg:
            pg.create_database("mlflow")
            url = pg.url("mlflow", "postgresql+psycopg2")
    """

    def __init__(self, root: Optional[str] = None, port: Optional[int] = None):
        self.bindir = find_postgres_bindir()
        # As root the directory must be reachable by `postgres`: not under pytest's 0700 /tmp/pytest-of-root.
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="ptf-postgres-"))
        self.owned = root is None
        self.data, self.sockets, self.log = self.root / "data", self.root / "sockets", self.root / "postgres.log"
        self.port = port or free_port()
        self.process: Optional[subprocess.Popen] = None

    def _as_owner(self) -> dict[str, Any]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        options: dict[str, Any] = {"cwd": str(self.root), "env": env, "stdin": subprocess.DEVNULL}
        if os.geteuid() == 0:  # initdb and postgres refuse root
            owner = next(pwd.getpwnam(n) for n in (os.environ.get("PG_RUN_AS"), "postgres", "nobody") if n and _user(n))
            env.update(HOME=str(self.root), USER=owner.pw_name, LOGNAME=owner.pw_name)
            options.update(user=owner.pw_uid, group=owner.pw_gid, extra_groups=[])
        return options

    def start(self, timeout: float = 60) -> PgCluster:
        self.sockets.mkdir(parents=True, exist_ok=True)
        options = self._as_owner()
        if "user" in options:
            for path in (self.root, self.sockets):
                os.chown(path, options["user"], options["group"])
        if not (self.data / "PG_VERSION").exists():
            subprocess.run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
                timeout=300,
                **options,
            )
        command = [
            str(self.bindir / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={self.sockets}",
        ]
        for key, value in FAST_SETTINGS.items():
            command += ["-c", f"{key}={value}"]
        self.process = start_process(command, str(self.log), **options)
        deadline = time.monotonic() + timeout
        while (
            subprocess.run(
                [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-t", "1"], capture_output=True
            ).returncode
            != 0
        ):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        return self

    def sql(self, statement: str, database: str = "postgres") -> str:
        result = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-qAtc",
                statement,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode:
            raise RuntimeError(f"psql: {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str, template: Optional[str] = None) -> str:
        self.sql(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return name

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        """A SQLAlchemy URL (psycopg2 for MLflow; `postgresql+asyncpg` for Prefect)."""
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster), SIGKILL if it lingers."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop_process_group(process, signal.SIGKILL)
        if self.owned:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


class S3Server:
    """moto's S3 server as a process of its own on 127.0.0.1 (see the module docstring); `env` reaches it."""

    def __init__(self, log_path: str, port: Optional[int] = None):
        self.port = port or free_port()
        self.log_path = log_path
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: Optional[subprocess.Popen] = None

    @property
    def env(self) -> dict[str, str]:
        """What a client (boto3, s3fs, MLflow's server) needs to use this server."""
        return {**S3_KEYS, "AWS_ENDPOINT_URL_S3": self.endpoint, "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def start(self) -> S3Server:
        self.process = start_server(
            [sys.executable, "-m", "devtools.team_stack", "s3-server", "--port", str(self.port)],
            self.log_path,
            cwd=str(REPO),
            health_url=f"{self.endpoint}/moto-api/",
            timeout=120,
        )
        return self

    def create_bucket(self, name: str) -> None:
        import boto3

        session = boto3.session.Session(
            aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )
        session.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)
            self.process = None


def serve_s3(port: int) -> None:
    """Run moto's S3 app with one request at a time, so conditional writes are atomic (moto's check-then-write
    has no lock of its own). Connections stay threaded: keep-alive clients never block each other.

    A request's body is read before it takes its turn: a client stopped mid-upload (a test SIGSTOPs a
    trainer) would otherwise hold the one turn while the server waits for bytes that never come."""
    import io

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server
    from werkzeug.wsgi import get_input_stream

    app = DomainDispatcherApplication(create_backend_app)  # /moto-api/ (reset, ...)
    s3_app = create_backend_app("s3")  # S3 only: no per-request guess of the service (a third of moto's time)
    lock = threading.Lock()

    def serialized(environ: dict, start_response: Any) -> list:
        target = app if environ.get("PATH_INFO", "").startswith("/moto-api") else s3_app
        body = get_input_stream(environ).read()
        environ.update({"wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True, "CONTENT_LENGTH": str(len(body))})
        with lock:
            return list(target(environ, start_response))

    server = make_server("127.0.0.1", port, serialized, threaded=True, request_handler=MotoRequestHandler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    finally:
        server.server_close()


def mlflow_server_command(backend_uri: str, artifacts: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        artifacts,
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def clean_environment() -> dict[str, str]:
    """This process's environment without Prefect, MLflow and AWS settings (each server gets its own)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_", "AWS_"))}


class TeamStack:
    """Start and stop the four servers (and a worker) under `root`."""

    def __init__(self, root: str):
        self.root = Path(root)
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pg = PgCluster(str(self.root / "postgres"))
        self.s3 = S3Server(str(self.logs / "s3.log"))
        self.processes: list[subprocess.Popen] = []
        self.env: dict[str, str] = {}

    def start(self) -> dict[str, str]:
        """Start everything; returns the environment a client uses (PREFECT_API_URL, MLFLOW_TRACKING_URI, ...)."""
        (self.root / "postgres").mkdir(parents=True, exist_ok=True)
        fresh = not (self.pg.data / "PG_VERSION").exists()
        self.pg.start()
        if fresh:
            self.pg.create_database("mlflow")
            self.pg.create_database("prefect")
        self.s3.start()
        self.s3.create_bucket(BUCKET)
        mlflow_port, prefect_port = free_port(), free_port()
        base = clean_environment()
        server_env = {**base, **self.s3.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.processes.append(
            start_server(
                mlflow_server_command(self.pg.url("mlflow"), f"s3://{BUCKET}/mlflow", mlflow_port),
                str(self.logs / "mlflow.log"),
                env=server_env,
                health_url=f"http://127.0.0.1:{mlflow_port}/health",
                timeout=300,
            )
        )
        prefect_env = {
            **base,
            "PREFECT_HOME": str(self.root / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": self.pg.url("prefect", "postgresql+asyncpg"),
            "PREFECT_API_DATABASE_TIMEOUT": "60",
            "PREFECT_API_DATABASE_CONNECTION_TIMEOUT": "30",
        }
        self.processes.append(
            start_server(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                str(self.logs / "prefect.log"),
                env=prefect_env,
                health_url=f"http://127.0.0.1:{prefect_port}/api/health",
                timeout=300,
            )
        )
        self.env = {
            **self.s3.env,
            "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
            "PREFECT_TENSORFLOW_HOME": str(self.root / "data"),
            "PREFECT_TENSORFLOW_ROOTS": f"{self.root / 'data'},s3://{BUCKET}/models,s3://{BUCKET}/exports,s3://{BUCKET}/frozen",
        }
        return self.env

    def start_worker(self) -> None:
        """Deploy prefect.yaml's deployments to a process pool and start a worker on it."""
        env = {
            **clean_environment(),
            **self.env,
            "PREFECT_HOME": str(self.root / "client-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        deploy = REPO / "deployments" / "deploy.py"
        subprocess.run(
            [sys.executable, str(deploy), "--env", "team-stack"], env=env, check=True, timeout=600, cwd=str(deploy.parents[1])
        )
        self.processes.append(
            start_process(
                # the project's worker: Prefect's process worker that fails a run the API cannot return
                # instead of stopping (flows/unreadable_runs.py)
                [
                    os.path.join(os.path.dirname(sys.executable), "prefect-tensorflow"),
                    "worker",
                    "--pool",
                    "tensorflow-process",
                    "--limit",
                    "1",
                ],
                str(self.logs / "worker.log"),
                env=env,
                cwd=str(self.root),
            )
        )

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_process_group(process)
        self.processes.clear()
        self.s3.stop()
        self.pg.stop()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.team_stack", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    s3 = sub.add_parser("s3-server", help="only the S3-compatible server (used by the stack and the tests)")
    s3.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", default=None, help="where data and logs go [default: <data home>/team-stack]")
    parser.add_argument("--no-run", action="store_true", help="do not run retrain: just serve until Ctrl-C")
    args = parser.parse_args(argv)
    if args.command == "s3-server":
        serve_s3(args.port)
        return 0
    from prefect_tensorflow.tasks.settings import get_settings

    stack = TeamStack(args.root or os.path.join(get_settings().home, "team-stack"))
    started = time.monotonic()
    try:
        env = stack.start()
        stack.start_worker()
        print(f"team stack up in {time.monotonic() - started:.0f} s; logs in {stack.logs}")
        for key, value in sorted(env.items()):
            print(f"export {key}={value}")
        print(f"Prefect UI: {env['PREFECT_API_URL'].removesuffix('/api')}    MLflow UI: {env['MLFLOW_TRACKING_URI']}")
        if not args.no_run:
            print("running retrain-iris on the worker (model dir and exports on S3)...")
            subprocess.run(
                [sys.executable, "-m", "prefect", "deployment", "run", "retrain/retrain-iris", "--watch"],
                env={**clean_environment(), **env, "PREFECT_HOME": str(stack.root / "client-home")},
                check=False,
                timeout=3600,
            )
        print("serving; Ctrl-C stops everything")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
