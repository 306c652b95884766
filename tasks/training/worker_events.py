"""The multi-worker caller's side of the supervisor's event stream: callbacks, MLflow metrics, log lines.

The chief appends its events to `RUN_DIR/events.jsonl` (`worker.WorkerReporter`),
the supervisor forwards them and its own on its stdout, one JSON object a line;
`WorkerEvents.handle` turns each into what a one-process training does at that
point: progress and checkpoint callbacks, MLflow metrics, the sidecar evaluator
told of a committed checkpoint, log lines.

Example:
    >>> from prefect_tensorflow.tasks.training.worker_events import WorkerEvents
    >>> seen = []
    >>> events = WorkerEvents(lambda step, target, loss: seen.append((step, target, loss)), None)
    >>> events.handle({"event": "progress", "step": 5, "target": 10, "loss": 0.5})
    >>> seen
    [(5, 10, 0.5)]
"""

from __future__ import annotations

from typing import Any, Optional

from ..run_context import get_logger
from .results import CheckpointCallback, ProgressCallback, checkpoint_metric_names
from .summaries import format_metrics


class WorkerEvents:
    """The supervisor's events, in the caller's process: callbacks, MLflow metrics, log lines."""

    def __init__(self, on_progress: Optional[ProgressCallback], on_checkpoint: Optional[CheckpointCallback]):
        self.on_progress, self.on_checkpoint = on_progress, on_checkpoint
        self.run: Any = None
        self.evaluator: Any = None
        self.checkpoints: list[str] = []
        self.steps: list[int] = []
        self.metrics: dict[str, float] = {}
        self.result: Optional[dict[str, Any]] = None
        self.failures: list[str] = []

    def handle(self, event: dict[str, Any]) -> None:
        """Act on one event of the supervisor's stream."""
        kind = event.get("event")
        log = get_logger()
        if kind == "progress":
            loss = event.get("loss")
            if loss is not None and self.run is not None:
                self.run.log_metric("loss", loss, event["step"])
            if self.on_progress is not None:
                self.on_progress(event["step"], event["target"], loss)
        elif kind == "checkpoint":
            metrics = dict(event.get("metrics") or {})
            self.checkpoints.append(event["path"])
            self.steps.append(event["step"])
            self.metrics = metrics
            if self.evaluator is not None:
                self.evaluator.notify(event["step"], metrics.get("train_loss"))
            log.info("saved checkpoint %s (%s)", event["path"], format_metrics(metrics) or "evaluation to follow")
            if self.run is not None:
                self.run.log_metrics(checkpoint_metric_names(metrics), event["step"])
            if self.on_checkpoint is not None:
                self.on_checkpoint(event["step"], event["path"], metrics)
        elif kind == "network":
            if event.get("isolated"):
                log.info("multi-worker: TensorFlow's gRPC servers run in a private network namespace (%s)", event.get("how"))
            else:
                log.warning(
                    "multi-worker: TensorFlow's gRPC servers listen on ALL interfaces of this host (ports chosen per "
                    "attempt; %s). Run as root or allow user namespaces to confine them, or firewall this host",
                    event.get("how"),
                )
        elif kind == "attempt":
            log.info(
                "multi-worker attempt %d: %d workers on 127.0.0.1 ports %s (pids %s)",
                event["attempt"],
                len(event["ports"]),
                event["ports"],
                event["pids"],
            )
        elif kind == "failure":
            self.failures.append(event.get("reason", "unknown"))
            log.warning("multi-worker attempt %d failed: %s", event.get("attempt", -1), event.get("reason"))
        elif kind == "result":
            self.result = event
