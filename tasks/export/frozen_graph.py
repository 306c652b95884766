"""`freeze_graph`: a checkpoint (or SavedModel) frozen into a constant graph `.pb`, verified.

What TensorFlow's old `freeze_graph.py` made from a `.meta` graph and a
checkpoint, for three sources:

- a TF2 object-based checkpoint + the model builder: restore, trace the
  serving function, `convert_variables_to_constants_v2`;
- a TF1 `Saver` checkpoint with its `.meta` graph (an Estimator-era model
  dir): `import_meta_graph` + `saver.restore`, then
  `convert_variables_to_constants`; no model code needed;
- a SavedModel directory: its serving signature.

The graph is written to a scratch file, loaded back with
`tf.compat.v1.import_graph_def`, run on a verification batch and compared
with the source; only then is it published, through the output's storage
backend (`stores.object_store`: renamed into place on local disk, one object
on an object store). A mismatch above the tolerance fails the task and leaves
no `.pb` behind. A local output directory is opened once, before the model is
rebuilt, and the graph is staged into and published through that handle
(`confined_dirs`): a directory swapped for a symlink meanwhile receives
nothing.

A frozen graph is never replaced by other bytes (`publish_graph`): a
registered version's recorded digest keeps matching its file. Freezing the
same checkpoint again to the same output is idempotent; when the output's
name already holds another graph, the new one is written beside it under its
content-addressed name (`model.ckpt-50.<sha256 prefix>.pb`), and the result's
`path` says so.

Example:
    >>> from prefect import flow
    >>> from prefect_tensorflow.tasks.export.frozen_graph import freeze_graph
    >>> @flow
    ... def freeze(checkpoint: str) -> str:
    ...     return freeze_graph(checkpoint, "/models/iris/frozen.pb").path
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from ..checkpoints.files import check_checkpoint, confine_checkpoint_files
from ..checkpoints.meta_graph import load_meta_graph
from ..checkpoints.model_dir import ModelDir
from ..checkpoints.selection import validate_checkpoint
from ..configs import ExportConfig
from ..errors import FreezeError, GraphTooLargeError, ParityError, StorageError
from ..run_context import get_logger, in_deployment_run
from ..security import confine
from ..storage.backend import StorageBackend
from ..storage.confined_dirs import OpenDir, open_directory
from ..storage.local import remove_abandoned_temporaries
from ..storage.locations import Location, parse_location, scratch_dir
from ..storage.stores import object_store
from ..storage.write_failures import reported_write_failure
from .signature import trace_checkpoint
from .verification import Parity, compare_outputs, read_graph_def, run_frozen_graph, verification_batch

PROTOBUF_LIMIT = 2**31 - 1


class FreezeResult(BaseModel):
    """A verified frozen graph."""

    model_config = ConfigDict(frozen=True)

    path: str
    source: str = Field(description="Checkpoint prefix or SavedModel directory it came from")
    source_format: str = Field(description="tf2, tf1 or saved_model")
    inputs: list[str] = Field(description="Input tensor names, e.g. features:0")
    outputs: dict[str, str] = Field(description="Output name -> tensor name")
    digest: str = Field(description="sha256 of the .pb file")
    size_bytes: int
    parity: Parity
    pbtxt_path: Optional[str] = None


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_saved_model_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb"))


def _check_size(graph_def, source: str) -> bytes:
    size = graph_def.ByteSize()
    if size > PROTOBUF_LIMIT:
        raise GraphTooLargeError(
            f"{source}: the frozen graph would be {size / 2**30:.2f} GiB, past protobuf's 2 GiB "
            "limit for a GraphDef; export a SavedModel instead (export_saved_model / "
            "`prefect-tensorflow export`), which keeps variables out of the graph"
        )
    return graph_def.SerializeToString(deterministic=True)  # map fields in a fixed order: one graph, one digest


def _model_variable_bytes(checkpoint: str) -> int:
    """Bytes of the model's variables in a TF2 checkpoint, read from its index (no tensor is read).

    A variable is saved once, under the first path that reaches it: `model/...`, or (Keras 3, the
    optimizer tracked first) `optimizer/_trainable_variables/...`; optimizer slots are left out.
    """
    import tensorflow as tf

    reader = tf.train.load_checkpoint(checkpoint)
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    total = 0
    for key, shape in shapes.items():
        model_variable = key.startswith(("model/", "optimizer/_trainable_variables/"))
        if model_variable and key.endswith("/.ATTRIBUTES/VARIABLE_VALUE") and ".OPTIMIZER_SLOT" not in key:
            total += math.prod(shape) * dtypes[key].size
    return total


def _check_variable_bytes(checkpoint: str, var_bytes: int) -> None:
    if var_bytes > PROTOBUF_LIMIT:
        raise GraphTooLargeError(
            f"{checkpoint}: the model's variables take {var_bytes / 2**30:.2f} GiB; a frozen graph "
            "holds them as constants and would pass protobuf's 2 GiB limit for a GraphDef; export "
            "a SavedModel instead (export_saved_model / `prefect-tensorflow export`)"
        )


# --- the three sources -------------------------------------------------------------


def _freeze_tf2(checkpoint: str, model: str, config: ExportConfig):
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    # Checked on the checkpoint's own metadata first: running a model that large on the
    # verification batch can take more memory than the machine has.
    _check_variable_bytes(checkpoint, _model_variable_bytes(checkpoint))
    traced = trace_checkpoint(checkpoint, model, config.hparams, config.head, config.data_source(model))
    _check_variable_bytes(checkpoint, sum(int(tf.size(v).numpy()) * tf.as_dtype(v.dtype).size for v in traced.net.variables))
    concrete = traced.serve.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete)
    inputs = [t.name for t in frozen.inputs]
    outputs = {name: f"{name}:0" for name in concrete.structured_outputs}
    return frozen.graph.as_graph_def(), inputs, outputs, traced.batch, traced.expected


def _freeze_tf1(checkpoint: str, output_nodes: Optional[list[str]], input_nodes: Optional[list[str]], data):
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_from_session_graph,
    )

    tf1 = load_meta_graph(checkpoint, output_nodes=output_nodes, input_nodes=input_nodes, error=FreezeError)
    graph, saver, inputs, outputs = tf1.graph, tf1.saver, tf1.inputs, tf1.outputs
    full_def = graph.as_graph_def()
    node_names = sorted({t.split(":")[0] for t in outputs.values()})
    with tf.compat.v1.Session(graph=graph) as sess:
        saver.restore(sess, checkpoint)
        frozen = convert_variables_to_constants_from_session_graph(sess, full_def, node_names)
        specs = [graph.get_tensor_by_name(name) for name in inputs]
        batch = verification_batch([tf.TensorSpec(t.shape, t.dtype) for t in specs], data)
        names = sorted(outputs)
        values = sess.run([graph.get_tensor_by_name(outputs[n]) for n in names], dict(zip(specs, batch)))
    return frozen, inputs, outputs, batch, dict(zip(names, values))


def _freeze_saved_model(path: str, data: Optional[str], signature: str = "serving_default"):
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    loaded = tf.saved_model.load(path)
    if signature not in loaded.signatures:
        raise FreezeError(f"SavedModel {path} has no {signature!r} signature; it has {sorted(loaded.signatures)}")
    fn = loaded.signatures[signature]
    frozen = convert_variables_to_constants_v2(fn)
    graph_def = frozen.graph.as_graph_def()
    _, kwargs = fn.structured_input_signature
    names = sorted(kwargs)
    batch = verification_batch([kwargs[n] for n in names], data)
    expected = {k: v.numpy() for k, v in fn(**{n: tf.constant(b) for n, b in zip(names, batch)}).items()}
    inputs = [t.name for t in frozen.inputs]
    out_names = sorted(fn.structured_outputs)
    outputs = {k: t.name for k, t in zip(out_names, frozen.outputs)}
    return graph_def, inputs, outputs, batch, expected


# --- freezing -----------------------------------------------------------------------


def freeze_graph(checkpoint: str, output: str, config: Optional[ExportConfig] = None, as_text: bool = False) -> FreezeResult:
    """Freeze a checkpoint or SavedModel into a verified constant-graph `.pb`, written atomically.

    Args:
        checkpoint: a TF2 or TF1 checkpoint prefix, or a SavedModel directory.
        output: the `.pb` path to write (its directory must exist).
        config: the model builder and head of a TF2 checkpoint (default: the bundled iris),
            the output and input nodes of a TF1 one, the verification data and tolerance.
        as_text: also write a `.pbtxt` beside the `.pb`.

    Returns:
        Paths, tensor names, digest and parity figures.

    Raises:
        InvalidCheckpointError: the checkpoint is incomplete or corrupt.
        CheckpointMismatchError: the checkpoint was not written by the model builder.
        FreezeError: missing `.meta`, unknown output node, too large, unwritable output.
        ParityError: the frozen graph does not compute what the source computes (nothing is written).

    Example:
        >>> from prefect import flow
        >>> from prefect_tensorflow.tasks import freeze_graph
        >>> @flow
        ... def freeze_latest(checkpoint: str) -> str:
        ...     return freeze_graph(checkpoint, "/tmp/iris.pb").digest
    """
    config = config or ExportConfig()
    source = os.fspath(checkpoint)
    target = parse_location(output, parameter="output")
    directory = _open_output_dir(target.uri) if target.is_local else None
    try:
        return _freeze(source, target, directory, config, as_text)
    finally:
        if directory is not None:
            directory.close()


def _open_output_dir(output: str) -> OpenDir:
    """The output's directory, opened once (in a deployment run, reached from its root without symlinks).

    Raises:
        FreezeError: missing, not a directory, not writable, or `output` is a directory.
        UnsafeParameterError: in a deployment run, outside the roots or through a symlink.
    """
    out_dir = os.path.dirname(output)
    try:
        directory = open_directory(out_dir, parameter="output")
    except FileNotFoundError as err:
        raise FreezeError(f"output {output}: directory {out_dir} does not exist") from err
    except StorageError as err:  # not a directory (an UnsafeParameterError is no StorageError: it passes)
        raise FreezeError(f"output {output}: {err}") from err
    except OSError as err:
        raise FreezeError(f"output {output}: directory {out_dir} cannot be opened: {err.strerror or err}") from err
    if not os.access(directory.handle, os.W_OK):
        directory.close()
        raise FreezeError(f"output {output}: directory {out_dir} is not writable")
    if directory.is_dir(os.path.basename(output)):
        directory.close()
        raise FreezeError(f"output {output} is a directory; expected a .pb file path")
    return directory


def _freeze(source: str, target: Location, directory: Optional[OpenDir], config: ExportConfig, as_text: bool) -> FreezeResult:
    import tensorflow as tf

    source_dir, source_name = ModelDir.of_checkpoint(source)
    if source_dir.is_remote:
        files = validate_checkpoint(source)
        model = config.model_for(files.format)
        fmt = "tf1" if model is None else "tf2"
        local = source_dir.local_checkpoint(source_name)
        if model is None:
            graph_def, inputs, outputs, batch, expected = _freeze_tf1(local, config.output_nodes, config.input_nodes, config.data)
        else:
            graph_def, inputs, outputs, batch, expected = _freeze_tf2(local, model, config)
    elif is_saved_model_dir(source):
        fmt = "saved_model"
        if in_deployment_run():
            confine(source, parameter="checkpoint", untrusted=True)
        graph_def, inputs, outputs, batch, expected = _freeze_saved_model(source, config.data)
    else:
        confine_checkpoint_files(source, parameter="checkpoint")  # a deployment run reads only under the roots
        files = check_checkpoint(source)
        model = config.model_for(files.format)
        if model is None:
            fmt = "tf1"
            graph_def, inputs, outputs, batch, expected = _freeze_tf1(
                files.prefix, config.output_nodes, config.input_nodes, config.data
            )
        else:
            fmt = "tf2"
            graph_def, inputs, outputs, batch, expected = _freeze_tf2(files.prefix, model, config)
    data_bytes = _check_size(graph_def, source)

    if directory is not None:
        remove_abandoned_temporaries(directory.path, directory=directory)
    # verified in scratch, then written once (an object store's object appears whole or not at all)
    with tempfile.TemporaryDirectory(prefix="ptf-freeze-", dir=scratch_dir()) as checked:
        local_output = os.path.join(checked, target.name)
        with open(local_output, "wb") as handle:
            handle.write(data_bytes)
        actual = run_frozen_graph(read_graph_def(local_output), inputs, outputs, batch)
        parity = compare_outputs(expected, actual, config.tolerance, sides=("checkpoint", "frozen graph"))
        if not parity.ok:
            raise ParityError(f"frozen graph of {source} fails verification: {parity.explain()}; nothing was written")
        store = object_store(target.parent, directory)
        paths = {directory.handle: directory.path} if directory is not None else None
        with reported_write_failure(f"writing frozen graph {store.uri(target.name)}", paths, FreezeError):
            name = publish_graph(store, target.name, data_bytes)
        output = store.uri(name)
        pbtxt = None
        if as_text:
            text_name = os.path.splitext(name)[0] + ".pbtxt"
            with reported_write_failure(f"writing the graph's text form {store.uri(text_name)}", paths, FreezeError):
                tf.io.write_graph(graph_def, checked, text_name, as_text=True)
                store.upload_file(os.path.join(checked, text_name), text_name)
            pbtxt = store.uri(text_name)
    get_logger().info("froze %s to %s (max abs diff %.3g)", source, output, parity.max_abs_diff)
    return FreezeResult(
        path=output,
        source=source,
        source_format=fmt,
        inputs=inputs,
        outputs=outputs,
        digest=_digest(data_bytes),
        size_bytes=len(data_bytes),
        parity=parity,
        pbtxt_path=pbtxt,
    )


def content_addressed_name(name: str, data: bytes) -> str:
    """`model.ckpt-50.pb` -> `model.ckpt-50.<first 12 hex digits of the sha256>.pb`."""
    stem, extension = os.path.splitext(name)
    return f"{stem}.{hashlib.sha256(data).hexdigest()[:12]}{extension}"


def publish_graph(store: StorageBackend, name: str, data: bytes) -> str:
    """Write a verified graph as `name`, never replacing other bytes; returns the name it has.

    `name` if it is free or already holds these bytes (freezing the same checkpoint again changes
    nothing); else, since another graph has that name (another model's, say), its content-addressed
    name beside it (`content_addressed_name`). Each write is create-only, so two freezers racing for
    one name cannot replace each other's file either.

    Raises:
        FreezeError: even the content-addressed name holds other bytes (a file changed after it was written).
    """
    for candidate in (name, content_addressed_name(name, data)):
        try:
            store.put_bytes(candidate, data, create_only=True)
            return candidate
        except FileExistsError:
            if store.read_bytes(candidate) == data:
                return candidate
            get_logger().warning("%s holds another frozen graph; it is kept", store.uri(candidate))
    raise FreezeError(f"{store.uri(name)}: the graph's content-addressed name holds other bytes; nothing was replaced")
