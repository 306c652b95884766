"""Multi-worker training (`TrainingConfig.workers > 1`): one model, N TensorFlow processes, MultiWorkerMirroredStrategy.

`train_with_checkpoints(model_dir, TrainingConfig(workers=N))` comes here.
Three kinds of process take part, all on this host, each in a module of its own:

- the caller (a Prefect task, the CLI, a library call) runs `train_multi_worker`
  (this module): it checks the settings, resolves the model code to import
  strings (trust is decided here, where the Prefect run context is), opens the
  MLflow run, starts the sidecar evaluator and the supervisor, and turns the
  supervisor's events into progress, checkpoint callbacks and MLflow metrics
  (`worker_events`);
- the supervisor (`supervisor`, in a private network namespace when it can:
  `network_isolation`) starts N workers with a `TF_CONFIG` on 127.0.0.1 and
  restarts all of them after a failure or a stall, up to `max_restarts` times;
- each worker (`worker`) runs the one training loop (`steps.run_steps`) under
  `MultiWorkerMirroredStrategy`, saving through the same `CheckpointSaver` and
  `CheckpointWriter` as one process; only the chief's copy counts.

The model dir has the layout of a single-process training (the `checkpoint`
state file, `model.ckpt-<step>`, `checkpoint_metrics.jsonl` with each
checkpoint's evaluation metrics, TensorBoard event files, `graph.pbtxt`), plus
`.ptf-multi-worker.json`, so selection, freezing and export work on it as on
any model dir. Evaluation follows `TrainingConfig.evaluation`: `sidecar` (the
default) is the same sidecar evaluator process as a single-process training,
started here before the workers; the chief's keep policy deletes a checkpoint
only once it has its metrics line (or no evaluator is left), and the last sweep
is made here once the evaluator is done. `in_loop` is done by the chief on a
plain copy of the model, outside the collectives. Every (re)start restores the
chief's newest valid checkpoint.

A killed and resumed run ends bit-identical to an uninterrupted run with the
same number of workers; with a different number of workers (or against a
single process) the weights differ by float summation order only. A model dir
moves freely between modes: N workers read a single-process checkpoint's
iterator state (strict keys) and replace it by `skip(global_step)`; one
process resuming a multi-worker checkpoint (no iterator state) positions its
input by the same skip.

Example:
    >>> from prefect_tensorflow.tasks.configs import TrainingConfig
    >>> from prefect_tensorflow.tasks.training.multi_worker import resolved_config
    >>> resolved_config(TrainingConfig(workers=2)).model  # what the workers import, trust decided here
    'prefect_tensorflow.tasks.iris:build_model'
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional, Union

from .. import model_code
from ..checkpoints.metrics_log import read_metrics
from ..checkpoints.model_dir import ModelDir
from ..checkpoints.selection import select_latest_checkpoint
from ..checkpoints.writer import apply_keep_policy, read_kept_list
from ..child_processes import log_tail, start_process, stop_process_group, write_json_atomically
from ..configs import TrainingConfig
from ..errors import NoValidCheckpointError
from ..registry.mlflow_connection import MlflowConfig
from ..registry.tracking import TrainingRun
from ..run_context import flush_run_logs, get_logger, in_deployment_run
from . import sidecar_evaluator
from .multi_worker_settings import (
    ENTRY_MODULE,
    ENV_PARENT,
    MARKER,
    MultiWorkerError,
    MultiWorkerOptions,
    check_config,
)
from .results import CheckpointCallback, ProgressCallback, TrainResult, log_sidecar_evaluations, prepare_model_dir
from .worker_events import WorkerEvents

__all__ = ["MARKER", "MultiWorkerError", "MultiWorkerOptions", "check_config", "train_multi_worker"]

RUN_DIR_PREFIX = "ptf-multi-worker-"
RUN_DIR_NAME = re.compile(re.escape(RUN_DIR_PREFIX) + r"(\d+)-[A-Za-z0-9_]+")
"""The caller's run dir in $TMPDIR (spec, events, logs, the workers' $TMPDIR): named by the caller's pid."""

EVALUATOR_START_TIMEOUT = 120.0
"""Seconds the caller waits for the sidecar evaluator to take its lock before starting the workers."""


def resolved_config(config: TrainingConfig) -> TrainingConfig:
    """`config` with `model` and `data` as import strings, checked against the caller's trust here.

    The workers run without a Prefect context: they must receive what this
    (possibly untrusted) run was allowed to load, not a name to look up again.
    """
    return config.model_copy(
        update={"model": model_code.import_string(config.model, "model"), "data": model_code.import_string(config.data, "data")}
    )


def train_multi_worker(
    model_dir: Union[str, ModelDir],
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
        prefect_tensorflow.tasks.training.multi_worker_settings.MultiWorkerError: model_dir: s3://bucket/iris: multi-worker training needs a local or shared-filesystem directory (every worker reads the chief's checkpoints)
    """
    config = config if isinstance(config, TrainingConfig) else TrainingConfig.model_validate(config or {})
    options = options or MultiWorkerOptions()
    model = ModelDir.parse(model_dir)
    if model.is_remote:
        raise MultiWorkerError(
            f"model_dir: {model.uri}: multi-worker training needs a local or shared-filesystem directory "
            "(every worker reads the chief's checkpoints)"
        )
    check_config(config)
    resolved = resolved_config(config)
    local_dir = prepare_model_dir(model)
    untrusted = in_deployment_run()
    # The chief's CheckpointWriter takes the state file's kept list over: refused here, before any
    # process starts, when a deployment run's state file names a checkpoint outside the model dir.
    read_kept_list(local_dir, untrusted=untrusted)
    start_step, latest_path, latest_metrics = _newest(local_dir)
    target = config.target_step(start_step)
    get_logger().info("training from step %d to target step %d", start_step, target)  # as loop.py's, for a resubmission
    flush_run_logs()
    events = WorkerEvents(on_progress, on_checkpoint)
    if tracking is None:
        return _run_supervisor(local_dir, resolved, start_step, target, latest_path, latest_metrics, options, events, untrusted)
    params = {"model_dir": model.uri, **config.mlflow_params()}
    with TrainingRun(tracking, model_dir=local_dir, params=params, run_name=f"train-{model.location.name}") as run:
        events.run = run
        result: TrainResult = _run_supervisor(
            local_dir, resolved, start_step, target, latest_path, latest_metrics, options, events, untrusted
        )
        if events.evaluator is not None:
            log_sidecar_evaluations(run, local_dir, events.steps)
    return result.model_copy(update={"mlflow_run_id": run.run_id, "mlflow_run_url": run.url})


def remove_abandoned_run_dirs(tmp: Optional[str] = None) -> list[str]:
    """Remove the run dirs (`ptf-multi-worker-<pid>-*` in `tmp`, default $TMPDIR) of callers no longer alive.

    A caller removes its run dir however the training ends, unless it is killed
    itself (SIGKILL, OOM): the next multi-worker training on the host removes
    what it left. Returns the paths removed.

    Example:
        >>> import tempfile
        >>> remove_abandoned_run_dirs(tempfile.mkdtemp())
        []
    """
    tmp = tmp or tempfile.gettempdir()
    removed = []
    for name in sorted(os.listdir(tmp)):
        match = RUN_DIR_NAME.fullmatch(name)
        if match is None or _alive(int(match.group(1))):
            continue
        path = os.path.join(tmp, name)
        shutil.rmtree(path, ignore_errors=True)
        get_logger().info("removed %s, the multi-worker run dir of a caller that is gone", path)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _newest(model_dir: str) -> tuple[int, Optional[str], dict[str, float]]:
    try:
        ref = select_latest_checkpoint(model_dir)
    except NoValidCheckpointError:
        return 0, None, {}
    return ref.step or 0, ref.path, dict(ref.metrics)


def _run_supervisor(
    model_dir: str,
    config: TrainingConfig,
    start_step: int,
    target: int,
    latest_path: Optional[str],
    latest_metrics: dict[str, float],
    options: MultiWorkerOptions,
    events: WorkerEvents,
    untrusted: bool,
) -> Any:
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
    remove_abandoned_run_dirs()
    run_dir = tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-")
    spec = {
        "model_dir": model_dir,
        "config": config.model_dump(mode="json"),
        "target": target,
        "options": options.model_dump(mode="json"),
        "untrusted": untrusted,
    }
    write_json_atomically(os.path.join(run_dir, "spec.json"), spec)
    log_path = os.path.join(run_dir, "supervisor.log")
    try:
        if config.evaluation == "sidecar":
            events.evaluator = sidecar_evaluator.SidecarEvaluator(model_dir, sidecar_evaluator.evaluation_spec(config))
            # The chief's keep policy asks the evaluator's lock whether one is evaluating: hold it first.
            events.evaluator.wait_until_evaluating(EVALUATOR_START_TIMEOUT)
        process = start_process(
            [sys.executable, "-m", ENTRY_MODULE, "supervise", run_dir],
            log_path=log_path,
            stdout=subprocess.PIPE,
            parent_variable=ENV_PARENT,
        )
    except BaseException:
        if events.evaluator is not None:
            events.evaluator.finish(timeout=30.0)
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
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
        stop_process_group(process, grace=options.grace_seconds)  # the workers die with it (PR_SET_PDEATHSIG)
        log_end = log_tail(log_path, 1500)
        shutil.rmtree(run_dir, ignore_errors=True)  # the supervisor's and workers' files, whatever the end
        if events.evaluator is not None:
            if events.result is not None:
                events.evaluator.finish()
                apply_keep_policy(model_dir, config.policy, untrusted=untrusted)  # what waited for its metrics
            else:  # a failure: it stops now (the next training's evaluator catches up)
                events.evaluator.stop()
    result = events.result
    if code != 0 or result is None:
        detail = "; ".join(events.failures[-3:]) or f"the supervisor exited with status {code}"
        raise MultiWorkerError(
            f"model dir {model_dir}: multi-worker training with {config.workers} workers failed: {detail}. "
            f"Supervisor log tail:\n{log_end}"
        )
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
