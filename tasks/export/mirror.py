"""Mirror an export base on object storage to a local directory that TensorFlow Serving polls.

TensorFlow Serving has read no `s3://` since 2.7 (tensorflow/serving#1963),
so a serving host keeps a local model base path and this copies the export
base into it, with the promises a server watching a directory needs:

- a version directory appears complete or not at all: it is downloaded into
  a hidden temporary inside the target (`.<version>.ptf-tmp-...`, a name TF
  Serving ignores), its digest checked against the export's own record
  (`assets.extra/prefect_tensorflow.json`, when there is one), then renamed
  into place; a crash leaves only the temporary, removed by the next sync;
- versions already mirrored are not downloaded again;
- optionally only some versions are kept (those registry aliases name, see
  `alias_export_versions`): the others this mirror made are renamed away
  (one atomic rename, which TF Serving sees as the version's removal), then
  deleted. New versions are added before old ones go, so a champion move is
  served without a moment with nothing to serve, and when a wanted version
  cannot be mirrored nothing is removed;
- only what this mirror made is ever removed: its manifest
  (`.prefect-tensorflow-mirror.json`) lists the versions it placed, and a
  target that mirrors another export base, or holds entries other than
  version directories, is refused.

One sync at a time per target (an exclusive lock on `.prefect-tensorflow.lock`).

Example:
    >>> import tempfile
    >>> from prefect_tensorflow.tasks.export.mirror import read_manifest
    >>> from prefect_tensorflow.tasks.storage.confined_dirs import open_directory
    >>> with open_directory(tempfile.mkdtemp(), parameter="target_dir") as target:
    ...     read_manifest(target)
    {'source': None, 'versions': {}}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ExportError, RegistryError
from ..run_context import get_logger
from ..storage.confined_dirs import OpenDir, open_directory
from ..storage.local import (
    _remove_entry,
    _temporary_name,
    exclusive_lock,
    remove_abandoned_temporaries,
    staged_directory,
    staged_file,
)
from ..storage.locations import parse_location
from ..storage.write_failures import reported_write_failure
from .export_base import RemoteExportBase, saved_model_digest

MANIFEST = ".prefect-tensorflow-mirror.json"
TAG_PREFIX = "prefect_tensorflow."


class MirrorResult(BaseModel):
    """What one sync did: versions added, removed, kept (already there and still wanted), refused."""

    model_config = ConfigDict(frozen=True)

    source: str = Field(description="The export base mirrored (s3:// or gs://)")
    target: str = Field(description="The local directory TF Serving polls")
    added: list[int] = Field(default_factory=list, description="Versions downloaded, verified and renamed into place")
    removed: list[int] = Field(default_factory=list, description="Versions this mirror had placed and no longer keeps")
    kept: list[int] = Field(default_factory=list, description="Versions already mirrored and still wanted")
    refused: dict[int, str] = Field(default_factory=dict, description="Wanted versions not mirrored, and why")
    foreign: list[int] = Field(default_factory=list, description="Version dirs in the target this mirror did not make: left")
    aliases: dict[str, int] = Field(default_factory=dict, description="Alias -> export version, when kept by aliases")
    served: list[int] = Field(default_factory=list, description="The version dirs in the target after the sync")


def read_manifest(target: OpenDir) -> dict[str, Any]:
    """The mirror's record in `target`: `{"source": uri or None, "versions": {"3": {"digest": ...}}}`."""
    try:
        with open(target.entry(MANIFEST), encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return {"source": None, "versions": {}}
    except (OSError, ValueError) as err:
        raise ExportError(
            f"target_dir {target.display(MANIFEST)} is unreadable ({err}); remove it to start the mirror afresh"
        ) from err
    if not isinstance(data, dict) or not isinstance(data.get("versions"), dict):
        raise ExportError(f"target_dir {target.display(MANIFEST)} is not a mirror manifest; remove it to start afresh")
    return data


def _write_manifest(target: OpenDir, manifest: dict[str, Any]) -> None:
    with staged_file(MANIFEST, parent=target) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1, sort_keys=True)


def mirror_exports(
    export_base: str,
    target_dir: str,
    *,
    versions: Optional[Iterable[int]] = None,
    aliases: Optional[dict[str, int]] = None,
) -> MirrorResult:
    """Make `target_dir` hold the wanted versions of the export base `export_base`, each complete and verified.

    Args:
        export_base: the `s3://` or `gs://` export base (`<base>/<version>/` SavedModels).
        target_dir: the local directory TF Serving polls (created if missing; in a deployment run it must be
            under the roots, reached without following a symlink).
        versions: the versions to keep (e.g. what aliases name); None: every complete version of the base.
            Versions this mirror placed earlier and not wanted now are removed.
        aliases: alias -> version, only reported in the result.

    Returns:
        What was added, removed, kept and refused (a wanted version missing from the base, or whose files
        do not match the export's recorded digest: never put in place).

    Raises:
        StorageError, UnsafeParameterError: a malformed or (deployment run) unreachable location.
        ExportError: `export_base` is not on object storage, the wanted set is empty, or the target mirrors
            another export base or holds entries that are not version directories.

    Example:
        >>> from prefect import flow
        >>> from prefect_tensorflow.tasks.export.mirror import mirror_exports
        >>> @flow
        ... def serve_from_s3(export_base: str = "s3://team/exports/iris", target_dir: str = "/srv/serving/iris"):
        ...     return mirror_exports(export_base, target_dir).added
    """
    location = parse_location(export_base, parameter="export_base")
    if location.is_local:
        raise ExportError(
            f"export_base: {location.uri} is a local directory, which TF Serving reads itself; "
            "expected the s3:// or gs:// export base to mirror"
        )
    source = RemoteExportBase(location)
    log = get_logger()
    with open_directory(target_dir, parameter="target_dir", create=True) as target:
        with exclusive_lock(target.path, parent=target):
            for leftover in remove_abandoned_temporaries(target.path, directory=target):
                log.warning("removed %s, a mirror download (or removal) cut short", leftover)
            manifest = read_manifest(target)
            if manifest.get("source") not in (None, source.uri):
                raise ExportError(
                    f"target_dir {target.path} mirrors {manifest['source']}, not {source.uri}; "
                    "give each export base its own target directory"
                )
            present, strangers = _present_versions(target)
            if manifest.get("source") is None and present:
                raise ExportError(
                    f"target_dir {target.path} holds version directories ({', '.join(str(v) for v in sorted(present)[:5])}) "
                    f"but no mirror manifest ({MANIFEST}): it is not a mirror (an export base?); give an empty "
                    "directory or one this sync made"
                )
            if strangers:
                raise ExportError(
                    f"target_dir {target.path} holds entries that are not version directories: "
                    f"{', '.join(strangers[:10])}; a TF Serving model base path holds only <integer>/ versions"
                )
            mine = {int(v): dict(info) for v, info in manifest["versions"].items() if int(v) in present}
            available = source.versions()
            wanted = sorted(set(available) if versions is None else {int(v) for v in versions})
            if not wanted:
                raise ExportError(
                    f"nothing to mirror from {source.uri}: "
                    + ("it has no complete version" if versions is None else "no version was asked for")
                    + f"; {target.path} is left as it is"
                )
            manifest = {"source": source.uri, "versions": {str(v): info for v, info in mine.items()}}
            added, kept, refused = [], [], {}
            foreign = sorted(v for v in present if v not in mine)
            for version in wanted:
                if version in mine:
                    kept.append(version)
                    continue
                if version in present:
                    refused[version] = f"{target.display(str(version))} exists and was not placed by this mirror; left as it is"
                    continue
                if version not in available:
                    refused[version] = f"{source.uri}/{version} is not a complete version of the export base"
                    continue
                digest, why = _download_verified(source, version, target, manifest)
                if digest is None:
                    refused[version] = why
                    continue
                added.append(version)
                log.info("mirrored %s/%d to %s (%s)", source.uri, version, target.display(str(version)), digest)
            removed = []
            if refused and any(v not in wanted for v in mine):
                log.error("nothing removed from %s: a wanted version is not there, so the old ones keep serving", target.path)
            for version in sorted(mine):
                if version not in wanted and not refused:
                    _remove_version(target, version)
                    del manifest["versions"][str(version)]
                    _write_manifest(target, manifest)
                    removed.append(version)
                    log.info("removed version %d from %s: no longer wanted", version, target.path)
            if not mine and not added:
                _write_manifest(target, manifest)  # the target now belongs to this export base
            for version, why in refused.items():
                log.error("version %d not mirrored: %s", version, why)
            served, _ = _present_versions(target)
            return MirrorResult(
                source=source.uri,
                target=target.path,
                added=added,
                removed=removed,
                kept=kept,
                refused=refused,
                foreign=foreign,
                aliases=dict(aliases or {}),
                served=sorted(served),
            )


def _present_versions(target: OpenDir) -> tuple[set[int], list[str]]:
    """(version directories, other visible entries) of the target."""
    present, strangers = set(), []
    for name in sorted(target.listdir()):
        if name.startswith("."):
            continue
        if name.isdigit() and target.is_dir(name):
            present.add(int(name))
        else:
            strangers.append(name)
    return present, strangers


def _download_verified(
    source: RemoteExportBase, version: int, target: OpenDir, manifest: dict[str, Any]
) -> tuple[Optional[str], str]:
    """Download `version` into a hidden temporary in `target`, check its digest, rename it into place.

    The manifest names the version just before the rename: a crash between the two leaves a manifest entry
    without its directory, which the next sync drops and downloads again (never a directory it would not own).
    Returns (digest, "") once it is in place, or (None, why) with nothing left behind.
    """
    recorded = source.info(source.path(version)).get("result", {}).get("digest")
    try:
        with (
            reported_write_failure(
                f"writing mirrored version {target.display(str(version))}", {target.handle: target.path}, ExportError
            ),
            staged_directory(str(version), parent=target) as tmp,  # verifies the target, renames, or removes
        ):
            source.store.download_directory(str(version), tmp)
            digest = saved_model_digest(tmp)
            if recorded is not None and digest != recorded:
                raise _RefusedError(
                    f"{source.path(version)}: its files' digest {digest} differs from the export's record {recorded}"
                )
            manifest["versions"][str(version)] = {"digest": digest}
            _write_manifest(target, manifest)
    except _RefusedError as refused:
        return None, str(refused)
    return digest, ""


class _RefusedError(ExportError):
    """A downloaded version that does not match its record: removed, reported, the sync goes on."""


def _remove_version(target: OpenDir, version: int) -> None:
    """Rename `<target>/<version>` to a hidden temporary (TF Serving sees the version go at once), then delete it."""
    hidden = _temporary_name(str(version))  # a crash here leaves a temporary the next sync removes
    os.rename(str(version), hidden, src_dir_fd=target.fd, dst_dir_fd=target.fd)
    _remove_entry(target.fd, hidden)


def alias_export_versions(client: Any, registered_model_name: str, aliases: Sequence[str], export_base: str) -> dict[str, int]:
    """The export version each alias of a registered model names, read from the version's lineage tags.

    A model version records where its SavedModel was exported (`prefect_tensorflow.export.dir`,
    `.export.version`); an alias that names nothing, or a version exported to another export base, is skipped
    with a logged reason.

    Raises:
        RegistryError: no alias names a version exported to `export_base` (nothing would be kept, so nothing
            is touched).

    Example:
        >>> from prefect_tensorflow.tasks.export.mirror import alias_export_versions
        >>> alias_export_versions.__name__
        'alias_export_versions'
    """
    from mlflow.exceptions import MlflowException

    base = parse_location(export_base, parameter="export_base").uri.rstrip("/")
    log = get_logger()
    found: dict[str, int] = {}
    why: list[str] = []
    for alias in aliases:
        try:
            mv = client.get_model_version_by_alias(registered_model_name, alias)
        except MlflowException as err:
            why.append(f"@{alias}: {getattr(err, 'message', err)}")
            continue
        tags = mv.tags or {}
        export_dir = tags.get(TAG_PREFIX + "export.dir", "")
        number = tags.get(TAG_PREFIX + "export.version", "")
        if not number.isdigit() or export_dir.rstrip("/") != f"{base}/{number}":
            why.append(f"@{alias}: version {mv.version} was exported to {export_dir or 'an unrecorded place'}, not under {base}")
            continue
        found[alias] = int(number)
    for reason in why:
        log.warning("not kept in the mirror: %s", reason)
    if not found:
        raise RegistryError(
            f"no alias of {registered_model_name!r} among {', '.join('@' + a for a in aliases)} names a version "
            f"exported to {base} ({'; '.join(why) or 'no alias given'}); the mirror is left as it is"
        )
    return found
