"""The process that sends a training run's metrics to MLflow, so training never pays for it.

`MetricBatcher` (in `tracking.py`) runs this file as a script, `python
metric_sender.py <run_id> <interval> <retries> <delay>`, and writes one metric
per line to its stdin (`key<TAB>value<TAB>step<TAB>ms`). It reads them from
the first instant (a thread drains stdin before MLflow is even imported, so
the writer never waits on a full pipe) and sends them with `log_batch`, up to
1,000 per request, every `interval` seconds and at end of input, retrying
failed requests `retries` times with doubling delays. With a SQL store
MLflow's client does the database work in Python: in the training process
that work would hold the GIL the training loop needs.

It is a standalone script on purpose: it imports MLflow and nothing of this
package (whose `__init__` imports Prefect), to start fast. Its connection
settings come from the environment the parent set up
(`MlflowConnection.activate`): the URIs, the token, MLflow's HTTP retries. It
exits 0 when everything was sent, 3 (the last error on stderr) when not.

Example:
    $ printf 'loss\\t0.5\\t1\\t1700000000000\\n' | python tasks/metric_sender.py RUN_ID 2 3 2
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch request


def _drain(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _send(client, run_id: str, chunk: list, retries: int, delay: float) -> None:
    from mlflow.entities import Metric

    metrics = [Metric(k, v, ts, s) for k, v, s, ts in chunk]
    for attempt in range(retries + 1):
        try:
            client.log_batch(run_id, metrics=metrics)
            return
        except Exception:  # noqa: BLE001 - retried, then reported by main()
            if attempt == retries:
                raise
            time.sleep(delay * 2**attempt)


def main(argv: list[str]) -> int:
    # Lowest CPU priority: importing MLflow and its store's work take seconds of CPU, which
    # must come from idle time, not from the training beside it (TensorFlow uses every core).
    os.nice(19)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_drain, args=(sys.stdin, lines), daemon=True).start()
    run_id, interval, retries, delay = argv[0], float(argv[1]), int(argv[2]), float(argv[3])
    try:
        from mlflow import MlflowClient

        client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI"))
        pending: list = []
        done = False
        next_send = time.monotonic() + interval
        while not done:
            try:
                line = lines.get(timeout=max(0.0, next_send - time.monotonic()))
                if line is None:
                    done = True
                elif line.strip():
                    key, value, step, timestamp = line.rstrip("\n").split("\t")
                    pending.append((key, float(value), int(step), int(timestamp)))
            except queue.Empty:
                pass
            if done or time.monotonic() >= next_send:
                while pending:
                    chunk, pending = pending[:MAX_BATCH], pending[MAX_BATCH:]
                    _send(client, run_id, chunk, retries, delay)
                next_send = time.monotonic() + interval
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
        print(f"{type(err).__name__}: {' '.join(str(err).split())[:800]}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    # Run as a script, its own directory (this package's modules: errors.py, policy.py, ...)
    # would come first on sys.path and shadow any top-level module of the same name.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    sys.exit(main(sys.argv[1:]))
