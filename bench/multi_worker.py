"""Training steps per second of 2 MultiWorkerMirroredStrategy workers against 1 process, on this machine.

What it measures, on the bundled iris model (global batch 32, checkpoints
only at the end, `evaluation="none"`), every run into a fresh model dir:

- P "1 process": `train_with_checkpoints` with `workers=1` (the default
  strategy, in this process; TensorFlow warmed up once);
- W2 "2 workers": `train_with_checkpoints` with `workers=2`: a supervisor
  and 2 worker processes on 127.0.0.1 (in a private network namespace when
  allowed), each taking 16 examples of every global batch of 32, the
  gradients all-reduced (ring) every step;
- W1 "1 MWMS worker": `train_multi_worker` with one worker: the same
  machinery (a supervisor, a worker process, the strategy) without a peer.

Each case runs `SHORT` and `LONG` steps; the steps/s is the difference
method, (LONG - SHORT) / (t_LONG - t_SHORT), so it excludes what a call pays
whatever its length (process start-up, `import tensorflow`, strategy creation,
tracing, the final save), reported as the fixed cost t_SHORT - SHORT / rate.
Rounds interleaved (a seeded random order each round), medians.

How to read it: W2/P is the speed-up of 2 workers over one process (2.0
would be perfect scaling). For a model as small as iris a step is a few
hundred microseconds of compute and each MWMS step adds two collectives over
gRPC (milliseconds): expect W2/P well below 1 here. MWMS pays off only when a
step's compute is large against the all-reduce, across machines.
"""

from __future__ import annotations

import os
import time

from .common import Scratch, fmt, interleaved, median, ratio_table, report, spread

NAME = "multi_worker"
SHORT = 200
LONG = 3000
ROUNDS = 2


def run() -> dict:
    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.configs import TrainingConfig
    from prefect_tensorflow.tasks.training.loop import train_with_checkpoints
    from prefect_tensorflow.tasks.training.multi_worker import train_multi_worker

    policy = CheckpointPolicy(save_checkpoints_secs=1e9, save_at_start=False, save_at_end=True)

    def config(steps: int, workers: int) -> TrainingConfig:
        return TrainingConfig(steps=steps, workers=workers, policy=policy, evaluation="none")

    with Scratch(NAME) as scratch:
        counter = iter(range(10**6))

        def case(kind: str, steps: int):
            def go() -> float:
                model_dir = scratch.fresh(f"{kind}-{steps}-{next(counter)}")
                start = time.perf_counter()
                if kind == "W1":
                    result = train_multi_worker(model_dir, config(steps, 1))
                else:
                    result = train_with_checkpoints(model_dir, config(steps, 2 if kind == "W2" else 1))
                wall = time.perf_counter() - start
                assert result.final_step == steps, result
                return wall

            return go

        warm_start = time.perf_counter()
        case("P", SHORT)()
        warmup = time.perf_counter() - warm_start
        cases = {f"{kind}-{steps}": case(kind, steps) for kind in ("P", "W2", "W1") for steps in (SHORT, LONG)}
        runs = interleaved(cases, ROUNDS)

    med = {key: median(values) for key, values in runs.items()}
    rates, fixed = {}, {}
    for kind in ("P", "W2", "W1"):
        rates[kind] = (LONG - SHORT) / max(med[f"{kind}-{LONG}"] - med[f"{kind}-{SHORT}"], 1e-9)
        fixed[kind] = med[f"{kind}-{SHORT}"] - SHORT / rates[kind]
    labels = {"P": "P 1 process (default strategy)", "W2": "W2 2 MWMS workers", "W1": "W1 1 MWMS worker"}
    rows = [
        [
            labels[kind],
            rates[kind],
            rates[kind] / rates["P"],
            1000 / rates[kind],
            fixed[kind],
            med[f"{kind}-{LONG}"],
            spread(runs[f"{kind}-{LONG}"]),
        ]
        for kind in ("P", "W2", "W1")
    ]
    result = {
        "parameters": {"model": "iris", "batch_size": 32, "short": SHORT, "long": LONG, "rounds": ROUNDS, "evaluation": "none"},
        "cpu_count": os.cpu_count(),
        "warmup_seconds": warmup,
        "runs": runs,
        "median_wall_seconds": med,
        "steps_per_second": rates,
        "fixed_seconds": fixed,
        "ratio_W2_over_P": rates["W2"] / rates["P"],
    }
    result["table"] = ratio_table(
        f"multi_worker: iris steps/s, 2 MultiWorkerMirroredStrategy workers vs 1 process ({LONG} - {SHORT} steps, "
        f"{ROUNDS} interleaved rounds, medians)",
        ["case", "steps/s", "x P", "ms/step", "fixed s", f"wall s ({LONG})", "min..max s"],
        rows,
        notes=[
            f"W2/P = {fmt(rates['W2'] / rates['P'])}: 2.0 would be perfect scaling; os.cpu_count() = {os.cpu_count()}.",
            "fixed s: start-up a call pays whatever its length (processes, TF import, strategy, tracing, last save).",
        ],
    )
    return result


if __name__ == "__main__":
    report(NAME, run)
