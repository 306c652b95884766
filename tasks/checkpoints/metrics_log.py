"""The metrics recorded at each checkpoint, kept beside the checkpoints.

`<model_dir>/checkpoint_metrics.jsonl` holds one JSON line per saved
checkpoint: `{"step": 1000, "checkpoint": "model.ckpt-1000", "time": ...,
"metrics": {"loss": 0.07, "accuracy": 0.97}}`. A line is appended before its
checkpoint is written, so every committed checkpoint has its line; an append
cut short by a crash leaves an unparseable last line, which readers skip.
Appending, unlike writing a file per checkpoint, adds no directory entries,
so it does not disturb the cheap "is the state file current" test in
`checkpoint_files.state_file_is_last_change`.

Example:
    >>> import tempfile
    >>> from prefect_tensorflow.tasks.checkpoints.metrics_log import append_metrics, read_metrics
    >>> d = tempfile.mkdtemp()
    >>> append_metrics(d, step=10, checkpoint="model.ckpt-10", metrics={"loss": 0.5})
    >>> read_metrics(d)[10]["loss"]
    0.5
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from typing import Optional

METRICS_FILE = "checkpoint_metrics.jsonl"


def append_metrics(model_dir: str | os.PathLike, *, step: int, checkpoint: str, metrics: Mapping[str, float]) -> None:
    """Record the metrics of the checkpoint about to be saved at `step`."""
    clean = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
    line = json.dumps(
        {"step": int(step), "checkpoint": checkpoint, "time": time.time(), "metrics": clean},
        sort_keys=True,
    )
    path = os.path.join(os.fspath(model_dir), METRICS_FILE)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _parse(line: bytes) -> Optional[tuple[int, dict[str, float]]]:
    try:
        record = json.loads(line)
        return int(record["step"]), {str(k): float(v) for k, v in dict(record["metrics"]).items()}
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a crash, or not ours


def metrics_at(model_dir: str | os.PathLike, step: Optional[int], *, chunk: int = 1 << 16) -> dict[str, float]:
    """The metrics recorded for `step`, reading the log backwards from its end.

    The newest checkpoint's line is the last one, so this costs one small read
    however long the log has grown; the last line for a step wins, as in
    `read_metrics`.
    """
    if step is None:
        return {}
    path = os.path.join(os.fspath(model_dir), METRICS_FILE)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return {}
    with handle:
        pos = handle.seek(0, os.SEEK_END)
        tail = b""
        while pos > 0:
            size = min(chunk, pos)
            pos -= size
            handle.seek(pos)
            lines = (handle.read(size) + tail).split(b"\n")
            tail = lines[0]  # may continue in the previous chunk
            for line in reversed(lines[1:]):
                parsed = _parse(line)
                if parsed and parsed[0] == step:
                    return parsed[1]
        parsed = _parse(tail)
        return parsed[1] if parsed and parsed[0] == step else {}


def read_metrics(model_dir: str | os.PathLike) -> dict[int, dict[str, float]]:
    """Metrics by step; when a step was recorded twice (a resumed run), the last line wins."""
    path = os.path.join(os.fspath(model_dir), METRICS_FILE)
    try:
        with open(path, "rb") as handle:
            return metrics_by_step(handle)
    except FileNotFoundError:
        return {}


def metrics_by_step(lines: Iterable[bytes]) -> dict[int, dict[str, float]]:
    """Metrics by step from the log's lines (a file, or an object's bytes split in lines); the last line wins."""
    by_step: dict[int, dict[str, float]] = {}
    for line in lines:
        parsed = _parse(line)
        if parsed:
            by_step[parsed[0]] = parsed[1]
    return by_step
