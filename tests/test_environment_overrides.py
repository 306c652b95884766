"""An environment's overrides (`deployments/environments/<env>.yaml`) deep-merged into `prefect.yaml`'s deployments.

No server: `load_definitions`, `load_overrides` and `apply_overrides` as
`deployments/deploy.py` and `serve.py` call them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from prefect_tensorflow.flows.deployments import (
    DeploymentDefinition,
    apply_overrides,
    deep_merge,
    load_definitions,
    load_overrides,
)

ENVIRONMENTS = str(Path(__file__).resolve().parents[1] / "deployments" / "environments")


def _definition() -> DeploymentDefinition:
    return DeploymentDefinition(
        name="retrain-iris",
        entrypoint="prefect_tensorflow.flows.retrain:retrain",
        parameters={
            "model_dir": "",
            "training": {"model": "iris", "data": "iris", "more_steps": 1000, "policy": {"save_checkpoints_steps": 500}},
            "aliases": ["staging"],
        },
    )


def test_a_nested_override_keeps_its_sibling_keys():
    base = _definition()
    before = copy.deepcopy(base.parameters)
    (merged,) = apply_overrides([base], {"retrain-iris": {"parameters": {"training": {"policy": {"keep_checkpoint_max": 3}}}}})
    assert merged.parameters["training"] == {
        "model": "iris",
        "data": "iris",
        "more_steps": 1000,
        "policy": {"save_checkpoints_steps": 500, "keep_checkpoint_max": 3},
    }
    assert merged.parameters["model_dir"] == "" and merged.parameters["aliases"] == ["staging"]
    assert base.parameters == before  # the definition itself is left as it was


def test_lists_and_scalars_replace_and_a_dict_replaces_a_scalar():
    assert deep_merge({"aliases": ["staging", "qa"], "steps": 10}, {"aliases": ["prod"], "steps": 20}) == {
        "aliases": ["prod"],
        "steps": 20,
    }
    assert deep_merge({"mlflow": None}, {"mlflow": {"tracking_uri": "http://m"}}) == {"mlflow": {"tracking_uri": "http://m"}}
    assert deep_merge({"training": {"steps": 1}}, {"training": None}) == {"training": None}


def test_an_empty_parameters_override_changes_nothing():
    base = _definition()
    (merged,) = apply_overrides([base], {"retrain-iris": {"parameters": None, "paused": True}})
    assert merged.parameters == base.parameters and merged.paused is True


@pytest.mark.parametrize(
    ("env", "more_steps", "registered", "model_dir"),
    [
        ("dev", 200, "iris-dev", ""),
        ("prod", 1000, "iris", "/srv/models/iris"),
        ("team-stack", 1000, "iris", "s3://team/models/iris"),
    ],
)
def test_the_trimmed_environment_files_give_the_whole_configs(env, more_steps, registered, model_dir):
    definitions = {d.name: d for d in apply_overrides(load_definitions(), load_overrides(env, ENVIRONMENTS))}
    nightly = definitions["retrain-iris"]
    assert nightly.parameters["training"] == {"model": "iris", "data": "iris", "more_steps": more_steps}
    assert nightly.parameters["registered_model_name"] == registered
    assert nightly.parameters["model_dir"] == model_dir
    assert [(s.cron, s.timezone) for s in nightly.schedules] == [("0 2 * * *", "UTC")]
    export = definitions["export-checkpoint"]
    assert export.parameters["model"] == "iris" and export.parameters["checkpoint"] == "latest"
    assert export.parameters["registered_model_name"] == registered
    assert definitions["sweep-iris"].parameters == {d.name: d for d in load_definitions()}["sweep-iris"].parameters
