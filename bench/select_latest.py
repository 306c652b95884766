"""`select_latest_checkpoint` on a model dir of 10,000 checkpoints against one of 1.

What it measures: the per-call time of
`prefect_tensorflow.tasks.checkpoints.selection.select_latest_checkpoint(model_dir)` (and
of `tf.train.latest_checkpoint`), every case called once per round, 200
rounds in a seeded random order each round, medians taken.

The model dirs:

- "1 checkpoint": `train_with_checkpoints(TrainingConfig(steps=1))` with `save_at_start` and not
  `save_at_end`, which commits `model.ckpt-0` (index, data shard, metrics
  line). `train_with_checkpoints()` writes `graph.pbtxt` and its event files before the first
  save, so the state file is already the directory's last change; the
  benchmark checks that and rewrites it last anyway, so the baseline holds
  even if that ever changes.
- "10,000 checkpoints": that checkpoint's `.index` and `.data-00000-of-00001`
  hard-linked (copied if links fail) as `model.ckpt-<step>` for steps
  0, 100, ..., 999,900, the metrics log copied, and the `checkpoint` state
  file written LAST by atomic rename (temp file + `os.replace`), naming the
  highest step and, as `all_model_checkpoint_paths`, the 5 newest. That
  makes the rename the directory's last change, which is what the library's
  fast path checks (`checkpoint_files.state_file_is_last_change`); the
  benchmark verifies every dir takes the path it is meant to (by counting
  directory listings during one call) and finds the highest step.
- the same with a 10,000-line metrics log (one line per checkpoint, what
  `train_with_checkpoints()` leaves behind after 10,000 saves whatever `keep_checkpoint_max`
  is): the fast path still parses the whole log on every call.
- the same without a state file: the fallback lists the directory, sorts
  every prefix by step and validates the newest.
- the same with a state file listing all 10,000 checkpoints with their
  timestamps, as `tf.train.CheckpointManager(max_to_keep=None)` writes it
  (the only way TensorFlow leaves 10,000 checkpoints in a dir): the fast
  path parses every line of it.

How to read it: each row's ratio is its median per-call time over the median
of `select_latest_checkpoint` on the 1-checkpoint dir. About 1 means the cost
does not grow with the number of checkpoints; the fallback row shows what
the fast path saves; the `tf.train.latest_checkpoint` rows are TensorFlow's
unvalidated answer for comparison. p90 is the 90th percentile of the calls.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable

from .common import Scratch, fmt, interleaved, median, ratio_table, report

NAME = "select_latest"
CHECKPOINTS = 10_000
STEP_GAP = 100
CALLS = 200
KEEP_IN_STATE = 5


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
        return "link"
    except OSError:
        shutil.copyfile(src, dst)
        return "copy"


def write_state_file(model_dir: str, steps: list[int], keep: int = KEEP_IN_STATE, name: str = "model.ckpt") -> None:
    """The `checkpoint` state file naming max(steps), written by temp file + atomic rename.

    With `keep=KEEP_IN_STATE` it lists the 5 newest; with `keep=0` every step,
    with a timestamp each, as `tf.train.CheckpointManager(max_to_keep=None)`
    writes it.
    """
    ordered = sorted(steps)
    listed = ordered[-keep:] if keep else ordered
    lines = [f'model_checkpoint_path: "{name}-{ordered[-1]}"']
    lines += [f'all_model_checkpoint_paths: "{name}-{s}"' for s in listed]
    if not keep:
        now = time.time()
        lines += [f"all_model_checkpoint_timestamps: {now - (len(listed) - i):.7f}" for i in range(len(listed))]
        lines.append(f"last_preserved_timestamp: {now - len(listed) - 1:.7f}")
    fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=".checkpoint.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(model_dir, "checkpoint"))


def _fast_path(model_dir: str) -> bool:
    from prefect_tensorflow.tasks.checkpoints.files import read_state_file, state_file_is_last_change

    try:
        return state_file_is_last_change(model_dir, read_state_file(model_dir))
    except (OSError, ValueError):
        return False


def _listings_during(fn: Callable[[], object]) -> tuple[object, int]:
    """Call `fn`, counting how often selection lists a directory (`checkpoint_prefixes`)."""
    from prefect_tensorflow.tasks.checkpoints import selection

    original = selection.checkpoint_prefixes
    count = 0

    def counting(model_dir):
        nonlocal count
        count += 1
        return original(model_dir)

    selection.checkpoint_prefixes = counting
    try:
        return fn(), count
    finally:
        selection.checkpoint_prefixes = original


def _build_many(src_dir: str, dst_dir: str, src_prefix: str, metrics_lines: int, state: str) -> dict:
    """A model dir of CHECKPOINTS checkpoints made from the one in `src_dir`."""
    import json

    os.makedirs(dst_dir)
    shard = ".data-00000-of-00001"
    how = set()
    steps = [i * STEP_GAP for i in range(CHECKPOINTS)]
    for step in steps:
        for suffix in (".index", shard):
            how.add(_link_or_copy(src_prefix + suffix, os.path.join(dst_dir, f"model.ckpt-{step}{suffix}")))
    src_metrics = os.path.join(src_dir, "checkpoint_metrics.jsonl")
    with open(src_metrics, encoding="utf-8") as handle:
        record = json.loads(handle.readline())
    with open(os.path.join(dst_dir, "checkpoint_metrics.jsonl"), "w", encoding="utf-8") as handle:
        for step in steps[-metrics_lines:]:
            handle.write(json.dumps({**record, "step": step, "checkpoint": f"model.ckpt-{step}"}) + "\n")
    if state != "none":
        write_state_file(dst_dir, steps, keep=KEEP_IN_STATE if state == "newest" else 0)  # last
    state_path = os.path.join(dst_dir, "checkpoint")
    return {
        "files": "+".join(sorted(how)),
        "highest_step": steps[-1],
        "state_file_bytes": os.path.getsize(state_path) if os.path.exists(state_path) else 0,
    }


def run() -> dict:
    import tensorflow as tf

    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.checkpoints.selection import select_latest_checkpoint
    from prefect_tensorflow.tasks.configs import TrainingConfig
    from prefect_tensorflow.tasks.training.loop import train_with_checkpoints

    with Scratch(NAME) as scratch:
        one = os.path.join(scratch.path, "one")
        build_start = time.perf_counter()
        policy = CheckpointPolicy(save_at_start=True, save_at_end=False)
        result = train_with_checkpoints(one, TrainingConfig(steps=1, policy=policy))
        assert result.checkpoints_saved == 1, result
        prefix = result.last_checkpoint
        straight_from_train = _fast_path(one)
        write_state_file(one, [0])

        dirs = {
            "many": os.path.join(scratch.path, "many"),
            "many_metrics": os.path.join(scratch.path, "many-metrics"),
            "many_nostate": os.path.join(scratch.path, "many-nostate"),
            "many_fullstate": os.path.join(scratch.path, "many-fullstate"),
        }
        built = {
            "many": _build_many(one, dirs["many"], prefix, metrics_lines=1, state="newest"),
            "many_metrics": _build_many(one, dirs["many_metrics"], prefix, metrics_lines=CHECKPOINTS, state="newest"),
            "many_nostate": _build_many(one, dirs["many_nostate"], prefix, metrics_lines=1, state="none"),
            "many_fullstate": _build_many(one, dirs["many_fullstate"], prefix, metrics_lines=1, state="all"),
        }
        build_seconds = time.perf_counter() - build_start
        highest = built["many"]["highest_step"]

        # Each dir takes the path it is meant to and finds the highest step.
        checks = {}
        for key, path, expect_step, expect_fast in (
            ("one", one, 0, True),
            ("many", dirs["many"], highest, True),
            ("many_metrics", dirs["many_metrics"], highest, True),
            ("many_nostate", dirs["many_nostate"], highest, False),
            ("many_fullstate", dirs["many_fullstate"], highest, True),
        ):
            ref, listings = _listings_during(lambda p=path: select_latest_checkpoint(p))
            fast = _fast_path(path)
            checks[key] = {"step": ref.step, "fast_path": fast, "directory_listings": listings}
            if ref.step != expect_step or fast != expect_fast or listings != (0 if expect_fast else 1):
                raise AssertionError(f"{key}: expected step {expect_step}, fast path {expect_fast}: {checks[key]}")
        for key in ("many", "many_fullstate"):
            tf_answer = tf.train.latest_checkpoint(dirs[key])
            assert tf_answer and tf_answer.endswith(f"model.ckpt-{highest}"), (key, tf_answer)

        def call(fn, arg) -> Callable[[], float]:
            def go() -> float:
                start = time.perf_counter()
                fn(arg)
                return time.perf_counter() - start

            return go

        cases = {
            "one": call(select_latest_checkpoint, one),
            "many": call(select_latest_checkpoint, dirs["many"]),
            "many_nostate": call(select_latest_checkpoint, dirs["many_nostate"]),
            "tf_many": call(tf.train.latest_checkpoint, dirs["many"]),
            "many_metrics": call(select_latest_checkpoint, dirs["many_metrics"]),
            "many_fullstate": call(select_latest_checkpoint, dirs["many_fullstate"]),
            "tf_many_fullstate": call(tf.train.latest_checkpoint, dirs["many_fullstate"]),
            "tf_one": call(tf.train.latest_checkpoint, one),
        }
        for go in cases.values():  # warm the caches and imports, untimed
            go()
        samples = interleaved(cases, CALLS)
        # Nothing the calls did may have changed a dir's path.
        for key in ("one", "many", "many_metrics", "many_fullstate"):
            path = one if key == "one" else dirs[key]
            assert _fast_path(path), f"{key}: the fast path no longer holds after the timed calls"

    med = {key: median(values) for key, values in samples.items()}
    base = med["one"]
    labels = {
        "one": "select_latest, 1 checkpoint",
        "many": f"select_latest, {CHECKPOINTS:,} checkpoints, state file current",
        "many_nostate": f"select_latest, {CHECKPOINTS:,} checkpoints, no state file (fallback)",
        "tf_many": f"tf.train.latest_checkpoint, {CHECKPOINTS:,} checkpoints",
        "many_metrics": f"select_latest, {CHECKPOINTS:,} checkpoints + {CHECKPOINTS:,}-line metrics log",
        "many_fullstate": f"select_latest, {CHECKPOINTS:,} checkpoints, state file lists all {CHECKPOINTS:,}",
        "tf_many_fullstate": "tf.train.latest_checkpoint, same dir (state file lists all)",
        "tf_one": "tf.train.latest_checkpoint, 1 checkpoint",
    }
    rows = []
    for key in ("one", "many", "many_nostate", "tf_many", "many_metrics", "many_fullstate", "tf_many_fullstate", "tf_one"):
        values = sorted(samples[key])
        p90 = values[int(0.9 * (len(values) - 1))]
        rows.append([labels[key], med[key] * 1e3, p90 * 1e3, med[key] / base])
    out = {
        "parameters": {
            "checkpoints": CHECKPOINTS,
            "step_gap": STEP_GAP,
            "calls_per_case": CALLS,
            "state_file_entries": KEEP_IN_STATE,
        },
        "setup": {
            "build_seconds": build_seconds,
            "checkpoint_files": built["many"]["files"],
            "fast_path_straight_from_train": straight_from_train,
            "checks": checks,
            "tf_latest_checkpoint_answer": os.path.basename(tf_answer),
            "state_file_bytes": {key: b["state_file_bytes"] for key, b in built.items()},
        },
        "samples_seconds": samples,
        "median_seconds": med,
        "ratios_over_one_checkpoint": {key: med[key] / base for key in med},
    }
    out["table"] = ratio_table(
        f"select_latest: per-call time, {CALLS} interleaved calls per case, medians",
        ["case", "median ms", "p90 ms", "ratio to 1 checkpoint"],
        rows,
        notes=[
            "fast path verified (no directory listing) on every dir with a state file, one listing",
            f"without; every dir gave step {highest:,} (the 1-checkpoint dir: step 0).",
            f"state file lists the {KEEP_IN_STATE} newest ({built['many']['state_file_bytes']:,} bytes) or, "
            f"as CheckpointManager(max_to_keep=None)",
            f"writes it, all {CHECKPOINTS:,} with timestamps ({built['many_fullstate']['state_file_bytes']:,} bytes).",
            f"straight out of train_with_checkpoints(steps=1, save_at_start) the 1-checkpoint dir "
            f"{'takes' if straight_from_train else 'MISSES'} the fast path;",
            "its state file was rewritten last all the same.",
            f"checkpoint files made by {built['many']['files']}; dirs built in {fmt(build_seconds)} s.",
        ],
    )
    return out


if __name__ == "__main__":
    report(NAME, run)
