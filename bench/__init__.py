"""Benchmarks of prefect-tensorflow: `python -m bench` runs them all, `python -m bench NAME` one.

Every figure is a ratio of two things measured side by side in the same
process (repetitions interleaved, medians taken), never an absolute time held
against a threshold: the machines this runs on are small and noisy. Each
benchmark prints a plain-text table and writes `bench/results/<name>.json`.

Benchmarks:
    checkpoint_save     tf.train.Checkpoint write vs a raw write of the same bytes;
                        sync vs async CheckpointManager.save blocking time.
    training_overhead   train() steps/s with a checkpoint every 100 steps vs none.
    select_latest       find_latest_checkpoint on 10,000 checkpoints vs 1.
    export              export() and freeze() of a checkpoint vs a bare tf.saved_model.save.
    mlflow_logging      train() with per-step MLflow metric logging (train_tracked) vs without.
    mlflow_register     register_export() vs mlflow.tensorflow.log_model(registered_model_name=...).
    retrain_flow        the retrain flow's wall time vs a plain script making the same TF and MLflow calls.
    export_run          an export-checkpoint run created through a real server, to its registered
                        version, vs the same work in-process.
"""

import os

# TensorFlow reads its C++ log level when it loads; every benchmark imports it later.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BENCHMARKS = (
    "checkpoint_save", "training_overhead", "select_latest", "export", "mlflow_logging", "mlflow_register",
    "retrain_flow", "export_run",
)
