"""The process kit: every child process this package starts goes through it.

The sidecar evaluator, the metric sender, sweep trainers, the multi-worker
supervisor and its workers, and the local servers (`flows/servers.py`) are
started by `start_process` with one environment recipe (`child_env`: this
process's environment, TensorFlow's C++ log level `TF_CPP_MIN_LOG_LEVEL`
unless set, thread limits, the parent's pid for `die_with_parent`), stopped
by `stop_process_group` and reported on with `log_tail`.

A training launched from a Dask worker, a Prefect task or a supervisor runs
in its own process (`subprocess.Popen`, which works from Dask's daemonic
worker processes where `multiprocessing` does not). Three rules keep such a
child from writing checkpoints after whoever waits for it is gone:

- the child calls `die_with_parent()` first: `prctl(PR_SET_PDEATHSIG,
  SIGKILL)` (Linux: the kernel kills it when the thread that started it
  exits, e.g. when its Dask worker is SIGKILLed), then checks that its
  parent is still the one named in its environment (the parent may have died
  before the `prctl`), and a daemon thread repeats that check every second
  (other systems, or a subreaper that adopted it);
- the parent starts it in its own session (`start_new_session=True`) and
  stops the whole group (`stop_process_group`: SIGTERM, a grace period, SIGKILL);
- TensorFlow's thread pools are sized by `thread_env(threads)` so that N
  trainings on N cores do not oversubscribe them.

The sidecar evaluator and the metric sender are the exceptions on purpose:
they stay in their parent's session and end when their stdin closes, so that
an evaluator finishes what a killed trainer committed.

Example:
    >>> import sys
    >>> from prefect_tensorflow.tasks.child_processes import log_tail, start_process, stop_process_group, thread_env
    >>> thread_env(1)["TF_NUM_INTRAOP_THREADS"], thread_env(0)
    ('1', {})
    >>> process = start_process([sys.executable, "-c", "print('hello')"], log_path="hello.log")
    >>> process.wait(timeout=60), stop_process_group(process), log_tail("hello.log")
    (0, 0, 'hello\\n')
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

TF_CPP_MIN_LOG_LEVEL = "3"
"""TensorFlow's C++ log level in every process this package starts, and in the CLI (unless the user set one):
3 hides its info lines, warnings and the "failed call to cuInit" error every CPU-only machine prints;
Python-level errors still raise."""
PR_SET_PDEATHSIG = 1
EXIT_PARENT_GONE = 70
"""Exit status of a child whose parent died before it could arm PR_SET_PDEATHSIG."""


def thread_env(threads: int) -> dict[str, str]:
    """Environment that limits TensorFlow (and oneDNN/OpenMP) to `threads` threads per pool; {} for 0 (TF's defaults)."""
    if threads <= 0:
        return {}
    value = str(int(threads))
    return {"TF_NUM_INTRAOP_THREADS": value, "TF_NUM_INTEROP_THREADS": value, "OMP_NUM_THREADS": value}


def quiet_tensorflow(env: Any) -> None:
    """Set TensorFlow's C++ log level (`TF_CPP_MIN_LOG_LEVEL`) in the mapping `env`, unless it is set already."""
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", TF_CPP_MIN_LOG_LEVEL)


def child_env(
    parent_variable: Optional[str] = None, threads: int = 0, base: Optional[Mapping[str, str]] = None, **extra: str
) -> dict[str, str]:
    """The environment of a child: `base` (default: this process's), the TensorFlow log level unless set, the thread
    limits, this process's pid under `parent_variable` (for `die_with_parent`), then `extra`."""
    env = dict(os.environ if base is None else base)
    env.update(thread_env(threads))
    if parent_variable is not None:
        env[parent_variable] = str(os.getpid())
    quiet_tensorflow(env)
    env.update(extra)
    return env


def start_process(
    command: Sequence[str],
    log_path: Optional[str] = None,
    *,
    env: Optional[Mapping[str, str]] = None,
    parent_variable: Optional[str] = None,
    threads: int = 0,
    new_session: bool = True,
    stdin: Any = subprocess.DEVNULL,
    stdout: Any = None,
    stderr: Any = None,
    **popen: Any,
) -> subprocess.Popen:
    """Start `command` with `child_env(parent_variable, threads, env)`, in a session of its own unless not `new_session`.

    With `log_path`, what `stdout` and `stderr` do not take is appended to that file (both streams by
    default). `popen`: more `subprocess.Popen` arguments (`pass_fds`, `text`, `cwd`, `user`, ...).
    """
    environment = child_env(parent_variable, threads, env)
    if log_path is None:
        return subprocess.Popen(
            list(command), stdin=stdin, stdout=stdout, stderr=stderr, env=environment, start_new_session=new_session, **popen
        )
    with open(log_path, "ab") as log:
        out = log if stdout is None else stdout
        err = stderr if stderr is not None else (subprocess.STDOUT if out is log else log)
        return subprocess.Popen(
            list(command), stdin=stdin, stdout=out, stderr=err, env=environment, start_new_session=new_session, **popen
        )


def die_with_parent(parent_variable: str) -> None:
    """Make this process die with its parent (see the module docstring); exit at once if it is gone already."""
    expected = int(os.environ.get(parent_variable, "0") or 0)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if not expected:
        return
    if os.getppid() != expected:  # the parent died before prctl took effect
        os._exit(EXIT_PARENT_GONE)

    def watch() -> None:
        while True:
            if os.getppid() != expected:
                os._exit(EXIT_PARENT_GONE)
            time.sleep(1.0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports on `host` that nothing listens on right now (bound together, then released).

    Another process may take one before the child binds it: the child then fails to start (a multi-worker
    attempt is retried with fresh ports).
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def signal_group(process: subprocess.Popen, sig: int) -> None:
    """Send `sig` to the process group of `process` (started in a session of its own), if it is still there.

    No such group while `process` has not exited: a child forked by a warm template that has not reached its
    `setsid()` yet. It then gets `sig` itself (a second call, after the grace period, reaches its group).
    """
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        if process.poll() is None:
            try:
                os.kill(process.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
    except PermissionError:
        pass


def stop_process_group(process: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 30.0) -> Optional[int]:
    """Stop `process` and everything in its session: `sig`, then SIGKILL after `grace` seconds; its exit status."""
    if process.poll() is None:
        signal_group(process, sig)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    signal_group(process, signal.SIGKILL)  # the leader may be gone and its group not (a grandchild)
    return process.wait()


def write_json_atomically(path: str, data: Any) -> None:
    """Write `data` as JSON to `path` through a temporary sibling, fsync and rename: readers see all or nothing."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_json(path: str) -> Optional[Any]:
    """The JSON in `path`, or None when it is missing or not (yet) complete JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def log_tail(path: str, size: int = 3000) -> str:
    """The last `size` characters of a log file ('' if unreadable)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - size))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
