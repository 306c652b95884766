"""Server processes on this machine: a free port, start, wait until healthy, stop the whole group.

Used by `serve` (a local Prefect server when none is configured), by the
team stack (`python -m prefect_tensorflow.flows.team_stack`) and by the tests'
fixtures, so that there is one way to run a server process and clean up after it.

Example:
    >>> from prefect_tensorflow.flows.servers import free_port
    >>> 1024 < free_port() < 65536
    True
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Optional

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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


def log_tail(path: str, size: int = 3000) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()[-size:]
    except OSError:
        return ""


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


def start_process(
    command: Sequence[str],
    log_path: str,
    *,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
    health_url: Optional[str] = None,
    timeout: float = 180,
) -> subprocess.Popen:
    """Start `command` in its own process group, output appended to `log_path`; wait for `health_url` if given."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    if health_url is not None:
        try:
            wait_until_healthy(health_url, process, log_path, timeout)
        except BaseException:
            stop_process_group(process)
            raise
    return process


def start_prefect_server(
    host: str, port: int, log_path: str, env: Optional[Mapping[str, str]] = None, timeout: float = 180
) -> subprocess.Popen:
    """`prefect server start` on `host:port`; waits until `/api/health` answers."""
    return start_process(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
        log_path,
        env=env,
        health_url=f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/api/health",
        timeout=timeout,
    )


def stop_process_group(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Signal the process group of `process` (started with its own session), SIGKILL if it lingers."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    try:  # children may outlive the leader: the whole group, for sure
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if process.poll() is None:
        process.wait()
