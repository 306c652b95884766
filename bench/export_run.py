"""From creating an `export-checkpoint` run to its registered version, against the same work in-process.

The requirement: "the time from creating an `export-checkpoint` run to its
registered version". What it measures, against a real `prefect server
start` on a free port of 127.0.0.1 (its own `PREFECT_HOME` in the scratch
dir) and a real `prefect-tensorflow serve` against it (what `make serve`
runs; `PREFECT_API_URL`, `PREFECT_TENSORFLOW_HOME` and `MLFLOW_TRACKING_URI`
pointing into the scratch dir), set up as `tests/test_deployments.py` does,
on one iris model dir trained once in this process (`train_with_checkpoints`,
300 steps, a checkpoint every 100, all kept). Deployment runs only reach
paths under `PREFECT_TENSORFLOW_ROOTS`: serve's is the scratch dir. Every case registers the step-300
checkpoint as version 1 of a fresh registered model name each round, into a
fresh export base and frozen dir, in the same embedded SQLite MLflow store
(`sqlite:////<scratch>/mlflow/mlflow.db`, artifacts beside it):

- A "in-process": the `export-checkpoint` flow's body with the plain
  functions its tasks are made from, in this process (TensorFlow imported and
  warm): `select_checkpoint("latest")`, `export_saved_model`
  (verified SavedModel version 1), `find_registered_version` (only for a
  reused export), `freeze_graph` (verified `.pb`), `log_frozen_graph_to_mlflow`
  (a new run), `register_model_version` (pyfunc model logged, downloaded
  back and checked, version created, `challenger`), `gate_champion` (first
  version: scored, serving check, `champion`),
  `set_model_version_aliases(["staging"])`.
- B "deployment run": `create_flow_run_from_deployment` of the served
  `export-checkpoint` deployment with the same parameters (`model_dir`,
  `checkpoint="latest"`, the registered model name, export base, frozen dir,
  `aliases=["staging"]`, model and data "iris"), what the UI's Run form posts; then
  poll (`read_flow_run` every `POLL` s) until the run is in a final state
  and `get_model_version_by_alias(name, "staging")` answers with version 1
  tagged with that flow run's id. Timed from the create call to that answer.
  It includes the runner's wait for scheduled work (`prefect-tensorflow serve`
  polls every 0.5 s, `flows/warm_runs.py`, unless `PREFECT_RUNNER_POLL_FREQUENCY`
  says otherwise), the start of the run's process (forked from serve's warm
  template, which imported Prefect, the flow module and TensorFlow once; with
  `PREFECT_TENSORFLOW_WARM_RUNS=false`, or before the warm path, a spawned
  Python that imports Prefect and the flow module, then TensorFlow by the
  run's first task), the flow (task runs, logs and artifacts sent to the
  server) and this poll's granularity. The run's state timestamps split B:
  created -> Pending (runner picked it up) -> Running (process started, flow
  run read and loaded) -> Completed -> seen here.
- C "import tensorflow": `python -c "import tensorflow"` as a subprocess,
  wall time: a reference for the subprocess start-up inside B.
- C2 "import flow + tensorflow": `python -c "import
  prefect_tensorflow.flows.export_checkpoint, tensorflow"`: Prefect, the
  flow module and TensorFlow, what the flow-run subprocess imports in all
  (the flow module before Running, TensorFlow after).

One untimed warm-up of A and of B comes first (the first in-process call
pays tracing; the first run creates the MLflow experiment). Then A, B, C and
C2 run in interleaved rounds (a seeded random order each round) and medians
are taken. The server's and serve's start-up times (to `/api/health`, to
both deployments existing) are reported once. Both processes are stopped
(their process groups; the flow-run subprocesses are in serve's) when the
benchmark ends, also when it fails.

How to read it: `xA` is a row's median over A's. B's `xA` is what a run
from the UI costs in units of the same work done in a warm process; B's
phases show how much of B-A is waiting for the runner, starting the
subprocess, and the flow itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime

from .common import Scratch, fmt, interleaved, median, ratio_table, report, spread, timed, wait_for_deployment
from .mlflow_logging import check_store

NAME = "export_run"
TRAIN_STEPS = 300
ROUNDS = 3
POLL = 0.2
RUN_TIMEOUT = 900
ALIAS = "staging"
GATE_METRIC = "accuracy"
BIN = os.path.dirname(sys.executable)


def _ts(value) -> float:
    return value.timestamp() if isinstance(value, datetime) else float(value)


def run() -> dict:
    HOME_ENV = "PREFECT_TENSORFLOW_HOME"  # noqa: N806

    saved_home = os.environ.get(HOME_ENV)
    try:
        with Scratch(NAME) as scratch:
            os.environ[HOME_ENV] = os.path.join(scratch.path, "data")
            return _run(scratch)
    finally:
        if saved_home is None:
            os.environ.pop(HOME_ENV, None)
        else:
            os.environ[HOME_ENV] = saved_home


def _run(scratch: Scratch) -> dict:
    import mlflow
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from prefect_tensorflow.flows.servers import free_port, start_prefect_server
    from prefect_tensorflow.tasks import iris
    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.checkpoints.selection import select_checkpoint
    from prefect_tensorflow.tasks.child_processes import log_tail, stop_process_group
    from prefect_tensorflow.tasks.configs import ExportConfig, GateConfig, TrainingConfig
    from prefect_tensorflow.tasks.export.frozen_graph import freeze_graph
    from prefect_tensorflow.tasks.export.saved_model import export_saved_model
    from prefect_tensorflow.tasks.promotion.champion_gate import gate_champion
    from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
    from prefect_tensorflow.tasks.registry.model_versions import (
        CHALLENGER,
        CHAMPION,
        find_registered_version,
        register_model_version,
        set_model_version_aliases,
    )
    from prefect_tensorflow.tasks.registry.tracking import log_frozen_graph_to_mlflow
    from prefect_tensorflow.tasks.training.loop import train_with_checkpoints

    root = scratch.path
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    tracking_uri = "sqlite:///" + os.path.join(root, "mlflow", "mlflow.db")
    environ = {
        **os.environ,
        "PREFECT_HOME": os.path.join(root, "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_TENSORFLOW_HOME": os.path.join(root, "data"),
        "PREFECT_TENSORFLOW_ROOTS": root,  # the trained dir, export bases and frozen dirs are all under it
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    for key in ("MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_TOKEN"):
        environ.pop(key, None)

    started = time.perf_counter()
    model_dir = os.path.join(scratch.fresh("trained"), "iris")
    policy = CheckpointPolicy(save_checkpoints_steps=100, keep_checkpoint_max=None)
    trained = train_with_checkpoints(model_dir, TrainingConfig(steps=TRAIN_STEPS, seed=0, policy=policy))
    if trained.final_step != TRAIN_STEPS:
        raise AssertionError(f"expected a model dir at step {TRAIN_STEPS}, got {trained!r}")
    train_seconds = time.perf_counter() - started

    conn = MlflowConfig(tracking_uri=tracking_uri)
    config = ExportConfig(model="iris", data="iris")
    gate = GateConfig(metric=GATE_METRIC, mode="max")
    check_store(conn, root)  # creates and migrates the store before anything is timed
    registry = mlflow.MlflowClient(tracking_uri)

    server_log = os.path.join(root, "prefect-server.log")
    serve_log = os.path.join(root, "serve.log")
    processes: list[subprocess.Popen] = []
    client = settings = None
    try:
        t0 = time.perf_counter()
        processes.append(start_prefect_server("127.0.0.1", port, server_log, env=environ))
        server_seconds = time.perf_counter() - t0

        settings = temporary_settings(updates={PREFECT_API_URL: api_url})
        settings.__enter__()
        client = SyncPrefectClient(api_url)
        client.__enter__()

        t0 = time.perf_counter()
        with open(serve_log, "w") as out:
            serve = subprocess.Popen(
                [os.path.join(BIN, "prefect-tensorflow"), "serve"],
                env=environ,
                cwd=root,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        processes.append(serve)
        deployment = wait_for_deployment(client, "export-checkpoint", serve, serve_log, 180)
        serve_seconds = time.perf_counter() - t0

        counter = iter(range(10**6))

        def fresh(case: str) -> dict:
            n = next(counter)
            d = scratch.fresh(f"{case}-{n}")
            return {
                "export_base": os.path.join(d, "export"),
                "frozen_dir": os.path.join(d, "frozen"),
                "name": f"bench-{case}-{n}",
            }

        def plain(d: dict):
            """The export-checkpoint flow's body with the plain functions its tasks are made from."""
            ref = select_checkpoint(os.path.abspath(model_dir), "latest")
            exported = export_saved_model(ref.path, d["export_base"], config)
            registered = find_registered_version(exported, d["name"], conn) if exported.reused else None
            if registered is None:
                os.makedirs(d["frozen_dir"], exist_ok=True)
                frozen = freeze_graph(ref.path, os.path.join(d["frozen_dir"], os.path.basename(ref.path) + ".pb"), config)
                run_name = f"export-checkpoint-{d['name']}-step-{ref.step}"
                run_id = log_frozen_graph_to_mlflow(conn, None, frozen, run_name=run_name)
                registered = register_model_version(
                    exported,
                    d["name"],
                    conn,
                    checkpoint=ref,
                    frozen=frozen,
                    run_id=run_id,
                    data="iris",
                )
                registered = registered.model_copy(update={"gate": gate_champion(registered, conn, gate, data="iris")})
            return set_model_version_aliases(registered, [ALIAS], conn)

        def a() -> dict:
            d = fresh("a")
            out = {}
            seconds = timed(lambda: out.setdefault("r", plain(d)))
            registered = out["r"]
            if (
                registered.reused
                or registered.version != 1
                or registered.name != d["name"]
                or set(registered.aliases) != {CHALLENGER, CHAMPION, ALIAS}
            ):
                raise AssertionError(f"A: expected a fresh version 1 with three aliases, got {registered!r}")
            return {"seconds": seconds, "name": d["name"]}

        def b() -> dict:
            d = fresh("b")
            parameters = {
                "model_dir": model_dir,
                "checkpoint": "latest",
                "registered_model_name": d["name"],
                "export_base": d["export_base"],
                "frozen_dir": d["frozen_dir"],
                "aliases": [ALIAS],
                "model": "iris",
                "data": "iris",
            }
            created_wall = time.time()
            start = time.perf_counter()
            run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
            deadline = time.monotonic() + RUN_TIMEOUT
            polls = 0
            while True:
                run = client.read_flow_run(run.id)
                polls += 1
                if run.state is not None and run.state.is_final():
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"B: flow run {run.id} still {run.state} after {RUN_TIMEOUT} s")
                time.sleep(POLL)
            if not run.state.is_completed():
                raise AssertionError(f"B: flow run {run.id} ended {run.state}:\n{log_tail(serve_log)}")
            version = registry.get_model_version_by_alias(d["name"], ALIAS)
            seconds = time.perf_counter() - start
            seen_wall = created_wall + seconds
            if (
                str(version.version) != "1"
                or set(version.aliases) != {CHALLENGER, CHAMPION, ALIAS}
                or version.tags.get("prefect.flow_run_id") != str(run.id)
            ):
                raise AssertionError(f"B: expected version 1 of {d['name']} from run {run.id}, got {version!r}")
            first: dict[str, float] = {}
            for state in sorted(client.read_flow_run_states(run.id), key=lambda s: _ts(s.timestamp)):
                first.setdefault(state.type.value, _ts(state.timestamp))
            marks = [created_wall, first.get("PENDING"), first.get("RUNNING"), first.get("COMPLETED"), seen_wall]
            phases = {}
            if None not in marks:
                phases = {
                    "pickup": marks[1] - marks[0],
                    "start": marks[2] - marks[1],
                    "flow": marks[3] - marks[2],
                    "seen": marks[4] - marks[3],
                }
            return {"seconds": seconds, "name": d["name"], "flow_run_id": str(run.id), "polls": polls, "phases": phases}

        def subprocess_case(code: str):
            def go() -> dict:
                env = {**environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

                def call() -> None:
                    subprocess.run(
                        [sys.executable, "-c", code],
                        env=env,
                        check=True,
                        cwd=root,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        timeout=600,
                    )

                return {"seconds": timed(call)}

            return go

        cases = {
            "A": a,
            "B": b,
            "C": subprocess_case("import tensorflow"),
            "C2": subprocess_case("import prefect_tensorflow.flows.export_checkpoint, tensorflow"),
        }
        warm_start = time.perf_counter()
        warm = {"A": a(), "B": b()}
        warmup_seconds = time.perf_counter() - warm_start
        runs = interleaved(cases, ROUNDS)
        load_at_end = os.getloadavg()
    finally:
        if client is not None:
            client.__exit__(None, None, None)
        if settings is not None:
            settings.__exit__(None, None, None)
        for process in reversed(processes):
            stop_process_group(process)

    samples = {key: [r["seconds"] for r in values] for key, values in runs.items()}
    phase_names = ("pickup", "start", "flow", "seen")
    phase_samples = {p: [r["phases"][p] for r in runs["B"] if r["phases"]] for p in phase_names}
    med = {key: median(values) for key, values in samples.items()}
    phase_med = {p: (median(v) if v else None) for p, v in phase_samples.items()}
    a_med = med["A"]
    ratios = {key: med[key] / a_med for key in med}
    ratios["B_over_A"] = med["B"] / a_med

    result = {
        "parameters": {
            "model": iris.MODEL,
            "checkpoint_step": TRAIN_STEPS,
            "rounds": ROUNDS,
            "poll_seconds": POLL,
            "runner_poll_frequency": os.environ.get("PREFECT_RUNNER_POLL_FREQUENCY", "0.5 (serve's default)"),
            "warm_runs": os.environ.get("PREFECT_TENSORFLOW_WARM_RUNS", "true (serve's default)"),
            "tracking_store": "embedded sqlite in the scratch dir, shared by A and the served runs",
            "aliases": [ALIAS],
        },
        "train_seconds": train_seconds,
        "server_startup_seconds": server_seconds,
        "serve_startup_seconds": serve_seconds,
        "warmup_seconds": warmup_seconds,
        "warmup": warm,
        "runs": runs,
        "samples_seconds": samples,
        "median_seconds": med,
        "b_phase_samples_seconds": phase_samples,
        "b_phase_median_seconds": phase_med,
        "ratios": ratios,
        "load_average_at_end": load_at_end,
    }

    def row(key: str, label: str, what: str) -> list:
        return [label, med[key], spread(samples[key]), ratios[key], what]

    def phase_row(p: str, label: str, what: str) -> list:
        values = phase_samples[p]
        if not values:
            return [label, None, "-", None, what]
        return [label, phase_med[p], spread(values), phase_med[p] / a_med, what]

    result["table"] = ratio_table(
        f"export_run: export-checkpoint run created through the API vs the same work in-process, "
        f"iris checkpoint (step {TRAIN_STEPS}), {ROUNDS} interleaved rounds, medians",
        ["case", "median s", "min..max s", "xA", "what it does"],
        [
            row("A", "A  in-process chain", "select..register + alias, warm"),
            row("B", "B  deployment run", "create run -> registered version seen"),
            phase_row("pickup", "   B: created -> Pending", "runner's poll for scheduled work"),
            phase_row("start", "   B: Pending -> Running", "fork (or spawn + import), read the run"),
            phase_row("flow", "   B: Running -> Completed", "the tasks, logs, artifacts (+ TF import cold)"),
            phase_row("seen", "   B: Completed -> seen", "this poll + the registry lookup"),
            row("C", "C  python -c 'import tensorflow'", "subprocess, reference"),
            row("C2", "C2 python -c 'import flow, tf'", "what the run's subprocess imports"),
        ],
        notes=[
            f"xA = median over A's ({fmt(a_med)} s); B/A = {fmt(ratios['B_over_A'])}, B-A = "
            f"{fmt(med['B'] - a_med)} s. B's phases are medians of their own (from the run's state "
            "timestamps), so they need not add up to B.",
            "every A and B registers version 1 of a fresh name (challenger, champion, staging checked; "
            "B's version carries its flow run id) from a fresh export base and frozen dir.",
            f"once, untimed: train_with_checkpoints({TRAIN_STEPS} steps) {fmt(train_seconds)} s; prefect server start -> "
            f"/api/health {fmt(server_seconds)} s; prefect-tensorflow serve -> deployments {fmt(serve_seconds)} s; "
            f"warm-up (A and B once) {fmt(warmup_seconds)} s.",
            f"runner poll frequency {result['parameters']['runner_poll_frequency']} s; warm runs "
            f"{result['parameters']['warm_runs']}; load average at the "
            f"end {', '.join(f'{x:.1f}' for x in load_at_end)} on {os.cpu_count()} CPUs.",
        ],
    )
    return result


if __name__ == "__main__":
    report(NAME, run)
