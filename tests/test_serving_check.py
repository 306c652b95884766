"""The serving check: loads in a fresh process, MLflow's scoring server over REST, the registration guard.

Each check runs warm by default (forked from the warm template, tests/test_warm_template.py); one test per
check keeps the cold path (`warm=False`: a new `python -I` process, `mlflow models serve`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import export, iris_eval_io, register_export

from prefect_tensorflow.tasks import iris
from prefect_tensorflow.tasks.configs import ServingLimits
from prefect_tensorflow.tasks.errors import RegistryError
from prefect_tensorflow.tasks.export.export_base import saved_model_digest
from prefect_tensorflow.tasks.promotion.serving_check import (
    SERVING_TAGS,
    check_loads,
    check_serving,
    compare_answers,
    passed_serving_check,
    record_serving_report,
    tensorflow_model_server,
)

NAME = "tests-serving"


@pytest.fixture(scope="module")
def exported(trained_dir: Path, tmp_path_factory):
    base = tmp_path_factory.mktemp("serving") / "iris"
    return export(trained_dir / "model.ckpt-300", base, model=iris.MODEL, data=iris.DATA)


@pytest.fixture(scope="module")
def eval_io(exported):
    """The iris eval features (30 rows) and what the export answers on them in this process."""
    return iris_eval_io(exported.path)


@pytest.fixture(scope="module")
def registered(exported, tmp_path_factory, mlflow_template_db):
    """One iris version in a store of its own, shared by the module (each `mlflow models serve` costs seconds)."""
    from prefect_tensorflow.tasks.blocks import MlflowConnection

    store = tmp_path_factory.mktemp("serving-store")
    shutil.copyfile(mlflow_template_db, store / "mlflow.db")
    connection = MlflowConnection(
        tracking_uri=f"sqlite:///{store}/mlflow.db", experiment_name="tests", request_retries=0, operation_retries=0
    )
    return connection, register_export(exported, NAME, connection=connection, data=iris.DATA)


def _broken_copy(exported, tmp_path: Path, damage: str) -> Path:
    copy = tmp_path / "1"
    shutil.copytree(exported.path, copy)
    if damage == "variables":
        shutil.rmtree(copy / "variables")
    else:
        (copy / "saved_model.pb").unlink()
    return copy


def test_a_cold_load_in_a_fresh_process_answers_as_in_process(exported, eval_io):
    inputs, expected = eval_io
    report = check_loads(exported.path, inputs, expected, warm=False)
    assert report.ok, report.reason
    assert report.server == "load-only" and report.formats == []
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-5
    assert report.load_seconds > 0 and report.peak_memory_mb > 0 and 0 < report.p50_ms <= report.p99_ms
    assert "a fresh python -I process" in report.reason


@pytest.mark.parametrize(
    "damage, message",
    [
        ("variables", r"FileNotFoundError: .*variables/variables"),
        ("saved_model.pb", r"OSError: SavedModel file does not exist at: .*saved_model\.pb"),
    ],
)
def test_a_broken_export_fails_with_tensorflows_reason_and_the_path(exported, tmp_path, damage, message):
    copy = _broken_copy(exported, tmp_path, damage)
    report = check_loads(str(copy))
    assert not report.ok
    assert report.reason.startswith(f"SavedModel {copy} failed to load in a fresh process (load): ")
    assert len(report.reason.splitlines()) == 1
    assert __import__("re").search(message, report.reason), report.reason


def test_limits_and_wrong_answers_fail_with_the_reason(exported, eval_io):
    inputs, expected = eval_io
    slow = check_loads(exported.path, inputs, expected, limits=ServingLimits(max_load_seconds=1e-4))
    assert not slow.ok and "over max_load_seconds 0.0001" in slow.reason and slow.load_seconds > 1e-4
    shifted = {**expected, "probabilities": expected["probabilities"] + 0.01}
    diff, why = compare_answers(shifted, expected, 1e-5)  # what check_loads and check_serving apply to the answers
    assert diff == pytest.approx(0.01, abs=1e-6) and why.startswith("answers differ from the expected ones by 0.01")
    assert compare_answers(expected, {**expected, "extra": 1}, 1e-5)[1].startswith("outputs differ")


def test_a_model_with_nan_weights_is_never_called_loaded(tmp_path):
    import tensorflow as tf

    class Nan(tf.Module):
        def __init__(self):
            self.w = tf.Variable(np.full((4, 3), np.nan, np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def serve(self, features):
            return {"logits": tf.matmul(features, self.w)}

    module = Nan()
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.serve})
    report = check_loads(str(tmp_path / "1"))
    assert not report.ok and "output logits has non-finite values (12 of 12)" in report.reason


@pytest.mark.parametrize("fault", ["variables", "slow"])
def test_a_version_that_does_not_load_or_loads_too_slowly_is_never_registered(exported, tmp_path, mlflow_store, fault):
    """Its digest matches its files (so only the load check can catch it): nothing is logged or registered."""
    from prefect_tensorflow.tasks.registry.model_versions import register_model_version

    limits = None
    if fault == "variables":
        copy = _broken_copy(exported, tmp_path, "variables")
        exported = exported.model_copy(update={"path": str(copy), "digest": saved_model_digest(str(copy))})
        message = "load-only serving check failed: .*variables.*Nothing was registered"
    else:
        limits = ServingLimits(max_load_seconds=1e-4)
        message = "load-only serving check failed: .*over max_load_seconds 0.0001. Nothing was registered"
    with pytest.raises(RegistryError, match=message):
        register_model_version(exported, NAME, mlflow_store, data=iris.DATA, serving=limits)
    client = mlflow_store.client()
    assert client.search_registered_models() == []
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


@pytest.mark.parametrize(
    "warm, server", [(False, "mlflow models serve"), (True, "mlflow scoring server (warm template)")], ids=["cold", "warm"]
)
def test_mlflow_models_serve_answers_both_rest_formats_like_the_export(registered, eval_io, warm, server):
    connection, version = registered
    tags = connection.client().get_model_version(NAME, str(version.version)).tags
    assert float(tags["prefect_tensorflow.load_check.load_seconds"]) > 0  # the check before it was registered
    inputs, expected = eval_io
    report = check_serving(version.model_uri, connection, inputs, expected, requests=20, warm=warm)
    assert report.ok, report.reason
    assert report.server == server and report.formats == ["instances", "inputs"]
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-5
    assert report.load_seconds > 0 and report.peak_memory_mb > 0 and 0 < report.p50_ms <= report.p99_ms

    client = connection.client()
    assert not passed_serving_check(client.get_model_version(NAME, str(version.version)))
    record_serving_report(client, NAME, version.version, report)
    mv = client.get_model_version(NAME, str(version.version))
    assert passed_serving_check(mv)
    assert mv.tags[SERVING_TAGS["server"]] == server
    assert float(mv.tags[SERVING_TAGS["p99_ms"]]) == pytest.approx(report.p99_ms, rel=1e-5)
    failed = report.model_copy(update={"ok": False, "reason": "p99 over the limit"})
    record_serving_report(client, NAME, version.version, failed)
    assert not passed_serving_check(client.get_model_version(NAME, str(version.version)))


def test_a_version_the_server_cannot_load_fails_with_the_reason(registered, eval_io):
    connection, _ = registered
    inputs, expected = eval_io
    report = check_serving(f"models:/{NAME}/99", connection, inputs, expected)
    assert not report.ok and report.server == "mlflow scoring server (warm template)"
    prefix = f"models:/{NAME}/99: mlflow scoring server (warm template) for models:/{NAME}/99 exited with status 1"
    assert report.reason.startswith(prefix) and "version=99) not found" in report.reason, report.reason


@pytest.mark.skipif(tensorflow_model_server() is None, reason="tensorflow_model_server not on PATH")
def test_tensorflow_model_server_answers_like_the_export(exported, eval_io):
    from prefect_tensorflow.tasks.promotion.serving_check import check_tf_serving

    inputs, expected = eval_io
    report = check_tf_serving(exported.path, inputs, expected, model_name="iris")
    assert report.ok, report.reason
    assert report.server == "tensorflow_model_server" and report.formats == ["instances", "inputs"]
