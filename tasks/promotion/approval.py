"""Approval of an `incomparable` gate decision: a person says whether the challenger may take `champion`.

When the two versions cannot be compared (a renamed output, other labels, a
champion that does not load), no rule can decide. The decision is asked for:

- given in advance (`decision="approve"` / `"reject"`, the CLI's
  `--approve` / `--reject`): no pause;
- in a flow run: the run pauses with a typed form in the Prefect UI
  (`GateApproval`: approve yes/no, a reason), resumed from the UI or the API
  (`prefect.flow_runs.resume_flow_run(id, run_input={"approve": True, "reason": "..."})`).
  No answer within the timeout keeps the champion;
- outside a flow run with nothing given: the champion is kept, stated.

`settle(decision, approval)` turns the answer into the final decision: approve
-> `promoted` (it still goes through the serving check and the guarded alias
move), anything else -> `kept`; the reason says who decided and why.

`GateApproval` is a Prefect `RunInput`, made when first used (this module
does not import Prefect at import time).

Example:
    >>> from prefect_tensorflow.tasks.promotion.approval import Approval, given_approval
    >>> given_approval("reject").approve, given_approval("reject").how
    (False, 'given')
    >>> Approval(approve=None, reason="no approval within 60 s", by="nobody", how="timeout").answered
    False
"""

from __future__ import annotations

import functools
import getpass
import socket
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..run_context import _prefect_context, get_logger

Decision = Literal["approve", "reject"]
# A poll of the API every few seconds: the default (10 s) makes a short approval timeout coarse.
POLL_SECONDS = 2


class Approval(BaseModel):
    """A person's answer to an incomparable decision (or why there is none)."""

    model_config = ConfigDict(frozen=True)

    approve: Optional[bool] = Field(description="True: promote; False: keep; None: no answer (timeout, not asked)")
    reason: str
    by: str = Field(description="Who answered: user@host for a given decision, the resumed flow run otherwise")
    how: Literal["given", "pause", "timeout", "not-asked"]

    @property
    def answered(self) -> bool:
        return self.approve is not None


def who() -> str:
    """`user@host` of this process (the CLI user who passed --approve/--reject)."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def given_approval(decision: Decision, reason: str = "") -> Approval:
    """The answer given in advance (`--approve` / `--reject`).

    Example:
        >>> given_approval("approve", "new output names are expected").reason
        'approve given in advance: new output names are expected'
    """
    if decision not in ("approve", "reject"):
        raise ValueError(f"decision: expected 'approve', 'reject' or None, received {decision!r}")
    text = f"{decision} given in advance" + (f": {reason}" if reason else "")
    return Approval(approve=decision == "approve", reason=text, by=who(), how="given")


@functools.cache
def _form() -> Any:
    from prefect.input import RunInput

    class GateApproval(RunInput):
        """Approve or reject an incomparable challenger (the Prefect UI shows this as a form)."""

        approve: bool = Field(default=False, description="Promote the challenger to champion")
        reason: str = Field(default="", description="Why (recorded on the version and the run)")

    GateApproval.__module__ = __name__
    return GateApproval


def __getattr__(name: str) -> Any:
    if name == "GateApproval":
        return _form()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ask_approval(question: str, timeout_seconds: int, *, decision: Optional[Decision] = None) -> Approval:
    """The answer to an incomparable decision: given, asked by pausing the flow run, or none.

    Args:
        question: shown above the form in the Prefect UI (markdown): what differs, both versions.
        timeout_seconds: how long the paused run waits; no answer by then is `approve=None` ("timeout").
        decision: an answer given in advance: no pause.

    Example:
        >>> ask_approval("v2 renames an output", 60).how   # outside a flow run: not asked
        'not-asked'
    """
    if decision is not None:
        return given_approval(decision)
    context = _prefect_context()
    if context is None or context.FlowRunContext.get() is None:
        return Approval(
            approve=None,
            reason="not in a flow run and no --approve/--reject given: nobody was asked",
            by=who(),
            how="not-asked",
        )
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    log = get_logger()
    log.warning("champion gate: incomparable; waiting up to %d s for approval in the Prefect UI: %s", timeout_seconds, question)
    form = _form().with_initial_data(description=question, approve=False, reason="")
    run = context.FlowRunContext.get().flow_run
    try:
        answer = pause_flow_run(
            wait_for_input=form, timeout=timeout_seconds, poll_interval=min(POLL_SECONDS, max(1, timeout_seconds))
        )
    except FlowPauseTimeout:
        _running_again(run.id)
        return Approval(approve=None, reason=f"no approval within {timeout_seconds} s", by="nobody", how="timeout")
    by = f"Prefect flow run {run.name} resumed with input"
    return Approval(approve=bool(answer.approve), reason=answer.reason or "(no reason given)", by=by, how="pause")


def _running_again(flow_run_id: Any) -> None:
    """After a pause timed out, the run continues (to record "kept"): set it Running again."""
    from prefect import get_client
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Running(message="approval timed out: champion kept"), force=True)


def settle(decision: Any, approval: Approval) -> Any:
    """The final `GateDecision` of an incomparable one, given the approval.

    Approved -> state `promoted`; rejected or unanswered -> `kept`. The reason
    keeps why it was incomparable.
    """
    why = decision.reason
    if approval.approve:
        state, promoted = "promoted", True
        reason = f"approved by {approval.by}: {approval.reason} (incomparable: {why})"
    elif approval.approve is False:
        state, promoted = "kept", False
        reason = f"rejected by {approval.by}: {approval.reason} (incomparable: {why}); champion kept"
    else:
        state, promoted = "kept", False
        reason = f"{approval.reason}; champion kept (incomparable: {why})"
    return decision.model_copy(update={"state": state, "promoted": promoted, "reason": reason})
