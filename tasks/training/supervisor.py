"""The multi-worker supervisor process: starts the workers, watches them, restarts them all after a failure.

Started by the caller (`multi_worker.train_multi_worker`) as
`python -m prefect_tensorflow.tasks.training.multi_worker_main supervise RUN_DIR`,
it dies with the caller, moves itself into a private network namespace when
it can (`network_isolation`), starts N workers with a `TF_CONFIG` on
127.0.0.1, forwards the chief's events (`RUN_DIR/events.jsonl`) to its stdout
as JSON lines, watches the workers' exit codes and heartbeats, tears all of
them down when one fails or training stalls and starts them again (fresh
ports), up to `max_restarts` times. Each attempt's workers get a `$TMPDIR` of
their own inside RUN_DIR (`attempt<N>-tmp-*`, where the non-chief workers'
throwaway checkpoint dirs go), removed when the attempt ends, whatever the
workers' end.

Example:
    >>> from prefect_tensorflow.tasks.training.supervisor import last_lines
    >>> last_lines("/nonexistent/worker.log")
    '(empty)'
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

from ..child_processes import (
    EXIT_PARENT_GONE,
    die_with_parent,
    free_ports,
    log_tail,
    read_json,
    signal_group,
    start_process,
    stop_process_group,
)
from .multi_worker_settings import (
    ENTRY_MODULE,
    ENV_PARENT,
    ENV_SUPERVISOR,
    EXIT_FATAL,
    EXIT_PORT_IN_USE,
    MultiWorkerError,
    MultiWorkerOptions,
    worker_threads,
)
from .network_isolation import isolate_network

PORT_RETRIES = 5
POLL_SECONDS = 0.2


def _emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event, sort_keys=True) + "\n")
    sys.stdout.flush()


class _EventTail:
    """Forwards the chief's new complete lines of `events.jsonl` to the supervisor's stdout."""

    def __init__(self, path: str):
        self.path, self.offset = path, 0

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        self.offset += end + 1
        for line in data[: end + 1].splitlines():
            if line.strip():
                sys.stdout.write(line.decode("utf-8", "replace") + "\n")
        sys.stdout.flush()


def supervise(run_dir: str) -> int:
    """The supervisor process's main: attempts until one succeeds or `max_restarts` is spent; 0 on success."""
    die_with_parent(ENV_PARENT)
    spec = read_json(os.path.join(run_dir, "spec.json"))
    if not spec:
        print(f"no spec in {run_dir}", file=sys.stderr)
        return 2
    options = MultiWorkerOptions.model_validate(spec["options"])
    workers = int(spec["config"]["workers"])
    try:
        isolated, how = isolate_network(options.isolate_network)
    except MultiWorkerError as err:
        _emit(event="failure", attempt=-1, reason=str(err))
        return 1
    _emit(event="network", isolated=isolated, how=how)
    events = _EventTail(os.path.join(run_dir, "events.jsonl"))
    backoff = options.restart_backoff
    for attempt in range(options.max_restarts + 1):
        status, reason = "ports", ""
        for _ in range(PORT_RETRIES):
            status, reason = _attempt(run_dir, spec, options, workers, attempt, events)
            if status != "ports":
                break
        events.pump()
        if status == "ok":
            result = read_json(os.path.join(run_dir, "result.json")) or {}
            _emit(event="result", **result)
            return 0
        _emit(event="failure", attempt=attempt, reason=reason)
        if status == "fatal":
            return 1
        if attempt < options.max_restarts:
            time.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
    return 1


def _attempt(
    run_dir: str, spec: dict[str, Any], options: MultiWorkerOptions, workers: int, attempt: int, events: _EventTail
) -> tuple[str, str]:
    """One attempt: start the workers, watch them; ("ok" | "failed" | "fatal" | "ports", why)."""
    for name in os.listdir(run_dir):
        if name.startswith("heartbeat-") or name == "result.json":
            os.unlink(os.path.join(run_dir, name))
    ports = free_ports(workers)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    threads = worker_threads(workers, options.threads_per_worker)
    # The workers' $TMPDIR (their throwaway checkpoint dirs, anything TensorFlow writes there):
    # this attempt's own, removed below however the workers ended, even by SIGKILL.
    scratch = tempfile.mkdtemp(prefix=f"attempt{attempt}-tmp-", dir=run_dir)
    processes = []
    logs = []
    for index in range(workers):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        log_path = os.path.join(run_dir, f"attempt{attempt}-worker{index}.log")
        logs.append(log_path)
        processes.append(
            start_process(
                [sys.executable, "-m", ENTRY_MODULE, "worker", run_dir, str(index)],
                log_path=log_path,
                env={**os.environ, "TF_CONFIG": tf_config, "TMPDIR": scratch},
                parent_variable=ENV_SUPERVISOR,
                threads=threads,
            )
        )
    _emit(event="attempt", attempt=attempt, ports=ports, pids=[p.pid for p in processes])
    try:
        return _watch(run_dir, processes, logs, options, events)
    finally:
        for process in processes:  # all at once, then wait for each
            if process.poll() is None:
                signal_group(process, signal.SIGTERM)
        for process in processes:
            stop_process_group(process, grace=options.grace_seconds)
        shutil.rmtree(scratch, ignore_errors=True)


def _watch(
    run_dir: str, processes: list[subprocess.Popen], logs: list[str], options: MultiWorkerOptions, events: _EventTail
) -> tuple[str, str]:
    last_steps: Optional[list[int]] = None
    last_change = time.monotonic()
    result_path = os.path.join(run_dir, "result.json")
    while True:
        events.pump()
        codes = [p.poll() for p in processes]
        if os.path.exists(result_path) and codes[0] == 0:
            # The chief saved the final checkpoint and exited: a peer that dies now (its
            # coordination service gone) changes nothing; give them a moment, then stop them.
            deadline = time.monotonic() + options.grace_seconds
            while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
            return "ok", ""
        bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if bad:
            if any(c == EXIT_PORT_IN_USE for _, c in bad):
                return "ports", "a gRPC port was taken before TensorFlow bound it"
            index, code = next(((i, c) for i, c in bad if c == EXIT_FATAL), bad[0])
            if code == EXIT_FATAL:
                return "fatal", f"worker {index}: {last_lines(logs[index], 1)}"
            what = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
            if code == EXIT_PARENT_GONE:
                what += " (its supervisor was gone)"
            return "failed", f"worker {index} {what}; log tail: {last_lines(logs[index])}"
        if all(c == 0 for c in codes):
            return "failed", "every worker exited 0 but the chief wrote no result"
        steps = [(read_json(os.path.join(run_dir, f"heartbeat-{i}.json")) or {}).get("step", -1) for i in range(len(processes))]
        if steps != last_steps:
            last_steps, last_change = steps, time.monotonic()
        elif time.monotonic() - last_change > options.stall_timeout:
            return "failed", f"no worker made progress for {options.stall_timeout:.0f} s (steps {steps})"
        time.sleep(POLL_SECONDS)


def last_lines(path: str, count: int = 6) -> str:
    lines = [line for line in log_tail(path, 4000).splitlines() if line.strip()]
    return " | ".join(lines[-count:]) or "(empty)"
