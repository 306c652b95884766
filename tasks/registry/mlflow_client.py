"""MLflow clients whose server, credentials and HTTP retry policy are their own.

MLflow reads its tracking URI, credentials (`MLFLOW_TRACKING_TOKEN`,
`..._USERNAME`, `..._PASSWORD`) and HTTP retry settings from the environment
and module globals on every request. Setting those during a call (as this
package once did) makes two tasks in two threads talk to each other's
servers. `connection_client(config)` instead gives an `MlflowClient` whose
REST stores and HTTP artifact repository carry the connection's own
`MlflowHostCreds` and retry policy, for an `http(s)://` server; a database URI
(`sqlite:///`, `postgresql://`) gets a plain `MlflowClient` on that URI, which
needs no credentials. Nothing here reads or writes `os.environ` or MLflow's
globals for a request.

It reaches into private MLflow names (listed by `check_private_api`, which a
test runs, so an MLflow upgrade that moves them fails loudly):
`MlflowClient._tracking_client` and `._registry_client_lazy`, both
`RestStore._call_endpoint`s, `TrackingServiceClient._get_artifact_repo`, the
HTTP artifact repository's methods, `MlflowClient._registry_uri` (server or
database store, for `register_logged_model`) and `_guess_mime_type` (each
upload's Content-Type). `CreateModelVersion` is never resent after
a lost answer (it would make a second version); the caller's fingerprint
lookup retries instead.

`log_pyfunc_model` is `mlflow.pyfunc.log_model` through such a client only
(create the logged model, save locally, upload, finalize), and
`register_logged_model` registers it without MLflow's global client.

Artifact locations are MLflow's answers, not the run's parameters: in a
deployment run, a local one (`file:` or a bare path: the client itself would
write or read there) must lie under the roots, or beside the worker's own
SQLite store (`check_artifact_location`); every artifact repository these
clients make, for runs and logged models alike, is checked before use.

Example:
    >>> from prefect_tensorflow.tasks.registry.mlflow_client import check_private_api
    >>> check_private_api()
    []
"""

from __future__ import annotations

import getpass
import inspect
import json
import os
import posixpath
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import requests
from mlflow import MlflowClient
from mlflow.entities import FileInfo
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ENDPOINT_NOT_FOUND, ErrorCode
from mlflow.protos.model_registry_pb2 import CreateModelVersion
from mlflow.store.artifact.artifact_repo import verify_artifact_path
from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository
from mlflow.store.model_registry.rest_store import RestStore as RegistryRestStore
from mlflow.store.tracking.rest_store import RestStore as TrackingRestStore
from mlflow.tracking._model_registry.client import ModelRegistryClient
from mlflow.tracking._tracking_service.client import TrackingServiceClient
from mlflow.utils.file_utils import relative_path_to_artifact_path
from mlflow.utils.mime_type_utils import _guess_mime_type
from mlflow.utils.proto_json_utils import parse_dict
from mlflow.utils.request_utils import augmented_raise_for_status
from mlflow.utils.rest_utils import MlflowHostCreds, RestException, http_request, verify_rest_response
from mlflow.utils.uri import validate_path_is_safe

from .sqlite_store import open_stores
from .unique_races import UniqueRaceRetries

ARTIFACT_SERVICE_PATH = "/api/2.0/mlflow-artifacts/artifacts"
SERVER_INFO_PATH = "/api/3.0/mlflow/server-info"

# Non-idempotent POSTs: a resend after a lost answer creates a second object.
NO_RESEND = frozenset({CreateModelVersion})


@dataclass(frozen=True)
class Connection:
    """What one explicit client knows: where, who, and how HTTP requests are retried."""

    tracking_uri: str
    registry_uri: str
    token: Optional[str] = field(default=None, repr=False)
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    max_retries: int = 3  # urllib3 Retry(total=connect=read=status=max_retries)
    backoff_factor: int = 1  # seconds, doubles each retry
    timeout: int = 30  # per request (connect and read), seconds
    artifact_timeout: int = 600  # per artifact PUT/GET request
    no_resend: frozenset = NO_RESEND

    def host_creds(self, host: str) -> MlflowHostCreds:
        return MlflowHostCreds(host=host, username=self.username, password=self.password, token=self.token)


def connection_client(config: Any) -> MlflowClient:
    """An `MlflowClient` for the `MlflowConfig` `config` alone (see the module docstring)."""
    tracking, registry = config.resolved_tracking_uri(), config.resolved_registry_uri()
    if urlsplit(tracking).scheme not in ("http", "https"):
        return open_stores(lambda: ConfinedMlflowClient(tracking, registry), tracking, registry)
    connection = Connection(
        tracking_uri=tracking,
        registry_uri=registry,
        token=config.resolved_token(),
        username=config.resolved_username(),
        password=config.resolved_password(),
        max_retries=config.request_retries,
        backoff_factor=config.request_backoff_factor,
        timeout=config.request_timeout,
    )
    return ExplicitMlflowClient(connection)


def _request(
    conn: Connection,
    host: str,
    endpoint: str,
    method: str,
    *,
    retries: Optional[int] = None,
    timeout: Optional[int] = None,
    **kwargs,
):
    return http_request(
        conn.host_creds(host),
        endpoint,
        method,
        max_retries=conn.max_retries if retries is None else retries,
        backoff_factor=conn.backoff_factor,
        backoff_jitter=0.0,
        timeout=conn.timeout if timeout is None else timeout,
        respect_retry_after_header=True,
        **kwargs,
    )


def _call(conn, host, endpoint, method, json_body, response_proto, *, retries=None, extra_headers=None):
    """`mlflow.utils.rest_utils.call_endpoint` with the retry policy passed, not read from env."""
    body = json.loads(json_body) if json_body is not None else None
    kwargs = {"params": body} if method == "GET" else {"json": body}
    if extra_headers:
        kwargs["extra_headers"] = extra_headers
    response = _request(conn, host, endpoint, method, retries=retries, **kwargs)
    response = verify_rest_response(response, endpoint)
    if response.status_code == 204:
        return response_proto
    parse_dict(js_dict=json.loads(response.text), message=response_proto)
    return response_proto


class ExplicitTrackingStore(TrackingRestStore):
    def __init__(self, conn: Connection):
        super().__init__(lambda: conn.host_creds(conn.tracking_uri))
        self._conn = conn

    def _call_endpoint(self, api, json_body=None, endpoint=None, retry_timeout_seconds=None, response_proto=None):
        method_to_info = self._V3_METHOD_TO_INFO if api in self._V3_APIS else self._METHOD_TO_INFO
        self._validate_workspace_support_if_specified()
        default_endpoint, method = method_to_info[api]
        return _call(
            self._conn,
            self._conn.tracking_uri,
            endpoint or default_endpoint,
            method,
            json_body,
            response_proto or api.Response(),
            retries=0 if api in self._conn.no_resend else None,
        )


class ExplicitRegistryStore(RegistryRestStore):
    def __init__(self, conn: Connection):
        super().__init__(lambda: conn.host_creds(conn.registry_uri))
        self._conn = conn

    def _call_endpoint(self, api, json_body, call_all_endpoints=False, extra_headers=None):
        self._validate_workspace_support_if_specified()
        retries = 0 if api in self._conn.no_resend else None
        endpoints = self._get_all_endpoints_from_method(api) if call_all_endpoints else [self._get_endpoint_from_method(api)]
        for i, (endpoint, method) in enumerate(endpoints):
            try:
                return _call(
                    self._conn,
                    self._conn.registry_uri,
                    endpoint,
                    method,
                    json_body,
                    self._get_response_from_method(api),
                    retries=retries,
                    extra_headers=extra_headers,
                )
            except RestException as e:
                if e.error_code != ErrorCode.Name(ENDPOINT_NOT_FOUND) or i == len(endpoints) - 1:
                    raise


class ExplicitHttpArtifactRepository(HttpArtifactRepository):
    """Proxied artifacts (`mlflow-artifacts:` resolved against the tracking URI, or http(s)).

    Every HTTP call takes the connection's credentials and retry policy; multipart
    (presigned) transfers, whose helpers read env credentials, are turned off.
    """

    def __init__(self, artifact_uri: str, conn: Connection):
        super().__init__(artifact_uri, tracking_uri=conn.tracking_uri)
        self._conn = conn
        self._capabilities: Optional[dict[str, bool]] = None

    @property
    def _host_creds(self):  # used by inherited helpers, if any
        return self._conn.host_creds(self.artifact_uri)

    def _is_multipart_upload_enabled(self):
        return False

    def _is_multipart_download_enabled(self):
        return False

    def _fetch_server_capabilities(self) -> dict[str, bool]:
        """What the tracking server says its artifact service does (MLflow >= 3.18 asks before some
        transfers), asked with the connection's credentials where MLflow's own reads the environment's;
        {} when the URI is not MLflow's artifact service or the server does not answer."""
        if self._capabilities is None:
            root, separator, _ = self.artifact_uri.partition(ARTIFACT_SERVICE_PATH)
            if not separator:
                self._capabilities = {}
                return self._capabilities
            try:
                response = _request(self._conn, root.rstrip("/"), SERVER_INFO_PATH, "GET")  # the API's timeout, not a transfer's
                answer = response.json() if response.status_code == 200 else {}
            except (MlflowException, requests.RequestException, ValueError):
                return {}  # not kept: the next transfer asks again
            self._capabilities = {key: value for key, value in answer.items() if isinstance(value, bool)}
        return self._capabilities

    def _http(self, host, endpoint, method, **kwargs):
        return _request(self._conn, host, endpoint, method, timeout=self._conn.artifact_timeout, **kwargs)

    def log_artifact(self, local_file, artifact_path=None):
        verify_artifact_path(artifact_path)
        file_name = os.path.basename(local_file)
        paths = (artifact_path, file_name) if artifact_path else (file_name,)
        endpoint = posixpath.join("/", *paths)
        with open(local_file, "rb") as f:
            resp = self._http(
                self.artifact_uri, endpoint, "PUT", data=f, extra_headers={"Content-Type": _guess_mime_type(file_name)}
            )
            augmented_raise_for_status(resp)

    def log_artifacts(self, local_dir, artifact_path=None):
        local_dir = os.path.abspath(local_dir)
        for root, _, filenames in os.walk(local_dir):
            if root == local_dir:
                artifact_dir = artifact_path
            else:
                rel = relative_path_to_artifact_path(os.path.relpath(root, local_dir))
                artifact_dir = posixpath.join(artifact_path, rel) if artifact_path else rel
            for name in filenames:
                self.log_artifact(os.path.join(root, name), artifact_dir)

    def list_artifacts(self, path=None):
        endpoint = "/mlflow-artifacts/artifacts"
        url, tail = self.artifact_uri.split(endpoint, maxsplit=1)
        root = tail.lstrip("/")
        params = {"path": posixpath.join(root, path) if path else root}
        resp = self._http(url, endpoint, "GET", params=params)
        augmented_raise_for_status(resp)
        infos = []
        for f in resp.json().get("files", []):
            p = validate_path_is_safe(f["path"])
            infos.append(
                FileInfo(posixpath.join(path, p) if path else p, f["is_dir"], int(f["file_size"]) if "file_size" in f else None)
            )
        if (
            len(infos) == 1
            and not infos[0].is_dir
            and path is not None
            and infos[0].path == posixpath.join(path, os.path.basename(path))
        ):
            return []
        return sorted(infos, key=lambda f: f.path)

    def _download_file(self, remote_file_path, local_path):
        resp = self._http(self.artifact_uri, posixpath.join("/", remote_file_path), "GET", stream=True)
        augmented_raise_for_status(resp)
        with open(local_path, "wb") as f:
            for chunk in resp.iter_content(chunk_size=1024 * 1024):
                f.write(chunk)

    def delete_artifacts(self, artifact_path=None):
        endpoint = posixpath.join("/", artifact_path) if artifact_path else "/"
        augmented_raise_for_status(self._http(self.artifact_uri, endpoint, "DELETE", stream=True))


def local_artifact_path(location: str) -> Optional[str]:
    """The local path an artifact location names (`file:` URI or bare path), as MLflow reads it; None if remote."""
    parts = urlsplit(location)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return os.path.abspath(url2pathname(unquote(parts.path)))
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return os.path.abspath(location)
    return None


def check_artifact_location(location: str, tracking_uri: str, *, what: str, untrusted: Optional[bool] = None) -> None:
    """In a deployment run, refuse a local artifact location (from an MLflow answer) outside the roots.

    An experiment's artifact location is chosen by whoever created it, and anyone
    with the connection's MLflow identity can create one; a `file:` location makes
    this worker write (and read back) the artifacts on its own disk. Allowed: under
    `PREFECT_TENSORFLOW_ROOTS`, or in the directory of the store's own SQLite
    database (where `MlflowConfig` puts the artifacts). Remote locations
    (`mlflow-artifacts:`, `http(s)`, `s3://`, ...) are the server's business.

    Raises:
        UnsafeParameterError: naming `mlflow`, what the location is for, and the location.

    Example:
        >>> check_artifact_location("file:///etc/cron.d", "http://127.0.0.1:5000", what="run 1f2e", untrusted=True)
        Traceback (most recent call last):
        ...
        prefect_tensorflow.tasks.errors.UnsafeParameterError: mlflow: the MLflow answer for run 1f2e names the local artifact location file:///etc/cron.d, which resolves to /etc/cron.d, outside the allowed roots (...); a deployment run writes and reads local artifacts only there, received 'file:///etc/cron.d'
    """
    from ..errors import UnsafeParameterError
    from ..run_context import in_deployment_run

    if not (untrusted if untrusted is not None else in_deployment_run()):
        return
    path = local_artifact_path(location)
    if path is None:
        return
    from ..security import confine
    from ..settings import get_settings
    from .store_uri import local_store_path

    allowed = get_settings().allowed_roots()
    try:
        store = local_store_path(tracking_uri)
    except Exception:  # noqa: BLE001 - an unreadable store URI adds no allowed directory
        store = None
    if store is not None and urlsplit(tracking_uri).scheme.lower().startswith("sqlite"):
        allowed.append(os.path.dirname(store))
    try:
        confine(path, parameter="mlflow", untrusted=True, roots=allowed)
    except ValueError as err:
        detail = str(err).removeprefix("mlflow: ").rsplit(", received ", 1)[0]
        raise UnsafeParameterError(
            "mlflow",
            location,
            f"the MLflow answer for {what} names the local artifact location {location}, which {detail}; "
            "a deployment run writes and reads local artifacts only there",
        ) from None


def artifact_repository(conn: Connection, location: str, *, what: str = "an artifact location"):
    """The artifact repository for `location` (a run's or logged model's artifact URI), checked when local."""
    check_artifact_location(location, conn.tracking_uri, what=what)
    scheme = urlsplit(location).scheme
    if scheme == "mlflow-artifacts":
        return ExplicitHttpArtifactRepository(MlflowArtifactsRepository.resolve_uri(location, conn.tracking_uri), conn)
    if scheme in ("http", "https"):
        return ExplicitHttpArtifactRepository(location, conn)
    # s3://, gs://, file: ... take their credentials from their own libraries (boto3's chain,
    # MLFLOW_S3_ENDPOINT_URL), read, never written; none of them is MLflow's HTTP client.
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(location, tracking_uri=conn.tracking_uri)


class _ExplicitTrackingServiceClient(TrackingServiceClient):
    def __init__(self, conn: Connection):
        # Not calling super().__init__: it only sets tracking_uri and touches the global store registry.
        self.tracking_uri = conn.tracking_uri
        self._conn = conn
        self._store = ExplicitTrackingStore(conn)
        self._repos: dict = {}

    @property
    def store(self):
        return self._store

    def _get_artifact_repo(self, resource_id, *, resource="run"):
        key = (resource, resource_id)
        repo = self._repos.get(key)
        if repo is None:
            if resource == "run":
                location = self.get_run(resource_id).info.artifact_uri
            elif resource == "logged_model":
                location = self.get_logged_model(resource_id).artifact_location
            else:
                raise ValueError(f"Unexpected resource type {resource!r}.")
            repo = self._repos[key] = artifact_repository(self._conn, location, what=f"{resource} {resource_id}")
        return repo

    def list_artifacts(self, run_id, path=None):
        return self._get_artifact_repo(run_id).list_artifacts(path)

    def download_artifacts(self, run_id, path, dst_path=None):
        if dst_path is not None:
            os.makedirs(dst_path, exist_ok=True)
        return self._get_artifact_repo(run_id).download_artifacts(path, dst_path)


class _ConfinedTrackingServiceClient(TrackingServiceClient):
    """MLflow's own tracking client (database stores), its artifact locations checked (`check_artifact_location`)."""

    def _get_artifact_repo(self, resource_id, *, resource="run"):
        repo = super()._get_artifact_repo(resource_id, resource=resource)
        check_artifact_location(repo.artifact_uri, self.tracking_uri, what=f"{resource} {resource_id}")
        return repo


class ConfinedMlflowClient(UniqueRaceRetries, MlflowClient):
    """A plain `MlflowClient` (database store URIs) whose artifact repositories are checked before use; its tag
    and alias setters retry a lost unique-key race (`unique_races`)."""

    def __init__(self, tracking_uri: str, registry_uri: str):
        super().__init__(tracking_uri, registry_uri)
        self._tracking_client = _ConfinedTrackingServiceClient(self._tracking_client.tracking_uri)


class _ExplicitModelRegistryClient(ModelRegistryClient):
    def __init__(self, conn: Connection):
        self.registry_uri = conn.registry_uri
        self.tracking_uri = conn.tracking_uri
        self._store = ExplicitRegistryStore(conn)

    @property
    def store(self):
        return self._store


class ExplicitMlflowClient(UniqueRaceRetries, MlflowClient):
    """An `MlflowClient` on the connection's server with its own credentials; tag and alias setters as `ConfinedMlflowClient`'s."""

    def __init__(self, conn: Connection):
        super().__init__(tracking_uri=conn.tracking_uri, registry_uri=conn.registry_uri)
        self.connection = conn
        # Database / file URIs (the embedded SQLite default) carry no HTTP credentials: MLflow's
        # own stores (cached per URI by the store registry) are already explicit enough.
        if urlsplit(conn.tracking_uri).scheme in ("http", "https"):
            self._tracking_client = _ExplicitTrackingServiceClient(conn)
        if urlsplit(conn.registry_uri).scheme in ("http", "https"):
            self._registry_client_lazy = _ExplicitModelRegistryClient(conn)

    # list_artifacts / download_artifacts: MlflowClient delegates them to _tracking_client,
    # whose overrides above route them through our repositories (TrackingServiceClient's own
    # versions go through mlflow.artifacts.* -> the global store registry -> env credentials).
    def download_logged_model(self, model_id: str, dst_path: str) -> str:
        repo = self._tracking_client._get_artifact_repo(model_id, resource="logged_model")
        os.makedirs(dst_path, exist_ok=True)
        return repo.download_artifacts("", dst_path=dst_path)

    def download_model_version(self, name: str, version: str, dst_path: str) -> str:
        mv = self.get_model_version(name, version)
        if mv.model_id:
            return self.download_logged_model(mv.model_id, dst_path)
        location = self.get_model_version_download_uri(name, version)
        repo = artifact_repository(self.connection, location, what=f"model version {name} {version}")
        os.makedirs(dst_path, exist_ok=True)
        return repo.download_artifacts("", dst_path=dst_path)


def check_private_api() -> list[str]:
    """Names this module relies on that are not public MLflow API; empty list when all present."""
    problems = []
    for cls, names in (
        (
            TrackingRestStore,
            ["_call_endpoint", "_METHOD_TO_INFO", "_V3_METHOD_TO_INFO", "_V3_APIS", "_validate_workspace_support_if_specified"],
        ),
        (
            RegistryRestStore,
            ["_call_endpoint", "_get_endpoint_from_method", "_get_all_endpoints_from_method", "_get_response_from_method"],
        ),
        (TrackingServiceClient, ["_get_artifact_repo", "store"]),
        (ModelRegistryClient, ["store"]),
        (HttpArtifactRepository, ["log_artifact", "list_artifacts", "_download_file", "delete_artifacts"]),
    ):
        problems += [f"{cls.__module__}.{cls.__name__}.{n}" for n in names if not hasattr(cls, n)]
    sig = list(inspect.signature(TrackingRestStore._call_endpoint).parameters)
    if sig != ["self", "api", "json_body", "endpoint", "retry_timeout_seconds", "response_proto"]:
        problems.append(f"tracking RestStore._call_endpoint signature changed: {sig}")
    sig = list(inspect.signature(RegistryRestStore._call_endpoint).parameters)
    if sig != ["self", "api", "json_body", "call_all_endpoints", "extra_headers"]:
        problems.append(f"registry RestStore._call_endpoint signature changed: {sig}")
    if "_registry_client_lazy" not in inspect.getsource(MlflowClient._get_registry_client):
        problems.append("MlflowClient._get_registry_client no longer caches in _registry_client_lazy")
    if "self._tracking_client" not in inspect.getsource(MlflowClient.create_run):
        problems.append("MlflowClient no longer delegates to _tracking_client")
    if "self._registry_uri =" not in inspect.getsource(MlflowClient.__init__):  # read by register_logged_model
        problems.append("MlflowClient no longer keeps its registry URI in _registry_uri")
    sig = list(inspect.signature(_guess_mime_type).parameters)
    if sig != ["file_path"] or not isinstance(_guess_mime_type("saved_model.pb"), str):  # the uploads' Content-Type
        problems.append(f"mlflow.utils.mime_type_utils._guess_mime_type changed: parameters {sig}")
    # Any new direct use of env credentials in the HTTP artifact repository?
    src = inspect.getsource(HttpArtifactRepository)
    overridden = {
        "log_artifact",
        "list_artifacts",
        "_download_file",
        "delete_artifacts",
        "_host_creds",
        "_fetch_server_capabilities",
    }
    for m in re.finditer(r"\n    def (\w+)\(.*?(?=\n    def |\n    @|\Z)", src, re.S):
        if "get_default_host_creds" in m.group(0) and m.group(1) not in overridden | {
            "_get_presigned_download_url",
            "create_multipart_upload",
            "complete_multipart_upload",
            "abort_multipart_upload",
        }:
            problems.append(f"HttpArtifactRepository.{m.group(1)} reads env credentials")
    return problems


def log_pyfunc_model(
    client: MlflowClient,
    run_id: str,
    *,
    name: str = "model",
    tags: Optional[dict] = None,
    params: Optional[dict] = None,
    step: int = 0,
    context_tags: bool = True,
    **save_kwargs,
):
    """`mlflow.pyfunc.log_model(name=..., **save_kwargs)` in run `run_id`, through `client` only.

    Mirrors mlflow.models.Model.log (models/model.py:1065-1400 in 3.17.2): create a PENDING
    LoggedModel, link it as a run output, save locally with an MLmodel carrying the model id,
    upload, finalize READY (FAILED on error). Returns (ModelInfo, LoggedModel).
    """
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model
    from mlflow.tracking.context import registry as context_registry

    run = client.get_run(run_id)
    model_tags = {k: str(v) for k, v in (tags or {}).items()}
    if context_tags:  # what the fluent path adds: mlflow.user, mlflow.source.name/type/git.commit
        # DefaultRunContext takes mlflow.user from MLFLOW_TRACKING_USERNAME / ~/.mlflow/credentials
        # (tracking/context/default_context.py:45): pin it to this connection's user instead.
        conn = getattr(client, "connection", None)
        model_tags.setdefault("mlflow.user", (conn and conn.username) or getpass.getuser())
        model_tags = context_registry.resolve_tags(model_tags)
    model = client.create_logged_model(
        experiment_id=run.info.experiment_id,
        name=name,
        source_run_id=run_id,
        tags=model_tags,
        params={**{k: str(v) for k, v in (params or {}).items()}, **run.data.params},
    )
    try:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
        with tempfile.TemporaryDirectory(prefix="explicit-log-model-") as tmp:
            local = os.path.join(tmp, "model")
            mlflow_model = Model(
                artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id, model_id=model.model_id
            )
            mlflow.pyfunc.save_model(path=local, mlflow_model=mlflow_model, **save_kwargs)
            for pycache in Path(local).rglob("__pycache__"):
                shutil.rmtree(pycache, ignore_errors=True)
            client.log_model_artifacts(model.model_id, local)
    except BaseException:
        try:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise
    model = client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return mlflow_model.get_model_info(model), model


def register_logged_model(
    client,
    name: str,
    logged_model,
    run_id: str,
    tags: Optional[dict] = None,
    await_creation_for: int = 0,
    description: Optional[str] = None,
):
    """create_model_version for a LoggedModel, without anything global.

    Against a server: source `models:/<model_id>` (the server resolves it, and tags the logged
    model with mlflow.modelVersions). Against an in-process database store, SqlAlchemyStore
    resolves `models:/<id>` with `MlflowClient()` on the *global* tracking URI
    (store/model_registry/sqlalchemy_store.py:1018-1040, MLflow's own TODO), so pass the
    artifact location and the run id instead.
    """
    registry_uri = getattr(client, "_registry_uri", "") or ""
    if urlsplit(registry_uri).scheme in ("http", "https"):
        source = f"models:/{logged_model.model_id}"
    else:
        source = logged_model.artifact_location
    return client.create_model_version(
        name,
        source,
        run_id=run_id,
        tags=tags,
        model_id=logged_model.model_id,
        await_creation_for=await_creation_for,
        description=description,
    )


def download_logged_model(client: MlflowClient, model_id: str, dst_path: str) -> str:
    """Download a logged model's files through `client` (its own credentials for a server)."""
    if isinstance(client, ExplicitMlflowClient):
        return client.download_logged_model(model_id, dst_path)
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    location = client.get_logged_model(model_id).artifact_location
    check_artifact_location(location, client._tracking_client.tracking_uri, what=f"logged model {model_id}")
    os.makedirs(dst_path, exist_ok=True)
    return get_artifact_repository(location).download_artifacts("", dst_path=dst_path)
