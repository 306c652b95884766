"""The `prefect-tensorflow` command line.

    prefect-tensorflow train --model-dir DIR --steps 2000 --save-checkpoints-steps 200
    prefect-tensorflow checkpoints list|latest|best|inspect ...
    prefect-tensorflow evaluate | freeze | export | verify ...
    prefect-tensorflow retrain | export-checkpoint | sweep | rollback | serve | worker

`train`, `checkpoints`, `evaluate`, `freeze`, `export` and `verify` call the
plain functions of `prefect_tensorflow.tasks` (no Prefect is loaded,
TensorFlow only when a command needs it); `retrain`, `export-checkpoint` and
`sweep` run the Prefect flows, `serve` serves the deployments and `worker` runs
a process pool's runs, so those import Prefect when they run, after `main()` has
set its environment defaults. Errors print one line naming what is at fault and
exit with status 2.

Example:
    >>> from prefect_tensorflow.flows.cli import main
    >>> main(["checkpoints", "latest", "/nonexistent", "--json"])
    Traceback (most recent call last):
    ...
    SystemExit: 2
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Annotated, Any, Optional

import typer

from prefect_tensorflow.tasks.checkpoints import inspection, selection
from prefect_tensorflow.tasks.configs import ExportConfig, TrainingConfig
from prefect_tensorflow.tasks.errors import ParityError
from prefect_tensorflow.tasks.export import frozen_graph, saved_model, verification
from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig, console_command
from prefect_tensorflow.tasks.settings import get_settings
from prefect_tensorflow.tasks.training.loop import train_with_checkpoints

from .cli_errors import REPORTED, fail, reported
from .cli_options import with_training_options
from .defaults import apply_environment_defaults
from .flow_commands import FlowEntry, Spelling, flow_commands_group

# How the flow commands spell a flow parameter where `--<name>` does not fit (every other
# parameter of a flow is an option of its command by its own name, type, default and description).
SPELLING = Spelling(
    flags=MappingProxyType({"track": "--mlflow/--no-mlflow", "aliases": "--alias", "decision": "--approve/--reject"}),
    # `--window-start/--window-end/--window-days/--window-version`: the flows' `window` parameter (it
    # shadows the training's `window` field, whose options the command then leaves out)
    config_prefixes=MappingProxyType({"training": "", "window": "window_"}),
    config_flags=MappingProxyType(
        {"mlflow": MappingProxyType({"tracking_uri": "--tracking-uri", "experiment_name": "--experiment"})}
    ),
    required=frozenset({"candidates"}),
)

app = typer.Typer(
    cls=flow_commands_group(lambda: FLOW_COMMANDS, SPELLING, lambda summary, as_json, text: _emit(summary, as_json, text)),
    help="Train TensorFlow models with checkpoints and ship them with Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
checkpoints_app = typer.Typer(help="List, select and inspect checkpoints.", no_args_is_help=True)
app.add_typer(checkpoints_app, name="checkpoints")

MODEL_HELP = "Registered model builder name (e.g. iris) or 'module:attr' of a builder returning a compiled keras.Model"
DATA_HELP = "Registered dataset loader name (e.g. iris) or 'module:attr' of a loader (split) -> tf.data.Dataset"

# Options several commands share, declared once.
ModelDirOption = Annotated[
    Optional[str], typer.Option("--model-dir", help="Checkpoint directory (default: <data home>/models/iris)")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON")]


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


def _size(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())) or "-"


def _nodes(text: Optional[str]) -> Optional[list[str]]:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def _parity_text(parity) -> str:
    return f"max abs diff {parity.max_abs_diff:.3g} over {parity.batch_size} examples (tolerance {parity.tolerance:g})"


def _export_config(**values: Any) -> ExportConfig:
    return reported(lambda: ExportConfig(**{k: v for k, v in values.items() if v is not None}))


# --- training and checkpoints --------------------------------------------------------------


@app.command()
@with_training_options
def train(
    training: TrainingConfig,
    model_dir: ModelDirOption = None,
    as_json: JsonOption = False,
    lease_wait: Annotated[
        Optional[float],
        typer.Option(
            "--lease-wait",
            min=0,
            help="Seconds to wait while another training holds the model dir, then refuse "
            "(default: PREFECT_TENSORFLOW_LEASE_WAIT, 0)",
        ),
    ] = None,
) -> None:
    """Train with checkpoints, resuming from the newest valid one; shows a progress bar."""
    progress = _ProgressBar()
    try:
        with imports_out_of_the_collectors_way():
            result = reported(
                lambda: train_with_checkpoints(
                    model_dir or get_settings().default_path("models"),
                    training,
                    on_progress=progress.update,
                    lease_wait=lease_wait,
                )
            )
    finally:
        progress.stop()
    _emit(
        result,
        as_json,
        lambda: (
            f"trained {result.model_dir} from step {result.start_step} to {result.final_step}"
            f" ({result.checkpoints_saved} checkpoints saved)\n"
            f"last checkpoint: {result.last_checkpoint}\nmetrics: {_metrics(result.final_metrics)}"
        ),
    )


@contextmanager
def imports_out_of_the_collectors_way() -> Iterator[None]:
    """Import TensorFlow, then keep every object allocated so far out of the garbage collector's passes
    (`gc.freeze`) for the block; `gc.unfreeze` after it.

    After its imports (TensorFlow's, Prefect's, Typer's, rich's) the CLI process holds ~0.4 M objects that live
    as long as it does, and every full collection the training loop's allocations trigger walks them all
    (iris, 3,000 steps, fresh processes on a loaded 2-core machine: with the CLI's imports the loop ran at
    0.78-0.87 of the speed of a process that had imported only TensorFlow; frozen, faster than both). The
    library never does this: `gc.freeze` is the process's, not a library's.

    Example:
        >>> import gc
        >>> with imports_out_of_the_collectors_way():
        ...     gc.get_freeze_count() > 0
        True
        >>> gc.get_freeze_count()
        0
    """
    import tensorflow  # noqa: F401  (its objects are the most numerous; imported now to be frozen too)

    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _ProgressBar:
    """A rich progress bar on stderr, started on the first update so that errors before it print cleanly.

    It renders at most every `RENDER_INTERVAL` seconds (and when it stops): a render costs a few
    milliseconds of the training thread, and training calls back at every summary step.
    """

    RENDER_INTERVAL = 0.5

    def __init__(self) -> None:
        # Imported here, before training starts, rather than inside the first (timed) update.
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TextColumn("{task.fields[loss]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            # Rendered on our throttled updates only: rich's 10 Hz refresh thread would
            # render on its own and contend with training for the GIL.
            auto_refresh=False,
        )
        self._task: Any = None
        self._loss = ""
        self._next_render = 0.0

    def update(self, step: int, target: int, loss: Optional[float]) -> None:
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task("train", total=target, completed=step, loss="")
        if loss is not None:
            self._loss = f"loss {loss:.4f}"
        self._progress.update(self._task, completed=step, loss=self._loss)
        now = time.monotonic()
        if now >= self._next_render or step == target:
            self._next_render = now + self.RENDER_INTERVAL
            self._progress.refresh()

    def stop(self) -> None:
        if self._task is not None:
            self._progress.stop()


@checkpoints_app.command("list")
def list_cmd(
    model_dir: str = typer.Argument(..., help="Model directory"),
    verify_checksums: bool = typer.Option(False, "--verify-checksums", help="Read every tensor back"),
    as_json: JsonOption = False,
) -> None:
    """Every checkpoint with its step, time, size, validity and metrics."""
    rows = reported(lambda: selection.list_checkpoints(model_dir, verify_checksums=verify_checksums))

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
    as_json: JsonOption = False,
) -> None:
    """The newest valid checkpoint (what tf.train.latest_checkpoint should answer)."""
    ref = reported(lambda: selection.select_latest_checkpoint(model_dir, verify_checksums=verify_checksums))
    _emit(ref, as_json, lambda: _ref_text(ref))


@checkpoints_app.command("best")
def best_cmd(
    model_dir: str = typer.Argument(..., help="Model directory"),
    metric: str = typer.Option(..., help="Metric recorded at each checkpoint, e.g. accuracy or loss"),
    mode: str = typer.Option("min", help="min or max"),
    verify_checksums: bool = typer.Option(False, "--verify-checksums"),
    as_json: JsonOption = False,
) -> None:
    """The valid checkpoint with the best recorded metric."""
    ref = reported(lambda: selection.select_best_checkpoint(model_dir, metric, mode, verify_checksums=verify_checksums))  # type: ignore[arg-type]
    _emit(ref, as_json, lambda: _ref_text(ref))


@checkpoints_app.command("inspect")
def inspect_cmd(
    checkpoint: str = typer.Argument(..., help="Checkpoint prefix, e.g. DIR/model.ckpt-1000"),
    as_json: JsonOption = False,
) -> None:
    """Validity, size and the variables (name, shape, dtype) of one checkpoint."""
    prefix = checkpoint.removesuffix(".index")
    files = reported(lambda: selection.validate_checkpoint(prefix))
    variables = reported(lambda: inspection.list_variables(prefix))
    result = {
        "path": files.prefix,
        "step": files.step,
        "format": files.format,
        "size_bytes": files.size_bytes,
        "num_shards": files.num_shards,
        "has_meta_graph": files.has_meta_graph,
        "mtime": files.mtime,
        "valid": True,
        "variables": [v.model_dump() for v in variables],
    }

    def text() -> str:
        lines = [
            f"{files.prefix}: valid {files.format} checkpoint, step {files.step}, "
            f"{_size(files.size_bytes)} in {files.num_shards} shard(s)",
        ]
        width = max((len(v.name) for v in variables), default=4)
        for v in variables:
            lines.append(f"  {v.name:<{width}}  {v.shape!s:>14}  {v.dtype}")
        return "\n".join(lines)

    _emit(result, as_json, text)


@app.command()
def evaluate(
    model_dir: str = typer.Argument(..., help="Model directory"),
    model: str = typer.Option("iris", help=MODEL_HELP),
    data: str = typer.Option("iris", help=DATA_HELP + " whose eval split is evaluated"),
    hparams: str = typer.Option("{}", help="JSON object of the model builder's keyword arguments"),
    as_json: JsonOption = False,
) -> None:
    """Evaluate the checkpoints of MODEL_DIR that have no metrics yet (what the sidecar evaluator does)."""
    from prefect_tensorflow.tasks import model_code
    from prefect_tensorflow.tasks.training.sidecar_evaluator import EvaluationSpec, evaluate_missing

    def run() -> int:
        spec = EvaluationSpec(
            model=model_code.import_string(model, "model"),
            data=model_code.import_string(data, "data"),
            hparams=json.loads(hparams),
        )
        selection.list_checkpoints(model_dir)  # a model dir that does not exist fails here, naming it
        return evaluate_missing(model_dir, spec)

    count = reported(run)
    _emit({"evaluated": count}, as_json, lambda: f"evaluated {count} checkpoint(s) of {model_dir}")


# --- freezing, exporting, verifying -----------------------------------------------------------


@app.command()
def freeze(
    checkpoint: str = typer.Argument(..., help="TF2 or TF1 checkpoint prefix, or a SavedModel directory"),
    output: str = typer.Option(..., "--output", help="The .pb file to write"),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP + " (TF2 checkpoints; default: iris)"),
    data: Optional[str] = typer.Option(None, help=DATA_HELP + " for the verification batch"),
    output_nodes: Optional[str] = typer.Option(None, help="TF1: comma-separated output nodes"),
    input_nodes: Optional[str] = typer.Option(None, help="TF1: comma-separated input tensors"),
    as_text: bool = typer.Option(False, "--as-text", help="Also write a .pbtxt"),
    tolerance: Optional[float] = typer.Option(None, help="Largest absolute difference accepted (default: 1e-05)"),
    as_json: JsonOption = False,
) -> None:
    """Freeze a checkpoint into a constant graph (.pb), verified against the checkpoint."""
    config = _export_config(
        model=model, data=data, output_nodes=_nodes(output_nodes), input_nodes=_nodes(input_nodes), tolerance=tolerance
    )
    result = reported(lambda: frozen_graph.freeze_graph(checkpoint, output, config, as_text=as_text))
    _emit(
        result,
        as_json,
        lambda: (
            f"froze {result.source} ({result.source_format}) to {result.path}\n"
            f"  inputs:  {', '.join(result.inputs)}\n"
            f"  outputs: {', '.join(f'{k}={v}' for k, v in result.outputs.items())}\n"
            f"  {result.digest}, {_size(result.size_bytes)}\n  verified: {_parity_text(result.parity)}"
        ),
    )


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help="TF2 or TF1 checkpoint prefix"),
    export_base: str = typer.Option(..., "--export-base", help="Directory of <version>/ SavedModels"),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP + " (TF2 checkpoints; default: iris)"),
    data: Optional[str] = typer.Option(None, help=DATA_HELP + " for the verification batch"),
    input_nodes: Optional[str] = typer.Option(None, help="TF1: comma-separated input tensors"),
    output_nodes: Optional[str] = typer.Option(None, help="TF1: comma-separated output nodes"),
    tolerance: Optional[float] = typer.Option(None, help="Largest absolute difference accepted (default: 1e-05)"),
    as_json: JsonOption = False,
) -> None:
    """Export a checkpoint as the next SavedModel version of EXPORT_BASE, verified."""
    config = _export_config(
        model=model, data=data, input_nodes=_nodes(input_nodes), output_nodes=_nodes(output_nodes), tolerance=tolerance
    )
    result = reported(lambda: saved_model.export_saved_model(checkpoint, export_base, config))
    _emit(
        result,
        as_json,
        lambda: (
            f"{'already exported as' if result.reused else 'exported'} version {result.version}: {result.path}\n"
            f"  signature serving_default: inputs {', '.join(result.signature.inputs)}; "
            f"outputs {', '.join(result.signature.outputs)}\n"
            f"  {result.digest}\n  verified: {_parity_text(result.parity)}"
        ),
    )


@app.command()
def verify(
    checkpoint: str = typer.Argument(..., help="TF2 checkpoint prefix"),
    frozen_graph: Optional[str] = typer.Option(None, "--frozen-graph", help="A frozen .pb"),
    saved_model: Optional[str] = typer.Option(None, "--saved-model", help="A SavedModel directory"),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    tolerance: Optional[float] = typer.Option(None, help="Largest absolute difference accepted (default: 1e-05)"),
    as_json: JsonOption = False,
) -> None:
    """Report the largest difference between each pair of checkpoint, frozen graph and SavedModel."""
    config = _export_config(model=model, data=data, tolerance=tolerance)
    try:
        report, ok = verification.verify_artifacts(checkpoint, frozen_graph, saved_model, config), True
    except ParityError as err:
        if not hasattr(err, "report"):
            fail(err)
        report, ok = err.report, False
    except REPORTED as err:
        fail(err)
    _emit(
        report,
        as_json,
        lambda: "\n".join(f"{pair}: {_parity_text(p)} {'ok' if p.ok else 'MISMATCH'}" for pair, p in report.pairs.items()),
    )
    if not ok:
        raise typer.Exit(1)


# --- the flows: commands made from their parameters (flow_commands) --------------------------------


def _retrain_text(summary: Any, arguments: Mapping[str, Any]) -> str:
    if summary.skipped is not None:  # the window's data was trained already: nothing trained or registered
        return f"\nskipped: {summary.skipped}\nnothing was trained, exported or registered" + _prefect_ui_text(
            summary.flow_run_id
        )
    ref = summary.checkpoint
    return (
        f"\nmodel dir:            {summary.training.model_dir}\n"
        f"trained:              step {summary.training.start_step} -> {summary.training.final_step}\n"
        f"checkpoint to ship:   {ref.path}\n"
        f"  step {ref.step}, {ref.format}, metrics: {_metrics(ref.metrics)}\n"
        f"frozen graph:         {summary.frozen_graph.path}\n"
        f"  verified: {_parity_text(summary.frozen_graph.parity)}\n"
        + _saved_model_text(summary.export)
        + f"  verified: {_parity_text(summary.export.parity)}\n"
        f"inspect it:           saved_model_cli show --dir {summary.export.path} --all\n"
        f"list all checkpoints: prefect-tensorflow checkpoints list {summary.training.model_dir}\n"
        f"TensorBoard:          tensorboard --logdir {summary.training.model_dir}"
        + (_data_text(summary.data) if summary.data is not None else "")
        + (_registered_text(summary.registered, arguments.get("mlflow") or MlflowConfig()) if summary.registered else "")
        + _prefect_ui_text(summary.flow_run_id)
    )


def _data_text(data: Any) -> str:
    rows = "" if data.rows is None else f", {data.rows} rows"
    return f"\ndata:                 window {data.window.label}, {data.files} files{rows}, digest {data.digest[:12]}..."


def _export_checkpoint_text(summary: Any, arguments: Mapping[str, Any]) -> str:
    ref = summary.checkpoint
    return (
        f"\ncheckpoint:           {ref.path}\n"
        f"  step {ref.step}, {ref.format}, metrics: {_metrics(ref.metrics)}\n"
        + _saved_model_text(summary.export)
        + f"  verified: {_parity_text(summary.export.parity)}\n"
        + (
            f"frozen graph:         {summary.frozen_graph.path}\n  verified: {_parity_text(summary.frozen_graph.parity)}"
            if summary.frozen_graph
            else "frozen graph:         (already registered: not frozen again)"
        )
        + _registered_text(summary.registered, arguments.get("mlflow") or MlflowConfig())
        + _prefect_ui_text(summary.flow_run_id)
    )


def _sweep_text(summary: Any, arguments: Mapping[str, Any]) -> str:
    metric = summary.selection.split(":")[1]
    columns = ["candidate", "id", "winner", "hparams", "seed", "steps", "checkpoint step", metric, "trained"]
    lines = ["  ".join(str(c) for c in columns)]
    for row in summary.comparison:
        lines.append("  ".join(str(row.get(c, "")) for c in columns))
    ref = summary.checkpoint
    return (
        "\n".join(lines) + f"\n\nwinner:               {summary.winner}\ncheckpoint to ship:   {ref.path}\n"
        f"  step {ref.step}, metrics: {_metrics(ref.metrics)}\n"
        f"frozen graph:         {summary.frozen_graph.path}\n"
        + _saved_model_text(summary.export)
        + (_registered_text(summary.registered, arguments.get("mlflow") or MlflowConfig()) if summary.registered else "")
        + _prefect_ui_text(summary.flow_run_id)
    )


def _sync_text(summary: Any, arguments: Mapping[str, Any]) -> str:
    def listed(versions: list[int]) -> str:
        return ", ".join(map(str, versions)) or "none"

    kept_by = ", ".join(f"@{alias} -> {version}" for alias, version in sorted(summary.aliases.items()))
    return (
        f"mirrored:             {summary.source} -> {summary.target}\n"
        + (f"aliases:              {kept_by}\n" if kept_by else "")
        + f"added:                {listed(summary.added)}\n"
        f"removed:              {listed(summary.removed)}\n"
        f"kept:                 {listed(summary.kept)}\n"
        f"served now:           {listed(summary.served)}"
    )


def _saved_model_text(export: Any) -> str:
    return f"SavedModel:           {export.path} (version {export.version}{', already exported' if export.reused else ''})\n"


def _registered_text(registered, connection: MlflowConfig) -> str:
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
    return (
        f"\nPrefect UI:           {console_command('prefect')} server start --host 127.0.0.1 --port 4200   (same database as this run)\n"
        f"  then open           http://127.0.0.1:4200/runs/flow-run/{flow_run_id}"
    )


def _rollback_text(summary: Any, arguments: Mapping[str, Any]) -> str:
    name = summary.registered_model_name
    if summary.moved:
        outcome = f"@champion:            version {summary.from_version} -> version {summary.to_version} (rollback)"
    else:
        outcome = f"@champion:            version {summary.to_version}: {summary.reason}"
    lines = [f"\nregistered model:     {name}", outcome]
    if summary.move is not None:
        lines.append(f"  reason:             {summary.move.reason} (by {summary.move.by}, {summary.move.when})")
    lines.append("history of @champion (oldest first):")
    lines += [
        f"  {m.when}  {m.from_version if m.from_version is not None else '-'} -> {m.to_version}  {m.kind:8}  {m.by}: {m.reason}"
        for m in summary.history
    ]
    return "\n".join(lines) + _prefect_ui_text(summary.flow_run_id)


@app.command()
def serve(
    limit: Optional[int] = typer.Option(None, help="Most flow runs at once (default: no limit)"),
    host: Optional[str] = typer.Option(None, help="Address of the local Prefect server to start (default: 127.0.0.1)"),
) -> None:
    """Serve the deployments of prefect.yaml (starts a local Prefect server on 127.0.0.1:4200 unless
    PREFECT_API_URL is set). Open the UI and press Run."""
    from .deployments import serve_deployments

    reported(lambda: serve_deployments(limit=limit, host=host))


@app.command("generate-data")
def generate_data(
    prefix: str = typer.Argument(..., help="Where to write: a local directory, s3://bucket/prefix or gs://bucket/prefix"),
    start: str = typer.Option(..., "--start", help="First day (YYYY-MM-DD)"),
    days: int = typer.Option(7, "--days", help="Days to write, one partition each"),
    drift_day: Optional[str] = typer.Option(None, "--drift-day", help="A day whose petal_length drifts (YYYY-MM-DD)"),
    broken_day: Optional[str] = typer.Option(
        None, "--broken-day", help="A day with NaNs, an unknown species, an out-of-range value"
    ),
    file_format: str = typer.Option("csv", "--format", help="csv, parquet or tfrecord"),
    rows_per_day: int = typer.Option(60, "--rows-per-day", help="Rows in each day's file"),
    seed: int = typer.Option(0, "--seed", help="Seed of the rows' noise"),
) -> None:
    """Write the synthetic iris-daily dataset: dt=YYYY-MM-DD/ partitions for the `partitioned` loader."""
    from prefect_tensorflow.tasks.data.synthetic import write_daily_dataset

    written = reported(
        lambda: write_daily_dataset(
            prefix,
            start,
            days,
            rows_per_day=rows_per_day,
            drift_day=drift_day,
            broken_day=broken_day,
            seed=seed,
            format=file_format,
        )
    )
    typer.echo(f"wrote {len(written)} daily partitions ({written[0]} to {written[-1]}) under {prefix}")


@app.command()
def worker(
    pool: str = typer.Option("tensorflow-process", "--pool", help="The process work pool to take runs from (created if missing)"),
    limit: Optional[int] = typer.Option(None, help="Most flow runs at once (default: no limit)"),
    name: Optional[str] = typer.Option(None, help="Worker name (default: Prefect's)"),
) -> None:
    """Run the flow runs of a process work pool, as `prefect worker start --pool POOL` does, but fail a run
    the Prefect API cannot return (a parameter it stored but cannot serialize) instead of stopping."""
    from .unreadable_runs import run_worker

    reported(lambda: run_worker(pool, limit=limit, name=name))


FLOW_COMMANDS: Mapping[str, FlowEntry] = MappingProxyType(
    {
        "retrain": FlowEntry(
            "prefect_tensorflow.flows.retrain:retrain",
            "Run the `retrain` flow: train, select, freeze, export, then log and register in MLflow.",
            _retrain_text,
        ),
        "export-checkpoint": FlowEntry(
            "prefect_tensorflow.flows.export_checkpoint:export_checkpoint",
            "Run the `export-checkpoint` flow: select a checkpoint, export, freeze, register in MLflow.",
            _export_checkpoint_text,
        ),
        "sweep": FlowEntry(
            "prefect_tensorflow.flows.sweep:sweep",
            "Run the `sweep` flow: train candidates in parallel on Dask, ship the best as retrain does.",
            _sweep_text,
        ),
        "rollback": FlowEntry(
            "prefect_tensorflow.flows.rollback:rollback",
            "Run the `rollback` flow: move @champion back to the previous champion or to --to-version.",
            _rollback_text,
        ),
        "sync": FlowEntry(
            "prefect_tensorflow.flows.sync_exports:sync_exports",
            "Run the `sync-exports` flow: mirror an s3:// or gs:// export base to the local directory TF Serving polls.",
            _sync_text,
        ),
    }
)


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point."""
    apply_environment_defaults()
    app(args=argv if argv is not None else sys.argv[1:], prog_name="prefect-tensorflow")


if __name__ == "__main__":
    main()
