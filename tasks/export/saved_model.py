"""`export_saved_model`: a checkpoint exported as a versioned SavedModel, verified.

Layout for TensorFlow Serving: `<export_base>/<version>/saved_model.pb` with
`variables/` (and `assets/`), `version` an increasing integer. Each version is
written to a hidden temporary directory in `export_base`, reloaded with
`tf.saved_model.load`, called on a verification batch and compared with the
checkpoint, and only then renamed to its number, so a server watching
`export_base` never loads a partial version and a failed export leaves none.

A fingerprint of the checkpoint (its index, which holds every tensor's
CRC32C) and of the export settings is kept in
`<version>/assets.extra/prefect_tensorflow.json`, beside TF Serving's warmup
requests (`warmup.py`); exporting the same
checkpoint with the same settings again returns that version. An exclusive
lock on `export_base` makes concurrent exports of one checkpoint end with one
version. A local `export_base` is opened once, before anything is written, and
staged into and published through that handle (`export_base.LocalExportBase`):
a base swapped for a symlink mid-export publishes nothing.

Example:
    >>> from prefect_tensorflow.tasks.export.saved_model import checkpoint_fingerprint
    >>> checkpoint_fingerprint.__name__
    'checkpoint_fingerprint'
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import AbstractContextManager
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from .. import model_code
from ..checkpoints.files import confine_checkpoint_files
from ..checkpoints.meta_graph import load_meta_graph
from ..checkpoints.model_dir import ModelDir
from ..checkpoints.selection import validate_checkpoint
from ..configs import ExportConfig
from ..errors import ExportError, ParityError
from ..run_context import get_logger
from .export_base import INFO_FILE, LocalExportBase, RemoteExportBase, open_export_base, saved_model_digest
from .signature import trace_checkpoint
from .verification import Parity, compare_outputs, run_saved_model, verification_batch
from .warmup import read_warmup_requests, write_warmup_requests


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


def _save_tf2(prefix: str, target: str, model: str, config: ExportConfig):
    import tensorflow as tf

    traced = trace_checkpoint(prefix, model, config.hparams, config.head, config.data_source(model))
    module = tf.Module()
    module.model = traced.net
    module.serve = traced.serve
    tf.saved_model.save(module, target, signatures={"serving_default": traced.serve.get_concrete_function()})
    return traced.batch, traced.input_names, traced.expected


def _save_tf1(prefix: str, target: str, config: ExportConfig):
    import tensorflow as tf
    from tensorflow.python.util import deprecation

    tf1 = load_meta_graph(prefix, output_nodes=config.output_nodes, input_nodes=config.input_nodes, error=ExportError)
    graph, saver, inputs, outputs = tf1.graph, tf1.saver, tf1.inputs, tf1.outputs
    with tf.compat.v1.Session(graph=graph) as sess, deprecation.silence():  # the TF1 builder is deprecated by design
        saver.restore(sess, prefix)
        in_tensors = {name.split(":")[0]: graph.get_tensor_by_name(name) for name in inputs}
        out_tensors = {key: graph.get_tensor_by_name(name) for key, name in outputs.items()}
        signature = tf.compat.v1.saved_model.predict_signature_def(inputs=in_tensors, outputs=out_tensors)
        builder = tf.compat.v1.saved_model.Builder(target)
        builder.add_meta_graph_and_variables(
            sess,
            [tf.saved_model.SERVING],
            signature_def_map={"serving_default": signature},
            strip_default_attrs=True,
        )
        builder.save()
        names = sorted(in_tensors)
        batch = verification_batch([tf.TensorSpec(in_tensors[n].shape, in_tensors[n].dtype) for n in names], config.data)
        keys = sorted(out_tensors)
        values = sess.run([out_tensors[k] for k in keys], dict(zip([in_tensors[n] for n in names], batch)))
    return batch, names, dict(zip(keys, values))


def export_saved_model(checkpoint: str, export_base: str, config: Optional[ExportConfig] = None) -> ExportResult:
    """Export a checkpoint as the next SavedModel version of `export_base`, verified, published atomically.

    Args:
        checkpoint: a TF2 checkpoint prefix (rebuilt with `config.model`) or a TF1 `Saver` one (with `.meta`).
        export_base: directory of `<version>/` SavedModels (created if missing).
        config: the model builder and head of a TF2 checkpoint (default: the bundled iris), the
            input and output nodes of a TF1 one, the verification data and tolerance.

    Returns:
        Path, version, signature summary, digest, fingerprint and parity figures;
        `reused=True` when the same checkpoint and settings were already exported.

    Raises:
        InvalidCheckpointError: the checkpoint is incomplete or corrupt.
        ImportStringError: the model builder is refused or does not import (nothing is written).
        CheckpointMismatchError: the checkpoint was not written by the model builder.
        ExportError: unusable export base, missing `.meta`, unknown output node.
        ParityError: the SavedModel does not compute what the checkpoint computes (no version is written).

    Example:
        >>> from prefect import flow
        >>> from prefect_tensorflow.tasks import export_saved_model
        >>> @flow
        ... def ship(checkpoint: str) -> str:
        ...     return export_saved_model(checkpoint, "/srv/models/iris").path
    """
    config = config or ExportConfig()
    source, name = ModelDir.of_checkpoint(checkpoint)
    if not source.is_remote:
        confine_checkpoint_files(os.fspath(checkpoint), parameter="checkpoint")  # a deployment run reads only under the roots
    files = validate_checkpoint(checkpoint)
    local_prefix = source.local_checkpoint(name) if source.is_remote else files.prefix
    model = config.model_for(files.format)
    settings = {
        "format": "tf1" if model is None else "tf2",
        "model": model_code.import_string(model, "model") if model is not None else None,
        "hparams": config.hparams,
        "head": config.head,
        "input_nodes": config.input_nodes,
        "output_nodes": config.output_nodes,
    }
    if model is not None:  # refused or unimportable code fails before the export base is touched
        model_code.load(model, "model")
        if config.verification_data(model) is not None:
            model_code.load(config.verification_data(model) or "", "data")
    fingerprint = checkpoint_fingerprint(local_prefix, settings)
    base = open_export_base(os.fspath(export_base))
    try:
        base.prepare()  # a local base is opened once here: every write below goes through that handle
        with base.lock():
            return _export_locked(base, files.prefix, local_prefix, model, config, settings, fingerprint)
    except BaseException:
        base.forget_if_created()  # a failed export into a new base leaves no base behind
        raise
    finally:
        base.close()


def _export_locked(
    base: LocalExportBase | RemoteExportBase,
    source: str,
    prefix: str,
    model: Optional[str],
    config: ExportConfig,
    settings: dict[str, Any],
    fingerprint: str,
) -> ExportResult:
    import tensorflow as tf

    log = get_logger()
    versions = base.versions()
    for _version, path in sorted(versions.items()):
        info = base.info(path)
        if info.get("fingerprint") != fingerprint:
            continue
        if base.digest(path) != info.get("result", {}).get("digest"):
            log.warning("%s was exported from checkpoint %s but its files changed since; exporting a new version", path, source)
            continue
        log.info("checkpoint %s is already exported as %s", source, path)
        return ExportResult(**{**info["result"], "reused": True, "path": path, "export_base": base.uri})
    for leftover in base.clean_up():  # exports cut short by a crash
        log.warning("removed %s, an export cut short", leftover)
    version = max(base.versions(), default=0) + 1
    with base.staged(version) as tmp:  # an empty directory, which both SavedModel writers accept
        if model is None:
            batch, names, expected = _save_tf1(prefix, tmp, config)
        else:
            batch, names, expected = _save_tf2(prefix, tmp, model, config)
        loaded = tf.saved_model.load(tmp)
        actual = run_saved_model(tmp, batch, input_names=names, loaded=loaded)
        parity = compare_outputs(expected, actual, config.tolerance, sides=("checkpoint", "SavedModel"))
        if not parity.ok:
            raise ParityError(f"SavedModel of {source} fails verification: {parity.explain()}; no version was written")
        # TF Serving's warmup file, inside the staged version so the digest below covers it; read back at once
        write_warmup_requests(tmp, dict(zip(names, batch)), model_name=os.path.basename(base.uri.rstrip("/")) or "model")
        read_warmup_requests(tmp, list(names))
        result = ExportResult(
            export_base=base.uri,
            version=version,
            path=base.path(version),
            source=source,
            source_format=settings["format"],
            signature=signature_summary(tmp, loaded),
            digest=saved_model_digest(tmp),
            fingerprint=fingerprint,
            parity=parity,
            reused=False,
        )
        os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
        with open(os.path.join(tmp, INFO_FILE), "w", encoding="utf-8") as handle:
            json.dump(
                {"fingerprint": fingerprint, "settings": settings, "result": result.model_dump(mode="json")},
                handle,
                indent=2,
                sort_keys=True,
            )
    log.info("exported %s as version %d in %s", source, version, base.uri)
    return result


def export_lock(export_base: str) -> AbstractContextManager[None]:
    """The lock exports and registrations of one export base share (a `flock`, or a lease on object storage)."""
    return open_export_base(export_base).lock()
