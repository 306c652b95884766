"""`mlflow models serve` of a registered version, started, queried over REST and stopped.

`served_model(model_uri, connection)` starts MLflow's scoring server (`mlflow
models serve -m models:/<name>/<version> --env-manager local`) on a free
port of 127.0.0.1, in a session of its own, with the connection's tracking
and registry URIs and credentials in its environment (never in argv), waits
for `/ping`, and stops the whole process group when the block ends, however
it ends. `ScoringServer.invoke` posts JSON to `/invocations`;
`peak_memory_mb` sums the peak resident memory (`VmHWM`) of every process of
the server's tree.

What MLflow 3 answers for the SavedModel pyfunc (`registry/saved_model_pyfunc.py`,
whose `predict` returns a dict of arrays): `{"predictions": {output name:
nested lists}}`, for TF Serving's row format (`{"instances": [{input:
row}, ...]}`) and its columnar one (`{"inputs": {input: rows}}`) alike.

Example:
    >>> from prefect_tensorflow.tasks.promotion.scoring_server import instances_payload, inputs_payload
    >>> import numpy as np
    >>> instances_payload({"features": np.array([[1.0, 2.0]], dtype=np.float32)})
    {'instances': [{'features': [1.0, 2.0]}]}
    >>> inputs_payload({"features": np.array([[1.0, 2.0]], dtype=np.float32)})
    {'inputs': {'features': [[1.0, 2.0]]}}
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..child_processes import child_env, free_ports, log_tail, start_process, stop_process_group
from ..errors import RegistryError
from ..registry.mlflow_connection import MlflowConfig

HOST = "127.0.0.1"


def instances_payload(inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """TF Serving's REST row format: one `{input name: value}` object per example."""
    rows = min(len(v) for v in inputs.values())
    return {"instances": [{name: np.asarray(v[i]).tolist() for name, v in inputs.items()} for i in range(rows)]}


def inputs_payload(inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """TF Serving's REST columnar format: `{"inputs": {input name: all rows}}`."""
    return {"inputs": {name: np.asarray(v).tolist() for name, v in inputs.items()}}


def server_env(connection: MlflowConfig) -> dict[str, str]:
    """The variables that point MLflow in the server process at the connection's tracking server and registry."""
    env = {
        "MLFLOW_TRACKING_URI": connection.resolved_tracking_uri(),
        "MLFLOW_REGISTRY_URI": connection.resolved_registry_uri(),
    }
    for variable, value in (
        ("MLFLOW_TRACKING_TOKEN", connection.resolved_token()),
        ("MLFLOW_TRACKING_USERNAME", connection.resolved_username()),
        ("MLFLOW_TRACKING_PASSWORD", connection.resolved_password()),
    ):
        if value:
            env[variable] = value
    return env


def _tree_pids(pid: int) -> list[int]:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:  # gone
            return []
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


def _peak_rss_mb(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        return None
    return None


@dataclass
class ScoringServer:
    """A running scoring server: its URL, process (a `Popen`, or a `ForkedProcess` of the warm template) and log."""

    url: str
    process: Any
    log_path: str
    ready_seconds: float = 0.0
    warm: bool = False
    """Forked from the warm template (MLflow's scoring-server app under uvicorn), not `mlflow models serve`."""

    def invoke(self, payload: dict[str, Any], timeout: float = 60.0) -> Any:
        """POST `payload` as JSON to `/invocations`; the decoded answer.

        Raises:
            RegistryError: the server answered with an error status (its message quoted).
        """
        request = urllib.request.Request(
            self.url + "/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            body = err.read().decode("utf-8", "replace")
            try:
                body = json.loads(body).get("message", body)
            except (ValueError, AttributeError):
                pass
            first = next((line.strip() for line in str(body).splitlines() if line.strip()), "")
            raise RegistryError(f"{self.url}/invocations answered HTTP {err.code}: {first[:500]}") from err

    def ping(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/ping", timeout=timeout) as response:
                return bool(response.status == 200)
        except (OSError, ValueError):
            return False

    def peak_memory_mb(self) -> Optional[float]:
        """Sum of the peak resident memory (`VmHWM`) of the server and every process under it, so far."""
        values = [v for v in (_peak_rss_mb(pid) for pid in _tree_pids(self.process.pid)) if v is not None]
        return sum(values) if values else None


@contextmanager
def served_model(
    model_uri: str, connection: MlflowConfig, *, timeout: float = 600.0, log_dir: Optional[str] = None, warm: bool = True
) -> Iterator[ScoringServer]:
    """MLflow's scoring server for `model_uri`, ready (its `/ping` answers 200) and stopped when the block ends.

    Args:
        model_uri: e.g. `models:/iris/3`.
        connection: the MLflow connection the version is registered through.
        timeout: seconds to wait for the server to answer `/ping`.
        log_dir: where its log goes (default: a temporary directory removed with the server).
        warm: fork it from the warm template (`warm_template`: what `mlflow models serve --env-manager
            local` runs, the model downloaded and MLflow's scoring-server app under uvicorn, with MLflow and
            TensorFlow imported already); False, or a template that cannot fork: `mlflow models serve`.
            `ScoringServer.warm` says which ran.

    Raises:
        RegistryError: the server exited or did not answer within `timeout` (its log's last line quoted).
    """
    from .warm_template import fork_check

    with tempfile.TemporaryDirectory(prefix="prefect-tensorflow-serve-") as scratch:
        log_path = os.path.join(log_dir or scratch, "mlflow-models-serve.log")
        port = free_ports(1, HOST)[0]
        started = time.perf_counter()
        # MLflow execs `uvicorn` by name: this Python's scripts directory first on PATH finds the one beside it
        path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", os.defpath)])
        env = child_env(base={**os.environ, **server_env(connection), "PATH": path})
        process: Any = None
        if warm:  # the connection's credentials travel in the request on the template's stdin, never in argv
            download_dir = os.path.join(scratch, "model")
            request = {"model_uri": model_uri, "env": env, "download_dir": download_dir, "host": HOST, "port": port}
            process = fork_check("serve", request, log_path)
        forked = process is not None
        what = f"mlflow scoring server (warm template) for {model_uri}"
        if not forked:
            what = f"mlflow models serve -m {model_uri}"
            command = [
                sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
                "--env-manager", "local", "-h", HOST, "-p", str(port),
            ]  # fmt: skip
            process = start_process(command, log_path, env=env, cwd=scratch)
        server = ScoringServer(url=f"http://{HOST}:{port}", process=process, log_path=log_path, warm=forked)
        try:
            deadline = started + timeout
            while not server.ping():
                if process.poll() is not None:
                    raise RegistryError(
                        f"{what} exited with status {process.returncode} before it answered /ping: {_last_line(log_path)}"
                    )
                if time.perf_counter() > deadline:
                    raise RegistryError(f"{what} did not answer /ping within {timeout:g} s: {_last_line(log_path)}")
                time.sleep(0.1)
            server.ready_seconds = time.perf_counter() - started
            yield server
        finally:
            stop_process_group(process, grace=10.0)


def _last_line(log_path: str) -> str:
    lines = [line.strip() for line in log_tail(log_path).splitlines() if line.strip()]
    return lines[-1] if lines else "(empty log)"
