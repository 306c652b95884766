"""`export_saved_model`: a checkpoint exported as a versioned SavedModel, verified.

Layout for TensorFlow Serving: `<export_base>/<version>/saved_model.pb` with
`variables/` (and `assets/`), `version` an increasing integer. Each version is
written to a hidden temporary directory in `export_base`, reloaded with
`tf.saved_model.load`, called on a verification batch and compared with the
checkpoint, and only then renamed to its number, so a server watching
`export_base` never loads a partial version and a failed export leaves none.

A fingerprint of the checkpoint (its index, which holds every tensor's
CRC32C) and of the export settings is kept in
`<version>/assets.extra/prefect_tensorflow.json`; exporting the same
checkpoint with the same settings again returns that version. An exclusive
lock on `export_base` makes concurrent exports of one checkpoint end with one
version.

Example:
    >>> from prefect import flow
    >>> from prefect_tensorflow.tasks.exporting import export_saved_model
    >>> @flow
    ... def export(checkpoint: str) -> int:
    ...     return export_saved_model(checkpoint, "/models/iris/export").version
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from . import iris
from .checkpoint_files import check_checkpoint
from .errors import ExportError, ParityError
from .logs import get_logger
from .meta_graph import load_meta_graph
from .serving import Head, input_specs, restore_model, serving_function
from .verification import (
    DEFAULT_TOLERANCE,
    Parity,
    compare_outputs,
    default_verification_data,
    run_saved_model,
    verification_batch,
)

INFO_FILE = os.path.join("assets.extra", "prefect_tensorflow.json")
LOCK_FILE = ".prefect-tensorflow.lock"
TMP_PREFIX = ".tmp-export-"


class TensorInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    dtype: str
    shape: Optional[list[Optional[int]]]


class SignatureSummary(BaseModel):
    """The `serving_default` signature: named inputs and outputs."""

    model_config = ConfigDict(frozen=True)

    name: str = "serving_default"
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]


class ExportResult(BaseModel):
    """A verified SavedModel version."""

    model_config = ConfigDict(frozen=True)

    export_base: str
    version: int
    path: str
    source: str
    source_format: str
    signature: SignatureSummary
    digest: str = Field(description="sha256 of saved_model.pb and the variables files")
    fingerprint: str = Field(description="sha256 of the checkpoint index and the export settings")
    parity: Parity
    reused: bool = Field(description="True when an existing version had the same fingerprint")


def checkpoint_fingerprint(prefix: str, settings: dict[str, Any]) -> str:
    """sha256 of the checkpoint's index (every tensor's offset, size and CRC32C) and the settings."""
    digest = hashlib.sha256()
    with open(prefix + ".index", "rb") as handle:
        digest.update(handle.read())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return "sha256:" + digest.hexdigest()


def saved_model_digest(path: str) -> str:
    """sha256 over `saved_model.pb` and every file under `variables/`, in path order."""
    digest = hashlib.sha256()
    files = [os.path.join(path, "saved_model.pb")]
    for root, _, names in os.walk(os.path.join(path, "variables")):
        files.extend(os.path.join(root, n) for n in names)
    for name in sorted(files):
        digest.update(os.path.relpath(name, path).encode())
        with open(name, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _prepare_export_base(export_base: str) -> str:
    path = os.path.abspath(export_base)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ExportError(f"export base {path} is a file; expected a directory of version directories")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ExportError(f"export base {path} cannot be created: {err.strerror or err}") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise ExportError(f"export base {path} is not writable")
    return path


@contextmanager
def export_lock(export_base: str) -> Iterator[None]:
    """Hold an exclusive lock on `export_base` (a `flock` on a hidden file in it)."""
    try:
        handle = open(os.path.join(export_base, LOCK_FILE), "a+")
    except OSError as err:
        raise ExportError(f"export base {export_base} is not writable: {err.strerror or err}") from err
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def existing_versions(export_base: str) -> dict[int, str]:
    """The version directories of `export_base`.

    Raises:
        ExportError: `export_base` holds entries that are neither version
            directories nor hidden (TensorFlow Serving would skip them; a typo'd
            path, e.g. a model dir, is more likely).
    """
    versions: dict[int, str] = {}
    strangers = []
    for name in sorted(os.listdir(export_base)):
        full = os.path.join(export_base, name)
        if name.startswith("."):
            continue
        if name.isdigit() and os.path.isdir(full):
            versions[int(name)] = full
        else:
            strangers.append(name)
    if strangers:
        raise ExportError(
            f"export base {export_base} holds entries that are not version directories: "
            f"{', '.join(strangers[:10])}; expected only <integer>/ SavedModel directories"
        )
    return versions


def _read_info(version_dir: str) -> dict[str, Any]:
    try:
        with open(os.path.join(version_dir, INFO_FILE), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def signature_summary(path: str, loaded: Any = None) -> SignatureSummary:
    """The `serving_default` signature of a SavedModel, as `saved_model_cli show` lists it."""
    import tensorflow as tf

    loaded = loaded if loaded is not None else tf.saved_model.load(path)
    fn = loaded.signatures["serving_default"]
    _, kwargs = fn.structured_input_signature

    def info(spec) -> TensorInfo:
        shape = spec.shape.as_list() if spec.shape.rank is not None else None
        return TensorInfo(dtype=spec.dtype.name, shape=shape)

    return SignatureSummary(
        inputs={k: info(v) for k, v in sorted(kwargs.items())},
        outputs={k: info(v) for k, v in sorted(fn.structured_outputs.items())},
    )


# --- writing a SavedModel ------------------------------------------------------------


def _save_tf2(prefix: str, target: str, model: str, hparams, head: Head, data: Optional[str]):
    import tensorflow as tf

    net = restore_model(prefix, model, hparams)
    serve = serving_function(net, head)
    module = tf.Module()
    module.model = net
    module.serve = serve
    tf.saved_model.save(module, target, signatures={"serving_default": serve.get_concrete_function()})
    specs = input_specs(net)
    batch = verification_batch(specs, data)
    expected = {k: v.numpy() for k, v in serve(*batch).items()}
    return batch, [spec.name for spec in specs], expected


def _save_tf1(prefix: str, target: str, input_nodes, output_nodes, data: Optional[str]):
    import tensorflow as tf

    tf1 = load_meta_graph(prefix, output_nodes=output_nodes, input_nodes=input_nodes, error=ExportError)
    graph, saver, inputs, outputs = tf1.graph, tf1.saver, tf1.inputs, tf1.outputs
    with tf.compat.v1.Session(graph=graph) as sess:
        saver.restore(sess, prefix)
        in_tensors = {name.split(":")[0]: graph.get_tensor_by_name(name) for name in inputs}
        out_tensors = {key: graph.get_tensor_by_name(name) for key, name in outputs.items()}
        signature = tf.compat.v1.saved_model.predict_signature_def(inputs=in_tensors, outputs=out_tensors)
        builder = tf.compat.v1.saved_model.Builder(target)
        builder.add_meta_graph_and_variables(
            sess, [tf.saved_model.SERVING], signature_def_map={"serving_default": signature},
            strip_default_attrs=True,
        )
        builder.save()
        names = sorted(in_tensors)
        batch = verification_batch([tf.TensorSpec(in_tensors[n].shape, in_tensors[n].dtype) for n in names], data)
        keys = sorted(out_tensors)
        values = sess.run([out_tensors[k] for k in keys], dict(zip([in_tensors[n] for n in names], batch)))
    return batch, names, dict(zip(keys, values))


def export(
    checkpoint: str | os.PathLike,
    export_base: str | os.PathLike,
    *,
    model: Optional[str] = None,
    hparams: Optional[dict[str, Any]] = None,
    head: Head = "classifier",
    input_nodes: Optional[list[str]] = None,
    output_nodes: Optional[list[str]] = None,
    data: Optional[str] = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportResult:
    """Export, verify and publish one SavedModel version (plain function behind the task).

    Raises:
        InvalidCheckpointError: the checkpoint is incomplete or corrupt.
        CheckpointMismatchError: the checkpoint was not written by `model`.
        ExportError: unusable export base, missing `.meta`, unknown output node.
        ParityError: the SavedModel does not compute what the checkpoint computes.
    """
    files = check_checkpoint(checkpoint)
    tf1 = files.format == "tf1" and model is None
    if not tf1:
        model = model or iris.MODEL
        data = default_verification_data(model, data)
    export_base = _prepare_export_base(os.fspath(export_base))
    settings = {
        "format": "tf1" if tf1 else "tf2", "model": model, "hparams": hparams or {}, "head": head,
        "input_nodes": input_nodes, "output_nodes": output_nodes,
    }
    fingerprint = checkpoint_fingerprint(files.prefix, settings)
    log = get_logger()
    existing_versions(export_base)  # refuse a wrong directory before leaving a lock file in it
    import tensorflow as tf

    with export_lock(export_base):
        versions = existing_versions(export_base)
        for version, path in sorted(versions.items()):
            info = _read_info(path)
            if info.get("fingerprint") != fingerprint:
                continue
            if saved_model_digest(path) != info.get("result", {}).get("digest"):
                log.warning(
                    "%s was exported from checkpoint %s but its files changed since; "
                    "exporting a new version", path, files.prefix,
                )
                continue
            log.info("checkpoint %s is already exported as %s", files.prefix, path)
            return ExportResult(**{**info["result"], "reused": True, "path": path, "export_base": export_base})
        for name in os.listdir(export_base):
            if name.startswith(TMP_PREFIX):  # an export cut short by a crash; never a version
                shutil.rmtree(os.path.join(export_base, name), ignore_errors=True)
        version = max(versions, default=0) + 1
        tmp = os.path.join(export_base, f"{TMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}")
        final = os.path.join(export_base, str(version))
        try:
            if tf1:
                from tensorflow.python.util import deprecation

                with deprecation.silence():  # the TF1 SavedModel builder is deprecated by design
                    batch, names, expected = _save_tf1(files.prefix, tmp, input_nodes, output_nodes, data)
            else:
                batch, names, expected = _save_tf2(files.prefix, tmp, model, hparams, head, data)
            loaded = tf.saved_model.load(tmp)
            actual = run_saved_model(tmp, batch, input_names=names, loaded=loaded)
            parity = compare_outputs(expected, actual, tolerance)
            if not parity.ok:
                raise ParityError(
                    f"SavedModel of {files.prefix} differs from it by {parity.max_abs_diff:.3g} "
                    f"(tolerance {tolerance:g}): {parity.per_output}; no version was written"
                )
            result = ExportResult(
                export_base=export_base, version=version, path=final, source=files.prefix,
                source_format="tf1" if tf1 else "tf2", signature=signature_summary(tmp, loaded),
                digest=saved_model_digest(tmp), fingerprint=fingerprint, parity=parity, reused=False,
            )
            os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
            with open(os.path.join(tmp, INFO_FILE), "w", encoding="utf-8") as handle:
                json.dump({"fingerprint": fingerprint, "settings": settings,
                           "result": result.model_dump(mode="json")}, handle, indent=2, sort_keys=True)
            os.rename(tmp, final)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s as version %d in %s", files.prefix, version, export_base)
    return result


@task(name="export-saved-model")
def export_saved_model(
    checkpoint: str,
    export_base: str,
    model: Optional[str] = None,
    hparams: Optional[dict[str, Any]] = None,
    input_nodes: Optional[list[str]] = None,
    output_nodes: Optional[list[str]] = None,
    data: Optional[str] = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportResult:
    """Export a checkpoint as the next SavedModel version of `export_base`, verified.

    Args:
        checkpoint: a TF2 checkpoint prefix (with `model`) or a TF1 `Saver` one (with `.meta`).
        export_base: directory of `<version>/` SavedModels (created if missing).
        model: model builder import string for TF2 checkpoints (default: the bundled iris).
        hparams: keyword arguments for the model builder.
        input_nodes: TF1 only: input tensor names (default: the meta graph's signature).
        output_nodes: TF1 only: output node names (default: the meta graph's signature).
        data: dataset loader for the verification batch (default: seeded random values).
        tolerance: largest absolute difference accepted in verification.

    Returns:
        Path, version, signature summary, digest, fingerprint and parity figures;
        `reused=True` when the same checkpoint and settings were already exported.

    Raises:
        ExportError, ParityError, InvalidCheckpointError, CheckpointMismatchError.

    Example:
        >>> from prefect import flow
        >>> @flow
        ... def ship(checkpoint: str) -> str:
        ...     return export_saved_model(checkpoint, "/srv/models/iris").path
    """
    return export(
        checkpoint, export_base, model=model, hparams=hparams, input_nodes=input_nodes,
        output_nodes=output_nodes, data=data, tolerance=tolerance,
    )
