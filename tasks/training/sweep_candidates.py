"""Sweep candidates: one model dir per candidate, trained in a process of its own, idempotently.

A sweep trains several variants of one `TrainingConfig` (its *base*): each
`Candidate` overrides the hyperparameters, the seed and the target step. A
candidate's model dir is `<sweep root>/<candidate id>`, the id a hash of the
candidate's whole effective config, so the same settings always land in the
same directory, whichever sweep or worker trains them.

`train_candidate(spec)` is the body of the Dask task (`prefect_tasks.
train_sweep_candidate`). It never trains a candidate twice:

- a finished candidate has `.ptf-sweep-result.json` in its model dir
  (written atomically after training returned): the task returns it at once,
  without starting anything (a sweep run again, or Dask running a finished
  task again after its worker died);
- otherwise it trains in a child process (Dask workers are daemonic, and
  TensorFlow gets its own thread limits there, and a killed trainer does not
  take the worker down): forked from the worker's warm template
  (`sweep_template`: TensorFlow imported once per worker process), or, when
  that template cannot start or fork, started cold as `python -m
  prefect_tensorflow.tasks.training.sweep_trainer_main`. The child dies with
  its Dask worker (`child_processes.die_with_parent`, or the template's
  lifetime rules), takes an exclusive lock on the model
  dir (a second trainer of the same dir waits, then finds the result), and
  trains with `train_with_checkpoints`, which resumes from the newest valid
  checkpoint: a candidate whose worker was killed resumes where it was and
  ends with the weights of an uninterrupted run.

With MLflow, every candidate is a child run (tag `mlflow.parentRunId`) of the
sweep's parent run, which holds the comparison table. Each task execution is
appended to `<sweep root>/attempts.jsonl`.

Example:
    >>> from prefect_tensorflow.tasks.configs import TrainingConfig
    >>> from prefect_tensorflow.tasks.training.sweep_candidates import Candidate, candidate_config, candidate_id
    >>> config = candidate_config(TrainingConfig(steps=500), Candidate(hparams={"learning_rate": 0.1}, seed=3))
    >>> config.hparams, config.seed, config.steps
    ({'learning_rate': 0.1}, 3, 500)
    >>> candidate_id(config) == candidate_id(config), candidate_id(config).startswith("cand-")
    (True, True)
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from ..child_processes import die_with_parent, log_tail, read_json, start_process, stop_process_group, write_json_atomically
from ..configs import Seed, Steps, TrainingConfig
from ..errors import PrefectTensorFlowError
from ..lean_import import skip_keras_optional_imports
from ..metric_order import Mode, best_first
from ..registry.mlflow_connection import MlflowConfig
from ..run_context import get_logger
from ..warm_process import ForkedProcess
from .loop import TrainResult
from .sweep_template import ENV_PARENT, fork_trainer, template_pid

TRAINER_MODULE = "prefect_tensorflow.tasks.training.sweep_trainer_main"
"""The trainer process: `python -m` this, the spec and connection on stdin (`trainer_main`)."""
RESULT_FILE = ".ptf-sweep-result.json"
LOCK_FILE = ".ptf-train.lock"
LOG_FILE = ".ptf-trainer.log"
ANSWER_FILE = ".ptf-trainer-answer.json"
ATTEMPTS_FILE = "attempts.jsonl"
MAX_CANDIDATES = 64
LOCK_WAIT_SECONDS = 120.0
TAG = "prefect_tensorflow."


class SweepError(PrefectTensorFlowError):
    """A sweep's settings are inconsistent, or candidates failed to train (each one named)."""


class Candidate(BaseModel):
    """One variant of the base training: its hyperparameters, seed and target step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hparams: dict[str, JsonValue] = Field(
        default_factory=dict, max_length=32, description="Model builder keyword arguments, over the base training's hparams"
    )
    seed: Optional[Seed] = Field(default=None, description="Seed of initialisation and shuffling; empty: the base training's")
    steps: Optional[Steps] = Field(default=None, description="Target global step; empty: the base training's")


Candidates = Annotated[list[Candidate], Field(min_length=1, max_length=MAX_CANDIDATES)]


def candidate_config(base: TrainingConfig, candidate: Candidate) -> TrainingConfig:
    """The config a candidate trains with: the base, its hparams updated, its seed and steps if set.

    Raises:
        SweepError: the base asks for `more_steps` (a candidate has an absolute target step)
            or several workers (each candidate trains in one process).
    """
    if base.more_steps is not None:
        raise SweepError("training.more_steps: a sweep candidate trains to an absolute step; set steps instead")
    if base.workers != 1:
        raise SweepError(f"training.workers: each sweep candidate trains in one process; expected 1, received {base.workers}")
    values = base.model_dump()
    values["hparams"] = {**base.hparams, **candidate.hparams}
    if candidate.seed is not None:
        values["seed"] = candidate.seed
    if candidate.steps is not None:
        values["steps"] = candidate.steps
    return TrainingConfig.model_validate(values)


def candidate_id(config: TrainingConfig) -> str:
    """`cand-<12 hex>`: a hash of everything in `config` that decides the checkpoints (not the summary cadence)."""
    settings = config.model_dump(mode="json", exclude={"summary_every_n_steps"})
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"cand-{digest[:12]}"


class CandidateSpec(BaseModel):
    """What the Dask task receives for one candidate (model code already resolved to import strings)."""

    model_config = ConfigDict(frozen=True)

    candidate_id: str
    index: int
    sweep_root: str
    model_dir: str
    config: TrainingConfig
    threads: int = Field(default=1, description="TensorFlow threads per pool in the trainer; 0: TensorFlow's default")
    tracking: Optional[MlflowConfig] = Field(default=None, description="Where the candidate's child run goes")
    parent_run_id: Optional[str] = None
    run_tags: dict[str, str] = Field(default_factory=dict, description="The Prefect flow run's tags, for the child run")


class CandidateResult(BaseModel):
    """A trained candidate: its training's result, where it was trained, what it cost."""

    model_config = ConfigDict(frozen=True)

    candidate_id: str
    index: int
    model_dir: str
    hparams: dict[str, JsonValue]
    seed: int
    steps: int
    training: TrainResult
    skipped: bool = Field(default=False, description="Already trained (its result file was there): nothing ran")
    timing: dict[str, float] = Field(default_factory=dict, description="Seconds: import, training, the whole child")
    forked: bool = Field(default=False, description="The trainer was forked from its worker's warm template")
    task_started: float = Field(default=0.0, description="Epoch seconds the task body started")
    task_finished: float = Field(default=0.0, description="Epoch seconds the task body ended")


def plan_candidates(
    sweep_root: str,
    base: TrainingConfig,
    candidates: list[Candidate],
    *,
    threads: int = 1,
    tracking: Optional[MlflowConfig] = None,
    parent_run_id: Optional[str] = None,
    run_tags: Optional[dict[str, str]] = None,
) -> list[CandidateSpec]:
    """One spec per candidate, its model dir `<sweep_root>/<candidate id>`; model code resolved here (trust).

    Raises:
        SweepError: two candidates have the same effective settings, or too many candidates.
        ImportStringError: the base's model or data is refused.
    """
    from .. import model_code

    if not candidates or len(candidates) > MAX_CANDIDATES:
        raise SweepError(f"candidates: expected 1 to {MAX_CANDIDATES} candidates, received {len(candidates)}")
    model = model_code.import_string(base.model, "model")
    data = model_code.import_string(base.data, "data")
    specs: list[CandidateSpec] = []
    seen: dict[str, int] = {}
    for index, candidate in enumerate(candidates):
        config = candidate_config(base, candidate)
        ident = candidate_id(config)
        if ident in seen:
            raise SweepError(f"candidates: {seen[ident]} and {index} have the same settings ({ident}); remove one")
        seen[ident] = index
        specs.append(
            CandidateSpec(
                candidate_id=ident,
                index=index,
                sweep_root=sweep_root,
                model_dir=os.path.join(sweep_root, ident),
                config=config.model_copy(update={"model": model, "data": data}),
                threads=threads,
                tracking=tracking.plain() if tracking is not None else None,
                parent_run_id=parent_run_id,
                run_tags=dict(run_tags or {}),
            )
        )
    return specs


def finished_result(spec: CandidateSpec) -> Optional[CandidateResult]:
    """The candidate's recorded result if it finished already, else None.

    Raises:
        SweepError: the model dir's result belongs to another candidate.
    """
    data = read_json(os.path.join(spec.model_dir, RESULT_FILE))
    if data is None:
        return None
    result = CandidateResult.model_validate(data)
    if result.candidate_id != spec.candidate_id:
        raise SweepError(f"{spec.model_dir}: holds the result of {result.candidate_id}, not {spec.candidate_id}")
    return result.model_copy(update={"index": spec.index})


def record_attempt(spec: CandidateSpec, event: str, **details: Any) -> None:
    """Append one line to `<sweep root>/attempts.jsonl`: which candidate, what happened, where."""
    line = {
        "time": time.time(),
        "candidate_id": spec.candidate_id,
        "event": event,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **details,
    }
    os.makedirs(spec.sweep_root, exist_ok=True)
    with open(os.path.join(spec.sweep_root, ATTEMPTS_FILE), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line, sort_keys=True) + "\n")


def train_candidate(spec: CandidateSpec) -> CandidateResult:
    """Train one sweep candidate in a child process, or return its result if it is trained already.

    Args:
        spec: the candidate (see `plan_candidates`).

    Returns:
        The candidate's result; `skipped` when nothing had to run.

    Raises:
        SweepError: the trainer failed (its error and log tail in the message).

    Example:
        >>> from prefect import flow
        >>> from prefect_tensorflow.tasks.prefect_tasks import train_sweep_candidate
        >>> @flow
        ... def one(spec) -> int:
        ...     return train_sweep_candidate(spec).training.final_step
    """
    started = time.time()
    log = get_logger()
    done = finished_result(spec)
    if done is not None:
        record_attempt(spec, "skipped")
        log.info("candidate %s is trained already (%s); not training it again", spec.candidate_id, spec.model_dir)
        return done.model_copy(update={"skipped": True, "task_started": started, "task_finished": time.time()})
    os.makedirs(spec.model_dir, exist_ok=True)
    record_attempt(spec, "started")
    payload = {
        "spec": spec.model_dump(mode="json", exclude={"tracking"}),
        "connection": spec.tracking.to_secret_json() if spec.tracking is not None else None,
        "spawned": time.time(),
    }
    log_path = os.path.join(spec.model_dir, LOG_FILE)
    answer_path = os.path.join(spec.model_dir, ANSWER_FILE)  # a forked trainer's stdout: none of the worker's pipes
    if os.path.exists(answer_path):
        os.remove(answer_path)  # an earlier attempt's
    process: Any = fork_trainer(payload, spec.threads, log_path, answer_path)
    if process is None:
        process = start_process(
            [sys.executable, "-m", TRAINER_MODULE],
            log_path=log_path,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            parent_variable=ENV_PARENT,
            threads=spec.threads,
        )
    how = "forked from the warm template" if isinstance(process, ForkedProcess) else "started cold"
    log.info("candidate %s: training in process %d, %s (%s)", spec.candidate_id, process.pid, how, spec.model_dir)
    try:
        if isinstance(process, ForkedProcess):
            process.wait()
            out = b""  # none: killed before it answered
            if os.path.exists(answer_path):
                with open(answer_path, "rb") as handle:
                    out = handle.read()
                os.remove(answer_path)
        else:
            out, _ = process.communicate(json.dumps(payload).encode())
    finally:
        if process.poll() is None:  # interrupted: never leave a trainer behind
            stop_process_group(process, grace=5.0)
    lines = [line for line in out.decode("utf-8", "replace").splitlines() if line.strip()]
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    if process.returncode != 0 or "error" in answer:
        how = (
            f"exited with status {process.returncode}"
            if process.returncode >= 0
            else f"was killed by signal {-process.returncode}"
        )
        record_attempt(spec, "failed", returncode=process.returncode)
        raise SweepError(
            f"candidate {spec.candidate_id} ({spec.model_dir}): the trainer {how}: "
            f"{answer.get('error', 'no result')}: {answer.get('message', '')}\n{log_tail(log_path, 1500)}"
        )
    result = CandidateResult.model_validate(answer)
    record_attempt(spec, "finished", start_step=result.training.start_step, final_step=result.training.final_step)
    update = {"index": spec.index, "task_started": started, "task_finished": time.time()}
    return result.model_copy(update={**update, "forked": isinstance(process, ForkedProcess)})


def stop_local_trainers(grace: float = 20.0) -> list[int]:
    """SIGTERM the sweep trainers this process started or had its template fork; wait for them (at most
    `grace` s); their pids.

    Each trainer saves a checkpoint at its next step, then exits (a preemption: `preemption.PreemptionGuard`).
    A cancelled or timed-out sweep runs this on every Dask worker (`client.run`) before its cluster goes,
    which would otherwise SIGKILL the trainers with their workers. Linux (reads `/proc`).
    """
    import signal

    parents, pids = {os.getpid(), template_pid()}, []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                parent = int(handle.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read()
        except (OSError, ValueError, IndexError):
            continue
        if parent in parents and TRAINER_MODULE.encode() in command:  # a forked one shows as a trainer too
            try:
                os.kill(int(entry), signal.SIGTERM)
                pids.append(int(entry))
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (its waiter reaps it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


# --- the trainer child process ---------------------------------------------------------------


def _lock(model_dir: str) -> Any:
    """An exclusive flock on `<model_dir>/.ptf-train.lock`, waiting up to LOCK_WAIT_SECONDS (the kernel
    drops a lock when its holder dies, even by SIGKILL)."""
    import fcntl

    handle = open(os.path.join(model_dir, LOCK_FILE), "a")
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise SweepError(f"{model_dir}: another trainer holds {LOCK_FILE} for {LOCK_WAIT_SECONDS:.0f} s") from None
            time.sleep(0.5)


def _candidate_runs(connection: MlflowConfig, spec: CandidateSpec, status: str) -> list[Any]:
    """This model dir's MLflow runs in `status` (the training's run is named `train-<candidate id>`)."""
    client = connection.client()
    found = connection.retrying(
        "finding candidate runs",
        client.search_runs,
        [connection.experiment_id()],
        filter_string=f"attributes.run_name = 'train-{spec.candidate_id}' and attributes.status = '{status}'",
        max_results=100,
    )
    return [run for run in found if run.data.tags.get(TAG + "model_dir") == spec.model_dir]


class _ChildRunTags:
    """Makes the candidate's training run a child of the sweep's run: tags it once it exists."""

    def __init__(self, connection: MlflowConfig, spec: CandidateSpec):
        self.connection, self.spec = connection, spec
        self.tagged: set[str] = set()
        self.searched = False

    def tags(self) -> dict[str, str]:
        tags = {**self.spec.run_tags, TAG + "stage": "sweep-candidate", TAG + "candidate_id": self.spec.candidate_id}
        if self.spec.parent_run_id:
            tags["mlflow.parentRunId"] = self.spec.parent_run_id
        return tags

    def tag(self, run_id: str) -> None:
        from mlflow.entities import RunTag

        if run_id in self.tagged:
            return
        client = self.connection.client()
        batch = [RunTag(k, v) for k, v in sorted(self.tags().items())]
        self.connection.retrying("tagging the candidate run", client.log_batch, run_id, tags=batch)
        self.tagged.add(run_id)

    def tag_running(self, *_: Any) -> None:
        """A training callback: on the first one the run exists; tag it now, so the UI nests it while it trains."""
        if self.searched:
            return
        self.searched = True
        for run in _candidate_runs(self.connection, self.spec, "RUNNING"):
            self.tag(run.info.run_id)


def _train_tracked(spec: CandidateSpec, connection: MlflowConfig) -> TrainResult:
    """`train_with_checkpoints` tracked in MLflow, its run a child of the sweep's run."""
    from .loop import train_with_checkpoints

    client = connection.client()
    for stale in _candidate_runs(connection, spec, "RUNNING"):  # left by a killed trainer: this one holds the lock
        connection.retrying("closing an interrupted candidate run", client.set_terminated, stale.info.run_id, "KILLED")
    child = _ChildRunTags(connection, spec)
    result = train_with_checkpoints(
        spec.model_dir, spec.config, connection, on_progress=child.tag_running, on_checkpoint=child.tag_running
    )
    if result.mlflow_run_id:
        child.tag(result.mlflow_run_id)
    return result


def trainer_main() -> int:
    """The cold child process: train one candidate (stdin: spec and connection), print its result (`train_from_payload`)."""
    main_started = time.time()
    die_with_parent(ENV_PARENT)
    skip_keras_optional_imports()  # a process of ours, as the warm template's (`sweep_forking_main`)
    payload = json.loads(sys.stdin.read())
    code = train_from_payload(payload, main_started)
    sys.stderr.flush()
    os._exit(code)  # skip TensorFlow's interpreter teardown (seconds): the result is on disk


def train_from_payload(payload: dict[str, Any], main_started: float) -> int:
    """Train the candidate in `payload` (spec and connection), write its result file, print it as the last line
    of stdout (or `{"error", "message"}`); the exit status to end with. In a trainer process only."""
    spec = CandidateSpec.model_validate(payload["spec"])
    connection = MlflowConfig.model_validate_json(payload["connection"]) if payload.get("connection") else None
    try:
        lock = _lock(spec.model_dir)
        done = finished_result(spec)  # trained by whoever held the lock before us
        if done is not None:
            print(json.dumps(done.model_dump(mode="json")), flush=True)
            return 0
        import tensorflow as tf

        imported = time.time()
        if spec.threads > 0:
            tf.config.threading.set_intra_op_parallelism_threads(spec.threads)
            tf.config.threading.set_inter_op_parallelism_threads(spec.threads)
        if connection is not None:
            training = _train_tracked(spec, connection)
        else:
            from .loop import train_with_checkpoints

            training = train_with_checkpoints(spec.model_dir, spec.config)
        trained = time.time()
        result = CandidateResult(
            candidate_id=spec.candidate_id,
            index=spec.index,
            model_dir=spec.model_dir,
            hparams=spec.config.hparams,
            seed=spec.config.seed,
            steps=spec.config.steps,
            training=training,
            timing={
                "spawn_to_main": main_started - float(payload.get("spawned") or main_started),
                "tensorflow_import": imported - main_started,
                "training": trained - imported,
                "child_total": trained - main_started,
            },
        )
        write_json_atomically(os.path.join(spec.model_dir, RESULT_FILE), result.model_dump(mode="json"))
        print(json.dumps(result.model_dump(mode="json")), flush=True)
        lock.close()
    except Exception as err:  # noqa: BLE001 - reported to the task, which raises SweepError
        import traceback

        traceback.print_exc()
        print(json.dumps({"error": type(err).__name__, "message": " ".join(str(err).split())[:2000]}), flush=True)
        return 1
    return 0


# --- ranking and the parent MLflow run -------------------------------------------------------


def rank_candidates(values: dict[int, float], mode: Mode) -> list[int]:
    """Candidate indexes best first by `values` (`mode` "max" or "min", see `metric_order`); ties go to the lower index.

    Example:
        >>> rank_candidates({0: 0.9, 1: 0.97, 2: 0.97}, "max")
        [1, 2, 0]
    """
    return best_first(sorted(values), values.__getitem__, mode)


def comparison_rows(
    results: list[CandidateResult], metrics: dict[int, dict[str, float]], steps: dict[int, Optional[int]], winner: Optional[int]
) -> list[dict[str, Any]]:
    """The comparison table: one row per candidate, its settings, the selected checkpoint's metrics, its run."""
    rows = []
    for result in sorted(results, key=lambda r: r.index):
        training = result.training
        if result.skipped:
            trained = "already trained"
        elif training.start_step:
            trained = f"resumed at step {training.start_step}"
        else:
            trained = "from scratch"
        rows.append(
            {
                "candidate": result.index,
                "id": result.candidate_id,
                "winner": "yes" if result.index == winner else "",
                "hparams": json.dumps(result.hparams, sort_keys=True),
                "seed": result.seed,
                "steps": result.steps,
                "checkpoint step": steps.get(result.index),
                **{k: round(v, 6) for k, v in sorted(metrics.get(result.index, {}).items())},
                "trained": trained,
                "mlflow run": training.mlflow_run_id or "",
                "model dir": result.model_dir,
            }
        )
    return rows


def start_sweep_run(connection: MlflowConfig, run_name: str, params: dict[str, Any]) -> str:
    """Create the sweep's parent MLflow run (Prefect run tags, `params` flattened); its id.

    Raises:
        MlflowUnavailableError: the server still failed after the retries.
    """
    from mlflow.entities import Param

    from ..registry.tracking import flatten_params
    from ..run_context import prefect_run_tags

    client = connection.client()
    experiment_id = connection.experiment_id()
    tags = {**prefect_run_tags(), TAG + "stage": "sweep"}
    run = connection.retrying("creating the sweep run", client.create_run, experiment_id, run_name=run_name, tags=tags)
    flat = [Param(k, v[:6000]) for k, v in sorted(flatten_params(params).items())]
    for start in range(0, len(flat), 100):
        connection.retrying("logging sweep params", client.log_batch, run.info.run_id, params=flat[start : start + 100])
    get_logger().info("MLflow sweep run %s: %s", run.info.run_id, connection.run_url(experiment_id, run.info.run_id))
    return run.info.run_id


def record_sweep_comparison(
    connection: MlflowConfig, run_id: str, rows: list[dict[str, Any]], metric: str, winner_id: Optional[str]
) -> None:
    """Log the comparison to the parent run: `sweep/comparison.json` and `.csv`, `<metric>/<id>` metrics, the winner.

    Raises:
        MlflowUnavailableError: the server still failed after the retries.
    """
    import csv

    from mlflow.entities import Metric, RunTag

    client = connection.client()
    now = int(time.time() * 1000)
    metrics = [Metric(f"{metric}/{row['id']}", float(row[metric]), now, 0) for row in rows if isinstance(row.get(metric), float)]
    tags = [RunTag(TAG + "candidates", str(len(rows)))]
    if winner_id is not None:
        tags.append(RunTag(TAG + "winner", winner_id))
        best = next(row for row in rows if row["id"] == winner_id)
        if isinstance(best.get(metric), float):
            metrics.append(Metric(f"best_{metric}", float(best[metric]), now, 0))
    with tempfile.TemporaryDirectory(prefix="ptf-sweep-") as tmp:
        path = os.path.join(tmp, "comparison.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2, default=str)
        fields = list(dict.fromkeys(key for row in rows for key in row))
        csv_path = os.path.join(tmp, "comparison.csv")
        with open(csv_path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

        def log() -> None:
            client.log_batch(run_id, metrics=metrics, tags=tags)
            client.log_artifact(run_id, path, "sweep")
            client.log_artifact(run_id, csv_path, "sweep")

        connection.retrying("logging the sweep comparison", log)


def end_sweep_run(connection: MlflowConfig, run_id: str, status: str = "FINISHED") -> None:
    """Mark the parent run FINISHED (or FAILED, KILLED)."""
    connection.retrying("ending the sweep run", connection.client().set_terminated, run_id, status)
