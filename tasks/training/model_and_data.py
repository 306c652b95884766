"""The model, its input and one optimisation step: what every training process builds the same way.

Example:
    >>> from prefect_tensorflow.tasks.configs import TrainingConfig
    >>> from prefect_tensorflow.tasks.training.model_and_data import build_model_and_data
    >>> net, train_split, eval_split = build_model_and_data(TrainingConfig())
    >>> net.optimizer is not None
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

from .. import model_code
from ..checkpoints.restore import checkpoint_keys
from ..configs import TrainingConfig
from ..errors import TrainingError


def build_model_and_data(config: TrainingConfig):
    """Seed everything, build the compiled model and both splits, checking each contract.

    Raises:
        TrainingError: the builder refused the hparams, returned something else than a
            compiled `keras.Model`, or the loader did not return a `tf.data.Dataset`.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    net = model_code.build_model(config.model, dict(config.hparams))
    if getattr(net, "optimizer", None) is None or getattr(net, "loss", None) is None:
        raise TrainingError(
            f"model {config.model!r}: expected a compiled model (model.compile(optimizer=..., loss=...)), "
            "received one without an optimizer or a loss"
        )
    source = config.data_source()
    return net, source.load("train"), source.load("eval")


def input_pipeline(dataset, config: TrainingConfig):
    """Repeat `dataset` forever, shuffle the stream with the config's seed, and batch it: the iterator mode.

    Used for data whose length is unknown; data of known length is read in the stateless
    order instead (`input_position`).

    Repeating before shuffling means the shuffle is instantiated once, when
    the training iterator is created. Shuffling after repeating would draw each
    epoch's order from a seed generator shared by every iterator of the
    dataset, and TensorFlow's async checkpoint creates a second iterator (to
    copy the input position), which would change the order training sees.
    """
    import tensorflow as tf

    options = tf.data.Options()
    # Autotuning has nothing to tune here and its thread makes deleting the
    # iterator wait up to seconds after training ends.
    options.autotune.enabled = False
    return (
        dataset.repeat()
        .shuffle(config.shuffle_buffer, seed=config.seed)
        .batch(config.batch_size, drop_remainder=True)
        .with_options(options)
    )


class LossWindow:
    """The training loss summed on the device since the last checkpoint: no per-step host sync.

    Not part of the checkpoint, so after a resume the first window is shorter.
    """

    def __init__(self) -> None:
        import tensorflow as tf

        self.total = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self.count = tf.Variable(0, dtype=tf.int64, trainable=False)

    def take_mean(self, reduce_sum: Callable[[float], float] = float) -> Optional[float]:
        """The mean since the last call (None if no step ran), and start a new window.

        `reduce_sum`: the sum over the workers of this worker's total (a collective every worker calls;
        each worker's losses are already scaled by 1 / workers); one process: the total itself.
        """
        count = int(self.count.numpy())
        total = reduce_sum(float(self.total.numpy()))
        mean = total / count if count else None
        self.total.assign(0.0)
        self.count.assign(0)
        return mean


def make_train_step(net, global_step, window: LossWindow):
    """One optimisation step as a `tf.function` over the input iterator; returns the loss tensor."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def train_step(iterator):
        x, y = next(iterator)
        with tf.GradientTape() as tape:
            y_pred = net(x, training=True)
            loss = net.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
        grads = tape.gradient(loss, net.trainable_variables)
        net.optimizer.apply_gradients(zip(grads, net.trainable_variables))
        global_step.assign_add(1)
        window.total.assign_add(tf.cast(loss, tf.float64))
        window.count.assign_add(1)
        return loss

    return train_step


def evaluate(net, batches) -> dict[str, float]:
    """The compiled metrics of `net` on `batches`, finite values only."""
    values = net.evaluate(batches, verbose=0, return_dict=True)
    return {str(k): float(v) for k, v in values.items() if math.isfinite(float(v))}


def write_graph(train_step, iterator, model_dir: str) -> None:
    """`graph.pbtxt`: the training step's graph, as the Estimator wrote it."""
    import tensorflow as tf

    graph_def = train_step.get_concrete_function(iterator).graph.as_graph_def()
    tf.io.write_graph(graph_def, model_dir, "graph.pbtxt", as_text=True)


def has_input_position(prefix: str) -> bool:
    """Whether checkpoint `prefix` holds the input pipeline's position (`input_iterator`).

    Only the iterator mode's do; the stateless mode's and several workers' do not.
    """
    return any(key.startswith("input_iterator/") for key in checkpoint_keys(prefix))
