"""The serving function of a TF2 checkpoint: the model restored, its outputs named.

Freezing and export both start here: the model builder rebuilds the network,
the checkpoint's `model` object restores into it (every model variable must
match), and a `tf.function` with a named input signature computes the
outputs. For a classifier those are what the Estimator's DNNClassifier
exported: `logits`, `probabilities` and `class_ids`.

Example:
    >>> import os, tempfile
    >>> import tensorflow as tf
    >>> from prefect_tensorflow.tasks.iris import build_model
    >>> from prefect_tensorflow.tasks.export.signature import restore_model, serving_function
    >>> prefix = tf.train.Checkpoint(model=build_model()).write(os.path.join(tempfile.mkdtemp(), "model.ckpt-0"))
    >>> net = restore_model(prefix, "iris")
    >>> sorted(serving_function(net, head="classifier")(tf.zeros([2, 4])))
    ['class_ids', 'logits', 'probabilities']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from ..errors import CheckpointMismatchError, InvalidCheckpointError
from ..model_code import build_model
from .verification_batch import verification_batch

Head = Literal["classifier", "raw"]


def restore_model(checkpoint: str, model: str, hparams: Optional[dict[str, Any]] = None):
    """Rebuild the model and restore its variables from a training checkpoint.

    Only the checkpoint's `model` object is read (the optimizer and input
    position are left alone), but every variable of the model must be found,
    with the right shape.

    Raises:
        CheckpointMismatchError: a model variable is missing from the checkpoint
            or has another shape there (a different model builder).
        InvalidCheckpointError: TensorFlow cannot read the checkpoint.
    """
    import tensorflow as tf

    net = build_model(model, hparams)
    ckpt = tf.train.Checkpoint(model=net)
    try:
        status = ckpt.read(checkpoint)
    except ValueError as err:
        raise CheckpointMismatchError(checkpoint, [], [], detail=str(err).strip().splitlines()[-1]) from err
    except tf.errors.OpError as err:
        raise InvalidCheckpointError(checkpoint, f"TensorFlow cannot restore it: {err.message}") from err
    status.expect_partial()  # the optimizer and input position are not needed to serve
    try:
        status.assert_existing_objects_matched()
    except AssertionError as err:
        unbound = [v.path for v in net.variables if v.path in str(err)] or [str(err)[:400]]
        raise CheckpointMismatchError(
            checkpoint,
            unbound,
            [],
            detail="these model variables have no value in the checkpoint",
        ) from err
    return net


def input_specs(net) -> list:
    """Named `tf.TensorSpec`s of the model's inputs, batch dimension free."""
    import tensorflow as tf

    specs = []
    for tensor in net.inputs:
        name = tensor.name.split(":")[0]
        specs.append(tf.TensorSpec([None, *tensor.shape[1:]], tensor.dtype, name=name))
    return specs


def serving_function(net, head: Head = "classifier"):
    """A `tf.function` with a named input signature returning a dict of named outputs."""
    import tensorflow as tf

    if head not in ("classifier", "raw"):
        raise ValueError(f"head: expected 'classifier' or 'raw', received {head!r}")  # library callers
    specs = input_specs(net)

    def outputs(values):
        if head == "classifier":
            logits = tf.identity(values, name="logits")
            return {
                "logits": logits,
                "probabilities": tf.nn.softmax(logits, name="probabilities"),
                "class_ids": tf.argmax(logits, axis=-1, name="class_ids"),
            }
        return {"outputs": tf.identity(values, name="outputs")}

    if len(specs) == 1:

        @tf.function(input_signature=specs)
        def serve(x):
            return outputs(net(x, training=False))

    else:

        @tf.function(input_signature=specs)
        def serve(*xs):
            return outputs(net(list(xs), training=False))

    return serve


@dataclass
class TracedCheckpoint:
    """A TF2 checkpoint's serving function and what it computes on the verification batch."""

    net: Any
    serve: Any  # the tf.function
    input_names: list[str]
    batch: list  # numpy arrays, one per input
    expected: dict  # output name -> numpy array


def trace_checkpoint(checkpoint: str, model: str, hparams: Optional[dict[str, Any]], head: Head, data: Any):
    """Restore `checkpoint` into `model`, trace its serving function and run it on the verification batch.

    Freezing and exporting both start here, so both verify against the same numbers.
    """
    net = restore_model(checkpoint, model, hparams)
    serve = serving_function(net, head)
    specs = input_specs(net)
    batch = verification_batch(specs, data)
    expected = {k: v.numpy() for k, v in serve(*batch).items()}
    return TracedCheckpoint(net, serve, [spec.name for spec in specs], batch, expected)
