"""Run each artifact on the same batch and compare: checkpoint, frozen graph, SavedModel.

An export is only called verified when it computes what the checkpoint
computes: the largest absolute difference over every output and every
example of a verification batch must stay within a tolerance (1e-5 by
default). A NaN or infinite value in any compared output, on either side,
fails verification whatever the tolerance (`Parity.non_finite` names the
output and the side): a difference with NaN is NaN, which no `<=` accepts.

Example:
    >>> from prefect_tensorflow.tasks.export.verification import compare_outputs
    >>> import numpy as np
    >>> compare_outputs({"y": np.ones(3)}, {"y": np.ones(3) + 1e-7}).max_abs_diff < 1e-5
    True
    >>> parity = compare_outputs({"y": np.ones(2)}, {"y": np.array([1.0, np.nan])}, sides=("checkpoint", "SavedModel"))
    >>> parity.ok, parity.non_finite
    (False, {'y': 'SavedModel: 1 NaN of 2 values'})
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict

from ..configs import ExportConfig
from ..errors import ParityError
from .verification_batch import verification_batch as verification_batch  # its callers import it from here too

DEFAULT_TOLERANCE = 1e-5


class Parity(BaseModel):
    """How closely two artifacts agree on one batch."""

    model_config = ConfigDict(frozen=True)

    max_abs_diff: float
    per_output: dict[str, float]
    batch_size: int
    tolerance: float = DEFAULT_TOLERANCE
    non_finite: dict[str, str] = {}  # output -> which side holds NaN/inf values, and how many

    @property
    def ok(self) -> bool:
        return not self.non_finite and self.max_abs_diff <= self.tolerance

    def explain(self) -> str:
        """Why the comparison failed (or its figure): the non-finite outputs by name and side, else the difference.

        Example:
            >>> Parity(max_abs_diff=0.5, per_output={"y": 0.5}, batch_size=4).explain()
            "max abs diff 0.5 (tolerance 1e-05) per output: {'y': 0.5}"
        """
        if self.non_finite:
            named = "; ".join(f"output {name!r} is not finite in {where}" for name, where in self.non_finite.items())
            return f"{named} (a NaN or infinite output is never verified)"
        return f"max abs diff {self.max_abs_diff:.3g} (tolerance {self.tolerance:g}) per output: {self.per_output}"


def compare_outputs(
    expected: Mapping[str, Any],
    actual: Mapping[str, Any],
    tolerance: float = DEFAULT_TOLERANCE,
    *,
    sides: tuple[str, str] = ("expected", "actual"),
) -> Parity:
    """Largest absolute difference per output; outputs must have the same names and shapes.

    A NaN or infinite value on either side makes that output's difference infinite and the parity not `ok`,
    with `non_finite[output]` naming the side (`sides`: what `expected` and `actual` are, e.g.
    `("checkpoint", "SavedModel")`).

    Raises:
        ParityError: the outputs differ in names or shapes.
    """
    if set(expected) != set(actual):
        raise ParityError(f"outputs differ: expected {sorted(expected)}, got {sorted(actual)}")
    per_output = {}
    non_finite = {}
    batch = 0
    for name in sorted(expected):
        a, b = np.asarray(expected[name]), np.asarray(actual[name])
        if a.shape != b.shape:
            raise ParityError(f"output {name!r}: expected shape {a.shape}, got {b.shape}")
        batch = a.shape[0] if a.ndim else 1
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        bad = [_count_non_finite(side, values) for side, values in zip(sides, (a64, b64))]
        if any(bad):
            non_finite[name] = ", ".join(b for b in bad if b)
            per_output[name] = float("inf")
            continue
        diff = np.abs(a64 - b64)
        per_output[name] = float(diff.max()) if diff.size else 0.0
    return Parity(
        max_abs_diff=max(per_output.values(), default=0.0),
        per_output=per_output,
        batch_size=batch,
        tolerance=tolerance,
        non_finite=non_finite,
    )


def _count_non_finite(side: str, values: np.ndarray) -> str:
    """`"<side>: 3 NaN, 1 inf of 90 values"`, or "" when every value is finite."""
    nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    if not nan and not inf:
        return ""
    counts = ", ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "inf")) if n)
    return f"{side}: {counts} of {values.size} values"


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


def read_graph_def(path: str | os.PathLike, *, parameter: str = "frozen_graph"):
    """Parse a binary `GraphDef` (`.pb`), a local path or an `s3://` URI."""
    import tensorflow as tf

    from ..storage.locations import parse_location
    from ..storage.stores import read_location_bytes

    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(read_location_bytes(parse_location(path, parameter=parameter)))
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


def verify_artifacts(
    checkpoint: str,
    frozen_graph: Optional[str] = None,
    saved_model: Optional[str] = None,
    config: Optional[ExportConfig] = None,
) -> VerifyReport:
    """Check that a frozen graph and/or a SavedModel compute what a TF2 checkpoint computes.

    For exports made elsewhere. Each pair's largest absolute difference on
    one verification batch is reported. Output names are the SavedModel
    signature's (or `logits`, `probabilities`, `class_ids` of the classifier
    head); the frozen graph must have tensors of those names, as
    `freeze_graph` writes them.

    Args:
        checkpoint: TF2 checkpoint prefix.
        frozen_graph: a `.pb` with a `features:0` input and outputs named like the signature.
        saved_model: a SavedModel version directory.
        config: the model builder, head, verification data and tolerance (default: the bundled iris).

    Returns:
        The pairwise parity figures.

    Raises:
        ParityError: a pair differs by more than the tolerance (the report is its `report`).

    Example:
        >>> from prefect import flow
        >>> from prefect_tensorflow.tasks import verify_artifacts
        >>> @flow
        ... def audit(checkpoint: str, export_dir: str) -> float:
        ...     report = verify_artifacts(checkpoint, saved_model=export_dir)
        ...     return max(p.max_abs_diff for p in report.pairs.values())
    """
    from ..checkpoints.model_dir import ModelDir
    from .export_base import local_export
    from .signature import trace_checkpoint

    config = config or ExportConfig()
    model = config.model_for("tf2") or "iris"
    source, name = ModelDir.of_checkpoint(checkpoint)
    local_checkpoint = source.local_checkpoint(name) if source.is_remote else checkpoint
    traced = trace_checkpoint(local_checkpoint, model, config.hparams, config.head, config.data_source(model))
    results = {"checkpoint": traced.expected}
    names = sorted(traced.expected)
    if frozen_graph:
        inputs = [f"{name}:0" for name in traced.input_names]
        results["frozen_graph"] = run_frozen_graph(
            read_graph_def(frozen_graph), inputs, {n: f"{n}:0" for n in names}, traced.batch
        )
    if saved_model:
        with local_export(saved_model) as local:
            results["saved_model"] = run_saved_model(local, traced.batch, input_names=traced.input_names)
    keys = list(results)
    pairs = {
        f"{a} vs {b}": compare_outputs(results[a], results[b], config.tolerance, sides=(a, b))
        for i, a in enumerate(keys)
        for b in keys[i + 1 :]
    }
    report = VerifyReport(
        checkpoint=checkpoint,
        frozen_graph=frozen_graph,
        saved_model=saved_model,
        pairs=pairs,
        ok=all(p.ok for p in pairs.values()),
    )
    bad = {pair: p.explain() for pair, p in pairs.items() if not p.ok}
    if bad:
        error = ParityError(f"{checkpoint}: artifacts differ by more than {config.tolerance:g} or are not finite: {bad}")
        error.report = report  # type: ignore[attr-defined]
        raise error
    return report
