"""A model dir parsed once: `ModelDir`, a local directory or an object-store prefix, and its storage backend.

A model dir enters as text at the edge (a flow parameter, a CLI argument, a
public task's `model_dir: str`), is parsed there (`ModelDir.parse`) and is
passed down as this object: nothing below asks again whether a string is
remote. It is a small frozen value (a `Location`), so Prefect can pickle and
hash it like a path; its backend (`store()`) is made when asked for.

Example:
    >>> from prefect_tensorflow.tasks.checkpoints.model_dir import ModelDir
    >>> model_dir = ModelDir.parse("s3://team/models/iris")
    >>> model_dir.is_remote, model_dir.checkpoint("model.ckpt-300")
    (True, 's3://team/models/iris/model.ckpt-300')
    >>> ModelDir.of_checkpoint("/models/iris/model.ckpt-300")
    (ModelDir(uri='/models/iris'), 'model.ckpt-300')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

from ..storage.backend import StorageBackend
from ..storage.locations import Location, parse_location
from ..storage.stores import object_store
from .metrics_log import metrics_at, read_metrics
from .remote import fetch_checkpoint_files, remote_metrics


@dataclass(frozen=True)
class ModelDir:
    """Where a model's checkpoints are: a parsed `Location` (see the module docstring)."""

    location: Location

    @classmethod
    def parse(cls, value: Union[str, os.PathLike, ModelDir], *, parameter: str = "model_dir") -> ModelDir:
        """A path or URI parsed (a `ModelDir` is returned as it is).

        Raises:
            StorageError: naming `parameter`: not a path or a URI of a supported scheme.
        """
        if isinstance(value, ModelDir):
            return value
        return cls(parse_location(value, parameter=parameter))

    @classmethod
    def of_checkpoint(cls, prefix: Union[str, os.PathLike], *, parameter: str = "checkpoint") -> tuple[ModelDir, str]:
        """The model dir a checkpoint prefix is in, and the checkpoint's name in it."""
        location = parse_location(prefix, parameter=parameter)
        return cls(location.parent), location.name

    @property
    def uri(self) -> str:
        """The absolute local path, or the `<scheme>://bucket/prefix` URI."""
        return self.location.uri

    @property
    def is_remote(self) -> bool:
        """Whether it is on object storage (TensorFlow cannot read or write it directly)."""
        return not self.location.is_local

    def store(self) -> StorageBackend:
        """Its storage backend, chosen by scheme (`stores.object_store`)."""
        return object_store(self.location)

    def checkpoint(self, name: str) -> str:
        """The prefix of the checkpoint `name` (`model.ckpt-300`) in it."""
        return self.location.join(name).uri

    def local_checkpoint(self, name: str) -> str:
        """A local prefix of checkpoint `name` for TensorFlow: itself, or its files fetched to the local cache.

        Raises:
            InvalidCheckpointError: a remote checkpoint is incomplete on the store.
        """
        return fetch_checkpoint_files(self.store(), name) if self.is_remote else self.checkpoint(name)

    def metrics(self) -> dict[int, dict[str, float]]:
        """The metrics log: step -> {metric: value} (empty if none was written)."""
        return remote_metrics(self.store()) if self.is_remote else read_metrics(self.uri)

    def metrics_at(self, step: Optional[int]) -> dict[str, float]:
        """The metrics recorded at `step` (empty if none)."""
        if step is None:
            return {}
        return self.metrics().get(step, {}) if self.is_remote else metrics_at(self.uri, step)

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"ModelDir(uri={self.uri!r})"
