"""The first `train_with_checkpoints()` in a fresh process against a warm one: what the warm-up is.

Every CLI call and every deployment run starts a fresh Python process, so it
pays TensorFlow's start-up once. What it measures, in fresh child processes
(`python -m bench.first_run --child`), ROUNDS times, medians:

- the imports, in order: `prefect_tensorflow.tasks.training.loop` (no TensorFlow),
  `tensorflow`, `keras`;
- the first `train_with_checkpoints()` (iris, 3,000 steps, `evaluation="none"`,
  a fresh model dir) and then the same call again in the same process (warm);
- `cold - warm`: the one-time cost inside the first call;
- the same children with `skip_keras_optional_imports()` first (the "lean"
  import the CLI, the evaluator and deployment runs use), interleaved with the plain ones.

Then one more child profiles a first call (`steps=1`, after the imports) with
cProfile and the table lists where that time goes by area (tracing the step
function, Keras building the model, checkpoint set-up, ...), the figure to cut
from. Reading: `first/warm` is what the issue calls 5.7 s vs 2.5 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from .common import median, ratio_table, report, spread

NAME = "first_run"
STEPS = 3000
ROUNDS = 3
AREAS = (
    # (label, substring of "file:function" in the profile), first match wins
    ("tf.function tracing (autograph, func_graph)", "func_graph.py:func_graph_from_py_func"),
    ("Keras model build and compile", "keras/src/models"),
    ("tf.data pipeline set-up", "tensorflow/python/data/"),
    ("checkpoint key discovery (first save)", "checkpoints/writer.py:learn"),
    ("graph.pbtxt", "training/model_and_data.py:write_graph"),
    ("summary writers", "summary_ops_v2.py"),
)


def child(profile: bool, lean: bool) -> dict:
    started = time.perf_counter()
    marks = {}
    if lean:
        from prefect_tensorflow.tasks.lean_import import skip_keras_optional_imports

        skip_keras_optional_imports()
    from prefect_tensorflow.tasks.configs import TrainingConfig
    from prefect_tensorflow.tasks.training.loop import train_with_checkpoints

    marks["import prefect_tensorflow.tasks.training.loop"] = time.perf_counter() - started
    t = time.perf_counter()
    import tensorflow  # noqa: F401

    marks["import tensorflow"] = time.perf_counter() - t
    t = time.perf_counter()
    import keras  # noqa: F401

    marks["import keras"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as scratch:
        if profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            t = time.perf_counter()
            profiler.runcall(
                train_with_checkpoints, os.path.join(scratch, "p"), TrainingConfig(steps=1, evaluation="none", seed=0)
            )
            total = time.perf_counter() - t
            stats = pstats.Stats(profiler).stats  # {(file, line, fn): (cc, nc, tt, ct, callers)}
            areas = {}
            for label, needle in AREAS:
                best = 0.0
                for (filename, _, function), (_, _, _, cumulative, _) in stats.items():
                    if needle in f"{filename}:{function}":
                        best = max(best, cumulative)
                areas[label] = best
            return {"profiled_first_call_steps_1": total, "areas": areas}
        runs = {}
        for name in ("first", "warm"):
            t = time.perf_counter()
            result = train_with_checkpoints(os.path.join(scratch, name), TrainingConfig(steps=STEPS, evaluation="none", seed=0))
            runs[name] = {"wall": time.perf_counter() - t, "elapsed": result.elapsed_seconds}
    marks["process total"] = time.perf_counter() - started
    return {"imports": marks, "runs": runs}


def _spawn(profile: bool, lean: bool) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    argv = [sys.executable, "-m", "bench.first_run", "--child"]
    argv += (["--profile"] if profile else []) + (["--lean"] if lean else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run() -> dict:
    by_mode: dict[str, list[dict]] = {"plain": [], "lean": []}
    for _ in range(ROUNDS):  # interleaved: a plain child, then a lean one
        for mode in by_mode:
            by_mode[mode].append(_spawn(profile=False, lean=mode == "lean"))
    profiled = _spawn(profile=True, lean=True)
    children = by_mode["plain"]
    first = [c["runs"]["first"]["wall"] for c in children]
    warm = [c["runs"]["warm"]["wall"] for c in children]
    first_lean = [c["runs"]["first"]["wall"] for c in by_mode["lean"]]
    imports = {key: median(c["imports"][key] for c in children) for key in children[0]["imports"]}
    lean_imports = {key: median(c["imports"][key] for c in by_mode["lean"]) for key in children[0]["imports"]}
    f, w, fl = median(first), median(warm), median(first_lean)
    tf_import, tf_import_lean = imports["import tensorflow"], lean_imports["import tensorflow"]
    rows = [
        ["first train() in a fresh process", f, spread(first), f / w, "first/warm"],
        ["the same call again (warm)", w, spread(warm), 1.0, "baseline"],
        ["one-time cost inside the first call", f - w, "-", "-", ""],
        ["first train(), lean TensorFlow import", fl, spread(first_lean), fl / w, "first/warm"],
    ]
    rows += [[f"  {key}", value, "-", "-", "before the first call"] for key, value in imports.items()]
    rows.append(["  import tensorflow, lean", tf_import_lean, "-", tf_import_lean / tf_import, "lean/plain import"])
    profile_total = profiled["profiled_first_call_steps_1"]
    rows.append(["first call with steps=1, profiled", profile_total, "-", 1.0, "of which:"])
    rows += [[f"  {label}", value, "-", value / profile_total, "share"] for label, value in profiled["areas"].items()]
    result = {
        "parameters": {"model": "iris", "steps": STEPS, "rounds": ROUNDS, "evaluation": "none"},
        "children": by_mode,
        "profile": profiled,
        "median_seconds": {"first": f, "warm": w, "first_lean": fl, **imports, "import tensorflow, lean": tf_import_lean},
        "ratios": {
            "first_over_warm": f / w,
            "first_lean_over_warm": fl / w,
            "lean_over_plain_tensorflow_import": tf_import_lean / tf_import,
        },
    }
    result["table"] = ratio_table(
        f"first_run: train_with_checkpoints() on iris, {STEPS} steps, first call in a fresh process vs warm, "
        f"{ROUNDS} fresh processes, medians (wall time of the call)",
        ["what", "median s", "min..max s", "ratio", "ratio is"],
        rows,
        notes=[
            "the areas overlap where one calls the other (tracing includes the model's call).",
            "lean: tasks/lean_import.py hides sklearn, matplotlib and pandas from Keras during the import",
            "(what the CLI, the sidecar evaluator and deployment runs do).",
        ],
    )
    return result


if __name__ == "__main__":
    if "--child" in sys.argv:
        print(json.dumps(child(profile="--profile" in sys.argv, lean="--lean" in sys.argv)))
    else:
        report(NAME, run)
