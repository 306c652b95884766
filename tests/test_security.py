"""What an untrusted (deployment) caller may reach: model code by name, paths under the roots, saved blocks."""

from __future__ import annotations

import os

import pytest

from prefect_tensorflow.tasks import model_code
from prefect_tensorflow.tasks.errors import ImportStringError, StorageError, UnsafeParameterError
from prefect_tensorflow.tasks.security import check_is_model_dir, check_mlflow_connection, confine
from prefect_tensorflow.tasks.storage import parse_location


def test_registered_names_come_from_entry_points_without_importing_anything():
    assert model_code.registered_names("model")["iris"] == "prefect_tensorflow.tasks.iris:build_model"
    assert model_code.registered_names("data")["iris"] == "prefect_tensorflow.tasks.iris:load_dataset"
    assert model_code.import_string("iris", "model", untrusted=True) == "prefect_tensorflow.tasks.iris:build_model"


@pytest.mark.parametrize(
    "ref, fragment",
    [
        ("os:system", "'os' is a standard-library module"),
        ("shutil:rmtree", "'shutil' is a standard-library module"),
        ("subprocess:run", "'subprocess' is a standard-library module"),
        ("builtins:exec", "'builtins' is a standard-library module"),
        ("__import__", "expected a registered dataset loader name"),
        ("iris; rm -rf /", "expected a registered dataset loader name"),
        ("x" * 10_000_000, "expected a registered dataset loader name"),
        ("nope", "no dataset loader is registered under this name; registered: iris"),
    ],
)
def test_refused_for_every_caller(ref, fragment):
    with pytest.raises(ImportStringError) as info:
        model_code.import_string(ref, "data", untrusted=False)
    assert fragment in str(info.value) and str(info.value).startswith("data ")
    assert len(str(info.value)) < 500  # a 10 MB value does not make a 10 MB message


def test_an_untrusted_caller_imports_only_allowed_modules(monkeypatch):
    with pytest.raises(ImportStringError, match="deployment runs accept the registered names"):
        model_code.import_string("models_for_tests:wider_model", "model", untrusted=True)
    monkeypatch.setenv("PREFECT_TENSORFLOW_ALLOWED_MODULES", "models_for_tests, team.models")
    assert model_code.import_string("models_for_tests:wider_model", "model", untrusted=True) == "models_for_tests:wider_model"
    with pytest.raises(ImportStringError):  # a prefix is a module boundary, not a string prefix
        model_code.import_string("models_for_tests_evil:build", "model", untrusted=True)


def test_nothing_outside_the_allowlist_is_imported_even_to_check_it(tmp_path, monkeypatch):
    """A module whose import has a side effect: refused before it is imported."""
    (tmp_path / "side_effect_module.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\ndef build(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportStringError):
        model_code.load("side_effect_module:build", "model", untrusted=True)
    assert not (tmp_path / "imported").exists()


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("s3:/team/models", "expected s3://bucket/prefix"),
        ("s3://", "expected s3://bucket/prefix"),
        ("s3://Team_Bucket/x", "expected s3://bucket/prefix"),
        ("s3://team/../etc", "'.' and '..' are not allowed"),
        ("hdfs://nn/models", "unsupported scheme 'hdfs'"),
        ("http://evil.example/x", "unsupported scheme 'http'"),
        ("file:relative", "expected file:///absolute/path"),
        ("a\x00b", "expected a local path"),
        ("models/\udcff", "expected a local path"),  # a lone surrogate: no file system can name it
        ("", "expected a local path"),
        (123, "expected a local path"),
    ],
)
def test_malformed_locations_are_refused_never_turned_into_local_directories(value, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError) as info:
        parse_location(value, parameter="model_dir")
    assert str(info.value).startswith("model_dir: ") and fragment in str(info.value)
    assert os.listdir(tmp_path) == []


def test_paths_of_an_untrusted_caller_must_resolve_under_the_roots(tmp_path):
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    roots = [str(root), "s3://team/models"]
    assert confine(str(root / "models" / "iris"), parameter="model_dir", untrusted=True, roots=roots) == str(
        root / "models" / "iris"
    )
    assert confine("s3://team/models/iris", parameter="model_dir", untrusted=True, roots=roots) == "s3://team/models/iris"
    for hostile in (
        str(root / ".." / "outside"),
        str(root / "escape" / "x"),
        "/proc/self/environ",
        "/etc",
        "s3://team/modelsX/iris",
        "s3://other/models",
    ):
        with pytest.raises(UnsafeParameterError) as info:
            confine(hostile, parameter="export_base", untrusted=True, roots=roots)
        assert str(info.value).startswith("export_base: resolves to ") and "outside the allowed roots" in str(info.value)
    assert confine("/etc", parameter="model_dir", untrusted=False) == "/etc"  # library and CLI callers: parsed only


def test_an_inline_or_outside_mlflow_connection_is_refused_to_an_untrusted_caller(tmp_path, monkeypatch):
    from prefect_tensorflow.tasks.blocks import MlflowConnection

    monkeypatch.setenv("PREFECT_TENSORFLOW_ROOTS", str(tmp_path))
    check_mlflow_connection(None, untrusted=True)  # the worker's own environment
    inline = MlflowConnection(tracking_uri="http://10.0.0.1:5000")
    with pytest.raises(UnsafeParameterError, match="saved MLflow Connection block"):
        check_mlflow_connection(inline, untrusted=True)
    saved = MlflowConnection(tracking_uri="sqlite:////var/lib/other/mlflow.db")
    saved._block_document_id = "00000000-0000-0000-0000-000000000001"  # as Prefect sets it on load
    with pytest.raises(UnsafeParameterError, match="mlflow.tracking_uri: resolves to /var/lib/other/mlflow.db"):
        check_mlflow_connection(saved, untrusted=True)
    inside = MlflowConnection(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    inside._block_document_id = "00000000-0000-0000-0000-000000000002"
    check_mlflow_connection(inside, untrusted=True)
    check_mlflow_connection(inline, untrusted=False)


def test_only_a_model_dir_is_ever_moved_aside(trained_dir, tmp_path):
    check_is_model_dir(str(trained_dir))
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(UnsafeParameterError, match="is not a model dir"):
        check_is_model_dir(str(tmp_path / "photos"))
