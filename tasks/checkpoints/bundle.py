"""Write a TensorFlow tensor bundle (`<prefix>.index` + `<prefix>.data-00000-of-00001`) from host tensors.

TensorFlow's `SaveV2` (its `BundleWriter`) copies every tensor through a 1 MiB
buffer and checksums the copy with a software CRC32C (TensorFlow's wheels are
built without the CPU's CRC instruction): on a 268 MB checkpoint that is most
of the time the write takes beyond the kernel's own copy into the page cache.
`write_bundle` writes the same files: each tensor's bytes straight from its
buffer (one `os.write`, no copy; or, for a durable write of `DIRECT_MIN_BYTES`
of tensors or more, copied into reused aligned buffers and written around the
page cache, whose new pages cost more than the copy: `storage.direct_io`), its
CRC32C by the `crc32c` package (the CPU's instruction; TensorFlow's reader
checks the same sum) in a second thread while the bytes are written (both
release the GIL), and then the index: the table TensorFlow's `BundleWriter`
builds (its header, each tensor's `BundleEntryProto`, in leveldb's table format), byte for byte
the file `SaveV2` writes for the same tensors (tests/test_checkpoint_throughput.py
compares them). Readers are TensorFlow's: `tf.train.load_checkpoint`,
`Checkpoint.restore`, `MergeV2Checkpoints` all read it, and check the sums.

Tensors of numeric dtypes, strings and variants (a dataset iterator's
state, encoded as `SaveV2` encodes it) are written; `can_write` says whether
a set of tensors can be (else the caller uses `SaveV2`).

Example:
    >>> import os, tempfile
    >>> import tensorflow as tf
    >>> prefix = os.path.join(tempfile.mkdtemp(), "bundle")
    >>> tensors = {"w": tf.constant([1.5, 2.5]), "step": tf.constant(7, tf.int64)}
    >>> can_write(tensors.values())
    True
    >>> write_bundle(prefix, tensors)
    >>> reader = tf.train.load_checkpoint(prefix)
    >>> reader.get_tensor("w").tolist(), int(reader.get_tensor("step"))
    ([1.5, 2.5], 7)
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from ..storage.direct_io import DirectFile

BLOCK_SIZE = 262144  # leveldb's (and TensorFlow's table::Options) default block size
RESTART_INTERVAL = 16
OVERLAP_BYTES = 1 << 20  # a tensor at least this big is checksummed in a second thread while it is written
DIRECT_MIN_BYTES = 8 << 20
"""Numeric bytes from which the data file is written with `O_DIRECT` (smaller: a page-cache write costs little)."""
TABLE_MAGIC = 0xDB4775248B80FB57
_MASK_DELTA = 0xA282EAD8


def can_write(tensors: Iterable[Any]) -> bool:
    """Whether `write_bundle` can write these (eager, host-readable) tensors: a little-endian host with the
    `crc32c` package's hardware checksum, every dtype numeric, a string or a variant."""
    if sys.byteorder != "little" or not _hardware_crc():
        return False
    import tensorflow as tf

    for tensor in tensors:
        dtype = tensor.dtype
        if dtype in (tf.string, tf.variant):
            continue
        if dtype == tf.resource or dtype.is_quantized or not dtype.is_numpy_compatible:
            return False
    return True


def write_bundle(prefix: str, tensors: Mapping[str, Any], *, direct_min_bytes: Optional[int] = DIRECT_MIN_BYTES) -> None:
    """Write `tensors` (name -> eager tensor, in this order in the data file) as the bundle `prefix`.

    The data file comes first, then the index (which names it). The directory of `prefix` must exist.
    A data file of at least `direct_min_bytes` of numeric tensors is written around the page cache
    (`storage.direct_io`; None: never).

    Raises:
        OSError: a file could not be written (what was written is left for the caller to remove).
    """
    import crc32c
    from tensorflow.core.protobuf import tensor_bundle_pb2

    entries: dict[str, bytes] = {}
    offset = 0
    direct = direct_min_bytes is not None and _numeric_bytes(tensors.values()) >= direct_min_bytes
    checksums = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-crc32c")
    try:
        with DirectFile(f"{prefix}.data-00000-of-00001", direct=direct) as data:
            for name, tensor in tensors.items():
                crc, size = 0, 0
                for chunk, checksum in _encoded(tensor):
                    if checksum is None and len(chunk) >= OVERLAP_BYTES:  # summed beside the write: both release the GIL
                        pending = checksums.submit(crc32c.crc32c, chunk, crc)
                        data.write(chunk)
                        crc = pending.result()
                    else:
                        data.write(chunk)
                        crc = checksum if checksum is not None else crc32c.crc32c(chunk, crc)
                    size += len(chunk)
                entry = tensor_bundle_pb2.BundleEntryProto(
                    dtype=tensor.dtype.as_datatype_enum, shard_id=0, offset=offset, size=size, crc32c=mask(crc)
                )
                entry.shape.SetInParent()  # present even for a scalar, as TensorFlow writes it
                for dim in tensor.shape:
                    entry.shape.dim.add(size=dim)
                entries[name] = entry.SerializeToString()
                offset += size
    finally:
        checksums.shutdown()
    header = tensor_bundle_pb2.BundleHeaderProto(num_shards=1, endianness=tensor_bundle_pb2.BundleHeaderProto.LITTLE)
    header.version.producer = 1  # kTensorBundleVersion
    table = build_table([(b"", header.SerializeToString()), *sorted((k.encode(), v) for k, v in entries.items())])
    with DirectFile(f"{prefix}.index", direct=False) as index:
        index.write(table)


def mask(crc: int) -> int:
    """leveldb's masked CRC32C (what TensorFlow stores).

    >>> hex(mask(0))
    '0xa282ead8'
    """
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def _hardware_crc() -> bool:
    try:
        import crc32c
    except ImportError:
        return False
    return bool(crc32c.hardware_based)


def _numeric_bytes(tensors: Iterable[Any]) -> int:
    """The bytes of the numeric tensors among `tensors` (strings and variants, small here, are not counted)."""
    import tensorflow as tf

    return sum(t.shape.num_elements() * t.dtype.size for t in tensors if t.dtype not in (tf.string, tf.variant))


def _encoded(tensor: Any) -> list[tuple[Any, Any]]:
    """The tensor's bytes on disk as (chunk, crc so far or None: extend it over the chunk), as `BundleWriter`."""
    import crc32c
    import numpy as np
    import tensorflow as tf

    if tensor.dtype == tf.string:  # [varint64 lengths][masked crc of the lengths][the bytes]
        items = [bytes(x) for x in np.asarray(tensor.numpy(), dtype=object).reshape(-1)]
        lengths = b"".join(_varint(len(x)) for x in items)
        crc = 0
        for x in items:
            crc = crc32c.crc32c(struct.pack("<I", len(x)) if len(x) <= 0xFFFFFFFF else struct.pack("<Q", len(x)), crc)
        checksum = struct.pack("<I", mask(crc))
        return [(lengths + checksum, crc32c.crc32c(checksum, crc))] + [(x, None) for x in items]
    if tensor.dtype == tf.variant:  # per element: [varint64 length][VariantTensorDataProto][masked crc so far]
        from tensorflow.core.framework import tensor_pb2

        proto = tensor_pb2.TensorProto.FromString(tf.io.serialize_tensor(tensor).numpy())
        out: list[tuple[Any, Any]] = []
        crc = 0
        for data in _variant_elements(proto, int(np.prod(tensor.shape, dtype=np.int64))):
            crc = crc32c.crc32c(data, crc32c.crc32c(struct.pack("<Q", len(data)), crc))
            checksum = struct.pack("<I", mask(crc))
            crc = crc32c.crc32c(checksum, crc)
            out.append((_varint(len(data)) + data + checksum, crc))
        return out
    # numeric: the tensor's own buffer (np.asarray shares it; .numpy() would copy)
    return [(np.asarray(tensor).reshape(-1).view(np.uint8), None)]


def _variant_elements(proto: Any, count: int) -> list[bytes]:
    """Each element's serialized `VariantTensorDataProto` from a variant tensor's `TensorProto`: `variant_val`,
    or `tensor_content` (TensorFlow's `EncodeVariantList`: every length as a varint32, then the bytes)."""
    if proto.variant_val or not proto.tensor_content:
        elements = [element.SerializeToString() for element in proto.variant_val]
    else:
        content, position, lengths = proto.tensor_content, 0, []
        for _ in range(count):
            length, shift = 0, 0
            while True:
                byte = content[position]
                position += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if byte < 0x80:
                    break
            lengths.append(length)
        elements = []
        for length in lengths:
            elements.append(content[position : position + length])
            position += length
        if position != len(content):
            raise ValueError(f"variant tensor content: {len(content)} bytes, its {count} lengths add up to {position}")
    if len(elements) != count:
        raise ValueError(f"variant tensor: {len(elements)} encoded elements, its shape has {count}")
    return elements


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class _Block:
    """leveldb's BlockBuilder: prefix-compressed entries, a restart point every `interval` entries."""

    def __init__(self, interval: int):
        self.interval, self.buffer, self.restarts, self.counter, self.last = interval, bytearray(), [0], 0, b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.interval:
            limit = min(len(self.last), len(key))
            while shared < limit and self.last[shared] == key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buffer))
            self.counter = 0
        self.buffer += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        self.last, self.counter = key, self.counter + 1

    def size_estimate(self) -> int:
        return len(self.buffer) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        return bytes(self.buffer) + struct.pack(f"<{len(self.restarts) + 1}I", *self.restarts, len(self.restarts))


def build_table(entries: list[tuple[bytes, bytes]]) -> bytes:
    """leveldb's table (TensorFlow's `table::TableBuilder`, no compression) of sorted (key, value) pairs.

    >>> table = build_table([(b"", b"")])  # a data block, an empty meta-index block, the index block, the footer
    >>> len(table), table[-8:].hex()  # the footer ends with leveldb's magic number
    (95, '57fb808b247547db')
    """
    import crc32c

    out = bytearray()

    def write_block(block: _Block) -> bytes:
        contents = block.finish()
        handle = _varint(len(out)) + _varint(len(contents))
        crc = crc32c.crc32c(b"\x00", crc32c.crc32c(contents))  # the trailer's type byte: no compression
        out.extend(contents + b"\x00" + struct.pack("<I", mask(crc)))
        return handle

    data, index = _Block(RESTART_INTERVAL), _Block(1)
    pending: bytes = b""
    last = b""
    for key, value in entries:
        if pending:
            index.add(_separator(last, key), pending)
            pending = b""
        data.add(key, value)
        last = key
        if data.size_estimate() >= BLOCK_SIZE:
            pending, data = write_block(data), _Block(RESTART_INTERVAL)
    if data.buffer:
        pending = write_block(data)
    meta_index = write_block(_Block(RESTART_INTERVAL))
    if pending:
        index.add(_successor(last), pending)
    footer = (meta_index + write_block(index)).ljust(40, b"\x00")
    out.extend(footer + struct.pack("<II", TABLE_MAGIC & 0xFFFFFFFF, TABLE_MAGIC >> 32))
    return bytes(out)


def _separator(start: bytes, limit: bytes) -> bytes:
    """leveldb's bytewise FindShortestSeparator: a short key in [start, limit)."""
    n = 0
    while n < min(len(start), len(limit)) and start[n] == limit[n]:
        n += 1
    if n < min(len(start), len(limit)) and start[n] < 0xFF and start[n] + 1 < limit[n]:
        return start[:n] + bytes([start[n] + 1])
    return start


def _successor(key: bytes) -> bytes:
    """leveldb's bytewise FindShortSuccessor: a short key >= `key`."""
    for n, byte in enumerate(key):
        if byte != 0xFF:
            return key[:n] + bytes([byte + 1])
    return key
