"""The partitioned loader's examples/s vs a hand-written tf.data pipeline over the same CSV files.

The files: 10 daily partitions of the synthetic iris-daily dataset
(`write_daily_dataset`, 20,000 rows a day, CSV, local disk): 200,000 rows,
160,000 of them in the train split (every fifth row of a file is eval).

- "loader": `load_partitioned("train", window=<the 10 days>, prefix=...)`
  built and read to the end in batches of 1,024: the listing, each file's
  header and label check, then the stream (`CsvDataset` per file, the five
  columns selected, every fifth row left out, features stacked, label indexed).
- "hand-written": what a person would write for the same examples: the
  sorted files, `CsvDataset` on each through `flat_map` with the same columns,
  the same row filter, the features stacked and the species looked up as a
  class index, batched and read the same way. No listing, no checks.

Both read the same rows (checked: same count, same feature sum). Each case runs
once per round, rounds in a seeded random order, medians taken; examples/s is
the train rows over the median seconds.

How to read it: the ratio is the loader's examples/s over the hand-written
pipeline's; near 1 means the checks and the listing cost little next to reading.
"""

from __future__ import annotations

import glob
import os
import time

from .common import Scratch, fmt, interleaved, median, ratio_table, report

NAME = "data_loader"
DAYS = 10
ROWS_PER_DAY = 20_000
ROUNDS = 7
BATCH = 1024
START = "2026-11-01"


def _hand_written(files: list[str]):
    import tensorflow as tf

    classes = tf.constant(["setosa", "versicolor", "virginica"])
    defaults = [tf.constant([float("nan")], tf.float32)] * 4 + [tf.constant([""], tf.string)]

    def read(path):
        rows = tf.data.experimental.CsvDataset(path, defaults, header=True, select_cols=[0, 1, 2, 3, 4])
        return rows.enumerate().filter(lambda i, row: i % 5 != 4).map(lambda i, row: row)

    def example(a, b, c, d, species):
        return tf.stack([a, b, c, d]), tf.argmax(tf.cast(tf.equal(classes, species), tf.int32), output_type=tf.int32)

    return tf.data.Dataset.from_tensor_slices(files).flat_map(read).map(example)


def _drain(dataset) -> tuple[int, float]:
    """Rows read and the sum of their features (the same sum means the same examples)."""
    rows, total = 0, 0.0
    for features, _ in dataset.batch(BATCH):
        rows += int(features.shape[0])
        total += float(features.numpy().sum())
    return rows, total


def run() -> dict:
    with Scratch(NAME) as scratch:
        return _run(scratch)


def _run(scratch: Scratch) -> dict:
    from prefect_tensorflow.tasks.data.partitioned import load_partitioned
    from prefect_tensorflow.tasks.data.synthetic import write_daily_dataset

    prefix = os.path.join(scratch.path, "iris-daily")
    write_start = time.perf_counter()
    days = write_daily_dataset(prefix, START, DAYS, rows_per_day=ROWS_PER_DAY)
    write_seconds = time.perf_counter() - write_start
    window = {"start": START, "end": str(days[-1].fromordinal(days[-1].toordinal() + 1))}
    files = sorted(glob.glob(os.path.join(prefix, "dt=*", "*.csv")))
    read: dict[str, tuple[int, float]] = {}

    def loader() -> float:
        start = time.perf_counter()
        read["loader"] = _drain(load_partitioned("train", window=window, prefix=prefix))
        return time.perf_counter() - start

    def hand_written() -> float:
        start = time.perf_counter()
        read["hand"] = _drain(_hand_written(files))
        return time.perf_counter() - start

    loader(), hand_written()  # warm-up, untimed (TensorFlow's first graph building)
    rows, _ = read["loader"]
    assert rows == DAYS * ROWS_PER_DAY * 4 // 5, read
    assert read["loader"][0] == read["hand"][0] and abs(read["loader"][1] - read["hand"][1]) < 1e-6 * abs(read["hand"][1]), read
    samples = interleaved({"loader": loader, "hand-written": hand_written}, ROUNDS)
    med = {k: median(v) for k, v in samples.items()}
    rate = {k: rows / v for k, v in med.items()}
    ratio = rate["loader"] / rate["hand-written"]
    table_rows = [
        ["load_partitioned('train', window)", rate["loader"], med["loader"] * 1e3, ratio],
        ["hand-written tf.data (CsvDataset)", rate["hand-written"], med["hand-written"] * 1e3, 1.0],
    ]
    out = {
        "parameters": {"days": DAYS, "rows_per_day": ROWS_PER_DAY, "rounds": ROUNDS, "batch": BATCH},
        "setup": {"write_seconds": write_seconds, "train_rows": rows, "files": len(files)},
        "samples_seconds": samples,
        "median_seconds": med,
        "examples_per_second": rate,
        "ratios": {"loader_over_hand_written": ratio},
    }
    out["table"] = ratio_table(
        f"data_loader: medians of {ROUNDS} interleaved rounds",
        ["case", "examples/s", "median ms", "ratio"],
        table_rows,
        notes=[
            "ratio: examples/s over the hand-written pipeline's.",
            f"{rows:,} train rows of {DAYS} CSV files ({DAYS * ROWS_PER_DAY:,} rows), batches of {BATCH}, local disk.",
            f"files written in {fmt(write_seconds)} s.",
        ],
    )
    return out


if __name__ == "__main__":
    report(NAME, run)
