"""Evaluation of checkpoints off the training loop: a sidecar evaluator process, as the Estimator's was.

With `TrainingConfig.evaluation="sidecar"` (the default), training starts
`python -m prefect_tensorflow.tasks.training.sidecar_evaluator_main <model_dir>` beside it and tells
it (on its stdin) each checkpoint it commits, with the training loss of the
window before it. The evaluator restores the checkpoint's model (its variables read
straight from the bundle, `checkpoints.bundle_reader`, else by TensorFlow's
`Checkpoint.read`), evaluates it on the eval split and appends the one metrics line of that checkpoint to
`checkpoint_metrics.jsonl` (and the eval metrics to TensorBoard under
`eval/`). Training never waits for it:

- it runs one TensorFlow thread at a lower CPU priority (`nice 10`): at most
  one core, and while training competes for that core the evaluator gets
  about a tenth of it (idle time is all its own); what is left when training
  ends is evaluated then (`train_with_checkpoints` waits for it before
  returning, so its result carries the final metrics; after a SIGTERM it
  waits at most 30 s);
- a training that ends before its evaluator is ready (it writes one byte to
  its `--ready-fd` pipe once TensorFlow is imported and its model built)
  does not wait for its start-up: `finish` stops it and evaluates what is
  left in the trainer's process (`SidecarEvaluator.evaluate_here`), where
  TensorFlow and the model code are loaded already;
- in a process that launched a warm template (`evaluator_template`), it is
  a fork of that template instead of a new Python (`evaluator_forking_main`:
  the same program on the same descriptors);
- it holds an exclusive lock on `<model_dir>/.evaluator.lock`, and checks
  under it that a step has no line yet before writing one: one evaluator per
  model dir, one line per checkpoint;
- it works in the directory the trainer opened, not by its path: the trainer
  hands it the model dir's descriptor (`pass_fds`), and the evaluator reads
  checkpoints, takes its lock (`O_NOFOLLOW`), appends its lines and writes
  `eval/` (opened `O_NOFOLLOW`) through `/proc/self/fd/<fd>`. Before each line
  it checks the path still names that directory (`OpenDir.verify`): a model
  dir moved or replaced by a symlink mid-training gets nothing more, and
  nothing is written where the symlink leads (the evaluator stops, saying so
  in `eval/evaluator.log`);
- it ends with its training: `finish` sends an end line, and only then does
  it evaluate what is left before exiting; when training fails (`stop`: its
  stdin closes without the end line, then SIGTERM after 2 s) or is killed (it
  dies with its parent, `child_processes.die_with_parent`) it stops at once. A
  resumed training starts a new one (which waits for the lock), and every
  evaluator first catches up on the committed checkpoints that have no
  metrics line (their training loss, which died with the trainer, is then
  missing from the line).

`evaluate_missing` is the same catch-up in this process
(`prefect-tensorflow evaluate MODEL_DIR`). `wait_for_metrics` is what
selection uses so that "best" is never chosen from incomplete metrics.

Example:
    >>> from prefect_tensorflow.tasks.training.sidecar_evaluator import EvaluationSpec
    >>> EvaluationSpec(model="iris", data="iris").batch_size
    256
"""

from __future__ import annotations

import json
import math
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from ..checkpoints.bundle_reader import VariableRestorer
from ..checkpoints.files import checkpoint_prefixes, step_of
from ..checkpoints.metrics_log import METRICS_FILE, append_metrics, read_metrics
from ..child_processes import start_process
from ..data.window import DataWindow
from ..errors import MetricsTimeoutError, StorageError
from ..run_context import get_logger
from ..storage.confined_dirs import OpenDir, open_directory
from ..storage.local import exclusive_lock
from . import evaluator_template
from .evaluator_process import ENTRY_MODULE, PARENT_VARIABLE

LOCK_FILE = ".evaluator.lock"
END_LINE = '{"end": true}'
"""What `SidecarEvaluator.finish` sends last: evaluate what is left, then exit (without it, EOF means: stop now)."""
STOP_GRACE_SECONDS = 2.0
"""Seconds a stopped evaluator has after its input closes, then after SIGTERM (`SidecarEvaluator.stop`)."""
TAKEN_OVER = "the training ended before the evaluator was ready: the trainer evaluates what is left"
"""The line `eval/evaluator.log` gets when `SidecarEvaluator.finish` evaluates in the trainer's process."""
READY_BYTE = b"r"
"""What the evaluator process (`python -m` this `<model_dir> [--fd N [--root R]] [--ready-fd W]`, the spec then
steps on stdin) writes to `W` once it has built its model, before its first checkpoint."""


class EvaluationSpec(BaseModel):
    """What the evaluator needs to rebuild the model and read the eval split (import strings, already trusted)."""

    model_config = ConfigDict(frozen=True)

    model: str
    data: str
    data_options: dict[str, JsonValue] = Field(default_factory=dict)
    window: Optional[DataWindow] = None
    hparams: dict[str, JsonValue] = Field(default_factory=dict)
    batch_size: int = 256
    checkpoint_name: str = "model.ckpt"


def prepare(model_dir: str) -> None:
    """Create the metrics log, the lock file and `eval/` before the first checkpoint.

    They are created once, here: later appends add no directory entries, so
    the state file stays the last change to the model dir (the selection's fast path).
    """
    os.makedirs(os.path.join(model_dir, "eval"), exist_ok=True)
    for name in (METRICS_FILE, LOCK_FILE):
        os.close(_open_no_follow(os.path.join(model_dir, name)))


def _open_no_follow(path: str) -> int:
    """Open (create) `path` for appending, refusing a symlink in its last component.

    Raises:
        StorageError: `path` is a symbolic link.
    """
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as err:
        if os.path.islink(path):
            raise StorageError(f"{path} is a symbolic link; the evaluator follows none in a model dir") from err
        raise


@contextmanager
def evaluator_lock(model_dir: str, *, blocking: bool = True) -> Iterator[bool]:
    """Hold the model dir's evaluator lock (never through a symlink); yields False (without it) when not `blocking` and it is taken."""
    with exclusive_lock(model_dir, LOCK_FILE, blocking=blocking) as got:
        yield got


def evaluator_running(model_dir: str) -> bool:
    """Whether an evaluator holds this model dir's lock now."""
    if not os.path.exists(os.path.join(model_dir, LOCK_FILE)):
        return False
    with evaluator_lock(model_dir, blocking=False) as got:
        return not got


class Evaluator:
    """Evaluates checkpoints of one model dir in this process (the sidecar's body, and `evaluate_missing`).

    Given `directory` (the sidecar: the trainer's open model dir), everything is read and written through
    its descriptor, `eval/` is opened without following a symlink, and each line is written only after
    `directory.verify()`.
    """

    def __init__(
        self,
        model_dir: str,
        spec: EvaluationSpec,
        directory: Optional[OpenDir] = None,
        say: Callable[[str], None] = lambda line: print(line, flush=True),
    ):
        self.directory = directory
        self.say = say  # "evaluating <checkpoint>": the sidecar's stdout, its log file
        self.model_dir = directory.handle if directory is not None else model_dir
        self.display = directory.path if directory is not None else model_dir  # for messages
        self.spec = spec
        self._net: Any = None
        self._checkpoint: Any = None
        self._restorer: Any = None
        self.restored_directly = False  # how the last checkpoint was restored (`bundle_reader`), for tests
        self._batches: Any = None
        self._writer: Any = None
        self._eval_fd: Optional[int] = None

    def build(self) -> None:
        """Import TensorFlow, build the model, open the eval split and the event file (once)."""
        if self._net is not None:
            return
        import tensorflow as tf

        from ..data.source import DataSource
        from ..model_code import build_model

        self._net = build_model(self.spec.model, dict(self.spec.hparams))
        self._checkpoint = tf.train.Checkpoint(model=self._net)
        self._restorer = VariableRestorer(self._checkpoint, self._net.variables)
        source = DataSource(data=self.spec.data, options=dict(self.spec.data_options), window=self.spec.window)
        self._batches = source.load("eval").batch(self.spec.batch_size)
        events = os.path.join(self.model_dir, "eval")
        if self.directory is not None:
            self._eval_fd = _open_subdirectory(self.directory, "eval")
            events = f"/proc/self/fd/{self._eval_fd}" if os.path.isdir("/proc/self/fd") else events
        self._writer = tf.summary.create_file_writer(events)

    def evaluate(self, step: int, train_loss: Optional[float] = None) -> Optional[dict[str, float]]:
        """Evaluate checkpoint `<name>-<step>` and append its line, unless it has one or is gone; the metrics."""
        import tensorflow as tf

        if step in read_metrics(self.model_dir):
            return None
        prefix = os.path.join(self.model_dir, f"{self.spec.checkpoint_name}-{step}")
        if not os.path.exists(prefix + ".index"):
            return None  # deleted by the keep policy before its turn
        self.build()
        self.say(f"evaluating {os.path.join(self.display, os.path.basename(prefix))}")
        try:
            # the model's variables read straight from the bundle (cheaper on a file not in the page cache),
            # else TensorFlow's read, which also raises what is wrong with the checkpoint
            self.restored_directly = self._restorer.restore(prefix)
            if not self.restored_directly:
                self._checkpoint.read(prefix).expect_partial()
        except (tf.errors.OpError, ValueError) as err:
            get_logger().warning("cannot evaluate %s: %s", prefix, err)
            return None
        values = self._net.evaluate(self._batches, verbose=0, return_dict=True)
        metrics = {str(k): float(v) for k, v in values.items() if math.isfinite(float(v))}
        if train_loss is not None:
            metrics["train_loss"] = train_loss
        if self.directory is not None:
            self.directory.verify()  # moved or replaced since the trainer opened it: nothing more (StorageError)
        append_metrics(self.model_dir, step=step, checkpoint=os.path.basename(prefix), metrics=metrics)
        with self._writer.as_default(step=step):
            for key, value in metrics.items():
                tf.summary.scalar(key, value)
        self._writer.flush()
        return metrics

    def catch_up(self) -> int:
        """Evaluate every committed checkpoint that has no metrics line yet; returns how many."""
        return sum(self.evaluate(step) is not None for step in unevaluated_steps(self.model_dir))

    def close(self) -> None:
        """Close the event file and `eval/`'s descriptor (the sidecar's exit does it; an in-process one calls this)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._eval_fd is not None:
            os.close(self._eval_fd)
            self._eval_fd = None


def unevaluated_steps(model_dir: str) -> list[int]:
    """The committed checkpoints of `model_dir` with no metrics line yet (a killed training's evaluator died
    with it), oldest first.

    Example:
        >>> import tempfile
        >>> unevaluated_steps(tempfile.mkdtemp())
        []
    """
    recorded = read_metrics(model_dir)
    return sorted(s for s in (step_of(p) for p in checkpoint_prefixes(model_dir)) if s is not None and s not in recorded)


def _open_subdirectory(directory: OpenDir, name: str) -> int:
    """Open `name` inside `directory` through its descriptor, refusing a symlink (StorageError)."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory.fd)
    except OSError as err:
        raise StorageError(f"{directory.display(name)} is not a directory inside the model dir ({err.strerror})") from err


def evaluate_missing(model_dir: str, spec: EvaluationSpec) -> int:
    """Evaluate, in this process, the checkpoints of `model_dir` that have no metrics line; returns how many.

    Example:
        >>> import tempfile
        >>> evaluate_missing(tempfile.mkdtemp(), EvaluationSpec(model="iris", data="iris"))
        0
    """
    prepare(model_dir)
    with evaluator_lock(model_dir):
        return Evaluator(model_dir, spec).catch_up()


def wait_for_metrics(model_dir: str, steps: list[int], timeout: float) -> dict[int, dict[str, float]]:
    """The metrics of `steps`, waiting (up to `timeout` seconds) while an evaluator is still producing them.

    Raises:
        MetricsTimeoutError: some steps still have no metrics line (named), after the wait or at
            once when no evaluator is running.
    """
    deadline = time.monotonic() + timeout
    while True:
        recorded = read_metrics(model_dir)
        missing = sorted(s for s in steps if s not in recorded)
        if not missing:
            return recorded
        running = evaluator_running(model_dir)
        if not running or time.monotonic() > deadline:
            why = f"the evaluator did not record them within {timeout:.0f} s" if running else "no evaluator is running"
            raise MetricsTimeoutError(
                f"model dir {model_dir}: no metrics yet for checkpoint step(s) {missing} ({why}); "
                f"best is never chosen from incomplete metrics. Evaluate them with "
                f"`prefect-tensorflow evaluate {model_dir}`, or raise PREFECT_TENSORFLOW_METRICS_TIMEOUT"
            )
        time.sleep(0.2)


def evaluation_spec(config: Any, *, resolved: bool = True) -> EvaluationSpec:
    """What the sidecar evaluator needs of a `TrainingConfig`, the model code as trusted import strings (already
    checked) for the evaluator's own process; `resolved=False`: the model and data as the config names them, for
    an evaluation in the trainer's process, where a deployment run accepts registered names only."""
    from ..model_code import import_string

    return EvaluationSpec(
        model=import_string(config.model, "model") if resolved else config.model,
        data=import_string(config.data, "data") if resolved else config.data,
        data_options=dict(config.data_options),
        window=config.window,
        hparams=dict(config.hparams),
        batch_size=max(config.batch_size, 256),
        checkpoint_name=config.policy.checkpoint_name,
    )


class SidecarEvaluator:
    """The trainer's handle on its evaluator process (see the module docstring).

    `directory`: the model dir as the trainer opened it; its descriptor is handed to the evaluator, which
    works through it. Without it (multi-worker) the model dir is opened here (`confined_dirs.open_directory`).
    `take_over`: the spec with which `finish` evaluates here what an evaluator not ready yet would have (a
    trainer, which has TensorFlow and the model loaded: `evaluation_spec(config, resolved=False)`); without it
    (the multi-worker caller, which imports no TensorFlow) `finish` waits for the evaluator.
    """

    def __init__(
        self,
        model_dir: str,
        spec: EvaluationSpec,
        directory: Optional[OpenDir] = None,
        *,
        take_over: Optional[EvaluationSpec] = None,
    ):
        self.model_dir = model_dir
        self.take_over = take_over
        self._own = directory is None
        self.directory = directory if directory is not None else open_directory(model_dir, parameter="model_dir", create=True)
        try:
            prepare(self.directory.handle)
            eval_fd = _open_subdirectory(self.directory, "eval")
            try:
                log_fd = os.open(
                    "evaluator.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=eval_fd
                )
            finally:
                os.close(eval_fd)
        except BaseException:
            if self._own:
                self.directory.close()
            raise
        self._errors = os.fdopen(log_fd, "ab")
        self.spec = spec
        stdin_reader, stdin_writer = os.pipe()
        self._ready_fd, ready_writer = os.pipe()  # one byte once it has built its model (`ready`)
        self._stdin = os.fdopen(stdin_writer, "w")
        self._held: list[int] = []  # a forked evaluator's ends, kept until it has opened them (`ready`)
        try:
            self._process: Any = self._fork(stdin_reader, ready_writer)
            if self._process is not None:
                self._held = [stdin_reader, ready_writer]
            else:
                self._process = self._start(stdin_reader, ready_writer)
        except BaseException:
            self._stdin.close()
            os.close(self._ready_fd)
            self._errors.close()
            if self._own:
                self.directory.close()
            raise
        finally:
            if not self._held:
                os.close(stdin_reader)
                os.close(ready_writer)
        self.forked = bool(self._held)
        self._ready = False
        self._train_losses: dict[int, Optional[float]] = {}
        self._lock = threading.Lock()
        self._send(spec.model_dump_json())

    def _fork(self, stdin_reader: int, ready_writer: int) -> Any:
        """The evaluator forked from this process's warm template (`evaluator_template`), or None: none is ready."""
        request = {
            "trainer": os.getpid(),
            "stdin": stdin_reader,
            "ready": ready_writer,
            "directory": self.directory.fd,
            "path": self.directory.path,
            "root": self.directory.root,
        }
        return evaluator_template.fork_evaluator(request, f"/proc/{os.getpid()}/fd/{self._errors.fileno()}")

    def _start(self, stdin_reader: int, ready_writer: int) -> subprocess.Popen:
        """The evaluator as a new process: `python -m` `ENTRY_MODULE`, the descriptors inherited."""
        fd = self.directory.fd
        command = [sys.executable, "-m", ENTRY_MODULE, self.directory.path, "--fd", str(fd), "--ready-fd", str(ready_writer)]
        if self.directory.root is not None:
            command += ["--root", self.directory.root]
        # Not a session of its own; it dies with the trainer (see above).
        return start_process(
            command,
            parent_variable=PARENT_VARIABLE,
            pass_fds=(fd, ready_writer),
            stdin=stdin_reader,
            stdout=self._errors,
            stderr=subprocess.STDOUT,
            threads=1,
            new_session=False,
        )

    def _send(self, line: str) -> None:
        with self._lock:
            try:
                self._stdin.write(line + "\n")
                self._stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass  # it died: the catch-up of the next evaluator (or `finish`) covers its checkpoints

    def notify(self, step: int, train_loss: Optional[float]) -> None:
        """Checkpoint `step` is committed; its window's training loss (None after a resume)."""
        self._train_losses[step] = train_loss  # for `evaluate_here`
        self._send(json.dumps({"step": step, "train_loss": train_loss}))

    def alive(self) -> bool:
        """Whether the evaluator process is still running."""
        return self._process.poll() is None

    def wait_until_evaluating(self, timeout: float) -> bool:
        """Wait until an evaluator holds the model dir's lock (this one, or a previous one it waits for), at most
        `timeout` s; False if none does (this one died, or did not get there in time)."""
        deadline = time.monotonic() + timeout
        while not evaluator_running(self.directory.handle):
            if not self.alive() or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        """Training failed: stop the evaluator now (close its input without the end line; SIGTERM, then SIGKILL,
        if it is still busy after `STOP_GRACE_SECONDS` each). The next training's evaluator catches up."""
        self._close_input()
        try:
            self._process.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            self._process.terminate()
            try:
                self._process.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._close_handle()

    def _close_input(self, last: Optional[str] = None) -> None:
        with self._lock:
            try:
                if last is not None:
                    self._stdin.write(last + "\n")
                self._stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass

    def ready(self) -> bool:
        """Whether the evaluator has imported TensorFlow and built its model (it holds the model dir's lock then)."""
        if not self._ready and self._ready_fd >= 0 and select.select([self._ready_fd], [], [], 0)[0]:
            self._ready = os.read(self._ready_fd, 1) == READY_BYTE  # b"": it exited before it was ready
            os.close(self._ready_fd)
            self._ready_fd = -1
            self._let_go()  # a forked one has opened its ends by now
        return self._ready

    def finish(self, timeout: Optional[float] = None) -> None:
        """Wait until every committed checkpoint is evaluated (at most `timeout` s), then close the handle.

        With `take_over`, an evaluator that is not ready yet -- still importing TensorFlow, as after a short
        training -- is stopped, and what it would have evaluated is evaluated here (`evaluate_here`), where TensorFlow and
        the model code are loaded already; with a `timeout`, no checkpoint is started after it (the next
        training's evaluator catches up). A ready one is sent the end line and waited for.
        """
        try:
            if self.take_over is not None and not self.ready():
                self._stop_now()
                self._log(TAKEN_OVER)
                self.evaluate_here(None if timeout is None else time.monotonic() + timeout)
                return
            self._close_input(END_LINE)
            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                get_logger().warning(
                    "the evaluator of %s is still running after %.0f s; it finishes on its own", self.model_dir, timeout
                )
        finally:
            self._close_handle()

    def evaluate_here(self, deadline: Optional[float] = None) -> int:
        """Evaluate, in this process and under the model dir's evaluator lock, the committed checkpoints with
        no metrics line (as the sidecar would have, its lines to the same log), none started after `deadline`
        (`time.monotonic()`); returns how many.

        A model dir moved or replaced meanwhile gets nothing (said in `eval/evaluator.log`, as the sidecar does).
        """
        evaluator = Evaluator(self.model_dir, self.take_over or self.spec, self.directory, say=self._log)
        try:
            with evaluator_lock(self.directory.handle):
                done = 0
                for step in unevaluated_steps(self.directory.handle):
                    if deadline is not None and time.monotonic() > deadline:
                        break
                    done += evaluator.evaluate(step, self._train_losses.get(step)) is not None
                return done
        except StorageError as err:
            self._log(f"the evaluator stops: {err}")
            get_logger().warning("the evaluation of %s stops: %s", self.model_dir, err)
            return 0
        finally:
            evaluator.close()

    def _log(self, line: str) -> None:
        self._errors.write(line.encode() + b"\n")
        self._errors.flush()

    def _stop_now(self) -> None:
        """Stop the process at once (it has evaluated nothing while not ready)."""
        self._close_input()
        self._process.kill()
        self._process.wait()

    def _let_go(self) -> None:
        """Close the ends kept for a forked evaluator (its input then breaks when it dies, as a started one's)."""
        for fd in self._held:
            os.close(fd)
        self._held = []

    def _close_handle(self) -> None:
        if self._ready_fd >= 0:
            os.close(self._ready_fd)
            self._ready_fd = -1
        self._let_go()
        self._errors.close()
        if self._own:
            self.directory.close()
