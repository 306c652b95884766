"""Checkpointing a large model: steps/s with an async checkpoint every 20 steps, against none.

What it measures: the real `train_with_checkpoints()` on a dense model whose
variables are about 101 MB of float32 (1024 -> 4096 -> 4096 -> 1024 -> 10,
plain SGD: no optimizer slots, so the checkpoint is the variables) and whose
step takes at least 50 ms on this machine, on synthetic data. Cases run in
interleaved rounds in one process (medians of `TrainResult.elapsed_seconds`):

- A "none": no checkpoints;
- B "async, no eval": a checkpoint every 20 steps, async save, `evaluation="none"`
  (the save alone; the issue's goal is B/A >= 0.97);
- E "async, sidecar eval": B with the default sidecar evaluator (a second
  process that evaluates each checkpoint on one niced thread of the same two cores),
  started as a new process (importing TensorFlow), as in a process that trains once;
- W "async, sidecar eval, warm": E with the evaluator forked from this process's
  warm template (`evaluator_template.launch_template()`, called once before the
  rounds), as in a process that trains more than once;
- S "sync, no eval": B with `async_save=False`.

The step time is checked (>= 50 ms, else the batch is doubled up front) and reported.

`build_model` and `load_dataset` below are the model and data import strings
`bench.large_model:build_model` / `bench.large_model:load_dataset` (library
callers may pass import strings; the sidecar evaluator imports them too, so
run from the repository root).
"""

from __future__ import annotations

import os
import shutil

from .common import Scratch, fmt, interleaved, median, ratio_table, report, spread

NAME = "large_model"
MODEL = "bench.large_model:build_model"
DATA = "bench.large_model:load_dataset"
FEATURES = 1024
WIDTHS = (4096, 4096, 1024)
CLASSES = 10
EVERY = 20
STEPS = 200
ROUNDS = 3
MIN_STEP_SECONDS = 0.050
MB = 1e6
COLD_VARIABLE = "TF_BENCH_LARGE_MODEL_COLD_EVALUATOR"
"""Set during the cold cases: a variable read at TensorFlow's start-up that the template did not start with."""


def build_model(widths=WIDTHS, learning_rate: float = 0.01):
    """A compiled dense classifier of about 25 M float32 parameters (plain SGD)."""
    import keras

    inputs = keras.Input(shape=(FEATURES,), name="features")
    x = inputs
    for i, width in enumerate(widths):
        x = keras.layers.Dense(width, activation="relu", name=f"dense_{i}")(x)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES, name="logits")(x), name="large_dense")
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


def load_dataset(split: str = "train"):
    """Synthetic rows: 1,024 training rows, 64 evaluation rows, labels from a fixed projection."""
    import tensorflow as tf

    rows = 1024 if split == "train" else 64
    features = tf.random.stateless_normal([rows, FEATURES], seed=[1, 0 if split == "train" else 1])
    labels = tf.argmax(features[:, :CLASSES], axis=1, output_type=tf.int32)
    return tf.data.Dataset.from_tensor_slices((features, labels))


def run() -> dict:
    import numpy as np

    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.configs import TrainingConfig
    from prefect_tensorflow.tasks.training import evaluator_template
    from prefect_tensorflow.tasks.training.loop import train_with_checkpoints

    params = int(sum(np.prod(v.shape) for v in build_model().variables))
    never = CheckpointPolicy(save_checkpoints_secs=1e9, save_at_start=False, save_at_end=False)

    def every(async_save: bool) -> CheckpointPolicy:
        return CheckpointPolicy(save_checkpoints_steps=EVERY, save_at_start=False, save_at_end=False, async_save=async_save)

    with Scratch(NAME) as scratch:
        counter = iter(range(10**6))
        batch = 64

        def case(policy: CheckpointPolicy, evaluation: str, steps: int = STEPS, warm: bool = False):
            def go() -> dict:
                d = scratch.fresh(f"run-{next(counter)}")
                config = TrainingConfig(
                    model=MODEL, data=DATA, steps=steps, batch_size=batch, policy=policy, seed=0, evaluation=evaluation
                )
                if not warm:  # an environment the template was not started for: the evaluator starts as a new process
                    os.environ[COLD_VARIABLE] = "1"
                try:
                    result = train_with_checkpoints(d, config)
                finally:
                    os.environ.pop(COLD_VARIABLE, None)
                shutil.rmtree(d)
                return {"elapsed": result.elapsed_seconds, "saved": result.checkpoints_saved}

            return go

        # Calibrate: the step must take >= 50 ms (double the batch until it does).
        while True:
            short, longer = case(never, "none", 20)(), case(never, "none", 60)()
            step_seconds = (longer["elapsed"] - short["elapsed"]) / 40
            if step_seconds >= MIN_STEP_SECONDS or batch >= 1024:
                break
            batch *= 2
        cases = {
            "A": case(never, "none"),
            "B": case(every(True), "none"),
            "E": case(every(True), "sidecar"),
            "W": case(every(True), "sidecar", warm=True),
            "S": case(every(False), "none"),
        }
        evaluator_template.launch_template()
        assert evaluator_template.wait_until_ready(), "the evaluator template did not start"
        case(every(True), "sidecar", 2 * EVERY)()  # untimed warm-ups of the save path and the evaluators
        case(every(True), "sidecar", 2 * EVERY, warm=True)()
        runs = interleaved(cases, ROUNDS)
        evaluator_template.stop_template()

    for key in "BEWS":
        assert all(r["saved"] == STEPS // EVERY for r in runs[key]), runs[key]
    med = {key: median(r["elapsed"] for r in values) for key, values in runs.items()}
    a = med["A"]
    saves = STEPS // EVERY
    labels = {
        "B": f"B async, no eval (every {EVERY})",
        "E": "E async, sidecar eval",
        "W": "W async, sidecar eval, warm",
        "S": "S sync, no eval",
    }
    rows = [["A no checkpoints", a, spread([r["elapsed"] for r in runs["A"]]), STEPS / a, 1.0, "-"]]
    ratios, stall_ms = {}, {}
    for key, label in labels.items():
        x = med[key]
        ratios[key], stall_ms[key] = a / x, (x - a) / saves * 1000
        rows.append([label, x, spread([r["elapsed"] for r in runs[key]]), STEPS / x, ratios[key], stall_ms[key]])
    result = {
        "parameters": {
            "parameters": params,
            "variable_mb": params * 4 / MB,
            "batch_size": batch,
            "steps": STEPS,
            "save_checkpoints_steps": EVERY,
            "rounds": ROUNDS,
        },
        "step_ms": step_seconds * 1000,
        "runs": runs,
        "median_elapsed_seconds": med,
        "stall_ms_per_save": stall_ms,
        "ratios": {f"{key}_over_A_steps_per_second": value for key, value in ratios.items()},
    }
    result["table"] = ratio_table(
        f"large_model: {params * 4 / MB:.0f} MB of variables, step {fmt(step_seconds * 1000)} ms (batch {batch}), "
        f"{STEPS} steps, a checkpoint every {EVERY} ({saves} saves), {ROUNDS} interleaved rounds, medians",
        ["case", "median s", "min..max s", "steps/s", "X/A steps/s", "stall ms/save"],
        rows,
        notes=["goal: B/A >= 0.97 (async saves), E and W /A >= 0.95; stall per save = (X - A) / saves."],
    )
    return result


if __name__ == "__main__":
    report(NAME, run)
