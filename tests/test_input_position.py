"""The input position as a function of (seed, step): the stateless mode for data of known length,
the iterator mode for the rest, and model dirs written in the iterator mode keep it on resume."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import final_weights, train

from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
from prefect_tensorflow.tasks.checkpoints.restore import checkpoint_keys
from prefect_tensorflow.tasks.configs import TrainingConfig

EVERY_50 = CheckpointPolicy(save_checkpoints_steps=50, keep_checkpoint_max=None)
ITERATOR_KEY = "input_iterator/.ATTRIBUTES/ITERATOR_STATE"


def _batches(dataset, count):
    return [tuple(t.numpy() for t in batch) for batch in dataset.take(count)]


def test_the_batch_at_step_n_is_built_at_n_and_every_epoch_is_a_permutation():
    """7 examples, batches of 3 (epochs straddle batches): the pipeline built at step 5 gives what the one
    built at step 0 gives from its 6th batch on; each epoch holds every example once; epochs differ."""
    import tensorflow as tf

    from prefect_tensorflow.tasks.training.input_position import positioned_batches, random_access_examples

    data = tf.data.Dataset.from_tensor_slices((tf.range(7, dtype=tf.float32) * 10, tf.range(7)))
    examples = random_access_examples(data)
    assert examples is not None and examples.length == 7
    config = TrainingConfig(batch_size=3, seed=11)
    from_start = _batches(positioned_batches(data, config, 0, examples), 14)
    at_five = _batches(positioned_batches(data, config, 5, examples), 9)
    for got, want in zip(at_five, from_start[5:], strict=True):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    labels = np.concatenate([b[1] for b in from_start])  # 42 positions: 6 epochs
    epochs = labels.reshape(6, 7)
    assert all(sorted(epoch) == list(range(7)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1, "every epoch in the same order"
    np.testing.assert_array_equal(np.concatenate([b[0] for b in from_start]), labels * 10.0)  # rows stay whole
    other_seed = _batches(positioned_batches(data, config.model_copy(update={"seed": 12}), 0, examples), 14)
    assert not np.array_equal(np.concatenate([b[1] for b in other_seed]), labels)


def test_data_without_a_known_length_or_too_big_for_memory_takes_the_iterator_mode():
    import tensorflow as tf

    from prefect_tensorflow.tasks.training.input_position import random_access_examples

    data = tf.data.Dataset.range(100)
    assert random_access_examples(data.repeat()) is None  # infinite
    assert random_access_examples(data.filter(lambda x: True)) is None  # unknown
    generated = tf.data.Dataset.from_generator(lambda: iter([1]), output_signature=tf.TensorSpec([], tf.int32))
    assert random_access_examples(generated) is None
    assert random_access_examples(data, max_bytes=799) is None  # 100 int64s are 800 bytes
    assert random_access_examples(data, max_bytes=800) is not None


def test_a_stateless_training_checkpoints_no_iterator_and_resumes_at_its_step_bit_identical(tmp_path):
    """Trained to 100, then on to 200, ends with the weights of a training straight to 200; its checkpoints
    hold no `input_iterator`."""
    stopped = tmp_path / "stopped"
    train(stopped, steps=100, policy=EVERY_50, evaluation="none")
    assert ITERATOR_KEY not in checkpoint_keys(str(stopped / "model.ckpt-100"))
    resumed = train(stopped, steps=200, policy=EVERY_50, evaluation="none")
    assert (resumed.start_step, resumed.final_step) == (100, 200)
    straight = tmp_path / "straight"
    train(straight, steps=200, policy=EVERY_50, evaluation="none")
    stopped_weights, straight_weights = final_weights(stopped, 200), final_weights(straight, 200)
    assert stopped_weights.keys() == straight_weights.keys()
    for name, value in straight_weights.items():
        np.testing.assert_array_equal(stopped_weights[name], value, err_msg=name)


def test_data_of_unknown_length_keeps_the_iterator_in_its_checkpoints(tmp_path):
    result = train(tmp_path / "m", steps=50, policy=EVERY_50, evaluation="none", data="position_loaders:iris_unknown_length")
    assert ITERATOR_KEY in checkpoint_keys(result.last_checkpoint)


def test_a_model_dir_written_with_the_iterator_resumes_with_it(tmp_path):
    """A step-0 checkpoint holding `input_iterator` (as every single-process checkpoint did before the
    stateless mode) is resumed in the iterator mode: the run ends bit-identical to one trained in that
    mode from the start (the same iris examples through a loader of unknown length), its checkpoints
    keep the iterator, and it differs from the stateless order."""
    import tensorflow as tf

    from prefect_tensorflow.tasks.training.model_and_data import build_model_and_data, input_pipeline

    config = TrainingConfig(steps=100, policy=EVERY_50, evaluation="none")
    net, train_ds, _ = build_model_and_data(config)
    net.optimizer.build(net.trainable_variables)
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False)
    iterator = iter(input_pipeline(train_ds, config))
    old = tf.train.Checkpoint(model=net, optimizer=net.optimizer, global_step=global_step, input_iterator=iterator)
    manager = tf.train.CheckpointManager(old, str(tmp_path / "old"), max_to_keep=None, checkpoint_name="model.ckpt")
    manager.save(checkpoint_number=0)

    resumed = train(tmp_path / "old", steps=100, policy=EVERY_50, evaluation="none")
    assert (resumed.start_step, resumed.final_step) == (0, 100)
    assert ITERATOR_KEY in checkpoint_keys(resumed.last_checkpoint)
    iterator_mode = tmp_path / "iterator"
    train(iterator_mode, steps=100, policy=EVERY_50, evaluation="none", data="position_loaders:iris_unknown_length")
    stateless = tmp_path / "stateless"
    train(stateless, steps=100, policy=EVERY_50, evaluation="none")
    old_weights, iterator_weights = final_weights(tmp_path / "old", 100), final_weights(iterator_mode, 100)
    for name, value in iterator_weights.items():
        np.testing.assert_array_equal(old_weights[name], value, err_msg=name)
    stateless_weights = final_weights(stateless, 100)
    assert any(not np.array_equal(stateless_weights[name], value) for name, value in iterator_weights.items())


def test_a_resume_positions_the_input_without_reading_the_batches_before_it():
    """O(1) positioning: a resume far ahead (step 10**9 of a 120-example split) builds its first batch from
    the same (seed, epoch) permutation the uninterrupted run would use, without iterating up to it."""
    import tensorflow as tf

    from prefect_tensorflow.tasks.iris import load_dataset
    from prefect_tensorflow.tasks.training.input_position import positioned_batches, random_access_examples

    data = load_dataset("train")
    examples = random_access_examples(data)
    batch_size = 32
    config = TrainingConfig(batch_size=batch_size, seed=3)
    step = 10**9
    (features, labels) = next(iter(positioned_batches(data, config, step, examples)))
    positions = step * batch_size + np.arange(batch_size)
    index = [int(tf.random.experimental.index_shuffle(int(p % 120), [3, int(p // 120)], 119)) for p in positions]
    np.testing.assert_array_equal(labels.numpy(), examples.tensors[1].numpy()[index])
    np.testing.assert_array_equal(features.numpy(), examples.tensors[0].numpy()[index])


@pytest.mark.parametrize("file_format", ["csv", "tfrecord"])
def test_the_partitioned_loader_says_the_length_of_its_streamed_files(tmp_path, file_format):
    """CSV and TFRecord files are streamed (a `flat_map`, length unknown to tf.data): the loader counts
    each split's rows while checking the files, so both splits say their length and train stateless."""
    from prefect_tensorflow.tasks.data.partitioned import load_partitioned
    from prefect_tensorflow.tasks.data.synthetic import write_daily_dataset
    from prefect_tensorflow.tasks.training.input_position import random_access_examples

    write_daily_dataset(str(tmp_path), "2026-11-28", 3, rows_per_day=10, format=file_format)
    for split in ("train", "eval"):
        dataset = load_partitioned(split, prefix=str(tmp_path), format=file_format)
        rows = sum(1 for _ in dataset)
        assert int(dataset.cardinality()) == rows > 0, split
    examples = random_access_examples(load_partitioned("train", prefix=str(tmp_path), format=file_format))
    assert examples is not None and examples.length == 24  # 3 days x 10 rows, every fifth row is eval
