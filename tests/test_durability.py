"""Durable commits, checked on a real syscall trace: every checkpoint's data and the model dir reach the disk before
the state file names it (and the model dir after), every file of a SavedModel version before its publishing rename,
a frozen graph before it is linked into place; with `--no-durable-commit` no checkpoint file, state file or model dir is synced.

Each command runs under `strace -f -y` (fsync, fdatasync and the rename/link calls, with the path of every
descriptor), and the order is read from the trace."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from helpers import cli_command

pytestmark = pytest.mark.skipif(
    shutil.which("strace") is None, reason="strace is not installed (make strace installs Debian's package as root)"
)

TRACED = "fsync,fdatasync,rename,renameat,renameat2,link,linkat"
# `123 fsync(7</dir/model.ckpt-10.index>) = 0`, `123 renameat(8</dir>, ".x", 8</dir>, "checkpoint") = 0`
_CALL = re.compile(r"^\d+\s+(?:<\.\.\. )?(\w+)\((.*)")
_FD_PATH = re.compile(r"^-?\d+<([^>]*)>")
_UNFINISHED = re.compile(r"\s*<unfinished \.\.\.>$")


def traced(tmp_path, env, *commands: tuple) -> list[list[tuple[str, list[str]]]]:
    """Run CLI commands side by side, each under strace; for each, its calls in order, as (name, [argument, ...])
    with descriptors shown as paths."""
    started = []
    for args in commands:
        trace = tmp_path / f"trace-{len(list(tmp_path.glob('trace-*')))}.txt"
        trace.touch()
        command = ["strace", "-f", "-qq", "-y", "--seccomp-bpf", "-e", f"trace={TRACED}", "-o", str(trace), *cli_command(*args)]
        started.append((trace, subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    results = []
    for trace, process in started:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        results.append(_calls(trace.read_text()))
    return results


def _calls(text: str) -> list[tuple[str, list[str]]]:
    calls = []
    for line in text.splitlines():
        # a call another thread interrupts is split: `... "checkpoint" <unfinished ...>`, then `<... resumed>) = 0`
        line = _UNFINISHED.sub("", line)
        match = _CALL.match(line)
        if not match or "resumed>" in line or match.group(1) not in TRACED.split(","):
            continue
        arguments = []
        for raw in match.group(2).split(", "):
            raw = raw.strip()
            fd = _FD_PATH.match(raw)
            arguments.append(fd.group(1) if fd else raw.strip('"').split(")")[0].strip('"'))
        calls.append((match.group(1), arguments))
    return calls


def fsynced(call: tuple[str, list[str]]) -> str | None:
    return call[1][0] if call[0] in ("fsync", "fdatasync") else None


def renamed_to(call: tuple[str, list[str]]) -> tuple[str, str] | None:
    """(directory, new name) of a rename/link call (the *at forms: the new dir's descriptor and the name)."""
    name, args = call
    if name in ("rename", "link"):
        return os.path.dirname(args[1]), os.path.basename(args[1])
    if name in ("renameat", "renameat2", "linkat"):
        return args[2], args[3]
    return None


def test_durable_commit_order_for_checkpoints_exports_and_frozen_graphs(tmp_path, cli_env):
    env = {**cli_env, "PREFECT_TENSORFLOW_DATA_HOME": str(tmp_path / "home")}
    model_dir, fast_dir = str(tmp_path / "model"), str(tmp_path / "fast")
    train = ("train", "--steps", 20, "--save-checkpoints-steps", 10, "--evaluation", "none")
    calls, fast_calls = traced(
        tmp_path, env, (*train, "--model-dir", model_dir), (*train, "--model-dir", fast_dir, "--no-durable-commit")
    )

    # every commit: the checkpoint's .index and .data-*, then the model dir, then the staged state file are
    # fsynced before the rename that makes the state file name it, and the model dir right after it
    commits = [i for i, c in enumerate(calls) if renamed_to(c) == (model_dir, "checkpoint")]
    assert len(commits) == 3, calls  # steps 0, 10, 20
    previous = -1
    for step, at in zip((0, 10, 20), commits):
        before = [fsynced(c) for c in calls[previous + 1 : at]]
        index, data = f"{model_dir}/model.ckpt-{step}.index", f"{model_dir}/model.ckpt-{step}.data-00000-of-00001"
        assert index in before and data in before, (step, before)
        directory_synced = max(i for i, path in enumerate(before) if path == model_dir)
        assert directory_synced > before.index(index) and directory_synced > before.index(data), (step, before)
        assert any(p and "/.checkpoint.ptf-tmp-" in p for p in before[directory_synced:]), (step, before)
        assert fsynced(calls[at + 1]) == model_dir, calls[at : at + 2]
        previous = at

    # the option off: no checkpoint file, state file or model dir is synced (the commits stay atomic renames;
    # the metrics log's appends keep their own fsync, as before)
    synced = {fsynced(c) for c in fast_calls} - {None}
    assert {p for p in synced if p.startswith(fast_dir)} == {f"{fast_dir}/checkpoint_metrics.jsonl"}
    assert len([c for c in fast_calls if renamed_to(c) == (fast_dir, "checkpoint")]) == 3

    export_base = str(tmp_path / "exports")
    frozen = str(tmp_path / "frozen" / "iris.pb")
    os.makedirs(os.path.dirname(frozen))
    calls, frozen_calls = traced(
        tmp_path,
        env,
        ("export", f"{model_dir}/model.ckpt-20", "--export-base", export_base),
        ("freeze", f"{model_dir}/model.ckpt-20", "--output", frozen),
    )
    # a SavedModel version: every file and directory of the staged version, then the rename, then the base
    published = [i for i, c in enumerate(calls) if renamed_to(c) == (export_base, "1")]
    assert len(published) == 1, calls
    at = published[0]
    staged = {fsynced(c) for c in calls[:at]} - {None}
    version_files = [
        os.path.relpath(os.path.join(r, f), f"{export_base}/1") for r, _, fs in os.walk(f"{export_base}/1") for f in fs
    ]
    assert "saved_model.pb" in version_files and any(f.startswith("variables/") for f in version_files)
    for relative in version_files:
        assert any(
            p.endswith(f"/1/{relative}") or re.search(rf"/\.1\.ptf-tmp-[^/]+/{re.escape(relative)}$", p) for p in staged
        ), relative
    assert any(re.search(r"/\.1\.ptf-tmp-[^/]+/variables$", p) for p in staged)
    assert fsynced(calls[at + 1]) == export_base

    # a frozen graph: the staged file, then its link into place, then the directory
    calls = frozen_calls
    linked = [i for i, c in enumerate(calls) if renamed_to(c) == (os.path.dirname(frozen), "iris.pb")]
    assert len(linked) == 1, calls
    at = linked[0]
    assert re.search(r"/\.iris\.pb\.ptf-tmp-", fsynced(calls[at - 1]) or ""), calls[at - 2 : at + 1]
    assert fsynced(calls[at + 1]) == os.path.dirname(frozen)
