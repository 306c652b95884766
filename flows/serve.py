"""Serve the two deployments from one local process, with a local Prefect server if none is configured.

`prefect-tensorflow serve` (and `make serve`): when no `PREFECT_API_URL` is
set, starts `prefect server start` on 127.0.0.1 (its log in the data home),
then serves `retrain/retrain-iris` (nightly cron) and
`export-checkpoint/export-checkpoint` (no schedule) with `prefect.serve`: open
the UI, press Run on `export-checkpoint`, fill in the form. Flow runs execute
in subprocesses of this process. The same deployments, for a work pool, are in
`prefect.yaml` (`prefect deploy --all`).

Example:
    >>> from prefect_tensorflow.flows.serve import build_deployments
    >>> [d.name for d in build_deployments()]  # doctest: +SKIP
    ['retrain-iris', 'export-checkpoint']
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from prefect_tensorflow.tasks.data_home import data_home

from .defaults import default_model_dir

RETRAIN_CRON = "0 2 * * *"
SERVER_HOST = "127.0.0.1"
SERVER_PORT = 4200


def deployment_parameters() -> dict[str, dict[str, Any]]:
    """Default parameters of each deployment (the UI's form starts from them)."""
    # Every path is given, None included: re-applying a deployment keeps the parameters it
    # leaves out, so paths set by an earlier `prefect deploy` would otherwise stay.
    paths = {"model_dir": default_model_dir(), "export_base": None, "frozen_dir": None}
    return {
        "retrain-iris": {**paths, "more_steps": 1000, "registered_model_name": "iris"},
        "export-checkpoint": {**paths, "checkpoint": "latest", "registered_model_name": "iris"},
    }


def build_deployments(overrides: Optional[dict[str, dict[str, Any]]] = None) -> list:
    """`RunnerDeployment`s of `retrain` (cron) and `export-checkpoint` (on demand).

    Args:
        overrides: per deployment name, `parameters` (merged into the defaults),
            `cron`, `paused`, `tags`, `description`.
    """
    from prefect.deployments.runner import EntrypointType

    from .export_checkpoint import export_checkpoint
    from .retrain import retrain

    overrides = overrides or {}
    defaults = deployment_parameters()
    out = []
    for flow_, name, cron, description in (
        (retrain, "retrain-iris", RETRAIN_CRON, "Nightly retraining of the iris model, then export and MLflow registration."),
        (export_checkpoint, "export-checkpoint", None, "Ship a checkpoint that exists: export, freeze, register in MLflow."),
    ):
        extra = overrides.get(name, {})
        out.append(
            flow_.to_deployment(
                name=name,
                cron=extra.get("cron", cron),
                paused=extra.get("paused"),
                parameters={**defaults[name], **extra.get("parameters", {})},
                description=extra.get("description", description),
                tags=extra.get("tags", ["prefect-tensorflow"]),
                # The flows import their siblings relatively: load them as modules, not files.
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return out


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def wait_until_healthy(url: str, process: subprocess.Popen, log_path: str, timeout: float = 180) -> None:
    """Poll `url` until it answers 200.

    Raises:
        RuntimeError: `process` exited or `timeout` passed first; the message ends with the log's tail.
    """
    deadline = time.monotonic() + timeout
    while not _answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            with open(log_path, errors="replace") as handle:
                tail = handle.read()[-3000:]
            raise RuntimeError(f"{url} never answered (see {log_path}):\n{tail}")
        time.sleep(0.5)


def start_prefect_server(
    host: str, port: int, log_path: str, env: Optional[dict[str, str]] = None, timeout: float = 180
) -> subprocess.Popen:
    """`prefect server start` on `host:port` in its own process group, output to `log_path`; waits until healthy."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
    try:
        wait_until_healthy(f"http://{host}:{port}/api/health", process, log_path, timeout)
    except BaseException:
        stop_process_group(process)
        raise
    return process


def stop_process_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group of `process` (started with `start_new_session=True`), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


@contextmanager
def local_server(host: str = SERVER_HOST, port: int = SERVER_PORT, timeout: float = 180) -> Iterator[str]:
    """The configured Prefect API, or a `prefect server start` on `host:port` for as long as the block runs.

    Yields the API URL. A server this starts is stopped afterwards; one already
    answering on that address is used as it is.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    api_url = f"http://{host}:{port}/api"
    process = None
    if not _answers(f"{api_url}/health"):
        os.makedirs(data_home(), exist_ok=True)
        process = start_prefect_server(host, port, os.path.join(data_home(), "prefect-server.log"), timeout=timeout)
    os.environ["PREFECT_API_URL"] = api_url  # for the flow-run subprocesses too
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield api_url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        if process is not None:
            stop_process_group(process)


RUNNER_POLL_SECONDS = 2


def serve_deployments(overrides: Optional[dict[str, dict[str, Any]]] = None, limit: Optional[int] = None) -> None:
    """Start (if needed) a local Prefect server and serve both deployments until interrupted.

    The runner looks for new runs every 2 s (Prefect's default is 10 s: a run
    started with the UI's Run button would wait up to that long), unless
    `PREFECT_RUNNER_POLL_FREQUENCY` is set.
    """
    from prefect import serve
    from prefect.settings import PREFECT_RUNNER_POLL_FREQUENCY, temporary_settings

    from prefect_tensorflow.tasks.mlflow_connection import MlflowConnection

    with local_server() as api_url:
        MlflowConnection.register_type_and_schema()  # so the UI offers the block in the forms
        ui = api_url[: -len("/api")] if api_url.endswith("/api") else api_url
        print(f"Prefect UI: {ui}  (deployments: retrain/retrain-iris, export-checkpoint/export-checkpoint)")
        poll = {} if "PREFECT_RUNNER_POLL_FREQUENCY" in os.environ else {PREFECT_RUNNER_POLL_FREQUENCY: RUNNER_POLL_SECONDS}
        with temporary_settings(updates=poll):
            serve(*build_deployments(overrides), limit=limit)
