"""The sidecar evaluator's process, by name: its module, the template's, its parent variable and its priority.

Shared by the trainer's side (`sidecar_evaluator`, `evaluator_template`) and
the processes (`sidecar_evaluator_main`, `evaluator_forking_main`), which
import nothing of each other at module level through it.

Example:
    >>> len(FORKING_MODULE) == len(ENTRY_MODULE)  # a forked evaluator renames its command line in place
    True
"""

from __future__ import annotations

ENTRY_MODULE = "prefect_tensorflow.tasks.training.sidecar_evaluator_main"
"""A started evaluator: `python -m` this."""
FORKING_MODULE = "prefect_tensorflow.tasks.training.evaluator_forking_main"
"""The evaluators' warm template: `python -m` this; as long as `ENTRY_MODULE`, so a fork can take its name."""
PARENT_VARIABLE = "PREFECT_TENSORFLOW_EVALUATOR_PARENT"
"""The evaluator's parent pid (`child_processes.die_with_parent`)."""
EVALUATOR_NICE = 10
"""The evaluator's CPU priority (added to its parent's): a tenth of a core while training competes for it."""
