"""The `sweep` flow: train candidates in parallel on Dask, ship the best one as `retrain` ships its model.

Each candidate (hyperparameters, seed, target step over a base
`TrainingConfig`) is one Prefect task on a Dask worker, which trains it in a
child process into `<sweep root>/<candidate id>` (`tasks.sweep_training`).
The candidates' best checkpoints (`select`, e.g. `best:accuracy`) are
compared; the winner's is exported, frozen, logged, registered and gated as
every flow ships (`flows.shipping`). With MLflow, the sweep is a parent run
holding the comparison table and every candidate a child run.

Dask: a temporary `LocalCluster` of worker processes on 127.0.0.1 (one thread
each, dashboard on a free 127.0.0.1 port) unless `dask_address` (or
`PREFECT_TENSORFLOW_DASK_ADDRESS`) names the scheduler of an existing cluster.
Each worker forks its candidates' trainers from a warm template (TensorFlow
imported once per worker, `sweep_template`; on a LocalCluster started as the
workers come up). A Dask worker that dies mid-training takes its trainer
with it; Dask runs the task again elsewhere and the candidate resumes from
its newest valid checkpoint. A future is released as soon as its state is
known, so a later worker death never makes Dask run a finished candidate
again (and its result file would skip it anyway). A candidate Dask gives up on (`KilledWorker`)
fails the sweep after the others finished; running the sweep again trains
only what is missing.

Example:
    >>> from prefect_tensorflow.flows.sweep import sweep
    >>> sweep.name
    'sweep'
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Optional, Union

from prefect import flow
from pydantic import Field

from prefect_tensorflow.tasks import prefect_tasks as tasks
from prefect_tensorflow.tasks.blocks import MlflowConnection
from prefect_tensorflow.tasks.checkpoints.selection import CheckpointSelection
from prefect_tensorflow.tasks.config_checks import short_repr
from prefect_tensorflow.tasks.configs import ExportConfig, GateConfig, RegisteredModelName, TrainingConfig
from prefect_tensorflow.tasks.data.lineage import WINDOWS_DIR
from prefect_tensorflow.tasks.data.window import DataWindow
from prefect_tensorflow.tasks.errors import StorageError, UnsafeParameterError
from prefect_tensorflow.tasks.export.frozen_graph import FreezeResult
from prefect_tensorflow.tasks.reachability import check_reachable
from prefect_tensorflow.tasks.run_context import get_logger, in_deployment_run, prefect_run_tags
from prefect_tensorflow.tasks.settings import get_settings
from prefect_tensorflow.tasks.storage.locations import parse_location
from prefect_tensorflow.tasks.training.sweep_candidates import (
    Candidate,
    CandidateResult,
    Candidates,
    CandidateSpec,
    SweepError,
    comparison_rows,
    plan_candidates,
    rank_candidates,
)
from prefect_tensorflow.tasks.training.sweep_worker_exit import PRELOAD as WORKER_EXIT_PRELOAD

from .parameters import ParsedBy
from .prelude import flow_prelude
from .shipping import Destination, Shipped, check_decision, check_gate_metrics, publish_shipped, ship_checkpoint
from .windows import windowed_training

DASK_ADDRESS = re.compile(r"(tcp|tls|inproc|ws|wss)://[A-Za-z0-9_.:\[\]-]{1,253}")
DEFAULT_CANDIDATES = [
    Candidate(hparams={"learning_rate": 0.05}, seed=0),
    Candidate(hparams={"learning_rate": 0.1}, seed=0),
]
DaskWorkers = Annotated[int, Field(ge=0, le=64)]
Threads = Annotated[int, Field(ge=0, le=64)]


class SweepSummary(Shipped):
    """What a `sweep` run produced: the candidates and their comparison, then the winner's checkpoint shipped."""

    candidates: list[CandidateResult]
    comparison: list[dict[str, Any]] = Field(description="The comparison table, one row per candidate")
    winner: str = Field(description="The winning candidate's id")
    frozen_graph: FreezeResult  # a sweep always freezes
    mlflow_parent_run_id: Optional[str] = None


def sweep_selection(select: str) -> CheckpointSelection:
    """`select` parsed; a sweep compares candidates by a metric, so it must be `best:<metric>[:min|max]`.

    Raises:
        ValueError: naming `select`.
    """
    selection = CheckpointSelection.parse(select)
    if selection.kind != "best":
        raise ValueError(
            f"select: a sweep compares its candidates by a metric; expected 'best:<metric>[:min|max]', received {select!r}"
        )
    return selection


def checked_dask_address(address: str) -> Optional[str]:
    """The scheduler to use: `address`, else `PREFECT_TENSORFLOW_DASK_ADDRESS`, else None (a local cluster).

    A deployment run may not name a scheduler of its own: the flow sends it
    pickled tasks and unpickles what comes back, so a scheduler typed into
    the Run form could run code in the flow's process.

    Raises:
        ValueError: `address` is not `tcp://host:port` (or tls://, ...).
        UnsafeParameterError: in a deployment run, an address other than the configured one.
    """
    configured = get_settings().dask_address or None
    if not address:
        return configured
    if not DASK_ADDRESS.fullmatch(address):
        raise ValueError(f"dask_address: expected a scheduler address like tcp://127.0.0.1:8786, received {short_repr(address)}")
    if in_deployment_run() and address != configured:
        raise UnsafeParameterError(
            "dask_address",
            address,
            "deployment runs use the scheduler in PREFECT_TENSORFLOW_DASK_ADDRESS (or a local cluster), "
            "not one typed into the form",
        )
    return address


def dask_task_runner(address: Optional[str], workers: int) -> Any:
    """prefect-dask's `DaskTaskRunner`: on `address`, else a temporary LocalCluster of `workers` processes on 127.0.0.1."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": "127.0.0.1:0",  # Dask's default is :8787 on every interface
            "preload": [WORKER_EXIT_PRELOAD],  # a cleanly closed worker skips Python's teardown: the sweep waits less
        }
    )


def train_on_dask(
    specs: list[CandidateSpec], address: Optional[str], workers: int
) -> dict[int, Union[CandidateResult, BaseException]]:
    """Train every candidate as a task on Dask; each one's result, or what stopped it, by index."""
    import dask
    import distributed

    log = get_logger()
    outcomes: dict[int, Union[CandidateResult, BaseException]] = {}
    with dask_task_runner(address, workers or min(len(specs), os.cpu_count() or 1)) as runner:
        client = runner.client
        if not address:  # our own LocalCluster: its workers import TensorFlow while Prefect submits the tasks
            launch_templates(client, specs[0].threads, tracked=specs[0].tracking is not None)
        declared = any("trainer" in (w.get("resources") or {}) for w in client.scheduler_info(n_workers=-1)["workers"].values())
        # Workers that declare a `trainer` resource run one candidate at a time, whatever their thread count.
        with dask.annotate(**({"resources": {"trainer": 1}} if declared else {})):
            futures = [runner.submit(tasks.train_sweep_candidate, parameters={"spec": spec}) for spec in specs]
        by_key = {future.wrapped_future.key: (future, spec) for future, spec in zip(futures, specs)}
        try:
            for done in distributed.as_completed([future.wrapped_future for future in futures], loop=client.loop):
                future, spec = by_key[done.key]
                try:
                    outcomes[spec.index] = future.result()
                except Exception as err:  # noqa: BLE001 - KilledWorker, or the task failed: reported, the others go on
                    outcomes[spec.index] = err
                    log.error("candidate %d (%s) did not finish: %s: %s", spec.index, spec.candidate_id, type(err).__name__, err)
                    if type(err).__name__ == "KilledWorker":
                        _mark_crashed(future.task_run_id, f"Dask gave up on it: {err}")
                finally:
                    future.wrapped_future.release()  # a dead worker must not make Dask run it again
        except BaseException as err:
            if not isinstance(err, Exception):  # a cancel or a timeout: the trainers checkpoint before the cluster goes
                _stop_trainers(client)
            raise
    return outcomes


def launch_templates(client: Any, threads: int, tracked: bool = True) -> None:
    """Start each worker's warm trainer template (`sweep_template.launch_template`) without waiting for it.

    Only on a cluster this flow started: a shared cluster's workers start theirs with their first candidate.
    """
    from prefect_tensorflow.tasks.training.sweep_template import launch_template

    try:
        client.run(launch_template, threads, tracked)
    except Exception as err:  # noqa: BLE001 - each worker then starts its template with its first candidate
        get_logger().warning("could not start the Dask workers' warm trainer templates early: %s", err)


def _stop_trainers(client: Any) -> None:
    """Ask every Dask worker to stop its trainers (`stop_local_trainers`: each saves a checkpoint first)."""
    from prefect_tensorflow.tasks.training.sweep_candidates import stop_local_trainers

    try:
        stopped = client.run(stop_local_trainers)
    except Exception as err:  # noqa: BLE001 - the cluster's shutdown stops them anyway, without a checkpoint
        get_logger().warning("could not ask the Dask workers to stop their trainers: %s", err)
        return
    count = sum(len(pids) for pids in stopped.values())
    get_logger().warning("sweep stopped: %d trainer(s) saved a checkpoint and stopped; a run again resumes them", count)


def _mark_crashed(task_run_id: Any, message: str) -> None:
    """prefect-dask leaves a task run Running when Dask gives up on it (PrefectHQ/prefect#21638): set it Crashed."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            client.set_task_run_state(task_run_id, Crashed(message=message), force=True)
    except Exception as err:  # noqa: BLE001 - a state for the UI only
        get_logger().warning("could not mark task run %s Crashed: %s", task_run_id, err)


def publish_comparison(rows: list[dict[str, Any]], selection: str) -> None:
    """The comparison table as a Prefect table artifact (`sweep-comparison`)."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact(key="sweep-comparison", table=rows, description=f"Sweep candidates compared by {selection}")


@flow(name="sweep", flow_run_name="sweep-{registered_model_name}", log_prints=True)
def sweep(
    candidates: Candidates = DEFAULT_CANDIDATES,  # a list default: Prefect copies parameters
    sweep_root: str = "",
    training: TrainingConfig = TrainingConfig(),
    select: Annotated[str, ParsedBy(sweep_selection)] = "best:accuracy",
    export_base: str = "",
    frozen_dir: str = "",
    registered_model_name: RegisteredModelName = "iris",
    gate: GateConfig = GateConfig(),
    mlflow: Optional[MlflowConnection] = None,
    track: bool = True,
    dask_address: str = "",
    dask_workers: DaskWorkers = 0,
    threads_per_candidate: Threads = 1,
    decision: Optional[Literal["approve", "reject"]] = None,
    window: Optional[DataWindow] = None,
) -> SweepSummary:
    """Train the candidates in parallel on Dask, compare them, ship the best as `retrain` does.

    Args:
        candidates: The variants to train: each its hyperparameters (over the base training's),
            seed and target step (empty: the base training's).
        sweep_root: Directory holding one model dir per candidate (<sweep root>/<candidate id>);
            empty for <data home>/sweeps/iris. Every Dask worker must see it (shared storage).
        training: The base training: model, data, batch size, checkpoint policy; the candidates
            override its hparams, seed and steps.
        select: How candidates are compared: each one's best checkpoint by this metric,
            'best:<metric>[:min|max]' (e.g. 'best:accuracy').
        export_base: Directory of SavedModel versions for TF Serving; empty for <data home>/exports/REGISTERED_MODEL_NAME.
        frozen_dir: Directory for the frozen .pb; empty for <data home>/frozen/REGISTERED_MODEL_NAME.
        registered_model_name: The MLflow registered model the winner's export becomes a version of.
        gate: Champion gate: both versions are scored on the data's eval split; the metric, the
            margin the new version must clear (the interval's lower bound), guardrails, floors and
            serving limits. No rule: the champion is kept.
        mlflow: A saved MLflow Connection block; empty for the worker's MLFLOW_TRACKING_URI
            (else a local SQLite store).
        track: Track in MLflow (a parent run, a child run per candidate) and register the winner.
        dask_address: Scheduler of an existing Dask cluster (tcp://host:port); empty for
            PREFECT_TENSORFLOW_DASK_ADDRESS, else a temporary local cluster.
        dask_workers: Worker processes of the local cluster; 0 for one per candidate, at most one per core.
        threads_per_candidate: TensorFlow threads per pool in each candidate's process (1: N
            candidates on N cores do not oversubscribe); 0 for TensorFlow's default.
        decision: The answer, given in advance, for a gate that cannot compare the versions
            (a renamed output, other labels): 'approve' or 'reject'. Empty: the run pauses with
            an approval form in the Prefect UI. Refused in a deployment run (use the form).
        window: The data window, for a dataset loader that reads one (as retrain's): every candidate
            trains on it, in <sweep root>/windows/<window>/<candidate id>. Empty: training.window, else
            the day before the run's scheduled start. Refused for a loader that reads none (iris).

    Raises:
        ValueError: `select`, a path, an address or a count is malformed (checked before anything is written).
        SweepError: two candidates are the same, or candidates failed (the others are kept: run again).
        UnsafeParameterError: in a deployment run, a path outside the roots, an inline MLflow
            connection or a Dask scheduler other than the configured one.
        ServerUnreachableError: the Dask scheduler does not accept a connection within
            PREFECT_TENSORFLOW_DASK_CONNECT_TIMEOUT seconds (checked before anything is written).
    """
    log = get_logger()
    check_decision(decision)
    if track:
        check_gate_metrics(gate, ExportConfig().head)  # before training, not after it
    selection = sweep_selection(select)
    address = checked_dask_address(dask_address)
    if address:  # before the MLflow run and the sweep root: an absent scheduler leaves nothing behind
        check_reachable(address, what="the Dask scheduler", setting="dask_address", timeout=get_settings().dask_connect_timeout)
    paths: Mapping[str, str] = {"sweep_root": sweep_root, "export_base": export_base, "frozen_dir": frozen_dir}
    prelude = flow_prelude(paths, registered_model_name, model=training.model, data=training.data, mlflow=mlflow, track=track)
    paths, connection = prelude.paths, prelude.connection  # checked, defaults filled in
    if not parse_location(paths["sweep_root"], parameter="sweep_root").is_local:
        raise StorageError(f"sweep_root: {paths['sweep_root']}: expected a local or shared-filesystem directory")
    training = windowed_training(training, window)
    if training.window is not None:  # each window's candidates apart: a re-run of a window resumes only its own
        paths = {**paths, "sweep_root": os.path.join(paths["sweep_root"], WINDOWS_DIR, training.window.name)}
    specs = plan_candidates(paths["sweep_root"], training, list(candidates), threads=threads_per_candidate)
    parent_run_id = None
    if connection is not None:
        tasks.check_can_register(registered_model_name, connection)
        parent_run_id = tasks.start_sweep_run(
            connection,
            f"sweep-{registered_model_name}",
            {
                "sweep_root": paths["sweep_root"],
                "select": str(selection),
                "candidates": [c.model_dump(mode="json") for c in candidates],
                "training": training.mlflow_params(),
            },
        )
        tags = prefect_run_tags()
        specs = [
            spec.model_copy(update={"tracking": connection.plain(), "parent_run_id": parent_run_id, "run_tags": tags})
            for spec in specs
        ]
    status = "FAILED"
    try:
        summary = _train_compare_ship(
            specs,
            address,
            dask_workers,
            selection,
            training,
            paths,
            connection,
            registered_model_name,
            gate,
            parent_run_id,
            decision,
        )
        status = "FINISHED"
        return summary
    except BaseException as err:
        if not isinstance(err, Exception):  # stopped from outside: a Prefect cancel or timeout, Ctrl-C
            status = "KILLED"
        raise
    finally:
        if connection is not None and parent_run_id is not None:
            try:
                tasks.end_sweep_run(connection, parent_run_id, status)
            except Exception as err:  # noqa: BLE001 - the sweep's own outcome matters more
                log.warning("could not end the MLflow sweep run %s: %s", parent_run_id, err)


def _train_compare_ship(
    specs: list[CandidateSpec],
    address: Optional[str],
    dask_workers: int,
    selection: CheckpointSelection,
    training: TrainingConfig,
    paths: Mapping[str, str],
    connection: Optional[MlflowConnection],
    registered_model_name: str,
    gate: GateConfig,
    parent_run_id: Optional[str],
    decision: Optional[Literal["approve", "reject"]] = None,
    window: Optional[DataWindow] = None,
) -> SweepSummary:
    log = get_logger()
    outcomes = train_on_dask(specs, address, dask_workers)
    results = [o for o in outcomes.values() if isinstance(o, CandidateResult)]
    failed = {i: o for i, o in outcomes.items() if not isinstance(o, CandidateResult)}
    refs = {r.index: tasks.select_checkpoint(r.model_dir, selection) for r in sorted(results, key=lambda r: r.index)}
    metric = selection.metric or ""
    ranking = rank_candidates({i: ref.metrics[metric] for i, ref in refs.items()}, selection.mode) if not failed else []
    winner_index = ranking[0] if ranking else None
    rows = comparison_rows(
        results, {i: ref.metrics for i, ref in refs.items()}, {i: ref.step for i, ref in refs.items()}, winner_index
    )
    for index, error in sorted(failed.items()):
        rows.append(
            {"candidate": index, "id": specs[index].candidate_id, "winner": "", "trained": f"FAILED: {type(error).__name__}"}
        )
    publish_comparison(rows, str(selection))
    winner = next((r for r in results if r.index == winner_index), None)
    if connection is not None and parent_run_id is not None:
        tasks.record_sweep_comparison(connection, parent_run_id, rows, metric, winner.candidate_id if winner else None)
    if failed or winner is None:
        detail = "; ".join(
            f"{i} ({specs[i].candidate_id}): {type(e).__name__}: {str(e)[:300]}" for i, e in sorted(failed.items())
        )
        raise SweepError(
            f"{len(failed)} of {len(specs)} candidates did not finish: {detail}. The others are kept; "
            "run the sweep again to train only what is missing"
        )
    ref = refs[winner.index]
    log.info(
        "winner: candidate %d (%s), %s=%s at step %s", winner.index, winner.candidate_id, metric, ref.metrics[metric], ref.step
    )
    winner_training = specs[winner.index].config
    shipped = ship_checkpoint(
        ref,
        str(selection),
        training.export_config(hparams=dict(winner_training.hparams)),
        Destination(
            export_base=paths["export_base"],
            frozen_dir=paths["frozen_dir"],
            connection=connection,
            registered_model_name=registered_model_name,
            gate=gate,
            decision=decision,
        ),
        run_id=winner.training.mlflow_run_id,
    )
    publish_shipped(winner.training, shipped)
    return SweepSummary(
        **dict(shipped),
        candidates=sorted(results, key=lambda r: r.index),
        comparison=rows,
        winner=winner.candidate_id,
        mlflow_parent_run_id=parent_run_id,
    )
