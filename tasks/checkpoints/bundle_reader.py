"""Read a model's variables from a TensorFlow tensor bundle without TensorFlow's reader: the sidecar's restore.

The sidecar evaluator restores every checkpoint a training commits. Through
`Checkpoint.read`, TensorFlow reads the data file through the page cache;
when the trainer wrote it around the page cache (`bundle.write_bundle`'s
durable path), every page read is a new page, which on these machines costs
~200 ms of system CPU for a 101 MB model, more than the evaluation itself.
`VariableRestorer` reads the same bundle as TensorFlow's `BundleReader`
would: the index (leveldb's table, each block's checksum checked), then, for
each of the model's variables, its `BundleEntryProto` (dtype, shape, offset,
size, CRC32C); the bytes come from the data file through one reused aligned
buffer (`storage.direct_io.DirectReader`), every checksum is checked before
any variable is assigned, and each variable is assigned in place.

It restores only what it can vouch for: every variable of the model found
under the key TensorFlow's own save would give it, of the same dtype and
shape, unsliced, numeric, in a little-endian bundle. Anything else (another
layout, a missing or mismatched variable, a corrupt block or tensor, a file
it cannot read) makes `restore` answer False before anything is assigned,
and the caller restores through TensorFlow, which then raises or restores as
it always has.

Example:
    >>> import os, tempfile
    >>> import tensorflow as tf
    >>> prefix = tf.train.Checkpoint(w=tf.Variable([1.0, 2.0])).write(os.path.join(tempfile.mkdtemp(), "ckpt"))
    >>> sorted(read_index(prefix)[1])
    ['_CHECKPOINTABLE_OBJECT_GRAPH', 'w/.ATTRIBUTES/VARIABLE_VALUE']
    >>> target = tf.train.Checkpoint(w=tf.Variable([0.0, 0.0]))
    >>> VariableRestorer(target, [target.w]).restore(prefix), target.w.numpy().tolist()
    (True, [1.0, 2.0])
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from ..storage.direct_io import DirectReader
from .bundle import mask
from .files import table_entries

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


class BundleFormatError(ValueError):
    """The bundle is not one this reader can vouch for (the caller restores through TensorFlow)."""


def read_index(prefix: str) -> tuple[Any, dict[str, Any]]:
    """The header (`BundleHeaderProto`) and the entries (key -> `BundleEntryProto`) of bundle `prefix`, every
    block's checksum checked.

    Raises:
        OSError: `<prefix>.index` cannot be read.
        ValueError: it is not an uncompressed leveldb table with intact blocks and a header.
    """
    from tensorflow.core.protobuf import tensor_bundle_pb2

    with open(f"{prefix}.index", "rb") as handle:
        table = handle.read()
    header, entries = None, {}
    for key, value in table_entries(table, verify_checksums=True):
        if key == b"":
            header = tensor_bundle_pb2.BundleHeaderProto.FromString(value)
        else:
            entries[key.decode()] = tensor_bundle_pb2.BundleEntryProto.FromString(value)
    if header is None:
        raise BundleFormatError(f"{prefix}.index: no bundle header")
    return header, entries


class VariableRestorer:
    """Restores `variables` (each reachable from `checkpoint`, a `tf.train.Checkpoint`) from bundles; see the module.

    `usable` is False when some variable has no key of its own in `checkpoint`'s object graph (then
    `restore` always answers False).
    """

    def __init__(self, checkpoint: Any, variables: Sequence[Any]):
        from tensorflow.python.checkpoint import graph_view

        paths = graph_view.ObjectGraphView(checkpoint).breadth_first_traversal()[1]
        self._targets: list[tuple[tuple[str, ...], Any]] = []  # (the names from the root to it, the variable)
        for variable in variables:
            path = paths.get(variable)
            if not path:
                self._targets = []
                break
            self._targets.append((tuple(reference.name for reference in path), variable))
        self.usable = bool(self._targets)
        self._reader = DirectReader()

    def restore(self, prefix: str) -> bool:
        """Assign every variable its value in bundle `prefix`; False (nothing assigned) when it cannot vouch for it."""
        from tensorflow.python.framework import errors as tf_errors

        if not self.usable:
            return False
        try:
            values = self._read(prefix)
        except (OSError, ValueError, IndexError, struct.error, tf_errors.OpError):
            return False
        for variable, value in values:
            variable.assign(value)
        return True

    def _read(self, prefix: str) -> list[tuple[Any, Any]]:
        import crc32c
        import numpy as np
        import tensorflow as tf
        from tensorflow.core.protobuf import tensor_bundle_pb2

        header, entries = read_index(prefix)
        if header.endianness != tensor_bundle_pb2.BundleHeaderProto.LITTLE or not crc32c.hardware_based:
            raise BundleFormatError(f"{prefix}: big-endian, or no hardware CRC32C here")
        keys = _checkpoint_keys(prefix, [names for names, _ in self._targets])
        chosen = []
        for key, (_, variable) in zip(keys, self._targets):
            entry = entries.get(key)
            dtype = tf.as_dtype(variable.dtype)
            if entry is None or entry.slices or entry.dtype != dtype.as_datatype_enum or not dtype.is_numpy_compatible:
                raise BundleFormatError(f"{prefix}: {key} is missing, sliced or of another dtype")
            shape = tuple(int(d.size) for d in entry.shape.dim)
            if shape != tuple(variable.shape) or entry.size != int(np.prod(shape, dtype=np.int64)) * dtype.size:
                raise BundleFormatError(f"{prefix}: {key} has shape {shape}, the model's is {tuple(variable.shape)}")
            chosen.append((entry, variable, dtype, shape))
        if header.num_shards != 1:
            raise BundleFormatError(f"{prefix}: {header.num_shards} data files (this reader reads one)")
        start = min(entry.offset for entry, *_ in chosen)
        end = max(entry.offset + entry.size for entry, *_ in chosen)
        path = f"{prefix}.data-00000-of-00001"
        span = self._reader.read(path, start, end)  # valid until the next read: assigned before it
        values = []
        for entry, variable, dtype, shape in chosen:
            data = span[entry.offset - start : entry.offset - start + entry.size]
            if mask(crc32c.crc32c(data)) != entry.crc32c:
                raise BundleFormatError(f"{path}: the checksum of {variable.name} does not match")
            values.append((variable, np.frombuffer(data, dtype.as_numpy_dtype).reshape(shape)))
        return values


def _checkpoint_keys(prefix: str, paths: list[tuple[str, ...]]) -> list[str]:
    """The key of each object at `paths` (names from the root) in the checkpoint's own object graph: what
    `Checkpoint.read` matches by (the trainer's graph may name the same variable by a shorter path)."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2
    from tensorflow.python.training import py_checkpoint_reader

    serialized = py_checkpoint_reader.NewCheckpointReader(prefix).get_tensor(OBJECT_GRAPH_KEY)
    nodes = trackable_object_graph_pb2.TrackableObjectGraph.FromString(serialized).nodes
    keys = []
    for names in paths:
        node = nodes[0]
        for name in names:
            child = next((c.node_id for c in node.children if c.local_name == name), None)
            if child is None:
                raise BundleFormatError(f"{prefix}: the checkpoint has no object at {'/'.join(names)}")
            node = nodes[child]
        key = next((a.checkpoint_key for a in node.attributes if a.name == "VARIABLE_VALUE"), None)
        if key is None:
            raise BundleFormatError(f"{prefix}: the object at {'/'.join(names)} has no saved value")
        keys.append(key)
    return keys
