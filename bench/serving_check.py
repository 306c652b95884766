"""The serving check's load time and latency, on iris and on the ~100 MB bench model, against in-process baselines.

What it measures, for each model (the iris classifier after 100 steps; the
`large_model` dense net, about 101 MB of float32, after 2 steps), on one
export made once (`export_saved_model`, so with its warmup file) and one
registered version in a temporary SQLite MLflow store:

- B "in-process load": `tf.saved_model.load(export)` + one call of
  `serving_default` on the eval batch, in this process (TensorFlow already
  imported): the baseline, ratio 1; and B's single-row call latency (p50, p99
  over `CALLS` calls).
- C "cold load" (`serving_check.cold_load`, what `check_loads` runs): a fresh
  `python -I` process; its `load_seconds` (the `tf.saved_model.load` inside
  it) and its whole wall time (process start, `import tensorflow`, load,
  first call, `CALLS` single-row calls, the outputs written back).
- W "warm load" (`cold_load(..., warm=True)`, what `check_loads` runs by
  default): the same program in a child forked from the warm template
  (TensorFlow imported once; the template's start is timed once, apart).
- S "mlflow models serve" (`check_serving(..., warm=False)`, once per model: a
  server start costs tens of seconds): start -> `/ping` ready, and the p50/p99
  of `CALLS` single-row REST requests in the `instances` format.
- SW "warm server" (`check_serving(...)`, the default): MLflow's scoring server
  forked from the warm template, the same measures.

B, C and W run in interleaved rounds (`ROUNDS`, medians); S and SW once each,
one after the other. Warm vs cold: C wall / W wall and S ready / SW ready
(what the template saves per check, in the same run). Ratios: C load / B load
(a cold load vs a warm one), C wall / B load (what the registration check costs
in units of an in-process load), S ready / B load, S p50 / B p50 and S p99 / B p99
(HTTP + JSON + MLflow's pyfunc on top of a bare signature call). Peak memory is
shown against the export's size on disk.
"""

from __future__ import annotations

import os
import time

from .common import Scratch, interleaved, median, ratio_table, spread

NAME = "serving_check"
ROUNDS = 3
CALLS = 50


def _dir_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files) / 1e6


def _percentiles(times: list[float]) -> tuple[float, float]:
    import numpy as np

    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def _export(scratch: Scratch, label: str, model: str, data: str, steps: int) -> str:
    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.configs import ExportConfig, TrainingConfig
    from prefect_tensorflow.tasks.export.saved_model import export_saved_model
    from prefect_tensorflow.tasks.training.loop import train_with_checkpoints

    model_dir = scratch.fresh(f"{label}-model")
    policy = CheckpointPolicy(save_checkpoints_secs=1e9, save_at_start=False, save_at_end=True)
    config = TrainingConfig(model=model, data=data, steps=steps, evaluation="none", policy=policy)
    result = train_with_checkpoints(model_dir, config)
    checkpoint = os.path.join(model_dir, f"model.ckpt-{result.final_step}")
    return export_saved_model(
        checkpoint, os.path.join(scratch.path, f"{label}-exports"), ExportConfig(model=model, data=data)
    ).path


def _measure(scratch: Scratch, label: str, model: str, data: str, steps: int, store: str) -> dict:
    import tensorflow as tf

    from prefect_tensorflow.tasks.configs import GateConfig
    from prefect_tensorflow.tasks.export.saved_model import ExportResult
    from prefect_tensorflow.tasks.export.verification_batch import verification_batch
    from prefect_tensorflow.tasks.promotion.serving_check import check_serving, cold_load
    from prefect_tensorflow.tasks.promotion.warm_template import running_template, stop_template
    from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
    from prefect_tensorflow.tasks.registry.model_versions import register_model_version

    path = _export(scratch, label, model, data, steps)
    specs = tf.saved_model.load(path).signatures["serving_default"].structured_input_signature[1]
    names = sorted(specs)
    inputs = dict(zip(names, verification_batch([specs[n] for n in names], data)))

    def in_process() -> dict:
        t0 = time.perf_counter()
        fn = tf.saved_model.load(path).signatures["serving_default"]
        outputs = fn(**{k: tf.constant(v) for k, v in inputs.items()})
        load = time.perf_counter() - t0
        times = []
        for i in range(CALLS):
            row = {k: tf.constant(v[i % len(v) : i % len(v) + 1]) for k, v in inputs.items()}
            t1 = time.perf_counter()
            fn(**row)
            times.append((time.perf_counter() - t1) * 1000)
        p50, p99 = _percentiles(times)
        return {"load": load, "p50": p50, "p99": p99, "outputs": {k: v.numpy() for k, v in outputs.items()}}

    def cold(warm: bool = False) -> dict:
        t0 = time.perf_counter()
        report, _ = cold_load(path, inputs, latency_calls=CALLS, warm=warm)
        assert report["ok"] and report["warm"] == warm, report
        return {**report, "wall": time.perf_counter() - t0}

    in_process()  # warm-up: the first load in this process pays tracing set-up
    stop_template()
    t0 = time.perf_counter()
    running_template()
    template_start = time.perf_counter() - t0
    runs = interleaved({"in_process": in_process, "cold": cold, "warm": lambda: cold(warm=True)}, ROUNDS)
    expected = runs["in_process"][0]["outputs"]

    import json
    import pathlib

    connection = MlflowConfig(tracking_uri=f"sqlite:///{store}", experiment_name=f"bench-{label}")
    exported = ExportResult(**json.loads((pathlib.Path(path) / "assets.extra" / "prefect_tensorflow.json").read_text())["result"])
    exported = exported.model_copy(update={"path": path})
    registered = register_model_version(exported, f"bench-{label}", connection, data=data, gate=GateConfig(metric=None))
    served = check_serving(registered.model_uri, connection, inputs, expected, requests=CALLS, warm=False)
    assert served.ok and served.server == "mlflow models serve", served.reason
    served_warm = check_serving(registered.model_uri, connection, inputs, expected, requests=CALLS)
    assert served_warm.ok and served_warm.server == "mlflow scoring server (warm template)", served_warm.reason
    b_load = median(r["load"] for r in runs["in_process"])
    return {
        "export_mb": _dir_mb(path),
        "in_process": {k: [r[k] for r in runs["in_process"]] for k in ("load", "p50", "p99")},
        "cold": {
            k: [r[k] for r in runs["cold"]]
            for k in ("wall", "import_seconds", "load_seconds", "p50_ms", "p99_ms", "peak_memory_mb")
        },
        "warm": {k: [r[k] for r in runs["warm"]] for k in ("wall", "load_seconds", "p50_ms", "p99_ms", "peak_memory_mb")},
        "template_start_seconds": template_start,
        "served": served.model_dump(),
        "served_warm": served_warm.model_dump(),
        "ratios": {
            "cold wall / warm wall": median(r["wall"] for r in runs["cold"]) / median(r["wall"] for r in runs["warm"]),
            "serve ready / warm server ready": (served.load_seconds or 0) / (served_warm.load_seconds or 1),
            "cold load / in-process load": median(r["load_seconds"] for r in runs["cold"]) / b_load,
            "cold wall / in-process load": median(r["wall"] for r in runs["cold"]) / b_load,
            "server ready / in-process load": (served.load_seconds or 0) / b_load,
            "REST p50 / in-process p50": (served.p50_ms or 0) / median(r["p50"] for r in runs["in_process"]),
            "REST p99 / in-process p99": (served.p99_ms or 0) / median(r["p99"] for r in runs["in_process"]),
        },
    }


def run() -> dict:
    from prefect_tensorflow.tasks import iris

    from . import large_model

    results = {}
    with Scratch(NAME) as scratch:
        store = os.path.join(scratch.path, "mlflow.db")
        results["iris"] = _measure(scratch, "iris", iris.MODEL, iris.DATA, 100, store)
        results["large"] = _measure(scratch, "large", large_model.MODEL, large_model.DATA, 2, store)
    rows = []
    for label, figures in results.items():
        ratios = figures["ratios"]
        cold = figures["cold"]
        rows.append(
            [
                f"{label} ({figures['export_mb']:.3g} MB)",
                ratios["cold wall / warm wall"],
                ratios["serve ready / warm server ready"],
                ratios["cold load / in-process load"],
                ratios["cold wall / in-process load"],
                ratios["server ready / in-process load"],
                ratios["REST p50 / in-process p50"],
                ratios["REST p99 / in-process p99"],
                median(cold["peak_memory_mb"]) / figures["export_mb"],
                spread([c / b for c, b in zip(cold["load_seconds"], figures["in_process"]["load"])]),
            ]
        )
    table = ratio_table(
        "serving check: a fresh process and mlflow models serve vs an in-process tf.saved_model.load and call",
        [
            "model",
            "cold/warm check",
            "cold/warm serve",
            "cold load",
            "cold wall",
            "serve ready",
            "REST p50",
            "REST p99",
            "peak RSS / export size",
            "cold load spread",
        ],
        rows,
        notes=[
            "cold/warm check: check_loads wall in a new python -I process / forked from the warm template (medians)",
            "cold/warm serve: mlflow models serve start -> /ping / the warm template's forked scoring server's",
            "cold load: tf.saved_model.load in a fresh python -I process / the same in this process (medians)",
            "cold wall: the whole check_loads child (start, import tensorflow, load, calls) / in-process load",
            "serve ready: mlflow models serve start -> /ping / in-process load; REST: single-row instances requests",
        ],
    )
    return {"table": table, "results": results, "rounds": ROUNDS, "calls": CALLS}
