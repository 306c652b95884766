"""The TensorFlow internals `CheckpointWriter` (tasks/checkpoints/writer.py) reaches into, guarded; and its fallback.

The writer learns a checkpoint's keys once with TensorFlow's own
serialization code (`save_util.serialize_graph_view`, non-public), then
writes snapshots with `SaveV2` + `MergeV2Checkpoints` and the state file with
`checkpoint_management`'s helpers. A TensorFlow upgrade that moves or
changes any of them must fail here, naming what changed, not in a training
run as a checkpoint that does not restore (the same idea as MLflow's
`mlflow_client.check_private_api`). Anything the recipe cannot snapshot (a
registered saver, ...) makes it fall back to `tf.train.Checkpoint.write`:
that path is exercised with a real registered saver and restored.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from typing import Any

import pytest

tf = pytest.importorskip("tensorflow")

from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy  # noqa: E402
from prefect_tensorflow.tasks.checkpoints.writer import CheckpointWriter  # noqa: E402

WHERE = "CheckpointWriter (tasks/checkpoints/writer.py: _Recipe, read_kept_list, write_state_file)"
NAMES = {  # module -> the names the writer imports from it
    "tensorflow.python.checkpoint.graph_view": ["ObjectGraphView"],
    "tensorflow.python.checkpoint.save_util": ["serialize_graph_view"],
    "tensorflow.python.training.saving.saveable_object": ["SaveSpec"],
    "tensorflow.python.training.saving.saveable_object_util": ["SaveableCompatibilityConverter"],
    "tensorflow.python.checkpoint.checkpoint_management": ["get_checkpoint_state", "generate_checkpoint_state_proto"],
    "tensorflow.python.distribute.values": ["DistributedValues"],  # a multi-worker strategy's variables, read directly
}
PARAMETERS = {  # callable -> the parameters the writer passes, by name or position
    "tensorflow.python.checkpoint.save_util.serialize_graph_view": ["graph_view"],
    "tensorflow.python.checkpoint.checkpoint_management.generate_checkpoint_state_proto": [
        "save_dir",
        "model_checkpoint_path",
        "all_model_checkpoint_paths",
        "all_model_checkpoint_timestamps",
        "last_preserved_timestamp",
    ],
    "tensorflow.python.checkpoint.checkpoint_management.get_checkpoint_state": ["checkpoint_dir"],
}
RAW_OPS = {
    "SaveV2": ["prefix", "tensor_names", "shape_and_slices", "tensors"],
    "MergeV2Checkpoints": ["checkpoint_prefixes", "destination_prefix", "delete_old_dirs"],
}


def _lookup(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def tensorflow_internals_problems() -> list[str]:
    """What the writer relies on that this TensorFlow no longer has, or has changed; empty when all is there."""
    from tensorflow.python.checkpoint import graph_view, save_util
    from tensorflow.python.training.saving.saveable_object import SaveSpec
    from tensorflow.python.training.saving.saveable_object_util import SaveableCompatibilityConverter

    problems = []
    for module, names in NAMES.items():
        try:
            found = importlib.import_module(module)
        except ImportError as err:
            problems.append(f"{module} cannot be imported ({err})")
            continue
        problems += [f"{module}.{name} is gone" for name in names if not hasattr(found, name)]
    for dotted, expected in PARAMETERS.items():
        try:
            parameters = list(inspect.signature(_lookup(dotted)).parameters)
        except (ImportError, AttributeError):
            continue  # reported above
        if parameters[: len(expected)] != expected:
            problems.append(f"{dotted} takes {parameters}, expected {expected} first")
    for op, expected in RAW_OPS.items():
        parameters = list(inspect.signature(getattr(tf.raw_ops, op)).parameters)
        if parameters[: len(expected)] != expected:
            problems.append(f"tf.raw_ops.{op} takes {parameters}, expected {expected} first")
    if problems:
        return problems

    # What serialize_graph_view returns for the writer's usual objects: a variable and an input iterator.
    checkpoint = tf.train.Checkpoint(global_step=tf.Variable(0, dtype=tf.int64), it=iter(tf.data.Dataset.range(4)))
    if not hasattr(checkpoint, "save_counter") or not hasattr(checkpoint, "write"):
        return ["tf.train.Checkpoint has no save_counter or write"]
    checkpoint.save_counter  # noqa: B018 - created lazily, as the writer does
    result = save_util.serialize_graph_view(graph_view.ObjectGraphView(checkpoint))
    if not (isinstance(result, tuple) and len(result) == 4):
        return [f"save_util.serialize_graph_view returns {type(result).__name__}, expected 4 values"]
    serialized, _, registered, proto = result
    if not hasattr(proto, "SerializeToString"):
        problems.append(f"serialize_graph_view's object graph is a {type(proto).__name__}, not a proto")
    if registered:
        problems.append(f"serialize_graph_view reports registered savers for plain objects: {dict(registered)}")
    variables = {k: v for t, tensors in serialized.items() if isinstance(t, tf.Variable) for k, v in tensors.items()}
    for key in ("global_step/.ATTRIBUTES/VARIABLE_VALUE", "save_counter/.ATTRIBUTES/VARIABLE_VALUE"):
        value = variables.get(key)
        if not isinstance(value, SaveSpec) or hasattr(value, "numpy"):
            problems.append(f"a variable's entry {key} is {type(value).__name__}, expected a SaveSpec (read lazily)")
    converters = [t for t in serialized if isinstance(t, SaveableCompatibilityConverter) and t.saveables]
    if not converters:
        problems.append("the input iterator is no longer wrapped in a SaveableCompatibilityConverter")
    for converter in converters:
        if not hasattr(converter, "obj") or not hasattr(converter.obj, "_serialize_to_tensors"):
            problems.append("SaveableCompatibilityConverter.obj._serialize_to_tensors is gone")
        for saveable in converter.saveables:
            if not all(spec.name.startswith(saveable.name) for spec in saveable.specs):
                problems.append(f"saveable {saveable.name}: spec names {[s.name for s in saveable.specs]} no longer extend it")
    return problems


def test_the_tensorflow_internals_the_checkpoint_writer_uses_are_all_there():
    problems = tensorflow_internals_problems()
    assert problems == [], (
        f"TensorFlow {tf.__version__} changed internals that {WHERE} relies on: {problems}. "
        "Adapt the writer's recipe, or make it fall back to tf.train.Checkpoint.write for what changed."
    )


def _restore(prefix: str, **objects: Any) -> None:
    tf.train.Checkpoint(**objects).read(prefix).assert_existing_objects_matched()


def test_the_writers_files_hold_what_tensorflows_own_write_holds(tmp_path):
    """Same keys, shapes and dtypes as `tf.train.Checkpoint.write` of the same objects, and they restore."""
    step = tf.Variable(0, dtype=tf.int64)
    dense = tf.keras.layers.Dense(3)
    dense.build((None, 4))
    iterator = iter(tf.data.Dataset.range(100))
    checkpoint = tf.train.Checkpoint(global_step=step, model=dense, it=iterator)
    writer = CheckpointWriter(checkpoint, str(tmp_path / "w"), CheckpointPolicy(async_save=False))
    next(iterator)
    step.assign(7)
    ours = writer.save(7)
    writer.finish()
    theirs = checkpoint.write(str(tmp_path / "tf" / "model.ckpt-7"))

    def listing(prefix: str) -> list:
        return sorted((name, tuple(shape)) for name, shape in tf.train.list_variables(prefix))

    assert listing(ours) == listing(theirs)
    restored_step, restored_dense = tf.Variable(0, dtype=tf.int64), tf.keras.layers.Dense(3)
    restored_dense.build((None, 4))
    restored_it = iter(tf.data.Dataset.range(100))
    _restore(ours, global_step=restored_step, model=restored_dense, it=restored_it)
    assert int(restored_step.numpy()) == 7 and int(next(restored_it).numpy()) == 1
    for mine, original in zip(restored_dense.weights, dense.weights):
        assert (mine.numpy() == original.numpy()).all()


class _Stateful(tf.Module):
    """An object TensorFlow saves through a registered checkpoint saver, not through its variables."""

    def __init__(self):
        super().__init__()
        self.value = tf.Variable(0.0)


def _save_stateful(trackables: dict, file_prefix: str) -> str:
    names = sorted(trackables)
    tensors = [trackables[name].value.read_value() for name in names]
    tf.raw_ops.SaveV2(prefix=file_prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)
    return file_prefix


def _restore_stateful(trackables: dict, merged_prefix: str) -> None:
    for name, trackable in trackables.items():
        (value,) = tf.raw_ops.RestoreV2(prefix=merged_prefix, tensor_names=[name], shape_and_slices=[""], dtypes=[tf.float32])
        trackable.value.assign(value)


@pytest.fixture(scope="module")
def registered_saver():
    from tensorflow.python.saved_model import registration

    registration.register_checkpoint_saver(
        package="ptf-tests",
        name="stateful",
        predicate=lambda obj: isinstance(obj, _Stateful),
        save_fn=_save_stateful,
        restore_fn=_restore_stateful,
    )


@pytest.mark.parametrize("async_save", [False, True])
def test_a_registered_saver_takes_the_fallback_and_its_checkpoints_restore(registered_saver, tmp_path, caplog, async_save):
    step, stateful = tf.Variable(0, dtype=tf.int64), _Stateful()
    model_dir = tmp_path / "m"
    writer = CheckpointWriter(
        tf.train.Checkpoint(global_step=step, stateful=stateful),
        str(model_dir),
        CheckpointPolicy(async_save=async_save, keep_checkpoint_max=2),
    )
    with caplog.at_level(logging.INFO, logger="prefect_tensorflow"):
        for n in (1, 2, 3):
            step.assign(n)
            stateful.value.assign(n * 1.5)
            writer.save(n)
        writer.finish()
    assert "parts only TensorFlow's own save writes" in caplog.text  # the fallback, as the writer announces it
    assert sorted(f for f in os.listdir(model_dir) if f.endswith(".index")) == ["model.ckpt-2.index", "model.ckpt-3.index"]
    assert tf.train.latest_checkpoint(str(model_dir)) == str(model_dir / "model.ckpt-3")
    assert not [f for f in os.listdir(model_dir) if f.endswith("_temp")]
    restored_step, restored = tf.Variable(0, dtype=tf.int64), _Stateful()
    _restore(str(model_dir / "model.ckpt-3"), global_step=restored_step, stateful=restored)
    assert (int(restored_step.numpy()), float(restored.value.numpy())) == (3, 4.5)


class _Counter(tf.train.experimental.PythonState):
    """Python state (not a tensor) saved with the checkpoint."""

    def __init__(self):
        self.count = 0

    def serialize(self) -> str:
        return str(self.count)

    def deserialize(self, string_value: str) -> None:
        self.count = int(string_value)


def test_python_state_is_saved_as_it_is_at_each_save(tmp_path):
    step, counter = tf.Variable(0, dtype=tf.int64), _Counter()
    writer = CheckpointWriter(
        tf.train.Checkpoint(global_step=step, counter=counter), str(tmp_path / "m"), CheckpointPolicy(async_save=False)
    )
    for n in (1, 2, 3):
        step.assign(n)
        counter.count = n * 10
        writer.save(n)
    writer.finish()
    restored_step, restored = tf.Variable(0, dtype=tf.int64), _Counter()
    _restore(str(tmp_path / "m" / "model.ckpt-3"), global_step=restored_step, counter=restored)
    assert (int(restored_step.numpy()), restored.count) == (3, 30)


def test_prepare_traces_the_snapshot_once_before_any_save_and_saves_nothing(tmp_path):
    """What a training calls before its first step: the snapshot traced and run once, no file, no count moved."""
    step, weights = tf.Variable(0, dtype=tf.int64), tf.Variable([1.0, 2.0])
    checkpoint = tf.train.Checkpoint(global_step=step, weights=weights)
    model_dir = tmp_path / "m"
    writer = CheckpointWriter(checkpoint, str(model_dir), CheckpointPolicy())
    writer.prepare()
    read = writer._recipe._read
    assert read.experimental_get_tracing_count() == 1
    assert sorted(os.listdir(model_dir)) == [] and int(checkpoint.save_counter.numpy()) == 0
    for n in (1, 2):
        step.assign(n)
        weights.assign([n * 10.0, n * 20.0])
        writer.save(n)
    writer.finish()
    assert read.experimental_get_tracing_count() == 1  # the saves used the prepared trace
    restored_step, restored_weights = tf.Variable(0, dtype=tf.int64), tf.Variable([0.0, 0.0])
    _restore(str(model_dir / "model.ckpt-2"), global_step=restored_step, weights=restored_weights)
    assert int(restored_step.numpy()) == 2 and restored_weights.numpy().tolist() == [20.0, 40.0]
    assert int(checkpoint.save_counter.numpy()) == 2
