"""The process that sends a training run's metrics to MLflow, so training never pays for it.

`MetricBatcher` (in `tracking.py`) runs `python -m
prefect_tensorflow.tasks.training.metric_sender <run_id> <interval>` and writes the
connection (`MlflowConfig.to_secret_json()`, one line) then one metric per
line to its stdin (`key<TAB>value<TAB>step<TAB>ms`). The sender reads them
from the first instant (a thread drains stdin before MLflow is even imported,
so the writer never waits on a full pipe) and sends them with `log_batch`, up
to 1,000 per request, every `interval` seconds and at end of input, through
the connection's own client and its operation retries. With a SQL store
MLflow's client does the database work in Python: in the training process
that work would hold the GIL the training loop needs. It runs at the lowest
CPU priority. It exits 0 when everything was sent, 3 (the last error on
stderr) when not.

Example:
    >>> from prefect_tensorflow.tasks.training.metric_sender import parse_metric
    >>> parse_metric("loss\\t0.5\\t10\\t1700000000000\\n")
    ('loss', 0.5, 10, 1700000000000)
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch request


def parse_metric(line: str) -> tuple[str, float, int, int]:
    key, value, step, timestamp = line.rstrip("\n").split("\t")
    return key, float(value), int(step), int(timestamp)


def _drain(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def main(argv: list[str]) -> int:
    # Lowest CPU priority: importing MLflow and its store's work take seconds of CPU, which
    # must come from idle time, not from the training beside it (TensorFlow uses every core).
    os.nice(19)
    run_id, interval = argv[0], float(argv[1])
    connection_line = sys.stdin.readline()
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_drain, args=(sys.stdin, lines), daemon=True).start()
    try:
        from mlflow.entities import Metric

        from ..registry.mlflow_connection import MlflowConfig

        connection = MlflowConfig.model_validate_json(connection_line)
        client = connection.client()
        pending: list = []
        done = False
        next_send = time.monotonic() + interval
        while not done:
            try:
                line = lines.get(timeout=max(0.0, next_send - time.monotonic()))
                if line is None:
                    done = True
                elif line.strip():
                    pending.append(parse_metric(line))
            except queue.Empty:
                pass
            if done or time.monotonic() >= next_send:
                while pending:
                    chunk, pending = pending[:MAX_BATCH], pending[MAX_BATCH:]
                    metrics = [Metric(k, v, ts, s) for k, v, s, ts in chunk]
                    connection.retrying("logging metrics", client.log_batch, run_id, metrics=metrics)
                next_send = time.monotonic() + interval
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
        print(f"{type(err).__name__}: {' '.join(str(err).split())[:800]}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
