"""MLflow tracking of training runs and frozen graphs.

`TrainingRun` is one MLflow run per training: params (the whole
`TrainingConfig`, flattened), the training loss and the evaluation metrics
of every checkpoint, sent in batches by a separate process (`metric_sender`)
so that training never waits for the server nor shares its CPU time with
MLflow's client, and at the end the checkpoint list and the TensorBoard event
files as artifacts. Runs and model versions carry the Prefect flow run's id
and UI URL as tags (`prefect.*`). Every call goes through the connection's
own client (`MlflowConfig.client`): nothing process-wide changes.

Example:
    >>> from prefect_tensorflow.tasks.registry.tracking import flatten_params
    >>> flatten_params({"policy": {"keep_checkpoint_max": 5}, "seed": 0})
    {'policy.keep_checkpoint_max': '5', 'seed': '0'}
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any, Optional

from ..child_processes import start_process
from ..errors import FreezeError
from ..run_context import get_logger, prefect_run_tags
from ..storage.locations import parse_location, scratch_dir
from ..storage.stores import read_location_bytes
from .mlflow_connection import MlflowConfig

TAG_PREFIX = "prefect_tensorflow."
STOPPED_SEND_SECONDS = 2.0
"""Seconds a cancelled or timed-out training waits for its metric sender before stopping it."""


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys, values as strings (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=name + "."))
        else:
            flat[name] = "None" if value is None else (json.dumps(value) if isinstance(value, (list, dict)) else str(value))
    return flat


class MetricBatcher:
    """Queues metrics for `metric_sender`, a separate process that sends them in batches.

    `add` appends a tuple to a list: nothing else happens on the training
    thread. A writer thread hands what accumulated to the sender's stdin
    every `interval` seconds (if the pipe is full, that thread waits, not
    training); the sender does the `log_batch` calls, with MLflow's SQL or
    HTTP client work off the training process's GIL. The connection (secrets
    included) reaches the sender on its stdin, never in its arguments or
    environment. `close` waits until everything is sent and raises what could not be.
    """

    def __init__(self, connection: MlflowConfig, run_id: str, interval: float = 2.0):
        self._connection, self._run_id, self._interval = connection, run_id, interval
        self._errors = tempfile.TemporaryFile(mode="w+")
        self._process = start_process(  # ends at the end of its input: in this process's session
            [sys.executable, "-m", "prefect_tensorflow.tasks.training.metric_sender", run_id, str(interval)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=self._errors,
            text=True,
            new_session=False,
        )
        assert self._process.stdin is not None
        self._process.stdin.write(connection.to_secret_json() + "\n")
        self._process.stdin.flush()
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
            assert self._process.stdin is not None
            self._process.stdin.write(text)
            self._process.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):  # the sender died: close() says why
            pass

    def close(self, timeout: float = 900) -> None:
        """Wait until every queued metric is sent.

        Raises:
            MlflowUnavailableError: the metrics could not be sent after the retries.
        """
        self._stop.set()
        self._writer.join()
        try:
            assert self._process.stdin is not None
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
            from ..errors import MlflowUnavailableError

            raise MlflowUnavailableError(
                self._connection.server_label(),
                f"logging the metrics of run {self._run_id}",
                self._connection.operation_retries + 1,
                detail or f"the metric sender exited with status {code}",
            )


class TrainingRun:
    """One MLflow run around a training: see the module docstring.

    Use as a context manager; the run ends FINISHED, or FAILED when the block
    raises (KILLED when stopped from outside: Ctrl-C, a Prefect cancel or timeout).
    """

    def __init__(
        self,
        connection: MlflowConfig,
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
        self._client: Any = None
        self._batcher: Optional[MetricBatcher] = None

    def __enter__(self) -> TrainingRun:
        from mlflow.entities import Param

        self.experiment_id = self.connection.experiment_id()
        self._client = client = self.connection.client()
        tags = {**prefect_run_tags(), TAG_PREFIX + "stage": "train", TAG_PREFIX + "model_dir": self.model_dir}
        run = self.connection.retrying(
            "creating the training run", client.create_run, self.experiment_id, run_name=self.run_name, tags=tags
        )
        self.run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in sorted(self.params.items())]
        for start in range(0, len(params), 100):
            self.connection.retrying("logging params", client.log_batch, self.run_id, params=params[start : start + 100])
        self._batcher = MetricBatcher(self.connection, self.run_id, interval=self.metric_interval)
        get_logger().info("MLflow run %s: %s", self.run_id, self.url)
        return self

    @property
    def url(self) -> str:
        return self.connection.run_url(self.experiment_id or "0", self.run_id or "")

    def log_metric(self, key: str, value: float, step: int) -> None:
        """Queue one metric value; sent in the next batch."""
        assert self._batcher is not None
        self._batcher.add(key, value, step)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.log_metric(key, value, step)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # KILLED when stopped from outside (Ctrl-C, a Prefect cancel or timeout: not an `Exception`), FAILED on an error.
        status = "FINISHED" if exc_type is None else ("FAILED" if issubclass(exc_type, Exception) else "KILLED")
        try:
            if self._batcher is not None:
                if status == "KILLED":
                    self._close_stopped_batcher()
                else:
                    self._batcher.close()
            if exc_type is None:
                log_checkpoint_artifacts(self.connection, self._client, self.run_id or "", self.model_dir)
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self.connection.retrying("ending the training run", self._client.set_terminated, self.run_id, status)

    def _close_stopped_batcher(self) -> None:
        """A stopped run (a cancel must end within seconds) gives its metric sender `STOPPED_SEND_SECONDS` to
        send what is queued (it runs at the lowest CPU priority); what is left then is not sent, and said so."""
        from ..errors import MlflowUnavailableError

        assert self._batcher is not None
        try:
            self._batcher.close(timeout=STOPPED_SEND_SECONDS)
        except MlflowUnavailableError as err:
            get_logger().warning("run %s stopped: its last metrics were not all sent to MLflow (%s)", self.run_id, err)


def log_checkpoint_artifacts(connection: MlflowConfig, client: Any, run_id: str, model_dir: str) -> None:
    """The checkpoint list (`checkpoints/checkpoints.json`) and the event files (`tensorboard/`).

    An event file or `graph.pbtxt` that leads out of the model dir through a symlink (of its own or of
    a directory on the way) is not uploaded: it is skipped with a warning.
    """
    from ..checkpoints.files import is_inside
    from ..checkpoints.selection import list_checkpoints

    def inside(path: str) -> bool:
        if is_inside(path, model_dir):
            return True
        get_logger().warning(
            "%s leads outside the model dir %s (-> %s); not logged to MLflow", path, model_dir, os.path.realpath(path)
        )
        return False

    rows = [info.model_dump() for info in list_checkpoints(model_dir)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoints.json")
        with open(path, "w") as handle:
            json.dump(rows, handle, indent=2, default=str)
        connection.retrying("logging the checkpoint list", client.log_artifact, run_id, path, "checkpoints")
    for event_file in sorted(glob.glob(os.path.join(model_dir, "**", "events.out.tfevents.*"), recursive=True)):
        if not inside(event_file):
            continue
        sub = os.path.relpath(os.path.dirname(event_file), model_dir)
        target = "tensorboard" if sub == "." else f"tensorboard/{sub}"
        connection.retrying("logging event files", client.log_artifact, run_id, event_file, target)
    graph = os.path.join(model_dir, "graph.pbtxt")
    if os.path.exists(graph) and inside(graph):
        connection.retrying("logging graph.pbtxt", client.log_artifact, run_id, graph, "tensorboard")


def log_frozen_graph_to_mlflow(connection: MlflowConfig, run_id: Optional[str], frozen: Any, run_name: str = "freeze") -> str:
    """Log a frozen graph to an MLflow run: the `.pb` under `frozen_graph/`, its tensor names, digest and parity.

    Args:
        connection: the MLflow connection.
        run_id: the run to log to (e.g. the training run); a new run named `run_name` when None.
        frozen: the `freeze_graph` result (`FreezeResult`).
        run_name: the name of the new run, when one is created.

    Returns:
        The run id.

    Raises:
        MlflowUnavailableError: the server still failed after the retries.

    Example:
        >>> from prefect import flow
        >>> from prefect_tensorflow.tasks import MlflowConnection, log_frozen_graph_to_mlflow
        >>> @flow
        ... def ship(frozen, run_id: str) -> str:
        ...     return log_frozen_graph_to_mlflow(MlflowConnection(), run_id, frozen)
    """
    client = connection.client()
    if run_id is None:
        experiment_id = connection.experiment_id()
        tags = {**prefect_run_tags(), TAG_PREFIX + "stage": "export"}
        run_id = connection.retrying("creating a run", client.create_run, experiment_id, run_name=run_name, tags=tags).info.run_id

    data = read_location_bytes(parse_location(frozen.path, parameter="frozen_graph"))
    if "sha256:" + hashlib.sha256(data).hexdigest() != frozen.digest:
        raise FreezeError(f"{frozen.path} changed since it was frozen and verified ({frozen.digest}); nothing was logged")

    def log() -> None:
        with tempfile.TemporaryDirectory(dir=scratch_dir()) as tmp:
            local = os.path.join(tmp, os.path.basename(frozen.path))
            with open(local, "wb") as handle:  # the verified bytes, wherever the graph is stored
                handle.write(data)
            client.log_artifact(run_id, local, "frozen_graph")
        client.log_dict(run_id, frozen.model_dump(mode="json"), "frozen_graph/frozen_graph.json")
        client.set_tag(run_id, TAG_PREFIX + "frozen_graph.sha256", frozen.digest)

    connection.retrying("logging the frozen graph", log)
    return run_id
