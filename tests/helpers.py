"""Short spellings of the plain functions for the tests: keyword arguments instead of configs.

`train(model_dir, steps=300, policy=...)` is
`train_with_checkpoints(model_dir, TrainingConfig(steps=300, policy=...))`, and so on.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect_tensorflow.tasks.configs import ExportConfig, TrainingConfig
from prefect_tensorflow.tasks.export.frozen_graph import freeze_graph
from prefect_tensorflow.tasks.export.saved_model import export_saved_model
from prefect_tensorflow.tasks.training.loop import train_with_checkpoints


def train(model_dir, *, tracking=None, on_progress=None, on_checkpoint=None, **config: Any):
    return train_with_checkpoints(
        str(model_dir), TrainingConfig(**config), tracking, on_progress=on_progress, on_checkpoint=on_checkpoint
    )


def export(checkpoint, export_base, **config: Any):
    return export_saved_model(str(checkpoint), str(export_base), ExportConfig(**config))


def freeze(source, output, *, as_text: bool = False, **config: Any):
    return freeze_graph(str(source), str(output), ExportConfig(**config), as_text=as_text)


def register_export(export_result, name, *, connection=None, **kwargs: Any):
    from prefect_tensorflow.tasks.registry.model_versions import register_model_version

    return register_model_version(export_result, name, connection, **kwargs)


def cli_command(*args: object) -> list[str]:
    """The `prefect-tensorflow` command line run by this interpreter: `cli_command("train", "--steps", 5)`."""
    return [sys.executable, "-m", "prefect_tensorflow.flows.cli", *map(str, args)]


def run_and_kill(cmd: list[str], env: dict, when: Callable[[], bool], *, timeout: float = 120.0, poll: float = 0.002) -> bool:
    """Start `cmd`; SIGKILL it as soon as `when()` is true (checked every `poll` s). False if it finished first.

    Example: `run_and_kill(train_cmd, env, lambda: committed_step(model_dir) >= 100)`.
    """
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                assert proc.returncode == 0, err[-3000:]
                return False
            if when():
                proc.kill()
                proc.wait()
                assert proc.returncode == -signal.SIGKILL
                return True
            time.sleep(poll)
        raise AssertionError("the subprocess did not reach the kill point in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def iris_eval_io(saved_model: str, rows: int = 30) -> tuple[dict, dict]:
    """The iris eval features (`rows` of them) as serving inputs, and what `saved_model` answers on them here."""
    import numpy as np

    from prefect_tensorflow.tasks import iris
    from prefect_tensorflow.tasks.export.verification import run_saved_model

    features = np.stack([x.numpy() for x, _ in iris.load_dataset("eval").take(rows)]).astype(np.float32)
    return {"features": features}, run_saved_model(saved_model, [features], input_names=["features"])


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def lock_released(lock: Path) -> bool:
    """Whether no process holds the `flock` on the lease file `lock` and it names no holder (missing: released).

    A trainer's lock file stays in its model dir after the training, emptied and unlocked.
    """
    import fcntl

    if not lock.exists():
        return True
    with open(lock, "rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return handle.read() == b""


def final_weights(model_dir: Path, step: int) -> dict[str, Any]:
    """The variables of `model_dir`'s newest checkpoint (checksums verified), which must be at `step`: what two
    trainings that should end bit-identical are compared on (the save counter left out)."""
    import tensorflow as tf

    from prefect_tensorflow.tasks.checkpoints.selection import select_latest_checkpoint

    ref = select_latest_checkpoint(model_dir, verify_checksums=True)
    assert ref.step == step, (ref.path, step)
    reader = tf.train.load_checkpoint(ref.path)
    return {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if name.endswith("VARIABLE_VALUE") and not name.startswith("save_counter")
    }


def sweep_trainer_of(model_dir: str | Path):
    """The sweep trainer process (started or forked: a forked one shows the trainer's command line) holding
    `model_dir`'s training lock, or None."""
    import psutil

    from prefect_tensorflow.tasks.training.sweep_candidates import LOCK_FILE, TRAINER_MODULE

    lock = str(Path(model_dir) / LOCK_FILE)
    for process in psutil.process_iter(["cmdline"]):
        try:
            if TRAINER_MODULE in (process.info["cmdline"] or []) and any(f.path == lock for f in process.open_files()):
                return process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None
