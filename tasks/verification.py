"""Run each artifact on the same batch and compare: checkpoint, frozen graph, SavedModel.

An export is only called verified when it computes what the checkpoint
computes: the largest absolute difference over every output and every
example of a verification batch must stay within a tolerance (1e-5 by
default).

Example:
    >>> from prefect_tensorflow.tasks.verification import compare_outputs
    >>> import numpy as np
    >>> compare_outputs({"y": np.ones(3)}, {"y": np.ones(3) + 1e-7}).max_abs_diff < 1e-5
    True
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import numpy as np
from prefect import task
from pydantic import BaseModel, ConfigDict

from .errors import ParityError
from .importing import load_object

DEFAULT_TOLERANCE = 1e-5


class Parity(BaseModel):
    """How closely two artifacts agree on one batch."""

    model_config = ConfigDict(frozen=True)

    max_abs_diff: float
    per_output: dict[str, float]
    batch_size: int
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def compare_outputs(
    expected: Mapping[str, Any], actual: Mapping[str, Any], tolerance: float = DEFAULT_TOLERANCE
) -> Parity:
    """Largest absolute difference per output; outputs must have the same names and shapes.

    Raises:
        ParityError: the outputs differ in names or shapes.
    """
    if set(expected) != set(actual):
        raise ParityError(f"outputs differ: expected {sorted(expected)}, got {sorted(actual)}")
    per_output = {}
    batch = 0
    for name in sorted(expected):
        a, b = np.asarray(expected[name]), np.asarray(actual[name])
        if a.shape != b.shape:
            raise ParityError(f"output {name!r}: expected shape {a.shape}, got {b.shape}")
        batch = a.shape[0] if a.ndim else 1
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        per_output[name] = float(diff.max()) if diff.size else 0.0
    return Parity(
        max_abs_diff=max(per_output.values(), default=0.0),
        per_output=per_output,
        batch_size=batch,
        tolerance=tolerance,
    )


def default_verification_data(model: str, data: Optional[str]) -> Optional[str]:
    """`data`, or the bundled iris loader when the model is the bundled iris one, else None (random values)."""
    from . import iris

    return data or (iris.DATA if model == iris.MODEL else None)


def verification_batch(specs: list, data: Optional[str] = None, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    """One batch per input spec: the first `size` examples of `data`'s eval split, else seeded random values.

    Args:
        specs: `tf.TensorSpec`s (or objects with `.shape` and `.dtype`) of the inputs.
        data: `"module:attr"` of a dataset loader, or None.
    """
    import tensorflow as tf

    if data is not None:
        loader = load_object(data, parameter="data")
        features = []
        for element in loader("eval").take(size):
            x = element[0] if isinstance(element, tuple) else element
            features.append(x if isinstance(x, (list, tuple)) else [x])
        if features:
            return [np.stack([np.asarray(f[i]) for f in features]) for i in range(len(features[0]))]
    rng = np.random.default_rng(seed)
    batch = []
    for spec in specs:
        shape = [size if d is None else d for d in tf.TensorShape(spec.shape).as_list()]
        dtype = tf.as_dtype(spec.dtype)
        if dtype.is_floating:
            batch.append(rng.normal(size=shape).astype(dtype.as_numpy_dtype))
        elif dtype.is_integer:
            batch.append(rng.integers(0, 10, size=shape).astype(dtype.as_numpy_dtype))
        else:
            raise ParityError(f"cannot make verification values for input of dtype {dtype.name}; pass data")
    return batch


def run_frozen_graph(graph_def, inputs: list[str], outputs: Mapping[str, str], batch: list[np.ndarray]) -> dict:
    """Run a frozen `GraphDef` with `tf.compat.v1` (import_graph_def + Session)."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as sess:
        feed = {graph.get_tensor_by_name(name): value for name, value in zip(inputs, batch)}
        names = sorted(outputs)
        values = sess.run([graph.get_tensor_by_name(outputs[n]) for n in names], feed_dict=feed)
    return dict(zip(names, values))


def read_graph_def(path: str | os.PathLike):
    """Parse a binary `GraphDef` (`.pb`)."""
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    with open(path, "rb") as handle:
        graph_def.ParseFromString(handle.read())
    return graph_def


def run_saved_model(
    path: str | os.PathLike,
    batch: list[np.ndarray],
    signature: str = "serving_default",
    input_names: Optional[list[str]] = None,
    loaded: Any = None,
) -> dict:
    """Call one signature of a SavedModel (loaded with `tf.saved_model.load`) on the batch.

    Args:
        input_names: the signature's input names in the order of `batch`
            (default: sorted, which is right for a single input).
        loaded: an already loaded SavedModel, to avoid loading it again.
    """
    import tensorflow as tf

    loaded = loaded if loaded is not None else tf.saved_model.load(os.fspath(path))
    fn = loaded.signatures[signature]
    _, kwargs = fn.structured_input_signature
    names = list(input_names) if input_names else sorted(kwargs)
    if sorted(names) != sorted(kwargs):
        raise ParityError(f"SavedModel {path}: signature takes inputs {sorted(kwargs)}, not {names}")
    result = fn(**{name: tf.constant(value) for name, value in zip(names, batch)})
    return {k: v.numpy() for k, v in result.items()}


class VerifyReport(BaseModel):
    """Pairwise agreement of a checkpoint, a frozen graph and a SavedModel on one batch."""

    model_config = ConfigDict(frozen=True)

    checkpoint: str
    frozen_graph: Optional[str] = None
    saved_model: Optional[str] = None
    pairs: dict[str, Parity]
    ok: bool


def parity_report(
    checkpoint: str,
    *,
    frozen_graph: Optional[str] = None,
    saved_model: Optional[str] = None,
    model: Optional[str] = None,
    hparams: Optional[dict[str, Any]] = None,
    data: Optional[str] = None,
    input_name: str = "features",
    tolerance: float = DEFAULT_TOLERANCE,
) -> VerifyReport:
    """Run a TF2 checkpoint, a frozen graph and a SavedModel on one batch; report each pair's max difference.

    Output names are the SavedModel signature's (or `logits`, `probabilities`,
    `class_ids` of the classifier head); the frozen graph must have tensors of
    those names, as `freeze_graph` writes them.
    """
    from . import iris
    from .serving import input_specs, restore_model, serving_function

    model = model or iris.MODEL
    net = restore_model(checkpoint, model, hparams)
    serve = serving_function(net)
    specs = input_specs(net)
    batch = verification_batch(specs, default_verification_data(model, data))
    results = {"checkpoint": {k: v.numpy() for k, v in serve(*batch).items()}}
    names = sorted(results["checkpoint"])
    if frozen_graph:
        graph_def = read_graph_def(frozen_graph)
        results["frozen_graph"] = run_frozen_graph(
            graph_def, [f"{sp.name}:0" for sp in specs] if len(specs) > 1 else [f"{input_name}:0"],
            {n: f"{n}:0" for n in names}, batch
        )
    if saved_model:
        results["saved_model"] = run_saved_model(saved_model, batch, input_names=[sp.name for sp in specs])
    pairs = {}
    keys = list(results)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            pairs[f"{a} vs {b}"] = compare_outputs(results[a], results[b], tolerance)
    return VerifyReport(
        checkpoint=checkpoint, frozen_graph=frozen_graph, saved_model=saved_model,
        pairs=pairs, ok=all(p.ok for p in pairs.values()),
    )


@task(name="verify-artifacts")
def verify_artifacts(
    checkpoint: str,
    frozen_graph: Optional[str] = None,
    saved_model: Optional[str] = None,
    model: Optional[str] = None,
    data: Optional[str] = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> VerifyReport:
    """Check that a frozen graph and/or a SavedModel compute what a TF2 checkpoint computes.

    For exports made elsewhere. Each pair's largest absolute difference on
    one batch is reported; the task fails when any pair exceeds `tolerance`.

    Args:
        checkpoint: TF2 checkpoint prefix.
        frozen_graph: a `.pb` with `features:0` input and outputs named like the signature.
        saved_model: a SavedModel version directory.
        model: model builder import string (default: the bundled iris).
        data: dataset loader for the batch (default: seeded random values).
        tolerance: largest absolute difference accepted.

    Returns:
        The pairwise parity figures.

    Raises:
        ParityError: a pair differs by more than `tolerance`.

    Example:
        >>> from prefect import flow
        >>> @flow
        ... def audit(checkpoint: str, export_dir: str) -> float:
        ...     report = verify_artifacts(checkpoint, saved_model=export_dir)
        ...     return max(p.max_abs_diff for p in report.pairs.values())
    """
    report = parity_report(
        checkpoint, frozen_graph=frozen_graph, saved_model=saved_model, model=model, data=data,
        tolerance=tolerance,
    )
    bad = {pair: p.max_abs_diff for pair, p in report.pairs.items() if not p.ok}
    if bad:
        raise ParityError(f"{checkpoint}: artifacts differ by more than {tolerance:g}: {bad}")
    return report
