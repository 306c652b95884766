"""Child processes that never outlive their parent: what sweep trainers and multi-worker workers share.

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
  stops the whole group (`stop_group`: SIGTERM, a grace period, SIGKILL);
- TensorFlow's thread pools are sized by `thread_env(threads)` so that N
  trainings on N cores do not oversubscribe them.

Example:
    >>> from prefect_tensorflow.tasks.child_processes import thread_env
    >>> thread_env(1)["TF_NUM_INTRAOP_THREADS"], thread_env(0)
    ('1', {})
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Optional

PR_SET_PDEATHSIG = 1
EXIT_PARENT_GONE = 70
"""Exit status of a child whose parent died before it could arm PR_SET_PDEATHSIG."""


def thread_env(threads: int) -> dict[str, str]:
    """Environment that limits TensorFlow (and oneDNN/OpenMP) to `threads` threads per pool; {} for 0 (TF's defaults)."""
    if threads <= 0:
        return {}
    value = str(int(threads))
    return {"TF_NUM_INTRAOP_THREADS": value, "TF_NUM_INTEROP_THREADS": value, "OMP_NUM_THREADS": value}


def child_env(parent_variable: str, threads: int = 0, **extra: str) -> dict[str, str]:
    """This process's environment for a child: its pid under `parent_variable`, the thread limits, `extra`."""
    env = dict(os.environ)
    env.update(thread_env(threads))
    env[parent_variable] = str(os.getpid())
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


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


def stop_group(process: subprocess.Popen, grace: float = 5.0) -> Optional[int]:
    """Stop `process` and everything in its session: SIGTERM, then SIGKILL after `grace` seconds; its exit status."""
    if process.poll() is None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(process.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                return process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
    try:  # the leader has exited; its group may live on (a grandchild)
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return process.poll()


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


def tail(path: str, size: int = 2000) -> str:
    """The last `size` characters of a log file ('' if unreadable)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - size))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
