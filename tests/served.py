"""A real Prefect server and `prefect-tensorflow serve` on 127.0.0.1 for tests, and the Run form's requests.

`ServedDeployments(root, environ)` starts `prefect server start` (its home and
log under `root`; with `database`, a copy of that migrated database in its home) and `prefect-tensorflow serve --limit N` against it, as
`make serve` runs them, and stops both (serve first: a runner whose API is gone
ignores signals). `api()` is a sync client on that server; `save_block` saves
an `MlflowConnection` there; `create_run` creates a flow run from a deployment
with custom parameters, as the UI's Run form does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from prefect_tensorflow.flows.servers import free_port, start_prefect_server
from prefect_tensorflow.tasks.child_processes import log_tail, stop_process_group

REPO = Path(__file__).resolve().parents[1]
BIN = os.path.dirname(sys.executable)
DEPLOYMENTS = ("retrain-iris", "export-checkpoint")
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")  # the final state types (`State.is_final`)


def seed_prefect_home(home: Path, database: Path) -> None:
    """Copy the migrated Prefect `database` (the `prefect_database` fixture) into `home`, a PREFECT_HOME that
    has none yet: a server started there skips the migrations."""
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "prefect.db").exists():
        shutil.copyfile(database, home / "prefect.db")


def base_environ(root: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment of the server, serve and its flow runs: nothing from the caller's PREFECT_* or MLFLOW_*."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))},
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        **extra,
    }


class ServedDeployments:
    """`prefect server start` + `prefect-tensorflow serve --limit N`, both on 127.0.0.1."""

    def __init__(self, root: Path, environ: dict[str, str], limit: int = 4, database: Optional[Path] = None):
        self.root = Path(root)
        self.environ = environ
        self.limit = limit
        self.database = database  # a migrated Prefect database the server starts from (`seed_prefect_home`)
        self.port = int(environ["PREFECT_API_URL"].rsplit(":", 1)[1].split("/")[0])
        self.server_log = self.root / "prefect-server.log"
        self.serve_log = self.root / "serve.log"
        self.server: Optional[subprocess.Popen] = None
        self.serve: Optional[subprocess.Popen] = None
        self.deployments: dict[str, str] = {}

    @classmethod
    def environ_for(cls, root: Path, **extra: str) -> dict[str, str]:
        return base_environ(root, free_port(), **extra)

    def start_server(self) -> None:
        if self.database is not None:
            seed_prefect_home(Path(self.environ["PREFECT_HOME"]), self.database)
        self.server = start_prefect_server("127.0.0.1", self.port, str(self.server_log), env=self.environ)

    @property
    def serving(self) -> bool:
        return self.serve is not None and self.serve.poll() is None

    def start_serve(self, timeout: float = 240, names: tuple[str, ...] = DEPLOYMENTS) -> dict[str, str]:
        """Start serve and wait until the deployments `names` exist (unpaused); their ids by name."""
        with open(self.serve_log, "a") as out:
            self.serve = subprocess.Popen(
                [f"{BIN}/prefect-tensorflow", "serve", "--limit", str(self.limit)],
                env=self.environ,
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            with self.api() as client:
                found = {d.name: str(d.id) for d in client.read_deployments() if not d.paused}
            if set(names) <= set(found):
                self.deployments = found
                return found
            if not self.serving or time.monotonic() > deadline:
                raise RuntimeError(f"serve did not create the deployments:\n{log_tail(str(self.serve_log))}")
            time.sleep(1)

    def stop_serve(self) -> None:
        if self.serve is not None:
            stop_process_group(self.serve)
            self.serve = None

    def stop(self) -> None:
        self.stop_serve()
        if self.server is not None:
            stop_process_group(self.server)
            self.server = None

    @contextmanager
    def api(self) -> Iterator[Any]:
        """A sync Prefect client on this server (and the settings that point there)."""
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.settings import PREFECT_API_URL, temporary_settings

        url = self.environ["PREFECT_API_URL"]
        with temporary_settings(updates={PREFECT_API_URL: url}), SyncPrefectClient(url) as client:
            yield client

    def save_block(self, name: str, **fields: Any) -> str:
        """Save an `MlflowConnection` block here; its document id (what the Run form sends as `$ref`)."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from prefect_tensorflow.tasks.blocks import MlflowConnection

        with temporary_settings(updates={PREFECT_API_URL: self.environ["PREFECT_API_URL"]}):
            return str(MlflowConnection(**fields).save(name, overwrite=True))

    def create_run(
        self, client: Any, deployment: str, parameters: dict, *, name: Optional[str] = None, enforce: Optional[bool] = None
    ) -> str:
        """Create a flow run from `deployment` with `parameters` as the Run form does; its id.

        The client's `create_flow_run_from_deployment` sends UTF-8 JSON, so it cannot send a
        lone surrogate (the UI's JSON.stringify sends `\\udcff`), nor the form's "Enforce
        Parameter Schema" switch. Then the same body goes to the same endpoint as ASCII JSON.

        Raises:
            httpx.HTTPStatusError: the server refused (or failed).
        """
        deployment_id = self.deployments[deployment]
        try:
            json.dumps(parameters, ensure_ascii=False).encode("utf-8")
            encodable = True
        except UnicodeEncodeError:
            encodable = False
        if encodable and enforce is None:
            return str(client.create_flow_run_from_deployment(deployment_id, parameters=parameters, name=name).id)
        from prefect.client.schemas.actions import DeploymentFlowRunCreate
        from prefect.states import Scheduled, to_state_create

        body = DeploymentFlowRunCreate(parameters=parameters, name=name, state=to_state_create(Scheduled())).model_dump(
            mode="json", exclude_unset=True
        )
        if enforce is not None:
            body["enforce_parameter_schema"] = enforce
        response = client.request(
            "POST",
            "/deployments/{id}/create_flow_run",
            path_params={"id": deployment_id},
            content=json.dumps(body, ensure_ascii=True).encode("ascii"),
            headers={"Content-Type": "application/json"},
        )
        return str(response.json()["id"])

    def final_states(self, client: Any, run_ids: list[str]) -> dict[str, str]:
        """The state type of each of these runs that is final (COMPLETED, FAILED, CRASHED, CANCELLED), by id.

        One request per 1,000 ids to `/ui/flow_runs/history`, which reads ids and state types only: a poll
        that reads the runs themselves makes the server load and serialize every run's parameters (a
        400 KB hostile value, a hundred times over) on every poll."""
        found: dict[str, str] = {}
        for offset in range(0, len(run_ids), 1000):
            body = {
                "flow_runs": {"id": {"any_": run_ids[offset : offset + 1000]}, "state": {"type": {"any_": list(FINAL)}}},
                "limit": 1000,
            }
            response = client.request(
                "POST",
                "/ui/flow_runs/history",
                content=json.dumps(body).encode("ascii"),
                headers={"Content-Type": "application/json"},
            )
            found.update({str(run["id"]): str(run["state_type"]) for run in response.json()})
        return found

    def read_runs(self, client: Any, run_ids: list[str]) -> dict[str, Any]:
        """The runs by id, read in full (parameters, state and its message), 200 a request."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        runs: dict[str, Any] = {}
        for offset in range(0, len(run_ids), 200):
            chunk = run_ids[offset : offset + 200]
            found = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)), limit=200)
            runs.update({str(run.id): run for run in found})
        return runs

    def wait(self, client: Any, run_ids: list[str], timeout: float, poll: float = 2.0) -> dict[str, Any]:
        """Poll (`final_states`, one request for all of them) until every run is final or `timeout` passes;
        then the runs by id, read once (`read_runs`)."""
        deadline = time.monotonic() + timeout
        while len(self.final_states(client, run_ids)) < len(set(run_ids)) and time.monotonic() <= deadline:
            time.sleep(poll)
        return self.read_runs(client, run_ids)

    def send_run(
        self,
        client: Any,
        deployment: str,
        parameters: dict,
        *,
        name: Optional[str] = None,
        enforce: Optional[bool] = None,
        **fields: Any,
    ) -> str:
        """`create_run` for any JSON value, always as raw ASCII JSON: also parameters that the client's own
        models cannot serialize (nested deeper than pydantic's limit), as the UI's JSON input sends them.
        `fields` are other fields of the request (e.g. `tags`), sent as they are.

        Raises:
            httpx.HTTPStatusError: the server refused (or failed: a 5xx may come after the run was stored).
        """
        from prefect.client.schemas.actions import DeploymentFlowRunCreate
        from prefect.states import Scheduled, to_state_create

        body = DeploymentFlowRunCreate(name=name, state=to_state_create(Scheduled())).model_dump(mode="json", exclude_unset=True)
        body["parameters"] = parameters
        if enforce is not None:
            body["enforce_parameter_schema"] = enforce
        body.update(fields)
        response = client.request(
            "POST",
            "/deployments/{id}/create_flow_run",
            path_params={"id": self.deployments[deployment]},
            content=json.dumps(body, ensure_ascii=True).encode("ascii"),
            headers={"Content-Type": "application/json"},
        )
        return str(response.json()["id"])

    def stored_run(self, client: Any, name: str) -> Optional[tuple[str, str]]:
        """(id, state type) of the run named `name`, if the server stored one, without reading the run
        (`/ui/flow_runs/history` returns no parameters: a run the API cannot serialize breaks the rest)."""
        body = {"flow_runs": {"name": {"any_": [name]}}, "limit": 2}
        response = client.request(
            "POST",
            "/ui/flow_runs/history",
            content=json.dumps(body, ensure_ascii=True).encode("ascii"),
            headers={"Content-Type": "application/json"},
        )
        found = [(str(run["id"]), str(run["state_type"])) for run in response.json()]
        if len(found) > 1:
            raise RuntimeError(f"{len(found)} runs named {name!r}")
        return found[0] if found else None
