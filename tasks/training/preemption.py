"""Catch SIGTERM (a preemption or a cancel) and a Prefect timeout's SIGALRM so training can checkpoint before it stops.

Example:
    >>> from prefect_tensorflow.tasks.training.preemption import PreemptionGuard
    >>> with PreemptionGuard() as guard:
    ...     while not guard.requested:
    ...         break  # a training step; save and stop once guard.requested
    >>> guard.requested, guard.reason()
    (False, None)
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Optional

from . import stop_request


class PreemptionGuard:
    """Within the `with` block, SIGTERM (and SIGALRM, when a handler is installed for it) only set `requested`.

    SIGALRM is Prefect's flow or task timeout in the main thread (its handler raises the timeout there);
    it is left alone when nothing handles it. `reason()` says why the loop was asked to stop
    (`stop_request.stop_reason`: preempted, cancelled or timed out), asked once.

    On leaving the block the previous handlers are put back and, if a signal arrived, that signal is
    sent again so the process ends (or Prefect reacts: a crash after a preemption, Cancelled after a
    cancel, TimedOut after a timeout) as it would have without the guard, only later: after the
    checkpoint. Outside the main thread signals cannot be caught; the guard then does nothing, as it
    does when not `enabled` (a worker of several: its supervisor stops and restarts all of them).
    """

    def __init__(
        self,
        signum: int = signal.SIGTERM,
        *,
        enabled: bool = True,
        cancelling: Callable[[], bool] = stop_request.flow_run_is_cancelling,
    ):
        self.signum, self.enabled, self.cancelling = signum, enabled, cancelling
        self.received: Optional[int] = None
        self.installed = False
        self._previous: dict[int, Any] = {}
        self._reason: Optional[str] = None

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived inside the block."""
        return self.received is not None

    def reason(self) -> Optional[str]:
        """Why the training was asked to stop (None: it was not); the server is asked once, outside the handler."""
        if self.received is not None and self._reason is None:
            self._reason = stop_request.stop_reason(self.received, cancelling=self.cancelling)
        return self._reason

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> PreemptionGuard:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous[self.signum] = signal.signal(self.signum, self._handle)
            if callable(signal.getsignal(signal.SIGALRM)):  # a Prefect timeout's alarm is armed
                self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.installed:
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        self.installed = False
        if self.received is not None and exc[0] is None:
            if self.reason() == stop_request.CANCELLED:
                stop_request.commit_cancel_intent()
            os.kill(os.getpid(), self.received)
