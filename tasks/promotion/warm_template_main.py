"""The warm template's program: NumPy, TensorFlow and MLflow's scoring server imported once, a child forked per check.

`warm_template.WarmTemplate` runs this file by path (`python -I <this file>`,
cwd a temporary directory): like the cold-load program it imports only the
standard library, NumPy, TensorFlow and MLflow (`mlflow.pyfunc`, its
scoring server, uvicorn), never `prefect_tensorflow`; it loads
`serving_check_main.py` from its own directory under that plain name. It
runs no TensorFlow op and creates no eager context, so what a fork copies
is imported code and no live runtime state.

Protocol: one JSON object a line. It writes `{"ready": true, "pid": ...,
"import_seconds": ...}` once imported; then for each request line
`{"id": n, "kind": "load" | "serve", "log": path, ...}` it forks a child in a
session of its own (so the parent's `stop_process_group` stops it) and answers
`{"id": n, "pid": child}` (or `{"id": n, "error": why}`); when a child exits
it writes `{"exited": pid, "status": code}` (negative: killed by that signal).
It exits when its stdin closes (its parent is gone or done), killing its
children first; the children also die with it (`PR_SET_PDEATHSIG`). It
refuses to fork (an error reply: the caller runs the cold path) when the
fork would copy live runtime state (`fork_problem`).

That loop is `fork_loop`, written against the standard library only: the
sweep trainers' template (`training/sweep_forking_main.py`, which does import
project code) runs it too, with its own child body.

A child of kind `load` runs `serving_check_main.answer(request["request"])`;
a child of kind `serve` sets the environment it was sent (the connection's
tracking/registry URI and credentials: a pipe, never argv), downloads
`request["model_uri"]` into `request["download_dir"]` and runs uvicorn on
MLflow's scoring-server app (`mlflow.pyfunc.scoring_server.app:app`) with the
model path in its environment variable: what `mlflow models serve
--env-manager local` runs.

Example:
    >>> from prefect_tensorflow.tasks.promotion.warm_template_main import exit_code
    >>> exit_code(256), exit_code(9)
    (1, -9)
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))


def exit_code(status: int) -> int:
    """A `waitpid` status as `subprocess.Popen.returncode` gives it: the exit code, or minus the killing signal."""
    return os.waitstatus_to_exitcode(status)


def _load_check_program() -> Any:
    loaded = sys.modules.get("serving_check_main")
    if loaded is not None and getattr(loaded, "__file__", None) == os.path.join(HERE, "serving_check_main.py"):
        return loaded
    spec = importlib.util.spec_from_file_location("serving_check_main", os.path.join(HERE, "serving_check_main.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["serving_check_main"] = module
    spec.loader.exec_module(module)
    return module


def _imports(program: Any) -> None:
    program.import_tensorflow()  # as the cold program does: without Keras' optional imports
    import mlflow.pyfunc
    import mlflow.pyfunc.scoring_server
    import mlflow.tracking.artifact_utils
    import uvicorn  # noqa: F401

    try:  # the registry and tracking stores a test or a small deployment reads through (SQLite, REST)
        import mlflow.store.model_registry.sqlalchemy_store
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    except ImportError:
        pass


def _write(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def become_child(parent_pid: int, stdin: int, stdout: int, stderr: int) -> None:
    """A forked child's set-up: its own session, dies with `parent_pid` (`PR_SET_PDEATHSIG`), default signal
    handlers, fds 0-2 from `stdin`, `stdout` and `stderr` and every other one closed (its parent must see EOF on
    their pipes when its parent goes, not when it does)."""
    os.setsid()
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(70)
    for source, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
        os.dup2(source, target)
    os.closerange(3, 4096)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


def run_and_exit(body: Callable[[], Optional[int]]) -> None:
    """End this forked child with `body()`'s exit status (1 and the traceback on stderr if it raised), without
    the interpreter's teardown."""
    code = 1
    try:
        code = body() or 0
    except BaseException:  # noqa: BLE001  # the log's last line is the reason the parent quotes
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _in_child(log: str, template_pid: int) -> None:
    """A forked child's set-up (`become_child`): stdin from /dev/null, output to `log`."""
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    become_child(template_pid, os.open(os.devnull, os.O_RDONLY), out, out)


def _serve(request: dict[str, Any]) -> None:
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
    from mlflow.pyfunc import scoring_server
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri
    from mlflow.utils.file_utils import path_to_local_file_uri

    os.environ.clear()
    os.environ.update(request["env"])
    os.makedirs(request["download_dir"], exist_ok=True)
    local_path = _download_artifact_from_uri(request["model_uri"], output_path=request["download_dir"])
    os.environ[scoring_server._SERVER_MODEL_PATH] = path_to_local_file_uri(local_path)
    os.environ[MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name] = str(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())
    import uvicorn

    uvicorn.run("mlflow.pyfunc.scoring_server.app:app", host=request["host"], port=int(request["port"]))


def fork_problem() -> Optional[str]:
    """Why a fork now would copy live runtime state into the child, or None: a Python thread besides this one
    (its locks could be held mid-update), or TensorFlow's eager context (its thread pools do not survive a fork).

    Example:
        >>> problem = fork_problem()
        >>> problem is None or problem.endswith("forking it is not safe")
        True
    """
    import threading

    if threading.active_count() != 1:
        return f"the template runs {threading.active_count()} Python threads: forking it is not safe"
    context = sys.modules.get("tensorflow.python.eager.context")
    if context is not None and getattr(getattr(context, "_context", None), "_context_handle", None) is not None:
        return "the template created TensorFlow's eager context: forking it is not safe"
    return None


def _child(request: dict[str, Any], run_child: Callable[[dict[str, Any]], Optional[int]], template_pid: int) -> None:
    def body() -> Optional[int]:
        _in_child(request["log"], template_pid)
        return run_child(request)

    run_and_exit(body)


def _check(request: dict[str, Any], program: Any) -> None:
    if request["kind"] == "load":
        program.answer(request["request"])
    else:
        _serve(request)


def fork_loop(run_child: Callable[[dict[str, Any]], Optional[int]], started: float) -> int:
    """The template's loop once its imports are done: announce readiness, fork `run_child(request)` per request
    line (its return value is the child's exit status), report exits, return when stdin closes (see the module
    docstring). `started`: the `time.perf_counter()` the imports began at."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd is written on SIGCHLD
    children: set[int] = set()
    me = os.getpid()
    _write({"ready": True, "pid": os.getpid(), "import_seconds": time.perf_counter() - started})
    pending = b""
    stdin = sys.stdin.fileno()
    open_ = True
    while open_:
        try:
            readable, _, _ = select.select([stdin, wake_r], [], [], 5.0)
        except InterruptedError:
            readable = []
        if wake_r in readable:
            os.read(wake_r, 512)
        while children:  # reap every child that exited
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            _write({"exited": pid, "status": exit_code(status)})
        if stdin not in readable:
            continue
        chunk = os.read(stdin, 65536)
        if not chunk:
            open_ = False
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if not line.strip():
                continue
            request = json.loads(line)
            problem = fork_problem()
            if problem is not None:
                _write({"id": request.get("id"), "error": problem})
                continue
            try:
                pid = os.fork()
            except OSError as err:
                _write({"id": request.get("id"), "error": f"fork failed: {err}"})
                continue
            if pid == 0:
                _child(request, run_child, me)
            children.add(pid)
            _write({"id": request.get("id"), "pid": pid})
    for pid in children:  # stdin closed: our parent is done or gone, and so are the children it asked for
        try:
            os.killpg(pid, signal.SIGKILL)  # its group: what it started
        except OSError:
            pass
        try:  # itself: before its setsid() it has no group of its own, and waitpid below would wait forever
            os.kill(pid, signal.SIGKILL)  # not reaped yet, so the pid is still its own
        except OSError:
            pass
    for pid in children:  # reaped now: gone from the process table, not zombies until our own (slow) exit
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return 0


def exit_now(code: int) -> None:
    """End the template without the interpreter's teardown (seconds with TensorFlow imported): nothing is left to do."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def import_all() -> Any:
    """Import what the template needs (the check program, TensorFlow, MLflow's scoring server); the program.

    A process that will fork a template of its own (`WarmTemplate.start_forked`: the warm flow runs' template
    does this once) calls it first, so the fork has nothing left to import.
    """
    program = _load_check_program()
    _imports(program)
    return program


def serve_checks(started: float) -> int:
    """The template's loop: a child per check request (`fork_loop` with the check body), once imports are done."""
    program = import_all()  # nothing to do when a process that called it forked us
    return fork_loop(lambda request: _check(request, program), started)


def main() -> int:
    started = time.perf_counter()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us by closing our stdin
    return serve_checks(started)


if __name__ == "__main__":
    exit_now(main())
