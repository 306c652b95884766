"""What a deployment run's process pays before its flow starts: loading the flow modules.

What it measures: fresh Python processes, interleaved, medians of the wall time of
one import statement inside the child (interpreter start-up excluded):

- A "as shipped": `import` of the three deployments' flow modules
  (`retrain`, `export_checkpoint`, `sweep`), which import MLflow and TensorFlow
  only inside the tasks that need them;
- B "MLflow at load": the same, then `prefect_tensorflow.tasks.registry.mlflow_client` (and
  with it `mlflow`), which is what loading the flow modules cost while
  `tasks/registry/model_versions.py` imported the MLflow client at module level.

Every run the Prefect UI creates pays this once in its own process, including a run
refused at once for a bad parameter (the hostile-input test makes 105 of those).

Example:
    >>> from bench.flow_start import CASES
    >>> sorted(CASES)
    ['as shipped', 'mlflow at load']
"""

from __future__ import annotations

import json
import subprocess
import sys

from .common import interleaved, median, ratio_table, spread

NAME = "flow_start"
ROUNDS = 7
FLOWS = "import prefect_tensorflow.flows.retrain, prefect_tensorflow.flows.export_checkpoint, prefect_tensorflow.flows.sweep"
CASES = {
    "as shipped": FLOWS,
    "mlflow at load": FLOWS + "; import prefect_tensorflow.tasks.registry.mlflow_client",
}
_CHILD = """
import json, sys, time
start = time.perf_counter()
exec({statement!r})
elapsed = time.perf_counter() - start
print(json.dumps({{"seconds": elapsed, "loaded": sorted({{"mlflow", "tensorflow"}} & set(sys.modules))}}))
"""


def _child(statement: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD.format(statement=statement)], capture_output=True, text=True, check=True, timeout=300
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run() -> dict:
    samples = interleaved({name: (lambda s=statement: _child(s)) for name, statement in CASES.items()}, ROUNDS)
    seconds = {name: [s["seconds"] for s in runs] for name, runs in samples.items()}
    shipped, eager = median(seconds["as shipped"]), median(seconds["mlflow at load"])
    loaded = {name: runs[0]["loaded"] for name, runs in samples.items()}
    rows = [
        ["as shipped", shipped, spread(seconds["as shipped"]), shipped / eager, ", ".join(loaded["as shipped"]) or "-"],
        ["MLflow at load (before)", eager, spread(seconds["mlflow at load"]), 1.0, ", ".join(loaded["mlflow at load"]) or "-"],
    ]
    result = {
        "parameters": {"rounds": ROUNDS, "statements": CASES},
        "median_seconds": {"as_shipped": shipped, "mlflow_at_load": eager},
        "ratios": {"as_shipped_over_mlflow_at_load": shipped / eager},
        "loaded": loaded,
        "samples": seconds,
    }
    result["table"] = ratio_table(
        f"flow_start: loading the deployments' flow modules in a fresh process, {ROUNDS} interleaved rounds, medians",
        ["case", "median s", "min..max s", "ratio", "also loaded"],
        rows,
        notes=["ratio: of the MLflow-at-load case; the interpreter's own start-up is not counted."],
    )
    return result
