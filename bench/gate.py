"""The champion gate's cost with the champion's outcomes cached vs scoring both versions.

What a nightly gate pays: the challenger is new, the champion was scored on
the same eval data by an earlier gate, so its outcomes come from the cache
(`<PREFECT_TENSORFLOW_HOME>/gate-cache`). What it measures, in one process,
on two iris checkpoints (steps 200 and 300 of one 300-step training, each
exported once) registered as versions 1 and 2 of one registered model in an
embedded SQLite store in the scratch dir, `champion` on version 1:

- A "champion cached": `gate_champion(version 2, ...)` with the champion's
  outcomes in the cache and the challenger's removed before each round:
  the eval set loaded, the challenger scored through its serving signature,
  the rule, the evaluation run logged, the decision tagged.
- B "both scored": the same call with the cache emptied before each round:
  both SavedModels loaded and scored.

The rule is set so that the decision is "kept" (`min_improvement=0.5`):
no serving check and no alias move, which would cost the same in A and B
(`bench serving_check` measures the serving check). An untimed warm-up of
each path comes first; then A and B run in interleaved rounds and medians are
taken. `xB` below 1 is what the cache saves.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from .common import Scratch, fmt, interleaved, median, ratio_table, spread, timed

NAME = "gate"
ROUNDS = 5


def run() -> dict:
    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.checkpoints.selection import select_checkpoint_at_step
    from prefect_tensorflow.tasks.configs import ExportConfig, GateConfig, TrainingConfig
    from prefect_tensorflow.tasks.export.saved_model import export_saved_model
    from prefect_tensorflow.tasks.promotion.champion_gate import gate_champion
    from prefect_tensorflow.tasks.promotion.outcomes import OutcomeCache, load_eval_set
    from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
    from prefect_tensorflow.tasks.registry.model_versions import CHAMPION, register_model_version, set_alias
    from prefect_tensorflow.tasks.training.loop import train_with_checkpoints

    with Scratch(NAME) as scratch:
        previous = os.environ.get("PREFECT_TENSORFLOW_HOME")
        os.environ["PREFECT_TENSORFLOW_HOME"] = scratch.path
        try:
            conn = MlflowConfig(
                tracking_uri="sqlite:///" + os.path.join(scratch.path, "mlflow", "mlflow.db"), experiment_name="bench"
            )
            model_dir = scratch.fresh("model")
            policy = CheckpointPolicy(save_checkpoints_steps=100, keep_checkpoint_max=None)
            train_with_checkpoints(model_dir, TrainingConfig(steps=300, policy=policy))
            export = ExportConfig(model="iris", data="iris")
            registered = {}
            for step in (200, 300):
                ref = select_checkpoint_at_step(model_dir, step)
                exported = export_saved_model(ref.path, scratch.fresh(f"export-{step}"), export)
                registered[step] = register_model_version(exported, "bench-gate", conn, checkpoint=ref, data="iris")
            set_alias(conn.client(), "bench-gate", CHAMPION, registered[200].version, reason="bench setup", kind="manual")
            challenger = registered[300]
            gate = GateConfig(min_improvement=0.5)
            cache = OutcomeCache()
            eval_digest = load_eval_set("iris").digest
            challenger_digest = (
                conn.client().get_model_version("bench-gate", str(challenger.version)).tags["prefect_tensorflow.export.sha256"]
            )

            def cached() -> dict[str, Any]:
                path = cache.path(challenger_digest, eval_digest)
                if os.path.exists(path):
                    os.remove(path)
                decision = {}
                seconds = timed(lambda: decision.setdefault("d", gate_champion(challenger, conn, gate, data="iris")))
                return {"seconds": seconds, "state": decision["d"].state}

            def uncached() -> dict[str, Any]:
                shutil.rmtree(cache.directory, ignore_errors=True)
                decision = {}
                seconds = timed(lambda: decision.setdefault("d", gate_champion(challenger, conn, gate, data="iris")))
                return {"seconds": seconds, "state": decision["d"].state}

            uncached()  # warm-up: imports, tracing, the store
            cached()
            results = interleaved({"A": cached, "B": uncached}, ROUNDS)
        finally:
            if previous is None:
                os.environ.pop("PREFECT_TENSORFLOW_HOME", None)
            else:
                os.environ["PREFECT_TENSORFLOW_HOME"] = previous
    states = {r["state"] for rs in results.values() for r in rs}
    if states != {"kept"}:
        raise AssertionError(f"expected every gate to keep the champion, got {states}")
    seconds = {k: [r["seconds"] for r in v] for k, v in results.items()}
    base = median(seconds["B"])
    rows = [
        ["A champion cached", fmt(median(seconds["A"])), spread(seconds["A"]), fmt(median(seconds["A"]) / base, 3)],
        ["B both scored", fmt(base), spread(seconds["B"]), "1"],
    ]
    table = ratio_table(
        "gate_champion: the champion's outcomes cached vs both versions scored (iris, 30 eval rows)",
        ["case", "median s", "spread", "xB"],
        rows,
        notes=[f"{ROUNDS} interleaved rounds after a warm-up; decision 'kept' (no serving check, no move)"],
    )
    return {"table": table, "seconds": seconds, "ratio": median(seconds["A"]) / base}
