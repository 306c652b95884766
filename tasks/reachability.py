"""Is a server there? A short TCP connect before a flow writes anything that depends on it.

A flow that needs a server it cannot reach should fail at once, in one line
naming the server and the setting that chose it, not after a library's own
connect timeout and retries, and not after it has started an MLflow run or
written into a model dir. `check_reachable` opens (and closes) one TCP
connection with a bounded timeout; it proves something listens, not that it
is the right kind of server.

Example:
    >>> from prefect_tensorflow.tasks.reachability import check_reachable, host_and_port
    >>> host_and_port("tcp://10.0.0.5:8786")
    ('10.0.0.5', 8786)
    >>> host_and_port("tls://[::1]:8786")
    ('::1', 8786)
    >>> check_reachable("tcp://127.0.0.1:1", what="the Dask scheduler", setting="dask_address", timeout=2.0)
    Traceback (most recent call last):
    ...
    prefect_tensorflow.tasks.errors.ServerUnreachableError: dask_address: tcp://127.0.0.1:1: the Dask scheduler does not answer (connection refused, 2 s timeout); expected it listening there
"""

from __future__ import annotations

import errno
import socket
from typing import Optional
from urllib.parse import urlsplit

from .errors import ServerUnreachableError


def host_and_port(address: str) -> Optional[tuple[str, int]]:
    """The host and port of `scheme://host:port[/...]`; None when the address has no port (e.g. `inproc://`)."""
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or port is None:
        return None
    return parts.hostname, port


def check_reachable(address: str, *, what: str, setting: str, timeout: float) -> None:
    """Connect to `address` over TCP within `timeout` seconds, then hang up; an address without a port passes.

    Args:
        address: `scheme://host:port` (tcp://, tls://, ws://, http://, ...).
        what: the server, as the message names it ("the Dask scheduler").
        setting: the parameter or variable that named the address.
        timeout: seconds to wait for the connection.

    Raises:
        ServerUnreachableError: nothing accepts a connection there in time (refused, timed out, unknown host).
    """
    target = host_and_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            return
    except TimeoutError:
        reason = "no answer"
    except socket.gaierror as err:
        reason = f"unknown host: {err.strerror}"
    except OSError as err:
        reason = "connection refused" if err.errno == errno.ECONNREFUSED else (err.strerror or str(err))
    raise ServerUnreachableError(setting, address, f"{what} does not answer ({reason}, {timeout:g} s timeout)")
