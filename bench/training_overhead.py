"""Training steps per second with a checkpoint every 100 steps, against no checkpoints.

What it measures: the real `train()` on the bundled iris model (batch 32,
3,000 steps from scratch, fresh model dir every run), in one process:

- A "no checkpoints": `CheckpointPolicy(save_checkpoints_secs=1e9,
  save_at_start=False, save_at_end=False)` -- never saves.
- B "every 100 steps": `CheckpointPolicy(save_checkpoints_steps=100,
  save_at_start=False, save_at_end=False)` -- 30 saves, each with what
  `train()` does at a checkpoint: evaluate on the eval split, append (and
  fsync) the metrics line, `CheckpointManager.save` (keeping 5), write the
  eval summaries.
- C "fixed cost": A with `steps=1`: what every `train()` call pays whatever
  its length (building the model and the input pipeline, tracing the step
  function, writing graph.pbtxt, the first step).

An untimed warm-up run (B's policy, 200 steps) comes first: the first
`train()` in a process pays TensorFlow's one-time start-up. Then A, B and C
are run in interleaved rounds (a seeded random order each round) and medians
are taken of `TrainResult.elapsed_seconds`, and for comparison of the wall
time of the call. The wall time also counts the return from `train()`:
dropping the run's tf.data iterator waits for tf.data's autotuning thread to
wake up (its sleep is not interrupted), which can add seconds, in steps, so
the wall rows are noisier and not what the headline ratio uses.

How to read it: `B/A steps/s` is the fraction of checkpoint-free training
speed left when checkpointing every 100 steps (1.0 = free; 0.8 = training
takes 25% longer). It includes each run's fixed cost on both sides, which
dilutes it; the "loop only" rows subtract C's median from both runs first.
`one checkpoint` = (B - A) / 30 is the time one checkpoint adds, measured as
a difference of two side-by-side medians, and its ratio is that time in
training steps (over the loop-only time of one step of A).
"""

from __future__ import annotations

import shutil
import time

from .common import Scratch, fmt, interleaved, median, ratio_table, spread, report

NAME = "training_overhead"
STEPS = 3000
EVERY = 100
WARMUP_STEPS = 200
ROUNDS = 7


def run() -> dict:
    from prefect_tensorflow.tasks.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.training import train

    without = CheckpointPolicy(save_checkpoints_secs=1e9, save_at_start=False, save_at_end=False)
    every = CheckpointPolicy(save_checkpoints_steps=EVERY, save_at_start=False, save_at_end=False)
    expected_saves = STEPS // EVERY

    with Scratch(NAME) as scratch:
        counter = iter(range(10**6))

        def case(policy, steps: int, saves: int):
            def go() -> dict:
                d = scratch.fresh(f"run-{next(counter)}")
                start = time.perf_counter()
                result = train(d, steps=steps, policy=policy, seed=0)
                wall = time.perf_counter() - start
                if result.steps_run != steps or result.checkpoints_saved != saves:
                    raise AssertionError(
                        f"expected {steps} steps and {saves} checkpoints, got {result.steps_run} "
                        f"steps and {result.checkpoints_saved} checkpoints"
                    )
                shutil.rmtree(d)
                return {
                    "elapsed": result.elapsed_seconds,
                    "wall": wall,
                    "steps": result.steps_run,
                    "checkpoints": result.checkpoints_saved,
                }

            return go

        warm_start = time.perf_counter()
        case(every, WARMUP_STEPS, WARMUP_STEPS // EVERY)()
        warmup_seconds = time.perf_counter() - warm_start
        runs = interleaved(
            {
                "A": case(without, STEPS, 0),
                "B": case(every, STEPS, expected_saves),
                "C": case(without, 1, 0),
            },
            ROUNDS,
        )

    def med(key: str, field: str = "elapsed") -> float:
        return median(r[field] for r in runs[key])

    a, b, c = med("A"), med("B"), med("C")
    a_wall, b_wall = med("A", "wall"), med("B", "wall")
    rate_a, rate_b = STEPS / a, STEPS / b
    loop_a, loop_b = STEPS / (a - c), STEPS / (b - c)
    per_ckpt = (b - a) / expected_saves
    result = {
        "parameters": {
            "model": "prefect_tensorflow.tasks.iris:build_model",
            "steps": STEPS,
            "save_checkpoints_steps": EVERY,
            "checkpoints_per_run": expected_saves,
            "batch_size": 32,
            "rounds": ROUNDS,
            "warmup_steps": WARMUP_STEPS,
        },
        "warmup_seconds": warmup_seconds,
        "runs": runs,
        "median_elapsed_seconds": {"A_no_checkpoints": a, "B_every_100": b, "C_fixed_cost": c},
        "median_wall_seconds": {"A_no_checkpoints": a_wall, "B_every_100": b_wall, "C_fixed_cost": med("C", "wall")},
        "steps_per_second": {
            "A_no_checkpoints": rate_a,
            "B_every_100": rate_b,
            "A_loop_only": loop_a,
            "B_loop_only": loop_b,
            "A_wall": STEPS / a_wall,
            "B_wall": STEPS / b_wall,
        },
        "seconds_per_checkpoint": per_ckpt,
        "ratios": {
            "B_over_A_steps_per_second": rate_b / rate_a,
            "B_over_A_loop_only": loop_b / loop_a,
            "B_over_A_wall": a_wall / b_wall,
            "checkpoint_seconds_over_step_seconds": per_ckpt / ((a - c) / STEPS),
        },
    }
    el = {k: [r["elapsed"] for r in v] for k, v in runs.items()}
    wl = {k: [r["wall"] for r in v] for k, v in runs.items()}
    r = result["ratios"]
    result["table"] = ratio_table(
        f"training_overhead: train() on iris, {STEPS} steps, checkpoint every {EVERY} vs none, "
        f"{ROUNDS} interleaved rounds, medians",
        ["case", "median s", "min..max s", "steps/s", "ratio", "ratio is"],
        [
            ["A no checkpoints (elapsed_seconds)", a, spread(el["A"]), rate_a, 1.0, "baseline"],
            [f"B every {EVERY} steps ({expected_saves} saves)", b, spread(el["B"]), rate_b,
             r["B_over_A_steps_per_second"], "B/A steps/s"],
            ["C fixed cost (steps=1)", c, spread(el["C"]), "-", c / a, "C/A seconds"],
            ["A loop only (A - C)", a - c, "-", loop_a, 1.0, "baseline"],
            ["B loop only (B - C)", b - c, "-", loop_b, r["B_over_A_loop_only"], "B/A steps/s"],
            ["A wall time of the call", a_wall, spread(wl["A"]), STEPS / a_wall, 1.0, "baseline"],
            ["B wall time of the call", b_wall, spread(wl["B"]), STEPS / b_wall, r["B_over_A_wall"], "B/A steps/s"],
            ["one checkpoint: (B - A) / saves", per_ckpt, "-", "-",
             r["checkpoint_seconds_over_step_seconds"], "checkpoint/step time"],
        ],
        notes=[
            f"warm-up run ({WARMUP_STEPS} steps, untimed): {fmt(warmup_seconds)} s.",
            "elapsed = TrainResult.elapsed_seconds; wall also counts the call's return (deleting the",
            "tf.data iterator: it waited seconds for tf.data's autotune thread until autotune was turned off).",
            "each checkpoint includes evaluating the eval split for the metrics recorded beside it.",
        ],
    )
    return result


if __name__ == "__main__":
    report(NAME, run)
