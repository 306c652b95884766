"""Objects under a `gs://bucket/prefix`: the Google Cloud Storage `backend.StorageBackend`.

`GcsStore` has `s3.ObjectStore`'s methods with the same meaning (its publish,
listing and lease rules are in `s3`'s docstring; `stores.object_store`
chooses it for `gs://`); what S3 does with
an ETag, Cloud Storage does with the object's *generation* (a number that
changes with every write; here as text, in `ObjectInfo.etag`):

| S3 (`ObjectStore`) | Cloud Storage (`GcsStore`) |
|---|---|
| `If-None-Match: *` (create only) | `ifGenerationMatch=0` |
| `If-Match: <etag>` (replace that version only) | `ifGenerationMatch=<generation>` |
| delete with `If-Match` | delete with `ifGenerationMatch` |
| 412 Precondition Failed | 412 Precondition Failed |

so the lease lock (`s3.lease`) works unchanged: exactly one creator
wins, a heartbeat renews only the generation it wrote, a takeover replaces
only the generation it read.

google-cloud-storage does the I/O, configured as Google's libraries are:
Application Default Credentials (`GOOGLE_APPLICATION_CREDENTIALS`, `gcloud
auth application-default login`, or the metadata server on Google Cloud), or
`STORAGE_EMULATOR_HOST=http://host:port` for an emulator (no credentials
then). No project is needed: only objects in existing buckets are touched.
(google-cloud-storage 3 also reads each bucket's metadata once per process,
in the background, for its tracing; its own
`DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA=true` turns that off.)

Example:
    >>> from prefect_tensorflow.tasks.storage.gcs import GcsStore
    >>> from prefect_tensorflow.tasks.storage.locations import parse_location
    >>> store = GcsStore(parse_location("gs://team/models/iris", parameter="model_dir"))
    >>> store.key("checkpoint"), store.uri("checkpoint")
    ('models/iris/checkpoint', 'gs://team/models/iris/checkpoint')
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Optional

from ..errors import StorageError
from .backend import ClientCache, ObjectInfo, PreconditionFailedError
from .locations import Location
from .s3 import ObjectStore

# Listing pages: Cloud Storage's largest (and default) page, asked for explicitly.
PAGE_SIZE = 1000
_LISTED_FIELDS = "items(name,size,generation,updated),prefixes,nextPageToken"


class GcsStore(ObjectStore):
    """The objects under one `gs://bucket/prefix` location (keys are named relative to the prefix).

    Its I/O is its own; `key`, `download_directory` and `publish_directory` (built on that I/O) are
    `s3.ObjectStore`'s.
    """

    def __init__(self, location: Location, client: Any = None):
        if location.scheme != "gs":
            raise StorageError(f"{location}: GcsStore holds gs:// locations")
        self.location = location
        self.bucket, _, self.prefix = location.path.partition("/")
        self._client = client

    def uri(self, *names: str) -> str:
        return f"gs://{self.bucket}/{self.key(*names)}"

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = default_client()
        return self._client

    def _blob(self, name: str) -> Any:
        return self.client.bucket(self.bucket).blob(self.key(name))

    # --- reading ------------------------------------------------------------------------------

    def read_bytes(self, name: str) -> bytes:
        """The object's bytes. Raises FileNotFoundError if there is none."""
        return self.read_with_info(name)[0]

    def read_with_info(self, name: str) -> tuple[bytes, ObjectInfo]:
        """The object's bytes and its size, generation and time, in one GET. Raises FileNotFoundError if there is none.

        A media download answers no modification time the client hands on; the time is
        Cloud Storage's generation read as the microseconds since the epoch it is (0.0 if
        the number is not one): a time to show, never compared with another.
        """
        try:
            blob = self._blob(name)
            data = blob.download_as_bytes()
        except Exception as err:
            if _status(err) == 404 and not _bucket_missing(err):
                raise FileNotFoundError(self.uri(name)) from err
            raise _translate(err, self.uri(name)) from err
        generation = int(blob.generation or 0)
        return data, ObjectInfo(len(data), str(generation), _generation_time(generation))

    def head(self, name: str) -> Optional[ObjectInfo]:
        """Size and generation of one object, or None if it does not exist."""
        try:
            blob = self.client.bucket(self.bucket).get_blob(self.key(name))
        except Exception as err:
            raise _translate(err, self.uri(name)) from err
        return None if blob is None else _info(blob)

    def listing(self, under: str = "", *, delimiter: bool = False, starting: str = "") -> dict[str, ObjectInfo]:
        """Objects under `<prefix>/<under>`, keyed by name relative to the prefix (one paginated listing).

        With `delimiter`, only the direct children: objects, and "directories" as names ending in '/'.
        With `starting`, only the objects whose name (relative to the prefix) starts with it.
        """
        base = self.key(under)
        start = base + "/" if base else ""
        if starting:
            start = self.key() + "/" + starting if self.prefix else starting
        cut = len(self.key()) + 1 if self.prefix else 0
        found: dict[str, ObjectInfo] = {}
        try:
            pages = self.client.list_blobs(
                self.bucket,
                prefix=start,
                delimiter="/" if delimiter else None,
                page_size=PAGE_SIZE,
                fields=_LISTED_FIELDS,
            ).pages
            for page in pages:
                for blob in page:
                    found[blob.name[cut:]] = _info(blob)
                for common in page.prefixes:
                    found[common[cut:]] = ObjectInfo(0, "")
        except Exception as err:
            raise _translate(err, self.uri(under)) from err
        return found

    def download_file(self, name: str, local: str) -> None:
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        try:
            self._blob(name).download_to_filename(local)
        except Exception as err:
            raise _translate(err, self.uri(name)) from err

    # --- writing ------------------------------------------------------------------------------

    def put_bytes(self, name: str, data: bytes, *, create_only: bool = False, if_match: Optional[str] = None) -> str:
        """Write one object (atomically: a reader sees the old or the new bytes); returns its generation.

        Raises:
            FileExistsError: `create_only` and the object exists (`ifGenerationMatch=0`).
            PreconditionFailedError: `if_match` and the object's generation is another (or it is gone).
        """
        generation: Optional[int] = None
        if create_only:
            generation = 0
        elif if_match is not None:
            if not if_match.isdigit():
                raise PreconditionFailedError(f"{self.uri(name)}: {if_match!r} is not a generation of it")
            generation = int(if_match)
        try:
            blob = self._blob(name)
            blob.upload_from_string(data, content_type="application/octet-stream", if_generation_match=generation)
        except Exception as err:
            if _status(err) == 412:
                if create_only:
                    raise FileExistsError(self.uri(name)) from err
                raise PreconditionFailedError(self.uri(name)) from err
            if _status(err) == 404 and generation and not _bucket_missing(err):
                raise PreconditionFailedError(self.uri(name)) from err
            raise _translate(err, self.uri(name)) from err
        return str(blob.generation)

    def upload_file(self, local: str, name: str) -> None:
        try:
            self._blob(name).upload_from_filename(local, content_type="application/octet-stream")
        except Exception as err:
            raise _translate(err, self.uri(name)) from err

    def delete(self, names: Sequence[str]) -> None:
        """Delete objects (one request each; one already gone is no error)."""
        for name in names:
            try:
                self._blob(name).delete()
            except Exception as err:
                if _status(err) == 404 and not _bucket_missing(err):
                    continue
                raise _translate(err, self.uri(name)) from err

    def delete_if_match(self, name: str, etag: str) -> bool:
        """Delete one object only if its generation is still `etag`; False if it changed or is gone."""
        if not etag.isdigit():
            return False
        try:
            self._blob(name).delete(if_generation_match=int(etag))
            return True
        except Exception as err:
            if _status(err) in (404, 412) and not _bucket_missing(err):
                return False
            raise _translate(err, self.uri(name)) from err


_CLIENT_SETTINGS = (
    "STORAGE_EMULATOR_HOST",
    "API_ENDPOINT_OVERRIDE",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
    "CLOUDSDK_CONFIG",
)


def _make_client() -> Any:
    from google.cloud import storage

    # project=None: no project is looked up (objects need none), so ADC without one works.
    return storage.Client(project=None)


_CLIENTS = ClientCache(_CLIENT_SETTINGS, _make_client)


def default_client() -> Any:
    """A google-cloud-storage client configured by the environment, one per process and setting.

    Application Default Credentials, or none with `STORAGE_EMULATOR_HOST` (the client's own
    rules). Made once and shared by the threads of a process (its HTTP session is); a change
    of the variables that choose the endpoint or the credentials gives a new one.
    """
    return _CLIENTS.get()


def _info(blob: Any) -> ObjectInfo:
    """Size, generation and time of a listed or looked-up object (the time as `read_with_info` gives it)."""
    generation = int(blob.generation or 0)
    modified = _generation_time(generation) or (blob.updated.timestamp() if blob.updated else 0.0)
    return ObjectInfo(int(blob.size or 0), str(generation or ""), modified)


def _generation_time(generation: int) -> float:
    seconds = generation / 1e6
    return seconds if datetime(2000, 1, 1).timestamp() < seconds < datetime(2200, 1, 1).timestamp() else 0.0


def _status(err: BaseException) -> Optional[int]:
    code = getattr(err, "code", None)
    return code if isinstance(code, int) else None


def _bucket_missing(err: BaseException) -> bool:
    return "bucket does not exist" in str(err).lower()


def _translate(err: BaseException, uri: str) -> BaseException:
    """A store error as a `StorageError` naming the URI (a missing bucket, refused or missing credentials...)."""
    if isinstance(err, (FileNotFoundError, StorageError)):
        return err
    status = _status(err)
    if status == 404 and _bucket_missing(err):
        return StorageError(f"{uri}: the bucket does not exist")
    if status in (401, 403):
        return StorageError(
            f"{uri}: access refused ({status}); check the Google credentials of this worker "
            "(Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS or the metadata server)"
        )
    if type(err).__name__ == "DefaultCredentialsError":
        return StorageError(
            f"{uri}: no Google credentials found; set GOOGLE_APPLICATION_CREDENTIALS, run "
            "`gcloud auth application-default login`, or set STORAGE_EMULATOR_HOST for an emulator"
        )
    return StorageError(f"{uri}: {type(err).__name__}: {' '.join(str(err).split())[:300]}")
