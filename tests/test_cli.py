"""The `prefect-tensorflow` command line, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Annotated

import pytest
from helpers import cli_command
from pydantic import Field
from served import seed_prefect_home
from typer.testing import CliRunner

from prefect_tensorflow.flows.cli import app
from prefect_tensorflow.tasks.configs import AliasName, GateConfig

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_checkpoints_list_json(trained_dir):
    result = invoke("checkpoints", "list", str(trained_dir), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["step"] for r in rows] == [300, 200, 100, 0]
    assert all(r["valid"] and r["size_bytes"] > 0 and "loss" in r["metrics"] for r in rows)


def test_checkpoints_list_table(trained_dir):
    result = invoke("checkpoints", "list", str(trained_dir))
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["step", "time"]
    assert lines[1].split()[0] == "300" and "yes" in lines[1]


def test_checkpoints_latest_and_best_json(trained_dir):
    latest = json.loads(invoke("checkpoints", "latest", str(trained_dir), "--json").stdout)
    assert latest["step"] == 300 and latest["format"] == "tf2"
    best = json.loads(invoke("checkpoints", "best", str(trained_dir), "--metric", "loss", "--mode", "min", "--json").stdout)
    from prefect_tensorflow.tasks.checkpoints.selection import select_best_checkpoint

    assert best["path"] == select_best_checkpoint(trained_dir, "loss", "min").path


def test_checkpoints_inspect(trained_dir):
    result = invoke("checkpoints", "inspect", str(trained_dir / "model.ckpt-300"), "--json")
    info = json.loads(result.stdout)
    assert info["valid"] and info["step"] == 300
    by_name = {v["name"]: v for v in info["variables"]}
    assert by_name["global_step/.ATTRIBUTES/VARIABLE_VALUE"] == {
        "name": "global_step/.ATTRIBUTES/VARIABLE_VALUE",
        "shape": [],
        "dtype": "int64",
    }
    assert any(v["shape"] == [4, 10] and v["dtype"] == "float32" for v in info["variables"])
    text = invoke("checkpoints", "inspect", str(trained_dir / "model.ckpt-300.index")).stdout
    assert "valid tf2 checkpoint, step 300" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["checkpoints", "latest", "/nonexistent/dir"], "model dir /nonexistent/dir: does not exist"),
        (["checkpoints", "best", "{dir}", "--metric", "f1"], "metric 'f1' was not recorded"),
        (["checkpoints", "best", "{dir}", "--metric", "loss", "--mode", "sideways"], "mode: expected 'min' or 'max'"),
        (["checkpoints", "inspect", "{dir}/model.ckpt-999"], "model.ckpt-999: index file is missing"),
        (["train", "--model-dir", "{dir}/x", "--model", "bad"], "model 'bad': no model builder is registered under this name"),
        (
            ["train", "--model-dir", "{dir}/x", "--model", "bad name"],
            "model 'bad name': expected a registered model builder name",
        ),
        (
            ["train", "--model-dir", "{dir}/x", "--data", "shutil:rmtree"],
            "data 'shutil:rmtree': 'shutil' is a standard-library module",
        ),
        (["train", "--model-dir", "{dir}/x", "--hparams", "{nope"], "--hparams: expected a JSON object"),
        (["train", "--model-dir", "s3:/team/models", "--steps", "1"], "model_dir: expected s3://bucket/prefix"),
        (["train", "--model-dir", "hdfs://team/models", "--steps", "1"], "model_dir: unsupported scheme 'hdfs'"),
        (["train", "--model-dir", "{dir}/x", "--save-checkpoints-steps", "5", "--save-checkpoints-secs", "5"], "received both"),
        (["train", "--model-dir", "{dir}/x", "--save-checkpoints-steps", "0"], "save_checkpoints_steps"),
        (
            ["train", "--model-dir", "{dir}/x", "--steps", "-4"],
            "steps: expected an integer >= 0 and <= 1000000000000, received -4",
        ),
        (
            ["retrain", "--model-dir", "{dir}/x", "--select", "newest"],
            "select: expected 'latest', a step number or 'best:<metric>[:min|max]'",
        ),
        (["retrain", "--model-dir", "{dir}/x", "--gate-mode", "sideways"], "--gate-mode: expected 'min' or 'max'"),
        (["retrain", "--model-dir", "{dir}/x", "--tracking-uri", "localhost:5000"], "tracking_uri: expected a URI"),
        (["retrain", "--model-dir", "{dir}/x", "--registered-model-name", "a/b"], "--registered-model-name: expected"),
    ],
)
def test_errors_are_one_clear_line(trained_dir, args, message):
    args = [a.replace("{dir}", str(trained_dir)) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_train_shows_progress_and_prints_json(tmp_path, cli_env):
    cmd = cli_command(
        "train",
        "--model-dir",
        str(tmp_path / "m"),
        "--steps",
        "200",
        "--save-checkpoints-steps",
        "100",
        "--json",
    )
    result = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["final_step"] == 200 and summary["checkpoints_saved"] == 3
    assert summary["last_checkpoint"] == str(tmp_path / "m" / "model.ckpt-200")
    assert "200/200" in result.stderr and "training" in result.stderr  # the progress bar
    assert "Traceback" not in result.stderr


def test_console_script_is_installed(cli_env):
    exe = os.path.join(os.path.dirname(sys.executable), "prefect-tensorflow")
    result = subprocess.run([exe, "--help"], env=cli_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("train", "checkpoints", "retrain"):
        assert command in result.stdout


@pytest.mark.slow
def test_retrain_ends_with_a_registered_version_and_says_how_to_open_the_mlflow_ui(tmp_path, cli_env):
    """What `make run` does, on a small training: the whole chain, twice; MLflow's store is the data home's
    SQLite database, as no tracking URI is given (the command's answer names it)."""
    db = tmp_path / "home" / "mlflow" / "mlflow.db"
    cli_env = {k: v for k, v in cli_env.items() if k != "MLFLOW_TRACKING_URI"}
    cli_env["PREFECT_TENSORFLOW_HOME"] = str(tmp_path / "home")
    cmd = cli_command(
        "retrain",
        "--model-dir",
        str(tmp_path / "m"),
        "--steps",
        "60",
        "--export-base",
        str(tmp_path / "export"),
        "--frozen-dir",
        str(tmp_path / "frozen"),
        "--registered-model-name",
        "cli-iris",
    )

    def run(*extra: str) -> str:
        # Files, not pipes: Prefect's ephemeral server inherits them and outlives a pipe's reader.
        with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
            code = subprocess.run(cmd + list(extra), env=cli_env, stdout=out, stderr=err, timeout=600).returncode
        assert code == 0, (tmp_path / "err").read_text()[-3000:]
        return (tmp_path / "out").read_text()

    summary = json.loads(run("--json"))
    registered = summary["registered"]
    assert (registered["name"], registered["version"], registered["reused"]) == ("cli-iris", 1, False)
    assert registered["aliases"] == ["challenger", "champion"]
    text = run()
    assert "model version:        cli-iris version 1 (already registered), aliases: challenger, champion" in text
    assert f"ui --backend-store-uri sqlite:///{db}" in text
    assert "http://127.0.0.1:5000/#/models/cli-iris/versions/1" in text


@pytest.mark.slow
def test_export_checkpoint_command_ships_a_step_and_says_so_again(trained_dir, tmp_path, cli_env, prefect_database):
    """As a user runs it: a process of its own, with Prefect's ephemeral API."""
    args = cli_command(
        "export-checkpoint",
        "--model-dir",
        str(trained_dir),
        "--checkpoint",
        "100",
        "--alias",
        "staging",
        "--export-base",
        str(tmp_path / "export"),
        "--frozen-dir",
        str(tmp_path / "frozen"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow/mlflow.db",
        "--registered-model-name",
        "cli-export",
    )
    env = dict(cli_env, PREFECT_HOME=str(tmp_path / "prefect-home"))
    seed_prefect_home(tmp_path / "prefect-home", prefect_database)  # its ephemeral API need not migrate one

    def run(*extra: str) -> str:
        # Files, not pipes: Prefect's ephemeral server inherits them and outlives a pipe's reader.
        with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
            code = subprocess.run(args + list(extra), env=env, stdout=out, stderr=err, timeout=600).returncode
        assert code == 0, (tmp_path / "err").read_text()[-3000:]
        return (tmp_path / "out").read_text()

    first = json.loads(run("--json"))
    assert first["checkpoint"]["step"] == 100 and first["export"]["version"] == 1
    assert first["registered"]["aliases"] == ["challenger", "champion", "staging"]
    again = run()
    assert "(already registered: not frozen again)" in again
    assert "cli-export version 1 (already registered)" in again


def test_export_checkpoint_command_refuses_bad_options_in_one_line(trained_dir):
    for args, message in (
        (["--checkpoint", "-1"], "checkpoint: expected 'latest', a step number"),
        (["--alias", "v1"], "--alias: expected alias names"),
        (["--registered-model-name", ""], "--registered-model-name: expected a registered model name"),
    ):
        result = runner.invoke(app, ["export-checkpoint", "--model-dir", str(trained_dir), *args])
        assert result.exit_code == 2 and message in result.stderr, result.output


# --- the flow commands are made from the flows' parameters ---------------------------------------

# Every option the flow commands had when they were written by hand.
HAND_WRITTEN_OPTIONS = {
    "retrain": {
        "--model-dir", "--select", "--export-base", "--frozen-dir", "--registered-model-name", "--tracking-uri",
        "--experiment", "--gate-metric", "--gate-mode", "--mlflow", "--no-mlflow", "--from-scratch", "--json",
        "--steps", "--model", "--data", "--hparams", "--save-checkpoints-steps", "--keep-checkpoint-max",
    },
    "export-checkpoint": {
        "--model-dir", "--checkpoint", "--registered-model-name", "--export-base", "--frozen-dir", "--model", "--data",
        "--alias", "--gate-metric", "--gate-mode", "--tracking-uri", "--experiment", "--json",
    },
    "sweep": {
        "--candidates", "--sweep-root", "--select", "--dask-address", "--dask-workers", "--threads-per-candidate",
        "--export-base", "--frozen-dir", "--registered-model-name", "--tracking-uri", "--experiment", "--gate-metric",
        "--gate-mode", "--mlflow", "--no-mlflow", "--json", "--steps", "--model",
    },
}  # fmt: skip


def _options_of(name: str) -> set[str]:
    import typer.main

    from prefect_tensorflow.flows.cli import FLOW_COMMANDS, SPELLING, _emit
    from prefect_tensorflow.flows.flow_commands import flow_command, load_flow

    entry = FLOW_COMMANDS[name]
    app = typer.Typer()
    app.command()(flow_command(load_flow(entry.flow), SPELLING, entry.text, _emit))
    return {opt for param in typer.main.get_command(app).params for opt in param.opts + param.secondary_opts}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN_OPTIONS))
def test_the_flow_commands_keep_their_options_and_have_one_per_flow_parameter(name):
    from prefect_tensorflow.flows.cli import FLOW_COMMANDS
    from prefect_tensorflow.flows.flow_commands import load_flow

    options = _options_of(name)
    assert HAND_WRITTEN_OPTIONS[name] <= options, HAND_WRITTEN_OPTIONS[name] - options
    flow = load_flow(FLOW_COMMANDS[name].flow)
    configs = {"training", "gate", "mlflow", "window"}  # window: --window-start/--window-end/--window-days
    renamed = {"track": "--mlflow", "aliases": "--alias", "decision": "--approve"}
    for parameter in set(flow.parameters.properties) - configs:
        assert renamed.get(parameter, "--" + parameter.replace("_", "-")) in options, parameter


def test_the_gate_options_default_to_the_gate_config():
    """`--gate-mode` left out is GateConfig's default (which may follow the metric), not a CLI constant."""
    from prefect_tensorflow.flows.cli_options import config_from_options

    given = config_from_options(GateConfig, {"gate_metric": "loss", "gate_mode": None}, prefix="gate_")
    assert given == GateConfig(metric="loss")
    assert config_from_options(GateConfig, {"gate_metric": ""}, prefix="gate_").metric is None
    with pytest.raises(ValueError, match="--gate-mode: expected 'min' or 'max'"):
        config_from_options(GateConfig, {"gate_mode": "up"}, prefix="gate_")


def test_a_parameter_added_to_a_flow_is_an_option_of_its_command(prefect_api, tmp_path):
    """A flow with parameters of every shape: its command takes them with no CLI code of its own."""
    import typer
    from prefect import flow

    from prefect_tensorflow.flows.cli import SPELLING
    from prefect_tensorflow.flows.flow_commands import flow_command

    @flow(name="toy")
    def toy(
        rounds: Annotated[int, Field(ge=1)] = 3,
        label: str = "",
        aliases: list[AliasName] = [],  # noqa: B006
        weights: dict[str, float] = {},  # noqa: B006
        gate: GateConfig = GateConfig(),
        track: bool = True,
    ) -> dict:
        """A toy flow.

        Args:
            rounds: How many rounds.
            label: A label.
            aliases: Aliases.
            weights: Weights by name.
            gate: The gate.
            track: Whether to track.
        """
        return {"rounds": rounds, "label": label, "aliases": aliases, "weights": weights, "gate": gate, "track": track}

    shown = []
    app = typer.Typer()
    app.command()(flow_command(toy, SPELLING, lambda summary, arguments: str(summary), lambda s, j, text: shown.append(s)))
    (tmp_path / "weights.json").write_text('{"a": 0.5}')
    args = ["--rounds", "5", "--alias", "staging", "--weights", f"@{tmp_path / 'weights.json'}", "--gate-metric", "loss"]
    result = runner.invoke(app, [*args, "--no-mlflow"])
    assert result.exit_code == 0, result.output
    assert shown == [
        {
            "rounds": 5,
            "label": "",
            "aliases": ["staging"],
            "weights": {"a": 0.5},
            "gate": GateConfig(metric="loss"),
            "track": False,
        }
    ]
    help_text = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).stdout
    assert "How many rounds. (default: 3)" in help_text and "Weights by name." in help_text
    for bad, message in (
        (["--rounds", "0"], "--rounds: "),
        (["--weights", "[1]"], "--weights: "),
        (["--alias", "v2"], "--alias: "),
    ):
        result = runner.invoke(app, bad)
        assert result.exit_code == 2 and message in result.stderr, result.output
