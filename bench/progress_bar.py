"""The CLI's progress bar against none: warm `train_with_checkpoints()` with and without it.

What it measures: in one process, iris, 3,000 steps from scratch (fresh model
dir each run, `evaluation="none"`, the default checkpoint policy), in
interleaved rounds, medians of `TrainResult.elapsed_seconds`:

- A "library": `train_with_checkpoints(model_dir, config)`;
- B "CLI": the same with `on_progress=` the CLI's own rich progress bar
  (`prefect_tensorflow.flows.cli._ProgressBar`), rendering as on a terminal
  (`FORCE_COLOR`/`TTY_INTERACTIVE` set, stderr sent to /dev/null so that the
  rendering runs and nothing shows).

The goal (issue 14) is B/A steps/s >= 0.98: the callback is throttled by time
(`PROGRESS_INTERVAL`) and by the summary steps, so a step pays a comparison.
"""

from __future__ import annotations

import contextlib
import os
import shutil

from .common import Scratch, interleaved, median, ratio_table, report, spread

NAME = "progress_bar"
STEPS = 3000
ROUNDS = 7


@contextlib.contextmanager
def _terminal_to_devnull():
    saved = {key: os.environ.get(key) for key in ("FORCE_COLOR", "TTY_INTERACTIVE")}
    os.environ.update({"FORCE_COLOR": "1", "TTY_INTERACTIVE": "1"})
    stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(stderr, 2)
        os.close(devnull)
        os.close(stderr)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run() -> dict:
    from prefect_tensorflow.flows.cli import _ProgressBar
    from prefect_tensorflow.tasks.configs import TrainingConfig
    from prefect_tensorflow.tasks.training.loop import train_with_checkpoints

    config = TrainingConfig(steps=STEPS, seed=0, evaluation="none")
    calls = []
    with Scratch(NAME) as scratch:
        counter = iter(range(10**6))

        def case(with_bar: bool):
            def go() -> float:
                d = scratch.fresh(f"run-{next(counter)}")
                bar = _ProgressBar() if with_bar else None
                updates = []

                def update(step: int, target: int, loss) -> None:
                    updates.append(step)
                    assert bar is not None
                    bar.update(step, target, loss)

                try:
                    with _terminal_to_devnull():
                        result = train_with_checkpoints(d, config, on_progress=update if with_bar else None)
                finally:
                    if bar is not None:
                        bar.stop()
                assert result.steps_run == STEPS, result
                if with_bar:
                    assert updates and updates[-1] == STEPS, updates[-3:]
                    calls.append(len(updates))
                shutil.rmtree(d)
                return result.elapsed_seconds

            return go

        case(True)()  # untimed warm-up: TensorFlow's start-up, rich's imports
        runs = interleaved({"library": case(False), "cli": case(True)}, ROUNDS)

    a, b = median(runs["library"]), median(runs["cli"])
    result = {
        "parameters": {"model": "iris", "steps": STEPS, "rounds": ROUNDS, "evaluation": "none"},
        "runs": runs,
        "median_elapsed_seconds": {"library": a, "cli": b},
        "progress_calls_per_run": median(calls),
        "ratios": {"cli_over_library_steps_per_second": a / b},
    }
    result["table"] = ratio_table(
        f"progress_bar: train_with_checkpoints() on iris, {STEPS} steps, with the CLI's progress bar vs without, "
        f"{ROUNDS} interleaved rounds, medians",
        ["case", "median s", "min..max s", "steps/s", "ratio", "ratio is"],
        [
            ["A library (no callback)", a, spread(runs["library"]), STEPS / a, 1.0, "baseline"],
            ["B CLI progress bar", b, spread(runs["cli"]), STEPS / b, a / b, "B/A steps/s (goal >= 0.98)"],
        ],
        notes=[f"progress callbacks per run (median): {median(calls):.0f} for {STEPS} steps."],
    )
    return result


if __name__ == "__main__":
    report(NAME, run)
