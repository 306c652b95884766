"""Objects under an `s3://bucket/prefix`: read, list, publish a directory atomically, and a lease lock.

Object stores have no rename and no `flock`, so the atomic-publish rules of
`local` are restated here (the methods are those of `backend.StorageBackend`):

- **Publishing a directory** (`publish_directory`): every file is uploaded
  except the ones readers look for (`last`: `saved_model.pb` of a SavedModel
  version, the `checkpoint` state file of a model dir); the uploads are
  checked against a listing (every key there, every size right); only then are
  the `last` files uploaded. A reader that waits for `saved_model.pb` (TF
  Serving) or trusts the state file never sees a partial version. An upload
  cut short leaves parts without their `last` file, which readers skip and
  the next writer cleans up.
- **Mutual exclusion** (`lease`): a lock object created with a conditional
  write (`If-None-Match: *`, so exactly one creator wins), renewed by a
  heartbeat with `If-Match` on its ETag, and taken over with `If-Match` when
  its holder stopped renewing it. That is what makes two processes exporting
  one checkpoint to one remote base end with one version.

boto3 does the I/O; its own configuration applies (`AWS_ACCESS_KEY_ID`, ...,
`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` for an S3-compatible server).

Example:
    >>> from prefect_tensorflow.tasks.storage.locations import parse_location
    >>> from prefect_tensorflow.tasks.storage.stores import object_store
    >>> object_store(parse_location("s3://team/models/iris", parameter="model_dir")).key("checkpoint")
    'models/iris/checkpoint'
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

from ..errors import StorageError
from ..run_context import get_logger
from .backend import ClientCache, ObjectInfo, PreconditionFailedError, StorageBackend
from .locations import Location


class ObjectStore:
    """The objects under one `s3://bucket/prefix` location (keys are named relative to the prefix).

    The S3 `backend.StorageBackend`; `stores.object_store(location)` gives the backend of any scheme.
    """

    def __init__(self, location: Location, client: Any = None):
        if location.scheme != "s3":
            raise StorageError(f"{location}: object storage supports s3:// locations")
        self.location = location
        self.bucket, _, self.prefix = location.path.partition("/")
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = default_client()
        return self._client

    def key(self, *names: str) -> str:
        return "/".join(part.strip("/") for part in (self.prefix, *names) if part.strip("/"))

    def uri(self, *names: str) -> str:
        return f"s3://{self.bucket}/{self.key(*names)}"

    # --- reading ------------------------------------------------------------------------------

    def read_bytes(self, name: str) -> bytes:
        """The object's bytes. Raises FileNotFoundError if there is none."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read()
        except self.client.exceptions.NoSuchKey as err:
            raise FileNotFoundError(self.uri(name)) from err
        except Exception as err:
            raise _translate(err, self.uri(name)) from err

    def read_with_info(self, name: str) -> tuple[bytes, ObjectInfo]:
        """The object's bytes and its size, ETag and time, in one GET. Raises FileNotFoundError if there is none."""
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key(name))
            data = answer["Body"].read()
        except self.client.exceptions.NoSuchKey as err:
            raise FileNotFoundError(self.uri(name)) from err
        except Exception as err:
            raise _translate(err, self.uri(name)) from err
        return data, ObjectInfo(len(data), answer["ETag"].strip('"'), answer["LastModified"].timestamp())

    def head(self, name: str) -> Optional[ObjectInfo]:
        """Size and ETag of one object, or None if it does not exist."""
        try:
            answer = self.client.head_object(Bucket=self.bucket, Key=self.key(name))
        except Exception as err:
            if _status(err) == 404:
                return None
            raise _translate(err, self.uri(name)) from err
        return ObjectInfo(int(answer["ContentLength"]), answer["ETag"].strip('"'), answer["LastModified"].timestamp())

    def listing(self, under: str = "", *, delimiter: bool = False, starting: str = "") -> dict[str, ObjectInfo]:
        """Objects under `<prefix>/<under>`, keyed by name relative to the prefix (one paginated listing).

        With `delimiter`, only the direct children: objects, and "directories" as names ending in '/'.
        With `starting`, only the objects whose name (relative to the prefix) starts with it, e.g.
        `model.ckpt-300.` for one checkpoint's files (listed on the store's side).
        """
        base = self.key(under)
        start = base + "/" if base else ""
        if starting:
            start = self.key() + "/" + starting if self.prefix else starting
        found: dict[str, ObjectInfo] = {}
        cut = len(self.key()) + 1 if self.prefix else 0
        options: dict[str, Any] = {"Bucket": self.bucket, "Prefix": start}
        if delimiter:
            options["Delimiter"] = "/"
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**options):
                for item in page.get("Contents", []):
                    found[item["Key"][cut:]] = ObjectInfo(
                        int(item["Size"]), item["ETag"].strip('"'), item["LastModified"].timestamp()
                    )
                for common in page.get("CommonPrefixes", []):
                    found[common["Prefix"][cut:]] = ObjectInfo(0, "")
        except Exception as err:
            raise _translate(err, self.uri(under)) from err
        return found

    def download_file(self, name: str, local: str) -> None:
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        try:
            self.client.download_file(self.bucket, self.key(name), local)
        except Exception as err:
            raise _translate(err, self.uri(name)) from err

    def download_directory(self, under: str, local_dir: str) -> list[str]:
        """Every object under `under` into `local_dir` (same relative paths); returns the names."""
        names = [n for n in self.listing(under) if not n.endswith("/")]
        for name in names:
            relative = name[len(under.strip("/")) :].lstrip("/") if under else name
            self.download_file(name, os.path.join(local_dir, relative))
        return names

    # --- writing ------------------------------------------------------------------------------

    def put_bytes(self, name: str, data: bytes, *, create_only: bool = False, if_match: Optional[str] = None) -> str:
        """Write one object (atomically: a reader sees the old or the new bytes); returns its ETag.

        Raises:
            FileExistsError: `create_only` and the object exists (`If-None-Match: *`).
            PreconditionFailedError: `if_match` and the object's ETag is another (or it is gone).
        """
        options: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(name), "Body": data}
        if create_only:
            options["IfNoneMatch"] = "*"
        if if_match is not None:
            options["IfMatch"] = f'"{if_match}"'
        try:
            return self.client.put_object(**options)["ETag"].strip('"')
        except Exception as err:
            if _status(err) == 412:
                if create_only:
                    raise FileExistsError(self.uri(name)) from err
                raise PreconditionFailedError(self.uri(name)) from err
            if _status(err) == 404 and if_match is not None:
                raise PreconditionFailedError(self.uri(name)) from err
            raise _translate(err, self.uri(name)) from err

    def upload_file(self, local: str, name: str) -> None:
        try:
            self.client.upload_file(local, self.bucket, self.key(name))
        except Exception as err:
            raise _translate(err, self.uri(name)) from err

    def delete(self, names: Sequence[str]) -> None:
        for start in range(0, len(names), 1000):
            chunk = [{"Key": self.key(n)} for n in names[start : start + 1000]]
            if chunk:
                try:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})
                except Exception as err:
                    raise _translate(err, self.uri()) from err

    def delete_if_match(self, name: str, etag: str) -> bool:
        """Delete one object only if its ETag is still `etag`; False if it changed or is gone."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(name), IfMatch=f'"{etag}"')
            return True
        except Exception as err:
            if _status(err) in (404, 412):
                return False
            raise _translate(err, self.uri(name)) from err

    def publish_directory(self, local_dir: str, under: str, last: Sequence[str] = ()) -> list[str]:
        """Upload `local_dir` to `under/`, the `last` files (relative paths) only after all others are checked.

        Returns:
            The names uploaded, relative to the prefix.

        Raises:
            StorageError: an upload did not land whole (its key missing or of another size): `last` was not uploaded.
        """
        files = []
        for root, _, names in os.walk(local_dir):
            for filename in names:
                relative = os.path.relpath(os.path.join(root, filename), local_dir).replace(os.sep, "/")
                files.append(relative)
        parts = sorted(f for f in files if f not in last)
        for relative in parts:
            self.upload_file(os.path.join(local_dir, relative), f"{under}/{relative}")
        listed = self.listing(under)
        for relative in parts:
            info = listed.get(f"{under}/{relative}" if under else relative)
            expected = os.path.getsize(os.path.join(local_dir, relative))
            if info is None or info.size != expected:
                raise StorageError(
                    f"{self.uri(under, relative)}: uploaded, but the store lists "
                    f"{'nothing' if info is None else f'{info.size} bytes'} where {expected} were written; "
                    f"{', '.join(last) or 'nothing'} was not published"
                )
        for relative in last:
            if relative in files:
                self.upload_file(os.path.join(local_dir, relative), f"{under}/{relative}")
        return [f"{under}/{f}" for f in parts + [f for f in last if f in files]]


_CLIENT_SETTINGS = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


def _make_client() -> Any:
    import boto3

    return boto3.session.Session().client("s3")


_CLIENTS = ClientCache(_CLIENT_SETTINGS, _make_client)


def default_client() -> Any:
    """A boto3 S3 client configured by the environment (boto3's own chain), one per process and setting.

    Making a client costs tens of milliseconds (boto3 loads its service
    model), more than a request to a nearby store: it is made once and
    shared (boto3 clients are thread-safe). A change of the `AWS_*`
    variables that choose the endpoint or the credentials gives a new one.
    """
    return _CLIENTS.get()


def _status(err: BaseException) -> Optional[int]:
    response = getattr(err, "response", None) or {}
    code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code is None and response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
        return 404
    return code


def _translate(err: BaseException, uri: str) -> BaseException:
    """A store error as a `StorageError` naming the URI (a missing bucket, refused credentials...)."""
    if isinstance(err, (FileNotFoundError, StorageError)):
        return err
    code = (getattr(err, "response", None) or {}).get("Error", {}).get("Code", "")
    if code == "NoSuchBucket":
        return StorageError(f"{uri}: the bucket does not exist")
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return StorageError(f"{uri}: access refused ({code}); check the AWS credentials of this worker")
    return StorageError(f"{uri}: {type(err).__name__}: {' '.join(str(err).split())[:300]}")


# --- the lease lock ---------------------------------------------------------------------------


@contextmanager
def lease(
    store: StorageBackend,
    name: str,
    *,
    ttl: float = 60.0,
    wait: float = 1800.0,
    holder: Optional[dict[str, Any]] = None,
    busy: Optional[Callable[[Optional[dict[str, Any]], float], BaseException]] = None,
) -> Iterator[HeldLease]:
    """Hold the lock object `name` of `store` for the block (see the module docstring); yields it (`HeldLease`).

    The holder renews it every `ttl / 3` seconds; another process takes it over
    when it has not been renewed for `ttl` seconds (its holder died or hangs),
    or at once when its holder ran on this machine and its process is gone
    (`process_gone`: a SIGKILLed holder's rerun does not wait out the TTL).
    `holder` (host, pid, run...) is written into the lock object beside its
    owner and expiry, so that a process kept out can name who holds it.

    Raises:
        StorageError: the lock could not be had within `wait` seconds (or what `busy(record, waited)` returns:
            `record` is the holder's lock object, None if it could not be read).
    """
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    deadline = started + wait
    log = get_logger()
    etag: Optional[str] = None

    process = this_process()

    def body_now() -> bytes:
        record = {"owner": owner, "expires": time.time() + ttl, "process": process, **({"holder": holder} if holder else {})}
        return json.dumps(record).encode()

    waiting_logged = False
    while etag is None:
        body = body_now()
        try:
            etag = store.put_bytes(name, body, create_only=True)
            break
        except FileExistsError:
            pass
        try:
            data, info = store.read_with_info(name)
            record, held_etag = json.loads(data), info.etag
        except Exception:  # noqa: BLE001 - released (or unreadable) meanwhile: try to create it again
            record, held_etag = None, None
        expired = record is not None and float(record.get("expires", 0)) < time.time()
        if record is not None and held_etag and (expired or process_gone(record.get("process"))):
            why = "which stopped renewing it" if expired else "whose process on this machine is gone"
            log.warning("%s: taking over the lock of %s, %s", store.uri(name), record.get("owner"), why)
            try:
                etag = store.put_bytes(name, body, if_match=held_etag)
                break
            except PreconditionFailedError:
                pass
        if time.monotonic() >= deadline:
            if busy is not None:
                raise busy(record, time.monotonic() - started)
            raise StorageError(f"{store.uri(name)}: held by {record and record.get('owner')} for longer than {wait:.0f} s")
        if not waiting_logged:
            waiting_logged = True
            log.warning("%s: held by %s; waiting up to %.0f s", store.uri(name), record and record.get("owner"), wait)
        time.sleep(min(0.5, max(deadline - time.monotonic(), 0.01)))
    held = HeldLease(store, name, etag)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl / 3):
            try:
                with held.guard:
                    held.etag = store.put_bytes(name, body_now(), if_match=held.etag)
            except PreconditionFailedError:
                held.lost = True
                return
            except StorageError:
                continue  # a blip: the next heartbeat tries again before the lease runs out

    heartbeat = threading.Thread(target=renew, name=f"lease-{name}", daemon=True)
    heartbeat.start()
    try:
        yield held
        if held.lost:
            raise StorageError(f"{store.uri(name)}: the lock was taken over while held; the work is not trusted")
    finally:
        stop.set()
        heartbeat.join()
        store.delete_if_match(name, held.etag)


class HeldLease:
    """The lease `lease` holds: `check()` before a commit fences off a holder whose lease was taken over."""

    def __init__(self, store: StorageBackend, name: str, etag: str):
        self.store, self.name, self.etag = store, name, etag
        self.lost = False
        self.guard = threading.Lock()  # a heartbeat's renewal and a check do not interleave

    def check(self) -> None:
        """Raise unless the lock object is still the one this holder last wrote (one HEAD request).

        Raises:
            StorageError: it was taken over (its holder hung past the TTL) or deleted: the work done
                since is not trusted and must not be committed.
        """
        with self.guard:
            info = None if self.lost else self.store.head(self.name)
            if info is None or info.etag != self.etag:
                self.lost = True
                try:
                    holder = json.loads(self.store.read_bytes(self.name)).get("owner")
                except Exception:  # noqa: BLE001 - gone, or unreadable: named as unknown
                    holder = None
                raise StorageError(
                    f"{self.store.uri(self.name)}: the lock was taken over by {holder or 'another process'} "
                    "while this one held it (no heartbeat for longer than its TTL); nothing more is committed"
                )


def this_process() -> dict[str, Any]:
    """What identifies this process on this machine, for a lease record: host, boot, pid namespace, pid, start time."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pidns": _pid_namespace(), "pid": pid, "started": _start_ticks(pid)}


def process_gone(process: Any) -> bool:
    """Whether a lease record's process (`this_process()` of its holder) ran here and no longer runs.

    False whenever that cannot be told for sure: another host, boot or pid namespace, no /proc.

    Example:
        >>> process_gone(this_process()), process_gone(None), process_gone({**this_process(), "host": "elsewhere"})
        (False, False, False)
    """
    if not isinstance(process, dict) or process.get("started") is None:
        return False
    here = this_process()
    if any(process.get(key) != here[key] or here[key] is None for key in ("host", "boot", "pidns")):
        return False
    try:
        pid = int(process["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    return _start_ticks(pid) != process["started"]  # gone (None), or the pid now names another process


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _start_ticks(pid: int) -> Optional[int]:
    """The process's start time (clock ticks after boot, /proc/<pid>/stat), None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])
