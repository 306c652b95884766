"""The warm template: one isolated process with TensorFlow and MLflow's scoring server imported, forked per check.

A serving check in a fresh `python -I` process spends most of its time
importing TensorFlow (and, for `mlflow models serve`, MLflow). `fork_check`
asks a template process (`warm_template_main.py`, started lazily once per
parent process with `python -I`, no project code, cwd a temporary directory)
to `os.fork()` a child that does the check: a cold load of the SavedModel
(`kind="load"`, what `serving_check_main.py` does) or MLflow's scoring
server for a registered version (`kind="serve"`). The child is a fresh
process as far as the SavedModel is concerned (the template ran no
TensorFlow op and has no eager context), in a session of its own; the
answer is a `ForkedProcess` with the `subprocess.Popen` methods the checks
and `child_processes.stop_process_group` use.

Lifetime: the template is stopped at this process's exit (`atexit`), and it
exits by itself when its stdin closes, so a parent killed with SIGKILL
leaves no template and no check behind (the children also die with the
template, `PR_SET_PDEATHSIG`). A template found dead is restarted once; when
it cannot start, or a fork fails, `fork_check` answers None and the caller
runs the cold path.

Peak memory: a forked child's peak RSS (`ru_maxrss`, `VmHWM`) starts from
the template's resident set at the fork (the pages it shares with the
template: NumPy, TensorFlow, MLflow, imported once) and adds what the check
touched: what a serving process holding those imports and the model holds
resident, not the extra memory the fork cost. It is lower than a fresh
process's figure, which also counts what importing touched and released (on
this machine, iris: 386 MB forked vs 797 MB fresh; a 101 MB model: 488 vs
1446 MB): a `ServingLimits.max_peak_memory_mb` tuned on cold figures is
looser on warm ones.

Example:
    >>> from prefect_tensorflow.tasks.promotion.warm_template import ForkedProcess
    >>> child = ForkedProcess(12345)
    >>> child.poll() is None
    True
    >>> child.exited(0)
    >>> child.wait(timeout=1), child.returncode
    (0, 0)
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any, Literal, Optional

from ..child_processes import log_tail, start_process, stop_process_group

MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "warm_template_main.py")
START_TIMEOUT = 600.0
"""Seconds a starting template has to import TensorFlow and MLflow (minutes on a loaded machine)."""
REPLY_TIMEOUT = 60.0
"""Seconds a running template has to answer a fork request."""

_logger = logging.getLogger(__name__)


class WarmTemplateError(RuntimeError):
    """The template could not start, died, or could not fork the child."""


class ForkedProcess:
    """A child of the template, seen from its parent: `pid`, `returncode`, `poll()`, `wait(timeout)` as in `Popen`.

    The template reports its exit status; `wait` raises `subprocess.TimeoutExpired` like `Popen.wait`.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: Optional[int] = None
        self._done = threading.Event()

    def poll(self) -> Optional[int]:
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(f"forked child {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def exited(self, code: int) -> None:
        """Record the exit status (negative: the signal that killed it)."""
        self.returncode = code
        self._done.set()


class WarmTemplate:
    """One running template process, its reply reader and the children it forked for this process."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="prefect-tensorflow-warm-template-")
        self.log_path = os.path.join(self.directory, "template.log")
        self.owner = os.getpid()
        self.pid: Optional[int] = None
        self.import_seconds: Optional[float] = None
        self.process: Optional[subprocess.Popen] = None
        self._write_lock = threading.Lock()
        self._ready = threading.Event()
        self._gone = threading.Event()
        self._replies: dict[int, dict[str, Any]] = {}
        self._waiting: dict[int, threading.Event] = {}
        self._children: dict[int, ForkedProcess] = {}
        self._next_id = 0

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the template and wait until it has imported everything.

        Raises:
            WarmTemplateError: it exited or was not ready within `timeout` (its log's last line quoted).
        """
        self.process = start_process(
            [sys.executable, "-I", MAIN], self.log_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=self.directory
        )
        assert self.process.stdout is not None
        threading.Thread(target=self._read, args=(self.process.stdout,), name="warm-template-reader", daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self._gone.is_set() or time.monotonic() > deadline:
                why = "exited" if self._gone.is_set() else f"was not ready within {timeout:g} s"
                self.stop()
                raise WarmTemplateError(f"the warm template {why}: {self._last_line()}")

    def alive(self) -> bool:
        return self.process is not None and self._ready.is_set() and not self._gone.is_set() and self.owner == os.getpid()

    def fork(self, kind: Literal["load", "serve"], request: dict[str, Any], log_path: str) -> ForkedProcess:
        """Ask the template for a child of `kind` running `request`, its output appended to `log_path`.

        Raises:
            WarmTemplateError: the template is gone or the fork failed.
        """
        if not self.alive() or self.process is None or self.process.stdin is None:
            raise WarmTemplateError("the warm template is not running")
        with self._write_lock:
            self._next_id += 1
            ident = self._next_id
            event = self._waiting[ident] = threading.Event()
            try:
                self.process.stdin.write((json.dumps({**request, "id": ident, "kind": kind, "log": log_path}) + "\n").encode())
                self.process.stdin.flush()
            except (OSError, ValueError) as err:
                self._waiting.pop(ident, None)
                raise WarmTemplateError(f"the warm template is gone: {err}") from err
        answered = event.wait(REPLY_TIMEOUT)
        self._waiting.pop(ident, None)
        reply = self._replies.pop(ident, None)
        if not answered or reply is None:
            raise WarmTemplateError(f"the warm template did not answer within {REPLY_TIMEOUT:g} s: {self._last_line()}")
        if "error" in reply:
            raise WarmTemplateError(str(reply["error"]))
        child: ForkedProcess = reply["process"]
        return child

    def stop(self, grace: float = 10.0) -> None:
        """Close its stdin (it kills its children and exits), stop its process group, remove its directory."""
        if self.process is not None:
            try:
                if self.process.stdin is not None:
                    self.process.stdin.close()
                self.process.wait(timeout=grace)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            stop_process_group(self.process, grace=5.0)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            if message.get("ready"):
                self.pid, self.import_seconds = message.get("pid"), message.get("import_seconds")
                self._ready.set()
            elif "exited" in message:
                child = self._children.pop(int(message["exited"]), None)
                if child is not None:
                    child.exited(int(message["status"]))
            elif "id" in message:
                if "pid" in message:  # registered before its exit can be read, handed over with the reply
                    message["process"] = self._children[int(message["pid"])] = ForkedProcess(int(message["pid"]))
                self._replies[int(message["id"])] = message
                event = self._waiting.get(int(message["id"]))
                if event is not None:
                    event.set()
        self._gone.set()
        for event in list(self._waiting.values()):
            event.set()
        for pid, child in list(self._children.items()):  # they die with the template (PR_SET_PDEATHSIG)
            _wait_gone(pid, 5.0)
            child.exited(-9)
        self._children.clear()

    def _last_line(self) -> str:
        lines = [line.strip() for line in log_tail(self.log_path).splitlines() if line.strip()]
        return lines[-1] if lines else "(empty log)"


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)


_guard = threading.Lock()
_template: Optional[WarmTemplate] = None
_stop_registered = False
_start_failed: Optional[str] = None  # a template that could not start is not tried again by this process


def running_template(timeout: float = START_TIMEOUT) -> WarmTemplate:
    """This process's template, started if there is none or it died.

    Raises:
        WarmTemplateError: it could not start.
    """
    global _template, _stop_registered, _start_failed
    with _guard:
        if _template is not None and _template.alive():
            return _template
        if _start_failed is not None:
            raise WarmTemplateError(_start_failed)
        if _template is not None and _template.owner == os.getpid():
            _template.stop()
        _template = None  # a template inherited through a fork belongs to the process that started it
        template = WarmTemplate()
        try:
            template.start(timeout)
        except WarmTemplateError as err:
            _start_failed = str(err)
            raise
        _template = template
        if not _stop_registered:
            atexit.register(stop_template)
            _stop_registered = True
        return template


def stop_template() -> None:
    """Stop this process's template, if it runs (at exit; a test may call it)."""
    global _template
    with _guard:
        template, _template = _template, None
    if template is not None and template.owner == os.getpid():
        template.stop()


def _after_fork_in_child() -> None:
    """A process forked from this one starts its own template: it lets go of ours (its stdin must close when we go)."""
    global _template, _guard
    _guard = threading.Lock()
    template, _template = _template, None
    if template is not None and template.process is not None and template.process.stdin is not None:
        try:
            template.process.stdin.close()
        except (OSError, ValueError):
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)


def fork_check(kind: Literal["load", "serve"], request: dict[str, Any], log_path: str) -> Optional[ForkedProcess]:
    """A child of the warm template running the check `request` (see `warm_template_main`), or None: run it cold.

    A template found dead (or dying on this request) is restarted once; a template that cannot start
    or cannot fork answers None (the reason is logged).

    Example:
        >>> fork_check.__name__
        'fork_check'
    """
    why = None
    for _ in range(2):
        try:
            template = running_template()
        except WarmTemplateError as err:
            why = str(err)
            break
        try:
            return template.fork(kind, request, log_path)
        except WarmTemplateError as err:
            why = str(err)
            if template.alive():  # the fork itself failed: no restart would help
                break
    _logger.warning("warm serving check unavailable (%s): running the cold path", why)
    return None
