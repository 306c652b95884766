"""`DataManifest`: the files a window is made of, and the digests that name them.

The digest is a SHA-256 over the dataset's source, the window and each file's
name (relative to the source), size and etag (S3's ETag, a Cloud Storage
generation, a local file's content hash): the listing names the data, so a
manifest costs a listing, not a read. Each split has its own digest (its
files and the rule that splits them), which is what `data.train.digest` and
`data.eval.digest` on a model version mean. Row counts are filled in where
they are known (a loader that read the files, a `_SUCCESS` marker that says).

Example:
    >>> from prefect_tensorflow.tasks.data.manifest import DataManifest, ManifestFile
    >>> m = DataManifest(source="s3://team/iris-daily", files=(ManifestFile(name="dt=2026-11-30/part-0.csv", size=10, etag="e1"),),
    ...                  split_rule="every 5th row is eval")
    >>> len(m.digest), m.digest == m.model_copy().digest, m.split_digest("train") != m.split_digest("eval")
    (64, True, True)
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from .window import DataWindow


class ManifestFile(BaseModel):
    """One file of a window: its name relative to the source, size, etag, and rows when known."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    size: int
    etag: str
    rows: Optional[int] = None
    partition: Optional[str] = Field(default=None, description="The partition it is in (e.g. '2026-11-30')")
    splits: tuple[str, ...] = Field(default=("train", "eval"), description="The splits that read rows of it")


class DataManifest(BaseModel):
    """The files of a window under `source`, and how they split (`split_rule`); see the module docstring."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(description="Where the data is: a prefix URI, or the loader's own name for bundled data")
    window: Optional[DataWindow] = None
    files: tuple[ManifestFile, ...] = ()
    split_rule: str = Field(default="", description="How rows are split into train and eval, as people read it")

    @property
    def digest(self) -> str:
        """SHA-256 of the source, the window and every file's (name, size, etag): what names the data."""
        return _sha256({"source": self.source, "window": self._window(), "files": [_identity(f) for f in self.files]})

    def split_digest(self, split: str) -> str:
        """SHA-256 of the files `split` reads and the split rule."""
        files = [_identity(f) for f in self.files if split in f.splits]
        return _sha256({"source": self.source, "window": self._window(), "split": split, "rule": self.split_rule, "files": files})

    @property
    def rows(self) -> Optional[int]:
        """Total rows, when every file's count is known."""
        counts = [f.rows for f in self.files]
        return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def _window(self) -> Optional[str]:
        return self.window.name if self.window is not None else None


def _identity(f: ManifestFile) -> list[object]:
    return [f.name, f.size, f.etag]


def _sha256(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
