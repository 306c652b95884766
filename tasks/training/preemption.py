"""Catch SIGTERM (a preemption) so training can checkpoint before the process exits.

Example:
    >>> from prefect_tensorflow.tasks.training.preemption import PreemptionGuard
    >>> with PreemptionGuard() as guard:
    ...     while not guard.requested:
    ...         break  # a training step; save and stop once guard.requested
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any, Optional


class PreemptionGuard:
    """Within the `with` block, SIGTERM only sets `requested`.

    On leaving the block the previous handler is put back and, if SIGTERM
    arrived, the signal is sent again so the process ends (or Prefect reacts)
    as it would have without the guard, only later: after the checkpoint.
    Outside the main thread signals cannot be caught; the guard then does
    nothing, as it does when not `enabled` (a worker of several: its
    supervisor stops and restarts all of them).
    """

    def __init__(self, signum: int = signal.SIGTERM, *, enabled: bool = True):
        self.signum, self.enabled = signum, enabled
        self.requested = False
        self.installed = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.requested = True

    def __enter__(self) -> PreemptionGuard:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.installed:
            return
        signal.signal(self.signum, self._previous)
        self.installed = False
        if self.requested and exc[0] is None:
            os.kill(os.getpid(), self.signum)
