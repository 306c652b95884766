"""Server processes on this machine: a free port, start one, wait until it answers.

Used by `serve` (a local Prefect server when none is configured), by the team
stack (`python -m devtools.team_stack`) and by the tests' fixtures. Starting,
stopping and the log's tail are the process kit's (`tasks/child_processes.py`):
a server is a child process like any other, plus a health check.

Example:
    >>> from prefect_tensorflow.flows.servers import free_port
    >>> 1024 < free_port() < 65536
    True
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Optional

from prefect_tensorflow.tasks.child_processes import free_ports, log_tail, start_process, stop_process_group

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now."""
    return free_ports(1, host)[0]


def port_is_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on `host:port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether `GET url` answers 200 (directly, never through a proxy)."""
    try:
        with _DIRECT.open(url, timeout=timeout) as answer:
            return answer.status == 200
    except (OSError, urllib.error.URLError):
        return False


def wait_until_healthy(url: str, process: subprocess.Popen, log_path: str, timeout: float = 180) -> None:
    """Poll `url` until it answers 200.

    Raises:
        RuntimeError: `process` exited or `timeout` passed first; the message ends with the log's tail.
    """
    deadline = time.monotonic() + timeout
    while not answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {process.returncode}" if process.poll() is not None else f"no answer in {timeout:.0f} s"
            raise RuntimeError(f"{url}: {state} (see {log_path}):\n{log_tail(log_path)}")
        time.sleep(0.25)


def start_server(
    command: Sequence[str],
    log_path: str,
    *,
    health_url: str,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
    timeout: float = 180,
) -> subprocess.Popen:
    """Start `command` (`child_processes.start_process`, output to `log_path`) and wait until `health_url` answers.

    Raises:
        RuntimeError: it exited or did not answer within `timeout` s (it is stopped; the log's tail in the message).
    """
    process = start_process(command, log_path, env=env, cwd=cwd)
    try:
        wait_until_healthy(health_url, process, log_path, timeout)
    except BaseException:
        stop_process_group(process)
        raise
    return process


def start_prefect_server(
    host: str, port: int, log_path: str, env: Optional[Mapping[str, str]] = None, timeout: float = 180
) -> subprocess.Popen:
    """`prefect server start` on `host:port`; waits until `/api/health` answers. The server logs the cause of
    the 503s it answers (`PREFECT_API_LOG_RETRYABLE_ERRORS`, unless `env` sets it)."""
    environment = dict(os.environ if env is None else env)
    environment.setdefault("PREFECT_API_LOG_RETRYABLE_ERRORS", "true")
    return start_server(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
        log_path,
        env=environment,
        health_url=f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/api/health",
        timeout=timeout,
    )
