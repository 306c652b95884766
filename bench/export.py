"""Export time: `export_saved_model()` and `freeze_graph()` against a bare `tf.saved_model.save` of the same model.

What it measures, on one real iris checkpoint (`train_with_checkpoints`, 200 steps, with one
save at step 200, made once in a temp dir), every case run in the same
process with repetitions interleaved (a seeded random order each round) and
the median taken:

- B0 "bare save": `tf.saved_model.save(module, dir, signatures={
  "serving_default": serve.get_concrete_function()})`, the statement
  `exporting._save_tf2` runs, where `module` is a `tf.Module` holding
  `model=net` and `serve=serve`, on a model already restored
  (`serving.restore_model` + `serving_function`, untimed, fresh every round).
  The timed statement includes tracing `serve` (`get_concrete_function()`),
  as it does in the library. This is the baseline: ratio 1.
- B1 "restore + bare save": the same with `restore_model` (build the model,
  read the checkpoint, check every variable matched) and `serving_function`
  inside the timed region: the work `export_saved_model()` does minus its checks,
  verification and publishing.
- E `exporting.export_saved_model(checkpoint, export_base, ExportConfig())` into a fresh, empty
  `export_base` every round (an export of a checkpoint already in the base is
  only a lookup, see R): check the checkpoint files, fingerprint its index,
  take the lock, restore + save into a hidden temp dir (B1), build the
  verification batch (the iris eval split) and compute the checkpoint's
  outputs, reload the SavedModel and compare, read its signature (a second
  `tf.saved_model.load`), sha256 the files, write the info file, rename to
  `<export_base>/1`.
- F `freezing.freeze_graph(checkpoint, output_pb, ExportConfig())` to a fresh path every round:
  restore, trace, `convert_variables_to_constants_v2`, write a temp file,
  read it back, run it in a `tf.compat.v1.Session` and compare, rename.
- E+F: E and F of the same round added up, then the median of those sums:
  "freeze + SavedModel + verification", everything a checkpoint goes through
  to ship both artifacts.
- R: `export_saved_model()` of the same checkpoint into a base that already holds its
  version (made during the warm-up): the idempotent lookup (check the
  checkpoint, fingerprint, lock, read each version's info file), which
  returns `reused=True` without touching TensorFlow.
- L (for reading E): one `tf.saved_model.load` of B0's output dir plus a call
  of its `serving_default` signature on the 30 eval rows, what E's
  verification pays once and its signature summary pays again (load only).

How to read it: `xB0` is a row's median over B0's median, `xB1` over B1's.
E's `xB1` is what the checks, verification and publishing cost on top of the
restore and save they wrap (1.0 would be free); E+F's `xB0` is the cost of
shipping a verified SavedModel and a verified frozen graph in units of a
bare save. R's ratios are far below 1: a repeated export is nearly free.

One untimed warm-up of every path comes first (the first call in a process
pays TensorFlow's tracing and graph-building start-up). Output dirs are
removed after every repetition (outside the timed region), the scratch dir
with the checkpoint at the end.
"""

from __future__ import annotations

import os
import shutil
import time

from .common import Scratch, fmt, interleaved, median, ratio_table, report, spread, timed

NAME = "export"
TRAIN_STEPS = 200
ROUNDS = 15


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def run() -> dict:
    import tensorflow as tf

    from prefect_tensorflow.tasks import iris
    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.configs import ExportConfig, TrainingConfig
    from prefect_tensorflow.tasks.export.frozen_graph import freeze_graph
    from prefect_tensorflow.tasks.export.saved_model import export_saved_model
    from prefect_tensorflow.tasks.export.signature import restore_model, serving_function
    from prefect_tensorflow.tasks.export.verification import run_saved_model, verification_batch
    from prefect_tensorflow.tasks.training.loop import train_with_checkpoints

    config = ExportConfig()  # the bundled iris model, verified on the iris eval split

    def export(prefix: str, base: str):
        return export_saved_model(prefix, base, config)

    def freeze(prefix: str, output: str):
        return freeze_graph(prefix, output, config)

    sizes: dict[str, int] = {}

    with Scratch(NAME) as scratch:
        started = time.perf_counter()
        policy = CheckpointPolicy(save_checkpoints_steps=TRAIN_STEPS, save_at_start=False, save_at_end=True)
        trained = train_with_checkpoints(scratch.fresh("model"), TrainingConfig(steps=TRAIN_STEPS, seed=0, policy=policy))
        train_seconds = time.perf_counter() - started
        prefix = trained.last_checkpoint
        if prefix is None or not prefix.endswith(f"-{TRAIN_STEPS}"):
            raise AssertionError(f"expected a checkpoint at step {TRAIN_STEPS}, got {prefix!r}")
        eval_batch = verification_batch([], iris.DATA)  # the 30 eval rows, as E and F verify on
        counter = iter(range(10**6))
        loads: list[float] = []

        def bare_module():
            net = restore_model(prefix, iris.MODEL)
            serve = serving_function(net)
            module = tf.Module()
            module.model = net
            module.serve = serve
            return module, serve

        def bare_save(module, serve, target: str) -> None:
            tf.saved_model.save(module, target, signatures={"serving_default": serve.get_concrete_function()})

        def b0() -> float:
            module, serve = bare_module()
            target = os.path.join(scratch.fresh(f"b0-{next(counter)}"), "sm")
            seconds = timed(lambda: bare_save(module, serve, target))
            sizes["saved_model"] = _dir_bytes(target)
            # L: one reload + call of what was just saved, as E's verification does
            loads.append(timed(lambda: run_saved_model(target, eval_batch)))
            shutil.rmtree(os.path.dirname(target))
            return seconds

        def b1() -> float:
            target = os.path.join(scratch.fresh(f"b1-{next(counter)}"), "sm")

            def go() -> None:
                module, serve = bare_module()
                bare_save(module, serve, target)

            seconds = timed(go)
            assert os.path.exists(os.path.join(target, "saved_model.pb")), target
            shutil.rmtree(os.path.dirname(target))
            return seconds

        def e() -> float:
            base = scratch.fresh(f"e-{next(counter)}")
            out = {}
            seconds = timed(lambda: out.setdefault("r", export(prefix, base)))
            result = out["r"]
            if result.reused or result.version != 1 or not result.parity.ok:
                raise AssertionError(f"expected a fresh, verified version 1, got {result!r}")
            sizes["export_version"] = _dir_bytes(result.path)
            shutil.rmtree(base)
            return seconds

        def f() -> float:
            d = scratch.fresh(f"f-{next(counter)}")
            out = {}
            seconds = timed(lambda: out.setdefault("r", freeze(prefix, os.path.join(d, "frozen.pb"))))
            result = out["r"]
            if not result.parity.ok or not os.path.exists(result.path):
                raise AssertionError(f"expected a verified frozen graph, got {result!r}")
            sizes["frozen_pb"] = result.size_bytes
            shutil.rmtree(d)
            return seconds

        reuse_base = scratch.fresh("reuse")

        def r() -> float:
            out = {}
            seconds = timed(lambda: out.setdefault("r", export(prefix, reuse_base)))
            result = out["r"]
            if not result.reused or result.version != 1:
                raise AssertionError(f"expected the existing version 1 reused, got {result!r}")
            return seconds

        # Warm-up, untimed: every path once. The first export into reuse_base makes
        # the version R finds (and is E's warm-up); then one R call.
        warm_start = time.perf_counter()
        warm = {"B0": b0(), "B1": b1()}
        held = {}
        warm["E"] = timed(lambda: held.setdefault("first", export(prefix, reuse_base)))
        first = held["first"]
        if first.reused or first.version != 1:
            raise AssertionError(f"warm-up export: expected a fresh version 1, got {first!r}")
        warm["F"] = f()
        warm["R"] = r()
        warmup_seconds = time.perf_counter() - warm_start
        loads.clear()

        runs = interleaved({"B0": b0, "B1": b1, "E": e, "F": f, "R": r}, ROUNDS)
        if len(os.listdir(reuse_base)) != 2:  # the lock file and version 1, nothing else
            raise AssertionError(f"re-exports changed {reuse_base}: {sorted(os.listdir(reuse_base))}")

    samples = {**runs, "E+F": [a + b for a, b in zip(runs["E"], runs["F"])], "L": loads}
    med = {key: median(values) for key, values in samples.items()}
    b0_med, b1_med = med["B0"], med["B1"]
    ratios = {key: {"over_B0": med[key] / b0_med, "over_B1": med[key] / b1_med} for key in samples}

    result = {
        "parameters": {
            "model": iris.MODEL,
            "checkpoint_step": TRAIN_STEPS,
            "rounds": ROUNDS,
            "verification_batch": len(eval_batch[0]),
        },
        "train_seconds": train_seconds,
        "warmup_seconds": warmup_seconds,
        "warmup_first_call_seconds": warm,
        "bytes": sizes,
        "samples_seconds": samples,
        "median_seconds": med,
        "ratios": ratios,
    }

    def row(key: str, label: str, what: str) -> list:
        return [label, med[key], spread(samples[key]), ratios[key]["over_B0"], ratios[key]["over_B1"], what]

    result["table"] = ratio_table(
        f"export: iris checkpoint (step {TRAIN_STEPS}), our export/freeze vs bare tf.saved_model.save, "
        f"{ROUNDS} interleaved rounds, medians",
        ["case", "median s", "min..max s", "xB0", "xB1", "what it does"],
        [
            row("B0", "B0 bare tf.saved_model.save", "save of a restored model (baseline)"),
            row("B1", "B1 restore + bare save", "restore_model + serving_function + save"),
            row("E", "E  export_saved_model()", "B1 + verify + sign. + digest + publish"),
            row("F", "F  freeze_graph()", "restore + freeze + write + verify"),
            row("E+F", "E+F per round", "freeze + SavedModel + verification"),
            row("R", "R  re-export, existing version", "idempotent lookup, reused=True"),
            row("L", "L  one load + call of a SavedModel", "what E pays once to verify"),
        ],
        notes=[
            f"xB0 / xB1 = median over B0's ({fmt(b0_med)} s) / B1's ({fmt(b1_med)} s) median; E+F = median of per-round sums.",
            f"SavedModel {fmt(sizes.get('saved_model', 0) / 1e3)} kB, exported version "
            f"{fmt(sizes.get('export_version', 0) / 1e3)} kB, frozen .pb "
            f"{fmt(sizes.get('frozen_pb', 0) / 1e3)} kB; verification on the {len(eval_batch[0])} iris eval rows.",
            f"warm-up (untimed, every path once): {fmt(warmup_seconds)} s; "
            f"checkpoint made by train_with_checkpoints({TRAIN_STEPS} steps) in {fmt(train_seconds)} s.",
        ],
    )
    return result


if __name__ == "__main__":
    report(NAME, run)
