"""Disk faults for real, through the command line, on small file systems the tests mount (tmpfs, as root):

- a disk that fills up while training writes a checkpoint, a SavedModel version or a frozen graph: exit 2 and one
  line naming the path and what was being written (no TensorFlow op names), earlier checkpoints and versions intact
  and usable, nothing partial left, no child process (the sidecar evaluator) left behind;
- a model dir that refuses new entries mid-training (`chattr +i`; root ignores mode bits, and a tmpfs cannot be
  remounted read-only while training holds files open for writing): the checkpoint writer's background error
  stops the training with that reason, and the state file still names a complete checkpoint;
- a checkpoint large enough to be written around the page cache (`O_DIRECT`) on a full disk: the same clean error,
  the previous checkpoint restores.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from contextlib import contextmanager

import numpy as np
import pytest
from helpers import cli_command

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a size-limited tmpfs and chattr +i need root")

NOTHING_PARTIAL = ("_temp", ".ptf-tmp-")


@contextmanager
def small_filesystem(path, size: str):
    """A tmpfs of `size` mounted at `path` for the block (skips the test where mounting is not permitted)."""
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: str) -> None:
    """Write a filler file until the file system is full."""
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as handle:
        try:
            while handle.write(b"\0" * 4096):
                pass
        except OSError:
            pass


def run(env, *commands: tuple, timeout: float = 300) -> list[tuple[int, str]]:
    """Run CLI commands side by side; for each, (exit status, its `error:` line or '')."""
    started = [
        subprocess.Popen(cli_command(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for args in commands
    ]
    results = []
    for process in started:
        _, stderr = process.communicate(timeout=timeout)
        assert "Traceback" not in stderr, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        results.append((process.returncode, errors[-1] if errors else ""))
    return results


def assert_plain(message: str) -> None:
    for internal in ("[Op:", "function_node", "/proc/self/fd", ".tempstate"):
        assert internal not in message, message


def processes_naming(text: str) -> list[str]:
    """Command lines of the running processes that mention `text` (a model dir: its sidecar evaluator's)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command and "pytest" not in command:
            found.append(f"{pid}: {command}")
    return found


def assert_no_process_left(model_dir: str, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while processes_naming(model_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_naming(model_dir) == []


def listed_checkpoints(model_dir: str) -> tuple[str, list[str]]:
    """The state file's latest checkpoint and kept list (names)."""
    text = open(os.path.join(model_dir, "checkpoint"), encoding="utf-8").read()
    latest = text.split('model_checkpoint_path: "', 1)[1].split('"', 1)[0]
    kept = [line.split('"')[1] for line in text.splitlines() if line.startswith("all_model_checkpoint_paths")]
    return latest, kept


def assert_listed_are_complete(model_dir: str) -> str:
    latest, kept = listed_checkpoints(model_dir)
    assert latest in kept
    for name in kept:
        assert os.path.getsize(os.path.join(model_dir, f"{name}.index")) > 0
        assert os.path.getsize(os.path.join(model_dir, f"{name}.data-00000-of-00001")) > 0
    return latest


def assert_second_checkpoint_refused(message: str, model_dir: str, reason: str) -> None:
    """`model.ckpt-2`'s write failed for `reason`: said plainly, nothing of it left, `model.ckpt-1` still the latest."""
    assert message.startswith(f"model dir {model_dir}: writing checkpoint model.ckpt-2 failed (removed;"), message
    assert reason in message
    assert_plain(message)
    assert listed_checkpoints(model_dir) == ("model.ckpt-1", ["model.ckpt-1"])
    assert not [e for e in os.listdir(model_dir) if e.startswith("model.ckpt-2")]


def digest(directory: str) -> str:
    sha = hashlib.sha256()
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            sha.update(name.encode() + open(os.path.join(root, name), "rb").read())
    return sha.hexdigest()


def test_full_disk_while_training_exporting_and_freezing(tmp_path, cli_env):
    env = {**cli_env, "PREFECT_TENSORFLOW_DATA_HOME": str(tmp_path / "home")}
    with small_filesystem(tmp_path / "models", "1000k") as models, small_filesystem(tmp_path / "out", "300k") as out:
        model_dir = os.path.join(models, "iris")
        # every checkpoint kept: iris checkpoints hold no input iterator (a few KB each), so it takes many to fill 1000k
        train = ("train", "--model-dir", model_dir, "--steps", 5000, "--save-checkpoints-steps", 10, "--keep-checkpoint-max", 0)
        [(status, message)] = run(env, train)
        assert status == 2 and message.startswith(f"error: model dir {model_dir}: writing checkpoint model.ckpt-"), message
        assert message.endswith("No space left on device"), message
        assert_plain(message)
        assert_no_process_left(model_dir)
        assert not [e for e in os.listdir(model_dir) if any(m in e for m in NOTHING_PARTIAL)], os.listdir(model_dir)
        latest = assert_listed_are_complete(model_dir)
        failed_step = int(message.split("model.ckpt-", 1)[1].split(" ", 1)[0])
        assert int(latest.rsplit("-", 1)[1]) == failed_step - 10  # the last complete one; nothing later listed

        # the checkpoints left restore: an export of the latest one works (and is verified against it)
        export_base = os.path.join(out, "exports")
        [(status, message)] = run(env, ("export", os.path.join(model_dir, latest), "--export-base", export_base))
        assert status == 0, message
        version_one = digest(os.path.join(export_base, "1"))

        fill(out)
        fill(models)
        state_before = open(os.path.join(model_dir, "checkpoint"), encoding="utf-8").read()
        _, kept = listed_checkpoints(model_dir)
        frozen = os.path.join(out, "iris.pb")
        (status, message), (frozen_status, frozen_message), (again_status, again_message) = run(
            env,
            ("export", os.path.join(model_dir, kept[0]), "--export-base", export_base),
            ("freeze", os.path.join(model_dir, latest), "--output", frozen),
            train,
        )
        # training again on a disk with no room at all: one line, nothing of the model dir lost
        assert again_status == 2 and "No space left on device" in again_message, again_message
        assert_plain(again_message)
        assert open(os.path.join(model_dir, "checkpoint"), encoding="utf-8").read() == state_before
        assert_listed_are_complete(model_dir)
        assert not [e for e in os.listdir(model_dir) if any(m in e for m in NOTHING_PARTIAL)], os.listdir(model_dir)
        assert status == 2, message
        assert message.startswith(f"error: writing SavedModel version {export_base}/2 failed: "), message
        assert message.endswith("No space left on device; nothing was published"), message
        assert_plain(message)
        assert sorted(os.listdir(export_base)) == [".prefect-tensorflow.lock", "1"]
        assert digest(os.path.join(export_base, "1")) == version_one

        status, message = frozen_status, frozen_message
        assert status == 2, message
        assert message.startswith(f"error: writing frozen graph {frozen} failed: "), message
        assert "No space left on device" in message
        assert_plain(message)
        assert sorted(os.listdir(out)) == ["exports", "filler"]


def test_model_dir_refusing_writes_mid_training_stops_it_with_the_reason(tmp_path, cli_env):
    env = {**cli_env, "PREFECT_TENSORFLOW_DATA_HOME": str(tmp_path / "home")}
    if subprocess.run(["chattr", "-i", str(tmp_path)], capture_output=True).returncode != 0:
        pytest.skip("chattr is missing or the file system has no immutable flag")
    model_dir = str(tmp_path / "iris")
    args = ["train", "--model-dir", model_dir, "--steps", 200000, "--save-checkpoints-steps", 100, "--keep-checkpoint-max", 2]
    process = subprocess.Popen(cli_command(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        state = os.path.join(model_dir, "checkpoint")
        deadline = time.monotonic() + 120
        while not (os.path.exists(state) and "model.ckpt-0" not in listed_checkpoints(model_dir)[0]):
            assert process.poll() is None and time.monotonic() < deadline, "training ended before its second checkpoint"
            time.sleep(0.05)
        # immutable: no entry can be created, renamed or removed in it (root ignores mode bits, not this flag;
        # a read-only remount is refused while training holds files open for writing)
        subprocess.run(["chattr", "+i", model_dir], check=True)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        subprocess.run(["chattr", "-i", model_dir], check=False)
    message = [line for line in stderr.splitlines() if line.startswith("error: ")][-1:]
    assert process.returncode == 2 and message, stderr[-3000:]
    assert message[0].startswith(f"error: model dir {model_dir}: writing checkpoint model.ckpt-"), message
    assert "Operation not permitted" in message[0], message
    assert_plain(message[0])
    assert_no_process_left(model_dir)
    assert_listed_are_complete(model_dir)


def test_a_failed_background_write_is_raised_by_the_next_step_not_the_next_save(tmp_path):
    import tensorflow as tf

    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.checkpoints.writer import CheckpointWriter
    from prefect_tensorflow.tasks.errors import TrainingError

    if subprocess.run(["chattr", "-i", str(tmp_path)], capture_output=True).returncode != 0:
        pytest.skip("chattr is missing or the file system has no immutable flag")
    model_dir = str(tmp_path / "model")
    step = tf.Variable(0, dtype=tf.int64)
    writer = CheckpointWriter(tf.train.Checkpoint(global_step=step), model_dir, CheckpointPolicy(), untrusted=False)
    writer.save(1)
    writer.finish()
    subprocess.run(["chattr", "+i", model_dir], check=True)
    try:
        step.assign(2)
        writer.save(2)  # async: returns at once; the write fails in the writer's thread
        deadline = time.monotonic() + 30
        with pytest.raises(TrainingError) as failed:
            while time.monotonic() < deadline:
                writer.raise_if_failed()  # what the training loop asks after every step
                time.sleep(0.01)
    finally:
        subprocess.run(["chattr", "-i", model_dir], check=False)
    assert_second_checkpoint_refused(str(failed.value), model_dir, "Operation not permitted")
    writer.finish()  # the error was reported once; nothing more is pending


def test_a_large_checkpoint_written_around_the_page_cache_fails_cleanly_on_a_full_disk(tmp_path):
    """The `O_DIRECT` path (a checkpoint of >= `bundle.DIRECT_MIN_BYTES`) meets ENOSPC for real: the same clean error."""
    import tensorflow as tf

    from prefect_tensorflow.tasks.checkpoints import bundle
    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.checkpoints.writer import CheckpointWriter
    from prefect_tensorflow.tasks.errors import TrainingError

    floats = bundle.DIRECT_MIN_BYTES // 4 + 1000
    weights = tf.Variable(tf.random.stateless_uniform([floats], seed=[3, 4]))
    with small_filesystem(tmp_path / "small", "16m") as small:
        model_dir = os.path.join(small, "model")
        writer = CheckpointWriter(tf.train.Checkpoint(w=weights), model_dir, CheckpointPolicy(async_save=False), untrusted=False)
        writer.save(1)  # ~8.4 MB of the 16 MB
        saved = weights.numpy()
        weights.assign_add(tf.ones([floats]))
        with pytest.raises(TrainingError) as failed:
            writer.save(2)  # the second does not fit
        assert_second_checkpoint_refused(str(failed.value), model_dir, "No space left on device")
        restored = tf.Variable(tf.zeros([floats]))
        tf.train.Checkpoint(w=restored).restore(os.path.join(model_dir, "model.ckpt-1")).assert_consumed()
        np.testing.assert_array_equal(restored.numpy(), saved)  # the good checkpoint is untouched
