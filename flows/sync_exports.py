"""The `sync-exports` flow: mirror an export base on S3 or GCS to the local directory TF Serving polls.

TF Serving reads no `s3://` since 2.7 (tensorflow/serving#1963). Run this on
the serving host (a schedule, or after a champion move or a rollback): each
version directory appears in `target_dir` complete and verified, and with
`aliases` only the versions they name are kept, so what `@champion` names
is what TF Serving serves next (see `tasks/export/mirror.py`).

In a deployment run `export_base` and `target_dir` must be under the worker's
`PREFECT_TENSORFLOW_ROOTS` (the deployment's configuration), the target is
reached without following a symlink and must be empty or a mirror of this
same export base, and `mlflow` must be a saved block (or none).

Example:
    >>> from prefect_tensorflow.flows.sync_exports import sync_exports
    >>> sync_exports.name
    'sync-exports'
"""

from __future__ import annotations

from typing import Optional

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from prefect_tensorflow.tasks.blocks import MlflowConnection
from prefect_tensorflow.tasks.configs import AliasName, RegisteredModelName
from prefect_tensorflow.tasks.errors import ExportError
from prefect_tensorflow.tasks.export.mirror import MirrorResult, alias_export_versions, mirror_exports
from prefect_tensorflow.tasks.security import check_mlflow_connection
from prefect_tensorflow.tasks.settings import get_settings

from .parameters import checked_paths

mirror_task = task(name="mirror-exports")(mirror_exports)


@task(name="alias-export-versions")
def _alias_versions(
    connection: MlflowConnection, registered_model_name: str, aliases: list[str], export_base: str
) -> dict[str, int]:
    return connection.retrying(
        f"reading the aliases of {registered_model_name!r}",
        lambda: alias_export_versions(connection.client(), registered_model_name, aliases, export_base),
    )


@flow(name="sync-exports", flow_run_name="sync-{registered_model_name}", log_prints=True)
def sync_exports(
    export_base: str = "",
    target_dir: str = "",
    registered_model_name: RegisteredModelName = "iris",
    aliases: list[AliasName] = [],  # noqa: B006 - Prefect copies parameters
    mlflow: Optional[MlflowConnection] = None,
) -> MirrorResult:
    """Mirror the export base's versions into the local directory TF Serving polls, each complete and verified.

    Args:
        export_base: The s3:// or gs:// export base to mirror (<base>/<version>/ SavedModels). In a deployment
            run it must be under the worker's PREFECT_TENSORFLOW_ROOTS.
        target_dir: The local directory TF Serving polls (its model base path), empty or a mirror of this
            export base. Empty: serving/<registered_model_name> under the data home. In a deployment run it
            must be under PREFECT_TENSORFLOW_ROOTS.
        registered_model_name: The MLflow registered model whose aliases choose the versions kept.
        aliases: Keep only the versions these aliases name (e.g. champion and challenger), removing the
            others this mirror placed. Empty: mirror every complete version.
        mlflow: A saved MLflow Connection block, read only when aliases are given. Leave it on None for the
            worker's MLFLOW_TRACKING_URI (else a local SQLite store).

    Raises:
        ValueError: `export_base` is empty, or a malformed path, name or alias (before anything is written).
        UnsafeParameterError: in a deployment run, a path outside the roots or an inline MLflow connection.
        ExportError: a wanted version could not be mirrored (the others were), or the target is not a mirror.
    """
    if not export_base:
        raise ValueError("export_base: expected the s3:// or gs:// export base to mirror, received ''")
    target = target_dir or get_settings().default_path("serving", registered_model_name)
    paths = checked_paths(target_dir=target, export_base=export_base)
    check_mlflow_connection(mlflow)
    wanted: Optional[dict[str, int]] = None
    if aliases:
        connection = mlflow or MlflowConnection()
        wanted = _alias_versions(connection, registered_model_name, list(dict.fromkeys(aliases)), paths["export_base"])
    result = mirror_task(
        paths["export_base"],
        paths["target_dir"],
        versions=None if wanted is None else sorted(set(wanted.values())),
        aliases=wanted,
    )
    _publish(result)
    if result.refused:
        raise ExportError(
            f"{len(result.refused)} version(s) of {result.source} not mirrored to {result.target}: "
            + "; ".join(f"{v}: {why}" for v, why in result.refused.items())
        )
    return result


def _publish(result: MirrorResult) -> None:
    def listed(versions: list[int]) -> str:
        return ", ".join(map(str, versions)) or "none"

    by_alias = ", ".join(f"@{a} -> {v}" for a, v in sorted(result.aliases.items()))
    lines = [
        f"**{result.source}** mirrored to `{result.target}`" + (f" (kept: {by_alias})" if by_alias else ""),
        "",
        "| | versions |",
        "|---|---|",
        f"| added | {listed(result.added)} |",
        f"| removed | {listed(result.removed)} |",
        f"| kept | {listed(result.kept)} |",
        f"| served now | {listed(result.served)} |",
    ]
    lines += [f"| refused {v} | {why} |" for v, why in result.refused.items()]
    if result.foreign:
        lines.append(f"| not this mirror's (left) | {listed(result.foreign)} |")
    create_markdown_artifact(key="sync-exports", markdown="\n".join(lines), description="What the mirror added and removed")
