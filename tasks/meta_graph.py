"""TF1 meta graphs (`.meta`): load one, and find the tensors to serve.

An Estimator-era model dir holds `Saver` checkpoints with a `.meta` graph
beside each; freezing and exporting them needs no model code, only the
graph and the names of its input and output tensors: given, or taken from
the meta graph's `serving_default` signature.

Example:
    >>> import tensorflow as tf
    >>> from prefect_tensorflow.tasks.meta_graph import ancestors, candidate_output_nodes
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
from dataclasses import dataclass
from typing import Any, Optional

from .errors import PrefectTensorFlowError

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
) -> MetaGraph:
    """Import `<checkpoint>.meta` and resolve the input and output tensors.

    Raises:
        error: the `.meta` is missing, an output node is not in the graph, or
            no output is given and the meta graph has no serving signature
            (the message lists candidate output nodes).
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
    return MetaGraph(graph, saver, inputs, outputs)


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
