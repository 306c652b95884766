"""Where things are: a location is an absolute local path or `<scheme>://<bucket>/<key prefix>`.

`parse_location` accepts exactly the schemes a storage backend exists for
(`schemes.supported_schemes()`: local paths, `s3://`, and `gs://` once its
module is installed): a URI it accepts is one some backend can serve, and a
value that looks like a URI of another scheme (`s3:/bucket` with one slash,
`http://...`, `hdfs://...`) is refused, never turned into a local directory
named `s3:`. How each kind is written atomically lives with its backend
(`local`, `s3`, `gcs`).

Example:
    >>> from prefect_tensorflow.tasks.storage.locations import parse_location
    >>> parse_location("s3://team/models/iris", parameter="model_dir").scheme
    's3'
    >>> parse_location("s3://team/models/iris", parameter="model_dir").join("checkpoint").uri
    's3://team/models/iris/checkpoint'
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..config_checks import short_repr
from ..errors import StorageError
from .schemes import supported_schemes

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(.*)$", re.S)


@dataclass(frozen=True)
class Location:
    """A parsed location: an absolute local path, or `<scheme>://<bucket>/<key prefix>`."""

    uri: str
    scheme: str  # "file", "s3" or "gs"

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def path(self) -> str:
        """The local path, or `bucket/key` as fsspec names an object."""
        return self.uri if self.is_local else self.uri.split("://", 1)[1]

    def join(self, *parts: str) -> Location:
        if self.is_local:
            return Location(os.path.join(self.uri, *parts), "file")
        return Location("/".join([self.uri.rstrip("/"), *(p.strip("/") for p in parts)]), self.scheme)

    @property
    def name(self) -> str:
        return os.path.basename(self.uri.rstrip("/"))

    @property
    def parent(self) -> Location:
        """The location `name` is in."""
        if self.is_local:
            return Location(os.path.dirname(self.uri.rstrip(os.sep)) or os.sep, "file")
        return Location(self.uri.rstrip("/").rsplit("/", 1)[0], self.scheme)

    def __str__(self) -> str:
        return self.uri


def parse_location(value: object, *, parameter: str) -> Location:
    """Parse a local path (relative ones made absolute) or a URI of a scheme a backend exists for (`s3://`, ...).

    Raises:
        StorageError: naming `parameter`: not text, empty, a NUL byte or a lone surrogate, a URI of an
            unsupported scheme or a malformed one (`s3:/bucket`, `s3://`).
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip() or "\x00" in value or len(value) > 4096 or not _encodable(value):
        raise StorageError(f"{parameter}: expected a local path or an s3:// URI, received {short_repr(value)}")
    match = _SCHEME.match(value)
    if match is None:
        return Location(os.path.abspath(value), "file")
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "file":
        if not rest.startswith("//"):
            raise StorageError(f"{parameter}: expected file:///absolute/path, received {short_repr(value)}")
        return Location(os.path.abspath(rest[2:] or "/"), "file")
    remote_schemes = [s for s in supported_schemes() if s != "file"]
    if scheme not in remote_schemes:
        expected = ", ".join(f"{s}://bucket/prefix" for s in remote_schemes)
        raise StorageError(
            f"{parameter}: unsupported scheme {scheme!r}; expected a local path or {expected}, received {short_repr(value)}"
        )
    bucket, _, key = rest[2:].partition("/") if rest.startswith("//") else ("", "", "")
    if not bucket or not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,62}", bucket):
        raise StorageError(f"{parameter}: expected {scheme}://bucket/prefix, received {short_repr(value)}")
    segments = [s for s in key.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise StorageError(f"{parameter}: '.' and '..' are not allowed in an object key, received {short_repr(value)}")
    return Location("/".join([f"{scheme}://{bucket}", *segments]), scheme)


def _encodable(text: str) -> bool:
    """False for text with a lone surrogate (`"\\udcff"`): no file system or object store can name it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def scratch_dir() -> str:
    """`<data home>/scratch`: where object-store writes are staged and downloads unpacked."""
    from ..settings import get_settings

    path = os.path.join(get_settings().home, "scratch")
    os.makedirs(path, exist_ok=True)
    return path
