"""20 `export-checkpoint` runs queued at once through `serve --limit 4` against one run alone.

What it measures, against a real `prefect server start` on its default SQLite
database (its own `PREFECT_HOME` in the scratch dir) and a real
`prefect-tensorflow serve --limit LIMIT` against it, on one iris model dir
trained once in this process (300 steps, a checkpoint every 100, all kept:
steps 0, 100, 200, 300), every run writing to the same embedded SQLite MLflow
store (created before anything is timed):

- A "one run alone": one run created as the UI's Run form does (`checkpoint`
  300, a fresh registered model name), timed from the create call until the
  run is final.
- B "20 at once": RUNS runs created back to back for a fresh registered
  model name, the checkpoints 0, 100, 200, 300 in turn (5 runs each), timed
  from the first create call until every run is final (polled every POLL s).
  Checked: every run Completed, one model version per checkpoint (4).

How to read it: throughput is runs per minute; `B / (RUNS x A)` is the time
of 20 queued runs against 20 run one after another (below 1: the queue and
the idempotent re-runs of an exported checkpoint pay off). One untimed
warm-up run of A first; then ROUNDS interleaved rounds, medians.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from .common import Scratch, fmt, interleaved, median, ratio_table, report, spread, wait_for_deployment

NAME = "many_runs"
RUNS = 20
LIMIT = 4
STEPS = (0, 100, 200, 300)
ROUNDS = 1
POLL = 1.0
RUN_TIMEOUT = 1800
BIN = os.path.dirname(sys.executable)


def run() -> dict:
    with Scratch(NAME) as scratch:
        return _run(scratch)


def _run(scratch: Scratch) -> dict:
    import mlflow
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from prefect_tensorflow.flows.servers import free_port, start_prefect_server
    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.child_processes import log_tail, stop_process_group
    from prefect_tensorflow.tasks.configs import TrainingConfig
    from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
    from prefect_tensorflow.tasks.training.loop import train_with_checkpoints

    root = scratch.path
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    tracking_uri = "sqlite:///" + os.path.join(root, "data", "mlflow", "mlflow.db")
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))},
        "PREFECT_HOME": os.path.join(root, "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_TENSORFLOW_HOME": os.path.join(root, "data"),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    model_dir = os.path.join(root, "data", "models", "iris")
    policy = CheckpointPolicy(save_checkpoints_steps=100, keep_checkpoint_max=None)
    train_with_checkpoints(model_dir, TrainingConfig(steps=STEPS[-1], seed=0, policy=policy))
    os.makedirs(os.path.join(root, "data", "mlflow"), exist_ok=True)
    MlflowConfig(tracking_uri=tracking_uri).client().search_registered_models()  # the store exists before timing
    registry = mlflow.MlflowClient(tracking_uri, tracking_uri)

    server_log, serve_log = os.path.join(root, "prefect-server.log"), os.path.join(root, "serve.log")
    processes: list[subprocess.Popen] = []
    counter = iter(range(10**6))
    try:
        processes.append(start_prefect_server("127.0.0.1", port, server_log, env=environ))
        with open(serve_log, "w") as out:
            processes.append(
                subprocess.Popen(
                    [os.path.join(BIN, "prefect-tensorflow"), "serve", "--limit", str(LIMIT)],
                    env=environ,
                    cwd=root,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        with temporary_settings(updates={PREFECT_API_URL: api_url}), SyncPrefectClient(api_url) as client:
            deployment = wait_for_deployment(client, "export-checkpoint", processes[-1], serve_log, 300)

            def queue(steps: list[int]) -> dict:
                name = f"bench-many-{next(counter)}"
                start = time.perf_counter()
                ids = [
                    client.create_flow_run_from_deployment(
                        deployment.id,
                        parameters={"model_dir": model_dir, "checkpoint": str(step), "registered_model_name": name},
                    ).id
                    for step in steps
                ]
                deadline = time.monotonic() + RUN_TIMEOUT
                while True:
                    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=200)
                    if len(runs) == len(ids) and all(r.state is not None and r.state.is_final() for r in runs):
                        break
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{name}: runs not final after {RUN_TIMEOUT} s")
                    time.sleep(POLL)
                seconds = time.perf_counter() - start
                bad = [f"{r.name}: {r.state.name} {r.state.message}" for r in runs if not r.state.is_completed()]
                versions = registry.search_model_versions(f"name = '{name}'")
                if bad or len(versions) != len(set(steps)):
                    raise AssertionError(f"{name}: {bad}, {len(versions)} versions:\n{log_tail(serve_log)}")
                return {"seconds": seconds, "name": name, "versions": len(versions)}

            queue([STEPS[-1]])  # warm-up: the first run creates the experiment
            cases = {"A": lambda: queue([STEPS[-1]]), "B": lambda: queue([STEPS[i % len(STEPS)] for i in range(RUNS)])}
            runs = interleaved(cases, ROUNDS)
            load_at_end = os.getloadavg()
    finally:
        for process in reversed(processes):
            stop_process_group(process)

    samples = {key: [r["seconds"] for r in values] for key, values in runs.items()}
    med = {key: median(values) for key, values in samples.items()}
    throughput = {"A": 60.0 / med["A"], "B": RUNS * 60.0 / med["B"]}
    queued_vs_serial = med["B"] / (RUNS * med["A"])
    result = {
        "parameters": {"runs": RUNS, "limit": LIMIT, "steps": STEPS, "rounds": ROUNDS, "prefect_database": "sqlite"},
        "runs": runs,
        "median_seconds": med,
        "runs_per_minute": throughput,
        "ratios": {"B_over_RUNS_x_A": queued_vs_serial},
        "load_average_at_end": load_at_end,
    }
    result["table"] = ratio_table(
        f"many_runs: {RUNS} export-checkpoint runs queued at once through serve --limit {LIMIT} (Prefect on SQLite) "
        f"vs one run alone, {ROUNDS} round(s)",
        ["case", "median s", "min..max s", "runs/min", "what it does"],
        [
            ["A  one run alone", med["A"], spread(samples["A"]), throughput["A"], "create -> final, checkpoint 300"],
            ["B  20 at once", med["B"], spread(samples["B"]), throughput["B"], "4 checkpoints x 5 runs -> 4 versions"],
        ],
        notes=[
            f"B / ({RUNS} x A) = {fmt(queued_vs_serial)}: the queue against {RUNS} runs one after another.",
            f"load average at the end {', '.join(f'{x:.1f}' for x in load_at_end)} on {os.cpu_count()} CPUs.",
        ],
    )
    return result


if __name__ == "__main__":
    report(NAME, run)
