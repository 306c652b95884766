"""The process that sends a training run's metrics to MLflow, so training never pays for it.

`MetricBatcher` (in `tracking.py`) starts `python -m
prefect_tensorflow.tasks.metric_sender <run_id> <interval> <retries> <delay>`
and writes one metric per line to its stdin (`key<TAB>value<TAB>step<TAB>ms`).
This process reads them and sends them with `log_batch` (up to 1,000 per
request) every `interval` seconds and at end of input, retrying transient
faults like `MlflowConnection.retrying`. With a SQL store MLflow's client
does the database work in Python; in the training process that work would
hold the GIL the training loop needs.

Its connection settings come from the environment the parent set up
(`MlflowConnection.activate`): the URIs, the token, MLflow's HTTP retries.
It exits 0 when everything was sent, 3 (with the error on stderr) when not.

Example:
    $ printf 'loss\\t0.5\\t1\\t1700000000000\\n' | python -m prefect_tensorflow.tasks.metric_sender RUN_ID 2 3 2
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch request


def _parse(line: str):
    key, value, step, timestamp = line.rstrip("\n").split("\t")
    return key, float(value), int(step), int(timestamp)


def main(argv: list[str]) -> int:
    run_id, interval, retries, delay = argv[0], float(argv[1]), int(argv[2]), float(argv[3])
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from .errors import MlflowUnavailableError
    from .mlflow_connection import MlflowConnection

    connection = MlflowConnection(
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"), operation_retries=retries, operation_retry_delay=delay
    )
    client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI"))
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in sys.stdin:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    pending: list = []
    done = False
    next_send = time.monotonic() + interval
    try:
        while not done:
            try:
                line = lines.get(timeout=max(0.0, next_send - time.monotonic()))
                if line is None:
                    done = True
                elif line.strip():
                    pending.append(_parse(line))
            except queue.Empty:
                pass
            if done or time.monotonic() >= next_send or len(pending) >= 10 * MAX_BATCH:
                while pending:
                    chunk, pending = pending[:MAX_BATCH], pending[MAX_BATCH:]
                    metrics = [Metric(k, v, ts, s) for k, v, s, ts in chunk]
                    connection.retrying("logging metrics", client.log_batch, run_id, metrics=metrics)
                next_send = time.monotonic() + interval
    except MlflowUnavailableError as err:
        print(str(err), file=sys.stderr)
        return 3
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
