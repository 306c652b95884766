"""Logging and registering a model: `register_model_version()` against `mlflow.tensorflow.log_model(..., registered_model_name=...)`.

The requirement: the time to log and register an export, against what a new
user would write for the same Keras model (`mlflow.tensorflow.log_model` with
`registered_model_name`; it took 15 s for the iris model when tried). What
it measures, in one process, on one iris checkpoint (`train_with_checkpoints`,
300 steps, one save at step 300) exported once with `export_saved_model()` (verified
SavedModel version 1), all cases logging into one embedded SQLite store in
the scratch dir (`PREFECT_TENSORFLOW_HOME` points there while it runs; the
experiment's artifacts are checked to be under it), into a fresh registered
model name every round so that every call really logs and registers:

- A `register_model_version(export, name, connection, checkpoint=..., data="iris")`:
  create a run, log the SavedModel directory as a pyfunc model (signature,
  input example, pinned requirements), download it back, compare its digest
  and its `mlflow.pyfunc` predictions with the SavedModel's on the 30 eval
  rows, create the registered model and the version with its tags, set
  `challenger` (the champion gate is not part of registering), read the version back.
- B `mlflow.tensorflow.log_model(keras_model, name="model",
  registered_model_name=name)` inside `mlflow.start_run(experiment_id=...)`
  (the same experiment, so the same artifact store) with MLflow's fluent API
  pointed at the store (`MLFLOW_TRACKING_URI` and `MLFLOW_REGISTRY_URI` set
  while the benchmark runs), as a new user would call it: no `pip_requirements`, so MLflow infers them
  (by loading the model in a subprocess), no signature, no input example.
  The Keras model is restored from the checkpoint (`serving.restore_model`)
  before the timed region, fresh every round.
- B2: B with `input_example=` the first 5 eval rows, as users often pass
  (MLflow then runs the model to infer a signature and saves the example).
- B3: B with `pip_requirements=` the pins `register_model_version` uses
  (`registry.pinned_requirements()`): B without requirement inference,
  which shows how much of B that inference is.

An untimed warm-up of every path comes first (the first call pays imports,
tracing and the store's creation). Then A, B, B2 and B3 run in interleaved
rounds (a seeded random order each round) and medians are taken. If an
`mlflow.tensorflow.log_model` case raises, the exception is reported in the
notes instead of a figure.

How to read it: `xB` is a row's median over B's. A's `xB` below 1 means our
verified registration is faster than the one-liner a new user would write;
B3's shows what B costs without inferring requirements.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Optional

from .common import Scratch, fmt, interleaved, median, ratio_table, report, spread, timed
from .mlflow_logging import check_store

NAME = "mlflow_register"
TRAIN_STEPS = 300
ROUNDS = 3
EXAMPLE_ROWS = 5


def _error(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__module__}.{type(err).__name__}: {text[:600]}"


def run() -> dict:
    import mlflow
    import mlflow.tensorflow

    from prefect_tensorflow.tasks import iris
    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.checkpoints.selection import select_latest_checkpoint
    from prefect_tensorflow.tasks.configs import ExportConfig, TrainingConfig
    from prefect_tensorflow.tasks.export.saved_model import export_saved_model
    from prefect_tensorflow.tasks.export.signature import restore_model
    from prefect_tensorflow.tasks.export.verification import verification_batch
    from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
    from prefect_tensorflow.tasks.registry.model_versions import CHALLENGER, pinned_requirements, register_model_version
    from prefect_tensorflow.tasks.training.loop import train_with_checkpoints

    errors: dict[str, str] = {}
    names = ("PREFECT_TENSORFLOW_HOME", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {name: os.environ.get(name) for name in names}
    with Scratch(NAME) as scratch:
        store = "sqlite:///" + os.path.join(scratch.path, "mlflow", "mlflow.db")
        # The data home, and the store for B's fluent mlflow calls (a user's script would set these).
        os.environ.update(dict(zip(names, (scratch.path, store, store))))
        try:
            started = time.perf_counter()
            model_dir = scratch.fresh("model")
            policy = CheckpointPolicy(save_checkpoints_steps=TRAIN_STEPS, save_at_start=False, save_at_end=True)
            train_with_checkpoints(model_dir, TrainingConfig(steps=TRAIN_STEPS, seed=0, policy=policy))
            ref = select_latest_checkpoint(model_dir)
            if ref.step != TRAIN_STEPS:
                raise AssertionError(f"expected a checkpoint at step {TRAIN_STEPS}, got {ref.path}")
            exported = export_saved_model(ref.path, scratch.fresh("export"), ExportConfig(model="iris", data="iris"))
            if exported.reused or exported.version != 1 or not exported.parity.ok:
                raise AssertionError(f"expected a fresh, verified version 1, got {exported!r}")
            setup_seconds = time.perf_counter() - started

            conn = MlflowConfig(tracking_uri=store)
            experiment_id = check_store(conn, scratch.path)
            example = verification_batch([], iris.DATA)[0][:EXAMPLE_ROWS]
            pins = pinned_requirements()
            counter = iter(range(10**6))

            def a() -> dict:
                name = f"bench-a-{next(counter)}"
                out = {}
                seconds_ = timed(
                    lambda: out.setdefault("r", register_model_version(exported, name, conn, checkpoint=ref, data="iris"))
                )
                result = out["r"]
                if (
                    result.reused
                    or result.version != 1
                    or result.pyfunc_parity is None
                    or not result.pyfunc_parity.ok
                    or set(result.aliases) != {CHALLENGER}
                ):
                    raise AssertionError(f"expected a fresh, verified version 1 with both aliases, got {result!r}")
                return {"seconds": seconds_, "name": name}

            def log_model(case: str, **kwargs: Any) -> Callable[[], dict]:
                def go() -> dict:
                    name = f"bench-{case.lower()}-{next(counter)}"
                    net = restore_model(ref.path, iris.MODEL)  # untimed
                    out = {}

                    def call() -> None:
                        with mlflow.start_run(experiment_id=experiment_id):
                            out["info"] = mlflow.tensorflow.log_model(net, name="model", registered_model_name=name, **kwargs)

                    try:
                        seconds_ = timed(call)
                    except Exception as err:  # noqa: BLE001 - reported instead of a figure
                        errors.setdefault(case, _error(err))
                        return {"seconds": None, "name": name, "error": _error(err)}
                    version = getattr(out["info"], "registered_model_version", None)
                    if str(version) != "1":
                        raise AssertionError(f"{case}: expected version 1 of {name}, got {version!r}")
                    return {"seconds": seconds_, "name": name}

                return go

            cases = {
                "A": a,
                "B": log_model("B"),
                "B2": log_model("B2", input_example=example),
                "B3": log_model("B3", pip_requirements=pins),
            }
            warm_start = time.perf_counter()
            warm = {key: case()["seconds"] for key, case in cases.items()}
            warmup_seconds = time.perf_counter() - warm_start
            runs = interleaved(cases, ROUNDS)
        finally:
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    samples = {key: [r["seconds"] for r in values] for key, values in runs.items()}
    med: dict[str, Optional[float]] = {key: (median(values) if None not in values else None) for key, values in samples.items()}
    b_med = med["B"]

    def over(key: str, base: Optional[float]) -> Optional[float]:
        return med[key] / base if med[key] is not None and base else None

    ratios = {key: {"over_B": over(key, b_med)} for key in samples}
    ratios["A"]["B_over_A"] = b_med / med["A"] if b_med else None

    result = {
        "parameters": {
            "model": iris.MODEL,
            "checkpoint_step": TRAIN_STEPS,
            "rounds": ROUNDS,
            "tracking_store": "embedded sqlite in the scratch dir",
            "input_example_rows": EXAMPLE_ROWS,
            "pinned_requirements": pins,
            "mlflow": mlflow.__version__,
        },
        "setup_seconds": setup_seconds,
        "warmup_seconds": warmup_seconds,
        "warmup_first_call_seconds": warm,
        "runs": runs,
        "samples_seconds": samples,
        "median_seconds": med,
        "ratios": ratios,
        "errors": errors,
    }

    def row(key: str, label: str, what: str) -> list:
        values = [v for v in samples[key] if v is not None]
        return [label, med[key], spread(values) if values else "-", ratios[key]["over_B"], what]

    if b_med:
        headline = (
            f"xB = median over B's ({fmt(b_med)} s); B/A = {fmt(ratios['A']['B_over_A'])} (A/B = {fmt(ratios['A']['over_B'])})."
        )
    else:
        headline = "B raised, so there are no xB figures (see below)."
    notes = [
        headline,
        "every case registers version 1 of a fresh registered model name each round; A also checks digest, "
        "pyfunc predictions on the 30 eval rows, both aliases.",
        f"B3 pins: {', '.join(pins)}.",
        f"warm-up (untimed, every path once): {fmt(warmup_seconds)} s; setup (train {TRAIN_STEPS} steps + "
        f"export): {fmt(setup_seconds)} s.",
    ]
    notes += [f"{key} raised: {message}" for key, message in sorted(errors.items())]
    result["table"] = ratio_table(
        f"mlflow_register: iris export, register_model_version() vs mlflow.tensorflow.log_model(registered_model_name=...), "
        f"sqlite store, {ROUNDS} interleaved rounds, medians",
        ["case", "median s", "min..max s", "xB", "what it does"],
        [
            row("A", "A  register_model_version()", "pyfunc of the SavedModel + verify + register + aliases"),
            row("B", "B  mlflow.tensorflow.log_model", "Keras model, requirements inferred (baseline)"),
            row("B2", "B2 B + input_example", "B + signature inferred from 5 rows"),
            row("B3", "B3 B + pip_requirements pinned", "B without requirement inference"),
        ],
        notes=notes,
    )
    return result


if __name__ == "__main__":
    report(NAME, run)
