"""Multi-worker training (`TrainingConfig.workers > 1`): one model, N TensorFlow processes, MultiWorkerMirroredStrategy.

`train_with_checkpoints(model_dir, TrainingConfig(workers=N))` comes here.
Three kinds of process take part, all on this host:

- the caller (a Prefect task, the CLI, a library call) runs `train_multi_worker`:
  it checks the settings, resolves the model code to import strings (trust is
  decided here, where the Prefect run context is), opens the MLflow run,
  starts the supervisor and turns its events into progress, checkpoint
  callbacks and MLflow metrics;
- the supervisor (`python -m prefect_tensorflow.tasks.training.multi_worker supervise`)
  moves itself into a private network namespace when it can (see below),
  starts N workers with a `TF_CONFIG` on 127.0.0.1, watches their exit codes
  and progress, tears all of them down when one fails or training stalls and
  starts them again (fresh ports), up to `max_restarts` times;
- each worker (`... worker`) runs a custom training loop (Keras 3's `fit`
  does not support this strategy) under `MultiWorkerMirroredStrategy`.

Checkpoints follow TensorFlow's multi-worker guide: every worker saves (a save
may run collectives), worker 0 (the chief) into the model dir, the others into
a temporary directory removed after each save. The model dir has the layout of
a single-process training (the `checkpoint` state file, `model.ckpt-<step>`,
`checkpoint_metrics.jsonl` with each checkpoint's evaluation metrics,
TensorBoard event files, `graph.pbtxt`), plus `.ptf-multi-worker.json`, so
selection, freezing and export work on it as on any model dir. Evaluation
follows `TrainingConfig.evaluation`: `sidecar` (the default) is the same
sidecar evaluator process as a single-process training, started by the
caller; `in_loop` is done by the chief on a plain copy of the model, outside
the collectives. Every (re)start restores the chief's newest valid checkpoint.

The input position is not in the checkpoint (a distributed iterator cannot be
checkpointed): the seeded global-batch stream of the single-process pipeline
is rebuilt and `skip(global_step)` batches are dropped, each worker taking its
`batch_size / N` share of every global batch. So a killed and resumed run ends
bit-identical to an uninterrupted run with the same number of workers; with a
different number of workers (or against a single process) the weights differ
by float summation order only. A model dir moves freely between modes: N
workers read a single-process checkpoint's iterator state (strict keys) and
replace it by the skip; one process resuming a multi-worker checkpoint (no
iterator state) positions its input by the same skip.

TensorFlow's gRPC server listens on all interfaces (`0.0.0.0:<port>`,
hard-coded, whatever `TF_CONFIG` says). With `isolate_network="auto"` the
supervisor enters a new network namespace holding only loopback (root or
CAP_SYS_ADMIN, else an unprivileged user namespace), so the workers' ports
are unreachable from outside and invisible to the host; when neither is
allowed it says so and goes on (`"require"` refuses instead).

Example:
    >>> from prefect_tensorflow.tasks.training.multi_worker import MultiWorkerOptions, check_config
    >>> from prefect_tensorflow.tasks.configs import TrainingConfig
    >>> MultiWorkerOptions().max_restarts
    3
    >>> check_config(TrainingConfig(workers=3, batch_size=32))
    Traceback (most recent call last):
    ...
    prefect_tensorflow.tasks.training.multi_worker.MultiWorkerError: batch_size: 32 is not divisible by workers=3; each worker takes batch_size / workers examples of every batch
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from .. import model_code
from ..child_processes import EXIT_PARENT_GONE, child_env, die_with_parent, read_json, stop_group, tail, write_json_atomically
from ..configs import TrainingConfig
from ..errors import NoValidCheckpointError, PrefectTensorFlowError, TrainingError
from ..registry.mlflow_connection import MlflowConfig
from ..run_context import get_logger
from ..storage.locations import parse_location

MARKER = ".ptf-multi-worker.json"
"""In a model dir trained by several workers: how its input position is kept."""
EXIT_PORT_IN_USE = 73
"""A worker's exit status when its gRPC server could not bind its port (retried with fresh ports)."""
EXIT_FATAL = 65
"""A worker's exit status after an error a restart cannot cure (bad model code, a mismatched checkpoint)."""
MODULE = "prefect_tensorflow.tasks.training.multi_worker"
ENV_PARENT = "PREFECT_TENSORFLOW_MW_PARENT"
ENV_SUPERVISOR = "PREFECT_TENSORFLOW_MW_SUPERVISOR"
PORT_RETRIES = 5
POLL_SECONDS = 0.2
HEARTBEAT_SECONDS = 1.0


class MultiWorkerError(TrainingError):
    """Multi-worker training cannot start (a setting at fault) or failed on every attempt."""


class MultiWorkerOptions(BaseModel):
    """How the supervisor runs the workers (the training itself is the `TrainingConfig`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_restarts: int = Field(default=3, ge=0, le=100, description="Restarts of all workers after a failure or a stall")
    stall_timeout: float = Field(
        default=600.0, gt=0, description="Seconds without a step by any worker (start-up included) before a restart"
    )
    collective_timeout: float = Field(
        default=300.0,
        ge=0,
        description="Seconds a collective (all-reduce) may wait for a peer; 0 waits forever. Above the slowest step and evaluation",
    )
    isolate_network: Literal["auto", "require", "off"] = Field(
        default="auto", description="Run the workers in a private network namespace: when possible, always, never"
    )
    threads_per_worker: int = Field(
        default=0, ge=0, le=256, description="TensorFlow threads per pool and worker; 0: cores / workers"
    )
    grace_seconds: float = Field(default=5.0, ge=0, description="Seconds between SIGTERM and SIGKILL when tearing workers down")
    restart_backoff: float = Field(default=1.0, ge=0, description="Seconds before the first restart; doubles, at most 30")


def check_config(config: TrainingConfig) -> None:
    """Refuse settings a multi-worker training cannot honour, naming the field.

    Raises:
        MultiWorkerError: `batch_size` is not a multiple of `workers`.
    """
    if config.batch_size % config.workers:
        raise MultiWorkerError(
            f"batch_size: {config.batch_size} is not divisible by workers={config.workers}; "
            "each worker takes batch_size / workers examples of every batch"
        )


def resolved_config(config: TrainingConfig) -> TrainingConfig:
    """`config` with `model` and `data` as import strings, checked against the caller's trust here.

    The workers run without a Prefect context: they must receive what this
    (possibly untrusted) run was allowed to load, not a name to look up again.
    """
    return config.model_copy(
        update={"model": model_code.import_string(config.model, "model"), "data": model_code.import_string(config.data, "data")}
    )


def worker_threads(workers: int, threads_per_worker: int = 0) -> int:
    """Threads per TensorFlow pool in each worker: the option, else the cores shared out (at least 1)."""
    if threads_per_worker > 0:
        return threads_per_worker
    return max(1, (os.cpu_count() or 1) // max(1, workers))


ProgressCallback = Callable[[int, int, Optional[float]], None]
CheckpointCallback = Callable[[int, str, dict[str, float]], None]


def train_multi_worker(
    model_dir: str,
    config: Any,
    tracking: Optional[MlflowConfig] = None,
    *,
    on_progress: Optional[ProgressCallback] = None,
    on_checkpoint: Optional[CheckpointCallback] = None,
    options: Optional[MultiWorkerOptions] = None,
) -> Any:
    """Train one model over `config.workers` local TensorFlow processes (see the module docstring).

    Args:
        model_dir: a local (or shared-filesystem) directory; created if missing.
        config: the `TrainingConfig` (`workers` processes; `batch_size` is the global batch).
        tracking: the MLflow connection to track the run in, as `train_with_checkpoints` does.
        on_progress: `(step, target, loss)` as training advances.
        on_checkpoint: `(step, prefix, metrics)` after every checkpoint the chief wrote.
        options: restarts, stall and collective timeouts, network isolation.

    Returns:
        The `TrainResult`: `start_step` where this call began, `checkpoints_saved` over all attempts.

    Raises:
        MultiWorkerError: a setting cannot work with several workers (an object-store model dir,
            a batch size not divisible by `workers`), the network cannot be isolated with
            `isolate_network="require"`, or every attempt failed (the message ends with the
            failing worker's log).
        ImportStringError, ModelDirError: as `train_with_checkpoints`.

    Example:
        >>> from prefect_tensorflow.tasks.training.multi_worker import train_multi_worker
        >>> train_multi_worker("s3://bucket/iris", {"workers": 2})
        Traceback (most recent call last):
        ...
        prefect_tensorflow.tasks.training.multi_worker.MultiWorkerError: model_dir: s3://bucket/iris: multi-worker training needs a local or shared-filesystem directory (every worker reads the chief's checkpoints)
    """
    from ..checkpoints.writer import confine_kept_list
    from ..registry.tracking import TrainingRun
    from .loop import TrainResult, prepare_model_dir

    config = config if isinstance(config, TrainingConfig) else TrainingConfig.model_validate(config or {})
    options = options or MultiWorkerOptions()
    location = parse_location(model_dir, parameter="model_dir")
    if not location.is_local:
        raise MultiWorkerError(
            f"model_dir: {location.uri}: multi-worker training needs a local or shared-filesystem directory "
            "(every worker reads the chief's checkpoints)"
        )
    check_config(config)
    resolved = resolved_config(config)
    local_dir = prepare_model_dir(location.uri)
    # The chief's tf.train.CheckpointManager takes the state file's kept list over, and deletes by it.
    confine_kept_list(local_dir)
    start_step, latest_path, latest_metrics = _newest(local_dir)
    target = config.target_step(start_step)
    events = _EventHandler(on_progress, on_checkpoint)
    if tracking is None:
        return _run_supervisor(local_dir, resolved, start_step, target, latest_path, latest_metrics, options, events)
    params = {"model_dir": location.uri, **config.mlflow_params()}
    with TrainingRun(tracking, model_dir=local_dir, params=params, run_name=f"train-{location.name}") as run:
        events.run = run
        result: TrainResult = _run_supervisor(
            local_dir, resolved, start_step, target, latest_path, latest_metrics, options, events
        )
        events.log_evaluations(local_dir)
    return result.model_copy(update={"mlflow_run_id": run.run_id, "mlflow_run_url": run.url})


def _newest(model_dir: str) -> tuple[int, Optional[str], dict[str, float]]:
    from ..checkpoints.selection import select_latest_checkpoint

    try:
        ref = select_latest_checkpoint(model_dir)
    except NoValidCheckpointError:
        return 0, None, {}
    return ref.step or 0, ref.path, dict(ref.metrics)


class _EventHandler:
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

    def log_evaluations(self, model_dir: str) -> None:
        """The evaluation metrics the sidecar recorded for this run's checkpoints, to MLflow."""
        from ..checkpoints.metrics_log import read_metrics
        from .loop import checkpoint_metric_names

        if self.run is None or self.evaluator is None:
            return
        recorded = read_metrics(model_dir)
        for step in self.steps:
            evaluated = {k: v for k, v in recorded.get(step, {}).items() if k != "train_loss"}
            if evaluated:
                self.run.log_metrics(checkpoint_metric_names(evaluated), step)

    def handle(self, event: dict[str, Any]) -> None:
        from .loop import checkpoint_metric_names

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
            log.info("saved checkpoint %s (%s)", event["path"], ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
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


def _run_supervisor(
    model_dir: str,
    config: TrainingConfig,
    start_step: int,
    target: int,
    latest_path: Optional[str],
    latest_metrics: dict[str, float],
    options: MultiWorkerOptions,
    events: _EventHandler,
) -> Any:
    from .loop import TrainResult

    started = time.monotonic()
    if target <= start_step:
        if target < start_step:
            get_logger().warning(
                "%s is already at step %d, past the target step %d; nothing to train", model_dir, start_step, target
            )
        return TrainResult(
            model_dir=model_dir,
            start_step=start_step,
            final_step=start_step,
            target_step=target,
            steps_run=0,
            last_checkpoint=latest_path,
            checkpoints_saved=0,
            final_metrics=latest_metrics,
            elapsed_seconds=time.monotonic() - started,
        )
    run_dir = tempfile.mkdtemp(prefix="ptf-multi-worker-")
    spec = {
        "model_dir": model_dir,
        "config": config.model_dump(mode="json"),
        "target": target,
        "options": options.model_dump(mode="json"),
    }
    write_json_atomically(os.path.join(run_dir, "spec.json"), spec)
    log_path = os.path.join(run_dir, "supervisor.log")
    if config.evaluation == "sidecar":
        from . import sidecar_evaluator
        from .loop import evaluation_spec

        events.evaluator = sidecar_evaluator.SidecarEvaluator(model_dir, evaluation_spec(config))
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", MODULE, "supervise", run_dir],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=child_env(ENV_PARENT),
            start_new_session=True,
        )
    try:
        assert process.stdout is not None
        for raw in process.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            events.handle(event)
        code = process.wait()
    finally:
        stop_group(process, options.grace_seconds)  # the workers die with it (PR_SET_PDEATHSIG)
        if events.evaluator is not None:
            # On a failure the evaluator gets a bounded wait (it finishes what was committed on its own).
            events.evaluator.finish(timeout=None if events.result is not None else 30.0)
    result = events.result
    if code != 0 or result is None:
        detail = "; ".join(events.failures[-3:]) or f"the supervisor exited with status {code}"
        raise MultiWorkerError(
            f"model dir {model_dir}: multi-worker training with {config.workers} workers failed: {detail}. "
            f"Logs in {run_dir}. Supervisor log tail:\n{tail(log_path, 1500)}"
        )
    shutil.rmtree(run_dir, ignore_errors=True)
    from ..checkpoints.metrics_log import read_metrics

    final_metrics = result.get("metrics") or events.metrics or latest_metrics
    if events.steps:
        final_metrics = read_metrics(model_dir).get(events.steps[-1], final_metrics)
    return TrainResult(
        model_dir=model_dir,
        start_step=start_step,
        final_step=result["final_step"],
        target_step=target,
        steps_run=max(result["final_step"] - start_step, 0),
        last_checkpoint=result.get("last_checkpoint") or (events.checkpoints[-1] if events.checkpoints else latest_path),
        checkpoints_saved=len(events.checkpoints),
        final_metrics=final_metrics,
        elapsed_seconds=time.monotonic() - started,
    )


# --- the supervisor --------------------------------------------------------------------------


def _emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event, sort_keys=True) + "\n")
    sys.stdout.flush()


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (bound together, then released).

    Another process may take one before TensorFlow binds it: the worker then
    exits with `EXIT_PORT_IN_USE` and the supervisor tries fresh ports.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000


def isolate_network(mode: str) -> tuple[bool, str]:
    """Move this (single-threaded) process into a new network namespace with loopback up.

    Tries a plain network namespace (root or CAP_SYS_ADMIN), then a user plus
    network namespace (unprivileged, mapping this uid and gid to themselves).
    Returns (isolated, how). Linux only.

    Raises:
        MultiWorkerError: `mode` is "require" and neither is allowed here.
    """
    if mode == "off":
        return False, "isolate_network='off'"
    if not sys.platform.startswith("linux"):
        reason = "network namespaces are Linux only"
    else:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(CLONE_NEWNET) == 0:
            _loopback_up()
            return True, "network namespace"
        first = os.strerror(ctypes.get_errno())
        if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
            try:
                with open("/proc/self/setgroups", "w") as handle:
                    handle.write("deny")
                with open("/proc/self/uid_map", "w") as handle:
                    handle.write(f"{uid} {uid} 1")
                with open("/proc/self/gid_map", "w") as handle:
                    handle.write(f"{gid} {gid} 1")
                _loopback_up()
                return True, "user and network namespace"
            except OSError as err:
                reason = f"user namespace set-up failed: {err}"
        else:
            reason = f"unshare(CLONE_NEWNET): {first}; unshare(CLONE_NEWUSER|CLONE_NEWNET): {os.strerror(ctypes.get_errno())}"
    if mode == "require":
        raise MultiWorkerError(f"isolate_network='require': cannot create a private network namespace ({reason})")
    return False, reason


def _loopback_up() -> None:
    import fcntl
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14s", b"lo", 0, b"\0" * 14)
        flags = struct.unpack("16sH14s", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH14s", b"lo", flags | iff_up, b"\0" * 14))


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
    processes = []
    logs = []
    for index in range(workers):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        log_path = os.path.join(run_dir, f"attempt{attempt}-worker{index}.log")
        logs.append(log_path)
        with open(log_path, "ab") as log_file:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", MODULE, "worker", run_dir, str(index)],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=child_env(ENV_SUPERVISOR, threads, TF_CONFIG=tf_config),
                    start_new_session=True,
                )
            )
    _emit(event="attempt", attempt=attempt, ports=ports, pids=[p.pid for p in processes])
    try:
        return _watch(run_dir, processes, logs, options, events)
    finally:
        for process in processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, 15)
                except ProcessLookupError:
                    pass
        for process in processes:
            stop_group(process, options.grace_seconds)


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
                return "fatal", f"worker {index}: {_last_lines(logs[index], 1)}"
            what = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
            if code == EXIT_PARENT_GONE:
                what += " (its supervisor was gone)"
            return "failed", f"worker {index} {what}; log tail: {_last_lines(logs[index])}"
        if all(c == 0 for c in codes):
            return "failed", "every worker exited 0 but the chief wrote no result"
        steps = [(read_json(os.path.join(run_dir, f"heartbeat-{i}.json")) or {}).get("step", -1) for i in range(len(processes))]
        if steps != last_steps:
            last_steps, last_change = steps, time.monotonic()
        elif time.monotonic() - last_change > options.stall_timeout:
            return "failed", f"no worker made progress for {options.stall_timeout:.0f} s (steps {steps})"
        time.sleep(POLL_SECONDS)


def _last_lines(path: str, count: int = 6) -> str:
    lines = [line for line in tail(path, 4000).splitlines() if line.strip()]
    return " | ".join(lines[-count:]) or "(empty)"


# --- a worker ------------------------------------------------------------------------------


class _Reporter:
    """A worker's heartbeat file (for the supervisor's stall check) and, on the chief, the event stream."""

    def __init__(self, run_dir: str, index: int, chief: bool, target: int):
        self.heartbeat = os.path.join(run_dir, f"heartbeat-{index}.json")
        self.events_path = os.path.join(run_dir, "events.jsonl")
        self.chief, self.target = chief, target
        self._next = 0.0

    def event(self, **event: Any) -> None:
        if self.chief:
            with open(self.events_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(event, sort_keys=True) + "\n")

    def step(self, step: int, loss: Optional[float] = None) -> None:
        now = time.monotonic()
        if loss is None and now < self._next and step != self.target:
            return
        self._next = now + HEARTBEAT_SECONDS
        write_json_atomically(self.heartbeat, {"step": step, "time": time.time(), "pid": os.getpid()})
        self.event(event="progress", step=step, target=self.target, loss=loss)


def run_worker(run_dir: str, index: int) -> int:
    """A worker process's main: build under the strategy, restore the chief's newest checkpoint, train, save."""
    die_with_parent(ENV_SUPERVISOR)
    spec = read_json(os.path.join(run_dir, "spec.json")) or {}
    config = TrainingConfig.model_validate(spec["config"])
    options = MultiWorkerOptions.model_validate(spec["options"])
    model_dir, target = spec["model_dir"], int(spec["target"])
    chief = index == 0

    import tensorflow as tf

    threads = worker_threads(config.workers, options.threads_per_worker)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    communication = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING,
        timeout_seconds=options.collective_timeout or None,
    )
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=communication)
    except tf.errors.UnknownError as err:
        if "Could not start gRPC server" in str(err):
            print(f"worker {index}: {err}", flush=True)
            sys.stdout.flush()
            os._exit(EXIT_PORT_IN_USE)
        raise
    if strategy.num_replicas_in_sync != config.workers:
        raise MultiWorkerError(f"expected {config.workers} replicas, the strategy has {strategy.num_replicas_in_sync}")
    try:
        _Worker(tf, strategy, config, model_dir, target, index, chief, _Reporter(run_dir, index, chief, target), run_dir).train()
    except PrefectTensorFlowError as err:  # the same on every attempt: the supervisor gives up at once
        print(f"worker {index}: {type(err).__name__}: {err}", flush=True)
        sys.stderr.flush()
        os._exit(EXIT_FATAL)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip TensorFlow's teardown (seconds, and collective shutdown waits): everything is on disk


class _Worker:
    """The training loop of one worker; the chief also evaluates, writes metrics, summaries and the marker."""

    def __init__(
        self,
        tf: Any,
        strategy: Any,
        config: TrainingConfig,
        model_dir: str,
        target: int,
        index: int,
        chief: bool,
        reporter: _Reporter,
        run_dir: str,
    ):
        self.tf, self.strategy, self.config = tf, strategy, config
        self.model_dir, self.target, self.index, self.chief = model_dir, target, index, chief
        self.reporter, self.run_dir = reporter, run_dir

    def all_reduce_sum(self, value: float) -> float:
        """The sum over workers of a number each one holds (a small collective: every worker must call it)."""
        tf = self.tf
        per_replica = self.strategy.run(lambda: tf.constant(float(value), tf.float64))
        return float(self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy())

    def train(self) -> None:
        tf, strategy, config, target = self.tf, self.strategy, self.config, self.target
        from ..checkpoints.files import uncommitted_temp_dirs
        from ..checkpoints.metrics_log import append_metrics
        from ..checkpoints.restore import checkpoint_keys, resume_from_newest
        from ..checkpoints.selection import select_latest_checkpoint
        from . import sidecar_evaluator
        from .loop import LossWindow, SummaryWriters, build_model_and_data, evaluate, input_pipeline, write_graph

        log = get_logger()
        policy = config.policy
        with strategy.scope():
            net, train_ds, eval_ds = build_model_and_data(config)
            net.optimizer.build(net.trainable_variables)
            global_step = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="global_step", aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA
            )
        # In-loop evaluation: the chief evaluates a plain (not distributed) copy, outside the
        # collectives; every worker builds it so that each draws the same random numbers.
        eval_net = model_code.build_model(config.model, dict(config.hparams)) if config.evaluation == "in_loop" else None
        window = LossWindow()
        objects = {"model": net, "optimizer": net.optimizer, "global_step": global_step}

        if self.chief:
            for leftover in uncommitted_temp_dirs(self.model_dir):
                shutil.rmtree(leftover, ignore_errors=True)
        restore_objects = dict(objects)
        try:
            newest = select_latest_checkpoint(self.model_dir).path
        except NoValidCheckpointError:
            newest = None
        if newest is not None and any(key.startswith("input_iterator/") for key in checkpoint_keys(newest)):
            # Written by a single process: its input position goes into a throwaway iterator
            # (restored for the strict key check) and is replaced by skip(global_step) below.
            restore_objects["input_iterator"] = iter(input_pipeline(train_ds, config))
        latest = resume_from_newest(tf.train.Checkpoint(**restore_objects), self.model_dir)
        start_step = step = int(global_step.numpy())
        if self.all_reduce_sum(start_step) != start_step * config.workers:
            raise MultiWorkerError(f"worker {self.index} restored step {start_step}, another worker a different one")
        if latest is not None:
            print(f"worker {self.index}: resumed from {latest.path} (step {start_step})", flush=True)
        if self.chief:
            marker = os.path.join(self.model_dir, MARKER)
            wanted = {"workers": config.workers, "input_position": "skip(global_step) over the global-batch stream"}
            if read_json(marker) != wanted:
                write_json_atomically(marker, wanted)

        dataset = input_pipeline(train_ds, config)
        if start_step:
            dataset = dataset.skip(start_step)
        shard = tf.data.Options()
        shard.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        iterator = iter(strategy.experimental_distribute_dataset(dataset.with_options(shard)))

        @tf.function
        def train_step(it):
            def step_fn(x, y):
                with tf.GradientTape() as tape:
                    y_pred = net(x, training=True)
                    # Keras scales a mean loss by 1 / replicas inside a replica context, and the
                    # optimizer sums the gradients over replicas: the global batch's mean gradient.
                    loss = net.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
                grads = tape.gradient(loss, net.trainable_variables)
                net.optimizer.apply_gradients(zip(grads, net.trainable_variables))
                return loss

            x, y = next(it)
            # This worker's share of the loss (already scaled by 1 / replicas): the only collective of
            # a step is the gradients' all-reduce; losses are summed over workers when reported.
            (loss,) = strategy.experimental_local_results(strategy.run(step_fn, args=(x, y)))
            global_step.assign_add(1)
            window.total.assign_add(tf.cast(loss, tf.float64))
            window.count.assign_add(1)
            return loss

        save_checkpoint = tf.train.Checkpoint(**objects)
        write_dir = self.model_dir if self.chief else tempfile.mkdtemp(prefix=f"ptf-worker{self.index}-")
        manager = tf.train.CheckpointManager(
            save_checkpoint,
            write_dir,
            max_to_keep=policy.keep_checkpoint_max if self.chief else 1,
            keep_checkpoint_every_n_hours=policy.keep_checkpoint_every_n_hours if self.chief else None,
            checkpoint_name=policy.checkpoint_name,
        )
        summaries = SummaryWriters(self.model_dir) if self.chief else None
        eval_batches = eval_ds.batch(max(config.batch_size, 256))
        last_saved = latest.step if latest is not None else None
        metrics: dict[str, float] = dict(latest.metrics) if latest is not None else {}
        saved: list[str] = []
        last_save_time = time.monotonic()

        def save(at: int) -> None:
            nonlocal last_saved, metrics, last_save_time
            count = int(window.count.numpy())
            total = self.all_reduce_sum(float(window.total.numpy()))  # every worker saves: every worker sums
            window.take_mean()
            train_loss = total / count if count else None
            if self.chief:
                metrics = {} if train_loss is None else {"train_loss": train_loss}
                if config.evaluation == "in_loop":
                    assert eval_net is not None
                    eval_net.set_weights(net.get_weights())
                    metrics = {**evaluate(eval_net, eval_batches), **metrics}
                    assert summaries is not None
                    summaries.evaluation(at, metrics)
                if config.evaluation != "sidecar":  # the sidecar writes the line once the checkpoint is committed
                    append_metrics(self.model_dir, step=at, checkpoint=f"{policy.checkpoint_name}-{at}", metrics=metrics)
            path = manager.save(checkpoint_number=at)  # every worker: a save may run collectives
            if self.chief:
                saved.append(path)
                self.reporter.event(event="checkpoint", step=at, path=path, metrics=metrics)
            else:
                shutil.rmtree(write_dir, ignore_errors=True)  # the guide: the others' copies are thrown away
                os.makedirs(write_dir, exist_ok=True)
            last_saved, last_save_time = at, time.monotonic()

        if step < target:
            # Written before the first save, so that the state file stays the last change to the model dir.
            write_graph(train_step, iterator, write_dir)
            if summaries is not None:
                summaries.create()
                sidecar_evaluator.prepare(self.model_dir)
        if policy.is_due_at_start(step, target, last_saved):
            save(step)
        rate_from: Optional[tuple[int, float]] = None
        sync_every = config.summary_every_n_steps
        while step < target:
            loss = train_step(iterator)
            step += 1
            if step == start_step + 20:
                rate_from = (step, time.monotonic())
            if step % config.summary_every_n_steps == 0:
                value = self.all_reduce_sum(float(loss))
                if summaries is not None:
                    summaries.training_step(step, value, config.summary_every_n_steps, target)
                self.reporter.step(step, value)
            else:
                self.reporter.step(step)
            if policy.save_checkpoints_steps is not None:
                due = policy.is_due(step, 0.0)
            elif step % sync_every == 0:  # a time-based policy: the workers must agree on the step
                due = self.all_reduce_sum(1.0 if policy.is_due(step, time.monotonic() - last_save_time) else 0.0) > 0
            else:
                due = False
            if due:
                save(step)
        if policy.is_due_at_end(step, last_saved, preempted=False):
            save(step)
        if summaries is not None:
            summaries.flush()
        rate = None
        if rate_from is not None and step > rate_from[0]:
            rate = (step - rate_from[0]) / max(time.monotonic() - rate_from[1], 1e-9)
        self.all_reduce_sum(0.0)  # a barrier: nobody leaves while a peer still saves
        if self.chief:
            write_json_atomically(
                os.path.join(self.run_dir, "result.json"),
                {
                    "final_step": step,
                    "start_step": start_step,
                    "last_checkpoint": saved[-1] if saved else (latest.path if latest is not None else None),
                    "metrics": metrics,
                    "steps_per_second": rate,
                },
            )
        if not self.chief:
            shutil.rmtree(write_dir, ignore_errors=True)
        log.info("worker %d finished at step %d", self.index, step)


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m prefect_tensorflow.tasks.training.multi_worker supervise RUN_DIR | worker RUN_DIR INDEX`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] == "supervise":
        return supervise(args[1])
    if len(args) >= 3 and args[0] == "worker":
        return run_worker(args[1], int(args[2]))
    print(main.__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
