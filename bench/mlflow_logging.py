"""What MLflow tracking adds to training: per-step metric logging, and the fixed cost of a run.

The requirement: "metrics per step, sent in batches, so that logging costs at
most 1% of training time". What it measures: the real `train()` on the
bundled iris model (batch 32, 3,000 steps from scratch, a checkpoint every
500 steps, `save_at_start`/`save_at_end` off, so 6 saves; fresh model dir
every run), in one process, all MLflow runs in one embedded SQLite store in
the scratch dir (`PREFECT_TENSORFLOW_HOME` points there while it runs):

- A "no MLflow": `train(model_dir, steps, policy, seed=0)`, no callbacks.
- C "no-op callbacks": A with `on_progress` and `on_checkpoint` that do
  nothing. With `on_progress` given, `train()` converts the loss to a Python
  float after every step (a device-to-host read it otherwise does only every
  100 steps for the summaries); C separates that from MLflow's cost.
- B "tracked": `train_tracked(model_dir, connection, same kwargs)`, the
  function behind `train_with_checkpoints(tracking=...)`: one MLflow run
  (experiment lookup, create run, params in batches), `train()` with
  `on_progress -> run.log_metric("loss")` and `on_checkpoint ->
  run.log_metrics(eval/*, train_loss)` queued to the `MetricBatcher`, whose
  thread sends a `log_batch` every 2 s *during* training; at the end the
  last batch, the checkpoint list, event files and graph.pbtxt as
  artifacts, and the run set FINISHED.
- Z "fixed cost": A with `steps=1` (building the model and input pipeline,
  tracing the step, graph.pbtxt): subtracted from A, B and C for the "loop
  only" rows.

`TrainResult.elapsed_seconds` is what `train()` itself took (B's result
carries its inner `train()`'s figure), so B/A of elapsed is the per-step
logging overhead, including the batcher thread's sends while training runs.
The wall time of the whole call adds, for B, the run's creation and its
close; B's "MLflow fixed cost" is the median over rounds of (wall - elapsed)
of B minus that of A, and the `TrainingRun.__enter__`/`__exit__` times
(measured by a subclass put in `training.TrainingRun` while the benchmark
runs) split it. The same subclass wraps the batcher's `flush` to record the
background thread's CPU time (`time.thread_time`) in the `log_batch` sends
made while `train()` runs: with the embedded store that is SQLAlchemy and
SQLite work in this process, which holds the GIL the training loop needs.
Each B run's batcher must have sent exactly 3,000 losses plus the
checkpoint metrics.

An untimed warm-up (`train_tracked`, 500 steps) comes first: it pays
TensorFlow's start-up and creates the SQLite store (MLflow's schema
migrations) and the experiment. Then A, B, C and Z run in interleaved rounds
(a seeded random order each round) and medians are taken.

How to read it: `B/A elapsed` is the headline and should be <= 1.01; `B/C`
is MLflow's logging alone, `C/A` the per-step float conversion. `B/A wall`
is a whole tracked training against an untracked one of this length; the
fixed cost does not grow with the steps, so it matters less the longer the
training (its ratio is over A's elapsed time here).
"""

from __future__ import annotations

import os
import shutil
import time

from .common import Scratch, fmt, interleaved, median, ratio_table, spread, report

NAME = "mlflow_logging"
STEPS = 3000
EVERY = 500
WARMUP_STEPS = 500
ROUNDS = 5


def check_store(conn, root: str) -> str:
    """The experiment's id, after checking its artifacts go under `root` (never into the working dir)."""
    experiment_id = conn.experiment_id()
    location = conn.call("reading the experiment", lambda: conn.client().get_experiment(experiment_id).artifact_location)
    if not location.startswith("file://" + root):
        raise AssertionError(f"expected the experiment's artifacts under {root}, got {location}")
    return experiment_id


def run() -> dict:
    from prefect_tensorflow.tasks import training
    from prefect_tensorflow.tasks.data_home import HOME_ENV
    from prefect_tensorflow.tasks.mlflow_connection import MlflowConnection
    from prefect_tensorflow.tasks.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.tracking import TrainingRun
    from prefect_tensorflow.tasks.training import train, train_tracked

    policy = CheckpointPolicy(save_checkpoints_steps=EVERY, save_at_start=False, save_at_end=False)
    expected_saves = STEPS // EVERY
    runs_opened: list[dict] = []

    class TimedRun(TrainingRun):
        """`TrainingRun` that records how long entering and leaving took and what its batcher sent."""

        def __enter__(self):
            start = time.perf_counter()
            out = super().__enter__()
            self._enter_seconds = time.perf_counter() - start
            self._closing = False
            self._sends: list[dict] = []
            flush = self._batcher.flush

            def timed_flush() -> None:  # the batcher thread's CPU time in each send
                wall, cpu, before = time.perf_counter(), time.thread_time(), self._batcher.sent
                flush()
                self._sends.append({
                    "wall": time.perf_counter() - wall, "cpu": time.thread_time() - cpu,
                    "metrics": self._batcher.sent - before, "while_training": not self._closing,
                })

            self._batcher.flush = timed_flush
            return out

        def __exit__(self, exc_type, exc, tb):
            start = time.perf_counter()
            self._closing = True
            super().__exit__(exc_type, exc, tb)
            during = [send for send in self._sends if send["while_training"] and send["metrics"]]
            runs_opened.append({
                "run_id": self.run_id,
                "enter": self._enter_seconds,
                "exit": time.perf_counter() - start,
                "sent": self._batcher.sent,
                "sends_while_training": len(during),
                "send_cpu_while_training": sum(send["cpu"] for send in during),
                "metrics_sent_while_training": sum(send["metrics"] for send in during),
            })

    saved_home = os.environ.get(HOME_ENV)
    with Scratch(NAME) as scratch:
        os.environ[HOME_ENV] = scratch.path
        training.TrainingRun = TimedRun
        try:
            conn = MlflowConnection(tracking_uri="sqlite:///" + os.path.join(scratch.path, "mlflow", "mlflow.db"))
            check_store(conn, scratch.path)
            counter = iter(range(10**6))

            def noop(*_args) -> None:
                return None

            def case(kind: str, steps: int):
                saves = steps // EVERY

                def go() -> dict:
                    d = scratch.fresh(f"run-{next(counter)}")
                    start = time.perf_counter()
                    if kind == "tracked":
                        result = train_tracked(d, conn, steps=steps, policy=policy, seed=0)
                    elif kind == "noop":
                        result = train(d, steps=steps, policy=policy, seed=0, on_progress=noop, on_checkpoint=noop)
                    else:
                        result = train(d, steps=steps, policy=policy, seed=0)
                    wall = time.perf_counter() - start
                    if result.steps_run != steps or result.checkpoints_saved != saves:
                        raise AssertionError(
                            f"expected {steps} steps and {saves} checkpoints, got {result.steps_run} "
                            f"steps and {result.checkpoints_saved} checkpoints"
                        )
                    out = {"elapsed": result.elapsed_seconds, "wall": wall, "steps": result.steps_run}
                    if kind == "tracked":
                        opened = runs_opened[-1]
                        expected_sent = steps + saves * len(result.final_metrics)
                        if opened["run_id"] != result.mlflow_run_id or opened["sent"] != expected_sent:
                            raise AssertionError(
                                f"expected run {result.mlflow_run_id} to have sent {expected_sent} metric values, "
                                f"got run {opened['run_id']} with {opened['sent']}"
                            )
                        out.update(
                            run_enter=opened["enter"], run_exit=opened["exit"], metrics_sent=opened["sent"],
                            run_id=result.mlflow_run_id, sends_while_training=opened["sends_while_training"],
                            send_cpu_while_training=opened["send_cpu_while_training"],
                            metrics_sent_while_training=opened["metrics_sent_while_training"],
                        )
                    shutil.rmtree(d)
                    return out

                return go

            warm_start = time.perf_counter()
            warm = case("tracked", WARMUP_STEPS)()
            warmup_seconds = time.perf_counter() - warm_start
            # The warm-up run's history, read back once: every step's loss is in the store.
            history = conn.call("reading the loss history", lambda: conn.client().get_metric_history(warm["run_id"], "loss"))
            if sorted(m.step for m in history) != list(range(1, WARMUP_STEPS + 1)):
                raise AssertionError(f"warm-up run: expected the loss of steps 1..{WARMUP_STEPS}, got {len(history)} values")

            runs = interleaved(
                {
                    "A": case("plain", STEPS),
                    "B": case("tracked", STEPS),
                    "C": case("noop", STEPS),
                    "Z": case("plain", 1),
                },
                ROUNDS,
            )
        finally:
            training.TrainingRun = TrainingRun
            if saved_home is None:
                os.environ.pop(HOME_ENV, None)
            else:
                os.environ[HOME_ENV] = saved_home

    def med(key: str, field: str = "elapsed") -> float:
        return median(r[field] for r in runs[key])

    a, b, c, z = med("A"), med("B"), med("C"), med("Z")
    a_wall, b_wall = med("A", "wall"), med("B", "wall")
    a_outside = median(r["wall"] - r["elapsed"] for r in runs["A"])
    b_outside = median(r["wall"] - r["elapsed"] for r in runs["B"])
    fixed = b_outside - a_outside
    enter, exit_ = med("B", "run_enter"), med("B", "run_exit")
    send_cpu = med("B", "send_cpu_while_training")
    sends = med("B", "sends_while_training")
    sent_while = med("B", "metrics_sent_while_training")
    per_step = (b - a) / STEPS
    step_a = (a - z) / STEPS
    paired = [rb["elapsed"] / ra["elapsed"] for ra, rb in zip(runs["A"], runs["B"])]
    ratios = {
        "B_over_A_elapsed": b / a,
        "B_over_C_elapsed": b / c,
        "C_over_A_elapsed": c / a,
        "B_over_A_loop_only": (b - z) / (a - z),
        "B_over_C_loop_only": (b - z) / (c - z),
        "C_over_A_loop_only": (c - z) / (a - z),
        "B_over_A_wall": b_wall / a_wall,
        "mlflow_fixed_over_A_elapsed": fixed / a,
        "run_enter_over_A_elapsed": enter / a,
        "run_exit_over_A_elapsed": exit_ / a,
        "logging_per_step_over_step": per_step / step_a,
        "send_cpu_while_training_over_A_elapsed": send_cpu / a,
    }
    result = {
        "parameters": {
            "model": "prefect_tensorflow.tasks.iris:build_model",
            "steps": STEPS,
            "save_checkpoints_steps": EVERY,
            "checkpoints_per_run": expected_saves,
            "batch_size": 32,
            "metric_interval_seconds": 2.0,
            "tracking_store": "embedded sqlite in the scratch dir",
            "rounds": ROUNDS,
            "warmup_steps": WARMUP_STEPS,
        },
        "warmup_seconds": warmup_seconds,
        "runs": runs,
        "median_elapsed_seconds": {"A_no_mlflow": a, "B_tracked": b, "C_noop_callbacks": c, "Z_fixed_cost": z},
        "median_wall_seconds": {"A_no_mlflow": a_wall, "B_tracked": b_wall},
        "mlflow_fixed_seconds": {"wall_minus_elapsed_B_minus_A": fixed, "run_enter": enter, "run_exit": exit_},
        "logging_seconds_per_step": per_step,
        "batcher_while_training": {
            "median_sends": sends, "median_metrics_sent": sent_while, "median_send_cpu_seconds": send_cpu,
        },
        "paired_B_over_A_elapsed": paired,
        "ratios": ratios,
        "meets_one_percent": ratios["B_over_A_elapsed"] <= 1.01,
    }
    el = {k: [r["elapsed"] for r in v] for k, v in runs.items()}
    wl = {k: [r["wall"] for r in v] for k, v in runs.items()}
    result["table"] = ratio_table(
        f"mlflow_logging: train() on iris, {STEPS} steps, checkpoint every {EVERY}, tracked in MLflow "
        f"(sqlite) vs not, {ROUNDS} interleaved rounds, medians",
        ["case", "median s", "min..max s", "steps/s", "ratio", "ratio is"],
        [
            ["A train(), no MLflow (elapsed)", a, spread(el["A"]), STEPS / a, 1.0, "baseline"],
            ["C train(), no-op callbacks (elapsed)", c, spread(el["C"]), STEPS / c, ratios["C_over_A_elapsed"],
             "C/A seconds"],
            ["B train_tracked: its train() (elapsed)", b, spread(el["B"]), STEPS / b, ratios["B_over_A_elapsed"],
             "B/A seconds (<= 1.01)"],
            ["B against C (MLflow logging alone)", b, "-", "-", ratios["B_over_C_elapsed"], "B/C seconds"],
            ["Z fixed cost of train() (steps=1)", z, spread(el["Z"]), "-", z / a, "Z/A seconds"],
            ["A loop only (A - Z)", a - z, "-", STEPS / (a - z), 1.0, "baseline"],
            ["C loop only (C - Z)", c - z, "-", STEPS / (c - z), ratios["C_over_A_loop_only"], "C/A seconds"],
            ["B loop only (B - Z)", b - z, "-", STEPS / (b - z), ratios["B_over_A_loop_only"], "B/A seconds"],
            ["logging per step: (B - A) / steps", per_step, "-", "-", ratios["logging_per_step_over_step"],
             "over one step of A"],
            ["B batcher CPU in log_batch while training", send_cpu,
             spread([r["send_cpu_while_training"] for r in runs["B"]]), "-",
             ratios["send_cpu_while_training_over_A_elapsed"], "over A elapsed"],
            ["A wall time of train()", a_wall, spread(wl["A"]), STEPS / a_wall, 1.0, "baseline"],
            ["B wall time of train_tracked()", b_wall, spread(wl["B"]), STEPS / b_wall, ratios["B_over_A_wall"],
             "B/A seconds"],
            ["MLflow fixed cost per run", fixed, "-", "-", ratios["mlflow_fixed_over_A_elapsed"], "over A elapsed"],
            ["  of it TrainingRun enter", enter, spread([r["run_enter"] for r in runs["B"]]), "-",
             ratios["run_enter_over_A_elapsed"], "over A elapsed"],
            ["  of it TrainingRun exit", exit_, spread([r["run_exit"] for r in runs["B"]]), "-",
             ratios["run_exit_over_A_elapsed"], "over A elapsed"],
        ],
        notes=[
            f"per-round B/A elapsed: {spread(paired)}; B sent {runs['B'][0]['metrics_sent']} metric values per run "
            f"({STEPS} losses + {expected_saves} checkpoints' metrics), checked every run.",
            f"batcher CPU = thread CPU time of the background thread's log_batch sends that ran during train() "
            f"(median {fmt(sends)} sends, {fmt(sent_while)} values); in-process SQLite work holds the GIL.",
            "enter = experiment lookup, create run, params; exit = last batch, checkpoint list + event files "
            "+ graph.pbtxt as artifacts, set FINISHED.",
            "fixed cost = median(B wall - B elapsed) - median(A wall - A elapsed); it does not grow with the steps.",
            f"warm-up (train_tracked, {WARMUP_STEPS} steps, untimed, creates the store): {fmt(warmup_seconds)} s.",
        ],
    )
    return result


if __name__ == "__main__":
    report(NAME, run)
