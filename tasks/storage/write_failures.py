"""A failed write (disk full, permission denied, a read-only or immutable directory) told in one plain line.

TensorFlow reports a failed file write as an op error whose message carries
the graph's function and op names (`{{function_node __wrapped__SaveV2...}}`,
`[Op:SaveV2]`), the path it wrote through (`/proc/self/fd/N/...` when the
directory was opened once, `confined_dirs.OpenDir`) and its own scratch suffix
(`.tempstate123`). `describe_write_failure` keeps what a user acts on: the
file, with the path they gave, and the system's reason.

Example:
    >>> from prefect_tensorflow.tasks.storage.write_failures import describe_write_failure
    >>> raw = ("{{function_node __wrapped__SaveV2_dtypes_18_device_/job:localhost/replica:0/task:0/device:CPU:0}} "
    ...        "/proc/self/fd/4/model.ckpt-40_temp/part-0.data-00000-of-00001.tempstate88; No space left on device [Op:SaveV2]")
    >>> describe_write_failure(RuntimeError(raw), {"/proc/self/fd/4": "/models/iris"})
    '/models/iris/model.ckpt-40_temp/part-0.data-00000-of-00001: No space left on device'
    >>> describe_write_failure(OSError(28, "No space left on device", "/models/x.pb"))
    '/models/x.pb: No space left on device'
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Optional

_FUNCTION = re.compile(r"\{\{function_node [^}]*\}\}\s*")
_OP = re.compile(r"\s*\[Op:[A-Za-z0-9_]+\].*$", re.DOTALL)
_NODE = re.compile(r"\s*\[\[\{\{node [^}]*\}\}\]\].*$", re.DOTALL)
_SCRATCH = re.compile(r"\.tempstate\d+")
_REASON = re.compile(r";\s*(?=[A-Z][a-z ]+$)")
_REASONS = {
    errno.ENOSPC: "No space left on device",
    errno.EDQUOT: "Disk quota exceeded",
    errno.EACCES: "Permission denied",
    errno.EPERM: "Operation not permitted",
    errno.EROFS: "Read-only file system",
}


def describe_write_failure(err: BaseException, paths: Optional[Mapping[str, str]] = None) -> str:
    """One line for a failed write: `<path>: <reason>`, TensorFlow's op and function names left out.

    Args:
        err: the error (an `OSError`, a TensorFlow op error, or one wrapping them).
        paths: path prefixes to show as others (`/proc/self/fd/4` -> the model dir the user named).
    """
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    else:
        text = getattr(err, "message", None) or str(err)
        text = _NODE.sub("", _OP.sub("", _FUNCTION.sub("", text)))
        text = _REASON.sub(": ", _SCRATCH.sub("", text.strip()), count=1)
    for handle, shown in (paths or {}).items():
        text = text.replace(handle.rstrip("/") + "/", shown.rstrip("/") + "/").replace(handle, shown)
    return " ".join(text.split())


def write_failure_reason(err: BaseException) -> Optional[str]:
    """The system's reason when `err` (or what it wraps) is a failed write TensorFlow or the OS reported, else None."""
    seen: Optional[BaseException] = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _REASONS:
            return _REASONS[seen.errno]
        for reason in _REASONS.values():
            if reason in str(seen):
                return reason
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def reported_write_failure(what: str, paths: Optional[Mapping[str, str]], error: Callable[[str], Exception]) -> Iterator[None]:
    """Turn a failed write in the block (a full disk, permission denied, a read-only file system) into
    `error("<what> failed: <path>: <reason>; nothing was published")`; other errors pass unchanged.

    Example:
        >>> import errno
        >>> with reported_write_failure("writing frozen graph /out/g.pb", None, RuntimeError):
        ...     raise OSError(errno.ENOSPC, "No space left on device", "/out/.g.pb.ptf-tmp-1")
        Traceback (most recent call last):
        ...
        RuntimeError: writing frozen graph /out/g.pb failed: /out/.g.pb.ptf-tmp-1: No space left on device; nothing was published
    """
    try:
        yield
    except Exception as err:
        if write_failure_reason(err) is None:
            raise
        raise error(f"{what} failed: {describe_write_failure(err, paths)}; nothing was published") from err
