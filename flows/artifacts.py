"""Prefect artifacts a run publishes: what people would rather look at than logs.

Example:
    >>> from prefect import flow
    >>> from prefect_tensorflow.flows.artifacts import publish_checkpoint_table
    >>> @flow
    ... def show(model_dir: str) -> None:
    ...     publish_checkpoint_table(model_dir, selected=None)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Optional

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from prefect_tensorflow.tasks.checkpoints.selection import CheckpointRef, list_checkpoints
from prefect_tensorflow.tasks.export.frozen_graph import FreezeResult
from prefect_tensorflow.tasks.export.saved_model import ExportResult
from prefect_tensorflow.tasks.registry.aliases import AliasMove
from prefect_tensorflow.tasks.registry.model_versions import RegisteredVersion
from prefect_tensorflow.tasks.training.loop import TrainResult


def _utc(mtime: Optional[float]) -> str:
    if mtime is None:
        return ""
    return datetime.fromtimestamp(mtime, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def publish_checkpoint_table(model_dir: str, selected: Optional[CheckpointRef]) -> list[dict]:
    """A table of every checkpoint in `model_dir`, newest first: step, selected, valid, metrics, time,
    size, and why a checkpoint was skipped (a column only when one was)."""
    infos = list(list_checkpoints(model_dir))
    skipped = any(info.reason for info in infos)
    rows = []
    for info in infos:
        row = {
            "step": info.step,
            "selected": "yes" if selected is not None and info.path == selected.path else "",
            "valid": "yes" if info.valid else "no",
            **{k: round(v, 6) for k, v in sorted(info.metrics.items())},
            "time": _utc(info.mtime),
            "size (bytes)": info.size_bytes,
        }
        if skipped:
            row["why skipped"] = info.reason or ""
        rows.append(row)
    # The card in the run's Artifacts tab shows one line of the description: the answer first.
    chosen = f"step {selected.step} selected" if selected is not None else "none selected"
    create_table_artifact(
        key="checkpoints",
        table=rows,
        description=f"{chosen} of {len(rows)} checkpoints in {model_dir}",
    )
    return rows


def publish_training_summary(
    result: TrainResult,
    selected: CheckpointRef,
    selection: str,
    frozen: Optional[FreezeResult] = None,
    exported: Optional[ExportResult] = None,
    registered: Optional[RegisteredVersion] = None,
) -> str:
    """A markdown summary: the training run, the checkpoint selected, the frozen graph and export."""
    metrics = "\n".join(f"| {k} | {v:.6g} |" for k, v in sorted(selected.metrics.items()))
    markdown = f"""# Training summary

| | |
|---|---|
| model dir | `{result.model_dir}` |
| steps | {result.start_step} → {result.final_step} (target {result.target_step}) |
| checkpoints saved | {result.checkpoints_saved} |
| preempted | {result.preempted} |
| seconds | {result.elapsed_seconds:.1f} |

## Checkpoint to ship ({selection})

`{selected.path}` — step {selected.step}, {selected.format} checkpoint, {selected.size_bytes} bytes

| metric | value |
|---|---|
{metrics}
"""
    if frozen is not None:
        markdown += frozen_markdown(frozen)
    if exported is not None:
        markdown += export_markdown(exported)
    if registered is not None:
        markdown += registered_markdown(registered)
    create_markdown_artifact(
        key="training-summary",
        markdown=markdown,
        description=f"{headline(registered, selected)}; trained to step {result.final_step}",
    )
    return markdown


def frozen_markdown(frozen: FreezeResult) -> str:
    return f"""
## Frozen graph

`{frozen.path}` ({frozen.size_bytes} bytes, `{frozen.digest}`)

inputs `{", ".join(frozen.inputs)}`; outputs {", ".join(f"`{k}`" for k in frozen.outputs)};
verified: max abs diff {frozen.parity.max_abs_diff:.3g} on {frozen.parity.batch_size} examples
"""


def export_markdown(exported: ExportResult) -> str:
    def tensors(infos) -> str:
        return ", ".join(f"`{k}` {v.dtype}{v.shape}" for k, v in infos.items())

    return f"""
## SavedModel

version **{exported.version}** at `{exported.path}`{" (already exported: reused)" if exported.reused else ""},
digest `{exported.digest}`

signature `serving_default`: inputs {tensors(exported.signature.inputs)};
outputs {tensors(exported.signature.outputs)};
verified against the checkpoint: max abs diff {exported.parity.max_abs_diff:.3g} on {exported.parity.batch_size} examples
"""


def _figure(value: Optional[float]) -> str:
    return "none" if value is None else f"{value:.6g}"


def _gate_outcome(registered: RegisteredVersion) -> str:
    gate = registered.gate
    if gate is None:
        return ""
    if gate.state == "already_champion":
        return "already champion"
    if gate.promoted:
        return "promoted to champion" + (" (first version)" if gate.state == "first_version" else "")
    kept = f"champion kept (version {gate.champion_version})" if gate.champion_version else "champion kept"
    return kept + (" (incomparable)" if "incomparable" in gate.reason else "")


def _interval(decision: Any) -> str:
    if decision.interval is None:
        return "none"
    low, high = decision.interval
    return f"[{low:+.4g}, {high:+.4g}] ({decision.confidence:.0%}{', ' + decision.method if decision.method else ''})"


def gate_decision_markdown(decision: Any, registered: Optional[RegisteredVersion] = None) -> str:
    """The gate decision as markdown: the state, both versions and scores, the interval, each check.

    Example:
        >>> from prefect_tensorflow.tasks.configs import GateConfig
        >>> from prefect_tensorflow.tasks.promotion.champion_gate import stated_decision
        >>> print(gate_decision_markdown(stated_decision("kept", "no eval data", GateConfig(), 2, 1)).splitlines()[1])
        **champion kept**: no eval data
    """
    headline = "promoted to champion" if decision.promoted else "champion kept"
    if decision.state == "already_champion":
        headline = "already champion"
    who = f"{registered.name} " if registered is not None else ""
    champion = f"v{decision.champion_version}" if decision.champion_version is not None else "none"
    lines = [
        f"# Champion gate: {who}v{decision.challenger_version}",
        f"**{headline}**: {decision.reason}",
        "",
        "| | challenger | champion |",
        "|---|---|---|",
        f"| version | v{decision.challenger_version} | {champion} |",
        f"| {decision.metric} ({decision.mode}) | {_figure(decision.challenger_value)} | {_figure(decision.champion_value)} |",
        "",
        "| | |",
        "|---|---|",
        f"| state | `{decision.state}` |",
        f"| difference (better: +) | {_figure(decision.difference)} |",
        f"| interval | {_interval(decision)} |",
        f"| p-value | {_figure(decision.p_value)} |",
        f"| eval data | `{decision.eval_digest or 'none'}` |",
    ]
    if decision.checks:
        lines += [
            "",
            "| check | metric | challenger | champion | difference | threshold | passed | reason |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in decision.checks:
            lines.append(
                f"| {c.name} | {c.metric} | {_figure(c.challenger_value)} | {_figure(c.champion_value)} | "
                f"{_figure(c.difference)} | {_figure(c.threshold)} | {_passed(c)} | {c.reason} |"
            )
    if registered is not None:
        lines += ["", f"[{registered.name} version {registered.version} in MLflow]({registered.version_url})"]
    return "\n".join(lines) + "\n"


def _passed(check: Any) -> str:
    if check.passed:
        return "yes"
    return "no (shown, not gating)" if not getattr(check, "gating", True) else "**no**"


def publish_gate_decision(
    decision: Any, registered: Optional[RegisteredVersion] = None, context: Optional[Mapping[str, str]] = None
) -> str:
    """A Prefect markdown artifact `champion-gate`: both versions, both scores, the interval, each check, the state;
    `context` (the data's drift) in a table of its own, beside the decision it does not change."""
    markdown = gate_decision_markdown(decision, registered)
    if context:
        rows = "\n".join(f"| {key} | {value} |" for key, value in sorted(context.items()))
        markdown += f"\n## Context (shown, not deciding)\n\n| | |\n|---|---|\n{rows}\n"
    who = f"{registered.name} " if registered is not None else ""
    create_markdown_artifact(
        key="champion-gate",
        markdown=markdown,
        description=f"{who}v{decision.challenger_version}: {decision.state}: {decision.reason}"[:500],
    )
    return markdown


def headline(registered: Optional[RegisteredVersion], selected: CheckpointRef) -> str:
    """One line for an artifact's card: what was registered, from which step, the gate's outcome."""
    if registered is None:
        return f"step {selected.step}: not registered (track off)"
    outcome = _gate_outcome(registered)
    return f"{registered.name} version {registered.version} from step {selected.step}" + (f"; {outcome}" if outcome else "")


def publish_export_summary(
    selected: CheckpointRef,
    selection: str,
    exported: ExportResult,
    frozen: Optional[FreezeResult],
    registered: RegisteredVersion,
) -> str:
    """A markdown summary of an export: the outcome first, then checkpoint, SavedModel, frozen graph,
    registry and gate."""
    metrics = ", ".join(f"{k}={v:.6g}" for k, v in sorted(selected.metrics.items())) or "none recorded"
    aliases = ", ".join(f"`{a}`" for a in registered.aliases) or "none"
    outcome = _gate_outcome(registered)
    markdown = f"""# Export summary

**[{registered.name} version {registered.version}]({registered.version_url})** from checkpoint step **{selected.step}**,
SavedModel version **{exported.version}**; aliases {aliases}{f"; {outcome}" if outcome else ""}.

## Checkpoint

step **{selected.step}** (`checkpoint` = `{selection}`): `{selected.path}`, {selected.format} checkpoint;
metrics: {metrics}
"""
    markdown += export_markdown(exported)
    markdown += frozen_markdown(frozen) if frozen is not None else "\n(Already registered: not frozen again.)\n"
    markdown += registered_markdown(registered)
    create_markdown_artifact(key="export-summary", markdown=markdown, description=headline(registered, selected))
    return markdown


def registered_markdown(registered: RegisteredVersion) -> str:
    """The MLflow section of a summary: version, aliases, links, the gate's decision."""
    gate = registered.gate
    text = f"""
## MLflow model registry

[{registered.name} version {registered.version}]({registered.version_url}){" (already registered: reused)" if registered.reused else ""},
aliases {", ".join(f"`{a}`" for a in registered.aliases) or "none"}; load it with
`mlflow.pyfunc.load_model("{registered.model_uri}")`. MLflow run: [{registered.run_id}]({registered.run_url}).
"""
    if registered.pyfunc_parity is not None:
        text += f"\npyfunc vs SavedModel: max abs diff {registered.pyfunc_parity.max_abs_diff:.3g}\n"
    if gate is not None:
        text += f"""
| champion gate | |
|---|---|
| decision | **{_gate_outcome(registered)}** (`{gate.state}`) |
| reason | {gate.reason} |
| metric | {gate.metric} ({gate.mode}) |
| this version | {_figure(gate.challenger_value)} |
| champion before | {f"version {gate.champion_version}: {_figure(gate.champion_value)}" if gate.champion_version else "none"} |
| interval | {_interval(gate)} |
"""
    return text


def publish_mlflow_links(registered: RegisteredVersion) -> None:
    """Link artifacts to the MLflow model version and run."""
    aliases = ", ".join(registered.aliases) or "none"
    create_link_artifact(
        key="mlflow-model-version",
        link=registered.version_url,
        link_text=f"{registered.name} version {registered.version}",
        description=f"{registered.name} version {registered.version} in the MLflow registry ({registered.model_uri}); aliases: {aliases}",
    )
    if registered.run_url:
        create_link_artifact(
            key="mlflow-run",
            link=registered.run_url,
            link_text=f"MLflow run {registered.run_id}",
            description=f"The MLflow run of {registered.name} version {registered.version}: params, metrics, the frozen graph and the logged model",
        )


# --- alias moves (tasks/registry/aliases.py) -----------------------------------------------------


def alias_history_key(registered_model_name: str) -> str:
    """The key of a registered model's alias-history artifact (Prefect keys: lowercase letters, digits, '-').

    Example:
        >>> alias_history_key("iris"), alias_history_key("Iris v2")
        ('alias-history-iris', 'alias-history-iris-v2-1c67b3ca')
    """
    slug = re.sub(r"[^a-z0-9]+", "-", registered_model_name.lower()).strip("-")[:60] or "model"
    if slug == registered_model_name:
        return f"alias-history-{slug}"
    return f"alias-history-{slug}-{hashlib.sha256(registered_model_name.encode('utf-8')).hexdigest()[:8]}"


def _version(value: Optional[int]) -> str:
    return "none" if value is None else str(value)


def publish_alias_history(registered_model_name: str, moves: list[AliasMove]) -> list[dict]:
    """A table of every recorded alias move of the registered model, oldest first: when, alias, from, to,
    kind, by, reason, the Prefect run."""
    rows = [
        {
            "when": move.when,
            "alias": move.alias,
            "from": _version(move.from_version),
            "to": move.to_version,
            "kind": move.kind,
            "by": move.by,
            "reason": move.reason,
            "run": move.run_url or "",
        }
        for move in moves
    ]
    champion = [move for move in moves if move.alias == "champion"]
    now = f"@champion: version {champion[-1].to_version}" if champion else "@champion never moved"
    create_table_artifact(
        key=alias_history_key(registered_model_name),
        table=rows,
        description=f"{now}; {len(rows)} alias moves of {registered_model_name}",
    )
    return rows


def publish_rollback_summary(
    registered_model_name: str,
    move: Optional[AliasMove],
    history: list[AliasMove],
    *,
    champion: Optional[int],
    note: str = "",
    version_url: str = "",
) -> str:
    """A markdown of a rollback: the move (None: nothing moved, `note` says why), and the history of `@champion`.

    Args:
        registered_model_name: the registered model.
        move: the recorded move, or None.
        history: the moves of `@champion`, oldest first (the rollback's included).
        champion: the champion now.
        note: why nothing moved.
        version_url: the MLflow page of the champion now.
    """
    name = registered_model_name
    if move is not None:
        outcome = f"**@champion of {name}: version {_version(move.from_version)} → [version {move.to_version}]({version_url})** (rollback)"
        who = f"by {move.by}" + (f" ([run]({move.run_url}))" if move.run_url else "")
        details = f"{who}, {move.when}; reason: {move.reason}"
        description = f"{name} @champion: version {_version(move.from_version)} -> {move.to_version}"
    else:
        outcome = f"**@champion of {name}: nothing moved**"
        details = note
        description = f"{name} @champion: version {_version(champion)}; nothing moved"
    lines = "\n".join(
        f"| {m.when} | {_version(m.from_version)} | {m.to_version} | {m.kind} | {m.by} | {m.reason.replace('|', '/')} |"
        for m in history
    )
    markdown = f"""# Rollback

{outcome}

{details}

## History of @champion (oldest first)

| when | from | to | kind | by | reason |
|---|---|---|---|---|---|
{lines}
"""
    create_markdown_artifact(key="rollback-summary", markdown=markdown, description=description)
    return markdown


# --- the data a windowed training read (tasks/data/lineage.py) --------------------------------------


def publish_manifest_table(manifest: Any, lineage: Any) -> list[dict]:
    """The window's files as a table artifact `data-manifest`: name, partition, size, etag, rows, splits."""
    rows = [
        {
            "file": f.name,
            "partition": f.partition or "",
            "size (bytes)": f.size,
            "etag": f.etag,
            "rows": "" if f.rows is None else f.rows,
            "splits": ", ".join(f.splits),
        }
        for f in manifest.files
    ]
    create_table_artifact(
        key="data-manifest",
        table=rows,
        description=f"window {lineage.window.label} of {lineage.source}: {len(rows)} files, digest {lineage.digest[:12]}",
    )
    return rows


def data_skipped_markdown(reason: str, lineage: Any, previous: Any) -> str:
    """Why a windowed run trained nothing, as markdown.

    Example:
        >>> from prefect_tensorflow.tasks.data.lineage import DataLineage
        >>> from prefect_tensorflow.tasks.data.window import DataWindow
        >>> w = DataWindow(start="2026-11-30", end="2026-12-01")
        >>> last = DataLineage(window=w, source="/d", digest="d" * 64, train_digest="t", eval_digest="e", run_id="r1")
        >>> data_skipped_markdown("data unchanged", last, last).splitlines()[0]
        '# Nothing trained: data unchanged'
    """
    return f"""# Nothing trained: {reason}

| | this run | last trained |
|---|---|---|
| window | {lineage.window.label} | {previous.window.label} |
| digest | `{lineage.digest}` | `{previous.digest}` |
| source | `{lineage.source}` | `{previous.source}` |
| files | {lineage.files} | {previous.files} |
| MLflow run | | `{previous.run_id or ""}` |
| trained in | | `{previous.trained_dir or ""}` |
| trained at | | {previous.trained_at or ""} |

Nothing was trained, exported or registered. Run again with `force=True` (`--force`) to retrain.
"""


def publish_data_skipped(reason: str, lineage: Any, previous: Any) -> str:
    """A markdown artifact `data-skipped`: the window, its digest, the run that trained it, what to do."""
    markdown = data_skipped_markdown(reason, lineage, previous)
    create_markdown_artifact(key="data-skipped", markdown=markdown, description=reason[:500])
    return markdown


def publish_anomalies(anomalies: Any, window: Any) -> list[dict]:
    """The anomalies that blocked a window as a table artifact `data-anomalies`: feature, kind, value, expected."""
    rows = [{"feature": a.feature, "kind": a.kind, "value": a.value, "expected": a.expected} for a in anomalies]
    named = ", ".join(sorted({a.feature for a in anomalies}))
    create_table_artifact(
        key="data-anomalies",
        table=rows,
        description=f"window {window.label if window is not None else ''} blocked, nothing trained: {named}"[:500],
    )
    return rows
