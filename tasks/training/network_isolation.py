"""A private network namespace for the multi-worker supervisor and its workers.

TensorFlow's gRPC server listens on all interfaces (`0.0.0.0:<port>`,
hard-coded, whatever `TF_CONFIG` says). With `isolate_network="auto"` the
supervisor enters a new network namespace holding only loopback (root or
CAP_SYS_ADMIN, else an unprivileged user namespace), so the workers' ports
are unreachable from outside and invisible to the host; when neither is
allowed it says so and goes on (`"require"` refuses instead).

Example:
    >>> from prefect_tensorflow.tasks.training.network_isolation import isolate_network
    >>> isolate_network("off")
    (False, "isolate_network='off'")
"""

from __future__ import annotations

import os
import socket
import sys

from .multi_worker_settings import MultiWorkerError

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000


def isolate_network(mode: str) -> tuple[bool, str]:
    """Move this (single-threaded) process into a new network namespace with loopback up.

    Tries a plain network namespace (root or CAP_SYS_ADMIN), then a user plus
    network namespace (unprivileged, mapping this uid and gid to themselves).
    Returns (isolated, how). Linux only.

    Raises:
        MultiWorkerError: `mode` is "require" and neither is allowed here.
    """
    if mode == "off":
        return False, "isolate_network='off'"
    if not sys.platform.startswith("linux"):
        reason = "network namespaces are Linux only"
    else:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(CLONE_NEWNET) == 0:
            _loopback_up()
            return True, "network namespace"
        first = os.strerror(ctypes.get_errno())
        if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
            try:
                with open("/proc/self/setgroups", "w") as handle:
                    handle.write("deny")
                with open("/proc/self/uid_map", "w") as handle:
                    handle.write(f"{uid} {uid} 1")
                with open("/proc/self/gid_map", "w") as handle:
                    handle.write(f"{gid} {gid} 1")
                _loopback_up()
                return True, "user and network namespace"
            except OSError as err:
                reason = f"user namespace set-up failed: {err}"
        else:
            reason = f"unshare(CLONE_NEWNET): {first}; unshare(CLONE_NEWUSER|CLONE_NEWNET): {os.strerror(ctypes.get_errno())}"
    if mode == "require":
        raise MultiWorkerError(f"isolate_network='require': cannot create a private network namespace ({reason})")
    return False, reason


def _loopback_up() -> None:
    import fcntl
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14s", b"lo", 0, b"\0" * 14)
        flags = struct.unpack("16sH14s", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH14s", b"lo", flags | iff_up, b"\0" * 14))
