"""export_saved_model: TF Serving layout, signatures, idempotence, concurrency, bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import cli_command, export

from prefect_tensorflow.tasks.errors import CheckpointMismatchError
from prefect_tensorflow.tasks.export.saved_model import ExportError
from prefect_tensorflow.tasks.export.verification import ParityError, run_saved_model


def test_layout_signature_and_parity(trained_dir, tmp_path):
    import tensorflow as tf

    from prefect_tensorflow.tasks.export.signature import restore_model, serving_function
    from prefect_tensorflow.tasks.iris import read_iris

    result = export(trained_dir / "model.ckpt-300", tmp_path / "export")
    assert result.version == 1 and result.path == str(tmp_path / "export" / "1") and not result.reused
    version_dir = tmp_path / "export" / "1"
    assert (version_dir / "saved_model.pb").exists() and (version_dir / "variables").is_dir()
    assert (version_dir / "assets.extra" / "prefect_tensorflow.json").exists()
    assert sorted(result.signature.outputs) == ["class_ids", "logits", "probabilities"]
    assert list(result.signature.inputs) == ["features"]
    assert result.signature.inputs["features"].shape == [None, 4]
    assert result.parity.max_abs_diff <= 1e-5
    features = np.asarray(read_iris()[0], np.float32)
    served = run_saved_model(version_dir, [features])
    net = restore_model(str(trained_dir / "model.ckpt-300"), "prefect_tensorflow.tasks.iris:build_model")
    direct = serving_function(net)(tf.constant(features))
    np.testing.assert_allclose(served["probabilities"], direct["probabilities"].numpy(), atol=1e-6)
    np.testing.assert_array_equal(served["class_ids"], direct["class_ids"].numpy())
    assert [n for n in os.listdir(tmp_path / "export") if not n.startswith(".prefect")] == ["1"]


def test_saved_model_cli_shows_the_signature(trained_dir, tmp_path, cli_env):
    export(trained_dir / "model.ckpt-300", tmp_path / "export")
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run(
        [cli, "show", "--dir", str(tmp_path / "export" / "1"), "--all"], capture_output=True, text=True, env=cli_env, timeout=300
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    for text in (
        "signature_def['serving_default']",
        "inputs['features']",
        "outputs['logits']",
        "outputs['probabilities']",
        "outputs['class_ids']",
    ):
        assert text in shown.stdout


def test_same_checkpoint_again_returns_the_existing_version(trained_dir, tmp_path):
    first = export(trained_dir / "model.ckpt-300", tmp_path / "export")
    again = export(trained_dir / "model.ckpt-300", tmp_path / "export")
    assert again.reused and again.version == first.version and again.fingerprint == first.fingerprint
    other = export(trained_dir / "model.ckpt-200", tmp_path / "export")
    assert (other.version, other.reused) == (2, False)
    assert sorted(n for n in os.listdir(tmp_path / "export") if n.isdigit()) == ["1", "2"]


def test_two_processes_exporting_one_checkpoint_make_one_version(trained_dir, tmp_path, cli_env):
    cmd = cli_command(
        "export",
        str(trained_dir / "model.ckpt-300"),
        "--export-base",
        str(tmp_path / "export"),
        "--json",
    )
    procs = [subprocess.Popen(cmd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [json.loads(o[0]) for o in outs]
    assert {r["version"] for r in results} == {1}
    assert sorted(r["reused"] for r in results) == [False, True]
    assert [n for n in os.listdir(tmp_path / "export") if not n.startswith(".prefect")] == ["1"]


def test_tf1_checkpoint_exports_its_graph(tmp_path, tf1_checkpoints):
    tf1_checkpoints(tmp_path / "m")
    result = export(tmp_path / "m" / "model.ckpt-300", tmp_path / "export", output_nodes=["logits"])
    assert result.source_format == "tf1"
    assert list(result.signature.inputs) == ["features"] and list(result.signature.outputs) == ["logits"]
    assert result.parity.ok
    with pytest.raises(ExportError, match="has no serving signature"):
        export(tmp_path / "m" / "model.ckpt-200", tmp_path / "export")
    with pytest.raises(ExportError, match=r"output node\(s\) \['missing'\]"):
        export(tmp_path / "m" / "model.ckpt-200", tmp_path / "export", output_nodes=["missing"])
    (tmp_path / "m" / "model.ckpt-100.meta").unlink()
    with pytest.raises(Exception, match=r"model.ckpt-100.meta is missing"):
        export(tmp_path / "m" / "model.ckpt-100", tmp_path / "export", output_nodes=["logits"])
    assert sorted(n for n in os.listdir(tmp_path / "export") if not n.startswith(".")) == ["1"]


def test_failed_verification_leaves_no_version(trained_dir, tmp_path, monkeypatch):
    """A SavedModel that computes something else: TensorFlow's saver cannot be made to miscompute
    on demand, so the reloaded model's result is shifted after it ran (the one stand-in here)."""
    from prefect_tensorflow.tasks.export import saved_model as exporting

    export(trained_dir / "model.ckpt-200", tmp_path / "export")
    real = exporting.run_saved_model
    monkeypatch.setattr(exporting, "run_saved_model", lambda *a, **k: {n: v + 1 for n, v in real(*a, **k).items()})
    with pytest.raises(ParityError, match="no version was written"):
        export(trained_dir / "model.ckpt-300", tmp_path / "export")
    assert sorted(n for n in os.listdir(tmp_path / "export") if not n.startswith(".")) == ["1"]
    assert not [n for n in os.listdir(tmp_path / "export") if ".ptf-tmp-" in n]


def test_checkpoint_of_another_model(trained_dir, tmp_path):
    with pytest.raises(CheckpointMismatchError):
        export(trained_dir / "model.ckpt-300", tmp_path / "export", model="models_for_tests:deeper_model")
    assert not (tmp_path / "export").exists()  # a failed export into a new base leaves no base behind


def test_export_base_with_other_entries_is_refused_and_untouched(trained_dir, tmp_path):
    base = tmp_path / "export"
    base.mkdir()
    (base / "notes.txt").write_text("mine")
    (base / "1").mkdir()
    with pytest.raises(ExportError, match="holds entries that are not version directories: notes.txt"):
        export(trained_dir / "model.ckpt-300", base)
    assert sorted(os.listdir(base)) == ["1", "notes.txt"]  # not even a lock file left behind
    assert (base / "notes.txt").read_text() == "mine"


def test_unusable_export_base(trained_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export(trained_dir / "model.ckpt-300", blocker)
    with pytest.raises(ExportError, match="cannot be created"):
        export(trained_dir / "model.ckpt-300", blocker / "under-a-file")


def test_verify_reports_each_pair(trained_dir, tmp_path):
    from helpers import freeze

    from prefect_tensorflow.tasks.export.verification import verify_artifacts

    frozen = freeze(trained_dir / "model.ckpt-300", tmp_path / "iris.pb")
    exported = export(trained_dir / "model.ckpt-300", tmp_path / "export")
    report = verify_artifacts(str(trained_dir / "model.ckpt-300"), frozen_graph=frozen.path, saved_model=exported.path)
    assert report.ok
    assert set(report.pairs) == {"checkpoint vs frozen_graph", "checkpoint vs saved_model", "frozen_graph vs saved_model"}
    with pytest.raises(ParityError) as info:
        verify_artifacts(str(trained_dir / "model.ckpt-100"), frozen_graph=frozen.path, saved_model=exported.path)
    stale = info.value.report
    assert not stale.ok and stale.pairs["checkpoint vs saved_model"].max_abs_diff > 1e-3
    assert stale.pairs["frozen_graph vs saved_model"].ok


def test_cli_freeze_export_verify(trained_dir, tmp_path):
    from typer.testing import CliRunner

    from prefect_tensorflow.flows.cli import app

    runner = CliRunner()
    ckpt = str(trained_dir / "model.ckpt-300")
    frozen = runner.invoke(app, ["freeze", ckpt, "--output", str(tmp_path / "f.pb"), "--json"])
    assert frozen.exit_code == 0, frozen.output
    assert json.loads(frozen.stdout)["outputs"]["class_ids"] == "class_ids:0"
    exported = runner.invoke(app, ["export", ckpt, "--export-base", str(tmp_path / "e"), "--json"])
    assert json.loads(exported.stdout)["version"] == 1
    verified = runner.invoke(
        app, ["verify", ckpt, "--frozen-graph", str(tmp_path / "f.pb"), "--saved-model", str(tmp_path / "e" / "1")]
    )
    assert verified.exit_code == 0 and verified.stdout.count(" ok") == 3
    mismatch = runner.invoke(app, ["verify", str(trained_dir / "model.ckpt-0"), "--saved-model", str(tmp_path / "e" / "1")])
    assert mismatch.exit_code == 1 and "MISMATCH" in mismatch.stdout
    bad = runner.invoke(app, ["export", ckpt, "--export-base", str(tmp_path / "f.pb")])
    assert bad.exit_code == 2 and "is a file" in bad.stderr


def test_a_tampered_version_is_not_reused(trained_dir, tmp_path):
    first = export(trained_dir / "model.ckpt-300", tmp_path / "export")
    with open(os.path.join(first.path, "saved_model.pb"), "ab") as handle:
        handle.write(b"\0")  # edited after publishing
    again = export(trained_dir / "model.ckpt-300", tmp_path / "export")
    assert (again.version, again.reused) == (2, False)
    assert os.path.exists(first.path)  # nothing existing is removed


def test_verify_task_fails_on_a_mismatch(prefect_api, trained_dir, tmp_path):
    from prefect import flow

    from prefect_tensorflow.tasks import verify_artifacts

    exported = export(trained_dir / "model.ckpt-300", tmp_path / "export")

    @flow
    def audit(checkpoint: str) -> float:
        report = verify_artifacts(checkpoint, saved_model=exported.path)
        return max(p.max_abs_diff for p in report.pairs.values())

    assert audit(str(trained_dir / "model.ckpt-300")) <= 1e-5
    with pytest.raises(ParityError, match="artifacts differ by more than"):
        audit(str(trained_dir / "model.ckpt-0"))


# --- the export base swapped mid-export, its lock file a symlink (issue 19, class 6) ----------------


@pytest.fixture
def deployment_run(monkeypatch, tmp_path):
    """Exporting as a deployment run does it (untrusted), with the roots at `<tmp>/roots`."""
    from prefect_tensorflow.tasks import model_code, security
    from prefect_tensorflow.tasks.checkpoints import files as checkpoint_files
    from prefect_tensorflow.tasks.checkpoints import meta_graph
    from prefect_tensorflow.tasks.export import export_base
    from prefect_tensorflow.tasks.storage import confined_dirs

    for module in (checkpoint_files, confined_dirs, export_base, meta_graph, model_code, security):
        monkeypatch.setattr(module, "in_deployment_run", lambda: True)
    roots = tmp_path / "roots"
    roots.mkdir()
    monkeypatch.setenv("PREFECT_TENSORFLOW_ROOTS", str(roots))
    return roots


@pytest.mark.parametrize("untrusted", [True, False])
@pytest.mark.parametrize("fresh", [True, False])
def test_an_export_base_swapped_for_a_symlink_mid_export_publishes_nothing_anywhere(
    trained_dir, tmp_path, monkeypatch, request, untrusted, fresh
):
    import shutil

    from prefect_tensorflow.tasks.errors import StorageError
    from prefect_tensorflow.tasks.export import saved_model as exporting

    roots = request.getfixturevalue("deployment_run") if untrusted else tmp_path / "roots"
    model_dir, base, outside = roots / "models" / "iris", roots / "runs" / "exports", tmp_path / "outside"
    shutil.copytree(trained_dir, model_dir)
    outside.mkdir()
    if not fresh:
        base.mkdir(parents=True)
    original = exporting._save_tf2

    def swapping(*args, **kwargs):  # after the base was checked, opened and locked; before the SavedModel is written
        os.rename(base, str(base) + ".moved")
        os.symlink(outside, base)
        return original(*args, **kwargs)

    monkeypatch.setattr(exporting, "_save_tf2", swapping)
    with pytest.raises(
        StorageError, match=r"export_base .*exports was (moved or )?replaced.* while the run used it.*nothing was published"
    ):
        export(model_dir / "model.ckpt-300", base)
    assert os.listdir(outside) == []  # no version, no lock file, no temporary
    left = os.listdir(str(base) + ".moved")
    assert [n for n in left if n != ".prefect-tensorflow.lock"] == [], left  # nothing published, the staging removed


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_never_created(trained_dir, tmp_path):
    from prefect_tensorflow.tasks.errors import StorageError

    base, target = tmp_path / "exports", tmp_path / "outside" / "authorized_keys"
    base.mkdir()
    target.parent.mkdir()
    (base / ".prefect-tensorflow.lock").symlink_to(target)
    with pytest.raises(StorageError, match=r"lock file .*\.prefect-tensorflow\.lock is a symbolic link; refused"):
        export(trained_dir / "model.ckpt-300", base)
    assert not target.exists() and os.listdir(base) == [".prefect-tensorflow.lock"]


def test_an_untrusted_export_base_through_a_symlink_is_refused_and_creates_nothing(trained_dir, tmp_path, deployment_run):
    import shutil

    from prefect_tensorflow.tasks.errors import UnsafeParameterError

    model_dir, outside = deployment_run / "models" / "iris", tmp_path / "outside"
    shutil.copytree(trained_dir, model_dir)
    outside.mkdir()
    (deployment_run / "escape").symlink_to(outside)
    with pytest.raises(UnsafeParameterError, match=r"export_base: .*escape is a symbolic link"):
        export(model_dir / "model.ckpt-300", deployment_run / "escape" / "new" / "exports")
    assert os.listdir(outside) == []
    result = export(model_dir / "model.ckpt-300", deployment_run / "runs" / "exports")  # a sound one exports
    assert result.version == 1 and os.path.isdir(result.path)
    assert export(model_dir / "model.ckpt-300", deployment_run / "runs" / "exports").reused
