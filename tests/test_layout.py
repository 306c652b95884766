"""The distribution installs `prefect_tensorflow.tasks` and `.flows`, and nothing bare; what imports what."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
    for group in ("prefect_tensorflow.models", "prefect_tensorflow.datasets"):
        assert any(ep.group == group and ep.name == "iris" for ep in eps), f"iris is not registered in {group}"
    requires = {r.split("<")[0].split(">")[0].split("=")[0]: r for r in dist.requires or []}
    for name in ("prefect", "tensorflow", "mlflow"):
        assert ">=" in requires[name], f"{name} needs a tested lower bound"


def test_iris_data_ships_in_the_package():
    from prefect_tensorflow.tasks.iris import CLASS_NAMES, read_iris

    features, labels = read_iris()
    assert len(features) == 150 and all(len(row) == 4 for row in features)
    assert sorted(set(labels)) == [0, 1, 2] and len(CLASS_NAMES) == 3
    assert [labels.count(c) for c in (0, 1, 2)] == [50, 50, 50]


def _repo_deployments() -> dict:
    import yaml

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    return {d["name"]: d for d in config["deployments"]}


def test_prefect_yaml_declares_the_nightly_retraining_and_the_on_demand_export():
    from prefect.flows import load_flow_from_entrypoint

    from prefect_tensorflow.tasks.configs import TrainingConfig

    deployments = _repo_deployments()
    nightly = deployments["retrain-iris"]
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
    assert nightly["work_pool"]["name"] == "tensorflow-process"
    assert not nightly["work_pool"]["name"].startswith("prefect")  # reserved by Prefect
    assert nightly["parameters"]["training"]["more_steps"] == 1000
    TrainingConfig.model_validate(nightly["parameters"]["training"])  # the nested settings are valid as written
    flow = load_flow_from_entrypoint(nightly["entrypoint"])
    assert flow.name == "retrain"
    assert set(nightly["parameters"]) <= set(flow.parameters.properties)
    export = deployments["export-checkpoint"]
    assert export["schedules"] == [] and export["work_pool"] == nightly["work_pool"]  # one anchor
    export_flow = load_flow_from_entrypoint(export["entrypoint"])
    assert export_flow.name == "export-checkpoint"
    assert set(export["parameters"]) <= set(export_flow.parameters.properties)
    assert export_flow.parameters.required == []  # model_dir defaults under the data home
    for deployment in deployments.values():  # paths left empty: the flows' defaults under the data home
        paths = {
            p: v for p, v in deployment["parameters"].items() if p in ("model_dir", "sweep_root", "export_base", "frozen_dir")
        }
        # 0: rollback-champion; 1: sync-exports (its export_base; its target_dir also defaults under the data home)
        assert len(paths) in (0, 1, 3) and set(paths.values()) <= {""}, (deployment["name"], paths)


def test_the_package_ships_prefect_yaml_and_load_definitions_reads_the_repos():
    from importlib import resources

    from prefect_tensorflow.flows.deployments import load_definitions

    shipped = resources.files("prefect_tensorflow.flows").joinpath("prefect.yaml")
    assert shipped.is_file()
    loaded = {d.name: d for d in load_definitions()}
    expected = _repo_deployments()
    assert list(loaded) == list(expected)
    for name, raw in expected.items():
        definition = loaded[name]
        assert definition.entrypoint == raw["entrypoint"]
        assert definition.parameters == raw["parameters"]
        assert [(s.cron, s.interval) for s in definition.schedules] == [
            (s.get("cron"), s.get("interval")) for s in raw["schedules"]
        ]
        assert definition.work_pool["name"] == raw["work_pool"]["name"]
        assert definition.tags == raw["tags"]


def _resolve(schema: dict, node: dict) -> dict:
    ref = node.get("$ref") or next((a["$ref"] for a in node.get("anyOf", []) if "$ref" in a), None)
    if ref is None:
        return node
    return schema["definitions"][ref.rsplit("/", 1)[-1]]


def test_flow_parameters_are_described_and_typed_for_the_ui_form():
    from prefect_tensorflow.flows.export_checkpoint import export_checkpoint
    from prefect_tensorflow.flows.retrain import retrain

    for flow in (retrain, export_checkpoint):
        properties = flow.parameters.properties
        assert properties, flow.name
        for name, prop in properties.items():
            assert prop.get("description", "").strip(), f"{flow.name}: parameter {name!r} has no description"
        schema = flow.parameters.model_dump()
        gate = properties["gate"]
        assert gate.get("$ref", "").endswith("/GateConfig"), (flow.name, gate)
        mode = _resolve(schema, gate)["properties"]["mode"]  # min or max, or left out: follows the metric
        assert [branch.get("enum") for branch in mode["anyOf"]] == [["min", "max"], None], mode
        assert mode["anyOf"][1] == {"type": "null"} and mode["default"] is None, mode

    export_props = export_checkpoint.parameters.properties
    for name in ("model", "data"):
        assert "iris" in export_props[name]["enum"], (name, export_props[name])
    assert export_props["aliases"]["type"] == "array" and export_props["aliases"]["items"]["type"] == "string"

    retrain_schema = retrain.parameters.model_dump()
    training = _resolve(retrain_schema, retrain.parameters.properties["training"])
    assert training["title"] == "TrainingConfig"
    assert "iris" in training["properties"]["model"]["enum"] and "iris" in training["properties"]["data"]["enum"]
    steps = training["properties"]["steps"]
    assert steps["type"] == "integer" and steps.get("minimum") == 0, steps


def _module_level_imports(tree: ast.Module) -> set[str]:
    """Top-level modules imported by the module's own statements (not inside functions or classes)."""
    found: set[str] = set()
    nodes = list(tree.body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, (ast.If, ast.Try)):  # `if TYPE_CHECKING:` / `try: import ...` run at import too
            nodes.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                nodes.extend(handler.body)
    return found


def test_only_prefect_tasks_and_blocks_import_prefect():
    """The plain modules stay usable without Prefect: the CLI's plain commands and library callers."""
    allowed = {"prefect_tasks.py", "blocks.py"}
    modules = sorted((REPO / "tasks").rglob("*.py"))
    names = {m.relative_to(REPO / "tasks").as_posix() for m in modules}
    assert {"training/loop.py", "checkpoints/selection.py", "registry/model_versions.py"} <= names
    importers = {
        m.relative_to(REPO / "tasks").as_posix()
        for m in modules
        if "prefect" in _module_level_imports(ast.parse(m.read_text(), str(m)))
    }
    assert importers == allowed, f"modules importing prefect at module level: {sorted(importers)}"


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import prefect.flows\n", {"prefect"}),
        ("from prefect import task\n", {"prefect"}),
        ("if True:\n    from prefect.blocks.core import Block\n", {"prefect"}),
        ("def f():\n    import prefect\n", set()),
        ("from .blocks import MlflowConnection\n", set()),
    ],
)
def test_the_import_scan_sees_module_level_imports_only(source, expected):
    assert _module_level_imports(ast.parse(source)) == expected


def test_the_cli_module_imports_neither_prefect_nor_tensorflow():
    """`main()` sets Prefect's and TensorFlow's environment defaults; they read them when they load."""
    code = "import sys, prefect_tensorflow.flows.cli; print(sorted({'prefect', 'tensorflow', 'mlflow'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_the_deployments_flow_modules_load_without_mlflow_or_tensorflow():
    """Every deployment run (and every run refused for a bad parameter) starts a process that loads its
    flow module; MLflow (~1.2 s) and TensorFlow (~3 s) are imported when a task needs them, not there."""
    code = (
        "import sys\n"
        "import prefect_tensorflow.flows.export_checkpoint, prefect_tensorflow.flows.retrain, prefect_tensorflow.flows.sweep\n"
        "print(sorted({'tensorflow', 'mlflow'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def _package_modules() -> dict[str, Path]:
    """Every module of the installed packages by dotted name (`prefect_tensorflow.tasks.training.loop`)."""
    modules = {}
    for directory, package in (("tasks", "prefect_tensorflow.tasks"), ("flows", "prefect_tensorflow.flows")):
        for path in (REPO / directory).rglob("*.py"):
            parts = path.relative_to(REPO / directory).with_suffix("").parts
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def _imports_anywhere(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports, at module level, in functions or under `TYPE_CHECKING` alike."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {target for target in found if target in modules and target != name}


def test_no_module_imports_itself_in_a_circle():
    """No circular imports in tasks/ and flows/, function-level and type-checking imports included."""
    modules = _package_modules()
    graph = {name: _imports_anywhere(name, path, modules) for name, path in modules.items()}
    assert "prefect_tensorflow.tasks.checkpoints.files" in graph["prefect_tensorflow.tasks.checkpoints.selection"]
    circles = []
    for start in graph:  # a path from a module's imports back to itself is a circle
        seen, stack = set(), [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for target in graph[node]:
                if target == start:
                    circles.append(" -> ".join([*trail, start]))
                elif target not in seen:
                    seen.add(target)
                    stack.append((target, [*trail, target]))
    assert not circles, "circular imports:\n" + "\n".join(sorted(circles))
