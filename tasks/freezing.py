"""`freeze_graph`: a checkpoint (or SavedModel) frozen into a constant graph `.pb`, verified.

What TensorFlow's old `freeze_graph.py` made from a `.meta` graph and a
checkpoint, for three sources:

- a TF2 object-based checkpoint + the model builder: restore, trace the
  serving function, `convert_variables_to_constants_v2`;
- a TF1 `Saver` checkpoint with its `.meta` graph (an Estimator-era model
  dir): `import_meta_graph` + `saver.restore`, then
  `convert_variables_to_constants`; no model code needed;
- a SavedModel directory: its serving signature.

The graph is written to a temporary sibling, loaded back with
`tf.compat.v1.import_graph_def`, run on a verification batch and compared
with the source; only then is it renamed into place. A mismatch above the
tolerance fails the task and leaves no `.pb` behind.

Example:
    >>> from prefect import flow
    >>> from prefect_tensorflow.tasks.freezing import freeze_graph
    >>> @flow
    ... def freeze(checkpoint: str) -> str:
    ...     return freeze_graph(checkpoint, "/models/iris/frozen.pb").path
"""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any, Optional

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from . import iris
from .checkpoint_files import check_checkpoint
from .errors import FreezeError, GraphTooLargeError, ParityError
from .logs import get_logger
from .meta_graph import load_meta_graph
from .serving import Head, input_specs, restore_model, serving_function
from .verification import (
    DEFAULT_TOLERANCE,
    Parity,
    compare_outputs,
    default_verification_data,
    run_frozen_graph,
    verification_batch,
)

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
    return graph_def.SerializeToString()


# --- the three sources -------------------------------------------------------------


def _freeze_tf2(checkpoint: str, model: str, hparams, head: Head, data: Optional[str]):
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    net = restore_model(checkpoint, model, hparams)
    var_bytes = sum(int(tf.size(v).numpy()) * tf.as_dtype(v.dtype).size for v in net.variables)
    if var_bytes > PROTOBUF_LIMIT:
        raise GraphTooLargeError(
            f"{checkpoint}: the model's variables take {var_bytes / 2**30:.2f} GiB; a frozen graph "
            "holds them as constants and would pass protobuf's 2 GiB limit for a GraphDef; export "
            "a SavedModel instead (export_saved_model / `prefect-tensorflow export`)"
        )
    serve = serving_function(net, head)
    concrete = serve.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete)
    graph_def = frozen.graph.as_graph_def()
    inputs = [t.name for t in frozen.inputs]
    outputs = {name: f"{name}:0" for name in concrete.structured_outputs}
    batch = verification_batch(input_specs(net), data)
    expected = {k: v.numpy() for k, v in serve(*batch).items()}
    return graph_def, inputs, outputs, batch, expected


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
        batch = verification_batch(
            [tf.TensorSpec(t.shape, t.dtype) for t in specs], data
        )
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


# --- the task ----------------------------------------------------------------------


def freeze(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: Optional[str] = None,
    hparams: Optional[dict[str, Any]] = None,
    head: Head = "classifier",
    output_nodes: Optional[list[str]] = None,
    input_nodes: Optional[list[str]] = None,
    data: Optional[str] = None,
    as_text: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
) -> FreezeResult:
    """Freeze, verify and atomically write a constant graph (plain function behind the task).

    Raises:
        InvalidCheckpointError: the checkpoint is incomplete or corrupt.
        CheckpointMismatchError: the checkpoint was not written by `model`.
        FreezeError: missing `.meta`, unknown output node, too large, unwritable output.
        ParityError: the frozen graph does not compute what the source computes.
    """
    import tensorflow as tf

    source = os.fspath(source)
    output = os.path.abspath(os.fspath(output))
    out_dir = os.path.dirname(output)
    if not os.path.isdir(out_dir):
        raise FreezeError(f"output {output}: directory {out_dir} does not exist")
    if not os.access(out_dir, os.W_OK):
        raise FreezeError(f"output {output}: directory {out_dir} is not writable")
    if os.path.isdir(output):
        raise FreezeError(f"output {output} is a directory; expected a .pb file path")
    log = get_logger()

    if is_saved_model_dir(source):
        fmt = "saved_model"
        graph_def, inputs, outputs, batch, expected = _freeze_saved_model(source, data)
    else:
        files = check_checkpoint(source)
        if files.format == "tf1" and model is None:
            fmt = "tf1"
            graph_def, inputs, outputs, batch, expected = _freeze_tf1(files.prefix, output_nodes, input_nodes, data)
        else:
            fmt = "tf2"
            model = model or iris.MODEL
            graph_def, inputs, outputs, batch, expected = _freeze_tf2(
                files.prefix, model, hparams, head, default_verification_data(model, data)
            )
    data_bytes = _check_size(graph_def, source)

    tmp = f"{output}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data_bytes)
        from .verification import read_graph_def

        actual = run_frozen_graph(read_graph_def(tmp), inputs, outputs, batch)
        parity = compare_outputs(expected, actual, tolerance)
        if not parity.ok:
            raise ParityError(
                f"frozen graph of {source} differs from it by {parity.max_abs_diff:.3g} "
                f"(tolerance {tolerance:g}): {parity.per_output}; nothing was written"
            )
        pbtxt = None
        if as_text:
            pbtxt = os.path.splitext(output)[0] + ".pbtxt"
            tf.io.write_graph(graph_def, os.path.dirname(pbtxt), os.path.basename(pbtxt), as_text=True)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("froze %s to %s (max abs diff %.3g)", source, output, parity.max_abs_diff)
    return FreezeResult(
        path=output, source=source, source_format=fmt, inputs=inputs, outputs=outputs,
        digest=_digest(data_bytes), size_bytes=len(data_bytes), parity=parity, pbtxt_path=pbtxt,
    )


@task(name="freeze-graph")
def freeze_graph(
    checkpoint: str,
    output: str,
    model: Optional[str] = None,
    hparams: Optional[dict[str, Any]] = None,
    output_nodes: Optional[list[str]] = None,
    input_nodes: Optional[list[str]] = None,
    data: Optional[str] = None,
    as_text: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
) -> FreezeResult:
    """Freeze a checkpoint or SavedModel into a verified constant-graph `.pb`.

    Args:
        checkpoint: a TF2 or TF1 checkpoint prefix, or a SavedModel directory.
        output: the `.pb` path to write (its directory must exist).
        model: model builder import string for TF2 checkpoints (default: the bundled iris).
        hparams: keyword arguments for the model builder.
        output_nodes: TF1 only: output node names (default: the meta graph's serving signature).
        input_nodes: TF1 only: input tensor names (default: signature inputs or placeholders).
        data: dataset loader for the verification batch (default: seeded random values).
        as_text: also write a `.pbtxt` beside the `.pb`.
        tolerance: largest absolute difference accepted in verification.

    Returns:
        Paths, tensor names, digest and parity figures.

    Raises:
        FreezeError, ParityError, InvalidCheckpointError, CheckpointMismatchError.

    Example:
        >>> from prefect import flow
        >>> @flow
        ... def freeze_latest(checkpoint: str) -> str:
        ...     return freeze_graph(checkpoint, "/tmp/iris.pb").digest
    """
    return freeze(
        checkpoint, output, model=model, hparams=hparams, output_nodes=output_nodes,
        input_nodes=input_nodes, data=data, as_text=as_text, tolerance=tolerance,
    )
