"""The distribution installs `prefect_tensorflow.tasks` and `.flows`, and nothing bare."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata


def test_namespace_layout_from_another_directory(tmp_path):
    code = (
        "import importlib.util, prefect_tensorflow, prefect_tensorflow.tasks, prefect_tensorflow.flows.cli\n"
        "assert not hasattr(prefect_tensorflow, '__file__') or prefect_tensorflow.__file__ is None\n"
        "assert importlib.util.find_spec('tasks') is None, 'a bare tasks module is importable'\n"
        "assert importlib.util.find_spec('flows') is None, 'a bare flows module is importable'\n"
        "import sys; assert 'tensorflow' not in sys.modules, 'importing the package imported TensorFlow'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_distribution_metadata():
    dist = metadata.distribution("prefect-tensorflow")
    assert dist.metadata["Requires-Python"] == ">=3.10"
    eps = dist.entry_points
    assert any(ep.group == "prefect.collections" and ep.value == "prefect_tensorflow.tasks" for ep in eps)
    assert any(ep.group == "console_scripts" and ep.name == "prefect-tensorflow" for ep in eps)
    requires = {r.split("<")[0].split(">")[0].split("=")[0]: r for r in dist.requires or []}
    for name in ("prefect", "tensorflow", "mlflow"):
        assert ">=" in requires[name], f"{name} needs a tested lower bound"


def test_iris_data_ships_in_the_package():
    from prefect_tensorflow.tasks.iris import CLASS_NAMES, read_iris

    features, labels = read_iris()
    assert len(features) == 150 and all(len(row) == 4 for row in features)
    assert sorted(set(labels)) == [0, 1, 2] and len(CLASS_NAMES) == 3
    assert [labels.count(c) for c in (0, 1, 2)] == [50, 50, 50]


def test_prefect_yaml_declares_the_nightly_retraining_and_the_on_demand_export():
    from pathlib import Path

    import yaml
    from prefect.flows import load_flow_from_entrypoint

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    nightly = deployments["retrain-iris"]
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
    assert nightly["work_pool"]["name"] == "tensorflow-process"
    assert not nightly["work_pool"]["name"].startswith("prefect")  # reserved by Prefect
    assert nightly["parameters"]["more_steps"] == 1000
    flow = load_flow_from_entrypoint(nightly["entrypoint"])
    assert flow.name == "retrain"
    assert set(nightly["parameters"]) <= set(flow.parameters.properties)
    export = deployments["export-checkpoint"]
    assert export["schedules"] == [] and export["work_pool"] == nightly["work_pool"]  # one anchor
    export_flow = load_flow_from_entrypoint(export["entrypoint"])
    assert export_flow.name == "export-checkpoint"
    assert set(export["parameters"]) <= set(export_flow.parameters.properties)
    assert "model_dir" in export_flow.parameters.required


def test_flow_parameters_are_typed_for_the_ui_form():
    from prefect_tensorflow.flows.export_checkpoint import export_checkpoint
    from prefect_tensorflow.flows.retrain import retrain

    for flow, names in ((retrain, ["model_dir", "steps", "export_base", "registered_model_name", "model", "data"]),
                        (export_checkpoint, ["model_dir", "checkpoint", "export_base", "registered_model_name", "model", "data"])):
        properties = flow.parameters.properties
        for name in names:
            assert properties[name].get("description") or properties[name].get("title"), (flow.name, name)
    schema = retrain.parameters.properties
    assert schema["steps"]["type"] == "integer" and schema["steps"]["minimum"] == 0
    assert export_checkpoint.parameters.properties["gate_mode"].get("enum") == ["min", "max"] or "anyOf" in str(
        export_checkpoint.parameters.properties["gate_mode"]
    )


def test_the_cli_module_imports_neither_prefect_nor_tensorflow():
    """`main()` sets Prefect's and TensorFlow's environment defaults; they read them when they load."""
    import subprocess
    import sys

    code = "import sys, prefect_tensorflow.flows.cli; print(sorted({'prefect', 'tensorflow', 'mlflow'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
