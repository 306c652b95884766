"""Whether a crashed run is resubmitted, and with which parameters: pure decisions, no Prefect calls.

A run of a training deployment (`retrain`, `sweep`, `export-checkpoint`)
that ends Crashed (its process or its worker died) is resubmitted as a new run
of the same deployment with the same parameters, up to a bound
(`PREFECT_TENSORFLOW_RESUBMIT_CRASHED` resubmissions; 0 turns it off). The chain
is counted by the runs' tags: the first run is attempt 1, a resubmission carries
`attempt:<k>` and `resubmission-of:<crashed run id>`. A Crashed run that was
being cancelled is not resubmitted. A `retrain` that asked for `more_steps`
is resubmitted with the absolute target step the crashed run was training to
(read from its log line `training from step S to target step T`), so that the
resubmission ends where the crashed run would have, not `more_steps` further.

Example:
    >>> run = CrashedRun(run_id="r1", flow_name="retrain", deployment_id="d1", state_type="CRASHED")
    >>> decision = decide_resubmission(run, max_resubmissions=2)
    >>> decision.resubmit, decision.attempt, decision.tags
    (True, 2, ('attempt:2', 'resubmission-of:r1'))
    >>> decision.reason
    'resubmitted: attempt 2 of at most 3 (PREFECT_TENSORFLOW_RESUBMIT_CRASHED=2)'
    >>> decide_resubmission(CrashedRun("r0", "retrain", "d1", "CRASHED", started=False), max_resubmissions=2).resubmit
    False
    >>> decide_resubmission(run, max_resubmissions=0).reason
    'not resubmitted: the policy is off (PREFECT_TENSORFLOW_RESUBMIT_CRASHED=0)'
    >>> resubmitted_parameters({"training": {"more_steps": 1000}}, target_step=1700)
    {'training': {'more_steps': None, 'steps': 1700}}
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

SETTING = "PREFECT_TENSORFLOW_RESUBMIT_CRASHED"
RESUBMITTED_FLOWS = frozenset({"retrain", "sweep", "export-checkpoint"})
ATTEMPT_TAG = "attempt:"
RESUBMISSION_OF_TAG = "resubmission-of:"
# The training loop's line (tasks/training/loop.py) naming where a training starts and ends.
TRAINING_LINE = re.compile(r"training from step (\d+) to target step (\d+)")


@dataclass(frozen=True)
class CrashedRun:
    """What the decision needs to know about the run that ended.

    `cancelled`: its state history has a Cancelling state (a cancel, even one
    that ended Crashed). `started`: it has a Running state (its flow began: a
    run whose process or parameters failed before that has nothing to resume).
    `resubmitted_as`: the id of a run already created for it.
    """

    run_id: str
    flow_name: str
    deployment_id: Optional[str]
    state_type: str
    tags: tuple[str, ...] = ()
    cancelled: bool = False
    started: bool = True
    resubmitted_as: Optional[str] = None

    @property
    def attempt(self) -> int:
        """The run's attempt number in its chain: its `attempt:<k>` tag, else 1."""
        return attempt_of(self.tags)


@dataclass(frozen=True)
class ResubmissionDecision:
    """Resubmit or not, why (one line, for the log and the artifact), and the new run's attempt and tags."""

    resubmit: bool
    reason: str
    attempt: Optional[int] = None
    tags: tuple[str, ...] = field(default=())


def attempt_of(tags: Iterable[str]) -> int:
    """The attempt number an `attempt:<k>` tag names (the highest, if several), else 1.

    Example:
        >>> attempt_of(["prefect-tensorflow", "attempt:3"]), attempt_of([]), attempt_of(["attempt:x"])
        (3, 1, 1)
    """
    numbers = [int(tag[len(ATTEMPT_TAG) :]) for tag in tags if tag.startswith(ATTEMPT_TAG) and tag[len(ATTEMPT_TAG) :].isdigit()]
    return max(numbers, default=1)


def decide_resubmission(run: CrashedRun, max_resubmissions: int) -> ResubmissionDecision:
    """Resubmit `run` as attempt k+1, or not, with the reason.

    Example:
        >>> run = CrashedRun(run_id="r3", flow_name="retrain", deployment_id="d1", state_type="CRASHED", tags=("attempt:3",))
        >>> decide_resubmission(run, max_resubmissions=2).reason
        'not resubmitted: attempt 3 was the last of at most 3 (PREFECT_TENSORFLOW_RESUBMIT_CRASHED=2)'
    """
    if run.state_type != "CRASHED":
        return ResubmissionDecision(False, f"not resubmitted: the run ended {run.state_type}, not CRASHED")
    if run.flow_name not in RESUBMITTED_FLOWS:
        return ResubmissionDecision(False, f"not resubmitted: flow {run.flow_name!r} is not one of {sorted(RESUBMITTED_FLOWS)}")
    if run.deployment_id is None:
        return ResubmissionDecision(False, "not resubmitted: the run was not created from a deployment")
    if not run.started:
        return ResubmissionDecision(
            False, "not resubmitted: it crashed before its flow started running (its parameters or its process failed first)"
        )
    if run.cancelled:
        return ResubmissionDecision(False, "not resubmitted: the run was being cancelled (a cancel is not a crash)")
    if run.resubmitted_as is not None:
        return ResubmissionDecision(False, f"not resubmitted again: already resubmitted as run {run.resubmitted_as}")
    if max_resubmissions <= 0:
        return ResubmissionDecision(False, f"not resubmitted: the policy is off ({SETTING}={max_resubmissions})")
    bound = f"at most {max_resubmissions + 1} ({SETTING}={max_resubmissions})"
    if run.attempt > max_resubmissions:
        return ResubmissionDecision(False, f"not resubmitted: attempt {run.attempt} was the last of {bound}")
    attempt = run.attempt + 1
    kept = tuple(t for t in run.tags if not t.startswith((ATTEMPT_TAG, RESUBMISSION_OF_TAG)))
    tags = (*kept, f"{ATTEMPT_TAG}{attempt}", f"{RESUBMISSION_OF_TAG}{run.run_id}")
    return ResubmissionDecision(True, f"resubmitted: attempt {attempt} of {bound}", attempt, tags)


def training_target(log_lines: Iterable[str]) -> Optional[int]:
    """The target step of the last training a run's log lines name (`training from step S to target step T`).

    Example:
        >>> training_target(["resumed from /m/model.ckpt-700 (step 700)", "training from step 700 to target step 1700"])
        1700
        >>> training_target(["nothing trained"]) is None
        True
    """
    targets = [int(match.group(2)) for line in log_lines if (match := TRAINING_LINE.search(line))]
    return targets[-1] if targets else None


def resubmitted_parameters(parameters: dict[str, Any], target_step: Optional[int]) -> dict[str, Any]:
    """The crashed run's parameters for its resubmission: the same, except that a `training.more_steps`
    becomes the absolute `training.steps` the crashed run was training to (when known).

    Example:
        >>> resubmitted_parameters({"training": {"steps": 300}}, target_step=300)
        {'training': {'steps': 300}}
        >>> resubmitted_parameters({"training": {"more_steps": 1000}}, target_step=None)
        {'training': {'more_steps': 1000}}
    """
    training = parameters.get("training")
    if target_step is None or not isinstance(training, dict) or training.get("more_steps") is None:
        return dict(parameters)
    return {**parameters, "training": {**training, "more_steps": None, "steps": target_step}}
