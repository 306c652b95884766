"""The gate's evidence: one eval set scored through each real SavedModel's serving signature, per example, cached.

SavedModels here are real: an export of the session's trained iris model, and
small `tf.Module`s saved with `tf.saved_model.save` where a test needs a
particular signature (a raw regression head, NaN outputs, a renamed output).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from prefect_tensorflow.tasks import iris
from prefect_tensorflow.tasks.checkpoints.selection import checkpoint_ref
from prefect_tensorflow.tasks.configs import GateConfig
from prefect_tensorflow.tasks.errors import GateError
from prefect_tensorflow.tasks.promotion.outcomes import (
    EvalSet,
    OutcomeCache,
    Outcomes,
    default_slices,
    eval_digest,
    load_eval_set,
    score_saved_model,
)
from prefect_tensorflow.tasks.registry.gate import comparability, decide_gate

WEIGHTS = np.array([[0.2, -0.1, 0.0], [0.1, 0.3, -0.2], [-0.4, 0.2, 0.5], [-0.3, 0.1, 0.6]], np.float32)


def sliced_loader(split: str):
    """Six examples of two features; names a slice of its own."""
    import tensorflow as tf

    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    return tf.data.Dataset.from_tensor_slices((x, np.array([0, 1, 0, 1, 0, 1], np.int32)))


sliced_loader.slices = lambda split: {"first_half": np.array([True] * 3 + [False] * 3)}  # type: ignore[attr-defined]


def badly_sliced_loader(split: str):
    return sliced_loader(split)


badly_sliced_loader.slices = lambda split: {"short": [True, False]}  # type: ignore[attr-defined]


def empty_loader(split: str):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((np.zeros((0, 4), np.float32), np.zeros((0,), np.int32)))


def _save_classifier(path: Path, *, weights=WEIGHTS, logits_name: str = "logits", nan: bool = False) -> str:
    import tensorflow as tf

    class Classifier(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(weights)

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="features")])
        def serve(self, features):
            logits = tf.matmul(features, self.w)
            if nan:
                logits = logits * tf.constant(float("nan"))
            return {
                logits_name: logits,
                "probabilities": tf.nn.softmax(logits),
                "class_ids": tf.argmax(logits, axis=-1),
            }

    module = Classifier()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return str(path)


def _save_regressor(path: Path, outputs: int = 1) -> str:
    import tensorflow as tf

    class Regressor(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def serve(self, x):
            y = 2.0 * x[:, 0]
            return {"outputs": y} if outputs == 1 else {"outputs": y, "other": y}

    module = Regressor()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return str(path)


def _save_two_inputs(path: Path, attribute: str) -> str:
    """Inputs named against their alphabetical order (zeta, then alpha): outputs zeta - alpha."""
    import tensorflow as tf

    specs = [tf.TensorSpec([None], tf.float32, name="zeta"), tf.TensorSpec([None], tf.float32, name="alpha")]
    module = tf.Module()
    function = tf.function(lambda *xs: {"outputs": xs[0] - xs[1]}, input_signature=specs)
    setattr(module, attribute, function)
    tf.saved_model.save(module, str(path), signatures={"serving_default": function.get_concrete_function()})
    return str(path)


@pytest.fixture(scope="module")
def iris_eval() -> EvalSet:
    return load_eval_set("iris")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("saved")
    return {
        "classifier": _save_classifier(base / "classifier"),
        "other": _save_classifier(base / "other", weights=WEIGHTS[:, ::-1].copy()),
        "renamed": _save_classifier(base / "renamed", logits_name="scores"),
        "nan": _save_classifier(base / "nan", nan=True),
        "regressor": _save_regressor(base / "regressor"),
        "two_outputs": _save_regressor(base / "two", outputs=2),
        "two_inputs": _save_two_inputs(base / "two_inputs", "serve"),  # as export_saved_model saves
        "two_inputs_other": _save_two_inputs(base / "two_inputs_other", "predict"),
    }


# --- the eval set ---------------------------------------------------------------------------------------


def test_the_eval_set_is_the_loaders_eval_split_in_order(iris_eval):
    pairs = [(x.numpy(), int(y.numpy())) for x, y in iris.load_dataset("eval")]
    assert iris_eval.n == 30 and iris_eval.source == "iris:eval"
    np.testing.assert_array_equal(iris_eval.features[0], np.stack([x for x, _ in pairs]))
    assert iris_eval.labels.tolist() == [y for _, y in pairs]
    assert iris_eval.digest == load_eval_set("iris").digest  # stable
    assert iris_eval.digest != load_eval_set("iris", "train").digest
    reordered = eval_digest([iris_eval.features[0][::-1]], iris_eval.labels[::-1])
    assert reordered != iris_eval.digest  # order matters: outcomes are paired by position
    assert sorted(iris_eval.slices) == ["class=0", "class=1", "class=2"]
    assert sum(int(m.sum()) for m in iris_eval.slices.values()) == 30


def test_a_loader_names_its_own_slices_beside_the_classes():
    eval_set = load_eval_set(f"{__name__}:sliced_loader")
    assert sorted(eval_set.slices) == ["class=0", "class=1", "first_half"]
    assert eval_set.slices["first_half"].tolist() == [True, True, True, False, False, False]
    assert default_slices(np.array([0.5, 1.5])) == {}  # regression labels: no default slices


@pytest.mark.parametrize(
    ("loader", "message"),
    [
        ("badly_sliced_loader", "slices('eval'): slice 'short': expected a bool mask of shape (6,)"),
        ("empty_loader", "the split has no examples"),
    ],
)
def test_a_malformed_eval_set_is_refused_naming_it(loader, message):
    with pytest.raises(GateError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_eval_set(f"{__name__}:{loader}")


# --- scoring -----------------------------------------------------------------------------------------


def test_an_export_of_the_trained_model_is_scored_through_its_serving_signature(trained_dir, tmp_path, iris_eval):
    """Per-example accuracy and loss equal what the SavedModel predicts, and Keras's cross-entropy of it."""
    import keras
    from helpers import export

    from prefect_tensorflow.tasks.export.verification import run_saved_model

    ref = checkpoint_ref(str(trained_dir / "model.ckpt-300"))
    exported = export(ref.path, tmp_path / "exports", model=iris.MODEL, data=iris.DATA)
    outcomes = score_saved_model(exported.path, iris_eval)
    predicted = run_saved_model(exported.path, iris_eval.features)
    np.testing.assert_array_equal(outcomes.per_example["accuracy"], (predicted["class_ids"] == iris_eval.labels).astype(float))
    keras_loss = keras.losses.sparse_categorical_crossentropy(iris_eval.labels, predicted["probabilities"]).numpy()
    np.testing.assert_allclose(outcomes.per_example["loss"], keras_loss, rtol=1e-5, atol=1e-6)
    assert outcomes.value("error") == pytest.approx(1 - outcomes.value("accuracy"))
    assert (outcomes.saved_model_digest, outcomes.eval_digest, outcomes.n) == (exported.digest, iris_eval.digest, 30)
    assert outcomes.signature == {
        "inputs": {"features": ["float32", [None, 4]]},
        "outputs": {
            "class_ids": ["int64", [None]],
            "logits": ["float32", [None, 3]],
            "probabilities": ["float32", [None, 3]],
        },
    }
    assert outcomes.finite and outcomes.labels == iris_eval.labels.astype(float).tolist()
    assert sorted(outcomes.slices) == ["class=0", "class=1", "class=2"]


def test_the_raw_head_scores_mse_and_mae(saved):
    x = np.array([[1.0, 0.0], [2.0, 5.0], [0.5, 1.0]], np.float32)
    y = np.array([2.0, 3.0, 2.0], np.float32)  # predictions 2, 4, 1
    eval_set = EvalSet([x], y, eval_digest([x], y), "test", {})
    outcomes = score_saved_model(saved["regressor"], eval_set, head="raw")
    assert outcomes.per_example == {"mse": [0.0, 1.0, 1.0], "mae": [0.0, 1.0, 1.0]}
    with pytest.raises(GateError, match="gate.metric: 'accuracy' cannot be computed for the raw head; it computes mae, mse"):
        outcomes.value("accuracy")
    with pytest.raises(
        GateError, match=r"the raw head compares one output with the label, its signature has \['other', 'outputs'\]"
    ):
        score_saved_model(saved["two_outputs"], eval_set, head="raw")


def test_features_go_to_the_inputs_in_the_models_order_not_the_alphabets(saved):
    zeta, alpha = np.array([5.0, 1.0], np.float32), np.array([1.0, 4.0], np.float32)
    labels = zeta - alpha
    eval_set = EvalSet([zeta, alpha], labels, eval_digest([zeta, alpha], labels), "test", {})
    assert score_saved_model(saved["two_inputs"], eval_set, head="raw").per_example["mse"] == [0.0, 0.0]
    # without the traced function the order is lost: sorted by name, as the registry's verification feeds it
    by_name = EvalSet([alpha, zeta], labels, eval_digest([alpha, zeta], labels), "test", {})
    assert score_saved_model(saved["two_inputs_other"], by_name, head="raw").per_example["mse"] == [0.0, 0.0]


def test_nan_outputs_make_outcomes_non_finite_and_the_gate_keeps_the_champion(saved, iris_eval):
    nan = score_saved_model(saved["nan"], iris_eval)
    assert not nan.finite and nan.non_finite_outputs == ["logits", "probabilities"]
    assert all(np.isnan(nan.per_example["accuracy"]))  # argmax of NaN is not "right"
    champion = score_saved_model(saved["classifier"], iris_eval)
    decision = decide_gate(nan, champion, GateConfig(), challenger_version=2, champion_version=1)
    assert (decision.state, decision.promoted) == ("kept", False)
    assert "NaN or inf in logits, probabilities" in decision.reason
    cache = OutcomeCache(str(Path(saved["nan"]).parent / "cache"))
    cache.put(nan)  # NaN survives the cache's JSON
    again = cache.get(nan.saved_model_digest, nan.eval_digest)
    assert again is not None and not again.finite and np.isnan(again.per_example["loss"]).all()


def test_a_renamed_output_is_incomparable_and_other_weights_are_compared(saved, iris_eval):
    champion = score_saved_model(saved["classifier"], iris_eval)
    renamed = score_saved_model(saved["renamed"], iris_eval)
    assert comparability(renamed, champion) == "output names differ: challenger ['class_ids', 'probabilities', 'scores'], " \
        "champion ['class_ids', 'logits', 'probabilities']"  # fmt: skip
    decision = decide_gate(renamed, champion, GateConfig(), challenger_version=2, champion_version=1)
    assert decision.state == "incomparable"
    other = score_saved_model(saved["other"], iris_eval)
    assert comparability(other, champion) is None
    decision = decide_gate(other, champion, GateConfig(), challenger_version=2, champion_version=1)
    assert decision.state in ("promoted", "kept") and decision.interval is not None


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("two_features", r"its signature takes 1 input\(s\) \['features'\], the eval data test has 2 feature array\(s\)"),
        ("label_range", r"labels range over \[0, 5\], the SavedModel .* has 3 classes"),
        ("wrong_width", r"input 'features' takes shape \[None, 4\], the eval data test gives \[3, 2\]"),
        ("no_model", "no saved_model.pb; cannot score it"),
        ("count", r"3 labels but feature arrays of \[2\] examples"),
    ],
)
def test_eval_data_that_does_not_fit_the_signature_is_a_clear_error(saved, tmp_path, case, message):
    x = np.ones((3, 4), np.float32)
    y = np.array([0, 1, 2], np.int32)
    features, path = [x], saved["classifier"]
    if case == "two_features":
        features = [x, x]
    elif case == "label_range":
        y = np.array([0, 5, 2], np.int32)
    elif case == "wrong_width":
        features = [np.ones((3, 2), np.float32)]
    elif case == "no_model":
        path = str(tmp_path)
    elif case == "count":
        features = [x[:2]]
    eval_set = EvalSet(features, y, eval_digest(features, y), "test", {})
    with pytest.raises(GateError, match=message):
        score_saved_model(path, eval_set)


# --- the cache -----------------------------------------------------------------------------------------


def _outcomes(value: float = 1.0) -> Outcomes:
    return Outcomes(
        saved_model_digest="sha256:" + "a" * 64,
        eval_digest="sha256:" + "b" * 64,
        n=2,
        signature={},
        labels=[0.0, 1.0],
        per_example={"accuracy": [value, 1.0]},
        finite=True,
    )


def test_the_cache_misses_then_hits_and_writes_atomically(tmp_path):
    cache = OutcomeCache(str(tmp_path / "cache"))
    o = _outcomes()
    assert cache.get(o.saved_model_digest, o.eval_digest) is None
    cache.put(o)
    assert cache.get(o.saved_model_digest, o.eval_digest) == o
    assert cache.get(o.saved_model_digest, "sha256:" + "c" * 64) is None  # another eval set: a miss
    assert cache.get(o.saved_model_digest, o.eval_digest, head="raw") is None
    cache.put(_outcomes(0.0))  # replaced whole
    assert cache.get(o.saved_model_digest, o.eval_digest).per_example["accuracy"] == [0.0, 1.0]
    assert os.listdir(tmp_path / "cache") == [os.path.basename(cache.path(o.saved_model_digest, o.eval_digest))]


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # torn
        lambda text: "not json",
        lambda text: text.replace('"sha256:' + "b" * 64, '"sha256:' + "d" * 64),  # holds another key
        lambda text: json.dumps({**json.loads(text), "per_example": {"accuracy": [1.0]}}),  # wrong length
    ],
)
def test_a_corrupt_cache_file_is_ignored_and_rewritten(tmp_path, damage):
    cache = OutcomeCache(str(tmp_path))
    o = _outcomes()
    cache.put(o)
    path = Path(cache.path(o.saved_model_digest, o.eval_digest))
    path.write_text(damage(path.read_text()))
    assert cache.get(o.saved_model_digest, o.eval_digest) is None
    cache.put(o)
    assert cache.get(o.saved_model_digest, o.eval_digest) == o


def test_the_cache_lives_under_the_data_home_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_TENSORFLOW_HOME", str(tmp_path / "home"))
    cache = OutcomeCache()
    cache.put(_outcomes())
    assert Path(cache.directory) == tmp_path / "home" / "gate-cache"
    assert len(list((tmp_path / "home" / "gate-cache").glob("*.json"))) == 1
