"""`sync-exports`: an export base on S3 or GCS mirrored to the local directory TF Serving polls.

Real parts: the session's moto S3 server and fake-gcs-server (`bucket`, once each), real SavedModel
exports, a real MLflow registry (`mlflow_store`) whose aliases choose the versions kept, the flow under
a real Prefect API, the CLI, and a sync process killed mid-download.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from helpers import export, run_and_kill
from typer.testing import CliRunner

from prefect_tensorflow.flows.cli import app
from prefect_tensorflow.tasks.errors import ExportError, RegistryError
from prefect_tensorflow.tasks.export.export_base import saved_model_digest
from prefect_tensorflow.tasks.export.mirror import MANIFEST, alias_export_versions, mirror_exports

TAGS = "prefect_tensorflow."


@pytest.fixture
def exported(bucket, trained_dir):
    """Three versions (steps 100, 200, 300) of an export base on the bucket: base URI, version -> digest."""
    base = bucket.uri("exports/iris")
    digests = {}
    for step in (100, 200, 300):
        result = export(trained_dir / f"model.ckpt-{step}", base)
        digests[result.version] = result.digest
    assert sorted(digests) == [1, 2, 3]
    return base, digests


def _versions(target: Path) -> list[int]:
    return sorted(int(p.name) for p in target.iterdir() if p.name.isdigit())


def _hidden_leftovers(target: Path) -> list[str]:
    return [p.name for p in target.iterdir() if ".ptf-tmp-" in p.name]


def _register(client, name: str, base: str, version: int) -> str:
    """A model version whose lineage tags say it was exported as `<base>/<version>`, as registration writes them."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException:  # already there
        pass
    mv = client.create_model_version(
        name,
        f"{base}/{version}",
        tags={TAGS + "export.dir": f"{base}/{version}", TAGS + "export.version": str(version)},
    )
    return mv.version


def test_mirror_adds_complete_verified_versions_and_skips_what_is_there(exported, tmp_path):
    base, digests = exported
    target = tmp_path / "serving" / "iris"
    first = mirror_exports(base, str(target))
    assert (first.added, first.removed, first.kept, first.refused) == ([1, 2, 3], [], [], {})
    assert _versions(target) == [1, 2, 3]
    for version, digest in digests.items():
        assert saved_model_digest(str(target / str(version))) == digest  # byte for byte what was exported
    manifest = json.loads((target / MANIFEST).read_text())
    assert manifest["source"] == base and set(manifest["versions"]) == {"1", "2", "3"}
    again = mirror_exports(base, str(target), versions=[3, 2, 1])
    assert (again.added, again.removed, again.kept) == ([], [], [1, 2, 3])
    assert _hidden_leftovers(target) == []


def test_aliases_choose_what_is_served_and_a_rollback_brings_the_old_version_back(exported, tmp_path, mlflow_store, prefect_api):
    from prefect_tensorflow.flows.sync_exports import sync_exports

    base, _ = exported
    target = tmp_path / "serving"
    client = mlflow_store.client()
    registered = {export_version: _register(client, "iris", base, export_version) for export_version in (1, 2, 3)}
    client.set_registered_model_alias("iris", "champion", registered[2])
    client.set_registered_model_alias("iris", "challenger", registered[3])
    kept_by = ["champion", "challenger"]

    mirror_exports(base, str(target))  # everything first, as a plain mirror had it
    result = sync_exports(export_base=base, target_dir=str(target), aliases=kept_by, mlflow=mlflow_store)
    assert (result.added, result.removed, result.kept) == ([], [1], [2, 3])
    assert result.aliases == {"champion": 2, "challenger": 3} and _versions(target) == [2, 3]

    # a rollback to version 1, the challenger retired: TF Serving's directory follows
    client.set_registered_model_alias("iris", "champion", registered[1])
    client.delete_registered_model_alias("iris", "challenger")
    result = sync_exports(export_base=base, target_dir=str(target), aliases=kept_by, mlflow=mlflow_store)
    assert (result.added, result.removed, result.kept, result.served) == ([1], [2, 3], [], [1])
    assert _versions(target) == [1] and _hidden_leftovers(target) == []

    # the CLI: the same flow, its answer as JSON
    client.set_registered_model_alias("iris", "challenger", registered[3])
    cli = CliRunner().invoke(
        app,
        [
            "sync",
            "--export-base",
            base,
            "--target-dir",
            str(target),
            "--alias",
            "champion",
            "--alias",
            "challenger",
            "--tracking-uri",
            mlflow_store.tracking_uri,
            "--json",
        ],
        catch_exceptions=False,
    )
    assert cli.exit_code == 0, cli.output
    answer = json.loads(cli.stdout)
    assert (answer["added"], answer["removed"], answer["kept"]) == ([3], [], [1])


def test_aliases_that_name_nothing_here_leave_the_mirror_alone(mlflow_store):
    base = "s3://team/exports/iris"
    client = mlflow_store.client()
    elsewhere = _register(client, "iris", "s3://other-bucket/exports/iris", 1)
    client.set_registered_model_alias("iris", "champion", elsewhere)
    with pytest.raises(RegistryError, match=r"no alias of 'iris' among @champion, @challenger names a version exported to"):
        alias_export_versions(client, "iris", ["champion", "challenger"], base)
    _register(client, "iris", base, 4)
    client.set_registered_model_alias("iris", "challenger", "2")
    assert alias_export_versions(client, "iris", ["champion", "challenger"], base) == {"challenger": 4}


def test_a_target_that_is_not_a_mirror_is_refused(s3, tmp_path, trained_dir):
    base = s3.uri("exports/iris")  # refused before the export base is read
    with pytest.raises(ExportError, match="holds entries that are not version directories"):
        mirror_exports(base, str(trained_dir))
    local_base = tmp_path / "exports"
    export(trained_dir / "model.ckpt-100", local_base)  # a local export base: version dirs, no manifest
    with pytest.raises(ExportError, match="it is not a mirror"):
        mirror_exports(base, str(local_base))
    assert _versions(local_base) == [1]
    with pytest.raises(ExportError, match="is a local directory, which TF Serving reads itself"):
        mirror_exports(str(local_base), str(tmp_path / "serving"))


def test_a_version_whose_files_differ_from_its_record_is_never_put_in_place(exported, bucket, tmp_path):
    base, _ = exported
    prefix = base.split("/", 3)[3]
    bucket.put(f"{prefix}/2/variables/variables.index", b"not the exported bytes")
    target = tmp_path / "serving"
    result = mirror_exports(base, str(target))
    assert result.added == [1, 3] and list(result.refused) == [2]
    assert "differs from the export's record" in result.refused[2]
    assert _versions(target) == [1, 3] and _hidden_leftovers(target) == []
    only_the_bad_one = mirror_exports(base, str(target), versions=[2])  # e.g. @champion moved to it
    assert list(only_the_bad_one.refused) == [2] and only_the_bad_one.removed == []
    assert _versions(target) == [1, 3]  # what served before keeps serving


def test_a_sync_killed_mid_download_leaves_no_partial_version(exported, bucket, tmp_path):
    base, _ = exported
    target = tmp_path / "serving"
    target.mkdir()
    script = (
        "import sys; from prefect_tensorflow.tasks.export.mirror import mirror_exports; mirror_exports(sys.argv[1], sys.argv[2])"
    )
    env = {**os.environ, **bucket.env}

    def downloading() -> bool:  # a version's temporary holds files, not yet renamed into place
        return any(any(True for _ in os.scandir(p)) for p in target.glob(".*.ptf-tmp-*") if p.is_dir())

    killed = run_and_kill([sys.executable, "-c", script, base, str(target)], env, downloading, poll=0.0005)
    assert killed, "the sync finished before the kill point"
    assert all((target / str(v) / "saved_model.pb").exists() for v in _versions(target))  # whole, or not there
    assert _hidden_leftovers(target)  # what the kill cut short is hidden from TF Serving ...
    result = mirror_exports(base, str(target))  # ... and the next sync removes it and finishes
    assert _versions(target) == [1, 2, 3] and _hidden_leftovers(target) == []
    assert sorted(result.added + result.kept) == [1, 2, 3]
