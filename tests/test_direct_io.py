"""Writes around the page cache (tasks/storage/direct_io.py): the file is byte for byte what was written.

`O_DIRECT` writes whole aligned pieces from a reused buffer; the last piece is
padded and the file truncated. Checked for real on the test's file system (which
takes `O_DIRECT`): sizes around the alignment and the buffer, a buffer reused by
the next file, a failed write giving the buffer back. A file system that refuses
`O_DIRECT` cannot be mounted here (tmpfs and ext4 both take it), so that refusal,
at the open and at the first write, is the one fault simulated (`os.open` /
`os.write` raising EINVAL as such a file system does).
"""

from __future__ import annotations

import errno
import os

import pytest

from prefect_tensorflow.tasks.storage import direct_io
from prefect_tensorflow.tasks.storage.direct_io import ALIGNMENT, BUFFER_BYTES, DirectFile


def _pattern(size: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(min(size, 1 << 16))) * (size // (1 << 16) + 1)


@pytest.mark.parametrize(
    "sizes", [[0], [1], [ALIGNMENT - 1, 1], [ALIGNMENT], [BUFFER_BYTES], [BUFFER_BYTES - 3, 5, 7], [BUFFER_BYTES * 2 + 4097]]
)
def test_direct_file_has_exactly_the_bytes_written(tmp_path, sizes):
    path = str(tmp_path / "data")
    pieces = [_pattern(size, seed)[:size] for seed, size in enumerate(sizes)]
    with DirectFile(path, direct=True) as out:
        assert out.direct, "the test's file system takes O_DIRECT: the direct path must be the one checked"
        for piece in pieces:
            out.write(piece)
    with open(path, "rb") as handle:
        assert handle.read() == b"".join(pieces)
    assert out.fd == -1
    out.close()  # a second close does nothing
    assert os.path.getsize(path) == sum(sizes)


def test_the_buffer_is_reused_by_the_next_file_and_given_back_after_a_failure(tmp_path):
    with DirectFile(str(tmp_path / "a"), direct=True) as out:
        out.write(b"a" * (BUFFER_BYTES + 10))  # both buffers used
        buffers = {id(buffer) for buffer in out._buffers}
    with DirectFile(str(tmp_path / "b"), direct=True) as out:
        assert {id(buffer) for buffer in out._buffers} == buffers  # no new memory per file: the point of the buffers
        out.write(b"b" * 10)
    with pytest.raises(RuntimeError):
        with DirectFile(str(tmp_path / "c"), direct=True) as out:
            out.write(b"c" * (BUFFER_BYTES + 1))  # one piece under way in the writing thread
            raise RuntimeError("the caller failed mid-file")
    assert out.fd == -1 and out._io is None
    assert buffers <= {id(buffer) for buffer in direct_io._pool}


def test_a_failed_piece_is_raised_by_the_next_write_or_the_close(tmp_path, monkeypatch):
    real_write = os.write

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        with DirectFile(str(tmp_path / "data"), direct=True) as out:
            monkeypatch.setattr(os, "write", full_disk)
            out.write(b"x" * BUFFER_BYTES)  # the full piece goes to the writing thread, which fails
            out.write(b"y")  # still only buffered
    monkeypatch.setattr(os, "write", real_write)
    assert out.fd == -1


def test_direct_false_writes_through_the_page_cache_without_the_buffer(tmp_path):
    path = str(tmp_path / "index")
    with DirectFile(path, direct=False) as out:
        out.write(b"table")
        assert not out.direct and out._buffer is None
    assert open(path, "rb").read() == b"table"


def test_a_file_system_refusing_o_direct_at_the_open_gets_a_page_cache_write(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    path = str(tmp_path / "data")
    data = _pattern(BUFFER_BYTES + 123, 1)[: BUFFER_BYTES + 123]
    with DirectFile(path, direct=True) as out:
        out.write(data)
    assert not out.direct
    assert open(path, "rb").read() == data


def test_a_file_system_refusing_the_first_direct_write_gets_the_rest_through_the_page_cache(tmp_path, monkeypatch):
    real_write = os.write
    refused = []

    def refusing_first_write(fd, data):
        if not refused:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    path = str(tmp_path / "data")
    data = _pattern(2 * BUFFER_BYTES + 5, 2)[: 2 * BUFFER_BYTES + 5]
    with DirectFile(path, direct=True) as out:
        assert out.direct
        monkeypatch.setattr(os, "write", refusing_first_write)
        out.write(data)
    monkeypatch.undo()
    assert refused == [BUFFER_BYTES] and not out.direct
    assert open(path, "rb").read() == data
