"""The `retrain` flow's wall time against a plain script making the same TensorFlow and MLflow calls.

The requirement: "the `retrain` flow's wall time against a plain script that
makes the same TensorFlow and MLflow calls without Prefect, side by side in
one run, for a training of about a minute". What it measures, in one
process, on the bundled iris model (batch 32, seed 0, `STEPS` steps from
scratch, a checkpoint every `EVERY` steps, the last `keep_checkpoint_max=5`
kept), all MLflow runs and registered models in one embedded SQLite store in
the scratch dir (`MlflowConnection(tracking_uri="sqlite:////<scratch>/mlflow/mlflow.db")`, the block
the flow's `mlflow` parameter takes, used by both cases,
`PREFECT_TENSORFLOW_HOME` pointing at the scratch dir while it runs), every
round into a fresh model dir, export base, frozen dir and registered model
name, so that every call really trains, exports and registers version 1:

- A "plain script": the plain functions the flow's tasks are made from
  (`prefect_tasks`), in the flow's order with the flow's arguments:
  `train_with_checkpoints(model_dir, TrainingConfig(...), connection)` (one
  MLflow run, the loss of every summary step sent by the `metric_sender`
  process, checkpoint list and event files as artifacts), `select_checkpoint`
  ("latest"), `freeze_graph` (verified `.pb`), `export_saved_model` (verified
  SavedModel version 1), `log_frozen_graph_to_mlflow` into the training run,
  `register_model_version` (pyfunc model logged, downloaded back and checked,
  version created, `challenger`), `gate_champion` (first version: scored,
  serving check, `champion`).
- B "retrain flow": `retrain(model_dir=..., training=TrainingConfig(...),
  export_base=..., frozen_dir=..., registered_model_name=..., mlflow=connection)`
  called in this process: the same work as A through Prefect: a flow run and
  6 task runs with their state changes (and the task retry options), the
  run logger's records and `log_prints` shipped to the API, and the flow's
  artifacts (checkpoint table, training summary, links to the MLflow run and
  model version).

The Prefect API is `prefect.testing.utilities.prefect_test_harness` (a
`prefect server` subprocess on a temporary SQLite database, what the tests
use), started ONCE before anything is timed; its start-up is reported as its
own row (H, one sample), not part of B. The harness's server process is
alive during A too (it is idle then), so both cases share the machine with
it.

Reported per case: the wall time of the whole call, the training loop's own
`elapsed_seconds` (the `TrainResult`; for B the one the task returned), and
the rest (wall - training loop: MLflow run set-up and close, select, freeze,
export, log, register, and for B Prefect's orchestration). One untimed
warm-up of each path with a short training (`WARM_STEPS`) comes first (the
first call in a process pays imports, tracing, the MLflow store's
migration). Then A and B run in interleaved rounds (a seeded random order
each round) and medians are taken.

How to read it: `xA` is a row's median over A's wall median; B's `xA` is
the flow's cost in units of the plain script (1.0 would be free). The notes
give the Prefect overhead as B-A seconds and as a fraction of A.
"""

from __future__ import annotations

import os
import shutil
import time

from .common import Scratch, fmt, interleaved, median, ratio_table, report, spread, timed
from .mlflow_logging import check_store

NAME = "retrain_flow"
# 1.1-3 ms per tracked step on this 2-core machine, depending on what else runs (a 3,000-step
# probe took 9.2 s at a load average of ~9; 20,000 steps took 30-49 s at 4-9, 30,000 steps
# 32-43 s at 1-2): 50,000 steps is a training of about a minute when the machine is quiet.
STEPS = 50_000
EVERY = 5_000
WARM_STEPS = 200
ROUNDS = 3
GATE_METRIC = "accuracy"

_ENV_DEFAULTS = {
    # as the CLI sets them (flows.defaults.apply_environment_defaults) and the tests do
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def run() -> dict:
    from prefect_tensorflow.tasks import iris

    saved_env = {key: os.environ.get(key) for key in ("PREFECT_TENSORFLOW_HOME", *_ENV_DEFAULTS)}
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        with Scratch(NAME) as scratch:
            os.environ["PREFECT_TENSORFLOW_HOME"] = scratch.path
            return _run(scratch, iris)
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run(scratch: Scratch, iris) -> dict:
    from prefect.testing.utilities import prefect_test_harness

    from prefect_tensorflow.flows.retrain import retrain
    from prefect_tensorflow.tasks.blocks import MlflowConnection
    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.checkpoints.selection import select_checkpoint
    from prefect_tensorflow.tasks.configs import ExportConfig, GateConfig, TrainingConfig
    from prefect_tensorflow.tasks.export.frozen_graph import freeze_graph
    from prefect_tensorflow.tasks.export.saved_model import export_saved_model
    from prefect_tensorflow.tasks.promotion.champion_gate import gate_champion
    from prefect_tensorflow.tasks.registry.model_versions import CHALLENGER, CHAMPION, register_model_version, version_aliases
    from prefect_tensorflow.tasks.registry.tracking import log_frozen_graph_to_mlflow
    from prefect_tensorflow.tasks.training.loop import train_with_checkpoints

    policy = CheckpointPolicy(save_checkpoints_steps=EVERY)
    gate = GateConfig(metric=GATE_METRIC, mode="max")
    conn = MlflowConnection(tracking_uri="sqlite:///" + os.path.join(scratch.path, "mlflow", "mlflow.db"))

    def training(steps: int) -> TrainingConfig:
        return TrainingConfig(model="iris", data="iris", steps=steps, batch_size=32, seed=0, policy=policy)

    counter = iter(range(10**6))

    def dirs(case: str) -> dict:
        root = scratch.fresh(f"{case}-{next(counter)}")
        return {
            "root": root,
            "model_dir": os.path.join(root, "model"),
            "export_base": os.path.join(root, "export"),
            "frozen_dir": os.path.join(root, "frozen"),
            "name": f"bench-{case}-{os.path.basename(root).split('-')[-1]}",
        }

    def plain(d: dict, steps: int) -> dict:
        """What `retrain` does, with the plain functions behind its tasks."""
        config = training(steps)
        result = train_with_checkpoints(d["model_dir"], config, conn)
        ref = select_checkpoint(result.model_dir, "latest")
        os.makedirs(d["frozen_dir"], exist_ok=True)
        export = ExportConfig(model=config.model, hparams=config.hparams, data=config.data)
        frozen = freeze_graph(ref.path, os.path.join(d["frozen_dir"], os.path.basename(ref.path) + ".pb"), export)
        exported = export_saved_model(ref.path, d["export_base"], export)
        log_frozen_graph_to_mlflow(conn, result.mlflow_run_id, frozen)
        registered = register_model_version(
            exported,
            d["name"],
            conn,
            checkpoint=ref,
            frozen=frozen,
            run_id=result.mlflow_run_id,
            data=config.data,
        )
        registered = registered.model_copy(update={"gate": gate_champion(registered, conn, gate, data=config.data)})
        registered = registered.model_copy(update={"aliases": version_aliases(registered, conn)})
        return {"training": result, "checkpoint": ref, "export": exported, "registered": registered}

    def flow(d: dict, steps: int) -> dict:
        summary = retrain(
            model_dir=d["model_dir"],
            training=training(steps),
            export_base=d["export_base"],
            frozen_dir=d["frozen_dir"],
            registered_model_name=d["name"],
            gate=gate,
            mlflow=conn,
        )
        return {
            "training": summary.training,
            "checkpoint": summary.checkpoint,
            "export": summary.export,
            "registered": summary.registered,
        }

    def check(case: str, out: dict, d: dict, steps: int) -> None:
        training, registered = out["training"], out["registered"]
        problems = []
        if training.final_step != steps or training.start_step != 0:
            problems.append(f"trained {training.start_step}..{training.final_step}, expected 0..{steps}")
        if out["checkpoint"].step != steps:
            problems.append(f"selected step {out['checkpoint'].step}")
        if out["export"].reused or out["export"].version != 1:
            problems.append(f"export version {out['export'].version} reused={out['export'].reused}")
        if (
            registered is None
            or registered.reused
            or registered.version != 1
            or registered.name != d["name"]
            or set(registered.aliases) != {CHALLENGER, CHAMPION}
            or registered.run_id != training.mlflow_run_id
        ):
            problems.append(f"registered {registered!r}")
        if problems:
            raise AssertionError(f"{case}: " + "; ".join(problems))

    def case(kind: str, fn, steps: int):
        def go() -> dict:
            d = dirs(kind)
            holder = {}
            seconds = timed(lambda: holder.setdefault("r", fn(d, steps)))
            out = holder["r"]
            check(kind, out, d, steps)
            elapsed = out["training"].elapsed_seconds
            shutil.rmtree(d["root"], ignore_errors=True)
            return {
                "seconds": seconds,
                "train": elapsed,
                "rest": seconds - elapsed,
                "name": d["name"],
                "mlflow_run_id": out["training"].mlflow_run_id,
            }

        return go

    check_store(conn, scratch.path)  # creates and migrates the store, outside every timed region
    harness_start = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=180):
        harness_seconds = time.perf_counter() - harness_start
        warm_start = time.perf_counter()
        warm = {"A": case("a", plain, WARM_STEPS)(), "B": case("b", flow, WARM_STEPS)()}
        warmup_seconds = time.perf_counter() - warm_start
        runs = interleaved({"A": case("a", plain, STEPS), "B": case("b", flow, STEPS)}, ROUNDS)

    samples = {f"{key}_{part}": [r[part] for r in runs[key]] for key in ("A", "B") for part in ("seconds", "train", "rest")}
    med = {key: median(values) for key, values in samples.items()}
    a_med, b_med = med["A_seconds"], med["B_seconds"]
    overhead = b_med - a_med
    paired = [b["seconds"] - a["seconds"] for a, b in zip(runs["A"], runs["B"])]
    ratios = {key: med[key] / a_med for key in med}
    ratios["B_over_A"] = b_med / a_med

    result = {
        "parameters": {
            "model": iris.MODEL,
            "steps": STEPS,
            "save_checkpoints_steps": EVERY,
            "keep_checkpoint_max": policy.keep_checkpoint_max,
            "batch_size": 32,
            "rounds": ROUNDS,
            "warmup_steps": WARM_STEPS,
            "prefect_api": "prefect_test_harness (prefect server subprocess, temporary SQLite), started once",
            "tracking_store": "embedded sqlite in the scratch dir",
        },
        "harness_startup_seconds": harness_seconds,
        "warmup_seconds": warmup_seconds,
        "warmup": warm,
        "runs": runs,
        "samples_seconds": samples,
        "median_seconds": med,
        "ratios": ratios,
        "prefect_overhead_seconds": overhead,
        "prefect_overhead_fraction": overhead / a_med,
        "paired_overhead_seconds": paired,
        "load_average_at_end": os.getloadavg(),
    }

    def row(key: str, label: str, what: str) -> list:
        return [label, med[key], spread(samples[key]), ratios[key], what]

    result["table"] = ratio_table(
        f"retrain_flow: retrain flow vs the same calls in a plain script, iris {STEPS:,} steps "
        f"(checkpoint every {EVERY:,}), {ROUNDS} interleaved rounds, medians",
        ["case", "median s", "min..max s", "xA", "what it does"],
        [
            row("A_seconds", "A  plain script, wall", "train_with_checkpoints..register_model_version"),
            row("B_seconds", "B  retrain flow, wall", "the same as a Prefect flow run"),
            row("A_train", "A  training loop", "TrainResult.elapsed_seconds"),
            row("B_train", "B  training loop", "the same, inside the task"),
            row("A_rest", "A  wall - training loop", "MLflow run, select..register"),
            row("B_rest", "B  wall - training loop", "the same + Prefect orchestration"),
            [
                "H  Prefect API start-up",
                harness_seconds,
                "1 sample",
                harness_seconds / a_med,
                "prefect_test_harness, once, untimed in B",
            ],
        ],
        notes=[
            f"B/A = {fmt(ratios['B_over_A'])}; Prefect overhead B-A = {fmt(overhead)} s of medians "
            f"({fmt(100 * overhead / a_med, 3)}% of A); per-round paired B-A: " + ", ".join(f"{p:+.1f}" for p in paired) + " s.",
            "every round: fresh model dir, export base, frozen dir and registered model name; version 1 "
            "with challenger + champion checked, the model logged in the training run.",
            f"warm-up (untimed, each path once with {WARM_STEPS} steps): {fmt(warmup_seconds)} s; "
            f"load average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs.",
        ],
    )
    return result


if __name__ == "__main__":
    report(NAME, run)
