"""The per-checkpoint fixed cost of a tiny model, measured on its own, against TensorFlow's bare save.

What it measures: the iris training state as `train_with_checkpoints`
checkpoints it, after a few steps, saved again and again into one model dir
(keeping 5), cases interleaved, medians of the time the training thread is
held, in each input mode (`training.input_position`):

- "stateless" (iris today: its length is known): model, Adagrad slots and
  `global_step`; no input iterator (the input at step N is a function of N);
- "iterator, buffer B" (a loader of unknown length, and iris before the
  stateless mode): the same plus the input iterator over
  `repeat().shuffle(B).batch(32)`, for the default buffer (1,000) and 100.

Cases:

- A `tf.train.CheckpointManager(...).save()`: TensorFlow's bare synchronous save;
- B this package's `CheckpointWriter.save()`, async (the default): the snapshot;
  the files, the commit and the keep sweep happen in its background thread;
- C `CheckpointWriter.save()` with `async_save=False`: everything before it returns;
- D (iterator modes) the input iterator's serialization alone (`SerializeIterator`, which B includes).

Reading: `B/A` is the share of a bare save that training still pays; the
stateless B against the iterator B of buffer 1,000 is what the stateless
input order saves per checkpoint (the shuffle buffer's contents no longer
have to be captured at the step, in the training thread).
"""

from __future__ import annotations

from typing import Optional

from .common import Scratch, interleaved, median, ratio_table, report, spread, timed

NAME = "checkpoint_fixed_cost"
SAVES = 40
MODES = {"stateless": None, "iterator, buffer 1000": 1000, "iterator, buffer 100": 100}  # mode: shuffle buffer


def _measure(buffer: Optional[int], scratch: Scratch) -> dict:
    import tensorflow as tf

    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.checkpoints.writer import CheckpointWriter
    from prefect_tensorflow.tasks.configs import TrainingConfig
    from prefect_tensorflow.tasks.training.input_position import positioned_batches, random_access_examples
    from prefect_tensorflow.tasks.training.model_and_data import LossWindow, build_model_and_data, input_pipeline, make_train_step

    config = TrainingConfig(seed=0, shuffle_buffer=buffer or 1000)
    net, train_ds, _ = build_model_and_data(config)
    if buffer is None:
        iterator = iter(positioned_batches(train_ds, config, 0, random_access_examples(train_ds)))
    else:
        iterator = iter(input_pipeline(train_ds, config))
    tag = buffer or "stateless"
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False)
    net.optimizer.build(net.trainable_variables)
    step = make_train_step(net, global_step, LossWindow())
    for _ in range(50):
        step(iterator)

    def checkpoint():
        if buffer is None:
            return tf.train.Checkpoint(model=net, optimizer=net.optimizer, global_step=global_step)
        return tf.train.Checkpoint(model=net, optimizer=net.optimizer, global_step=global_step, input_iterator=iterator)

    manager = tf.train.CheckpointManager(checkpoint(), scratch.fresh(f"bare-{tag}"), max_to_keep=5)
    writers = {
        mode: CheckpointWriter(
            checkpoint(),
            scratch.fresh(f"{mode}-{tag}"),
            CheckpointPolicy(keep_checkpoint_max=5, async_save=mode == "async"),
        )
        for mode in ("async", "sync")
    }
    counter = iter(range(1, 10**6))

    def writer_save(mode: str):
        writer = writers[mode]

        def go() -> float:
            seconds = timed(lambda: writer.save(next(counter)))
            writer.finish()  # outside the timed region: the next save starts from an idle writer
            return seconds

        return go

    def serialize_iterator() -> float:
        resource = iterator._iterator_resource
        return timed(lambda: tf.raw_ops.SerializeIterator(resource_handle=resource, external_state_policy=1))

    cases = {"A": lambda: timed(manager.save), "B": writer_save("async"), "C": writer_save("sync")}
    if buffer is not None:
        cases["D"] = serialize_iterator
    for case in cases.values():  # warm-up: traced functions, learned keys
        case()
    runs = interleaved(cases, SAVES)
    for writer in writers.values():
        writer.finish()
    return {"runs": runs, "median_seconds": {key: median(values) for key, values in runs.items()}}


def run() -> dict:
    results, rows = {}, []
    with Scratch(NAME) as scratch:
        for mode, buffer in MODES.items():
            results[mode] = r = _measure(buffer, scratch)
            med, runs = r["median_seconds"], r["runs"]

            def ms(key: str) -> str:
                return spread([v * 1000 for v in runs[key]])  # noqa: B023 - used at once

            a = med["A"]
            rows += [
                [f"A bare CheckpointManager.save ({mode})", a * 1000, ms("A"), 1.0, "baseline"],
                ["B CheckpointWriter async: save()", med["B"] * 1000, ms("B"), med["B"] / a, "B/A"],
                ["C CheckpointWriter sync: save()", med["C"] * 1000, ms("C"), med["C"] / a, "C/A"],
            ]
            if "D" in med:
                rows.append(["D the iterator's serialization alone", med["D"] * 1000, ms("D"), med["D"] / med["B"], "D/B"])
    stateless_b, iterator_b = (results[m]["median_seconds"]["B"] for m in ("stateless", "iterator, buffer 1000"))
    rows.append(["stateless B / iterator (buffer 1000) B", "-", "-", stateless_b / iterator_b, "B/B"])
    result = {
        "parameters": {"model": "iris", "saves": SAVES, "modes": MODES, "keep_checkpoint_max": 5},
        "by_mode": results,
        "ratios": {
            **{
                f"writer_async_over_bare_manager_{m}": r["median_seconds"]["B"] / r["median_seconds"]["A"]
                for m, r in results.items()
            },
            "stateless_writer_async_over_iterator_buffer_1000": stateless_b / iterator_b,
        },
    }
    result["table"] = ratio_table(
        f"checkpoint_fixed_cost: the training thread's time per save of the iris state, {SAVES} saves per case "
        "interleaved, medians (ms)",
        ["case", "median ms", "min..max ms", "ratio", "ratio is"],
        rows,
        notes=["B includes D in the iterator modes: the input iterator's state is captured at the step, in the training thread."],
    )
    return result


if __name__ == "__main__":
    report(NAME, run)
