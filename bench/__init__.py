"""Benchmarks of prefect-tensorflow: `python -m bench` runs them all, `python -m bench NAME` one.

Every figure is a ratio of two things measured side by side in the same
process (repetitions interleaved, medians taken), never an absolute time held
against a threshold: the machines this runs on are small and noisy. Each
benchmark prints a plain-text table and writes `bench/results/<name>.json`.

Benchmarks:
    checkpoint_save     tf.train.Checkpoint write (and sharded) vs a raw write of the same bytes;
                        the loop's stall per save (CheckpointWriter, TF sync/async) vs one memcpy.
    training_overhead   train_with_checkpoints() steps/s with a checkpoint every 100 steps vs none,
                        per evaluation mode (sidecar, in-loop, none) and save mode (async, sync).
    checkpoint_fixed_cost  the training thread's time per save of the tiny iris state: the writer
                        vs TensorFlow's bare CheckpointManager.save, and the input iterator's share.
    large_model         the same on a 100 MB model whose step is >= 50 ms, a checkpoint every 20 steps.
    fsync               durable commits (fsync before the state file names a checkpoint) vs none: steps/s on
                        iris and on the ~100 MB model, async and sync saves, ms per commit.
    progress_bar        train_with_checkpoints() with the CLI's progress bar vs without.
    train_call          the whole train_with_checkpoints() call vs its loop (sidecar evaluation);
                        the CLI train's loop vs the library's, fresh processes.
    first_run           the first train_with_checkpoints() in a fresh process vs a warm one, and why.
    select_latest       select_latest_checkpoint on 10,000 checkpoints vs 1.
    export              export_saved_model() and freeze_graph() of a checkpoint vs a bare tf.saved_model.save.
    mlflow_logging      train_with_checkpoints() tracked in MLflow (metrics sent in batches) vs not.
    mlflow_register     register_model_version() vs mlflow.tensorflow.log_model(registered_model_name=...).
    retrain_flow        the retrain flow's wall time vs a plain script making the same TF and MLflow calls.
    export_run          an export-checkpoint run created through a real server, to its registered
                        version, vs the same work in-process.
    remote_storage      publishing a checkpoint to an S3 server vs plain put_object of its files;
                        select_latest_checkpoint on 10,000 remote checkpoints vs 1.
    sweep               4 candidates on 2 Dask workers vs one after another; Prefect+Dask overhead.
    multi_worker        steps/s of 2 MultiWorkerMirroredStrategy workers vs 1 process.
    serving_check       the serving check on iris and the ~100 MB model: a cold load in a fresh process and
                        `mlflow models serve` (ready time, REST p50/p99) vs an in-process load and call.
    flow_start          loading the deployments' flow modules (what every deployment run pays first)
                        vs the same with the MLflow client loaded, as before it was imported lazily.
    gate                gate_champion() with the champion's outcomes cached vs both versions scored.
    data_manifest       the manifest and digest of a window of 10,000 partition files on S3 vs listing them.
    data_loader         the partitioned loader's examples/s vs a hand-written tf.data pipeline, same CSV files.
    cancel              Cancel to the final state of a served retrain mid-training vs a plain served flow.
    many_runs           20 export-checkpoint runs queued at once through serve --limit 4 vs one run alone:
                        runs/minute and the ratio to 20 runs one after another.
"""

import os

# TensorFlow reads its C++ log level when it loads; every benchmark imports it later.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BENCHMARKS = (
    "checkpoint_save",
    "training_overhead",
    "checkpoint_fixed_cost",
    "large_model",
    "fsync",
    "progress_bar",
    "train_call",
    "first_run",
    "select_latest",
    "export",
    "mlflow_logging",
    "mlflow_register",
    "retrain_flow",
    "export_run",
    "remote_storage",
    "sweep",
    "multi_worker",
    "flow_start",
    "serving_check",
    "gate",
    "data_manifest",
    "data_loader",
    "cancel",
    "many_runs",
)
