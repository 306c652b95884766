"""freeze_graph on real checkpoints: TF2 + builder, TF1 + .meta, SavedModel; verified; bad inputs."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import freeze

from prefect_tensorflow.tasks.errors import CheckpointMismatchError, InvalidCheckpointError
from prefect_tensorflow.tasks.export.frozen_graph import FreezeError
from prefect_tensorflow.tasks.export.verification import ParityError, read_graph_def, run_frozen_graph


def test_tf2_checkpoint_freezes_and_computes_what_the_checkpoint_computes(trained_dir, tmp_path):
    import tensorflow as tf

    from prefect_tensorflow.tasks.export.signature import restore_model, serving_function
    from prefect_tensorflow.tasks.iris import read_iris

    result = freeze(trained_dir / "model.ckpt-300", tmp_path / "iris.pb", as_text=True)
    assert result.source_format == "tf2"
    assert result.inputs == ["features:0"]
    assert result.outputs == {"logits": "logits:0", "probabilities": "probabilities:0", "class_ids": "class_ids:0"}
    assert result.parity.max_abs_diff <= 1e-5 and result.parity.batch_size == 30
    data = (tmp_path / "iris.pb").read_bytes()
    import hashlib

    assert result.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert (tmp_path / "iris.pbtxt").exists()
    graph_def = read_graph_def(tmp_path / "iris.pb")
    assert not any(n.op in ("VarHandleOp", "ReadVariableOp") for n in graph_def.node)  # constants only
    # independent check on all 150 rows
    features = np.asarray(read_iris()[0], np.float32)
    frozen = run_frozen_graph(graph_def, result.inputs, result.outputs, [features])
    net = restore_model(str(trained_dir / "model.ckpt-300"), "prefect_tensorflow.tasks.iris:build_model")
    direct = serving_function(net)(tf.constant(features))
    np.testing.assert_allclose(frozen["logits"], direct["logits"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(frozen["class_ids"], direct["class_ids"].numpy())
    assert not [n for n in os.listdir(tmp_path) if ".ptf-tmp-" in n]


def test_tf1_checkpoint_freezes_without_model_code_like_tf_freeze_graph(tmp_path, tf1_checkpoints):
    import tensorflow as tf
    from tensorflow.python.tools import freeze_graph as tf_freeze_graph

    tf1_checkpoints(tmp_path / "m")
    prefix = str(tmp_path / "m" / "model.ckpt-300")
    ours = freeze(prefix, tmp_path / "ours.pb", output_nodes=["logits"])
    assert ours.source_format == "tf1" and ours.outputs == {"logits": "logits:0"}
    tf_freeze_graph.freeze_graph(
        input_graph=None,
        input_saver=None,
        input_binary=True,
        input_checkpoint=prefix,
        output_node_names="logits",
        restore_op_name=None,
        filename_tensor_name=None,
        output_graph=str(tmp_path / "theirs.pb"),
        clear_devices=True,
        initializer_nodes="",
        input_meta_graph=prefix + ".meta",
    )
    batch = [np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32)]
    a = run_frozen_graph(read_graph_def(tmp_path / "ours.pb"), ["features:0"], {"logits": "logits:0"}, batch)
    b = run_frozen_graph(read_graph_def(tmp_path / "theirs.pb"), ["features:0"], {"logits": "logits:0"}, batch)
    np.testing.assert_array_equal(a["logits"], b["logits"])
    del tf


def test_tf1_outputs_come_from_the_meta_graphs_serving_signature(tmp_path, tf1_checkpoints):
    from helpers import export

    tf1_checkpoints(tmp_path / "m", signature=True)
    result = freeze(tmp_path / "m" / "model.ckpt-300", tmp_path / "sig.pb")
    assert result.outputs == {"scores": "scores:0"} and result.inputs == ["features:0"]
    assert result.parity.ok
    exported = export(tmp_path / "m" / "model.ckpt-300", tmp_path / "export")
    assert list(exported.signature.outputs) == ["scores"] and exported.parity.ok


def test_tf1_without_signature_or_nodes_lists_candidates(tmp_path, tf1_checkpoints):
    tf1_checkpoints(tmp_path / "m")
    with pytest.raises(FreezeError) as info:
        freeze(tmp_path / "m" / "model.ckpt-300", tmp_path / "x.pb")
    assert "has no serving signature; name the output nodes" in str(info.value)
    assert "Candidates: scores" in str(info.value)  # the graph's unconsumed output
    with pytest.raises(FreezeError, match=r"output node\(s\) \['nope'\] not in the graph"):
        freeze(tmp_path / "m" / "model.ckpt-300", tmp_path / "x.pb", output_nodes=["nope"])
    assert not (tmp_path / "x.pb").exists()


def test_tf1_missing_meta(tmp_path, tf1_checkpoints):
    tf1_checkpoints(tmp_path / "m")
    (tmp_path / "m" / "model.ckpt-300.meta").unlink()
    with pytest.raises(FreezeError, match=r"model.ckpt-300.meta is missing"):
        freeze(tmp_path / "m" / "model.ckpt-300", tmp_path / "x.pb", output_nodes=["logits"])


def test_saved_model_directory_freezes(trained_dir, tmp_path):
    from helpers import export

    exported = export(trained_dir / "model.ckpt-300", tmp_path / "export")
    result = freeze(exported.path, tmp_path / "from_sm.pb")
    assert result.source_format == "saved_model"
    assert set(result.outputs) == {"logits", "probabilities", "class_ids"}
    assert result.parity.ok


def test_different_model_is_a_clear_error_and_writes_nothing(trained_dir, tmp_path):
    with pytest.raises(CheckpointMismatchError, match="incompatible tensor with shape"):
        freeze(trained_dir / "model.ckpt-300", tmp_path / "x.pb", model="models_for_tests:wider_model")
    assert os.listdir(tmp_path) == []


def test_existing_output_is_kept_when_freezing_fails(trained_dir, tmp_path, monkeypatch):
    """A frozen graph that computes something else: TensorFlow's converter cannot be made to
    miscompute on demand, so its result is shifted after it ran (the one stand-in here)."""
    from prefect_tensorflow.tasks.export import frozen_graph as freezing

    real = freezing.run_frozen_graph
    monkeypatch.setattr(freezing, "run_frozen_graph", lambda *args: {k: v + 1 for k, v in real(*args).items()})
    target = tmp_path / "iris.pb"
    target.write_bytes(b"previous good graph")
    with pytest.raises(ParityError, match="nothing was written"):
        freeze(trained_dir / "model.ckpt-300", target)
    assert target.read_bytes() == b"previous good graph"
    assert os.listdir(tmp_path) == ["iris.pb"]


def test_bad_paths(trained_dir, tmp_path):
    with pytest.raises(FreezeError, match="does not exist"):
        freeze(trained_dir / "model.ckpt-300", tmp_path / "missing" / "x.pb")
    with pytest.raises(FreezeError, match="is a directory"):
        freeze(trained_dir / "model.ckpt-300", tmp_path)
    with pytest.raises(InvalidCheckpointError, match="index file is missing"):
        freeze(trained_dir / "model.ckpt-999", tmp_path / "x.pb")


@pytest.mark.slow
def test_graph_past_2gb_points_to_saved_model(tmp_path):
    """A real 2.1 GB model: its frozen graph cannot be a GraphDef."""
    import tensorflow as tf

    from prefect_tensorflow.tasks.export.frozen_graph import GraphTooLargeError
    from prefect_tensorflow.tasks.model_code import build_model

    net = build_model("models_for_tests:huge_model")
    tf.train.Checkpoint(model=net).write(str(tmp_path / "huge" / "model.ckpt-1"))
    del net
    with pytest.raises(GraphTooLargeError, match="export a SavedModel instead"):
        freeze(tmp_path / "huge" / "model.ckpt-1", tmp_path / "huge.pb", model="models_for_tests:huge_model")
    assert not (tmp_path / "huge.pb").exists()


def _estimator_style_checkpoint(model_dir) -> str:
    """A TF1 Saver checkpoint whose graph has a `features` and a `labels` placeholder, as an
    Estimator's training graph had: the loss reads `labels`, the serving outputs do not."""
    import tensorflow as tf

    model_dir.mkdir(parents=True)
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(0)
        features = tf.compat.v1.placeholder(tf.float32, [None, 4], name="features")
        labels = tf.compat.v1.placeholder(tf.int32, [None], name="labels")
        w = tf.compat.v1.get_variable("dense/kernel", [4, 3])
        logits = tf.identity(tf.matmul(features, w), name="logits")
        tf.nn.softmax(logits, name="probabilities")
        tf.argmax(logits, axis=-1, name="class_ids")
        tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits), name="loss")
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            return saver.save(sess, str(model_dir / "model.ckpt"), global_step=100)


def test_tf1_graph_with_a_labels_placeholder_freezes_with_the_inputs_its_outputs_need(tmp_path):
    prefix = _estimator_style_checkpoint(tmp_path / "m")
    result = freeze(prefix, tmp_path / "est.pb", output_nodes=["probabilities", "class_ids", "logits"])
    assert result.inputs == ["features:0"]  # not labels:0, which only the loss reads
    assert result.parity.ok and set(result.outputs) == {"probabilities", "class_ids", "logits"}
    from helpers import export

    exported = export(prefix, tmp_path / "export", output_nodes=["probabilities", "class_ids", "logits"])
    assert list(exported.signature.inputs) == ["features"] and exported.parity.ok


def test_a_refused_export_command_writes_nothing(trained_dir, tmp_path):
    from typer.testing import CliRunner

    from prefect_tensorflow.flows.cli import app

    target = tmp_path / "new-export-base"
    result = CliRunner().invoke(
        app,
        ["export", str(trained_dir / "model.ckpt-300"), "--export-base", str(target), "--model", "does_not_exist.module:build"],
    )
    assert (
        result.exit_code == 2
        and "model 'does_not_exist.module:build': module 'does_not_exist.module' cannot be imported" in result.stderr
    )
    assert not target.exists()


# --- a deployment run: the output dir swapped mid-freeze, .meta graphs that touch files (issue 19) ---


@pytest.fixture
def deployment_run(monkeypatch, tmp_path):
    """Freezing as a deployment run does it (untrusted), with the roots at `<tmp>/roots`."""
    from prefect_tensorflow.tasks import model_code, security
    from prefect_tensorflow.tasks.checkpoints import files as checkpoint_files
    from prefect_tensorflow.tasks.checkpoints import meta_graph
    from prefect_tensorflow.tasks.export import frozen_graph as freezing
    from prefect_tensorflow.tasks.storage import confined_dirs

    for module in (checkpoint_files, confined_dirs, freezing, meta_graph, model_code, security):
        monkeypatch.setattr(module, "in_deployment_run", lambda: True)
    roots = tmp_path / "roots"
    roots.mkdir()
    monkeypatch.setenv("PREFECT_TENSORFLOW_ROOTS", str(roots))
    return roots


def _swap_for_symlink(directory, outside):
    """What an attacker does between a run's checks and its writes: the directory becomes a symlink out."""
    os.rename(directory, str(directory) + ".moved")
    os.symlink(outside, directory)


@pytest.mark.parametrize("untrusted", [True, False])
def test_an_output_dir_swapped_for_a_symlink_mid_freeze_receives_nothing_and_nothing_is_written_outside(
    trained_dir, tmp_path, monkeypatch, untrusted, request
):
    import shutil

    from prefect_tensorflow.tasks.errors import StorageError
    from prefect_tensorflow.tasks.export import frozen_graph as freezing

    roots = request.getfixturevalue("deployment_run") if untrusted else tmp_path / "roots"
    model_dir, frozen_dir, outside = roots / "models" / "iris", roots / "frozen", tmp_path / "outside"
    shutil.copytree(trained_dir, model_dir)
    frozen_dir.mkdir(parents=True)
    outside.mkdir()
    original = freezing._freeze_tf2

    def swapping(*args, **kwargs):  # runs after the output dir was checked and opened, before the write
        _swap_for_symlink(frozen_dir, outside)
        return original(*args, **kwargs)

    monkeypatch.setattr(freezing, "_freeze_tf2", swapping)
    with pytest.raises(
        StorageError, match=r"output .*frozen was (moved or )?replaced.* while the run used it.*nothing was published"
    ):
        freeze(model_dir / "model.ckpt-300", frozen_dir / "model.ckpt-300.pb", as_text=True)
    assert os.listdir(outside) == []
    assert os.listdir(str(frozen_dir) + ".moved") == []  # the staged graph was removed, inside the roots


def test_an_untrusted_output_through_a_symlink_or_outside_the_roots_is_refused_before_any_work(
    trained_dir, tmp_path, deployment_run
):
    import shutil

    from prefect_tensorflow.tasks.errors import UnsafeParameterError

    model_dir, outside = deployment_run / "models" / "iris", tmp_path / "outside"
    shutil.copytree(trained_dir, model_dir)
    outside.mkdir()
    (deployment_run / "escape").symlink_to(outside)
    with pytest.raises(UnsafeParameterError, match=r"output: .*escape is a symbolic link"):
        freeze(model_dir / "model.ckpt-300", deployment_run / "escape" / "x.pb")
    with pytest.raises(UnsafeParameterError, match="outside the allowed roots"):
        freeze(model_dir / "model.ckpt-300", outside / "x.pb")
    with pytest.raises(UnsafeParameterError, match=r"checkpoint: checkpoint file .* lies outside the allowed roots"):
        freeze(trained_dir / "model.ckpt-300", deployment_run / "x.pb")
    assert os.listdir(outside) == []
    assert freeze(model_dir / "model.ckpt-300", deployment_run / "x.pb").parity.ok  # a sound one freezes


def _tf1_graph_that_writes(model_dir, target, *, asset=None):
    """A TF1 Saver checkpoint whose `logits` depend (control input) on WriteFile(target), or carry an asset path."""
    import tensorflow as tf

    model_dir.mkdir(parents=True, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(0)  # op determinism may be on in this process
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="features")
        w = tf.compat.v1.get_variable("dense/kernel", [4, 3])
        deps = [tf.io.write_file(str(target), "written by a .meta graph")] if target is not None else []
        if asset is not None:
            tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.ASSET_FILEPATHS, tf.constant(str(asset), name="vocab"))
        with tf.control_dependencies(deps):
            tf.identity(tf.matmul(x, w), name="logits")
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            return saver.save(sess, str(model_dir / "model.ckpt"), global_step=10)


def test_an_untrusted_meta_graph_that_would_write_a_file_is_refused_before_it_runs(tmp_path, deployment_run, tf1_checkpoints):
    from helpers import export

    from prefect_tensorflow.tasks.errors import UnsafeParameterError

    target = tmp_path / "outside-written"
    prefix = _tf1_graph_that_writes(deployment_run / "evil", target)
    for act in (
        lambda: freeze(prefix, deployment_run / "x.pb", output_nodes=["logits"]),
        lambda: export(prefix, deployment_run / "exports", output_nodes=["logits"]),
    ):
        with pytest.raises(
            UnsafeParameterError, match=r"checkpoint: the graph in .*model.ckpt-10.meta would run op 'WriteFile' \(WriteFile\)"
        ):
            act()
    assert not target.exists()
    assert not (deployment_run / "exports").exists()
    # an asset path outside the roots is refused too; a sound TF1 graph freezes as before
    prefix = _tf1_graph_that_writes(deployment_run / "assets", None, asset="/etc/hostname")
    with pytest.raises(UnsafeParameterError, match=r"references asset file /etc/hostname, outside the allowed roots"):
        freeze(prefix, deployment_run / "y.pb", output_nodes=["logits"])
    tf1_checkpoints(deployment_run / "m", signature=True)
    assert freeze(deployment_run / "m" / "model.ckpt-300", deployment_run / "z.pb").parity.ok
    assert freeze(deployment_run / "m" / "model.ckpt-300", deployment_run / "w.pb", output_nodes=["logits"]).parity.ok
