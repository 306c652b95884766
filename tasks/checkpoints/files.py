"""Read checkpoint files without TensorFlow: the state file and the index.

A TensorFlow checkpoint `<prefix>` is `<prefix>.index` (a LevelDB-format table
of `BundleEntryProto` records: which shard, offset and size each tensor has)
plus `<prefix>.data-NNNNN-of-MMMMM` shards, and, for TF1 `Saver`
checkpoints, `<prefix>.meta`. The `checkpoint` state file is a text proto
naming the newest one. Parsing them here keeps validation cheap (no
TensorFlow import, no tensor reads) and independent of the number of
checkpoints in the directory.

Paths read out of these files are data, not parameters: in a deployment run
(untrusted) the checkpoint a state file names must lie inside its model dir
(`resolve_state_path`), and a checkpoint's files, symlinks resolved, inside
the model dir or the roots (`confine_checkpoint_files`); anything else is
refused with an error naming the file and the path.

Example:
    >>> import os, tempfile
    >>> import tensorflow as tf
    >>> from prefect_tensorflow.tasks.checkpoints.files import check_checkpoint
    >>> prefix = tf.train.Checkpoint(v=tf.Variable([1.0, 2.0])).write(os.path.join(tempfile.mkdtemp(), "model.ckpt-7"))
    >>> files = check_checkpoint(prefix)
    >>> files.step, files.format, files.num_shards
    (7, 'tf2', 1)
"""

from __future__ import annotations

import ast
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import InvalidCheckpointError, UnsafeParameterError
from ..run_context import in_deployment_run

STATE_FILE = "checkpoint"
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48
_STEP = re.compile(r"-(\d+)$")
_STATE_FIELDS = (
    "model_checkpoint_path",
    "all_model_checkpoint_paths",
    "all_model_checkpoint_timestamps",
    "last_preserved_timestamp",
)
_STATE_LINE = re.compile(r"^\s*([A-Za-z_]+)\s*:\s*(.+?)\s*$")


@dataclass(frozen=True)
class CheckpointState:
    """The parsed `checkpoint` state file of a model dir."""

    path: str
    model_checkpoint_path: str
    ctime_ns: int


@dataclass(frozen=True)
class CheckpointFiles:
    """What the index of one valid checkpoint says."""

    prefix: str
    step: Optional[int]
    format: str  # "tf2" (object-based) or "tf1" (name-based Saver)
    num_shards: int
    num_tensors: int
    size_bytes: int
    has_meta_graph: bool
    mtime: float


def step_of(prefix: str) -> Optional[int]:
    """The global step encoded in a checkpoint prefix (`model.ckpt-1200` -> 1200)."""
    match = _STEP.search(os.path.basename(prefix))
    return int(match.group(1)) if match else None


def data_shard_path(prefix: str, shard: int, num_shards: int) -> str:
    """`<prefix>.data-00000-of-00001`, TensorFlow's shard file name."""
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


# --- the `checkpoint` state file -------------------------------------------------


def read_state_file(model_dir: str | os.PathLike, *, untrusted: Optional[bool] = None) -> CheckpointState:
    """Read `model_checkpoint_path` from `<model_dir>/checkpoint`, resolved inside `model_dir`.

    TensorFlow writes that field first, so reading stops there: the cost does
    not grow with the `all_model_checkpoint_paths` lines that follow (10,000 of
    them with `max_to_keep=None`).

    Args:
        model_dir: the model dir.
        untrusted: default: whether this runs in a deployment's flow run; then the path
            must lead inside `model_dir` (see `resolve_state_path`).

    Raises:
        FileNotFoundError: there is no state file.
        ValueError: the state file is not a CheckpointState text proto.
        UnsafeParameterError: untrusted, and the state file names a checkpoint outside `model_dir`.
    """
    path = os.path.join(os.fspath(model_dir), STATE_FILE)
    with open(path, "rb") as handle:
        stat = os.fstat(handle.fileno())
        latest = parse_state_lines(handle, path)
    return CheckpointState(path, resolve_state_path(model_dir, latest, source=path, untrusted=untrusted), stat.st_ctime_ns)


def parse_state_lines(lines: Iterable[bytes], path: str) -> str:
    """`model_checkpoint_path` of a state file's lines, as written (relative or absolute); reading stops there.

    Raises:
        ValueError: the lines are not a CheckpointState text proto (the message names `path`).
    """
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} line {number} is not text") from err
        if not line.strip():
            continue
        match = _STATE_LINE.match(line)
        if not match:
            raise ValueError(f"{path} line {number}: expected 'field: value', got {line[:80]!r}")
        key, value = match.groups()
        if key == "model_checkpoint_path":
            latest = _proto_string(value, path, number)
            if latest:
                return latest
            break
        if key not in _STATE_FIELDS:
            raise ValueError(f"{path} line {number}: unknown field {key!r}")
    raise ValueError(f"{path} names no model_checkpoint_path")


def state_file_text(latest: str, kept: Iterable[str]) -> str:
    """A `checkpoint` state file naming `latest` and the `kept` checkpoints (names relative to the dir)."""
    lines = [f"model_checkpoint_path: {json.dumps(latest)}"]
    lines += [f"all_model_checkpoint_paths: {json.dumps(name)}" for name in kept]
    return "\n".join(lines) + "\n"


def _proto_string(value: str, path: str, number: int) -> str:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        raise ValueError(f"{path} line {number}: expected a quoted string, got {value[:80]!r}")
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"{path} line {number}: bad string {value[:80]!r}") from err


def _resolve(model_dir: str | os.PathLike, ckpt_path: str) -> str:
    # Relative paths are relative to the model dir; an absolute path from a model
    # dir that was moved or copied is looked up by its file name instead.
    model_dir = os.fspath(model_dir)
    if not os.path.isabs(ckpt_path):
        return os.path.join(model_dir, ckpt_path)
    if os.path.exists(ckpt_path + ".index"):
        return ckpt_path
    return os.path.join(model_dir, os.path.basename(ckpt_path))


def is_inside(path: str, directory: str) -> bool:
    """Whether `path`, symlinks resolved, is `directory` (symlinks resolved) or lies under it."""
    real, top = os.path.realpath(path), os.path.realpath(directory)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def resolve_state_path(model_dir: str | os.PathLike, named: str, *, source: str, untrusted: Optional[bool] = None) -> str:
    """A checkpoint path as a state file (`source`) names it, resolved in `model_dir`.

    Trusted callers keep TensorFlow's reading (relative to the model dir; an
    absolute path as is when it exists, else by its file name in the model dir).
    Untrusted (default: in a deployment run) the checkpoint must be inside the
    model dir, symlinks resolved: an absolute path elsewhere is taken by its file
    name in the model dir when that checkpoint is there (a copied model dir), and
    nothing outside is even looked at.

    Raises:
        UnsafeParameterError: untrusted, and the path leads outside `model_dir` (`../`, an
            absolute path, a symlink); the message names `source` and the path.

    Example:
        >>> resolve_state_path("/srv/models/iris", "../../../etc/passwd", source="/srv/models/iris/checkpoint", untrusted=True)
        Traceback (most recent call last):
        ...
        prefect_tensorflow.tasks.errors.UnsafeParameterError: model_dir: /srv/models/iris/checkpoint names ../../../etc/passwd, outside the model dir /srv/models/iris; a deployment run only ships checkpoints inside their model dir, received '/srv/models/iris'
    """
    model_dir = os.path.abspath(os.fspath(model_dir))
    if not (untrusted if untrusted is not None else in_deployment_run()):
        return _resolve(model_dir, named)
    candidate = os.path.normpath(os.path.join(model_dir, named))
    if is_inside(candidate, model_dir):
        return candidate
    if os.path.isabs(named):
        by_name = os.path.join(model_dir, os.path.basename(named))
        if (
            os.path.basename(named) not in ("", ".", "..")
            and os.path.lexists(by_name + ".index")
            and is_inside(by_name + ".index", model_dir)
        ):
            return by_name
    raise UnsafeParameterError(
        "model_dir",
        model_dir,
        f"{source} names {named}, outside the model dir {model_dir}; a deployment run only ships checkpoints inside their model dir",
    )


def checkpoint_file_names(prefix: str) -> list[str]:
    """The files of checkpoint `prefix` that are there: `.index`, `.data-*` shards, `.meta`."""
    directory, name = os.path.split(prefix)
    try:
        entries = os.listdir(directory or ".")
    except OSError:
        return []
    return sorted(
        os.path.join(directory, entry)
        for entry in entries
        if entry in (name + ".index", name + ".meta") or entry.startswith(name + ".data-")
    )


def confine_checkpoint_files(
    prefix: str,
    *,
    model_dir: Optional[str] = None,
    parameter: str = "model_dir",
    untrusted: Optional[bool] = None,
    roots: Optional[list[str]] = None,
) -> None:
    """In a deployment run, check a checkpoint's prefix and files (symlinks resolved) stay where they belong.

    With `model_dir`: inside it (a selection). Without: under the roots (a checkpoint passed on).
    Trusted callers are not checked.

    Raises:
        UnsafeParameterError: naming `parameter`, the file and where it leads.
    """
    if not (untrusted if untrusted is not None else in_deployment_run()):
        return
    from ..security import confine

    where = "the model dir " + model_dir if model_dir is not None else "the allowed roots"
    for path in [prefix, *checkpoint_file_names(prefix)]:
        if model_dir is not None:
            ok = is_inside(path, model_dir)
        else:
            try:
                confine(path, parameter=parameter, untrusted=True, roots=roots)
                ok = True
            except ValueError:
                ok = False
        if not ok:
            shown = path if os.path.realpath(path) == os.path.abspath(path) else f"{path} (-> {os.path.realpath(path)})"
            raise UnsafeParameterError(
                parameter,
                prefix,
                f"checkpoint file {shown} lies outside {where}; a deployment run reads checkpoints only there",
            )


# --- the `.index` table ---------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _block(data: bytes, offset: int, size: int, verify: bool = False) -> bytes:
    if offset + size + 5 > len(data):
        raise ValueError("block extends past the end of the index")
    kind = data[offset + size]
    if kind != 0:
        raise ValueError(f"compressed index blocks (type {kind}) are not supported")
    if verify:  # leveldb's trailer: the masked CRC32C of the contents and the type byte
        import crc32c

        from .bundle import mask

        (stored,) = struct.unpack_from("<I", data, offset + size + 1)
        if mask(crc32c.crc32c(data[offset : offset + size + 1])) != stored:
            raise ValueError("an index block's checksum does not match")
    return data[offset : offset + size]


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    if len(block) < 4:
        raise ValueError("block too short")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * num_restarts
    if end < 0:
        raise ValueError("bad restart array")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + value_len > end:
            raise ValueError("corrupt block entry")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_len]
        pos += value_len


def table_entries(data: bytes, *, verify_checksums: bool = False) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) pairs of an `.index` file's bytes (leveldb's table, uncompressed), in key order; with
    `verify_checksums` each block's CRC32C is checked (the `crc32c` package), as TensorFlow's reader does.

    Raises:
        ValueError: the bytes are not such a table (or a checksum does not match).

    Example:
        >>> from prefect_tensorflow.tasks.checkpoints.bundle import build_table
        >>> list(table_entries(build_table([(b"", b"header"), (b"w", b"entry")]), verify_checksums=True))
        [(b'', b'header'), (b'w', b'entry')]
    """
    if len(data) < _FOOTER_LEN:
        raise ValueError("file too short for a table footer")
    footer = data[-_FOOTER_LEN:]
    (magic,) = struct.unpack_from("<Q", footer, _FOOTER_LEN - 8)
    if magic != _TABLE_MAGIC:
        raise ValueError("bad table magic number (not a TensorFlow checkpoint index)")
    _, pos = _varint(footer, 0)  # metaindex offset
    _, pos = _varint(footer, pos)  # metaindex size
    index_offset, pos = _varint(footer, pos)
    index_size, _ = _varint(footer, pos)
    for _, handle in _block_entries(_block(data, index_offset, index_size, verify_checksums)):
        offset, pos = _varint(handle, 0)
        size, _ = _varint(handle, pos)
        yield from _block_entries(_block(data, offset, size, verify_checksums))


def _proto_fields(buf: bytes) -> dict[int, int]:
    """Scalar fields of a protobuf message (varints and fixed32/64); others skipped."""
    fields: dict[int, int] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            fields[number], pos = _varint(buf, pos)
        elif wire == 1:
            (fields[number],) = struct.unpack_from("<Q", buf, pos)
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            pos += length
        elif wire == 5:
            (fields[number],) = struct.unpack_from("<I", buf, pos)
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
    return fields


def read_index(prefix: str) -> tuple[int, dict[str, tuple[int, int, int]]]:
    """Read `<prefix>.index`: the shard count and each tensor's (shard, offset, size).

    Raises:
        FileNotFoundError: there is no index file.
        ValueError: the index is not a readable TensorFlow tensor-bundle table.
    """
    with open(prefix + ".index", "rb") as handle:
        return parse_index(handle.read())


def parse_index(data: bytes) -> tuple[int, dict[str, tuple[int, int, int]]]:
    """The shard count and each tensor's (shard, offset, size) from an `.index` file's bytes.

    Raises:
        ValueError: the bytes are not a readable TensorFlow tensor-bundle table.
    """
    num_shards: Optional[int] = None
    entries: dict[str, tuple[int, int, int]] = {}
    for key, value in table_entries(data):
        fields = _proto_fields(value)
        if key == b"":
            num_shards = fields.get(1, 0)  # BundleHeaderProto.num_shards
        else:
            # BundleEntryProto: shard_id=3, offset=4, size=5
            entries[key.decode("utf-8", "replace")] = (fields.get(3, 0), fields.get(4, 0), fields.get(5, 0))
    if num_shards is None:
        raise ValueError("index has no bundle header")
    return num_shards, entries


def check_checkpoint(prefix: str | os.PathLike) -> CheckpointFiles:
    """Check that a checkpoint is complete: its index reads and every shard is whole.

    Args:
        prefix: the checkpoint prefix, e.g. `/models/iris/model.ckpt-1000`.

    Returns:
        What the index says about the checkpoint.

    Raises:
        InvalidCheckpointError: the index is missing or unreadable, a data shard
            is missing, or a shard is smaller than the index says.
    """
    prefix = os.fspath(prefix)
    try:
        with open(prefix + ".index", "rb") as handle:
            stat = os.fstat(handle.fileno())
            data = handle.read()
    except FileNotFoundError as err:
        raise InvalidCheckpointError(prefix, "index file is missing") from err
    except OSError as err:
        raise InvalidCheckpointError(prefix, f"index file is unreadable: {err}") from err

    def shard_size(path: str) -> Optional[int]:
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return None

    return files_from_index(
        prefix,
        data,
        index_size=stat.st_size,
        mtime=stat.st_mtime,
        shard_size=shard_size,
        has_meta_graph=os.path.exists(prefix + ".meta"),
    )


def files_from_index(
    prefix: str, data: bytes, *, index_size: int, mtime: float, shard_size: Callable[[str], Optional[int]], has_meta_graph: bool
) -> CheckpointFiles:
    """Validate a checkpoint from its index's bytes and its shards' sizes (local files or objects alike).

    Raises:
        InvalidCheckpointError: the index is unreadable, a shard is missing or shorter than the index says.
    """
    try:
        num_shards, entries = parse_index(data)
    except (ValueError, struct.error) as err:
        raise InvalidCheckpointError(prefix, f"index file is unreadable: {err}") from err
    if num_shards < 1:
        raise InvalidCheckpointError(prefix, "index declares no data shards")
    needed = [0] * num_shards
    for name, (shard, offset, size) in entries.items():
        if shard >= num_shards:
            raise InvalidCheckpointError(prefix, f"tensor {name!r} is in shard {shard} of only {num_shards}")
        needed[shard] = max(needed[shard], offset + size)
    total = index_size
    for shard, expected in enumerate(needed):
        shard_path = data_shard_path(prefix, shard, num_shards)
        actual = shard_size(shard_path)
        if actual is None:
            raise InvalidCheckpointError(prefix, f"data shard {shard_path} is missing")
        if actual < expected:
            raise InvalidCheckpointError(
                prefix,
                f"data shard {shard_path} is truncated: the index expects at least {expected} bytes, the file has {actual}",
            )
        total += actual
    return CheckpointFiles(
        prefix=prefix,
        step=step_of(prefix),
        format="tf2" if OBJECT_GRAPH_KEY in entries else "tf1",
        num_shards=num_shards,
        num_tensors=len(entries),
        size_bytes=total,
        has_meta_graph=has_meta_graph,
        mtime=mtime,
    )


def checkpoint_prefixes(model_dir: str | os.PathLike) -> list[str]:
    """Every `<prefix>` with a `<prefix>.index` in `model_dir`, highest step first.

    Prefixes without a step number sort last. Uncommitted files (data shards
    without an index, TensorFlow's `*_temp` directories) are not listed.
    """
    model_dir = os.fspath(model_dir)
    prefixes = []
    with os.scandir(model_dir) as entries:
        for entry in entries:
            if entry.name.endswith(".index") and entry.is_file():
                prefixes.append(os.path.join(model_dir, entry.name[: -len(".index")]))
    return sorted(prefixes, key=lambda p: (step_of(p) is not None, step_of(p) or 0, p), reverse=True)


def uncommitted_temp_dirs(model_dir: str | os.PathLike) -> list[str]:
    """TensorFlow's `<prefix>-<step>_temp/` directories: saves a crash cut short.

    TensorFlow writes each checkpoint's shards under `<prefix>_temp/` and
    merges them into `<prefix>.index` + `.data-*` before deleting the temp
    directory; one that is still there never became a checkpoint.
    """
    model_dir = os.fspath(model_dir)
    found = []
    with os.scandir(model_dir) as entries:
        for entry in entries:
            if entry.name.endswith("_temp") and _STEP.search(entry.name[: -len("_temp")]) and entry.is_dir():
                found.append(os.path.join(model_dir, entry.name))
    return sorted(found)


def state_file_is_last_change(model_dir: str | os.PathLike, state: CheckpointState) -> bool:
    """Whether writing the state file was the last change to `model_dir`'s entries.

    TensorFlow writes the state file last when it commits a checkpoint, by
    renaming a temporary file, and a rename gives the file's ctime and the
    directory's mtime the same instant. If they still agree, no checkpoint was
    committed or removed since, and the state file can be trusted without
    listing the directory. Anything else (a checkpoint committed after the
    state file by a run that crashed, a state file edited or copied in place,
    a deleted checkpoint) makes the caller list the directory. The answer only
    decides whether to list; "latest" is always the highest committed step.
    """
    return Path(model_dir).stat().st_mtime_ns == state.ctime_ns
