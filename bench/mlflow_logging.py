"""What MLflow tracking adds to training: metric logging, and the fixed cost of a run.

The requirement: "metrics sent in batches, so that logging costs at most 1%
of training time". The loss is logged at every summary step
(`summary_every_n_steps`, default 100; before the refactor it was every
step), the checkpoint metrics at every checkpoint. What it measures: the real
`train_with_checkpoints()` on the bundled iris model (batch 32, 3,000 steps
from scratch, a checkpoint every 500 steps, `save_at_start`/`save_at_end`
off, so 6 saves; the loss every `SUMMARY_EVERY` steps; fresh model dir every
run), all MLflow runs in one embedded SQLite store in the scratch dir
(`PREFECT_TENSORFLOW_HOME` points there while it runs):

- A "no MLflow": `train_with_checkpoints(model_dir, config)`, no callbacks.
- C "no-op callbacks": A with `on_progress` and `on_checkpoint` that do
  nothing: `on_progress` gets the loss at each summary step and `None` in
  between (at most every 0.2 s); C separates the callbacks' cost from MLflow's.
- B "tracked": `train_with_checkpoints(model_dir, config, connection)`: one
  MLflow run (experiment lookup, create run, params in batches, then the
  `MetricBatcher` starts the `metric_sender` process), the training with
  `on_progress -> run.log_metric("loss")` and `on_checkpoint ->
  run.log_metrics(eval/*, train_loss)`: each `MetricBatcher.add` appends to
  a list, a writer thread feeds the pipe every 2 s, and the sender process
  (at the lowest CPU priority, `nice 19`) does the `log_batch` calls with
  whatever CPU the training leaves idle; at the end the batcher's `close`
  closes the pipe and waits for the sender to send the rest and exit, then
  the checkpoint list, event files and graph.pbtxt go up as artifacts and
  the run is set FINISHED.
- Z "fixed cost": A with `steps=1` (building the model and input pipeline,
  tracing the step, graph.pbtxt): subtracted from A, B and C for the "loop
  only" rows.
- S "idle sender": a `MetricBatcher` on an existing run, closed at once (no
  metrics): the sender process's start-up and exit alone (Python and
  MLflow's imports, the store's schema check), its wall time and CPU time.

`TrainResult.elapsed_seconds` is what the training loop itself took (B's
result carries its inner loop's figure), so B/A of elapsed is the per-step
logging overhead, including whatever the sender process takes from the
training while it starts and sends. The wall time of the whole call adds,
for B, the run's creation and its close; B's "MLflow fixed cost" is the
median over rounds of (wall - elapsed) of B minus that of A, and the
`TrainingRun.__enter__`/`__exit__` times (measured by a subclass put in
`training.TrainingRun` while the benchmark runs) split it, as do the
batcher's start (`Popen`) and `close` (waiting for the sender) inside them
(a `MetricBatcher` subclass put in `tracking.MetricBatcher`). That subclass
also wraps `add` to time every call (total, the slowest, and the calls over
1 ms, which would show a training thread waiting; since `add` only appends,
there should be none), and takes
`resource.getrusage(RUSAGE_CHILDREN)` before and after `close`: the sender
is reaped in `close`, so the difference is the sender process's whole CPU
time (user + system). At nice 19 it runs when a core is idle: on this
CPU-only machine TensorFlow keeps both cores busy, so most of it happens
after training, inside `close` (the fixed cost). The timing wrapper's own
cost per call is measured separately and reported; it is inside B.

Every B run is checked after it (outside the timed region) against the
store: `MlflowClient.get_metric_history` must hold the loss of every summary
step (100, 200, ..., 3,000) and each checkpoint metric (eval/*, train_loss) once per checkpoint,
and the batcher must have queued exactly those values.

An untimed warm-up (a tracked training, 500 steps) comes first: it pays
TensorFlow's start-up and creates the SQLite store (MLflow's schema
migrations) and the experiment. Then A, B, C, Z and S run in interleaved
rounds (a seeded random order each round) and medians are taken.

How to read it: `B/A elapsed` and `B/A loop only` are the headline and
should be <= 1.01; `B/C` is MLflow's logging alone, `C/A` the per-step float
conversion. `B/A wall` is a whole tracked training against an untracked one
of this length; the fixed cost does not grow with the steps, so it matters
less the longer the training (its ratio is over A's elapsed time here).
The sender's start-up (S) is per run too, but it is not all in the "fixed
cost" row: its CPU time is spent beside training, and when the pipe fills
before the sender reads, `add` waits inside the training (the blocked calls),
so both land in B's elapsed.
"""

from __future__ import annotations

import os
import resource
import shutil
import time

from .common import Scratch, fmt, interleaved, median, ratio_table, report, spread

NAME = "mlflow_logging"
STEPS = 3000
EVERY = 500
WARMUP_STEPS = 500
SUMMARY_EVERY = 100  # TrainingConfig.summary_every_n_steps' default: the loss is logged at these steps
ROUNDS = 5
BLOCKED = 1e-3  # an `add` call longer than this waited for the pipe (a write is microseconds)


def check_store(conn, root: str) -> str:
    """The experiment's id, after checking its artifacts go under `root` (never into the working dir)."""
    experiment_id = conn.experiment_id()
    location = conn.retrying("reading the experiment", lambda: conn.client().get_experiment(experiment_id).artifact_location)
    if not location.startswith("file://" + root):
        raise AssertionError(f"expected the experiment's artifacts under {root}, got {location}")
    return experiment_id


def children_cpu() -> float:
    """User + system CPU seconds of this process's reaped children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def check_history(conn, run_id: str, steps: int, checkpoint_steps: list[int], checkpoint_keys: list[str]) -> int:
    """Check the store holds the loss of every summary step and every checkpoint metric at each checkpoint; the count."""

    def read() -> dict[str, list]:
        client = conn.client()
        return {key: client.get_metric_history(run_id, key) for key in ["loss", *checkpoint_keys]}

    histories = conn.retrying("reading the metric history", read)
    loss_steps = sorted(m.step for m in histories["loss"])
    if loss_steps != list(range(SUMMARY_EVERY, steps + 1, SUMMARY_EVERY)):
        raise AssertionError(
            f"run {run_id}: expected the loss of every {SUMMARY_EVERY}th step up to {steps}, got {len(loss_steps)} values"
        )
    for key in checkpoint_keys:
        got = sorted(m.step for m in histories[key])
        if got != checkpoint_steps:
            raise AssertionError(f"run {run_id}: expected {key} at steps {checkpoint_steps}, got {got}")
    return sum(len(h) for h in histories.values())


def wrapper_cost(calls: int = 200_000) -> float:
    """Seconds per call that a timing wrapper like `TimedBatcher.add`'s adds (wrapped no-op minus bare no-op)."""

    class Bare:
        def add(self, key, value, step):
            return None

    class Wrapped(Bare):
        add_seconds, add_calls, add_max, add_blocked, add_blocked_seconds = 0.0, 0, 0.0, 0, 0.0

        def add(self, key, value, step):
            start = time.perf_counter()
            Bare.add(self, key, value, step)
            took = time.perf_counter() - start
            self.add_seconds += took
            self.add_calls += 1
            if took > self.add_max:
                self.add_max = took
            if took > BLOCKED:
                self.add_blocked += 1
                self.add_blocked_seconds += took

    def loop(obj) -> float:
        add = obj.add
        start = time.perf_counter()
        for i in range(calls):
            add("loss", 0.5, i)
        return time.perf_counter() - start

    bare, wrapped = Bare(), Wrapped()
    samples = [loop(wrapped) - loop(bare) for _ in range(5)]
    return max(0.0, median(samples)) / calls


def run() -> dict:
    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.configs import TrainingConfig
    from prefect_tensorflow.tasks.registry import tracking
    from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
    from prefect_tensorflow.tasks.registry.tracking import MetricBatcher, TrainingRun
    from prefect_tensorflow.tasks.training import loop as training
    from prefect_tensorflow.tasks.training.loop import train_with_checkpoints
    from prefect_tensorflow.tasks.training.results import checkpoint_metric_names

    policy = CheckpointPolicy(save_checkpoints_steps=EVERY, save_at_start=False, save_at_end=False)

    def config(steps: int) -> TrainingConfig:
        return TrainingConfig(steps=steps, policy=policy, seed=0, summary_every_n_steps=SUMMARY_EVERY)

    expected_saves = STEPS // EVERY
    runs_opened: list[dict] = []

    class TimedBatcher(MetricBatcher):
        """`MetricBatcher` that times its start, every `add`, its `close`, and the sender's CPU time."""

        def __init__(self, *args, **kwargs):
            start = time.perf_counter()
            super().__init__(*args, **kwargs)
            self.started_at = start
            self.start_seconds = time.perf_counter() - start
            self.add_seconds, self.add_calls, self.add_max = 0.0, 0, 0.0
            self.add_blocked, self.add_blocked_seconds = 0, 0.0

        def add(self, key, value, step):
            start = time.perf_counter()
            MetricBatcher.add(self, key, value, step)
            took = time.perf_counter() - start
            self.add_seconds += took
            self.add_calls += 1
            if took > self.add_max:
                self.add_max = took
            if took > BLOCKED:
                self.add_blocked += 1
                self.add_blocked_seconds += took

        def close(self, timeout: float = 900) -> None:
            cpu, start = children_cpu(), time.perf_counter()
            try:
                super().close(timeout)
            finally:
                end = time.perf_counter()
                self.close_seconds = end - start
                self.sender_lifetime = end - self.started_at
                self.sender_cpu = children_cpu() - cpu  # the sender is reaped in close()

    class TimedRun(TrainingRun):
        """`TrainingRun` that records how long entering and leaving took, and its batcher's figures."""

        def __enter__(self):
            start = time.perf_counter()
            out = super().__enter__()
            self._enter_seconds = time.perf_counter() - start
            return out

        def __exit__(self, exc_type, exc, tb):
            start = time.perf_counter()
            super().__exit__(exc_type, exc, tb)
            batcher = self._batcher
            runs_opened.append(
                {
                    "run_id": self.run_id,
                    "enter": self._enter_seconds,
                    "exit": time.perf_counter() - start,
                    "sender_start": batcher.start_seconds,
                    "close": batcher.close_seconds,
                    "sender_lifetime": batcher.sender_lifetime,
                    "sender_cpu": batcher.sender_cpu,
                    "queued": batcher.queued,
                    "add_calls": batcher.add_calls,
                    "add_seconds": batcher.add_seconds,
                    "add_max": batcher.add_max,
                    "add_blocked": batcher.add_blocked,
                    "add_blocked_seconds": batcher.add_blocked_seconds,
                }
            )

    saved_home = os.environ.get("PREFECT_TENSORFLOW_HOME")
    with Scratch(NAME) as scratch:
        os.environ["PREFECT_TENSORFLOW_HOME"] = scratch.path
        training.TrainingRun = TimedRun
        tracking.MetricBatcher = TimedBatcher
        try:
            conn = MlflowConfig(tracking_uri="sqlite:///" + os.path.join(scratch.path, "mlflow", "mlflow.db"))
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
                        result = train_with_checkpoints(d, config(steps), conn)
                    elif kind == "noop":
                        result = train_with_checkpoints(d, config(steps), on_progress=noop, on_checkpoint=noop)
                    else:
                        result = train_with_checkpoints(d, config(steps))
                    wall = time.perf_counter() - start
                    if result.steps_run != steps or result.checkpoints_saved != saves:
                        raise AssertionError(
                            f"expected {steps} steps and {saves} checkpoints, got {result.steps_run} "
                            f"steps and {result.checkpoints_saved} checkpoints"
                        )
                    out = {"elapsed": result.elapsed_seconds, "wall": wall, "steps": result.steps_run}
                    if kind == "tracked":
                        opened = runs_opened[-1]
                        keys = sorted(checkpoint_metric_names(result.final_metrics))
                        expected = steps // SUMMARY_EVERY + saves * len(keys)
                        if opened["run_id"] != result.mlflow_run_id or opened["queued"] != expected:
                            raise AssertionError(
                                f"expected run {result.mlflow_run_id} to have queued {expected} metric values, "
                                f"got run {opened['run_id']} with {opened['queued']}"
                            )
                        stored = check_history(conn, result.mlflow_run_id, steps, [EVERY * (i + 1) for i in range(saves)], keys)
                        out.update(
                            run_id=result.mlflow_run_id,
                            metrics_stored=stored,
                            **{k: v for k, v in opened.items() if k != "run_id"},
                        )
                    shutil.rmtree(d)
                    return out

                return go

            warm_start = time.perf_counter()
            warm = case("tracked", WARMUP_STEPS)()  # checks its history in the store too
            warmup_seconds = time.perf_counter() - warm_start

            def idle_sender() -> dict:
                batcher = TimedBatcher(conn, warm["run_id"], interval=2.0)
                batcher.close()
                return {
                    "start": batcher.start_seconds,
                    "close": batcher.close_seconds,
                    "lifetime": batcher.sender_lifetime,
                    "cpu": batcher.sender_cpu,
                }

            runs = interleaved(
                {
                    "A": case("plain", STEPS),
                    "B": case("tracked", STEPS),
                    "C": case("noop", STEPS),
                    "Z": case("plain", 1),
                    "S": idle_sender,
                },
                ROUNDS,
            )
        finally:
            training.TrainingRun = TrainingRun
            tracking.MetricBatcher = MetricBatcher
            if saved_home is None:
                os.environ.pop("PREFECT_TENSORFLOW_HOME", None)
            else:
                os.environ["PREFECT_TENSORFLOW_HOME"] = saved_home
    wrap_cost = wrapper_cost()

    def med(key: str, field: str = "elapsed") -> float:
        return median(r[field] for r in runs[key])

    def col(key: str, field: str) -> list[float]:
        return [r[field] for r in runs[key]]

    a, b, c, z = med("A"), med("B"), med("C"), med("Z")
    a_wall, b_wall = med("A", "wall"), med("B", "wall")
    a_outside = median(r["wall"] - r["elapsed"] for r in runs["A"])
    b_outside = median(r["wall"] - r["elapsed"] for r in runs["B"])
    fixed = b_outside - a_outside
    enter, exit_ = med("B", "enter"), med("B", "exit")
    sender_start, close = med("B", "sender_start"), med("B", "close")
    sender_cpu, sender_life = med("B", "sender_cpu"), med("B", "sender_lifetime")
    idle_cpu, idle_life, idle_close = med("S", "cpu"), med("S", "lifetime"), med("S", "close")
    for r in runs["B"]:
        r["add_per_call"] = r["add_seconds"] / r["add_calls"]
        unblocked = r["add_calls"] - r["add_blocked"]
        r["add_per_unblocked_call"] = (r["add_seconds"] - r["add_blocked_seconds"]) / max(unblocked, 1)
        r["elapsed_minus_blocked"] = r["elapsed"] - r["add_blocked_seconds"]
    add_call, add_total, add_max = med("B", "add_per_call"), med("B", "add_seconds"), med("B", "add_max")
    add_unblocked, blocked_calls, blocked_seconds = (
        med("B", "add_per_unblocked_call"),
        med("B", "add_blocked"),
        med("B", "add_blocked_seconds"),
    )
    b_unblocked = med("B", "elapsed_minus_blocked")
    per_step = (b - a) / STEPS
    step_a = (a - z) / STEPS
    paired = [rb["elapsed"] / ra["elapsed"] for ra, rb in zip(runs["A"], runs["B"])]
    paired_loop = [
        (rb["elapsed"] - rz["elapsed"]) / (ra["elapsed"] - rz["elapsed"]) for ra, rb, rz in zip(runs["A"], runs["B"], runs["Z"])
    ]
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
        "sender_start_over_A_elapsed": sender_start / a,
        "run_exit_over_A_elapsed": exit_ / a,
        "close_over_A_elapsed": close / a,
        "logging_per_step_over_step": per_step / step_a,
        "add_per_call_over_step": add_call / step_a,
        "add_per_unblocked_call_over_step": add_unblocked / step_a,
        "add_blocked_over_A_elapsed": blocked_seconds / a,
        "B_minus_blocked_over_A_loop_only": (b_unblocked - z) / (a - z),
        "add_total_over_A_elapsed": add_total / a,
        "add_slowest_over_step": add_max / step_a,
        "wrapper_per_call_over_step": wrap_cost / step_a,
        "sender_cpu_over_A_elapsed": sender_cpu / a,
        "idle_sender_cpu_over_A_elapsed": idle_cpu / a,
        "idle_sender_lifetime_over_A_elapsed": idle_life / a,
    }
    result = {
        "parameters": {
            "model": "prefect_tensorflow.tasks.iris:build_model",
            "steps": STEPS,
            "save_checkpoints_steps": EVERY,
            "checkpoints_per_run": expected_saves,
            "batch_size": 32,
            "summary_every_n_steps": SUMMARY_EVERY,
            "metric_interval_seconds": 2.0,
            "tracking_store": "embedded sqlite in the scratch dir",
            "metric_transport": "buffered pipe to the metric_sender process",
            "rounds": ROUNDS,
            "warmup_steps": WARMUP_STEPS,
        },
        "warmup_seconds": warmup_seconds,
        "warmup_run": warm,
        "runs": runs,
        "median_elapsed_seconds": {"A_no_mlflow": a, "B_tracked": b, "C_noop_callbacks": c, "Z_fixed_cost": z},
        "median_wall_seconds": {"A_no_mlflow": a_wall, "B_tracked": b_wall},
        "mlflow_fixed_seconds": {
            "wall_minus_elapsed_B_minus_A": fixed,
            "run_enter": enter,
            "sender_start_popen": sender_start,
            "run_exit": exit_,
            "batcher_close_wait_for_sender": close,
        },
        "logging_seconds_per_step": per_step,
        "metric_batcher_add": {
            "median_seconds_per_call": add_call,
            "median_seconds_per_run": add_total,
            "median_slowest_call_seconds": add_max,
            "timing_wrapper_seconds_per_call": wrap_cost,
            "median_seconds_per_unblocked_call": add_unblocked,
            "blocked_threshold_seconds": BLOCKED,
            "median_blocked_calls_per_run": blocked_calls,
            "median_blocked_seconds_per_run": blocked_seconds,
        },
        "B_elapsed_minus_blocked_add_seconds": {
            "median": b_unblocked,
            "loop_only_over_A_loop_only": (b_unblocked - z) / (a - z),
        },
        "sender_process": {
            "median_cpu_seconds_per_B_run": sender_cpu,
            "median_lifetime_seconds_per_B_run": sender_life,
            "idle_median_cpu_seconds": idle_cpu,
            "idle_median_lifetime_seconds": idle_life,
        },
        "paired_B_over_A_elapsed": paired,
        "paired_B_over_A_loop_only": paired_loop,
        "ratios": ratios,
        "meets_one_percent": ratios["B_over_A_elapsed"] <= 1.01 and ratios["B_over_A_loop_only"] <= 1.01,
    }
    el = {k: col(k, "elapsed") for k in "ABCZ"}
    wl = {k: col(k, "wall") for k in "AB"}
    result["table"] = ratio_table(
        f"mlflow_logging: train_with_checkpoints() on iris, {STEPS} steps, loss every {SUMMARY_EVERY}, "
        f"checkpoint every {EVERY}, tracked in MLflow "
        f"(sqlite, sender process) vs not, {ROUNDS} interleaved rounds, medians",
        ["case", "median s", "min..max s", "steps/s", "ratio", "ratio is"],
        [
            ["A train(), no MLflow (elapsed)", a, spread(el["A"]), STEPS / a, 1.0, "baseline"],
            ["C train(), no-op callbacks (elapsed)", c, spread(el["C"]), STEPS / c, ratios["C_over_A_elapsed"], "C/A seconds"],
            [
                "B tracked: its training loop (elapsed)",
                b,
                spread(el["B"]),
                STEPS / b,
                ratios["B_over_A_elapsed"],
                "B/A seconds (<= 1.01)",
            ],
            ["B against C (MLflow logging alone)", b, "-", "-", ratios["B_over_C_elapsed"], "B/C seconds"],
            ["Z fixed cost of train() (steps=1)", z, spread(el["Z"]), "-", z / a, "Z/A seconds"],
            ["A loop only (A - Z)", a - z, "-", STEPS / (a - z), 1.0, "baseline"],
            ["C loop only (C - Z)", c - z, "-", STEPS / (c - z), ratios["C_over_A_loop_only"], "C/A seconds"],
            ["B loop only (B - Z)", b - z, "-", STEPS / (b - z), ratios["B_over_A_loop_only"], "B/A seconds (<= 1.01)"],
            ["logging per step: (B - A) / steps", per_step, "-", "-", ratios["logging_per_step_over_step"], "over one step of A"],
            [
                "MetricBatcher.add, per call (all)",
                add_call,
                spread(col("B", "add_per_call")),
                "-",
                ratios["add_per_call_over_step"],
                "over one step of A",
            ],
            [
                f"MetricBatcher.add, per call (the <= {fmt(BLOCKED * 1e3)} ms ones)",
                add_unblocked,
                spread(col("B", "add_per_unblocked_call")),
                "-",
                ratios["add_per_unblocked_call_over_step"],
                "over one step of A",
            ],
            [
                "MetricBatcher.add, all calls of a run",
                add_total,
                spread(col("B", "add_seconds")),
                "-",
                ratios["add_total_over_A_elapsed"],
                "over A elapsed",
            ],
            [
                f"  of it calls > {fmt(BLOCKED * 1e3)} ms (blocked on the pipe)",
                blocked_seconds,
                spread(col("B", "add_blocked_seconds")),
                "-",
                ratios["add_blocked_over_A_elapsed"],
                "over A elapsed",
            ],
            [
                "MetricBatcher.add, slowest call of a run",
                add_max,
                spread(col("B", "add_max")),
                "-",
                ratios["add_slowest_over_step"],
                "over one step of A",
            ],
            [
                "B loop only, less its blocked add calls",
                b_unblocked - z,
                "-",
                STEPS / (b_unblocked - z),
                ratios["B_minus_blocked_over_A_loop_only"],
                "B/A seconds",
            ],
            [
                "sender process CPU per B run (other core)",
                sender_cpu,
                spread(col("B", "sender_cpu")),
                "-",
                ratios["sender_cpu_over_A_elapsed"],
                "over A elapsed",
            ],
            [
                "  S: idle sender's CPU (start + exit)",
                idle_cpu,
                spread(col("S", "cpu")),
                "-",
                ratios["idle_sender_cpu_over_A_elapsed"],
                "over A elapsed",
            ],
            [
                "  S: idle sender's lifetime (wall)",
                idle_life,
                spread(col("S", "lifetime")),
                "-",
                ratios["idle_sender_lifetime_over_A_elapsed"],
                "over A elapsed",
            ],
            ["A wall time of train()", a_wall, spread(wl["A"]), STEPS / a_wall, 1.0, "baseline"],
            ["B wall time of a tracked train()", b_wall, spread(wl["B"]), STEPS / b_wall, ratios["B_over_A_wall"], "B/A seconds"],
            ["MLflow fixed cost per run", fixed, "-", "-", ratios["mlflow_fixed_over_A_elapsed"], "over A elapsed"],
            [
                "  of it TrainingRun enter",
                enter,
                spread(col("B", "enter")),
                "-",
                ratios["run_enter_over_A_elapsed"],
                "over A elapsed",
            ],
            [
                "    of which starting the sender (Popen)",
                sender_start,
                spread(col("B", "sender_start")),
                "-",
                ratios["sender_start_over_A_elapsed"],
                "over A elapsed",
            ],
            [
                "  of it TrainingRun exit",
                exit_,
                spread(col("B", "exit")),
                "-",
                ratios["run_exit_over_A_elapsed"],
                "over A elapsed",
            ],
            [
                "    of which close: waiting for the sender",
                close,
                spread(col("B", "close")),
                "-",
                ratios["close_over_A_elapsed"],
                "over A elapsed",
            ],
        ],
        notes=[
            f"per-round B/A elapsed: {spread(paired)}; loop only: {spread(paired_loop)}; "
            f"median {fmt(blocked_calls)} add calls > {fmt(BLOCKED * 1e3)} ms per B run.",
            f"B queued {runs['B'][0]['queued']} metric values per run ({STEPS // SUMMARY_EVERY} losses + {expected_saves} "
            f"checkpoints' metrics); every run's history read back from the store and checked "
            f"({runs['B'][0]['metrics_stored']} values).",
            f"add is timed by a wrapper whose own cost, {fmt(wrap_cost * 1e6)} us per call "
            f"({fmt(ratios['wrapper_per_call_over_step'])} of a step), is inside B; a slowest call far above "
            f"the per-call median is a write that blocked (pipe full, sender not reading yet).",
            "sender CPU = getrusage(RUSAGE_CHILDREN) difference around close(), which reaps it: its whole "
            f"life (start-up, imports, log_batch, exit), spent beside training; median lifetime {fmt(sender_life)} s.",
            f"S = a MetricBatcher closed at once (no metrics): Popen to exit; its close waited {fmt(idle_close)} s.",
            "enter = experiment lookup, create run, params, start the sender; exit = close (sender sends the rest "
            "and exits), checkpoint list + event files + graph.pbtxt as artifacts, set FINISHED.",
            "fixed cost = median(B wall - B elapsed) - median(A wall - A elapsed); it does not grow with the steps.",
            f"warm-up (tracked, {WARMUP_STEPS} steps, untimed, creates the store): {fmt(warmup_seconds)} s.",
        ],
    )
    return result


if __name__ == "__main__":
    report(NAME, run)
