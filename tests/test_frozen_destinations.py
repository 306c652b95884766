"""Frozen-graph and export destinations belong to the model: defaults per registered model, and a frozen
graph is never replaced by other bytes (so a registered version's recorded digest keeps matching its file)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from helpers import freeze

from prefect_tensorflow.tasks.settings import Settings


def _sha256(path: str) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_refreezing_the_same_checkpoint_to_the_same_output_is_idempotent(trained_dir: Path, tmp_path: Path):
    first = freeze(trained_dir / "model.ckpt-300", tmp_path / "model.ckpt-300.pb")
    inode = os.stat(first.path).st_ino
    again = freeze(trained_dir / "model.ckpt-300", tmp_path / "model.ckpt-300.pb")
    assert (again.path, again.digest) == (first.path, first.digest) == (str(tmp_path / "model.ckpt-300.pb"), _sha256(first.path))
    assert os.stat(first.path).st_ino == inode  # not rewritten
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt-300.pb"]


def test_a_frozen_graph_is_never_replaced_by_another_models_graph(trained_dir: Path, tmp_path: Path):
    taken = tmp_path / "model.ckpt-300.pb"
    taken.write_bytes(b"another model's frozen graph")
    result = freeze(trained_dir / "model.ckpt-300", taken)
    assert taken.read_bytes() == b"another model's frozen graph"  # kept: its recorded digest still matches
    assert result.path != str(taken) and os.path.dirname(result.path) == str(tmp_path)
    assert os.path.basename(result.path).startswith("model.ckpt-300.") and result.path.endswith(".pb")
    assert _sha256(result.path) == result.digest


@pytest.mark.slow
def test_two_models_with_default_paths_get_their_own_frozen_graphs_and_exports(prefect_api, tmp_path, monkeypatch, mlflow_store):
    from prefect_tensorflow.flows.retrain import retrain
    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.configs import TrainingConfig

    home = tmp_path / "home"
    monkeypatch.setenv("PREFECT_TENSORFLOW_HOME", str(home))
    policy = CheckpointPolicy(save_checkpoints_steps=20)
    first = retrain(
        model_dir=str(home / "models" / "a"),
        training=TrainingConfig(steps=20, seed=1, policy=policy),
        registered_model_name="model-a",
        mlflow=mlflow_store,
    )
    second = retrain(
        model_dir=str(home / "models" / "b"),
        training=TrainingConfig(steps=20, seed=2, policy=policy),
        registered_model_name="model-b",
        mlflow=mlflow_store,
    )
    assert first.frozen_graph.path == str(home / "frozen" / "model-a" / "model.ckpt-20.pb")
    assert second.frozen_graph.path == str(home / "frozen" / "model-b" / "model.ckpt-20.pb")
    assert (first.export.path, second.export.path) == (
        str(home / "exports" / "model-a" / "1"),
        str(home / "exports" / "model-b" / "1"),
    )
    assert first.frozen_graph.digest != second.frozen_graph.digest
    run = mlflow_store.client().get_run(first.registered.run_id)
    recorded = run.data.tags["prefect_tensorflow.frozen_graph.sha256"]
    assert recorded == first.frozen_graph.digest == _sha256(first.frozen_graph.path)  # still the registered bytes


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_a_default_path_needs_a_name_usable_as_one_directory(name: str, tmp_path: Path):
    with pytest.raises(ValueError, match="default frozen directory: expected a model name usable as a directory name"):
        Settings(home=str(tmp_path)).default_path("frozen", name)
