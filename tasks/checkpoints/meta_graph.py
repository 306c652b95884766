"""TF1 meta graphs (`.meta`): load one, and find the tensors to serve.

An Estimator-era model dir holds `Saver` checkpoints with a `.meta` graph
beside each; freezing and exporting them needs no model code, only the
graph and the names of its input and output tensors: given, or taken from
the meta graph's `serving_default` signature.

A `.meta` file is data that names things. In a deployment run (untrusted)
`load_meta_graph` refuses a graph whose ops that would run (the outputs and
inputs and what they depend on, the saver's restore op, the init ops a
SavedModel loader runs) read or write files, other than the saver restoring
the checkpoint it is given, and a graph whose asset file paths lie outside the
roots (`check_meta_graph`).

Example:
    >>> import tensorflow as tf
    >>> from prefect_tensorflow.tasks.checkpoints.meta_graph import ancestors, candidate_output_nodes
    >>> graph = tf.Graph()
    >>> with graph.as_default():
    ...     features = tf.compat.v1.placeholder(tf.float32, [None, 4], name="features")
    ...     labels = tf.compat.v1.placeholder(tf.int32, [None], name="labels")
    ...     logits = tf.identity(features * 2.0, name="logits")
    >>> candidate_output_nodes(graph.as_graph_def())
    ['logits']
    >>> "labels" in ancestors(graph.as_graph_def(), ["logits"])
    False
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import PrefectTensorFlowError, UnsafeParameterError
from ..run_context import in_deployment_run

_NOT_OUTPUTS = {
    "NoOp",
    "Assign",
    "AssignVariableOp",
    "SaveV2",
    "RestoreV2",
    "Const",
    "VarHandleOp",
    "Placeholder",
    "ReadVariableOp",
    "VarIsInitializedOp",
    "IsVariableInitialized",
}


# Ops whose kernels open files (or sockets, or run Python): readers, writers, datasets, savers, summaries,
# debug and print sinks, py_func. Matched on the op type; a graph that would run one is refused when untrusted.
_FILE_OPS = re.compile(
    r"Reader|Writer|File|Dataset|Iterator|Summary|Save|Restore|Checkpoint|Record|Debug|PyFunc|Rpc|RemoteCall|"
    r"Gcs|BigQuery|Sql|LMDB|Lmdb|Print|ImmutableConst|Proto|Vocab|Remap|Event|Snapshot"
)
_RESTORE_OPS = {"RestoreV2", "Restore", "RestoreSlice"}
# Collections whose ops the SavedModel loaders run (they survive into an export of the graph).
_RUN_COLLECTIONS = ("saved_model_main_op", "legacy_init_op", "table_initializer", "init_op", "local_init_op")
ASSET_COLLECTION = "asset_filepaths"


@dataclass
class MetaGraph:
    """A TF1 graph imported from its `.meta`, with the tensors to serve."""

    graph: Any  # tf.Graph
    saver: Any  # tf.compat.v1.train.Saver
    inputs: list[str]  # tensor names, e.g. features:0
    outputs: dict[str, str]  # output name -> tensor name


def meta_graph_path(checkpoint: str, error: type[PrefectTensorFlowError]) -> str:
    meta = checkpoint + ".meta"
    if not os.path.exists(meta):
        raise error(
            f"checkpoint {checkpoint} is a TF1 Saver checkpoint but {meta} is missing; the graph "
            "cannot be rebuilt without it (pass --model for a TF2 model builder instead)"
        )
    return meta


def read_meta_graph(meta: str):
    """Parse a `.meta` file (a binary `MetaGraphDef`), signatures included."""
    import tensorflow as tf

    meta_graph_def = tf.compat.v1.MetaGraphDef()
    with open(meta, "rb") as handle:
        meta_graph_def.ParseFromString(handle.read())
    return meta_graph_def


def candidate_output_nodes(graph_def) -> list[str]:
    """Nodes nothing else consumes, the usual outputs of a TF1 graph (save and init ops left out)."""
    consumed = {name.lstrip("^").split(":")[0] for node in graph_def.node for name in node.input}
    return sorted(
        node.name
        for node in graph_def.node
        if node.name not in consumed
        and node.op not in _NOT_OUTPUTS
        and not node.name.startswith(("save/", "save_", "init", "report_uninitialized", "global_step"))
    )


def _tensor(name: str) -> str:
    return name if ":" in name else f"{name}:0"


def load_meta_graph(
    checkpoint: str,
    *,
    output_nodes: Optional[list[str]] = None,
    input_nodes: Optional[list[str]] = None,
    error: type[PrefectTensorFlowError] = PrefectTensorFlowError,
    untrusted: Optional[bool] = None,
) -> MetaGraph:
    """Import `<checkpoint>.meta` and resolve the input and output tensors.

    Args:
        untrusted: default: whether this runs in a deployment's flow run; then the graph
            is checked by `check_meta_graph` before anything of it runs.

    Raises:
        error: the `.meta` is missing, an output node is not in the graph, or
            no output is given and the meta graph has no serving signature
            (the message lists candidate output nodes).
        UnsafeParameterError: untrusted, and the graph would touch files (see `check_meta_graph`).
    """
    import tensorflow as tf

    meta = meta_graph_path(checkpoint, error)
    graph = tf.Graph()
    with graph.as_default():
        saver = tf.compat.v1.train.import_meta_graph(meta, clear_devices=True)
    graph_def = graph.as_graph_def()
    signature = read_meta_graph(meta).signature_def.get("serving_default")
    candidates = ", ".join(candidate_output_nodes(graph_def)[:20]) or "none"
    if output_nodes:
        known = {n.name for n in graph_def.node}
        unknown = [n for n in output_nodes if n.split(":")[0] not in known]
        if unknown:
            raise error(f"output node(s) {unknown} not in the graph of {meta}; candidates: {candidates}")
        outputs = {n.split(":")[0]: _tensor(n) for n in output_nodes}
    elif signature is not None:
        outputs = {k: signature.outputs[k].name for k in sorted(signature.outputs)}
    else:
        raise error(f"{meta} has no serving signature; name the output nodes (--output-nodes). Candidates: {candidates}")
    if input_nodes:
        inputs = [_tensor(n) for n in input_nodes]
    elif signature is not None:
        inputs = [signature.inputs[k].name for k in sorted(signature.inputs)]
    else:
        needed = ancestors(graph_def, [name.split(":")[0] for name in outputs.values()])
        inputs = [f"{n.name}:0" for n in graph_def.node if n.op == "Placeholder" and n.name in needed]
    if untrusted if untrusted is not None else in_deployment_run():
        check_meta_graph(read_meta_graph(meta), meta, [*outputs.values(), *inputs])
    return MetaGraph(graph, saver, inputs, outputs)


def _functions(attrs: Any) -> Iterable[str]:
    """Names of the functions a node's attributes call (`f`, `then_branch`, lists of them)."""
    for value in attrs.values():
        if value.HasField("func"):
            yield value.func.name
        elif value.HasField("list"):
            yield from (f.name for f in value.list.func)


def _string_constant(node: Any) -> list[str]:
    if node.op != "Const" or "value" not in node.attr:
        return []
    return [v.decode("utf-8", "replace") for v in node.attr["value"].tensor.string_val]


def check_meta_graph(
    meta_graph_def: Any, meta: str, tensors: list[str], *, roots: Optional[list[str]] = None, parameter: str = "checkpoint"
) -> None:
    """Refuse (untrusted callers) a `.meta` graph that would touch files when exported, frozen or loaded.

    What runs: the ancestors of `tensors` (the outputs and inputs), of the saver's restore op, and
    of the ops in the collections a SavedModel loader runs (`saved_model_main_op`, `legacy_init_op`,
    ...), and the bodies of the functions they call. None of them may be a file-touching op
    (readers, writers, datasets, savers, summaries, print and debug sinks, py_func), except the
    saver's own restore ops reading the checkpoint it is fed. Asset file paths (the
    `asset_filepaths` collection, `asset_file_def`) must lie under the roots.

    Raises:
        UnsafeParameterError: naming `parameter`, the `.meta` file and the op or path at fault.
    """
    from ..security import confine

    graph_def = meta_graph_def.graph_def
    nodes = {node.name: node for node in graph_def.node}
    saver_def = meta_graph_def.saver_def
    filename_node = saver_def.filename_tensor_name.split(":")[0] if saver_def.filename_tensor_name else None
    roots_of_run = [name.lstrip("^").split(":")[0] for name in tensors]
    if saver_def.restore_op_name:
        roots_of_run.append(saver_def.restore_op_name.split(":")[0])
    for key in _RUN_COLLECTIONS:
        if key in meta_graph_def.collection_def:
            roots_of_run += [n.split(":")[0] for n in meta_graph_def.collection_def[key].node_list.value]
    run = ancestors(graph_def, roots_of_run)
    library = {f.signature.name: f for f in graph_def.library.function}

    def refuse(what: str) -> UnsafeParameterError:
        return UnsafeParameterError(
            parameter, meta, f"the graph in {meta} {what}; a deployment run does not run graphs that touch files"
        )

    called: list[str] = []
    for name in sorted(run):
        node = nodes[name]
        if _FILE_OPS.search(node.op):
            restoring = node.op in _RESTORE_OPS and node.input and node.input[0].split(":")[0] == filename_node
            if not restoring:
                raise refuse(f"would run op {node.name!r} ({node.op})")
        called += _functions(node.attr)
    seen: set[str] = set()
    while called:
        function = called.pop()
        if function in seen or function not in library:
            continue
        seen.add(function)
        for node in library[function].node_def:
            if _FILE_OPS.search(node.op):
                raise refuse(f"would run op {node.name!r} ({node.op}) in function {function!r}")
            called += _functions(node.attr)

    assets = [v for name in _asset_nodes(meta_graph_def) if name in nodes for v in _string_constant(nodes[name])]
    assets += [a.filename for a in meta_graph_def.asset_file_def if os.path.isabs(a.filename)]
    for path in assets:
        try:
            confine(path, parameter=parameter, untrusted=True, roots=roots)
        except ValueError as err:
            raise UnsafeParameterError(
                parameter, meta, f"{meta} references asset file {path}, outside the allowed roots ({err})"
            ) from None


def _asset_nodes(meta_graph_def: Any) -> list[str]:
    if ASSET_COLLECTION not in meta_graph_def.collection_def:
        return []
    return [n.split(":")[0] for n in meta_graph_def.collection_def[ASSET_COLLECTION].node_list.value]


def ancestors(graph_def, names: list[str]) -> set[str]:
    """The nodes `names` depend on (themselves included): an Estimator graph's `labels` placeholder
    feeds the loss, not the serving outputs, and is no input of theirs."""
    producers = {node.name: node for node in graph_def.node}
    seen: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name in seen or name not in producers:
            continue
        seen.add(name)
        stack.extend(source.lstrip("^").split(":")[0] for source in producers[name].input)
    return seen
