"""The `prefect-tensorflow` command line.

    prefect-tensorflow train --model-dir DIR --steps 2000 --save-checkpoints-steps 200
    prefect-tensorflow checkpoints list DIR [--json]
    prefect-tensorflow checkpoints latest DIR [--verify-checksums] [--json]
    prefect-tensorflow checkpoints best DIR --metric accuracy --mode max [--json]
    prefect-tensorflow checkpoints inspect DIR/model.ckpt-2000 [--json]
    prefect-tensorflow retrain [--model-dir DIR] [--steps N] [--json]

`train` and `checkpoints` call the plain functions (no Prefect API needed);
`retrain` runs the Prefect flow. Errors print one line naming what is at
fault and exit with status 2.

Example:
    >>> from prefect_tensorflow.flows.cli import main
    >>> main(["checkpoints", "latest", "/models/iris", "--json"])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Any, Callable, List, Optional

import typer

from .defaults import apply_environment_defaults, default_model_dir

app = typer.Typer(
    help="Train TensorFlow models with checkpoints and ship them with Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
checkpoints_app = typer.Typer(help="List, select and inspect checkpoints.", no_args_is_help=True)
app.add_typer(checkpoints_app, name="checkpoints")

MODEL_HELP = "'module:attr' of a builder returning a compiled keras.Model"
DATA_HELP = "'module:attr' of a loader (split) -> tf.data.Dataset of (features, label)"


def _fail(err: BaseException) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _run(action: Callable[[], Any]) -> Any:
    """Run `action`, turning the package's and validation errors into one-line messages."""
    from pydantic import ValidationError

    from prefect_tensorflow.tasks.errors import PrefectTensorFlowError

    try:
        return action()
    except (PrefectTensorFlowError, ValidationError, ValueError, FileNotFoundError) as err:
        _fail(err)


def _emit(obj: Any, as_json: bool, text: Callable[[], str]) -> None:
    if as_json:
        if hasattr(obj, "model_dump"):
            obj = obj.model_dump(mode="json")
        elif isinstance(obj, list):
            obj = [o.model_dump(mode="json") if hasattr(o, "model_dump") else o for o in obj]
        typer.echo(json.dumps(obj, indent=2, sort_keys=True))
    else:
        typer.echo(text())


def _when(mtime: Optional[float]) -> str:
    if mtime is None:
        return "-"
    return datetime.fromtimestamp(mtime, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())) or "-"


@app.command()
def train(
    model_dir: str = typer.Option(None, "--model-dir", help="Checkpoint directory [default: ./.prefect-tensorflow/models/iris]"),
    model: str = typer.Option("prefect_tensorflow.tasks.iris:build_model", help=MODEL_HELP),
    data: str = typer.Option("prefect_tensorflow.tasks.iris:load_dataset", help=DATA_HELP),
    steps: int = typer.Option(1000, help="Target global step (run again after a crash to finish)"),
    more_steps: Optional[int] = typer.Option(None, help="Train this many steps past the newest checkpoint instead"),
    batch_size: int = typer.Option(32),
    seed: int = typer.Option(0),
    save_checkpoints_steps: Optional[int] = typer.Option(None, help="Save every N steps"),
    save_checkpoints_secs: Optional[float] = typer.Option(None, help="Save every N seconds [default: 600]"),
    keep_checkpoint_max: int = typer.Option(5, help="Keep the N newest checkpoints (0 keeps all)"),
    keep_checkpoint_every_n_hours: float = typer.Option(10000.0),
    async_save: bool = typer.Option(False, "--async-save", help="Write checkpoints in the background"),
    checkpoint_name: str = typer.Option("model.ckpt"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON"),
) -> None:
    """Train with checkpoints, resuming from the newest valid one; shows a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from prefect_tensorflow.tasks.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.training import train as train_fn

    policy = _run(
        lambda: CheckpointPolicy(
            save_checkpoints_steps=save_checkpoints_steps,
            save_checkpoints_secs=save_checkpoints_secs,
            keep_checkpoint_max=keep_checkpoint_max or None,
            keep_checkpoint_every_n_hours=keep_checkpoint_every_n_hours,
            async_save=async_save,
            checkpoint_name=checkpoint_name,
        )
    )
    progress = Progress(
        TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
        TextColumn("{task.fields[loss]}"), TimeRemainingColumn(),
        console=_stderr_console(), transient=False,
    )
    bar: dict[str, Any] = {}

    def on_progress(step: int, target: int, loss: Optional[float]) -> None:
        if "id" not in bar:  # started on the first step, so errors before it print cleanly
            progress.start()
            bar["id"] = progress.add_task("train", total=target, completed=step, loss="")
        progress.update(bar["id"], completed=step, loss=f"loss {loss:.4f}" if loss is not None else "")

    try:
        result = _run(
            lambda: train_fn(
                model_dir or default_model_dir(), model=model, data=data, steps=steps,
                more_steps=more_steps, batch_size=batch_size, seed=seed, policy=policy,
                on_progress=on_progress,
            )
        )
    finally:
        progress.stop()
    _emit(result, as_json, lambda: (
        f"trained {result.model_dir} from step {result.start_step} to {result.final_step}"
        f" ({result.checkpoints_saved} checkpoints saved)\n"
        f"last checkpoint: {result.last_checkpoint}\nmetrics: {_metrics(result.final_metrics)}"
    ))


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


@checkpoints_app.command("list")
def list_cmd(
    model_dir: str = typer.Argument(..., help="Model directory"),
    verify_checksums: bool = typer.Option(False, "--verify-checksums", help="Read every tensor back"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Every checkpoint with its step, time, size, validity and metrics."""
    from prefect_tensorflow.tasks.selection import list_checkpoints

    rows = _run(lambda: list_checkpoints(model_dir, verify_checksums=verify_checksums))

    def text() -> str:
        lines = [f"{'step':>10}  {'time (UTC)':19}  {'size':>10}  {'valid':5}  detail"]
        for r in rows:
            detail = _metrics(r.metrics) if r.valid else r.reason
            lines.append(
                f"{r.step if r.step is not None else '-':>10}  {_when(r.mtime):19}  "
                f"{_size(r.size_bytes):>10}  {'yes' if r.valid else 'NO':5}  {detail}"
            )
        if not rows:
            lines.append("(no checkpoints)")
        return "\n".join(lines)

    _emit(rows, as_json, text)


def _ref_text(ref) -> str:
    return (
        f"{ref.path}\n  step {ref.step}, {ref.format} checkpoint, {_size(ref.size_bytes)}, "
        f"{ref.num_tensors} tensors, written {_when(ref.mtime)} UTC\n  metrics: {_metrics(ref.metrics)}"
    )


@checkpoints_app.command("latest")
def latest_cmd(
    model_dir: str = typer.Argument(..., help="Model directory"),
    verify_checksums: bool = typer.Option(False, "--verify-checksums", help="Read every tensor back"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The newest valid checkpoint (what tf.train.latest_checkpoint should answer)."""
    from prefect_tensorflow.tasks.selection import find_latest_checkpoint

    ref = _run(lambda: find_latest_checkpoint(model_dir, verify_checksums=verify_checksums))
    _emit(ref, as_json, lambda: _ref_text(ref))


@checkpoints_app.command("best")
def best_cmd(
    model_dir: str = typer.Argument(..., help="Model directory"),
    metric: str = typer.Option(..., help="Metric recorded at each checkpoint, e.g. accuracy or loss"),
    mode: str = typer.Option("min", help="min or max"),
    verify_checksums: bool = typer.Option(False, "--verify-checksums"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The valid checkpoint with the best recorded metric."""
    from prefect_tensorflow.tasks.selection import find_best_checkpoint

    ref = _run(lambda: find_best_checkpoint(model_dir, metric, mode, verify_checksums=verify_checksums))  # type: ignore[arg-type]
    _emit(ref, as_json, lambda: _ref_text(ref))


@checkpoints_app.command("inspect")
def inspect_cmd(
    checkpoint: str = typer.Argument(..., help="Checkpoint prefix, e.g. DIR/model.ckpt-1000"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Validity, size and the variables (name, shape, dtype) of one checkpoint."""
    from prefect_tensorflow.tasks.inspection import list_variables
    from prefect_tensorflow.tasks.selection import validate_checkpoint

    prefix = checkpoint[: -len(".index")] if checkpoint.endswith(".index") else checkpoint
    files = _run(lambda: validate_checkpoint(prefix))
    variables = _run(lambda: list_variables(prefix))
    result = {
        "path": files.prefix, "step": files.step, "format": files.format,
        "size_bytes": files.size_bytes, "num_shards": files.num_shards,
        "has_meta_graph": files.has_meta_graph, "mtime": files.mtime, "valid": True,
        "variables": [v.model_dump() for v in variables],
    }

    def text() -> str:
        lines = [
            f"{files.prefix}: valid {files.format} checkpoint, step {files.step}, "
            f"{_size(files.size_bytes)} in {files.num_shards} shard(s)",
        ]
        width = max((len(v.name) for v in variables), default=4)
        for v in variables:
            lines.append(f"  {v.name:<{width}}  {str(v.shape):>14}  {v.dtype}")
        return "\n".join(lines)

    _emit(result, as_json, text)


def _nodes(text: Optional[str]) -> Optional[list[str]]:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def _parity_text(parity) -> str:
    return f"max abs diff {parity.max_abs_diff:.3g} over {parity.batch_size} examples (tolerance {parity.tolerance:g})"


@app.command()
def freeze(
    checkpoint: str = typer.Argument(..., help="TF2 or TF1 checkpoint prefix, or a SavedModel directory"),
    output: str = typer.Option(..., "--output", help="The .pb file to write"),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP + " (TF2 checkpoints; default: the bundled iris)"),
    data: Optional[str] = typer.Option(None, help=DATA_HELP + " for the verification batch"),
    output_nodes: Optional[str] = typer.Option(None, help="TF1: comma-separated output nodes"),
    input_nodes: Optional[str] = typer.Option(None, help="TF1: comma-separated input tensors"),
    as_text: bool = typer.Option(False, "--as-text", help="Also write a .pbtxt"),
    tolerance: float = typer.Option(1e-5, help="Largest absolute difference accepted"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Freeze a checkpoint into a constant graph (.pb), verified against the checkpoint."""
    from prefect_tensorflow.tasks.freezing import freeze as freeze_fn

    result = _run(lambda: freeze_fn(
        checkpoint, output, model=model, data=data, output_nodes=_nodes(output_nodes),
        input_nodes=_nodes(input_nodes), as_text=as_text, tolerance=tolerance,
    ))
    _emit(result, as_json, lambda: (
        f"froze {result.source} ({result.source_format}) to {result.path}\n"
        f"  inputs:  {', '.join(result.inputs)}\n"
        f"  outputs: {', '.join(f'{k}={v}' for k, v in result.outputs.items())}\n"
        f"  {result.digest}, {_size(result.size_bytes)}\n  verified: {_parity_text(result.parity)}"
    ))


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help="TF2 or TF1 checkpoint prefix"),
    export_base: str = typer.Option(..., "--export-base", help="Directory of <version>/ SavedModels"),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP + " (TF2 checkpoints; default: the bundled iris)"),
    data: Optional[str] = typer.Option(None, help=DATA_HELP + " for the verification batch"),
    input_nodes: Optional[str] = typer.Option(None, help="TF1: comma-separated input tensors"),
    output_nodes: Optional[str] = typer.Option(None, help="TF1: comma-separated output nodes"),
    tolerance: float = typer.Option(1e-5, help="Largest absolute difference accepted"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Export a checkpoint as the next SavedModel version of EXPORT_BASE, verified."""
    from prefect_tensorflow.tasks.exporting import export as export_fn

    result = _run(lambda: export_fn(
        checkpoint, export_base, model=model, data=data, input_nodes=_nodes(input_nodes),
        output_nodes=_nodes(output_nodes), tolerance=tolerance,
    ))
    _emit(result, as_json, lambda: (
        f"{'already exported as' if result.reused else 'exported'} version {result.version}: {result.path}\n"
        f"  signature serving_default: inputs {', '.join(result.signature.inputs)}; "
        f"outputs {', '.join(result.signature.outputs)}\n"
        f"  {result.digest}\n  verified: {_parity_text(result.parity)}"
    ))


@app.command()
def verify(
    checkpoint: str = typer.Argument(..., help="TF2 checkpoint prefix"),
    frozen_graph: Optional[str] = typer.Option(None, "--frozen-graph", help="A frozen .pb"),
    saved_model: Optional[str] = typer.Option(None, "--saved-model", help="A SavedModel directory"),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    tolerance: float = typer.Option(1e-5),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Report the largest difference between each pair of checkpoint, frozen graph and SavedModel."""
    from prefect_tensorflow.tasks.verification import parity_report

    report = _run(lambda: parity_report(
        checkpoint, frozen_graph=frozen_graph, saved_model=saved_model, model=model, data=data,
        tolerance=tolerance,
    ))
    _emit(report, as_json, lambda: "\n".join(
        [f"{pair}: {_parity_text(p)} {'ok' if p.ok else 'MISMATCH'}" for pair, p in report.pairs.items()]
    ))
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def retrain(
    model_dir: str = typer.Option(None, "--model-dir", help="Checkpoint directory [default: ./.prefect-tensorflow/models/iris]"),
    model: str = typer.Option("prefect_tensorflow.tasks.iris:build_model", help=MODEL_HELP),
    data: str = typer.Option("prefect_tensorflow.tasks.iris:load_dataset", help=DATA_HELP),
    steps: int = typer.Option(1000, help="Target global step"),
    more_steps: Optional[int] = typer.Option(None, help="Train this many steps past the newest checkpoint instead"),
    batch_size: int = typer.Option(32),
    seed: int = typer.Option(0),
    save_checkpoints_steps: Optional[int] = typer.Option(None),
    save_checkpoints_secs: Optional[float] = typer.Option(None),
    keep_checkpoint_max: int = typer.Option(5),
    select: str = typer.Option("latest", help="'latest' or 'best:<metric>[:min|max]'"),
    export_base: str = typer.Option(None, "--export-base", help="SavedModel versions [default: ./.prefect-tensorflow/exports/iris]"),
    frozen_dir: str = typer.Option(None, "--frozen-dir", help="Frozen graphs [default: ./.prefect-tensorflow/frozen/iris]"),
    registered_model_name: str = typer.Option("iris", "--registered-model-name", help="MLflow registered model"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else ./.prefect-tensorflow/mlflow/mlflow.db]"),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment [default: $MLFLOW_EXPERIMENT_NAME, else prefect-tensorflow]"),
    gate_metric: str = typer.Option("accuracy", help="Checkpoint metric a new version must beat the champion on"),
    gate_mode: str = typer.Option("max", help="'max' if higher is better, 'min' if lower is"),
    track: bool = typer.Option(True, "--mlflow/--no-mlflow", help="Track in MLflow and register the export"),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="Start at step 0; the old checkpoints move to <model-dir>.previous-<time>"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run the `retrain` flow: train, select, freeze, export, then log and register in MLflow."""
    from prefect_tensorflow.tasks.mlflow_connection import MlflowConnection

    from prefect_tensorflow.tasks.policy import CheckpointPolicy

    from .retrain import Selection, retrain as retrain_flow

    _run(lambda: Selection.parse(select))
    if gate_mode not in ("min", "max"):
        _fail(ValueError(f"--gate-mode: expected 'min' or 'max', received {gate_mode!r}"))
    connection = _run(lambda: MlflowConnection(tracking_uri=tracking_uri, experiment_name=experiment))
    if not registered_model_name.strip() or "/" in registered_model_name:
        _fail(ValueError(
            f"--registered-model-name: expected a non-empty name without '/', received {registered_model_name!r}"
        ))
    policy = _run(
        lambda: CheckpointPolicy(
            save_checkpoints_steps=save_checkpoints_steps,
            save_checkpoints_secs=save_checkpoints_secs,
            keep_checkpoint_max=keep_checkpoint_max or None,
        )
    )
    summary = _run(
        lambda: retrain_flow(
            model_dir=model_dir or default_model_dir(), model=model, data=data, steps=steps,
            more_steps=more_steps, batch_size=batch_size, seed=seed, policy=policy, select=select,
            export_base=export_base, frozen_dir=frozen_dir, registered_model_name=registered_model_name,
            mlflow=connection, gate_metric=gate_metric or None, gate_mode=gate_mode, track=track,
            from_scratch=from_scratch,
        )
    )
    ref = summary.checkpoint
    _emit(summary, as_json, lambda: (
        f"\nmodel dir:            {summary.training.model_dir}\n"
        f"trained:              step {summary.training.start_step} -> {summary.training.final_step}\n"
        f"checkpoint to ship:   {ref.path}\n"
        f"  step {ref.step}, {ref.format}, metrics: {_metrics(ref.metrics)}\n"
        f"frozen graph:         {summary.frozen_graph.path}\n"
        f"  verified: {_parity_text(summary.frozen_graph.parity)}\n"
        f"SavedModel:           {summary.export.path} (version {summary.export.version}"
        f"{', already exported' if summary.export.reused else ''})\n"
        f"  verified: {_parity_text(summary.export.parity)}\n"
        f"inspect it:           saved_model_cli show --dir {summary.export.path} --all\n"
        f"list all checkpoints: prefect-tensorflow checkpoints list {summary.training.model_dir}\n"
        f"TensorBoard:          tensorboard --logdir {summary.training.model_dir}"
        + (_registered_text(summary.registered, connection) if summary.registered else "")
        + _prefect_ui_text(summary.flow_run_id)
    ))


def _registered_text(registered, connection) -> str:
    gate = registered.gate
    lines = [
        "",
        f"MLflow store:         {connection.server_label()}",
        f"MLflow run:           {registered.run_id}",
        f"model version:        {registered.name} version {registered.version}"
        f"{' (already registered)' if registered.reused else ''}, aliases: {', '.join(registered.aliases)}",
        f"  load it:            mlflow.pyfunc.load_model('models:/{registered.name}@champion')",
    ]
    if gate is not None:
        lines.append(f"  champion gate:      {'promoted' if gate.promoted else 'champion kept'}: {gate.reason}")
    lines += [
        f"MLflow UI:            {connection.ui_command()}",
        f"  then open           {registered.version_url}",
    ]
    return "\n".join(lines)


def _prefect_ui_text(flow_run_id: Optional[str]) -> str:
    """How to see the flow run in the Prefect UI: the configured server, or a local one on the same database."""
    if not flow_run_id:
        return ""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    if PREFECT_API_URL.value():
        ui = (PREFECT_UI_URL.value() or PREFECT_API_URL.value().removesuffix("/api")).rstrip("/")
        return f"\nPrefect UI:           {ui}/runs/flow-run/{flow_run_id}"
    from prefect_tensorflow.tasks.mlflow_connection import console_command

    prefect = console_command("prefect")
    return (
        f"\nPrefect UI:           {prefect} server start --host 127.0.0.1 --port 4200   (same database as this run)\n"
        f"  then open           http://127.0.0.1:4200/runs/flow-run/{flow_run_id}"
    )


@app.command("export-checkpoint")
def export_checkpoint_command(
    model_dir: str = typer.Option(..., "--model-dir", help="Directory holding the checkpoints"),
    checkpoint: str = typer.Option("latest", help="'latest', a step number or 'best:<metric>[:min|max]'"),
    registered_model_name: str = typer.Option("iris", "--registered-model-name", help="MLflow registered model"),
    export_base: str = typer.Option(None, "--export-base", help="SavedModel versions [default: ./.prefect-tensorflow/exports/iris]"),
    frozen_dir: str = typer.Option(None, "--frozen-dir", help="Frozen graphs [default: ./.prefect-tensorflow/frozen/iris]"),
    model: str = typer.Option("prefect_tensorflow.tasks.iris:build_model", help=MODEL_HELP),
    data: str = typer.Option("prefect_tensorflow.tasks.iris:load_dataset", help="Dataset loader for verification ('' for random values)"),
    alias: List[str] = typer.Option([], "--alias", help="Extra alias to point at the version (repeatable)"),
    gate_metric: str = typer.Option("accuracy", help="Checkpoint metric a new version must beat the champion on ('' for none)"),
    gate_mode: str = typer.Option("max", help="'max' if higher is better, 'min' if lower is"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else local SQLite]"),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run the `export-checkpoint` flow: select a checkpoint, export, freeze, register in MLflow."""
    from prefect_tensorflow.tasks.mlflow_connection import MlflowConnection

    from .export_checkpoint import export_checkpoint
    from .parameters import Selection, check_aliases, check_registered_model_name

    _run(lambda: Selection.parse(checkpoint, parameter="checkpoint"))
    _run(lambda: check_registered_model_name(registered_model_name))
    _run(lambda: check_aliases(alias, parameter="--alias"))
    if gate_mode not in ("min", "max"):
        _fail(ValueError(f"--gate-mode: expected 'min' or 'max', received {gate_mode!r}"))
    connection = _run(lambda: MlflowConnection(tracking_uri=tracking_uri, experiment_name=experiment))
    summary = _run(
        lambda: export_checkpoint(
            model_dir=model_dir, checkpoint=checkpoint, registered_model_name=registered_model_name,
            export_base=export_base, frozen_dir=frozen_dir, model=model, data=data or None, aliases=alias,
            gate_metric=gate_metric or None, gate_mode=gate_mode, mlflow=connection,
        )
    )
    ref = summary.checkpoint
    _emit(summary, as_json, lambda: (
        f"\ncheckpoint:           {ref.path}\n"
        f"  step {ref.step}, {ref.format}, metrics: {_metrics(ref.metrics)}\n"
        f"SavedModel:           {summary.export.path} (version {summary.export.version}"
        f"{', already exported' if summary.export.reused else ''})\n"
        f"  verified: {_parity_text(summary.export.parity)}\n"
        + (f"frozen graph:         {summary.frozen_graph.path}\n  verified: {_parity_text(summary.frozen_graph.parity)}"
           if summary.frozen_graph else "frozen graph:         (already registered: not frozen again)")
        + _registered_text(summary.registered, connection)
        + _prefect_ui_text(summary.flow_run_id)
    ))


@app.command()
def serve(
    limit: Optional[int] = typer.Option(None, help="Most flow runs at once [default: no limit]"),
) -> None:
    """Serve the `retrain-iris` and `export-checkpoint` deployments (starts a local Prefect server
    on 127.0.0.1:4200 unless PREFECT_API_URL is set). Open the UI and press Run."""
    from .serve import serve_deployments

    _run(lambda: serve_deployments(limit=limit))


def main(argv: Optional[List[str]] = None) -> None:
    """Console-script entry point."""
    apply_environment_defaults()
    app(args=argv if argv is not None else sys.argv[1:], prog_name="prefect-tensorflow")


if __name__ == "__main__":
    main()
