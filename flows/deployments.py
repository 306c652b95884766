"""The deployments, defined once in `prefect.yaml`, served or deployed from that one definition.

`prefect deploy --all` reads `prefect.yaml` itself; `prefect-tensorflow serve`
(`make serve`) and `deployments/deploy.py` read the same file through
`load_definitions`, apply an environment's overrides
(`deployments/environments/<env>.yaml`: `parameters`, deep-merged so a
nested config states only the keys it changes, and `cron`, `interval`, `paused`,
`tags`, `description` per deployment) and build Prefect deployments from it. A
deployment's `schedules` are cron or interval (seconds) ones; its `triggers`
are `prefect.yaml`'s event triggers (`prefect deploy`'s format), given to
`to_deployment(triggers=...)` so that serving creates their automations too.
The package carries the file (`prefect_tensorflow/flows/prefect.yaml` is the
repository's `prefect.yaml`).

`serve` starts `prefect server start` on 127.0.0.1:4200 when no
`PREFECT_API_URL` is set. It refuses to bind any other address unless
`PREFECT_SERVER_API_AUTH_STRING` is set: anyone who reaches the UI can press
Run.

Example:
    >>> from prefect_tensorflow.flows.deployments import load_definitions
    >>> [d.name for d in load_definitions()]
    ['retrain-iris', 'export-checkpoint', 'sweep-iris', 'rollback-champion', 'sync-exports', 'data-sensor', 'retrain-daily', 'resubmit-crashed']
"""

from __future__ import annotations

import importlib
import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from prefect_tensorflow.tasks.errors import PrefectTensorFlowError
from prefect_tensorflow.tasks.settings import get_settings

from .servers import answers, start_prefect_server, stop_process_group

SERVER_HOST = "127.0.0.1"
SERVER_PORT = 4200
RUNNER_POLL_SECONDS = 2
OVERRIDE_KEYS = {"parameters", "cron", "interval", "paused", "tags", "description"}


class DeploymentError(PrefectTensorFlowError, ValueError):
    """A deployment definition or an environment's overrides are malformed, or serving is unsafe."""


class Schedule(BaseModel):
    """One schedule of a deployment: a `cron` string, or an `interval` in seconds (exactly one).

    Example:
        >>> Schedule(interval=600).build().interval.total_seconds()
        600.0
        >>> Schedule(cron="0 2 * * *").build().cron
        '0 2 * * *'
    """

    model_config = ConfigDict(extra="ignore")

    cron: Optional[str] = None
    interval: Optional[float] = Field(default=None, gt=0, description="Seconds between runs")
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _one_kind(self) -> Schedule:
        if (self.cron is None) == (self.interval is None):
            raise ValueError(f"schedule: expected exactly one of cron or interval, received {self.model_dump(exclude_none=True)}")
        return self

    def build(self) -> Any:
        """The Prefect schedule (`prefect.schedules.Cron` or `Interval`)."""
        from prefect.schedules import Cron, Interval

        if self.cron is not None:
            return Cron(self.cron, timezone=self.timezone)
        assert self.interval is not None
        return Interval(self.interval, timezone=self.timezone)


class DeploymentDefinition(BaseModel):
    """One entry of `prefect.yaml`'s `deployments:` list (the keys serve and deploy use)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    entrypoint: str
    description: str = ""
    tags: list[str] = Field(default_factory=list)
    parameters: dict[str, Any] = Field(default_factory=dict)
    schedules: list[Schedule] = Field(default_factory=list)
    triggers: list[dict[str, Any]] = Field(default_factory=list, description="Event triggers, as `prefect deploy` reads them")
    paused: Optional[bool] = None
    work_pool: dict[str, Any] = Field(default_factory=dict)

    def flow(self) -> Any:
        """The flow object the entrypoint (`module.path:attr`) names."""
        module, _, attr = self.entrypoint.partition(":")
        return getattr(importlib.import_module(module), attr)

    def deployment_triggers(self) -> list[Any]:
        """The `triggers` as Prefect's deployment triggers, named `<deployment>__automation_<n>` as
        `prefect deploy` names them.

        Raises:
            DeploymentError: a trigger Prefect cannot read (naming the deployment and the trigger).
        """
        from prefect.events import DeploymentTriggerTypes

        adapter: TypeAdapter[Any] = TypeAdapter(DeploymentTriggerTypes)
        triggers = []
        for number, spec in enumerate(self.triggers, start=1):
            try:
                triggers.append(adapter.validate_python({"name": f"{self.name}__automation_{number}", **spec}))
            except ValidationError as err:
                raise DeploymentError(f"{self.name}: triggers[{number - 1}]: {err.errors()[0]['msg']}") from err
        return triggers


def prefect_yaml_path() -> str:
    """The `prefect.yaml` shipped with the package (the repository's own, through a link)."""
    return str(resources.files("prefect_tensorflow.flows").joinpath("prefect.yaml"))


def load_definitions(path: Optional[str] = None) -> list[DeploymentDefinition]:
    """The deployments of `prefect.yaml` (default: the package's)."""
    path = path or prefect_yaml_path()
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle) or {}
    return [DeploymentDefinition.model_validate(entry) for entry in config.get("deployments", [])]


def load_overrides(env: Optional[str], directory: str) -> dict[str, dict[str, Any]]:
    """The overrides in `<directory>/<env>.yaml` (none for None), checked: only known deployments and keys.

    Raises:
        DeploymentError: no such environment, an unknown deployment or key.
    """
    if env is None:
        return {}
    path = os.path.join(directory, f"{env}.yaml")
    if not os.path.exists(path):
        choices = sorted(f[:-5] for f in os.listdir(directory) if f.endswith(".yaml"))
        raise DeploymentError(f"--env: expected one of {choices}, received {env!r} (no {path})")
    with open(path, encoding="utf-8") as handle:
        overrides = yaml.safe_load(handle) or {}
    known = [d.name for d in load_definitions()]
    for name, settings in overrides.items():
        if name not in known:
            raise DeploymentError(f"{path}: unknown deployment {name!r}; expected one of {known}")
        unknown = set(settings) - OVERRIDE_KEYS
        if unknown:
            raise DeploymentError(f"{path}: {name}: unknown keys {sorted(unknown)}; expected {sorted(OVERRIDE_KEYS)}")
    return overrides


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` merged in: nested dicts merged key by key, anything else (lists too) replaced.

    Example:
        >>> deep_merge({"training": {"model": "iris", "steps": 10}, "tags": ["a"]}, {"training": {"steps": 20}, "tags": ["b"]})
        {'training': {'model': 'iris', 'steps': 20}, 'tags': ['b']}
    """
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(definitions: list[DeploymentDefinition], overrides: dict[str, dict[str, Any]]) -> list[DeploymentDefinition]:
    """The definitions with an environment's overrides applied: parameters deep-merged (`deep_merge`: an
    override states only the nested keys it changes), the rest replaced."""
    out = []
    for definition in definitions:
        extra = overrides.get(definition.name, {})
        update: dict[str, Any] = {"parameters": deep_merge(definition.parameters, extra.get("parameters") or {})}
        if "cron" in extra:
            update["schedules"] = [Schedule(cron=extra["cron"])] if extra["cron"] else []
        if "interval" in extra:
            update["schedules"] = [Schedule(interval=extra["interval"])] if extra["interval"] else []
        for key in ("paused", "tags", "description"):
            if key in extra:
                update[key] = extra[key]
        out.append(definition.model_copy(update=update))
    return out


def build_deployments(definitions: list[DeploymentDefinition]) -> list:
    """`RunnerDeployment`s of the definitions (module entrypoints: the flows live in the package)."""
    from prefect.deployments.runner import EntrypointType

    return [
        definition.flow().to_deployment(
            name=definition.name,
            description=definition.description,
            tags=definition.tags,
            parameters=definition.parameters,
            schedules=[s.build() for s in definition.schedules],
            triggers=definition.deployment_triggers(),
            paused=definition.paused,
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        for definition in definitions
    ]


def check_bind_address(host: str) -> None:
    """Refuse to start a Prefect server on a non-loopback address without API auth.

    Raises:
        DeploymentError: `host` is not loopback and `PREFECT_SERVER_API_AUTH_STRING` is unset.
    """
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        raise DeploymentError(
            f"--host {host}: a Prefect server reachable beyond this machine lets anyone who reaches it press "
            "Run; set PREFECT_SERVER_API_AUTH_STRING='user:password' (and PREFECT_API_AUTH_STRING for "
            "clients) first, or serve on 127.0.0.1"
        )


@contextmanager
def local_server(host: Optional[str] = None, port: int = SERVER_PORT) -> Iterator[str]:
    """The configured Prefect API, or a `prefect server start` on `host:port` for as long as the block runs.

    Yields the API URL. A server this starts is stopped afterwards; one already
    answering on that address is used as it is.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    host = host or SERVER_HOST
    check_bind_address(host)
    reach = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    api_url = f"http://{reach}:{port}/api"
    process = None
    if not answers(f"{api_url}/health"):
        home = get_settings().home
        os.makedirs(home, exist_ok=True)
        process = start_prefect_server(
            host, port, os.path.join(home, "prefect-server.log"), timeout=get_settings().server_startup_timeout
        )
    os.environ["PREFECT_API_URL"] = api_url  # for the flow-run subprocesses too
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield api_url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        if process is not None:
            stop_process_group(process)


def serve_deployments(
    overrides: Optional[dict[str, dict[str, Any]]] = None, limit: Optional[int] = None, host: Optional[str] = None
) -> None:
    """Start (if needed) a local Prefect server and serve every deployment of `prefect.yaml` until interrupted.

    The runner looks for new runs every 0.5 s (Prefect's default is 10 s: a run
    started with the UI's Run button would wait up to that long), unless
    `PREFECT_RUNNER_POLL_FREQUENCY` is set, and forks `export-checkpoint` runs
    from a template with TensorFlow imported (`warm_runs`, unless
    `PREFECT_TENSORFLOW_WARM_RUNS` is false). It is `prefect.serve` with two
    guards (`unreadable_runs`): the deployments' parameter schemas refuse values
    the API could not return, and a run the API cannot return is failed instead
    of stopping the runner. Its flow runs send a heartbeat every 30 s, and the
    zombie-run automation (`zombie_runs`) marks a run that falls silent Crashed.
    """
    from prefect.settings import PREFECT_RUNNER_POLL_FREQUENCY, temporary_settings

    from prefect_tensorflow.tasks.blocks import MlflowConnection

    from .unreadable_runs import serve

    definitions = apply_overrides(load_definitions(), overrides or {})
    with local_server(host) as api_url, mlflow_webhook_receiver(api_url):
        MlflowConnection.register_type_and_schema()  # so the UI offers the block in the forms
        ui = api_url.removesuffix("/api")
        print(f"Prefect UI: {ui}  (deployments: {', '.join(d.name for d in definitions)})")
        poll = {} if "PREFECT_RUNNER_POLL_FREQUENCY" in os.environ else {PREFECT_RUNNER_POLL_FREQUENCY: RUNNER_POLL_SECONDS}
        with temporary_settings(updates={**poll, **zombie_detection()}):
            serve(build_deployments(definitions), limit=limit, **warm_runner_options(definitions))


def warm_runner_options(definitions: list[DeploymentDefinition]) -> dict[str, Any]:
    """`serve`'s runner options for forking the `warm_runs.WARM_DEPLOYMENTS` runs from a warm template, polling
    every `WARM_POLL_SECONDS` (unless `PREFECT_RUNNER_POLL_FREQUENCY` is set); {} when
    `PREFECT_TENSORFLOW_WARM_RUNS` is false (every run in a new process, Prefect's way).

    Example:
        >>> warm_runner_options(load_definitions())["warm"]
        ('export-checkpoint',)
    """
    from .warm_runs import WARM_DEPLOYMENTS, WARM_POLL_SECONDS, WarmRunner

    if not get_settings().warm_runs:
        return {}
    modules = sorted({d.entrypoint.partition(":")[0] for d in definitions if d.name in WARM_DEPLOYMENTS})
    options: dict[str, Any] = {"runner_class": WarmRunner, "warm": WARM_DEPLOYMENTS, "modules": modules}
    if "PREFECT_RUNNER_POLL_FREQUENCY" not in os.environ:
        options["query_seconds"] = WARM_POLL_SECONDS
    return options


def zombie_detection() -> dict[Any, Any]:
    """Create (or update) the zombie-run automation (`zombie_runs`) on the configured API; the settings
    updates that make the served flow runs send heartbeats that often (none when the environment sets it).

    Raises:
        DeploymentError: `PREFECT_TENSORFLOW_ZOMBIE_AFTER_SECONDS` is not longer than the heartbeat period.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    from .zombie_runs import check_zombie_window, ensure_zombie_automation, heartbeat_seconds

    heartbeat = heartbeat_seconds()
    within = get_settings().zombie_after_seconds
    try:
        check_zombie_window(within, heartbeat)
    except ValueError as err:
        raise DeploymentError(str(err)) from err
    with get_client(sync_client=True) as client:
        ensure_zombie_automation(client, within)
    print(f"Zombie runs: a run silent for {within:g} s (heartbeat every {heartbeat} s) is marked Crashed", flush=True)
    if "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" in os.environ or "PREFECT_RUNNER_HEARTBEAT_FREQUENCY" in os.environ:
        return {}
    return {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: heartbeat}


@contextmanager
def mlflow_webhook_receiver(api_url: str) -> Iterator[Optional[str]]:
    """The MLflow webhook receiver (`mlflow_webhooks`) beside the runner while the block runs, when
    `PREFECT_TENSORFLOW_MLFLOW_WEBHOOK_SECRET` is set; yields its URL (None: not started)."""
    settings = get_settings()
    if settings.mlflow_webhook_secret is None:
        yield None
        return
    from .mlflow_webhooks import WebhookServer

    secret = settings.mlflow_webhook_secret.get_secret_value()
    server = WebhookServer(secret, api_url, settings.mlflow_webhook_host, settings.mlflow_webhook_port).start()
    print(f"MLflow webhooks: {server.url}  (model_version_alias.created -> Prefect events)", flush=True)
    try:
        yield server.url
    finally:
        server.stop()
