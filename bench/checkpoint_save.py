"""Checkpoint save throughput against a raw write of the same bytes; the training-loop stall of a save.

What it measures, on 256 MiB (268 MB) of float32 `tf.Variable`s (4
variables of 64 MiB, random values) held by one `tf.train.Checkpoint`, every
case run in the same process with repetitions interleaved (a seeded random
order each round) and the median taken:

(a) `tf.train.Checkpoint.write(prefix)` to a fresh local temp dir, against
(b) a raw write of the same bytes: the variables' numpy buffers written with
    plain unbuffered Python file writes into a temporary name, then
    `os.replace` to the final name. Neither side fsyncs: TensorFlow's
    checkpoint writer does not call fsync/fdatasync (checked with
    `strace -e trace=fsync,fdatasync`: it only writes `<prefix>_temp/...`
    files and renames them), so both measure writing into the page cache
    plus whatever writeback the kernel starts meanwhile, not durability.
    Reading: MB/s of each (MB = 10**6 bytes of variable payload) and
    `checkpoint/raw` = raw time / checkpoint time, i.e. the fraction of raw
    write throughput a checkpoint achieves. 1.0 means TensorFlow adds nothing
    over writing the bytes; 0.5 means a checkpoint takes twice as long.

(c) `tf.train.CheckpointManager(...).save()` synchronous against the same
    save with `CheckpointOptions(experimental_enable_async_checkpoint=True)`
    (each on its own `tf.train.Checkpoint` of the same variables, each save
    into a fresh dir). Blocking time is until `save()` returns; for async
    also the time until `checkpoint.sync()` returns (the files and the
    `checkpoint` state file are written). Reading: `async_blocking/sync` is
    the share of a synchronous save's stall that an async save leaves inside
    `save()`; `async_complete/sync` above 1.0 is the extra cost of the async
    machinery when nothing overlaps it.

(c') the first update of every variable (`assign_add`, one "training step")
    right after the sync save, and right after the async save's `sync()`.
    The async save's host-side twins share the variables' buffers instead of
    copying them, so the copy is paid by the next write to the variables
    (copy-on-write), outside `save()`. Reading: `async/sync first update` is
    how much dearer that first step is; `stall = blocking + first update`
    is what a training loop really waits for per save, async over sync
    (below 1.0 means async saves the loop time).

(d) this package's `CheckpointWriter` (what `train_with_checkpoints` uses),
    async and sync, each followed at once by the first update (for async,
    while the background thread writes): `stall = save() + first update -
    a plain update` is what the loop waits for per save. Baseline: (e) one
    in-memory copy of the same variables (`numpy.copy` of each buffer), the
    floor of any snapshot on a CPU; the issue's goal is stall <= 1.5 x (e).

(f) `tf.train.Checkpoint.write` with
    `CheckpointOptions(experimental_sharding_callback=MaxShardSizePolicy(...))`
    (TensorFlow's sharding option: several `.data-*` shards) against the same
    raw write as (b), to see whether sharding buys write throughput.

(g) this package's write path (`CheckpointWriter`'s: `bundle.write_bundle`
    into `<prefix>_temp/`, then TensorFlow's `MergeV2Checkpoints`) of one
    snapshot of the same variables, against the raw write (b): the issue-23
    figure `project/raw` (goal >= 0.8). And both durable, as `durable_commit`
    (the default) does: (g') the write, then every checkpoint file and the
    directory fsynced, against (b') the raw write, the file fsynced, renamed,
    the directory fsynced. A durable write sends the data file around the page
    cache (`O_DIRECT`, `storage.direct_io`); (g'') is the same durable write
    through the page cache, side by side: wall time and the process's CPU time
    (all its threads) of each.

One untimed warm-up of each case comes first (TensorFlow builds its save
functions and the async helper its variable twins on the first call).
Temp dirs are removed after every repetition (outside the timed region).
"""

from __future__ import annotations

import os
import shutil
import time

from .common import Scratch, fmt, interleaved, median, ratio_table, report, spread, timed

NAME = "checkpoint_save"
SHARD_BYTES = 32 * 1024 * 1024
NUM_VARIABLES = 4
FLOATS_PER_VARIABLE = 16 * 1024 * 1024  # 64 MiB of float32 each
ROUNDS = 7
MB = 1e6


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def run() -> dict:
    import tensorflow as tf

    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.checkpoints.writer import CheckpointWriter, _Recipe
    from prefect_tensorflow.tasks.storage.local import fsync_directory, fsync_entries

    tf.random.set_seed(0)
    variables = [
        tf.Variable(tf.random.uniform([FLOATS_PER_VARIABLE], dtype=tf.float32), name=f"w{i}") for i in range(NUM_VARIABLES)
    ]
    arrays = [v.numpy() for v in variables]  # the same bytes, already in host memory
    payload = sum(a.nbytes for a in arrays)
    assert payload >= 200 * MB, payload

    ckpt_write = tf.train.Checkpoint(variables=variables)
    ckpt_sync = tf.train.Checkpoint(variables=variables)
    ckpt_async = tf.train.Checkpoint(variables=variables)
    ones = [tf.ones_like(v) for v in variables]
    async_options = tf.train.CheckpointOptions(experimental_enable_async_checkpoint=True)
    sizes: dict[str, int] = {}

    with Scratch(NAME) as scratch:

        def checkpoint_write() -> float:
            d = scratch.fresh("write")
            seconds = timed(lambda: ckpt_write.write(os.path.join(d, "ckpt")))
            sizes["checkpoint_files"] = _dir_bytes(d)
            shutil.rmtree(d)
            return seconds

        def raw_write(durable: bool = False) -> float:
            d = scratch.fresh("raw")
            tmp, final = os.path.join(d, "raw.tmp"), os.path.join(d, "raw.data")

            def write() -> None:
                with open(tmp, "wb", buffering=0) as handle:
                    for array in arrays:
                        view = memoryview(array).cast("B")
                        while view:
                            view = view[handle.write(view) :]
                    if durable:
                        os.fsync(handle.fileno())
                os.replace(tmp, final)
                if durable:
                    fsync_directory(d)

            seconds = timed(write)
            sizes["raw_file"] = os.path.getsize(final)
            shutil.rmtree(d)
            return seconds

        recipe = _Recipe.learn(tf.train.Checkpoint(variables=variables))

        write_cpu: dict[str, list[float]] = {"direct": [], "cached": []}

        def project_write(durable: bool = False, direct: bool = True) -> float:
            d = scratch.fresh("project")
            snapshot = recipe.snapshot()  # the training thread's part, not the write

            def write() -> None:
                recipe.write(os.path.join(d, "ckpt-1"), snapshot, durable=durable and direct)
                if durable:  # as CheckpointWriter._write with durable_commit
                    fsync_entries([os.path.join(d, f) for f in os.listdir(d) if f.startswith("ckpt-1.")])
                    fsync_directory(d)

            cpu = time.process_time()
            seconds = timed(write)
            if durable:
                write_cpu["direct" if direct else "cached"].append(time.process_time() - cpu)
            sizes["project_files"] = _dir_bytes(d)
            assert tf.train.load_checkpoint(os.path.join(d, "ckpt-1")).get_tensor(
                "variables/0/.ATTRIBUTES/VARIABLE_VALUE"
            ).shape == (FLOATS_PER_VARIABLE,)
            shutil.rmtree(d)
            return seconds

        def update_all() -> float:
            # One "training step" touching every variable, as the loop after a save would.
            def update() -> None:
                for variable, one in zip(variables, ones):
                    variable.assign_add(one)
                _ = [float(v[0]) for v in variables]  # wait for the ops to finish

            return timed(update)

        def manager_sync() -> dict:
            d = scratch.fresh("sync")
            manager = tf.train.CheckpointManager(ckpt_sync, d, max_to_keep=1)
            seconds = timed(manager.save)
            update = update_all()
            assert tf.train.latest_checkpoint(d) is not None
            shutil.rmtree(d)
            return {"blocking": seconds, "first_update": update}

        def manager_async() -> dict:
            d = scratch.fresh("async")
            manager = tf.train.CheckpointManager(ckpt_async, d, max_to_keep=1)
            start = time.perf_counter()
            manager.save(options=async_options)
            returned = time.perf_counter()
            ckpt_async.sync()
            done = time.perf_counter()
            # sync() waited for the data, the index and the state file (a write callback)
            assert tf.train.latest_checkpoint(d) is not None, "async save not committed after sync()"
            update = update_all()
            shutil.rmtree(d)
            return {"blocking": returned - start, "complete": done - start, "first_update": update}

        sharded_options = tf.train.CheckpointOptions(
            experimental_sharding_callback=tf.train.experimental.MaxShardSizePolicy(max_shard_size=SHARD_BYTES)
        )

        def sharded_write() -> float:
            d = scratch.fresh("sharded")
            seconds = timed(lambda: ckpt_write.write(os.path.join(d, "ckpt"), options=sharded_options))
            sizes["sharded_files"] = _dir_bytes(d)
            sizes["sharded_data_files"] = sum(".data-" in f for f in os.listdir(d))
            shutil.rmtree(d)
            return seconds

        def memcpy() -> float:
            return timed(lambda: [array.copy() for array in arrays])

        def writer(async_save: bool):
            policy = CheckpointPolicy(keep_checkpoint_max=1, async_save=async_save)
            step = iter(range(1, 10**6))

            def go() -> dict:
                d = scratch.fresh("writer-async" if async_save else "writer-sync")
                ckpt = tf.train.Checkpoint(variables=variables)
                w = CheckpointWriter(ckpt, d, policy)
                w.save(0)  # learns the keys (once per writer, as once per training run)
                w.finish()
                start = time.perf_counter()
                w.save(next(step))
                returned = time.perf_counter()
                update = update_all()
                w.finish()
                done = time.perf_counter()
                assert tf.train.latest_checkpoint(d) is not None
                shutil.rmtree(d)
                return {"blocking": returned - start, "first_update": update, "complete": done - start}

            return go

        for warm in (checkpoint_write, raw_write, manager_sync, manager_async, sharded_write, writer(True), writer(False)):
            warm()
        for warm in (project_write, lambda: raw_write(durable=True)):
            warm()
        ab = interleaved(
            {
                "checkpoint": checkpoint_write,
                "raw": raw_write,
                "sharded": sharded_write,
                "project": project_write,
                "project_durable": lambda: project_write(durable=True),
                "project_durable_cached": lambda: project_write(durable=True, direct=False),
                "raw_durable": lambda: raw_write(durable=True),
            },
            ROUNDS,
        )
        sa = interleaved({"sync": manager_sync, "async": manager_async}, ROUNDS)
        wr = interleaved({"async": writer(True), "sync": writer(False), "memcpy": memcpy, "plain_update": update_all}, ROUNDS)

    t_ckpt, t_raw, t_sharded = median(ab["checkpoint"]), median(ab["raw"]), median(ab["sharded"])
    t_memcpy, t_plain = median(wr["memcpy"]), median(wr["plain_update"])
    t_project, t_project_durable, t_raw_durable = (median(ab[k]) for k in ("project", "project_durable", "raw_durable"))
    t_project_cached = median(ab["project_durable_cached"])
    cpu_direct, cpu_cached = median(write_cpu["direct"]), median(write_cpu["cached"])
    writer_stall = {k: [s["blocking"] + s["first_update"] - t_plain for s in wr[k]] for k in ("async", "sync")}
    writer_complete = {k: median(s["complete"] for s in wr[k]) for k in ("async", "sync")}
    w_async, w_sync = median(writer_stall["async"]), median(writer_stall["sync"])
    samples = {
        "checkpoint_write": ab["checkpoint"],
        "raw_write": ab["raw"],
        "project_write": ab["project"],
        "project_write_durable": ab["project_durable"],
        "raw_write_durable": ab["raw_durable"],
        "project_write_durable_cached": ab["project_durable_cached"],
        "project_write_durable_cpu": write_cpu["direct"],
        "project_write_durable_cached_cpu": write_cpu["cached"],
        "sync_blocking": [s["blocking"] for s in sa["sync"]],
        "sync_first_update": [s["first_update"] for s in sa["sync"]],
        "async_blocking": [s["blocking"] for s in sa["async"]],
        "async_complete": [s["complete"] for s in sa["async"]],
        "async_first_update": [s["first_update"] for s in sa["async"]],
        "sync_stall": [s["blocking"] + s["first_update"] for s in sa["sync"]],
        "async_stall": [s["blocking"] + s["first_update"] for s in sa["async"]],
    }
    med = {key: median(values) for key, values in samples.items()}
    mbps = lambda seconds: payload / MB / seconds  # noqa: E731

    result = {
        "parameters": {
            "variables": NUM_VARIABLES,
            "floats_per_variable": FLOATS_PER_VARIABLE,
            "payload_bytes": payload,
            "rounds": ROUNDS,
            "fsync": False,
        },
        "file_bytes": sizes,
        "samples_seconds": samples,
        "median_seconds": med,
        "mb_per_s": {
            "checkpoint_write": mbps(t_ckpt),
            "raw_write": mbps(t_raw),
            "project_write": mbps(t_project),
            "project_write_durable": mbps(t_project_durable),
            "raw_write_durable": mbps(t_raw_durable),
            "manager_save_sync": mbps(med["sync_blocking"]),
            "manager_save_async_complete": mbps(med["async_complete"]),
        },
        "ratios": {
            "checkpoint_over_raw_throughput": t_raw / t_ckpt,
            "project_over_raw_throughput": t_raw / t_project,
            "project_durable_over_raw_durable_throughput": t_raw_durable / t_project_durable,
            "direct_over_cached_durable_throughput": t_project_cached / t_project_durable,
            "direct_over_cached_durable_cpu": cpu_direct / cpu_cached,
            "async_blocking_over_sync_blocking": med["async_blocking"] / med["sync_blocking"],
            "async_complete_over_sync_blocking": med["async_complete"] / med["sync_blocking"],
            "async_first_update_over_sync_first_update": med["async_first_update"] / med["sync_first_update"],
            "async_stall_over_sync_stall": med["async_stall"] / med["sync_stall"],
            "sharded_over_raw_throughput": t_raw / t_sharded,
            "sharded_over_unsharded_throughput": t_ckpt / t_sharded,
            "writer_async_stall_over_memcpy": w_async / t_memcpy,
            "writer_async_stall_over_writer_sync_stall": w_async / w_sync,
            "writer_async_stall_over_tf_sync_stall": w_async / med["sync_stall"],
        },
        "writer": {
            "memcpy_seconds": t_memcpy,
            "plain_update_seconds": t_plain,
            "async_stall_seconds": w_async,
            "sync_stall_seconds": w_sync,
            "async_complete_seconds": writer_complete["async"],
            "sync_complete_seconds": writer_complete["sync"],
            "samples": wr,
        },
        "shard_bytes": SHARD_BYTES,
    }
    r = result["ratios"]
    result["table"] = ratio_table(
        f"checkpoint_save: {payload / MB:.0f} MB of float32 in {NUM_VARIABLES} tf.Variables, "
        f"{ROUNDS} interleaved rounds, medians, no fsync on either side",
        ["case", "median s", "min..max s", "MB/s", "ratio", "ratio is"],
        [
            ["(b) raw file write + rename", t_raw, spread(ab["raw"]), mbps(t_raw), 1.0, "baseline"],
            [
                "(a) tf.train.Checkpoint.write",
                t_ckpt,
                spread(ab["checkpoint"]),
                mbps(t_ckpt),
                r["checkpoint_over_raw_throughput"],
                "checkpoint/raw throughput",
            ],
            [
                "(g) project write path (bundle + merge)",
                t_project,
                spread(ab["project"]),
                mbps(t_project),
                r["project_over_raw_throughput"],
                "project/raw throughput (goal >= 0.8)",
            ],
            [
                "(b') raw write, fsync, rename, fsync dir",
                t_raw_durable,
                spread(ab["raw_durable"]),
                mbps(t_raw_durable),
                1.0,
                "baseline",
            ],
            [
                "(g') project write path + fsyncs",
                t_project_durable,
                spread(ab["project_durable"]),
                mbps(t_project_durable),
                r["project_durable_over_raw_durable_throughput"],
                "durable project/raw throughput",
            ],
            [
                "(g'') (g') through the page cache",
                t_project_cached,
                spread(ab["project_durable_cached"]),
                mbps(t_project_cached),
                r["direct_over_cached_durable_throughput"],
                "O_DIRECT/page-cache durable throughput",
            ],
            [
                "(c) manager.save() sync: blocking",
                med["sync_blocking"],
                spread(samples["sync_blocking"]),
                mbps(med["sync_blocking"]),
                1.0,
                "baseline",
            ],
            [
                "(c) manager.save() async: blocking",
                med["async_blocking"],
                spread(samples["async_blocking"]),
                "-",
                r["async_blocking_over_sync_blocking"],
                "async_blocking/sync_blocking",
            ],
            [
                "(c) async: until sync() returns",
                med["async_complete"],
                spread(samples["async_complete"]),
                mbps(med["async_complete"]),
                r["async_complete_over_sync_blocking"],
                "async_complete/sync_blocking",
            ],
            [
                "(c') first update after sync save",
                med["sync_first_update"],
                spread(samples["sync_first_update"]),
                "-",
                1.0,
                "baseline",
            ],
            [
                "(c') first update after async save",
                med["async_first_update"],
                spread(samples["async_first_update"]),
                "-",
                r["async_first_update_over_sync_first_update"],
                "async/sync first update",
            ],
            [
                "(c') stall = blocking + first update",
                med["async_stall"],
                spread(samples["async_stall"]),
                "-",
                r["async_stall_over_sync_stall"],
                "async/sync (sync: " + fmt(med["sync_stall"]) + " s)",
            ],
            [
                f"(f) Checkpoint.write, {SHARD_BYTES // 2**20} MiB shards",
                t_sharded,
                spread(ab["sharded"]),
                mbps(t_sharded),
                r["sharded_over_raw_throughput"],
                "sharded/raw throughput",
            ],
            ["(e) one in-memory copy (numpy.copy)", t_memcpy, spread(wr["memcpy"]), mbps(t_memcpy), 1.0, "baseline"],
            [
                "(d) CheckpointWriter sync: stall",
                w_sync,
                spread(writer_stall["sync"]),
                "-",
                w_sync / t_memcpy,
                "stall/memcpy",
            ],
            [
                "(d) CheckpointWriter async: stall",
                w_async,
                spread(writer_stall["async"]),
                "-",
                r["writer_async_stall_over_memcpy"],
                "stall/memcpy (goal <= 1.5)",
            ],
            [
                "(d) CheckpointWriter async: committed",
                writer_complete["async"],
                "-",
                mbps(writer_complete["async"]),
                writer_complete["async"] / writer_complete["sync"],
                "async/sync complete",
            ],
        ],
        notes=[
            f"(g) checkpoint files {fmt(sizes.get('project_files', 0) / MB)} MB; (g') and (b') fsync as durable_commit does.",
            f"(g') process CPU per durable write: O_DIRECT {fmt(cpu_direct)} s, through the page cache (g'') "
            f"{fmt(cpu_cached)} s: {fmt(cpu_direct / cpu_cached)} of it.",
            f"(d) stall = save() + the first update after it - a plain update ({fmt(t_plain)} s);"
            f" async/TF-sync stall {fmt(r['writer_async_stall_over_tf_sync_stall'])}.",
            f"(f) sharded write: {sizes.get('sharded_data_files', 0)} data files;"
            f" sharded/unsharded throughput {fmt(r['sharded_over_unsharded_throughput'])} (adopt if >= 1.5).",
            f"checkpoint files {fmt(sizes.get('checkpoint_files', 0) / MB)} MB, raw file "
            f"{fmt(sizes.get('raw_file', 0) / MB)} MB (MB = 10**6 bytes; MB/s counts variable payload).",
            "first update = one assign_add to every variable right after the save (sync) or after",
            "sync() (async): the async save's host copy aliases the variables' buffers, so the copy",
            "is paid by the next write to them (copy-on-write), not inside save().",
        ],
    )
    return result


if __name__ == "__main__":
    report(NAME, run)
