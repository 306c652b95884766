"""A training's data in MLflow: `data.*` tags, the train and eval inputs, the manifest and statistics.

`log_data_lineage` records, on the training's MLflow run, which data it read:
the `data.*` tags (`DataLineage.tags`: window, digests, source), one dataset
input per split (`MlflowClient.log_inputs`: name, digest, source, context
`training` / `eval`, the manifest's files as its profile), and the manifest,
the window's statistics, its drift and the schema as artifacts under `data/`.
`tag_version_data` puts the same tags on a registered model version, so that
from a version, `client.get_run(version.run_id).inputs.dataset_inputs` and the
run's `data/manifest.json` answer "which files trained this?".

MLflow keeps a dataset digest to 36 characters: the input's digest is the
split digest's first 36; the tags and the profile hold it whole. Everything
goes through the connection's own client (no fluent API, no globals).

Example:
    >>> from prefect_tensorflow.tasks.registry.data_lineage import input_name
    >>> input_name("s3://team/iris-daily", "2026-11-30_2026-12-01", "train")
    'iris-daily 2026-11-30_2026-12-01 train'
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Optional

from ..data.lineage import DataLineage
from ..data.manifest import DataManifest
from .mlflow_connection import MlflowConfig

MAX_DIGEST = 36
CONTEXTS = {"train": "training", "eval": "eval"}


def input_name(source: str, window_name: str, split: str) -> str:
    """The dataset input's name: the source's last path segment, the window, the split."""
    return f"{source.rstrip('/').rsplit('/', 1)[-1]} {window_name} {split}"


def dataset_inputs(manifest: DataManifest, lineage: DataLineage) -> list[Any]:
    """One `DatasetInput` per split (context `training` / `eval`), its digest the split digest's first 36 characters."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for split, digest in (("train", lineage.train_digest), ("eval", lineage.eval_digest)):
        files = [f for f in manifest.files if split in f.splits]
        profile = {
            "digest": digest,
            "window": lineage.window.label,
            "files": len(files),
            "rows": None if any(f.rows is None for f in files) else sum(f.rows or 0 for f in files),
            "split_rule": manifest.split_rule,
        }
        dataset = Dataset(
            name=input_name(lineage.source, lineage.window.name, split),
            digest=digest[:MAX_DIGEST],
            source_type="prefect_tensorflow",
            source=json.dumps({"uri": lineage.source, "window": lineage.window.name, "split": split}),
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", CONTEXTS[split])]))
    return inputs


def log_data_lineage(
    connection: MlflowConfig,
    run_id: str,
    manifest: DataManifest,
    lineage: DataLineage,
    *,
    artifacts: Optional[Mapping[str, Any]] = None,
    tags: Optional[Mapping[str, str]] = None,
) -> None:
    """Record the training's data on `run_id`: `data.*` tags, the train and eval inputs, `data/manifest.json`.

    Args:
        connection: the MLflow connection.
        run_id: the training's run.
        manifest: the window's manifest.
        lineage: its digests (`lineage_of`).
        artifacts: more JSON documents under `data/` by file name (`statistics.json`, `drift.json`,
            `data-schema.json`).
        tags: more tags (`data.drift.*`).

    Raises:
        MlflowUnavailableError: the server still failed after the retries.
    """
    from mlflow.entities import RunTag

    client = connection.client()
    everything = {**lineage.tags(), **(tags or {})}
    documents = {"manifest.json": manifest.model_dump(mode="json"), **(artifacts or {})}

    def log() -> None:
        client.log_batch(run_id, tags=[RunTag(k, v[:5000]) for k, v in sorted(everything.items())])
        client.log_inputs(run_id, datasets=dataset_inputs(manifest, lineage))
        for name, document in documents.items():
            client.log_dict(run_id, document, f"data/{name}")

    connection.retrying(f"logging the data lineage of run {run_id}", log)


def tag_version_data(connection: MlflowConfig, name: str, version: int, tags: Mapping[str, str]) -> None:
    """Set the `data.*` tags on version `version` of registered model `name`."""
    client = connection.client()

    def write() -> None:
        for key, value in sorted(tags.items()):
            client.set_model_version_tag(name, str(version), key, value[:5000])

    connection.retrying(f"tagging {name!r} version {version} with its data", write)


def run_document(connection: MlflowConfig, run_id: str, path: str) -> Optional[Any]:
    """A JSON artifact of a run (e.g. the champion's `data/statistics.json`), or None when it has none."""
    import tempfile

    from mlflow.exceptions import MlflowException

    client = connection.client()
    with tempfile.TemporaryDirectory(prefix="prefect-tensorflow-data-") as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except (MlflowException, OSError):
            return None
        try:
            with open(local, encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None


def champion_document(connection: MlflowConfig, name: str, path: str = "data/statistics.json") -> Optional[Any]:
    """A JSON artifact (`path`) of the run that trained `@champion` of `name`; None: no model, no champion, no such file."""
    from ..errors import RegistryError
    from .aliases import current_alias_version

    client = connection.client()

    def champion_run() -> Optional[str]:
        try:
            version = current_alias_version(client, name, "champion")
        except RegistryError:
            return None
        return None if version is None else client.get_model_version(name, str(version)).run_id

    run_id = connection.retrying(f"reading the champion of {name!r}", champion_run)
    return run_document(connection, run_id, path) if run_id else None
