"""What a durable commit costs: training with checkpoints fsynced (the default) vs not, side by side.

`CheckpointPolicy.durable_commit` (default True) fsyncs each checkpoint's
`.index` and `.data-*` files and the model dir before the state file names it,
the staged state file before its rename, and the model dir after. This
measures the real `train_with_checkpoints()` in one process, cases in
interleaved rounds, medians of `TrainResult.elapsed_seconds`, into a scratch
dir on the machine's own disk (`tempfile`'s), on:

- iris: `STEPS` steps with a checkpoint every `IRIS_EVERY` steps, `evaluation="none"`
  (the save alone), against no checkpoints at all;
- the ~100 MB model of `bench/large_model.py` (its model and data), a checkpoint
  every 20 steps.

Each with async saves (the default: the fsyncs run in the writer's thread, the
loop only waits when the next save finds the previous one still under way)
and sync saves (`async_save=False`: the whole commit, fsyncs included, is in
the loop, so `(sync fsync - sync no fsync) / saves` is the fsyncs' own cost
per commit). Readings: `fsync/no fsync` steps/s ratio per mode (1.0: free);
ms per commit.
"""

from __future__ import annotations

import shutil

from .common import Scratch, fmt, interleaved, median, ratio_table, report, spread

NAME = "fsync"
IRIS_STEPS = 2000
IRIS_EVERY = 50
LARGE_STEPS = 100
LARGE_EVERY = 20
ROUNDS = 3


def run() -> dict:
    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.configs import TrainingConfig
    from prefect_tensorflow.tasks.training.loop import train_with_checkpoints

    from .large_model import DATA as LARGE_DATA
    from .large_model import MODEL as LARGE_MODEL

    never = CheckpointPolicy(save_checkpoints_secs=1e9, save_at_start=False, save_at_end=False)

    def every(steps: int, async_save: bool, durable: bool) -> CheckpointPolicy:
        return CheckpointPolicy(
            save_checkpoints_steps=steps, save_at_start=False, save_at_end=False, async_save=async_save, durable_commit=durable
        )

    tables, results = [], {}
    with Scratch(NAME) as scratch:
        counter = iter(range(10**6))

        def case(model: str, data: str, steps: int, batch: int, policy: CheckpointPolicy):
            def go() -> dict:
                d = scratch.fresh(f"run-{next(counter)}")
                config = TrainingConfig(
                    model=model, data=data, steps=steps, batch_size=batch, policy=policy, seed=0, evaluation="none"
                )
                result = train_with_checkpoints(d, config)
                shutil.rmtree(d)
                return {"elapsed": result.elapsed_seconds, "saved": result.checkpoints_saved}

            return go

        for label, model, data, steps, each, batch in (
            ("iris", "iris", "iris", IRIS_STEPS, IRIS_EVERY, 32),
            ("large_model (~100 MB)", LARGE_MODEL, LARGE_DATA, LARGE_STEPS, LARGE_EVERY, 64),
        ):
            saves = steps // each
            cases = {
                "async, fsync": case(model, data, steps, batch, every(each, True, True)),
                "async, no fsync": case(model, data, steps, batch, every(each, True, False)),
                "sync, fsync": case(model, data, steps, batch, every(each, False, True)),
                "sync, no fsync": case(model, data, steps, batch, every(each, False, False)),
            }
            if label == "iris":
                cases["no checkpoints"] = case(model, data, steps, batch, never)
            case(model, data, 2 * each, batch, every(each, True, True))()  # untimed warm-up
            runs = interleaved(cases, ROUNDS)
            med = {key: median(r["elapsed"] for r in values) for key, values in runs.items()}
            rows = [[key, med[key], spread([r["elapsed"] for r in runs[key]]), steps / med[key]] for key in cases]
            ratios = {
                "async_fsync_over_no_fsync_steps_per_second": med["async, no fsync"] / med["async, fsync"],
                "sync_fsync_over_no_fsync_steps_per_second": med["sync, no fsync"] / med["sync, fsync"],
            }
            per_commit_ms = (med["sync, fsync"] - med["sync, no fsync"]) / saves * 1000
            results[label] = {
                "steps": steps,
                "every": each,
                "runs": runs,
                "median_elapsed_seconds": med,
                "ratios": ratios,
                "fsync_ms_per_commit_sync": per_commit_ms,
            }
            tables.append(
                ratio_table(
                    f"fsync, {label}: {steps} steps, a checkpoint every {each} ({saves} saves), "
                    f"{ROUNDS} interleaved rounds, medians",
                    ["case", "median s", "min..max s", "steps/s"],
                    rows,
                    notes=[
                        f"async: fsync/no fsync steps/s = {fmt(ratios['async_fsync_over_no_fsync_steps_per_second'])}; "
                        f"sync: {fmt(ratios['sync_fsync_over_no_fsync_steps_per_second'])}",
                        f"fsync cost per commit (sync saves, (fsync - no fsync) / saves): {fmt(per_commit_ms)} ms",
                    ],
                )
            )
    return {"cases": results, "table": "\n\n".join(tables)}


if __name__ == "__main__":
    report(NAME, run)
