"""A sweep of 4 candidates on 2 Dask worker processes against the same 4 trained one after another in one process.

What it measures, on the bundled iris model (batch 32, `STEPS` steps each, a
checkpoint every `EVERY` steps evaluated in the loop, no MLflow), 4
candidates (learning rates 0.02, 0.05, 0.1, 0.2; seed 0), every round into
fresh model dirs:

- S "sequential": `train_with_checkpoints` for each candidate in turn, in
  this process (TensorFlow imported and warmed up once, its default thread
  pools: it may use both cores for one candidate).
- D "Dask, 2 workers": what the `sweep` flow does to train them: inside a
  Prefect flow, a temporary LocalCluster of 2 worker processes (1 thread
  each, on 127.0.0.1) is started, each worker launches its warm trainer
  template (`launch_templates`, TensorFlow imported while the tasks are
  submitted; untracked, as here: without MLflow's client), the 4
  `train-sweep-candidate` tasks are submitted, each trains its candidate in
  a child forked from its worker's template with 1 TensorFlow thread per
  pool, and the cluster is stopped (its workers, once closed, skip Python's
  teardown: `sweep_worker_exit`). The wall time runs from before the cluster
  starts to after it is stopped.
- K "cluster only": the same LocalCluster started and stopped, nothing submitted.

Per candidate of D (medians), from the task bodies' own timestamps and the
Dask worker that ran each (`attempts.jsonl`):

- Prefect + Dask overhead: for each worker, the time between the moment it
  could take a task (the submission, or the end of its previous task body)
  and the start of the next task body, plus the time from the end of its
  last task body until the flow held the result; summed over workers,
  divided by the 4 candidates. The cluster's start is excluded (K);
- child process: task body minus the child's training call (fork, or a
  wait for the template's imports; a cold start: spawn, `import tensorflow`);
- training: the child's `train_with_checkpoints` call.

The Prefect API is `prefect_test_harness` (a `prefect server` subprocess),
started once before anything is timed. How to read it: D/S is the wall-time
ratio; 0.5 is the limit on 2 cores (perfect 2-way parallelism, no overhead).
"""

from __future__ import annotations

import json
import os
import statistics
import time

from .common import Scratch, fmt, interleaved, median, ratio_table, report, spread

NAME = "sweep"
STEPS = 20_000
EVERY = 5_000
LEARNING_RATES = (0.02, 0.05, 0.1, 0.2)
WORKERS = 2
ROUNDS = 2
WARM_STEPS = 300

_ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def run() -> dict:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import distributed
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from prefect_tensorflow.flows.sweep import dask_task_runner, launch_templates
    from prefect_tensorflow.tasks import prefect_tasks
    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.configs import TrainingConfig
    from prefect_tensorflow.tasks.training.loop import train_with_checkpoints
    from prefect_tensorflow.tasks.training.sweep_candidates import ATTEMPTS_FILE, Candidate, plan_candidates

    def base(steps: int) -> TrainingConfig:
        policy = CheckpointPolicy(save_checkpoints_steps=min(EVERY, steps), keep_checkpoint_max=2)
        return TrainingConfig(steps=steps, policy=policy, evaluation="in_loop")

    candidates = [Candidate(hparams={"learning_rate": lr}, seed=0) for lr in LEARNING_RATES]

    @flow(name="bench-sweep-dask")
    def on_dask(root: str, steps: int) -> dict:
        specs = plan_candidates(root, base(steps), candidates, threads=1)
        started = time.time()
        with dask_task_runner(None, WORKERS) as runner:
            client = runner.client  # starts the LocalCluster
            launch_templates(client, 1, tracked=False)  # as the sweep flow does for an untracked sweep
            cluster_up = time.time()
            futures = [runner.submit(prefect_tasks.train_sweep_candidate, parameters={"spec": s}) for s in specs]
            by_key = {f.wrapped_future.key: f for f in futures}
            results, collected = [], []
            for done in distributed.as_completed([f.wrapped_future for f in futures], loop=client.loop):
                future = by_key[done.key]
                results.append(future.result())
                collected.append(time.time())
                future.wrapped_future.release()
        stopped = time.time()
        return {
            "started": started,
            "cluster_up": cluster_up,
            "collected": collected,
            "stopped": stopped,
            "results": [r.model_dump(mode="json") for r in results],
        }

    @flow(name="bench-sweep-cluster-only")
    def cluster_only() -> float:
        started = time.perf_counter()
        with dask_task_runner(None, WORKERS) as runner:
            runner.client  # noqa: B018 - starts the cluster
        return time.perf_counter() - started

    with prefect_test_harness(server_startup_timeout=180), Scratch(NAME) as scratch:
        counter = iter(range(10**6))

        def sequential(steps: int):
            def go() -> dict:
                root = scratch.fresh(f"seq-{next(counter)}")
                start = time.perf_counter()
                for spec in plan_candidates(root, base(steps), candidates):
                    result = train_with_checkpoints(spec.model_dir, spec.config)
                    assert result.final_step == steps
                return {"wall": time.perf_counter() - start}

            return go

        def dask(steps: int):
            def go() -> dict:
                root = scratch.fresh(f"dask-{next(counter)}")
                start = time.perf_counter()
                out = on_dask(root, steps)
                wall = time.perf_counter() - start
                assert all(r["training"]["final_step"] == steps and not r["skipped"] for r in out["results"])
                return {"wall": wall, **breakdown(out, os.path.join(root, ATTEMPTS_FILE))}

            return go

        warm_start = time.perf_counter()
        sequential(WARM_STEPS)()
        dask(WARM_STEPS)()
        warmup = time.perf_counter() - warm_start
        runs = interleaved({"S": sequential(STEPS), "D": dask(STEPS), "K": lambda: {"wall": cluster_only()}}, ROUNDS)

    s, d, k = (median(r["wall"] for r in runs[key]) for key in ("S", "D", "K"))
    per = {key: median(r[key] for r in runs["D"]) for key in ("overhead", "child_process", "training", "task")}
    forked = sum(r["forked"] for r in runs["D"])
    rows = [
        ["S sequential, 1 process", s, spread([r["wall"] for r in runs["S"]]), 1.0, s / len(candidates)],
        ["D Dask LocalCluster, 2 workers", d, spread([r["wall"] for r in runs["D"]]), d / s, d / len(candidates)],
        ["K cluster start + stop only", k, spread([r["wall"] for r in runs["K"]]), k / s, "-"],
    ]
    result = {
        "parameters": {
            "model": "iris",
            "candidates": len(candidates),
            "learning_rates": LEARNING_RATES,
            "steps": STEPS,
            "save_checkpoints_steps": EVERY,
            "evaluation": "in_loop",
            "dask_workers": WORKERS,
            "threads_per_candidate": 1,
            "rounds": ROUNDS,
        },
        "warmup_seconds": warmup,
        "runs": runs,
        "median_wall_seconds": {"S": s, "D": d, "K": k},
        "ratio_D_over_S": d / s,
        "per_candidate_seconds": per,
        "forked_candidates": forked,
    }
    result["table"] = ratio_table(
        f"sweep: {len(candidates)} iris candidates x {STEPS} steps on {WORKERS} Dask worker processes vs one after "
        f"another in one process, {ROUNDS} interleaved rounds, medians",
        ["case", "median s", "min..max s", "x S", "s per candidate"],
        rows,
        notes=[
            f"D/S = {fmt(d / s)} (0.5 is the limit on 2 cores).",
            f"per candidate of D: Prefect + Dask overhead {fmt(per['overhead'])} s; child process (spawn, TF import, exit) "
            f"{fmt(per['child_process'])} s; training call {fmt(per['training'])} s; task body {fmt(per['task'])} s; "
            f"{forked} of {len(runs['D']) * len(candidates)} timed candidates forked from a warm template.",
            f"cluster start + stop (K) {fmt(k)} s is part of D's wall time, not of the per-candidate overhead.",
            f"warm-up (untimed, {WARM_STEPS} steps each way): {fmt(warmup)} s; os.cpu_count() = {os.cpu_count()}.",
        ],
    )
    return result


def breakdown(out: dict, attempts_path: str) -> dict:
    """Per-candidate medians of D's parts (see the module docstring)."""
    with open(attempts_path, encoding="utf-8") as handle:
        lines = [json.loads(line) for line in handle if line.strip()]
    worker_of = {line["candidate_id"]: line["pid"] for line in lines if line["event"] == "started"}
    results = out["results"]
    collected = dict(zip((r["candidate_id"] for r in results), out["collected"]))
    by_worker: dict[int, list[dict]] = {}
    for r in results:
        by_worker.setdefault(worker_of[r["candidate_id"]], []).append(r)
    overhead = 0.0
    for tasks in by_worker.values():
        tasks.sort(key=lambda r: r["task_started"])
        free_at = out["cluster_up"]  # everything was submitted right after the cluster was up
        for r in tasks:
            overhead += r["task_started"] - free_at
            free_at = r["task_finished"]
        last = tasks[-1]
        overhead += max(collected[last["candidate_id"]] - last["task_finished"], 0.0)
    task = [r["task_finished"] - r["task_started"] for r in results]
    training = [r["timing"]["training"] for r in results]
    return {
        "overhead": overhead / len(results),
        "child_process": statistics.median(t - c for t, c in zip(task, training)),
        "training": statistics.median(training),
        "task": statistics.median(task),
        "forked": sum(bool(r.get("forked")) for r in results),
    }


if __name__ == "__main__":
    report(NAME, run)
