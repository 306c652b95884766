"""Time from Cancel to the run's final state: a served `retrain` mid-training vs a plain served flow.

What it measures, against a real `prefect server start` and one runner
(`python -m bench.cancel serve`: `prefect.serve` of two deployments, module
entrypoints, as `prefect-tensorflow serve` serves them):

- A "retrain": a `retrain` run (no MLflow tracking, sidecar evaluator on) with
  millions of steps to go and a checkpoint every 500 steps, cancelled as the UI
  cancels (the run set to CANCELLING) once its first checkpoint exists; the
  training stops at the next step, saves a checkpoint, stops its evaluator,
  and the run ends Cancelled.
- B "plain flow": a served flow that sleeps in 0.1 s steps, cancelled the same
  way once it runs: what Prefect itself takes (the runner's SIGTERM, the
  process exit, the runner noticing it every 3 s, the Cancelled state).

Rounds interleaved, medians of the seconds from the cancel request to a final
state read back (polled every 0.1 s); the ratio is A over B.

Example:
    >>> from bench.cancel import CASES
    >>> CASES
    ('retrain', 'plain flow')
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from prefect import flow

from .common import Scratch, interleaved, median, ratio_table, spread

NAME = "cancel"
ROUNDS = 3
CASES = ("retrain", "plain flow")
LONG_TRAINING = {"more_steps": 10_000_000, "policy": {"save_checkpoints_steps": 500, "save_checkpoints_secs": None}}


@flow(name="sleeping")
def sleeping(marker: str, seconds: float = 3600.0) -> None:
    """A plain flow: says it runs (touches `marker`), then sleeps in short steps."""
    open(marker, "w").close()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.1)


def serve() -> None:
    """The runner of the benchmark: the retrain flow and the plain flow."""
    from prefect import serve as prefect_serve
    from prefect.deployments.runner import EntrypointType

    from bench.cancel import sleeping as plain  # this module under its name, not `__main__`: the flow-run process imports it
    from prefect_tensorflow.flows.retrain import retrain

    prefect_serve(
        retrain.to_deployment(name="bench-retrain", entrypoint_type=EntrypointType.MODULE_PATH),
        plain.to_deployment(name="bench-plain", entrypoint_type=EntrypointType.MODULE_PATH),
        limit=2,
    )


def run() -> dict:
    with Scratch(NAME) as scratch:
        return _run(scratch)


def _run(scratch: Scratch) -> dict:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.states import Cancelling

    from prefect_tensorflow.flows.servers import free_port, start_prefect_server
    from prefect_tensorflow.tasks.child_processes import log_tail, stop_process_group

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))},
        "PREFECT_HOME": os.path.join(scratch.path, "prefect-home"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_TENSORFLOW_HOME": os.path.join(scratch.path, "data"),
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "MLFLOW_TRACKING_URI": f"sqlite:///{scratch.path}/mlflow.db",
    }
    server = start_prefect_server("127.0.0.1", port, os.path.join(scratch.path, "server.log"), env=env)
    serve_log = os.path.join(scratch.path, "serve.log")
    with open(serve_log, "w") as out:
        runner = subprocess.Popen(
            [sys.executable, "-m", "bench.cancel", "serve"],
            env=env,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    counter = iter(range(1000))
    states: dict[str, list[str]] = {case: [] for case in CASES}
    try:
        with SyncPrefectClient(url) as client:
            deployments = _wait_for_deployments(client, runner, serve_log)

            def cancel_one(case: str) -> float:
                index = next(counter)
                if case == "retrain":
                    model_dir = os.path.join(scratch.path, "data", "models", f"r{index}")
                    parameters: dict[str, Any] = {"model_dir": model_dir, "training": LONG_TRAINING, "track": False}
                    ready = os.path.join(model_dir, "checkpoint")
                else:
                    ready = os.path.join(scratch.path, f"plain-{index}")
                    parameters = {"marker": ready}
                run_id = client.create_flow_run_from_deployment(deployments[case], parameters=parameters).id
                deadline = time.monotonic() + 600
                while not os.path.exists(ready):
                    if time.monotonic() > deadline or runner.poll() is not None:
                        raise RuntimeError(f"{case}: the run did not start:\n{log_tail(serve_log)}")
                    time.sleep(0.2)
                started = time.monotonic()
                client.set_flow_run_state(run_id, Cancelling(message="bench"))
                while True:
                    state = client.read_flow_run(run_id).state
                    if state is not None and state.is_final():
                        states[case].append(state.name)
                        return time.monotonic() - started
                    time.sleep(0.1)

            samples = interleaved({case: (lambda c=case: cancel_one(c)) for case in CASES}, ROUNDS)
    finally:
        stop_process_group(runner)
        stop_process_group(server)
    retrain_s, plain_s = median(samples["retrain"]), median(samples["plain flow"])
    rows = [
        ["retrain (mid-training)", retrain_s, spread(samples["retrain"]), retrain_s / plain_s, ", ".join(states["retrain"])],
        ["plain flow", plain_s, spread(samples["plain flow"]), 1.0, ", ".join(states["plain flow"])],
    ]
    result: dict[str, Any] = {
        "parameters": {"rounds": ROUNDS, "training": LONG_TRAINING},
        "median_seconds": {"retrain": retrain_s, "plain_flow": plain_s},
        "ratios": {"retrain_over_plain_flow": retrain_s / plain_s},
        "final_states": states,
        "samples": samples,
    }
    result["table"] = ratio_table(
        f"cancel: seconds from Cancel to the run's final state, served runs, {ROUNDS} interleaved rounds, medians",
        ["case", "median s", "min..max s", "ratio", "final states"],
        rows,
        notes=[
            "ratio: of the plain served flow; both include the runner's SIGTERM, the process exit and its 3 s polling.",
            "retrain adds: the stop at the next step, one checkpoint write, the evaluator stopped, TensorFlow's teardown.",
        ],
    )
    return result


def _wait_for_deployments(client: Any, runner: subprocess.Popen, log: str) -> dict[str, Any]:
    from prefect_tensorflow.tasks.child_processes import log_tail

    deadline = time.monotonic() + 300
    names = {"bench-retrain": "retrain", "bench-plain": "plain flow"}
    while True:
        found = {names[d.name]: d.id for d in client.read_deployments() if d.name in names}
        if len(found) == len(names):
            return found
        if runner.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the benchmark's runner did not serve its deployments:\n{log_tail(log)}")
        time.sleep(1)


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    serve()
