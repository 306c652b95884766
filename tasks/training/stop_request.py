"""Why a training was asked to stop (a cancel, a timeout or a preemption), and telling Prefect which it was.

A signal alone does not say. A served flow run gets SIGTERM both when someone
presses Cancel in the Prefect UI (or calls the API) and when its machine is
preempted; the flow run's state on the server tells them apart: CANCELLING
for a cancel, still RUNNING for a preemption. Prefect's flow and task
timeouts, in the main thread, arrive as SIGALRM.

After the checkpoint, the training hands the signal back to Prefect. For a
cancel, Prefect must also learn that the SIGTERM is one: its runner tells the
flow-run process over a control channel, but the process only accepts while
Prefect's own SIGTERM handler is installed, and the training's handler was
(`preemption.PreemptionGuard`). `commit_cancel_intent` records what the
control channel would have, so the flow run ends Cancelled, not Crashed.

Example:
    >>> import signal
    >>> from prefect_tensorflow.tasks.training.stop_request import stop_reason
    >>> stop_reason(signal.SIGALRM), stop_reason(signal.SIGTERM, cancelling=lambda: True)
    ('timed out', 'cancelled')
    >>> stop_reason(signal.SIGTERM, cancelling=lambda: False)
    'preempted'
"""

from __future__ import annotations

import signal
from collections.abc import Callable

from ..run_context import current_flow_run_id, get_logger

PREEMPTED = "preempted"
CANCELLED = "cancelled"
TIMED_OUT = "timed out"


def flow_run_is_cancelling() -> bool:
    """Whether the flow run this is called from is CANCELLING (or CANCELLED) on its Prefect server.

    False outside a flow run, and when the server cannot be asked (then a SIGTERM is taken for a preemption,
    which also saves a checkpoint).
    """
    run_id = current_flow_run_id()
    if run_id is None:
        return False
    try:
        from uuid import UUID

        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(run_id)).state
    except Exception as err:  # noqa: BLE001 - the answer only chooses the words and the final state
        get_logger().warning("could not read the state of flow run %s (%s); taking SIGTERM for a preemption", run_id, err)
        return False
    return state is not None and (state.is_cancelling() or state.is_cancelled())


def stop_reason(signum: int, *, cancelling: Callable[[], bool] = flow_run_is_cancelling) -> str:
    """Why `signum` stopped the training: `TIMED_OUT` (SIGALRM: a Prefect timeout), `CANCELLED` (SIGTERM while
    `cancelling()`), else `PREEMPTED`."""
    if signum == signal.SIGALRM:
        return TIMED_OUT
    return CANCELLED if cancelling() else PREEMPTED


def commit_cancel_intent() -> bool:
    """Record in Prefect's control listener that the coming SIGTERM is a cancel; whether it could.

    Prefect 3's runner sends the intent before its SIGTERM; the flow engine reads it when the SIGTERM's
    `TerminationSignal` reaches it (`handle_cancellation` instead of `handle_crash`). A Prefect without
    that listener gets the plain SIGTERM (the run ends Crashed, as before).
    """
    try:
        from prefect._internal import control_listener
    except ImportError:
        return False
    set_intent = getattr(control_listener, "_set_intent", None)
    if set_intent is None:
        return False
    set_intent("cancel")
    return True
