"""The warm template: serving checks forked from one isolated process with TensorFlow imported, and its lifetime."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import export, iris_eval_io

from prefect_tensorflow.tasks import iris
from prefect_tensorflow.tasks.promotion import warm_template
from prefect_tensorflow.tasks.promotion.serving_check import check_loads


@pytest.fixture(scope="module")
def exported(trained_dir: Path, tmp_path_factory):
    base = tmp_path_factory.mktemp("warm") / "iris"
    return export(trained_dir / "model.ckpt-300", base, model=iris.MODEL, data=iris.DATA)


@pytest.fixture(scope="module")
def eval_io(exported):
    return iris_eval_io(exported.path)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie nobody reaped yet is gone too
    except OSError:
        return True


def _wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if not _gone(p)]


def test_ten_checks_forked_in_a_row_answer_like_in_process(exported, eval_io):
    """Fork after `import tensorflow` (no op run in the template) is safe: 10 loads, each equal to in-process outputs.

    `check_loads` fails when the loading process has any `prefect_tensorflow` module: a forked child has
    the template's modules, so these passes also say the template imported no project code.
    """
    inputs, expected = eval_io
    pids = set()
    for _ in range(10):
        report = check_loads(exported.path, inputs, expected)
        assert report.ok, report.reason
        assert "forked from the warm template" in report.reason
        assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-5
        assert report.load_seconds > 0 and report.peak_memory_mb > 0 and 0 < report.p50_ms <= report.p99_ms
        pids.add(warm_template.running_template().pid)
    assert len(pids) == 1  # one template served them all


def test_a_launched_template_starts_in_the_background_and_serves_the_next_check(exported, eval_io):
    """`launch_template` (what the export flows call first) returns before the imports are done, and the
    check that follows forks from that same template instead of starting another."""
    inputs, expected = eval_io
    warm_template.stop_template()
    warm_template.launch_template()
    launched = warm_template._slot.current()
    assert launched is not None, "launch_template started no template"
    assert launched.starting(), "launch_template waited for the template's imports"
    report = check_loads(exported.path, inputs, expected)
    assert report.ok and "forked from the warm template" in report.reason, report.reason
    assert warm_template.running_template() is launched
    warm_template.launch_template()  # one runs: nothing new
    assert warm_template.running_template() is launched


def test_a_dead_template_is_restarted_and_a_failed_fork_runs_the_cold_path(exported, eval_io, monkeypatch):
    inputs, expected = eval_io
    first = warm_template.running_template().pid
    os.kill(first, signal.SIGKILL)
    assert _wait_gone([first]) == []
    report = check_loads(exported.path, inputs, expected)
    assert report.ok and "forked from the warm template" in report.reason, report.reason
    assert warm_template.running_template().pid != first

    def no_fork(self, kind, request, log_path):
        raise warm_template.WarmTemplateError("fork failed: [Errno 11] Resource temporarily unavailable")

    monkeypatch.setattr(warm_template.WarmTemplate, "fork", no_fork)
    report = check_loads(exported.path, inputs, expected)
    assert report.ok and "a fresh python -I process" in report.reason, report.reason


PARENT = """
import sys, time
from prefect_tensorflow.tasks.promotion.warm_template import running_template
template = running_template()
child = template.fork("load", {"request": sys.argv[1]}, sys.argv[2])  # blocks opening the FIFO: a check in progress
print(template.pid, child.pid, flush=True)
time.sleep(600)
"""


def test_a_killed_parent_leaves_no_template_and_no_check_behind(tmp_path):
    fifo = tmp_path / "request.json"
    os.mkfifo(fifo)
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(fifo), str(tmp_path / "child.log")], stdout=subprocess.PIPE, text=True
    )
    try:
        line = parent.stdout.readline()
        assert line, f"the parent exited with status {parent.wait()}"
        template, child = map(int, line.split())
        assert not _gone(template) and not _gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_gone([template, child]) == []
    finally:
        parent.kill()
        parent.wait()
