"""The whole `train` call against its training loop, and the CLI's training loop against the library's.

What it measures, iris, 3,000 steps from scratch, the default config (the
Estimator's checkpoint policy, `evaluation="sidecar"`), a fresh model dir
every run, repetitions interleaved, medians:

- "call / loop": in this process (warm: one untimed run first), the wall time
  of `train_with_checkpoints()` over the same run's `TrainResult.loop_seconds`
  (its first step to its last save). What lies between them: the model's
  set-up, and the wait, at the end, for every kept checkpoint's metrics
  (the sidecar evaluator's start-up -- a TensorFlow import -- and its
  evaluations). Each run checks that every kept checkpoint has its metrics
  line when the call returns.
- "CLI loop / library loop": `loop_seconds` of `prefect-tensorflow train
  --json` (its progress bar rendering as on a terminal) against
  `train_with_checkpoints()` called by a plain script, both fresh processes
  (`python -m ...`), the same config, as steps/s (library seconds / CLI
  seconds).

Goals (issue 23): call / loop <= 1.3; CLI loop / library loop >= 0.98.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from .common import Scratch, interleaved, median, ratio_table, report, spread

NAME = "train_call"
STEPS = 3000
ROUNDS = 5
PROCESS_ROUNDS = 3
"""Rounds of the fresh-process pair (each process imports TensorFlow: ~10 s, minutes on a loaded machine)."""

LIBRARY_SCRIPT = """
import json, sys
from prefect_tensorflow.tasks.configs import TrainingConfig
from prefect_tensorflow.tasks.training.loop import train_with_checkpoints
result = train_with_checkpoints(sys.argv[1], TrainingConfig(steps=int(sys.argv[2]), seed=0))
print(json.dumps({"loop_seconds": result.loop_seconds, "steps_run": result.steps_run}))
"""


def _metrics_complete(model_dir: str) -> list[int]:
    """The kept checkpoints of `model_dir` that have no metrics line (empty: complete)."""
    from prefect_tensorflow.tasks.training.sidecar_evaluator import unevaluated_steps

    return unevaluated_steps(model_dir)


def _fresh_process(command: list[str], terminal: bool) -> dict:
    env = dict(os.environ)
    if terminal:
        env.update({"FORCE_COLOR": "1", "TTY_INTERACTIVE": "1"})
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"{command[:4]} exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout[done.stdout.index("{") :])  # the CLI's JSON spans lines


def run() -> dict:
    from prefect_tensorflow.tasks.configs import TrainingConfig
    from prefect_tensorflow.tasks.training.loop import train_with_checkpoints

    config = TrainingConfig(steps=STEPS, seed=0)
    with Scratch(NAME) as scratch:
        counter = iter(range(10**6))

        def in_process() -> dict:
            d = scratch.fresh(f"call-{next(counter)}")
            start = time.perf_counter()
            result = train_with_checkpoints(d, config)
            wall = time.perf_counter() - start
            missing = _metrics_complete(d)
            if result.steps_run != STEPS or missing or "accuracy" not in result.final_metrics:
                raise AssertionError(f"{result}; checkpoints without metrics: {missing}")
            shutil.rmtree(d)
            return {"wall": wall, "loop": result.loop_seconds, "elapsed": result.elapsed_seconds}

        def cli() -> float:
            d = scratch.fresh(f"cli-{next(counter)}")
            command = [sys.executable, "-m", "prefect_tensorflow.flows.cli", "train", "--model-dir", d]
            out = _fresh_process([*command, "--steps", str(STEPS), "--seed", "0", "--json"], terminal=True)
            shutil.rmtree(d)
            return float(out["loop_seconds"])

        def library() -> float:
            d = scratch.fresh(f"lib-{next(counter)}")
            out = _fresh_process([sys.executable, "-c", LIBRARY_SCRIPT, d, str(STEPS)], terminal=False)
            shutil.rmtree(d)
            return float(out["loop_seconds"])

        in_process()  # untimed warm-up: TensorFlow's import, the first tracing
        calls = interleaved({"call": in_process}, ROUNDS)["call"]
        print(f"call/loop: {[round(c['wall'] / c['loop'], 2) for c in calls]}", flush=True)
        loops = interleaved({"cli": cli, "library": library}, PROCESS_ROUNDS)

    wall, loop = median(c["wall"] for c in calls), median(c["loop"] for c in calls)
    call_over_loop = median(c["wall"] / c["loop"] for c in calls)
    cli_loop, lib_loop = median(loops["cli"]), median(loops["library"])
    result = {
        "parameters": {
            "model": "iris",
            "steps": STEPS,
            "rounds": ROUNDS,
            "process_rounds": PROCESS_ROUNDS,
            "evaluation": "sidecar",
            "load": os.getloadavg(),
        },
        "calls": calls,
        "loops": loops,
        "median_wall_seconds": wall,
        "median_loop_seconds": loop,
        "ratios": {"call_over_loop": call_over_loop, "cli_over_library_loop_steps_per_second": lib_loop / cli_loop},
    }
    result["table"] = ratio_table(
        f"train_call: iris, {STEPS} steps, default config (sidecar evaluation), {ROUNDS} rounds in-process and "
        f"{PROCESS_ROUNDS} of fresh processes, medians "
        f"(load {os.getloadavg()[0]:.2f})",
        ["case", "median s", "min..max s", "ratio", "ratio is"],
        [
            ["loop (TrainResult.loop_seconds)", loop, spread([c["loop"] for c in calls]), 1.0, "baseline"],
            [
                "whole train_with_checkpoints call",
                wall,
                spread([c["wall"] for c in calls]),
                call_over_loop,
                "call/loop (goal <= 1.3)",
            ],
            ["library loop, fresh process", lib_loop, spread(loops["library"]), 1.0, "baseline"],
            [
                "CLI `train --json` loop, fresh process",
                cli_loop,
                spread(loops["cli"]),
                lib_loop / cli_loop,
                "CLI/library steps/s (goal >= 0.98)",
            ],
        ],
        notes=["call/loop is the median of each run's own ratio; every run checks each kept checkpoint has its metrics."],
    )
    return result


if __name__ == "__main__":
    report(NAME, run)
