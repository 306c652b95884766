"""MLflow tracking of training runs and frozen graphs.

`TrainingRun` is one MLflow run per training: params (checkpoint policy, import
strings, hyperparameters, seed, counts), the training loss at every step and
the evaluation metrics of every checkpoint, sent in batches by a separate
process (`metric_sender`) so that training never waits for the server nor
shares its CPU time with MLflow's client, and at the end the
checkpoint list and the TensorBoard event files as artifacts. Runs and model
versions carry the Prefect flow run's id and UI URL as tags (`prefect.*`).

Example:
    >>> from prefect_tensorflow.tasks.mlflow_connection import MlflowConnection
    >>> from prefect_tensorflow.tasks.tracking import TrainingRun
    >>> with TrainingRun(MlflowConnection(), model_dir="/tmp/iris", params={"seed": 0}) as run:  # doctest: +SKIP
    ...     run.log_metric("loss", 0.5, step=1)
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import time
from typing import Any, Mapping, Optional

from prefect import task

from .logs import get_logger
from .mlflow_connection import MlflowConnection

TAG_PREFIX = "prefect_tensorflow."


def prefect_tags() -> dict[str, str]:
    """`prefect.flow_run_id`, `prefect.flow_run_url`, ... of the current Prefect run; {} outside one."""
    try:
        from prefect.runtime import deployment, flow_run, task_run
    except Exception:  # noqa: BLE001 - Prefect not importable
        return {}
    values = {
        "prefect.flow_run_id": flow_run.id,
        "prefect.flow_run_name": flow_run.name,
        "prefect.flow_name": flow_run.flow_name,
        "prefect.flow_run_url": flow_run.ui_url,
        "prefect.task_run_id": task_run.id,
        "prefect.deployment_id": deployment.id,
        "prefect.deployment_name": deployment.name,
    }
    return {key: str(value) for key, value in values.items() if value}


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys, values as strings (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=name + "."))
        else:
            flat[name] = "None" if value is None else str(value)
    return flat


class MetricBatcher:
    """Queues metrics for `metric_sender.py`, a separate process that sends them in batches.

    `add` appends a tuple to a list: nothing else happens on the training
    thread. A writer thread hands what accumulated to the sender's stdin
    every `interval` seconds (if the pipe is full, that thread waits, not
    training); the sender does the `log_batch` calls, with MLflow's SQL or
    HTTP client work off the training process's GIL. `close` waits until
    everything is sent and raises what could not be.
    """

    def __init__(self, connection: MlflowConnection, run_id: str, interval: float = 2.0):
        import subprocess
        import sys
        import threading

        self._connection, self._run_id, self._interval = connection, run_id, interval
        self._errors = tempfile.TemporaryFile(mode="w+")
        sender = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metric_sender.py")
        # Started inside connection.activate(): it inherits the URIs, the token and the HTTP retries.
        self._process = subprocess.Popen(
            [sys.executable, sender, run_id, str(interval), str(connection.operation_retries),
             str(connection.operation_retry_delay)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._errors, text=True,
        )
        self._pending: list = []
        self._stop = threading.Event()
        self.queued = 0
        self._writer = threading.Thread(target=self._write_loop, name="mlflow-metrics-writer", daemon=True)
        self._writer.start()

    def add(self, key: str, value: float, step: int) -> None:
        self._pending.append((key, value, step, time.time()))
        self.queued += 1

    def _write_loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._write()
        self._write()

    def _write(self) -> None:
        # Swapping the list is atomic under the GIL: `add` never waits for a lock.
        pending, self._pending = self._pending, []
        if not pending:
            return
        text = "".join(f"{k}\t{float(v)!r}\t{int(s)}\t{int(t * 1000)}\n" for k, v, s, t in pending)
        try:
            self._process.stdin.write(text)
            self._process.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):  # the sender died: close() says why
            pass

    def close(self, timeout: float = 900) -> None:
        """Wait until every queued metric is sent.

        Raises:
            MlflowUnavailableError: the metrics could not be sent after the retries.
        """
        import subprocess

        self._stop.set()
        self._writer.join()
        try:
            self._process.stdin.close()
        except (BrokenPipeError, ValueError, OSError):
            pass
        try:
            code = self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            code = self._process.wait()
        self._errors.seek(0)
        detail = " ".join(self._errors.read().split())[-1000:]
        self._errors.close()
        if code != 0:
            from .errors import MlflowUnavailableError

            raise MlflowUnavailableError(
                self._connection.server_label(), f"logging the metrics of run {self._run_id}",
                self._connection.operation_retries + 1, detail or f"the metric sender exited with status {code}",
            )


class TrainingRun:
    """One MLflow run around a training: see the module docstring.

    Use as a context manager; the run ends FINISHED, or FAILED when the
    block raises. Inside, the connection is active (`MlflowConnection.activate`).
    """

    def __init__(
        self,
        connection: MlflowConnection,
        *,
        model_dir: str,
        params: Mapping[str, Any],
        run_name: Optional[str] = None,
        metric_interval: float = 2.0,
    ):
        self.connection = connection
        self.model_dir = model_dir
        self.params = flatten_params(params)
        self.run_name = run_name or f"train-{os.path.basename(os.path.normpath(model_dir))}"
        self.metric_interval = metric_interval
        self.run_id: Optional[str] = None
        self.experiment_id: Optional[str] = None
        self._batcher: Optional[MetricBatcher] = None
        self._activation = None

    def __enter__(self) -> "TrainingRun":
        self.experiment_id = self.connection.experiment_id()
        self._activation = self.connection.activate()
        self._activation.__enter__()
        try:
            client = self.connection.client()
            tags = {**prefect_tags(), TAG_PREFIX + "stage": "train", TAG_PREFIX + "model_dir": self.model_dir}
            run = self.connection.retrying(
                "creating the training run", client.create_run, self.experiment_id, run_name=self.run_name, tags=tags
            )
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, v[:6000]) for k, v in sorted(self.params.items())]
            for start in range(0, len(params), 100):
                self.connection.retrying(
                    "logging params", client.log_batch, self.run_id, params=params[start : start + 100]
                )
            self._batcher = MetricBatcher(self.connection, self.run_id, interval=self.metric_interval)
            get_logger().info("MLflow run %s: %s", self.run_id, self.url)
        except BaseException:
            self._activation.__exit__(None, None, None)
            raise
        return self

    @property
    def url(self) -> str:
        return self.connection.run_url(self.experiment_id or "0", self.run_id or "")

    def log_metric(self, key: str, value: float, step: int) -> None:
        """Queue one metric value; sent in the next batch."""
        self._batcher.add(key, value, step)

    def log_metrics(self, metrics: Mapping[str, float], step: int, prefix: str = "") -> None:
        for key, value in metrics.items():
            self._batcher.add(prefix + key, value, step)

    def __exit__(self, exc_type, exc, tb) -> None:
        client = self.connection.client()
        status = "FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED")
        try:
            if self._batcher is not None:
                self._batcher.close()
            if exc_type is None:
                log_checkpoint_artifacts(self.connection, self.run_id, self.model_dir)
        except BaseException:
            status = "FAILED"
            raise
        finally:
            try:
                self.connection.retrying("ending the training run", client.set_terminated, self.run_id, status)
            finally:
                self._activation.__exit__(exc_type, exc, tb)


def log_checkpoint_artifacts(connection: MlflowConnection, run_id: str, model_dir: str) -> None:
    """The checkpoint list (`checkpoints/checkpoints.json`) and the event files (`tensorboard/`)."""
    from .selection import list_checkpoints

    client = connection.client()
    rows = [info.model_dump() for info in list_checkpoints(model_dir)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoints.json")
        with open(path, "w") as handle:
            json.dump(rows, handle, indent=2, default=str)
        connection.retrying("logging the checkpoint list", client.log_artifact, run_id, path, "checkpoints")
    for event_file in sorted(glob.glob(os.path.join(model_dir, "**", "events.out.tfevents.*"), recursive=True)):
        sub = os.path.relpath(os.path.dirname(event_file), model_dir)
        target = "tensorboard" if sub == "." else f"tensorboard/{sub}"
        connection.retrying("logging event files", client.log_artifact, run_id, event_file, target)
    graph = os.path.join(model_dir, "graph.pbtxt")
    if os.path.exists(graph):
        connection.retrying("logging graph.pbtxt", client.log_artifact, run_id, graph, "tensorboard")


def log_frozen_graph(connection: MlflowConnection, run_id: str, frozen) -> None:
    """The frozen `.pb` under `frozen_graph/`, with its tensor names, digest and parity beside it.

    Args:
        frozen: a `FreezeResult`.
    """
    client = connection.client()

    def log() -> None:
        client.log_artifact(run_id, frozen.path, "frozen_graph")
        client.log_dict(run_id, frozen.model_dump(mode="json"), "frozen_graph/frozen_graph.json")
        client.set_tag(run_id, TAG_PREFIX + "frozen_graph.sha256", frozen.digest)

    connection.call("logging the frozen graph", log)


@task(name="log-frozen-graph-to-mlflow")
def log_frozen_graph_to_mlflow(connection: MlflowConnection, run_id: Optional[str], frozen) -> Optional[str]:
    """Log a frozen graph (`FreezeResult`) to an MLflow run: the `.pb`, tensor names, digest, parity.

    Args:
        connection: the MLflow connection.
        run_id: the run to log to (e.g. the training run); a new run when None.
        frozen: the `freeze_graph` result.

    Returns:
        The run id.

    Example:
        >>> from prefect import flow
        >>> @flow
        ... def ship(frozen, run_id: str) -> None:
        ...     log_frozen_graph_to_mlflow(MlflowConnection(), run_id, frozen)
    """
    if run_id is None:
        experiment_id = connection.experiment_id()
        tags = {**prefect_tags(), TAG_PREFIX + "stage": "freeze"}
        run_id = connection.call(
            "creating a run", lambda: connection.client().create_run(experiment_id, run_name="freeze", tags=tags)
        ).info.run_id
    log_frozen_graph(connection, run_id, frozen)
    return run_id
