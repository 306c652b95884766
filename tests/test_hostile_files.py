"""Hostile files and swaps: what a run reads out of files, and directories replaced during a run (issue 19, 4 and 6).

Class 4, paths read from files inside the roots: a model dir inside the roots
whose `checkpoint` state file names a checkpoint outside them (an absolute
path, or `../`) must not make `export-checkpoint` export and register that
checkpoint. Class 6, swaps during a run: an export base or frozen dir replaced
by a symlink to a directory outside the roots between the run's checks and its
writes must not make the run write, lock or publish anything there. The same
for `retrain-iris`'s own model dir: a state file whose kept list names
checkpoints outside the roots (recent, past `keep_checkpoint_max`) must not
make the keep policy delete them, and a model dir swapped for a symlink out of
the roots mid-training must get nothing more.

The first part tests the pieces directly (`confined_dirs`, the `dir_fd` forms
of `storage`'s publish helpers, the MLflow clients' artifact-location check);
the second serves both deployments for real (`prefect server start` +
`prefect-tensorflow serve`, as `make serve` does) and sends runs through the
API the Run form posts to. A snapshot of the whole test root (the roots, a
canary dir outside them) and of the MLflow registry is taken before and after:
outside each run's own output nothing may change, and nothing is registered.
The swap is made deterministic by the model builder `swap_models:build_after_swapping`
(allowed for this worker), which the flow calls after the directory was
checked and opened and before anything is written into it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from served import REPO, ServedDeployments
from snapshots import changed, tree_snapshot

from prefect_tensorflow.tasks.child_processes import log_tail
from prefect_tensorflow.tasks.errors import StorageError, UnsafeParameterError
from prefect_tensorflow.tasks.storage.confined_dirs import open_directory
from prefect_tensorflow.tasks.storage.local import (
    LOCK_FILE,
    exclusive_lock,
    remove_abandoned_temporaries,
    staged_directory,
    staged_file,
)

# --- the pieces ----------------------------------------------------------------------------------


def _swap(directory: Path, outside: Path) -> None:
    os.rename(directory, str(directory) + ".moved")
    os.symlink(outside, directory)


def test_a_confined_directory_is_walked_from_its_root_without_following_symlinks(tmp_path):
    roots, outside = tmp_path / "roots", tmp_path / "outside"
    (roots / "a").mkdir(parents=True)
    outside.mkdir()
    (roots / "a" / "escape").symlink_to(outside)
    (roots / "inside-link").symlink_to(roots / "a")

    with open_directory(
        str(roots / "a" / "b" / "c"), parameter="export_base", create=True, untrusted=True, roots=[str(roots)]
    ) as d:
        assert d.created and d.confined and d.root == str(roots)
        assert os.path.samestat(os.fstat(d.fd), os.stat(roots / "a" / "b" / "c"))
        assert d.entry("x") == f"/proc/self/fd/{d.fd}/x"
    for path, match in (
        (roots / "a" / "escape" / "new", r"export_base: .*/a/escape is a symbolic link"),
        (roots / "inside-link" / "new", r"inside-link is a symbolic link"),  # resolve it first (confine does)
        (outside / "new", "is outside the allowed roots"),
        (roots / "a" / ".." / ".." / "outside", "is outside the allowed roots"),
    ):
        with pytest.raises(UnsafeParameterError, match=match):
            open_directory(str(path), parameter="export_base", create=True, untrusted=True, roots=[str(roots)])
    assert os.listdir(outside) == []
    (roots / "file").write_text("x")
    with pytest.raises(StorageError, match="is not a directory"):
        open_directory(str(roots / "file" / "sub"), parameter="frozen_dir", create=True, untrusted=True, roots=[str(roots)])
    with pytest.raises(FileNotFoundError):
        open_directory(str(roots / "missing"), parameter="frozen_dir", untrusted=True, roots=[str(roots)])
    # a trusted caller follows symlinks as before, and is pinned all the same
    with open_directory(str(roots / "a" / "escape"), parameter="export_base", untrusted=False) as d:
        assert not d.confined and os.path.samestat(os.fstat(d.fd), os.stat(outside))


@pytest.mark.parametrize("untrusted", [True, False])
@pytest.mark.parametrize("kind", ["directory", "file"])
def test_a_symlink_swapped_in_between_opening_and_publishing_gets_nothing(tmp_path, untrusted, kind):
    roots, outside = tmp_path / "roots", tmp_path / "outside"
    target = roots / "runs" / "exports"
    target.mkdir(parents=True)
    outside.mkdir()
    with open_directory(str(target), parameter="export_base", untrusted=untrusted, roots=[str(roots)]) as d:
        stage = staged_directory("1", parent=d) if kind == "directory" else staged_file("graph.pb", parent=d)
        with pytest.raises(StorageError, match=r"export_base .*exports was (moved or )?replaced.* nothing was published"):
            with stage as tmp:
                assert tmp.startswith(f"/proc/self/fd/{d.fd}/")
                if kind == "directory":
                    Path(tmp, "saved_model.pb").write_bytes(b"pb")
                else:
                    Path(tmp).write_bytes(b"pb")
                _swap(target, outside)  # between the checks and the publishing rename
                if kind == "directory":  # later writes still go into the pinned directory
                    Path(tmp, "variables").mkdir()
                else:
                    with open(tmp, "ab") as handle:
                        handle.write(b"more")
    assert os.listdir(outside) == []
    assert os.listdir(str(target) + ".moved") == []  # nothing published, the staging removed


def test_publishing_through_the_handle_renames_inside_the_pinned_directory(tmp_path):
    target = tmp_path / "frozen"
    target.mkdir()
    with open_directory(str(target), parameter="frozen_dir", untrusted=True, roots=[str(tmp_path)]) as d:
        with staged_file(str(target / "g.pb"), parent=d) as tmp:
            Path(tmp).write_bytes(b"graph")
        with staged_directory("1", parent=d) as tmp:
            Path(tmp, "saved_model.pb").write_bytes(b"pb")
        with pytest.raises(StorageError, match="already exists; nothing was replaced"):
            with staged_directory("1", parent=d) as tmp:
                Path(tmp, "saved_model.pb").write_bytes(b"pb2")
        with pytest.raises(StorageError, match="expected a name in"):
            with staged_file(str(tmp_path / "elsewhere" / "g.pb"), parent=d):
                pass
        abandoned = target / ".x.ptf-tmp-older-layout"
        abandoned.mkdir()
        assert remove_abandoned_temporaries(str(target), directory=d) == [str(abandoned)]
    assert sorted(os.listdir(target)) == ["1", "g.pb"]
    assert (target / "g.pb").read_bytes() == b"graph" and (target / "1" / "saved_model.pb").read_bytes() == b"pb"


def test_verifying_a_confined_directory_leaks_no_descriptor(tmp_path):
    # training verifies its model dir before every commit: a leak per verify ends a long training (EMFILE)
    with open_directory(
        str(tmp_path / "a" / "b"), parameter="model_dir", create=True, untrusted=True, roots=[str(tmp_path)]
    ) as d:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(200):
            d.verify()
        assert len(os.listdir("/proc/self/fd")) == before


def test_the_lock_file_is_never_followed(tmp_path):
    target = tmp_path / "outside" / "victim"
    target.parent.mkdir()
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / LOCK_FILE).symlink_to(target)
    with pytest.raises(StorageError, match="is a symbolic link; refused"):
        with exclusive_lock(str(tmp_path / "base")):
            pass
    with open_directory(str(tmp_path / "base"), parameter="export_base", untrusted=True, roots=[str(tmp_path)]) as d:
        with pytest.raises(StorageError, match="is a symbolic link; refused"):
            with exclusive_lock(d.path, parent=d):
                pass
    assert not target.exists()
    os.mkfifo(tmp_path / "fifo-base-lock")
    (tmp_path / "fifo").mkdir()
    os.rename(tmp_path / "fifo-base-lock", tmp_path / "fifo" / LOCK_FILE)
    with pytest.raises(StorageError, match="is not a regular file"):
        with exclusive_lock(str(tmp_path / "fifo")):
            pass


def test_a_local_artifact_location_outside_the_roots_is_refused_in_a_deployment_run(tmp_path, monkeypatch):
    from prefect_tensorflow.tasks import run_context
    from prefect_tensorflow.tasks.registry.mlflow_client import check_artifact_location, connection_client
    from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig

    roots, outside = tmp_path / "roots", tmp_path / "outside"
    (roots / "mlflow").mkdir(parents=True)
    outside.mkdir()
    monkeypatch.setenv("PREFECT_TENSORFLOW_ROOTS", str(roots))
    uri = f"sqlite:///{roots}/mlflow/mlflow.db"
    client = connection_client(MlflowConfig(tracking_uri=uri, registry_uri=uri))
    # whoever may use the MLflow identity can create an experiment whose artifacts go anywhere on this disk
    experiment = client.create_experiment("elsewhere", artifact_location=outside.as_uri())
    run = client.create_run(experiment).info.run_id
    (tmp_path / "graph.pb").write_bytes(b"pb")
    monkeypatch.setattr(run_context, "in_deployment_run", lambda: True)
    with pytest.raises(UnsafeParameterError, match=rf"mlflow: the MLflow answer for run {run} names the local artifact location"):
        client.log_artifact(run, str(tmp_path / "graph.pb"), "frozen_graph")
    assert os.listdir(outside) == []
    check_artifact_location((roots / "mlflow" / "artifacts").as_uri(), uri, what="run x")  # beside the store: fine
    check_artifact_location("mlflow-artifacts:/1/x/artifacts", "http://127.0.0.1:5000", what="run x")  # the server's
    monkeypatch.setattr(run_context, "in_deployment_run", lambda: False)
    client.log_artifact(run, str(tmp_path / "graph.pb"), "frozen_graph")  # a library caller: as before
    assert os.listdir(outside) != []


# --- through a real served deployment ------------------------------------------------------------

LIMIT = 5
RUN_TIMEOUT = 1200
TARGET = "hostile-files"
SWAPPING = "swap_models:build_after_swapping"


@pytest.fixture(scope="module")
def served_files(tmp_path_factory, trained_dir, prefect_database):
    """Both deployments served for real, confined to `<root>/roots`, and the files the runs will meet.

    <root>/roots/                      PREFECT_TENSORFLOW_ROOTS
        data/                          PREFECT_TENSORFLOW_HOME (MLflow store in data/mlflow)
        data/runs/<case>/              each run's own output (export_base, frozen_dir)
        models/iris/                   a trained model dir
        models/pointer-absolute/       state file: model_checkpoint_path "<root>/canary/iris/model.ckpt-300"
        models/pointer-dotdot/         state file: "../../../canary/iris/model.ckpt-300" (both with the metrics
                                       log, so that before the fix the outside checkpoint was registered)
    <root>/canary/iris/                outside the roots: a trained model dir
    <root>/canary/iris-keep/           outside the roots: a trained model dir a retrain's state file names
    <root>/canary/swap-target/         outside the roots: where the swapped-in symlinks point
    <root>/swap-plan.json              what `swap_models` swaps (PTF_TEST_SWAP_PLAN)
    """
    root = tmp_path_factory.mktemp("hostile-files")
    roots, canary, data = root / "roots", root / "canary", root / "roots" / "data"
    for path in (data / "runs", roots / "models", canary / "swap-target", data / "mlflow"):
        path.mkdir(parents=True)
    shutil.copytree(trained_dir, roots / "models" / "iris")
    shutil.copytree(trained_dir, canary / "iris")
    shutil.copytree(trained_dir, canary / "iris-keep")
    for name, named in (
        ("pointer-absolute", str(canary / "iris" / "model.ckpt-300")),
        ("pointer-dotdot", "../../../canary/iris/model.ckpt-300"),
    ):
        model_dir = roots / "models" / name
        model_dir.mkdir()
        # the metrics the gate reads, so that the outside checkpoint would go all the way to the registry
        shutil.copyfile(trained_dir / "checkpoint_metrics.jsonl", model_dir / "checkpoint_metrics.jsonl")
        tmp = model_dir / ".checkpoint.tmp"  # written as TensorFlow does: renamed in, the model dir's last change
        tmp.write_text(f'model_checkpoint_path: "{named}"\nall_model_checkpoint_paths: "{named}"\n')
        os.replace(tmp, model_dir / "checkpoint")
    environ = ServedDeployments.environ_for(
        root,
        PREFECT_TENSORFLOW_HOME=str(data),
        PREFECT_TENSORFLOW_ROOTS=str(roots),
        PREFECT_TENSORFLOW_ALLOWED_MODULES="swap_models",
        MLFLOW_TRACKING_URI=f"sqlite:///{data}/mlflow/mlflow.db",
        PYTHONPATH=str(REPO / "tests"),
        PTF_TEST_SWAP_PLAN=str(root / "swap-plan.json"),
    )
    stack = ServedDeployments(root, environ, limit=LIMIT, database=prefect_database)
    ctx = {
        "trained_dir": trained_dir,
        "root": root,
        "roots": roots,
        "data": data,
        "canary": canary,
        "stack": stack,
        "mlflow_uri": environ["MLFLOW_TRACKING_URI"],
    }
    _mlflow_versions(ctx)  # creates the store before any run does
    try:
        stack.start_server()
        stack.start_serve()
        yield ctx
    finally:
        stack.stop()


def _mlflow_versions(ctx) -> dict[tuple[str, str], tuple]:
    from mlflow import MlflowClient

    client = MlflowClient(ctx["mlflow_uri"], ctx["mlflow_uri"])
    return {(v.name, str(v.version)): (v.source, v.run_id) for v in client.search_model_versions(max_results=10000)}


def _fs_snapshot(ctx) -> dict[str, tuple]:
    """Every entry under the test root, but the servers' own files, the worker's gate cache and the swap plan.

    The gate cache (`<PREFECT_TENSORFLOW_HOME>/gate-cache`) is the worker's own, as its MLflow store is: a
    promoted run writes its version's outcomes there, under a name made of digests, not of parameters.
    """
    root, stack, data = ctx["root"], ctx["stack"], ctx["data"]
    skip = {
        root / "prefect-home",
        stack.server_log,
        stack.serve_log,
        data / "mlflow",
        data / "gate-cache",
        root / "swap-plan.json",
    }
    return tree_snapshot([root], skip)


def _run_all(ctx, cases: dict[str, dict[str, Any]], deployment: str = "export-checkpoint") -> dict[str, Any]:
    """Create one `deployment` run per case (name `files-<case>`), wait for all; the final runs by case."""
    stack = ctx["stack"]
    with stack.api() as client:
        ids = {case: stack.create_run(client, deployment, params, name=f"files-{case}") for case, params in cases.items()}
        runs = stack.wait(client, list(ids.values()), RUN_TIMEOUT)
    return {case: runs.get(run_id) for case, run_id in ids.items()}


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_files_naming_paths_outside_and_directories_swapped_mid_run_change_nothing_outside(served_files):
    ctx = served_files
    roots, data, canary = ctx["roots"], ctx["data"], ctx["canary"]
    own = {
        case: data / "runs" / case
        for case in ("state-absolute", "state-dotdot", "swap-export", "swap-frozen", "control", "retrain-keep", "swap-train")
    }
    for path in own.values():
        path.mkdir()
    target = canary / "swap-target"
    (ctx["root"] / "swap-plan.json").write_text(
        json.dumps(
            [
                {"path": str(own["swap-export"] / "exports"), "to": str(target)},
                {"path": str(own["swap-frozen"] / "frozen"), "to": str(target)},
            ]
        )
    )

    def params(case: str, model_dir: Path, model: str = "iris") -> dict[str, Any]:
        return {
            "model_dir": str(model_dir),
            "checkpoint": "latest",
            "registered_model_name": f"{TARGET}-{case}",
            "model": model,
            "data": "iris",
            "export_base": str(own[case] / "exports"),
            "frozen_dir": str(own[case] / "frozen"),
        }

    cases = {
        "state-absolute": params("state-absolute", roots / "models" / "pointer-absolute"),
        "state-dotdot": params("state-dotdot", roots / "models" / "pointer-dotdot"),
        "swap-export": params("swap-export", roots / "models" / "iris", SWAPPING),
        "swap-frozen": params("swap-frozen", roots / "models" / "iris", SWAPPING),
        "control": params("control", roots / "models" / "iris", SWAPPING),  # the same builder, nothing to swap
    }
    # retrain-iris: a model dir (the run's own) resumed under a state file whose kept list names two
    # checkpoints outside the roots, recent, which keep_checkpoint_max=1 would drop (and delete)
    keep_dir = own["retrain-keep"] / "model"
    shutil.copytree(ctx["trained_dir"], keep_dir)
    for name in os.listdir(keep_dir):
        if name.startswith("model.ckpt-") and not name.startswith("model.ckpt-300."):
            os.remove(keep_dir / name)
    now = time.time()
    kept = [str(canary / "iris-keep" / "model.ckpt-100"), str(canary / "iris-keep" / "model.ckpt-200"), "model.ckpt-300"]
    (keep_dir / ".checkpoint.tmp").write_text(
        'model_checkpoint_path: "model.ckpt-300"\n'
        + "".join(f'all_model_checkpoint_paths: "{p}"\n' for p in kept)
        + "".join(f"all_model_checkpoint_timestamps: {now - 30 + i}\n" for i in range(len(kept)))
        + f"last_preserved_timestamp: {now - 3600}\n"
    )
    os.replace(keep_dir / ".checkpoint.tmp", keep_dir / "checkpoint")

    def retrain_params(case: str, model: str = "iris") -> dict[str, Any]:
        policy = {"save_checkpoints_steps": 10, "keep_checkpoint_max": 1}
        return {
            "model_dir": str(own[case] / "model"),
            "training": {"model": model, "data": "iris", "more_steps": 20, "evaluation": "in_loop", "policy": policy},
            "export_base": str(own[case] / "exports"),
            "frozen_dir": str(own[case] / "frozen"),
            "registered_model_name": f"{TARGET}-{case}",
            "track": False,
        }

    retrain_cases = {
        "retrain-keep": retrain_params("retrain-keep"),
        # the builder swaps the model dir (created by the run, already opened) before the first write
        "swap-train": retrain_params("swap-train", SWAPPING),
    }
    fs_before, versions_before = _fs_snapshot(ctx), _mlflow_versions(ctx)
    started = time.monotonic()
    runs = _run_all(ctx, cases)
    # then the retrains, once no export run's builder can swap anything else: the plan names the model dir only
    (ctx["root"] / "swap-plan.json").write_text(json.dumps([{"path": str(own["swap-train"] / "model"), "to": str(target)}]))
    runs.update(_run_all(ctx, retrain_cases, "retrain-iris"))
    elapsed = time.monotonic() - started
    fs_after, versions_after = _fs_snapshot(ctx), _mlflow_versions(ctx)

    states = {case: (run.state.type.value if run and run.state else None) for case, run in runs.items()}
    messages = {case: (run.state.message or "" if run and run.state else "") for case, run in runs.items()}
    expected = {
        "state-absolute": f"checkpoint names {canary}/iris/model.ckpt-300, outside the model dir {roots}/models/pointer-absolute",
        "state-dotdot": f"checkpoint names ../../../canary/iris/model.ckpt-300, outside the model dir {roots}/models/pointer-dotdot",
        "swap-export": f"export_base {own['swap-export']}/exports was moved or replaced while the run used it",
        "swap-frozen": f"output {own['swap-frozen']}/frozen was moved or replaced while the run used it",
        "retrain-keep": f"{keep_dir}/checkpoint names {canary}/iris-keep/model.ckpt-100, outside the model dir {keep_dir}",
        "swap-train": f"model_dir {own['swap-train']}/model was moved or replaced while the run used it",
    }
    touched = changed(fs_before, fs_after)
    scratch = str(data / "scratch")
    allowed = [str(p) for p in own.values()]
    outside_own = [
        p
        for p in touched
        if not any(p == a or p.startswith(a + os.sep) for a in allowed)
        and p not in (str(data), str(data / "runs"), scratch)
        and not p.startswith(scratch + os.sep)
    ]
    new_versions = sorted(set(versions_after) - set(versions_before))
    summary = (
        f"hostile files: {len(expected)} export-checkpoint and retrain-iris runs through a served deployment (state "
        f"file naming a checkpoint outside the roots, absolute and ../; export base and frozen dir swapped for a symlink "
        f"out of the roots mid-run; retrain: a state file keeping checkpoints outside the roots past "
        f"keep_checkpoint_max, a model dir swapped for a symlink mid-training): {sum(states[c] == 'FAILED' and expected[c] in messages[c] for c in expected)} failed naming "
        f"the file or directory; {len(outside_own)} changes outside the runs' own output, {len(os.listdir(target))} "
        f"entries in the swap target, new versions {[name for name, _ in new_versions]}; control {states['control']}; "
        f"{elapsed:.0f} s"
    )
    print("\n" + summary)
    warnings.warn(summary, UserWarning, stacklevel=1)  # shown in the -ra summary

    problems = []
    for case, text in expected.items():
        if states[case] != "FAILED" or text not in messages[case]:
            problems.append(f"{case}: {states[case]}: {messages[case][:500]} (expected FAILED naming {text!r})")
    if states["control"] != "COMPLETED":
        problems.append(
            f"control: {states['control']}: {messages['control'][:500]}\n{log_tail(str(ctx['stack'].serve_log), 3000)}"
        )
    problems += [f"changed outside the runs' own output: {p}" for p in outside_own]
    if os.listdir(target):
        problems.append(f"written into the swap target outside the roots: {os.listdir(target)}")
    if [name for name, _ in new_versions] != [f"{TARGET}-control"]:
        problems.append(f"registered: {new_versions}")
    for case in ("swap-export", "swap-frozen"):  # what the swap moved stays inside the run's own output, unpublished
        moved = Path(str(own[case] / ("exports" if case == "swap-export" else "frozen")) + ".moved")
        if not moved.is_dir() or [n for n in os.listdir(moved) if n != LOCK_FILE]:
            problems.append(f"{case}: {moved} holds {os.listdir(moved) if moved.is_dir() else 'nothing (missing)'}")
    moved = Path(str(own["swap-train"] / "model") + ".moved")  # what training wrote before the swap was noticed
    if not moved.is_dir() or [n for n in os.listdir(moved) if n == "checkpoint" or n.endswith(".index")]:
        problems.append(f"swap-train: {moved} holds {os.listdir(moved) if moved.is_dir() else 'nothing (missing)'}")
    assert (own["control"] / "exports" / "1" / "saved_model.pb").exists() or problems, "the control run exported nothing"
    assert not problems, summary + "\n" + "\n".join(problems)
