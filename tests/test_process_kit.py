"""One process kit (`tasks/child_processes.py`): every child process is started, stopped and read through it."""

from __future__ import annotations

import ast
import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

from prefect_tensorflow.tasks.child_processes import child_env, log_tail, signal_group, start_process, stop_process_group

REPO = Path(__file__).resolve().parents[1]
PRODUCT = sorted([*(REPO / "tasks").rglob("*.py"), *(REPO / "flows").rglob("*.py")])
KIT = REPO / "tasks" / "child_processes.py"


def _calls(path: Path) -> set[str]:
    """The dotted names this module calls (`subprocess.Popen`, `os.killpg`, ...)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            found.add(f"{node.func.value.id}.{node.func.attr}")
    return found


def test_only_the_kit_starts_or_stops_child_processes():
    starters = {p.relative_to(REPO).as_posix() for p in PRODUCT if {"subprocess.Popen", "os.killpg"} & _calls(p)}
    # The warm template's program runs under `python -I` with no project code importable (what it serves must
    # load without it), so it stops the children it forked itself; everything else goes through the kit.
    assert starters == {"tasks/child_processes.py", "tasks/promotion/warm_template_main.py"}


def test_tensorflows_log_level_is_set_in_one_place():
    setters = {p.relative_to(REPO).as_posix() for p in PRODUCT if '"TF_CPP_MIN_LOG_LEVEL"' in p.read_text()}
    assert setters == {"tasks/child_processes.py"}


def test_entry_points_live_in_modules_of_their_own():
    """Library modules have no `__main__` block: each process has a `*_main` module (the metric sender and the
    CLI are process modules themselves)."""
    mains = {
        p.relative_to(REPO).as_posix()
        for p in PRODUCT
        if 'if __name__ == "__main__":' in p.read_text() and not p.stem.endswith("_main")
    }
    assert mains == {"tasks/training/metric_sender.py", "flows/cli.py"}


def test_developer_tooling_is_not_in_the_installed_package():
    assert importlib.util.find_spec("prefect_tensorflow.flows.team_stack") is None
    assert not any("moto" in p.read_text() for p in PRODUCT)


def test_a_child_gets_the_recipe_and_its_group_is_stopped(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    env = child_env("PTF_TEST_PARENT", threads=2, base={"KEEP": "1"}, EXTRA="x")
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "3" and env["TF_NUM_INTRAOP_THREADS"] == "2" and env["KEEP"] == "1"
    assert env["EXTRA"] == "x" and env["PTF_TEST_PARENT"].isdigit()
    assert child_env(base={"TF_CPP_MIN_LOG_LEVEL": "0"})["TF_CPP_MIN_LOG_LEVEL"] == "0"  # the user's setting wins
    log = tmp_path / "child.log"
    code = "import os, subprocess, sys, time; print(os.environ['TF_CPP_MIN_LOG_LEVEL'], flush=True); time.sleep(600)"
    process = start_process([sys.executable, "-c", code], str(log))
    while "3" not in log_tail(str(log)):  # started, with the recipe's environment
        assert process.poll() is None, log_tail(str(log))
        time.sleep(0.01)
    assert stop_process_group(process, grace=30) == -signal.SIGTERM


def test_a_child_not_yet_in_a_group_of_its_own_is_signalled_itself(tmp_path):
    """A warm template's child is in the template's group until its `setsid()`: there is no group of its pid to
    signal, so `signal_group` signals the pid (a real child outside a session of its own stands in)."""
    log = tmp_path / "child.log"
    code = "import time; print('up', flush=True); time.sleep(600)"
    process = start_process([sys.executable, "-c", code], str(log), new_session=False)
    try:
        while "up" not in log_tail(str(log)):
            assert process.poll() is None, log_tail(str(log))
            time.sleep(0.01)
        assert os.getpgid(process.pid) != process.pid  # no group of its own
        signal_group(process, signal.SIGTERM)
        assert process.wait(timeout=20) == -signal.SIGTERM
    finally:
        process.kill()
        process.wait()
