"""The same eval data scored through each SavedModel's serving signature, one outcome per example.

`load_eval_set(data)` materialises the dataset loader's eval split in the
loader's order as numpy arrays, with a digest of their dtypes, shapes and
bytes and its slices. `score_saved_model(path, eval_set)` loads the
SavedModel (`tf.saved_model.load`), calls its `serving_default` signature on
the eval set in fixed batches, in order, and keeps per-example outcomes:

- classifier head (outputs `logits`, `probabilities`, `class_ids`):
  `accuracy` (1/0), `error` (0/1), `loss` (-log of the label's probability,
  clipped to [1e-7, 1 - 1e-7] as Keras's cross-entropy does);
- raw head (one output): `mse` and `mae` against the label, averaged over an
  example's values.

The same metric code runs for the champion and the challenger, on the same
examples in the same order, so a comparison of the two is paired.
`OutcomeCache` keeps outcomes as JSON files keyed by (SavedModel digest, eval
digest), so a nightly gate scores only the challenger.

Slices: per class by default (`"class=<label>"`, for integer labels). A
loader names its own slices with a `slices` attribute: `loader.slices(split)`
returns `{name: bool mask}`, one mask entry per example in the loader's order
(e.g. `load_dataset.slices = lambda split: {"petal<1": ...}`); they are added
to the per-class ones (a loader's name wins).

Example:
    >>> from prefect_tensorflow.tasks.promotion.outcomes import load_eval_set
    >>> eval_set = load_eval_set("iris")
    >>> eval_set.labels.shape, eval_set.source, sorted(eval_set.slices)
    ((30,), 'iris:eval', ['class=0', 'class=1', 'class=2'])
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from .. import model_code
from ..configs import GATE_METRICS
from ..errors import GateError
from ..metric_order import default_mode
from ..run_context import get_logger

SUPPORTED_METRICS = GATE_METRICS
HEAD_METRICS = {"classifier": ("accuracy", "error", "loss"), "raw": ("mse", "mae")}
EPSILON = 1e-7  # Keras's backend epsilon: cross-entropy clips probabilities to [EPSILON, 1 - EPSILON]
BATCH_SIZE = 1024
CACHE_DIR = "gate-cache"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True, eq=False)
class EvalSet:
    """The eval examples, in the loader's order, as numpy arrays; `digest` identifies them."""

    features: list[np.ndarray]
    labels: np.ndarray
    digest: str
    source: str
    slices: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Examples in the set."""
        return int(self.labels.shape[0])


def eval_digest(features: list[np.ndarray], labels: np.ndarray) -> str:
    """`sha256:<hex>` over each array's dtype, shape and bytes, features in order, then labels.

    Example:
        >>> a = eval_digest([np.zeros((2, 1), np.float32)], np.array([0, 1]))
        >>> a == eval_digest([np.zeros((2, 1), np.float32)], np.array([1, 0])), a[:7]
        (False, 'sha256:')
    """
    digest = hashlib.sha256()
    for array in [*features, labels]:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{list(array.shape)};".encode())
        digest.update(array.tobytes())
    return "sha256:" + digest.hexdigest()


def load_eval_set(data: Any, split: str = "eval") -> EvalSet:
    """The `split` of the dataset loader `data` names (`"iris"` or `"module:attr"`, or a `DataSource`: a
    loader with its options and window), materialised in order.

    Raises:
        ImportStringError: `data` names no loader (see `model_code.load`).
        TrainingError: the loader raised or returned no `tf.data.Dataset`.
        GateError: the split is empty, its elements are not `(features, label)`, or a loader's slice is malformed.

    Example:
        >>> load_eval_set("iris").features[0].shape
        (30, 4)
    """
    if isinstance(data, str):
        dataset, source = model_code.load_split(data, split), f"{data}:{split}"
    else:
        window = f"@{data.window.name}" if data.window is not None else ""
        dataset, source, data = data.load(split), f"{data.data}:{split}{window}", data.data
    feature_parts: list[list[np.ndarray]] = []
    label_parts: list[np.ndarray] = []
    for element in dataset.batch(BATCH_SIZE).as_numpy_iterator():
        if not isinstance(element, tuple) or len(element) != 2:
            raise GateError(f"data {source}: expected elements (features, label), received {type(element).__name__}")
        x, y = element
        xs = list(x) if isinstance(x, (list, tuple)) else [x]
        if isinstance(x, dict):
            raise GateError(f"data {source}: expected positional features (an array or a tuple of arrays), received a dict")
        feature_parts.append([np.asarray(v) for v in xs])
        label_parts.append(np.asarray(y))
    if not label_parts:
        raise GateError(f"data {source}: the split has no examples; the gate needs eval data")
    features = [np.concatenate([part[i] for part in feature_parts]) for i in range(len(feature_parts[0]))]
    labels = np.concatenate(label_parts)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    slices = default_slices(labels)
    slices.update(_loader_slices(data, split, labels.shape[0]))
    return EvalSet(features, labels, eval_digest(features, labels), source, slices)


def default_slices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """One slice per class, `"class=<label>"`, for integer labels of shape [n]; none otherwise.

    Example:
        >>> {k: v.tolist() for k, v in default_slices(np.array([1, 0, 1])).items()}
        {'class=0': [False, True, False], 'class=1': [True, False, True]}
    """
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        return {}
    return {f"class={label}": labels == label for label in np.unique(labels).tolist()}


def _loader_slices(data: str, split: str, n: int) -> dict[str, np.ndarray]:
    slicer = getattr(model_code.load(data, "data"), "slices", None)
    if slicer is None:
        return {}
    where = f"data {data!r}: slices({split!r})"
    try:
        named = slicer(split)
    except Exception as err:
        raise GateError(f"{where} raised {type(err).__name__}: {err}") from err
    if not isinstance(named, Mapping):
        raise GateError(f"{where}: expected a dict of name -> bool mask, received {type(named).__name__}")
    masks = {}
    for name, mask in named.items():
        array = np.asarray(mask)
        if not isinstance(name, str) or array.shape != (n,) or array.dtype != np.bool_:
            raise GateError(
                f"{where}: slice {name!r}: expected a bool mask of shape ({n},), one entry per eval example, "
                f"received {array.dtype} of shape {array.shape}"
            )
        masks[name] = array
    return masks


class Outcomes(BaseModel):
    """One SavedModel's per-example outcomes on one eval set (JSON-serialisable, NaN kept as NaN)."""

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    saved_model_digest: str
    eval_digest: str
    n: int
    head: str = "classifier"
    signature: dict[str, Any]
    labels: list[float]
    per_example: dict[str, list[float]]
    finite: bool
    non_finite_outputs: list[str] = []
    slices: dict[str, list[int]] = {}  # slice name -> indices of its examples

    def value(self, metric: str, mask: Optional[Any] = None) -> float:
        """The mean of `per_example[metric]` (over the examples `mask` selects; NaN for none).

        Raises:
            GateError: naming `gate.metric` and the metrics this head computes.

        Example:
            >>> o = Outcomes(saved_model_digest="s", eval_digest="e", n=3, signature={}, labels=[0, 1, 1],
            ...              per_example={"accuracy": [1.0, 0.0, 1.0]}, finite=True)
            >>> round(o.value("accuracy"), 3), o.value("accuracy", [False, True, True])
            (0.667, 0.5)
        """
        values = np.asarray(self.values(metric))
        if mask is not None:
            values = values[np.asarray(mask, dtype=bool)]
        return float(values.mean()) if values.size else math.nan

    def values(self, metric: str) -> list[float]:
        """`per_example[metric]`, or a `GateError` naming `gate.metric` and the metrics this head computes."""
        if metric not in self.per_example:
            raise GateError(
                f"gate.metric: {metric!r} cannot be computed for the {self.head} head; "
                f"it computes {', '.join(sorted(self.per_example))} (supported: {', '.join(SUPPORTED_METRICS)})"
            )
        return self.per_example[metric]


def check_metric(metric: str, head: str, parameter: str = "gate.metric") -> None:
    """Raise a `GateError` naming `parameter` unless `head`'s outcomes have `metric`.

    Example:
        >>> check_metric("loss", "classifier")
        >>> check_metric("mse", "classifier")
        Traceback (most recent call last):
        ...
        prefect_tensorflow.tasks.errors.GateError: gate.metric: 'mse' cannot be computed for the classifier head; it computes accuracy, error, loss (supported: accuracy, error, loss, mse, mae)
    """
    computed = HEAD_METRICS.get(head)
    if computed is None:
        raise GateError(f"head: expected 'classifier' or 'raw', received {head!r}")
    if metric not in computed:
        raise GateError(
            f"{parameter}: {metric!r} cannot be computed for the {head} head; "
            f"it computes {', '.join(computed)} (supported: {', '.join(SUPPORTED_METRICS)})"
        )


def score_saved_model(local_path: str, eval_set: EvalSet, *, head: str = "classifier") -> Outcomes:
    """Score the SavedModel at `local_path` on `eval_set` through its `serving_default` signature, per example.

    Features go to the signature's inputs in the order the model declares them
    (`_input_order`; one input: the one feature array), in batches of `BATCH_SIZE`, in order.

    Raises:
        GateError: no such SavedModel or signature, the eval set's feature count or shapes do not fit the
            signature, the head's outputs are missing, or labels are out of the classifier's range.

    Example:
        >>> from prefect import flow
        >>> @flow
        ... def score(export_dir: str) -> float:
        ...     return score_saved_model(export_dir, load_eval_set("iris")).value("accuracy")
    """
    import tensorflow as tf

    from ..export.export_base import saved_model_digest

    if head not in HEAD_METRICS:
        raise GateError(f"head: expected 'classifier' or 'raw', received {head!r}")
    if not os.path.isfile(os.path.join(local_path, "saved_model.pb")):
        raise GateError(f"SavedModel {local_path}: no saved_model.pb; cannot score it")
    try:
        loaded = tf.saved_model.load(local_path)
    except Exception as err:
        raise GateError(f"SavedModel {local_path}: cannot be loaded ({type(err).__name__}: {err})") from err
    if "serving_default" not in loaded.signatures:
        raise GateError(f"SavedModel {local_path}: no 'serving_default' signature (has {sorted(loaded.signatures)})")
    fn = loaded.signatures["serving_default"]
    specs = fn.structured_input_signature[1]
    names = _input_order(loaded, specs)
    if len(names) != len(eval_set.features):
        raise GateError(
            f"SavedModel {local_path}: its signature takes {len(names)} input(s) {names}, the eval data "
            f"{eval_set.source} has {len(eval_set.features)} feature array(s)"
        )
    if any(f.shape[0] != eval_set.n for f in eval_set.features):
        raise GateError(
            f"eval data {eval_set.source}: {eval_set.n} labels but feature arrays of "
            f"{[int(f.shape[0]) for f in eval_set.features]} examples"
        )
    outputs = _run_in_batches(fn, names, specs, eval_set, local_path)
    signature = {
        "inputs": {name: [specs[name].dtype.name, _shape(specs[name].shape)] for name in sorted(specs)},
        "outputs": {name: [spec.dtype.name, _shape(spec.shape)] for name, spec in sorted(fn.structured_outputs.items())},
    }
    non_finite = sorted(k for k, v in outputs.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all())
    per_example = (
        _classifier_outcomes(outputs, eval_set, local_path)
        if head == "classifier"
        else _raw_outcomes(outputs, eval_set, local_path)
    )
    return Outcomes(
        saved_model_digest=saved_model_digest(local_path),
        eval_digest=eval_set.digest,
        n=eval_set.n,
        head=head,
        signature=signature,
        labels=eval_set.labels.astype(np.float64).reshape(eval_set.n, -1)[:, 0].tolist(),
        per_example={k: v.tolist() for k, v in per_example.items()},
        finite=not non_finite and all(np.isfinite(v).all() for v in per_example.values()),
        non_finite_outputs=non_finite,
        slices={name: np.flatnonzero(mask).tolist() for name, mask in eval_set.slices.items()},
    )


def _shape(shape: Any) -> Optional[list[Optional[int]]]:
    dims = shape.as_list() if shape.rank is not None else None
    return None if dims is None else [None if d is None else int(d) for d in dims]


def _input_order(loaded: Any, specs: Mapping[str, Any]) -> list[str]:
    """The signature's input names in the model's positional order (the order of the loader's features).

    An export of this package keeps its traced function as `serve`, whose positional specs carry the
    names. A SavedModel without it has only the signature's keywords, which do not keep the traced
    order: sorted by name then, as `run_saved_model` and the registry's verification take them.
    """
    for concrete in getattr(getattr(loaded, "serve", None), "concrete_functions", []):
        args = concrete.structured_input_signature[0]
        names = [getattr(spec, "name", None) for spec in args]
        if sorted(n for n in names if n) == sorted(specs) and len(names) == len(specs):
            return [str(n) for n in names]
    return sorted(specs)


def _run_in_batches(fn: Any, names: list[str], specs: Mapping[str, Any], eval_set: EvalSet, path: str) -> dict[str, np.ndarray]:
    import tensorflow as tf

    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, eval_set.n, BATCH_SIZE):
        inputs = {}
        for name, feature in zip(names, eval_set.features):
            chunk = feature[start : start + BATCH_SIZE]
            try:
                inputs[name] = tf.constant(chunk, dtype=specs[name].dtype)
            except (TypeError, ValueError) as err:
                raise GateError(f"eval data {eval_set.source}: feature for input {name!r} does not fit it: {err}") from err
            if not tf.TensorShape(chunk.shape).is_compatible_with(specs[name].shape):
                raise GateError(
                    f"SavedModel {path}: input {name!r} takes shape {_shape(specs[name].shape)}, the eval data "
                    f"{eval_set.source} gives {list(chunk.shape)}"
                )
        for key, value in fn(**inputs).items():
            parts.setdefault(key, []).append(value.numpy())
    return {key: np.concatenate(values) for key, values in parts.items()}


def _classifier_outcomes(outputs: dict[str, np.ndarray], eval_set: EvalSet, path: str) -> dict[str, np.ndarray]:
    missing = [k for k in ("probabilities", "class_ids") if k not in outputs]
    if missing:
        raise GateError(
            f"SavedModel {path}: the classifier head needs outputs 'probabilities' and 'class_ids', its signature "
            f"has {sorted(outputs)}; for another model use head='raw' (metrics mse, mae)"
        )
    labels = eval_set.labels
    probabilities = outputs["probabilities"].astype(np.float64)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise GateError(
            f"eval data {eval_set.source}: the classifier head expects integer labels of shape [n], received "
            f"{labels.dtype} of shape {list(labels.shape)}"
        )
    classes = probabilities.shape[-1]
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise GateError(
            f"eval data {eval_set.source}: labels range over [{labels.min()}, {labels.max()}], the SavedModel {path} "
            f"has {classes} classes"
        )
    correct = (outputs["class_ids"].reshape(-1).astype(np.int64) == labels).astype(np.float64)
    picked = probabilities[np.arange(labels.size), labels]
    with np.errstate(invalid="ignore"):
        loss = -np.log(np.clip(picked, EPSILON, 1 - EPSILON))
    correct[~np.isfinite(picked)] = np.nan  # a NaN model is not "right" by argmax's accident
    return {"accuracy": correct, "error": 1.0 - correct, "loss": loss}


def _raw_outcomes(outputs: dict[str, np.ndarray], eval_set: EvalSet, path: str) -> dict[str, np.ndarray]:
    if len(outputs) != 1:
        raise GateError(
            f"SavedModel {path}: the raw head compares one output with the label, its signature has {sorted(outputs)}"
        )
    (output,) = outputs.values()
    predicted = output.astype(np.float64).reshape(eval_set.n, -1)
    labels = eval_set.labels.astype(np.float64).reshape(eval_set.n, -1)
    if labels.shape[1] != predicted.shape[1]:
        raise GateError(
            f"eval data {eval_set.source}: labels of {labels.shape[1]} value(s) per example, the SavedModel {path} "
            f"outputs {predicted.shape[1]}"
        )
    difference = predicted - labels
    return {"mse": (difference**2).mean(axis=1), "mae": np.abs(difference).mean(axis=1)}


class OutcomeCache:
    """Outcomes as JSON files keyed by (SavedModel digest, eval digest); default `<PREFECT_TENSORFLOW_HOME>/gate-cache`.

    Files are written atomically (a temporary sibling, then a rename). A file that
    does not parse, or holds other keys, is ignored (a miss) and rewritten by the next `put`.

    Example:
        >>> cache = OutcomeCache("cache")
        >>> o = Outcomes(saved_model_digest="sha256:" + "a" * 64, eval_digest="sha256:" + "b" * 64, n=1,
        ...              signature={}, labels=[0], per_example={"accuracy": [1.0]}, finite=True)
        >>> cache.get(o.saved_model_digest, o.eval_digest) is None
        True
        >>> cache.put(o); cache.get(o.saved_model_digest, o.eval_digest) == o
        True
    """

    def __init__(self, directory: Optional[str] = None) -> None:
        if directory is None:
            from ..settings import data_home

            directory = os.path.join(data_home(), CACHE_DIR)
        self.directory = directory

    def path(self, saved_model_digest: str, eval_digest: str) -> str:
        """The file holding the outcomes of this key."""
        parts = []
        for digest in (saved_model_digest, eval_digest):
            parts.append(digest[7:] if _DIGEST.fullmatch(digest) else hashlib.sha256(digest.encode()).hexdigest())
        return os.path.join(self.directory, f"{parts[0][:32]}-{parts[1][:32]}.json")

    def get(self, saved_model_digest: str, eval_digest: str, *, head: Optional[str] = None) -> Optional[Outcomes]:
        """The cached outcomes of this key (and `head`, when given), or None."""
        path = self.path(saved_model_digest, eval_digest)
        try:
            with open(path, encoding="utf-8") as handle:
                outcomes = Outcomes.model_validate_json(handle.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, ValidationError) as err:
            get_logger().warning("gate cache: ignoring unreadable %s (%s); it will be rewritten", path, type(err).__name__)
            return None
        if (outcomes.saved_model_digest, outcomes.eval_digest) != (saved_model_digest, eval_digest) or (
            head is not None and outcomes.head != head
        ):
            return None
        if any(len(v) != outcomes.n for v in outcomes.per_example.values()) or len(outcomes.labels) != outcomes.n:
            get_logger().warning("gate cache: ignoring %s: its outcomes are not %d long", path, outcomes.n)
            return None
        return outcomes

    def put(self, outcomes: Outcomes) -> None:
        """Write `outcomes` under its key, atomically (replacing what was there)."""
        os.makedirs(self.directory, exist_ok=True)
        path = self.path(outcomes.saved_model_digest, outcomes.eval_digest)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(outcomes.model_dump_json())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def summary(outcomes: Outcomes, metric: str) -> dict[str, Any]:
    """A small JSON-able summary: the metric's value, n and the digests (for tags and artifacts).

    Example:
        >>> o = Outcomes(saved_model_digest="s", eval_digest="e", n=2, signature={}, labels=[0, 1],
        ...              per_example={"loss": [0.5, 1.5]}, finite=True)
        >>> summary(o, "loss")
        {'metric': 'loss', 'mode': 'min', 'value': 1.0, 'n': 2, 'saved_model_digest': 's', 'eval_digest': 'e'}
    """
    return {
        "metric": metric,
        "mode": default_mode(metric),
        "value": outcomes.value(metric),
        "n": outcomes.n,
        "saved_model_digest": outcomes.saved_model_digest,
        "eval_digest": outcomes.eval_digest,
    }
