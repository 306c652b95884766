"""A warm template process to fork children from: TensorFlow imported once, a fresh process per job.

Starting a Python process that imports TensorFlow costs seconds; forking one
that has imported it already costs milliseconds. A `WarmTemplate` runs a
template program (one that calls `warm_template_main.fork_loop` once its
imports are done) and asks it, over its stdin, to `os.fork()` a child per
job. Each child is in a session of its own (its parent's `stop_process_group`
stops it), dies with the template (`PR_SET_PDEATHSIG`) and sees itself as a
fresh process: the template runs no TensorFlow op, has no eager context and
no Python thread but its main one (`fork_loop` refuses to fork otherwise).
The parent sees a child as a `ForkedProcess` (`pid`, `poll`, `wait`,
`returncode` as in `subprocess.Popen`).

Users: the serving checks (`promotion.warm_template`, a `python -I` template
with no project code) and the sweep trainers (`training.sweep_template`, one
template per Dask worker process). Each keeps its template in a
`TemplateSlot`: started lazily (or launched early and waited for on first
use), restarted once when found dead or when its key (e.g. the environment
its children need) changed, stopped at this process's exit (`atexit`); a
template that could not start is not tried again by this process. The
template exits by itself when its stdin closes, so a parent killed with
SIGKILL leaves no template and no child behind.

Example:
    >>> from prefect_tensorflow.tasks.warm_process import ForkedProcess
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
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, Optional

from .child_processes import child_env, log_tail, start_process, stop_process_group

START_TIMEOUT = 600.0
"""Seconds a starting template has to import TensorFlow (minutes on a loaded machine)."""
REPLY_TIMEOUT = 60.0
"""Seconds a running template has to answer a fork request."""


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

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the child, unless it has exited (as `Popen.send_signal`)."""
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def exited(self, code: int) -> None:
        """Record the exit status (negative: the signal that killed it)."""
        self.returncode = code
        self._done.set()


class ForkedTemplateProcess:
    """A template forked from this process (`WarmTemplate.start_forked`), seen as the `subprocess.Popen` of a
    launched one: `pid`, `stdin`, `stdout`, `returncode`, `poll()`, `wait(timeout)`.

    Example:
        >>> ForkedTemplateProcess.__name__
        'ForkedTemplateProcess'
    """

    def __init__(self, pid: int, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        self.pid, self.stdin, self.stdout = pid, stdin, stdout
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: gone all the same
                self.returncode = -signal.SIGKILL
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"forked template {self.pid}", timeout or 0.0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode


class WarmTemplate:
    """One running template process, its reply reader and the children it forked for this process.

    `command` runs the template program, in `cwd` (default: the template's own temporary directory,
    which also holds its log) with `env` (default: this process's, through `child_processes.child_env`).
    """

    def __init__(self, command: Sequence[str], *, env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None) -> None:
        self.command, self.env = list(command), env
        self.directory = tempfile.mkdtemp(prefix="prefect-tensorflow-warm-template-")
        self.cwd = cwd or self.directory
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
        """Start the template and wait until it has imported everything (`launch`, then `wait_ready`)."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the template process without waiting for its imports."""
        self.process = start_process(
            self.command, self.log_path, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=self.cwd
        )
        assert self.process.stdout is not None
        threading.Thread(target=self._read, args=(self.process.stdout,), name="warm-template-reader", daemon=True).start()

    def start_forked(self, run_template: Callable[[], int], env: Optional[Mapping[str, str]] = None) -> None:
        """Start the template as a fork of this process, which has imported what the template needs, runs no
        thread but its main one and has no TensorFlow context (the caller checks: `fork_problem`): no launch,
        no imports to wait for. The fork runs `run_template()` (the template program's `fork_loop`) in a
        session of its own, its stdin and stdout the pipes to this process, its stderr the template's log, its
        cwd the template's directory, its environment `env` (default: this process's, through `child_env`);
        it dies with this process (`PR_SET_PDEATHSIG`). The template is ready once its first line is read.

        Raises:
            OSError: the fork failed.
        """
        environment = dict(env if env is not None else child_env())
        to_template, from_template = os.pipe(), os.pipe()  # close-on-exec: a later subprocess does not hold them
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            for fd in (*to_template, *from_template, log):
                os.close(fd)
            raise
        if pid == 0:
            _become_forked_template(run_template, to_template[0], from_template[1], log, parent, self.cwd, environment)
        for fd in (to_template[0], from_template[1], log):
            os.close(fd)
        process = ForkedTemplateProcess(pid, os.fdopen(to_template[1], "wb"), os.fdopen(from_template[0], "rb"))
        self.process = process  # type: ignore[assignment]  # the Popen attributes this class uses
        threading.Thread(target=self._read, args=(process.stdout,), name="warm-template-reader", daemon=True).start()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the launched template has imported everything.

        Raises:
            WarmTemplateError: it exited or was not ready within `timeout` (its log's last line quoted).
        """
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self._gone.is_set() or time.monotonic() > deadline:
                why = "exited" if self._gone.is_set() else f"was not ready within {timeout:g} s"
                self.stop()
                raise WarmTemplateError(f"the warm template {why}: {self._last_line()}")

    def alive(self) -> bool:
        return self.process is not None and self._ready.is_set() and not self._gone.is_set() and self.owner == os.getpid()

    def starting(self) -> bool:
        """Launched by this process, not ready yet, not gone."""
        return self.process is not None and not self._ready.is_set() and not self._gone.is_set() and self.owner == os.getpid()

    def children(self) -> list[int]:
        """The pids of the children it forked for this process that have not exited."""
        return list(self._children)

    def fork(self, kind: str, request: dict[str, Any], log_path: str) -> ForkedProcess:
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


def show_as(old_module: str, new_module: str) -> bool:
    """Rewrite this process's command line (`/proc/self/cmdline`, what `ps` and psutil show) from `old_module` to
    `new_module` (as long as it), so a child forked from a template is found like a started one (operators'
    `pgrep -f <module>`, the project's own process checks): the bytes are replaced in place. False when it
    cannot (another platform, names of other lengths, `old_module` not in the command line)."""
    import ctypes

    if len(old_module) != len(new_module):
        return False
    try:
        with open("/proc/self/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end: fields 48 and 49 of proc(5)
        area = ctypes.string_at(start, end - start)
        at = area.find(old_module.encode() + b"\0")
        if at < 0:
            return False
        ctypes.memmove(start + at, new_module.encode(), len(new_module))
        return True
    except (OSError, ValueError, IndexError):
        return False


def _become_forked_template(
    run_template: Callable[[], int], stdin: int, stdout: int, log: int, parent: int, cwd: str, env: Mapping[str, str]
) -> None:
    """The forked template's side of `WarmTemplate.start_forked`; never returns."""
    from .promotion.warm_template_main import become_child, run_and_exit

    def body() -> int:
        become_child(parent, stdin, stdout, log)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it by closing its stdin
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        return run_template()

    run_and_exit(body)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)


class TemplateSlot:
    """This process's one template of a kind: started on demand, restarted when dead or when its key changed.

    `make()` builds a not yet started `WarmTemplate`; `key` is whatever the template's children depend on
    (e.g. the environment and cwd they must see): a template started for another key is replaced.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._template: Optional[WarmTemplate] = None
        self._key: Any = None
        self._stop_registered = False
        self._start_failed: Optional[str] = None  # a template that could not start is not tried again
        os.register_at_fork(after_in_child=self._after_fork_in_child)

    def running(self, make: Callable[[], WarmTemplate], key: Any = None, timeout: float = START_TIMEOUT) -> WarmTemplate:
        """The template, started (or waited for, when launched) if need be.

        Raises:
            WarmTemplateError: it could not start (now or before, in this process).
        """
        template = self._get(make, key, launch_only=False)
        if template.starting():
            try:
                template.wait_ready(timeout)
            except WarmTemplateError as err:
                with self._guard:
                    self._start_failed = str(err)
                raise
        return template

    def fork(
        self, make: Callable[[], WarmTemplate], kind: str, request: dict[str, Any], log_path: str, key: Any = None
    ) -> tuple[Optional[ForkedProcess], Optional[str]]:
        """(a child of the template running `request`, None), or (None, why): the caller runs the cold path.

        A template found dead (or dying on this request) is restarted once; one that cannot start, or that
        is alive but cannot fork, answers why at once (no restart would help).
        """
        why = None
        for _ in range(2):
            try:
                template = self.running(make, key)
            except WarmTemplateError as err:
                return None, str(err)
            try:
                return template.fork(kind, request, log_path), None
            except WarmTemplateError as err:
                why = str(err)
                if template.alive():
                    break
        return None, why

    def launch(self, make: Callable[[], WarmTemplate], key: Any = None) -> None:
        """Start the template without waiting for its imports (none if one runs or is starting for `key`)."""
        try:
            self._get(make, key, launch_only=True)
        except WarmTemplateError:
            pass  # the first fork request runs the cold path and says why

    def adopt(self, template: WarmTemplate, key: Any = None) -> None:
        """Make `template` (started by this process, e.g. `start_forked`) the slot's, for `key`; one this process
        started before is stopped."""
        with self._guard:
            previous, self._template, self._key = self._template, template, key
            if not self._stop_registered:
                atexit.register(self.stop)
                self._stop_registered = True
        if previous is not None and previous is not template and previous.owner == os.getpid():
            previous.stop()

    def ready(self, key: Any = None) -> Optional[WarmTemplate]:
        """The template, if this process started it for `key` and it has imported everything; never starts or waits."""
        with self._guard:
            template, same = self._template, self._key == key
        return template if template is not None and same and template.alive() else None

    def current(self) -> Optional[WarmTemplate]:
        """The template this process started, if any (running or not)."""
        template = self._template
        return template if template is not None and template.owner == os.getpid() else None

    def stop(self) -> None:
        """Stop the template, if it runs (at exit; a test may call it)."""
        with self._guard:
            template, self._template = self._template, None
        if template is not None and template.owner == os.getpid():
            template.stop()

    def _get(self, make: Callable[[], WarmTemplate], key: Any, launch_only: bool) -> WarmTemplate:
        with self._guard:
            template = self._template
            if template is not None and (template.alive() or template.starting()) and self._key == key:
                return template
            if self._start_failed is not None:
                raise WarmTemplateError(self._start_failed)
            if template is not None and template.owner == os.getpid():
                template.stop()
            self._template = None  # a template inherited through a fork belongs to the process that started it
            template = make()
            try:
                template.launch() if launch_only else template.start()
            except (OSError, WarmTemplateError) as err:
                self._start_failed = str(err)
                raise WarmTemplateError(str(err)) from err
            self._template, self._key = template, key
            if not self._stop_registered:
                atexit.register(self.stop)
                self._stop_registered = True
            return template

    def _after_fork_in_child(self) -> None:
        """A process forked from this one starts its own template: it lets go of ours (its stdin must close when we go)."""
        self._guard = threading.Lock()
        template, self._template = self._template, None
        if template is not None and template.process is not None and template.process.stdin is not None:
            try:
                template.process.stdin.close()
            except (OSError, ValueError):
                pass
