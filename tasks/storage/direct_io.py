"""Write (and read) large files around the page cache (`O_DIRECT`), through aligned buffers the process reuses.

A buffered write of N bytes into a new file makes the kernel find N bytes of
free pages for the page cache. On a virtual machine whose freed memory goes
back to its host (free page reporting, a balloon: the 2-core machines bench/
runs on), every one of those pages is a fault in the host: writing a 101 MB
checkpoint cost ~230 ms of system CPU, taken from the training's cores, while
overwriting pages already cached cost ~15 ms. With `DirectFile(path,
direct=True)` the bytes are copied into a buffer the process allocated once
(and keeps, `KEEP_BUFFERS` of them) and written from it straight to the device
in `BUFFER_BYTES` pieces, by a second thread while the next piece is copied into
a second buffer: about 20-30 ms of CPU for the same checkpoint
(bench/large_model.py). The last piece is padded to the device's alignment
and the file truncated to the bytes written, so the file is byte for byte
what a buffered write makes.

Where the file system refuses `O_DIRECT` (at open, or `EINVAL` at a write; some
network and FUSE file systems), or off Linux, the same calls write through the
page cache, as `direct=False` always does (without the buffer: each `write`
goes straight to `os.write`). `O_DIRECT` gives no durability by itself: the
caller fsyncs as before (then cheap: the data is not in the page cache).

`DirectReader` is the reading side: byte ranges of such files read with
`O_DIRECT` into one aligned buffer the reader keeps (the sidecar evaluator's
restore, `checkpoints.bundle_reader`).

Example:
    >>> import os, tempfile
    >>> from prefect_tensorflow.tasks.storage.direct_io import DirectFile
    >>> path = os.path.join(tempfile.mkdtemp(), "data")
    >>> with DirectFile(path, direct=True) as out:
    ...     out.write(b"x" * 5000)
    ...     out.write(memoryview(b"yz"))
    >>> os.path.getsize(path), open(path, "rb").read()[-3:]
    (5002, b'xyz')
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, Optional

ALIGNMENT = 4096
"""What `O_DIRECT` writes are aligned to (address, offset, length): a multiple of any device's logical block size here."""
BUFFER_BYTES = 4 << 20
KEEP_BUFFERS = 4
"""Buffers kept for the next file (two per file written at a time: a trainer's checkpoint thread, a sweep's)."""

_pool: list[Any] = []
_pool_lock = threading.Lock()


class DirectFile:
    """A new file (created or truncated) written front to back; `direct` asks for `O_DIRECT` (see the module docstring).

    `direct` is True when the file is written around the page cache (False from the start, or after a refusal).

    Raises:
        OSError: the file could not be opened or written (what was written is left for the caller to remove).
    """

    def __init__(self, path: str, *, direct: bool, mode: int = 0o666) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self.path, self.length, self.direct = path, 0, False
        self._buffers: list[Any] = []  # two: one filled while the other is written
        self._buffer: Any = None  # the one being filled
        self._filled = 0
        self._padded = False
        self._io: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[Future] = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, mode)
                self.direct = True
            except OSError as err:
                if err.errno != errno.EINVAL:  # the file system has no O_DIRECT
                    raise
        if not self.direct:
            self.fd = os.open(path, flags, mode)
        else:
            self._buffers = [_take_buffer(), _take_buffer()]
            self._buffer = self._buffers[0]

    def write(self, data: Any) -> None:
        """Append `data` (bytes or any buffer: a numpy array, a memoryview)."""
        import numpy as np

        view = memoryview(data).cast("B")
        self.length += len(view)
        if self._buffer is None:
            _write_all(self.fd, view)
            return
        while view:
            n = min(len(view), BUFFER_BYTES - self._filled)
            np.copyto(self._buffer[self._filled : self._filled + n], np.frombuffer(view[:n], np.uint8))  # releases the GIL
            self._filled += n
            view = view[n:]
            if self._filled == BUFFER_BYTES:
                self._flush()

    def close(self) -> None:
        """Write what is buffered, cut the padding off, close the file (and give the buffer back); once."""
        if self.fd < 0:
            return
        try:
            self._wait()
            if self._buffer is not None and self._filled:
                self._write_piece(self._buffer, self._filled)
            if self._padded:
                os.ftruncate(self.fd, self.length)
        finally:
            self._release()

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, kind: Optional[type[BaseException]], error: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        if kind is None:
            self.close()
        else:
            self._release()

    def _flush(self) -> None:
        """The full buffer goes to a thread that writes it while the other buffer fills (after the one before)."""
        self._wait()
        if self._io is None:
            self._io = ThreadPoolExecutor(1, thread_name_prefix="direct-write")
        self._pending = self._io.submit(self._write_piece, self._buffer, self._filled)
        self._buffer = self._buffers[1] if self._buffer is self._buffers[0] else self._buffers[0]
        self._filled = 0

    def _wait(self) -> None:
        """Wait for the piece being written; its error, if any, is raised here."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write_piece(self, buffer: Any, size: int) -> None:
        padded = -(-size // ALIGNMENT) * ALIGNMENT
        buffer[size:padded] = 0  # only the last piece is short; its padding is truncated at close
        view = memoryview(buffer)
        done = 0
        while done < size:
            if not self.direct:
                done += os.write(self.fd, view[done:size])
                continue
            try:
                written = os.write(self.fd, view[done:padded])
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                self._stop_direct()  # the file system took the open but not the write
                continue
            done += written
            if done % ALIGNMENT:  # a short write left the offset unaligned: the rest goes through the page cache
                self._stop_direct()
        self._padded = self._padded or done > size

    def _stop_direct(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def _release(self) -> None:
        if self._pending is not None:  # a failure elsewhere: the piece under way ends before the file closes
            self._pending.exception()
            self._pending = None
        if self._io is not None:
            self._io.shutdown()
            self._io = None
        for buffer in self._buffers:
            _give_back(buffer)
        self._buffers, self._buffer = [], None
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class DirectReader:
    """Reads byte ranges of files around the page cache (`O_DIRECT`) into one page-aligned buffer it keeps.

    The mirror of `DirectFile` for a reader that reads many large files once each (the sidecar evaluator,
    every checkpoint a training writes): a buffered read of a file not in the page cache (one written
    with `O_DIRECT`, or evicted) makes the kernel find new pages for it, as a buffered write does. The
    buffer grows to the largest range asked for and is reused; a view returned by `read` is valid until
    the next `read`. A file system that refuses `O_DIRECT` is read through the page cache, into the same buffer.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "data")
        >>> with open(path, "wb") as out:
        ...     _ = out.write(bytes(range(256)) * 40)
        >>> bytes(DirectReader().read(path, 5000, 5003))
        b'\\x88\\x89\\x8a'
    """

    def __init__(self) -> None:
        self._buffer: Any = None

    def read(self, path: str, start: int, end: int) -> memoryview:
        """Bytes `[start, end)` of the file at `path`.

        Raises:
            OSError: it could not be read, or it ends before `end` (`EIO`).
        """
        low = start - start % ALIGNMENT
        high = -(-end // ALIGNMENT) * ALIGNMENT
        buffer = self._take(high - low)
        fd = _open_for_reading(path)
        try:
            done = 0
            while low + done < end:
                try:
                    got = os.preadv(fd, [memoryview(buffer)[done : high - low]], low + done)
                except OSError as err:
                    if err.errno != errno.EINVAL or not fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
                        raise
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                    continue  # the file system took the open but not the read: the page cache then
                if got == 0:
                    raise OSError(errno.EIO, f"{path} ends at byte {low + done}, before byte {end}")
                done += got
        finally:
            os.close(fd)
        return memoryview(buffer)[start - low : end - low]

    def _take(self, size: int) -> Any:
        import numpy as np

        if self._buffer is None or len(self._buffer) < size:
            self._buffer = None  # the old one goes before the new one is touched
            raw = np.empty(size + ALIGNMENT, np.uint8)
            offset = -raw.ctypes.data % ALIGNMENT
            self._buffer = raw[offset : offset + size]
        return self._buffer


def _open_for_reading(path: str) -> int:
    flags = os.O_RDONLY | os.O_CLOEXEC
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
    return os.open(path, flags)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def _take_buffer() -> Any:
    """A page-aligned `BUFFER_BYTES` numpy buffer, touched once: a kept one, or a new one."""
    import numpy as np

    with _pool_lock:
        if _pool:
            return _pool.pop()
    raw = np.empty(BUFFER_BYTES + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    buffer = raw[start : start + BUFFER_BYTES]
    buffer.fill(0)
    return buffer


def _give_back(buffer: Any) -> None:
    with _pool_lock:
        if len(_pool) < KEEP_BUFFERS:
            _pool.append(buffer)


def _reset_after_fork() -> None:
    global _pool_lock
    _pool_lock = threading.Lock()  # a fork while another thread held it must not leave the child's locked


os.register_at_fork(after_in_child=_reset_after_fork)
