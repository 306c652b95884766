"""A model builder that swaps a run's output directory for a symlink out of the roots, then builds iris.

Used by `tests/test_hostile_files.py` through the deployment parameter
`model="swap_models:build_after_swapping"` (the served worker allows the
module `swap_models`; `tests/` is on its `PYTHONPATH`). The builder runs
inside the flow at the moment that sits between a run's checks and its writes:
`export_saved_model` calls it to rebuild the model after the export base was
checked, opened and locked and before the SavedModel is written, and
`freeze_graph` calls it after the output directory was checked and before the
graph is written.

What to swap is read from the JSON file named by `PTF_TEST_SWAP_PLAN`: a list
of `{"path": <dir>, "to": <dir outside the roots>}`. Each listed path that is
a real directory when the builder runs is renamed to `<path>.moved` (it stays
inside the run's own output) and replaced by a symlink to `to`, once. An
export base exists when the export calls the builder; a frozen dir only once
the freeze starts, so listing one or the other chooses the moment.
"""

from __future__ import annotations

import json
import os

from prefect_tensorflow.tasks import iris


def build_after_swapping():
    """Swap what the plan lists (see the module docstring), then return the bundled iris classifier."""
    plan = os.environ.get("PTF_TEST_SWAP_PLAN")
    if plan and os.path.exists(plan):
        with open(plan, encoding="utf-8") as handle:
            steps = json.load(handle)
        for step in steps:
            path = step["path"]
            if os.path.isdir(path) and not os.path.islink(path):
                os.rename(path, path + ".moved")
                os.symlink(step["to"], path)
    return iris.build_model()
