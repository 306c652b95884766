"""The Prefect tasks: each is made from the plain function of its lifecycle stage, declared once here.

This module and `blocks.py` are the only ones of `prefect_tensorflow.tasks`
that import Prefect. Every task is `task(<plain function>, name=...)`: the
signature, the docstring and the behaviour are the function's, and the
function stays reachable as `<task>.fn` (the CLI and the tests call it
without Prefect). Retries are declared here, where the task is defined:

- tasks that talk to MLflow are retried by Prefect when the server stayed
  unreachable through the in-call retries (`MlflowUnavailableError`), never
  after a corrupt checkpoint or a parity failure (`retry_if_server_unavailable`);
- no task caches its result: each one reads or writes files and servers
  whose state a cache key cannot see (and re-running one is safe: training
  resumes, exports and registrations are idempotent by fingerprint).

Example:
    >>> from prefect_tensorflow.tasks.prefect_tasks import train_with_checkpoints
    >>> train_with_checkpoints.name, train_with_checkpoints.fn.__module__
    ('train-with-checkpoints', 'prefect_tensorflow.tasks.training.loop')
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from .checkpoints import selection
from .errors import MlflowUnavailableError
from .export import frozen_graph, saved_model, verification
from .promotion import champion_gate
from .registry import model_versions, tracking
from .training import loop


def retry_if_server_unavailable(task: Any, task_run: Any, state: Any) -> bool:
    """A Prefect `retry_condition_fn`: retry a task only when MLflow was unreachable.

    A corrupt checkpoint, a parity failure or a bad name fails at once; only
    `MlflowUnavailableError` (the server still down after the in-call retries)
    is worth another attempt later.
    """
    try:
        state.result()
    except MlflowUnavailableError:
        return True
    except BaseException:  # noqa: BLE001 - any other failure is final
        return False
    return False


def _plain(name: str, **options: Any) -> Any:
    return task(name=name, cache_policy=NO_CACHE, **options)


def _talks_to_mlflow(name: str, **options: Any) -> Any:
    return task(
        name=name,
        **options,
        cache_policy=NO_CACHE,
        retries=2,
        retry_delay_seconds=[10, 30],
        retry_condition_fn=retry_if_server_unavailable,
    )


train_with_checkpoints = _talks_to_mlflow("train-with-checkpoints")(loop.train_with_checkpoints)
select_latest_checkpoint = _plain("select-latest-checkpoint")(selection.select_latest_checkpoint)
select_best_checkpoint = _plain("select-best-checkpoint", task_run_name="select-best-checkpoint-{metric}-{mode}")(
    selection.select_best_checkpoint
)
select_checkpoint_at_step = _plain("select-checkpoint-at-step", task_run_name="select-checkpoint-at-step-{step}")(
    selection.select_checkpoint_at_step
)
select_checkpoint = _plain("select-checkpoint")(selection.select_checkpoint)
freeze_graph = _plain("freeze-graph")(frozen_graph.freeze_graph)
export_saved_model = _plain("export-saved-model")(saved_model.export_saved_model)
verify_artifacts = _plain("verify-artifacts")(verification.verify_artifacts)
log_frozen_graph_to_mlflow = _talks_to_mlflow("log-frozen-graph-to-mlflow")(tracking.log_frozen_graph_to_mlflow)
register_model_version = _talks_to_mlflow("register-model-version")(model_versions.register_model_version)
check_can_register = _talks_to_mlflow("check-can-register")(model_versions.check_can_register)
find_registered_version = _talks_to_mlflow("find-registered-version")(model_versions.find_registered_version)
set_model_version_aliases = _talks_to_mlflow("set-model-version-aliases")(model_versions.set_model_version_aliases)

# --- sweeps (tasks/training/sweep_candidates.py): the candidate task runs on Dask workers ----------------
from .training import sweep_candidates  # noqa: E402 - appended section

train_sweep_candidate = _plain("train-sweep-candidate", task_run_name="train-candidate-{spec.candidate_id}")(
    sweep_candidates.train_candidate
)
start_sweep_run = _talks_to_mlflow("start-sweep-run")(sweep_candidates.start_sweep_run)
record_sweep_comparison = _talks_to_mlflow("record-sweep-comparison")(sweep_candidates.record_sweep_comparison)
end_sweep_run = _talks_to_mlflow("end-sweep-run")(sweep_candidates.end_sweep_run)
gate_champion = _talks_to_mlflow("gate-champion", task_run_name="gate-champion-{registered.name}-v{registered.version}")(
    champion_gate.gate_champion
)
