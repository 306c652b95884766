"""What an untrusted (deployment) caller may reach: model code by name, paths under the roots, saved blocks."""

from __future__ import annotations

import os

import pytest

from prefect_tensorflow.tasks import model_code
from prefect_tensorflow.tasks.errors import ImportStringError, StorageError, UnsafeParameterError
from prefect_tensorflow.tasks.security import check_is_model_dir, check_mlflow_connection, confine
from prefect_tensorflow.tasks.storage.locations import parse_location


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


# --- issue 19: the second round ------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref, fragment",
    [
        ("models_for_tests:os.system", "received attribute 'os.system'; nothing was imported"),
        ("models_for_tests:iris.build_model", "received attribute 'iris.build_model'"),
        ("models_for_tests:_private_builder", "no leading underscore"),
        ("models_for_tests:rmtree", "it is shutil.rmtree, imported into the module"),
        ("models_for_tests:ModelClass", "is not one (a type)"),
        ("models_for_tests:os", "is not one (no such function)"),
        ("models_for_tests:nothing_here", "is not one (no such function)"),
    ],
)
def test_an_untrusted_caller_names_only_functions_defined_in_an_allowed_module(ref, fragment, monkeypatch):
    monkeypatch.setenv("PREFECT_TENSORFLOW_ALLOWED_MODULES", "models_for_tests")
    with pytest.raises(ImportStringError) as info:
        model_code.load(ref, "model", untrusted=True)
    assert str(info.value).startswith(f"model {ref!r}: ") and fragment in str(info.value)
    assert model_code.load("models_for_tests:wider_model", "model", untrusted=True).__name__ == "wider_model"
    assert model_code.load("iris", "model", untrusted=True).__name__ == "build_model"  # registered names as they are


def test_a_module_with_all_exports_only_what_it_lists(tmp_path, monkeypatch):
    (tmp_path / "team_models.py").write_text("__all__ = ['build']\n\ndef build():\n    pass\n\ndef cleanup(path):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PREFECT_TENSORFLOW_ALLOWED_MODULES", "team_models")
    assert model_code.load("team_models:build", "model", untrusted=True).__name__ == "build"
    with pytest.raises(ImportStringError, match="not listed in the module's __all__"):
        model_code.load("team_models:cleanup", "model", untrusted=True)
    assert model_code.load("team_models:cleanup", "model", untrusted=False).__name__ == "cleanup"  # a library caller


def test_library_callers_keep_dotted_import_strings():
    assert model_code.load("models_for_tests:iris.build_model", "model", untrusted=False).__name__ == "build_model"


def test_what_model_code_raises_names_the_parameter():
    from prefect_tensorflow.tasks.errors import TrainingError

    with pytest.raises(TrainingError, match=r"^data 'models_for_tests:failing_loader': the dataset loader raised RuntimeError"):
        model_code.load_split("models_for_tests:failing_loader", "train")
    with pytest.raises(TrainingError, match=r"^data 'models_for_tests:not_a_dataset': expected 'eval' to give a tf.data"):
        model_code.load_split("models_for_tests:not_a_dataset", "eval")


@pytest.mark.parametrize(
    "uri, where",
    [
        ("sqlite:///relative/mlflow.db", "{cwd}/relative/mlflow.db"),  # SQLAlchemy: relative to the working dir
        ("SQLITE:////{outside}/mlflow.db", "{outside}/mlflow.db"),  # MLflow reads schemes in any case
        ("sqlite+pysqlite:////{outside}/mlflow.db", "{outside}/mlflow.db"),
        ("sqlite:////{root}/%2e%2e/outside/mlflow.db", "{outside}/mlflow.db"),  # SQLAlchemy percent-decodes
        ("file:///{outside}/mlruns", "{outside}/mlruns"),
        ("FILE:///{root}/%2E%2E/outside/mlruns", "{outside}/mlruns"),
    ],
)
def test_mlflow_store_uris_are_confined_as_mlflow_reads_them(uri, where, tmp_path, monkeypatch):
    from prefect_tensorflow.tasks.security import check_store_uri

    root, outside, cwd = tmp_path / "root", tmp_path / "outside", tmp_path / "cwd"
    for path in (root, outside, cwd):
        path.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("PREFECT_TENSORFLOW_ROOTS", str(root))
    uri = uri.format(root=str(root).lstrip("/"), outside=str(outside).lstrip("/"))
    with pytest.raises(UnsafeParameterError) as info:
        check_store_uri(uri, parameter="mlflow.tracking_uri")
    assert str(info.value).startswith(f"mlflow.tracking_uri: resolves to {where.format(cwd=cwd, outside=outside)}, outside")
    check_store_uri(f"sqlite:///{root}/mlflow.db", parameter="mlflow.tracking_uri")
    check_store_uri("http://127.0.0.1:5000", parameter="mlflow.tracking_uri")  # a server: not a local path
    with pytest.raises(UnsafeParameterError, match="options"):
        check_store_uri(f"sqlite:///{root}/mlflow.db?mode=ro&uri=true", parameter="mlflow.tracking_uri")
    assert os.listdir(cwd) == []


def test_the_default_artifact_location_is_the_file_uri_of_the_same_directory(tmp_path):
    from urllib.parse import urlsplit
    from urllib.request import url2pathname

    from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig

    odd = tmp_path / "a b%zz"  # '%zz' is no escape: SQLAlchemy keeps it, a file URI must encode it
    for uri in (f"sqlite:///{odd}/mlflow.db", f"SQLITE:///{odd}/mlflow.db"):
        location = MlflowConfig(tracking_uri=uri).default_artifact_location()
        assert "%25zz" in location and url2pathname(urlsplit(location).path) == f"{odd}/artifacts"


@pytest.mark.parametrize("character", ["%", "?", "#", "\n"])
def test_an_untrusted_path_holding_what_a_uri_parser_rereads_is_refused(character, tmp_path):
    value = f"{tmp_path}/runs/a{character}2e/exports"
    with pytest.raises(UnsafeParameterError) as info:
        confine(value, parameter="export_base", untrusted=True, roots=[str(tmp_path)])
    assert str(info.value).startswith("export_base: holds ")
    assert confine(value, parameter="export_base", untrusted=False)  # a library caller's path is its own


def test_a_root_is_never_moved_aside(tmp_path):
    from prefect_tensorflow.tasks.security import check_can_move_aside

    roots = [str(tmp_path / "models"), str(tmp_path / "other")]
    with pytest.raises(UnsafeParameterError, match="is one of the allowed roots"):
        check_can_move_aside(roots[0], roots[0] + ".previous-1", untrusted=True, roots=roots)
    check_can_move_aside(roots[0] + "/iris", roots[0] + "/iris.previous-1", untrusted=True, roots=roots)
    with pytest.raises(UnsafeParameterError, match="outside the allowed roots"):
        check_can_move_aside(roots[0] + "/iris", str(tmp_path / "elsewhere"), untrusted=True, roots=roots)
    check_can_move_aside(roots[0], roots[0] + ".previous-1", untrusted=False, roots=roots)
