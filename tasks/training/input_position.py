"""Where training's input is at step N: a function of (seed, step) for data whose length is known.

Two input modes, chosen per training from the loader's dataset:

- **stateless** (the dataset says its length: a finite `cardinality()`, and
  its elements are fixed-shape dense tensors that fit in `MAX_IN_MEMORY_BYTES`):
  the examples are held in memory once, and the batch of step `s` is the
  examples at `index_shuffle(p mod n, seed=(seed, p // n), max_index=n - 1)`
  for the global example positions `p = s * batch_size + i` (`shuffle_buffer=1`,
  no shuffle: example `p mod n`, the split's own order). Every epoch is a
  fresh permutation of the whole split, a function of `(seed, epoch)`, so the
  pipeline of a resume at step N is built at N (no batch is skipped; at most
  one epoch's examples, fewer than n, are passed over) and
  a checkpoint holds no `input_iterator`: a save snapshots only variables.
- **iterator** (a stream of unknown or infinite length, a generator, ragged
  elements, a split too big for memory): `repeat().shuffle(shuffle_buffer,
  seed).batch()` (`model_and_data.input_pipeline`), its iterator saved in
  every checkpoint as `input_iterator`.

A checkpoint without `input_iterator` (stateless, or several workers') is
resumed by `positioned_batches` at its `global_step`; one with it (the
iterator mode, and every single-process checkpoint written before the
stateless mode existed) by restoring the iterator, so such a model dir keeps
the order it was trained with.

Example:
    >>> import tensorflow as tf
    >>> from prefect_tensorflow.tasks.configs import TrainingConfig
    >>> from prefect_tensorflow.tasks.training.input_position import positioned_batches, random_access_examples
    >>> data = tf.data.Dataset.range(10)
    >>> examples = random_access_examples(data)
    >>> config = TrainingConfig(batch_size=4, seed=7)
    >>> from_start = [b.numpy().tolist() for b in positioned_batches(data, config, 0, examples).take(5)]
    >>> sorted(from_start[0] + from_start[1] + from_start[2][:2])  # the first epoch: every example once
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    >>> [b.numpy().tolist() for b in positioned_batches(data, config, 3, examples).take(2)] == from_start[3:]
    True
    >>> random_access_examples(data.repeat()) is None  # infinite: the iterator mode
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..configs import TrainingConfig
from .model_and_data import input_pipeline

MAX_IN_MEMORY_BYTES = 512 * 1024 * 1024
# What TensorFlow's public `index_shuffle` puts before a [2] seed for the raw op's [3];
# using it keeps the order equal to `index_shuffle(i, (seed, epoch), n - 1)`.
_INDEX_SHUFFLE_SEED_PAD = 498247692
_ROUNDS = 4


@dataclass(frozen=True)
class Examples:
    """A split held in memory for random access: its tensors (the dataset's structure, batched) and length."""

    tensors: Any
    length: int


def random_access_examples(dataset: Any, max_bytes: int = MAX_IN_MEMORY_BYTES) -> Optional[Examples]:
    """The dataset's examples in memory when its length is known and they fit; None: the iterator mode.

    Known length: a finite `cardinality()` (`from_tensor_slices`, `range`, `map` over them, or a
    loader's `assert_cardinality`). Elements must be dense tensors of fixed shape (strings count
    as 64 bytes each towards `max_bytes`). A split that cannot be read whole (a value the loader
    fails on) is left to the iterator mode, which reports it from the training step as before.
    """
    import tensorflow as tf

    length = int(dataset.cardinality())
    if length <= 0:  # infinite (-1), unknown (-2) or empty: nothing to index
        return None
    specs = tf.nest.flatten(dataset.element_spec)
    if not all(isinstance(s, tf.TensorSpec) and s.shape.is_fully_defined() for s in specs):
        return None
    per_example = sum(s.shape.num_elements() * (64 if s.dtype == tf.string else s.dtype.size) for s in specs)
    if per_example * length > max_bytes:
        return None
    try:
        tensors = dataset.batch(length).get_single_element()
    except tf.errors.OpError:
        # A bad value the loader produces: the iterator mode meets it in the training step, where it is
        # reported naming the loader and the value (`data.training_errors`).
        return None
    return Examples(tensors=tensors, length=length)


def positioned_batches(dataset: Any, config: TrainingConfig, start_step: int, examples: Optional[Examples]) -> Any:
    """The training batches from `start_step` on: stateless when `examples` is given, else the seeded stream skipped.

    The stream (`input_pipeline`) skipped by `start_step` batches is where a checkpoint without
    `input_iterator` resumes for a dataset without random access (several workers' checkpoints).
    """
    if examples is None:
        stream = input_pipeline(dataset, config)
        return stream.skip(start_step) if start_step else stream
    return _stateless_batches(examples, config, start_step)


def _stateless_batches(examples: Examples, config: TrainingConfig, start_step: int) -> Any:
    """Each epoch's examples gathered in one op, streamed and batched natively (no function per batch):
    position `p` is example `_shuffled_index(p mod n)` of epoch `p // n`, batches may straddle epochs."""
    import tensorflow as tf

    length, tensors = examples.length, examples.tensors
    first = start_step * config.batch_size

    def epoch_examples(epoch: Any) -> Any:
        if config.shuffle_buffer <= 1:  # no shuffle asked for: the split's own order, as `shuffle(1)` gives
            return tf.data.Dataset.from_tensor_slices(tensors)
        position = tf.range(length, dtype=tf.int64)
        index = _shuffled_index(position, tf.fill([length], epoch), config.seed, length)
        return tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(lambda t: tf.gather(t, index), tensors))

    options = tf.data.Options()
    options.autotune.enabled = False  # as input_pipeline: nothing to tune, and its thread delays teardown
    return (
        tf.data.Dataset.range(first // length, 2**62)
        .flat_map(epoch_examples)
        .skip(first % length)  # within the first epoch only: fewer than `length` examples
        .batch(config.batch_size, drop_remainder=True)
        .with_options(options)
    )


def _shuffled_index(index: Any, epoch: Any, seed: int, length: int) -> Any:
    """`index_shuffle(index[k], seed=(seed, epoch[k]), max_index=length - 1)` for every k at once.

    The public wrapper cannot take one seed per element (it pads a [n, 2] seed on the wrong axis),
    so the raw op gets the [n, 3] seed the wrapper would build for each [2] seed.
    """
    import tensorflow as tf

    seeds = tf.stack(
        [
            tf.fill(tf.shape(index), tf.constant(_INDEX_SHUFFLE_SEED_PAD, tf.int64)),
            tf.fill(tf.shape(index), tf.constant(seed, tf.int64)),
            epoch,
        ],
        axis=1,
    )
    max_index = tf.fill(tf.shape(index), tf.constant(length - 1, tf.int64))
    return tf.raw_ops.RandomIndexShuffle(index=index, seed=seeds, max_index=max_index, rounds=_ROUNDS)
