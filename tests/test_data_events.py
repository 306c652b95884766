"""Runs that start when data arrives, and MLflow registry webhooks, against real servers.

One `prefect server start` for the module (SQLite), with prefect.yaml's
`retrain-daily` and `sync-exports` deployments applied from their one
definition (`flows/deployments.py`), triggers and all, but no runner: a run the
trigger starts stays Scheduled, and its parameters are read back from the API.
The data sensor flow (`watch_data`) runs in this process against that server,
on daily partitions under an `s3://` prefix of the session's moto server. The
webhook tests add a real `mlflow server` (SQLite store) whose registry webhook
posts to the receiver (`flows/mlflow_webhooks.py`) running in a thread here.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta, timezone
from typing import Any

import pytest

from prefect_tensorflow.flows.servers import free_port, start_prefect_server
from prefect_tensorflow.tasks.child_processes import stop_process_group

TODAY = datetime.now(timezone.utc).date()
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
SECRET = "webhook-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[str]:
    """A real Prefect server with retrain-daily and sync-exports applied (their automations too); its API URL."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from prefect_tensorflow.flows.deployments import build_deployments, load_definitions

    root = tmp_path_factory.mktemp("data-events")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    server = start_prefect_server("127.0.0.1", port, str(root / "prefect-server.log"), env=environ)
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            definitions = [d for d in load_definitions() if d.name in ("retrain-daily", "sync-exports")]
            for deployment in build_deployments(definitions):
                deployment.apply()
        yield api_url
    finally:
        stop_process_group(server)


@pytest.fixture
def api(prefect_server, monkeypatch, tmp_path) -> Iterator[Any]:
    """A sync client on the module's server; this process's flows and events go there, its data home is the test's."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", prefect_server)  # the events worker's thread reads the environment
    monkeypatch.setenv("PREFECT_TENSORFLOW_HOME", str(tmp_path / "home"))
    EventsWorker.drain_all(timeout=30)  # a worker of an earlier test talks to another server
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), SyncPrefectClient(prefect_server) as client:
        yield client
    EventsWorker.drain_all(timeout=30)


# --- helpers ---------------------------------------------------------------------------------------


def write_partition(prefix: str, day: date, complete: bool = True, rows: int = 10) -> None:
    """One daily partition of iris-like rows under `prefix` (its `_SUCCESS` last, when complete)."""
    from prefect_tensorflow.tasks.storage.locations import parse_location
    from prefect_tensorflow.tasks.storage.stores import object_store

    store = object_store(parse_location(prefix, parameter="prefix"))
    lines = ["sepal_length,sepal_width,petal_length,petal_width,species,site"]
    lines += [
        f"5.{i % 10},3.{i % 7},1.{i % 5},0.{i % 3},{('setosa', 'versicolor', 'virginica')[i % 3]},north" for i in range(rows)
    ]
    store.put_bytes(f"dt={day}/part-0.csv", ("\n".join(lines) + "\n").encode())
    if complete:
        store.put_bytes(f"dt={day}/_SUCCESS", b"")


def deployment_id(client: Any, name: str) -> Any:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    (deployment,) = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
    return deployment.id


def runs_of(client: Any, deployment: str) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    found = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id(client, deployment)]))
    )
    return sorted(found, key=lambda run: run.created)


def window_runs(client: Any, days: list[date]) -> dict[str, list[Any]]:
    """retrain-daily's runs whose window starts on one of `days`, by start day."""
    by_day: dict[str, list[Any]] = {str(day): [] for day in days}
    for run in runs_of(client, "retrain-daily"):
        start = (run.parameters.get("window") or {}).get("start")
        if start in by_day:
            by_day[start].append(run)
    return by_day


def wait_for(check: Callable[[], Any], timeout: float = 90, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not after {timeout:.0f} s: {what}")
        time.sleep(0.5)


def sensor(prefix: str, **parameters: Any) -> Any:
    from prefect_tensorflow.flows.data_sensor import watch_data

    return watch_data(data_options={"prefix": prefix}, **parameters)


# --- the sensor's decisions and memory, without a server -------------------------------------------


def _listing(days: dict[date, bool], etag: str = "e") -> dict[str, Any]:
    from prefect_tensorflow.tasks.storage.backend import ObjectInfo

    listing = {f"dt={day}/part-0.csv": ObjectInfo(10, f"{etag}-{day}") for day in days}
    listing.update({f"dt={day}/_SUCCESS": ObjectInfo(0, "s") for day, complete in days.items() if complete})
    return listing


def test_the_sensor_catches_up_oldest_first_within_its_horizon_and_announces_changed_data_again():
    from prefect_tensorflow.tasks.data.partition_listing import partitions_of
    from prefect_tensorflow.tasks.data.partitioned_options import PartitionedFiles
    from prefect_tensorflow.tasks.data.sensor import SensorMemory, decide_windows

    options, today = PartitionedFiles(prefix="/data"), date(2026, 12, 10)
    day = [date(2026, 12, 1) + timedelta(days=n) for n in range(9)]  # 12-01 .. 12-09

    def decide(listing: dict[str, Any], memory: SensorMemory, **kw: Any) -> list[Any]:
        return decide_windows(partitions_of(listing, ".csv"), options, "/data", memory, today=today, **kw)

    first = decide(_listing({day[0]: True, day[1]: True}), SensorMemory())
    assert [d.action for d in first] == ["before start", "announce"]
    memory = SensorMemory().remember(first, today)
    assert memory.since == day[2] and len(memory.announced) == 1
    # down for five days, one of them still being written
    listing = _listing({d: d != day[5] for d in day[:8]})
    later = decide(listing, memory)
    assert [(d.window.start, d.action) for d in later] == [
        (day[1], "same digest"),
        (day[2], "announce"),
        (day[3], "announce"),
        (day[4], "announce"),
        (day[5], "incomplete"),
        (day[6], "announce"),
        (day[7], "announce"),
    ]
    memory = memory.remember(later, today)
    assert {d.action for d in decide(listing, memory)} == {"same digest", "incomplete"}
    # a partition rewritten: a new digest for its window, announced again; the others are not
    rewritten = dict(listing)
    rewritten[f"dt={day[3]}/part-0.csv"] = type(listing[f"dt={day[3]}/part-0.csv"])(11, "rewritten")
    again = [(d.window.start, d.action) for d in decide(rewritten, memory) if d.action == "announce"]
    assert again == [(day[3], "announce")]
    # two-day windows end on each complete day; a short horizon leaves the older ones out
    two = decide(listing, memory, days=2, catch_up_days=3)
    assert [(d.window.start, d.window.end, d.action) for d in two] == [
        (day[5], day[7], "incomplete"),  # 12-06 is still being written
        (day[6], day[8], "announce"),
    ]
    # what falls past the horizon is forgotten
    assert all(a.end > today - timedelta(days=3) for a in memory.remember([], today, catch_up_days=3).announced)


def test_the_sensor_memory_is_written_only_over_the_version_it_read(tmp_path):
    from prefect_tensorflow.flows.data_sensor import read_memory, write_memory
    from prefect_tensorflow.tasks.data.sensor import SensorMemory
    from prefect_tensorflow.tasks.errors import DataError
    from prefect_tensorflow.tasks.storage.backend import PreconditionFailedError
    from prefect_tensorflow.tasks.storage.locations import parse_location
    from prefect_tensorflow.tasks.storage.stores import object_store

    store = object_store(parse_location(str(tmp_path), parameter="sensor memory"))
    memory, etag = read_memory(store, "m.json")
    assert memory == SensorMemory() and etag is None
    write_memory(store, "m.json", SensorMemory(since=date(2026, 12, 1)), None)
    with pytest.raises(FileExistsError):  # another pass created it first
        write_memory(store, "m.json", SensorMemory(since=date(2026, 12, 2)), None)
    memory, etag = read_memory(store, "m.json")
    assert memory.since == date(2026, 12, 1)
    write_memory(store, "m.json", SensorMemory(since=date(2026, 12, 3)), etag)
    with pytest.raises(PreconditionFailedError):  # written since this pass read it
        write_memory(store, "m.json", SensorMemory(since=date(2026, 12, 4)), etag)
    assert read_memory(store, "m.json")[0].since == date(2026, 12, 3)
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(DataError, match="m.json"):
        read_memory(store, "m.json")


def test_serve_runs_the_webhook_receiver_only_with_a_secret(monkeypatch):
    from prefect_tensorflow.flows.deployments import mlflow_webhook_receiver
    from prefect_tensorflow.flows.mlflow_webhooks import signed_headers

    monkeypatch.delenv("PREFECT_TENSORFLOW_MLFLOW_WEBHOOK_SECRET", raising=False)
    with mlflow_webhook_receiver("http://127.0.0.1:9/api") as url:
        assert url is None
    port = free_port()
    monkeypatch.setenv("PREFECT_TENSORFLOW_MLFLOW_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("PREFECT_TENSORFLOW_MLFLOW_WEBHOOK_PORT", str(port))
    body = b'{"entity": "registered_model", "action": "created", "data": {}}'
    with mlflow_webhook_receiver("http://127.0.0.1:9/api") as url:
        assert url == f"http://127.0.0.1:{port}/mlflow/webhooks"
        assert _post(url, signed_headers("wrong", "d-1", int(time.time()), body), body) == 401
        assert _post(url, signed_headers(SECRET, "d-2", int(time.time()), body), body) == 200  # an event it ignores
    with pytest.raises(OSError):
        _post(url, signed_headers(SECRET, "d-3", int(time.time()), body), body)


def test_prefect_yaml_reads_the_synthetic_iris_daily_data_and_maps_the_event_to_the_window():
    from prefect_tensorflow.flows.deployments import load_definitions
    from prefect_tensorflow.tasks.data.sensor import WINDOW_CLOSED
    from prefect_tensorflow.tasks.data.synthetic import IRIS_DAILY_OPTIONS

    definitions = {d.name: d for d in load_definitions()}
    sensor_, daily = definitions["data-sensor"], definitions["retrain-daily"]
    assert sensor_.parameters["data_options"] == IRIS_DAILY_OPTIONS == daily.parameters["training"]["data_options"]
    assert [s.interval for s in sensor_.schedules] == [600]
    (trigger,) = daily.deployment_triggers()
    assert (
        trigger.expect == {WINDOW_CLOSED}
        and trigger.match.model_dump()["prefect.resource.id"] == "prefect-tensorflow.dataset.iris-daily"
    )
    assert trigger.parameters == {
        "window": {"start": "{{ event.payload.window.start }}", "end": "{{ event.payload.window.end }}"}
    }
    (sync,) = definitions["sync-exports"].deployment_triggers()
    assert sync.expect == {"mlflow.model_version_alias.created"} and sync.match.model_dump()["mlflow.alias"] == "champion"


# --- the data sensor -------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_new_partition_starts_one_retrain_run_with_its_window_and_a_replay_starts_none(api, s3, tmp_path):
    from prefect_tensorflow.flows.mlflow_webhooks import send_event
    from prefect_tensorflow.tasks.data.window import DataWindow

    prefix = s3.uri("iris-daily")
    day, next_day = TODAY - timedelta(days=2), TODAY - timedelta(days=1)
    write_partition(prefix, day)
    write_partition(prefix, next_day, complete=False)  # still being written

    first = sensor(prefix)
    assert first.announced == [f"{day}_{next_day}"]
    assert [(d["window"], d["decision"]) for d in first.decisions] == [
        (f"[{day}, {next_day})", "announce"),
        (f"[{next_day}, {TODAY})", "incomplete"),
    ]
    wait_for(lambda: window_runs(api, [day])[str(day)], what="a retrain-daily run for the new window")
    time.sleep(3)  # a second run would be created within this
    (run,) = window_runs(api, [day])[str(day)]
    assert run.parameters["window"] == {"start": str(day), "end": str(next_day)}
    assert DataWindow.model_validate(run.parameters["window"]).name == f"{day}_{next_day}"
    assert run.parameters["training"]["data"] == "partitioned" and run.state.is_scheduled()

    # The same event sent again (read back from the server, re-sent as it is): no second run.
    (event,) = wait_for(lambda: events_for(api, first), what="the sensor's event on the server")
    assert str(event.id) == first.decisions[0]["event_id"] and event.payload["digest"] == first.decisions[0]["digest"]
    send_event(os.environ["PREFECT_API_URL"], event.model_dump(exclude={"received"}))
    # A second pass: the same digest, nothing announced.
    second = sensor(prefix)
    assert second.announced == []
    assert [d["decision"] for d in second.decisions] == ["same digest", "incomplete"]
    # The partition being written completes: that window is announced, and its run shows the trigger
    # went through the replay before it.
    write_partition(prefix, next_day)
    third = sensor(prefix)
    assert third.announced == [f"{next_day}_{TODAY}"]
    wait_for(lambda: window_runs(api, [next_day])[str(next_day)], what="the run of the completed partition")
    # The sensor's memory lost: its next pass announces the newest window again, the same event (id).
    (memory_file,) = (tmp_path / "home" / "sensors").glob("*.json")
    memory_file.unlink()
    fourth = sensor(prefix)
    assert fourth.announced == third.announced and fourth.decisions[-1]["event_id"] == third.decisions[-1]["event_id"]
    time.sleep(5)
    by_day = window_runs(api, [day, next_day])
    assert [len(by_day[str(day)]), len(by_day[str(next_day)])] == [1, 1]


def events_for(client: Any, report: Any) -> list[Any]:
    """The window-closed events the sensor emitted in `report` (their ids are the decisions')."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    since = datetime.now(timezone.utc) - timedelta(hours=2)
    page = client.read_events(
        filter=EventFilter(
            event=EventNameFilter(name=["prefect-tensorflow.data.window.closed"]), occurred=EventOccurredFilter(since=since)
        ),
        limit=50,
    )
    return [
        e
        for e in page.events
        if e.payload.get("prefix") == report.prefix
        and f"{e.payload['window']['start']}_{e.payload['window']['end']}" in report.announced
    ]


@pytest.mark.slow
def test_a_sensor_down_for_three_days_catches_up_oldest_first(api, s3):
    prefix = s3.uri("daily")
    days = [TODAY - timedelta(days=n) for n in (14, 13, 12, 11)]
    write_partition(prefix, days[0])
    assert sensor(prefix).announced == [f"{days[0]}_{days[1]}"]
    for day in days[1:]:
        write_partition(prefix, day)

    caught_up = sensor(prefix)

    expected = [f"{day}_{day + timedelta(days=1)}" for day in days[1:]]
    assert caught_up.announced == expected
    assert [d["decision"] for d in caught_up.decisions] == ["same digest", "announce", "announce", "announce"]
    events = wait_for(lambda: len(events_for(api, caught_up)) == 3 and events_for(api, caught_up), what="three events")
    assert sorted(events, key=lambda e: e.occurred) == sorted(events, key=lambda e: e.payload["window"]["start"])
    by_day = wait_for(lambda: (found := window_runs(api, days)) and all(found.values()) and found, what="four runs")
    assert [len(runs) for runs in by_day.values()] == [1, 1, 1, 1]
    assert sensor(prefix).announced == []


# --- MLflow registry webhooks ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_webhooks(prefect_server, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A real `mlflow server` (SQLite) whose registry webhook posts to a receiver in this process.

    MLflow refuses webhook URLs on private addresses and http:// unless told (its settings for local
    development); the secret is stored encrypted with MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY.
    """
    from cryptography.fernet import Fernet
    from mlflow import MlflowClient
    from mlflow_server import MlflowServer

    from prefect_tensorflow.flows.mlflow_webhooks import WebhookServer, send_event

    deliveries: list[tuple[dict[str, str], bytes]] = []
    sent: list[dict[str, Any]] = []

    def record(api_url: str, event: dict[str, Any]) -> None:
        send_event(api_url, event)
        sent.append(event)

    receiver = WebhookServer(SECRET, prefect_server, "127.0.0.1", 0, send=record)
    handle = receiver.handle

    def handle_and_keep(path: str, headers: Any, body: bytes) -> tuple[int, str]:
        deliveries.append((dict(headers), body))
        return handle(path, headers, body)

    receiver.handle = handle_and_keep  # type: ignore[method-assign]
    receiver.start()
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-webhooks"))
    server.env.update(
        {
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
            "MLFLOW_WEBHOOK_CACHE_TTL": "0",
        }
    )
    server.start()
    try:
        client = MlflowClient(server.uri, server.uri)
        client.create_webhook(
            name="prefect", url=receiver.url, events=["model_version_alias.created"], secret=SECRET, description="to Prefect"
        )
        yield {"client": client, "receiver": receiver, "deliveries": deliveries, "sent": sent, "server": server}
    finally:
        server.stop()
        receiver.stop()


def _post(url: str, headers: dict[str, str], body: bytes) -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _DIRECT.open(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


def _new_version(client: Any, name: str) -> str:
    experiment = client.create_experiment(f"webhooks-{uuid.uuid4().hex[:6]}")
    run = client.create_run(experiment)
    client.create_registered_model(name)
    return client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version


@pytest.mark.slow
def test_an_alias_set_in_mlflow_becomes_a_prefect_event_that_starts_sync_exports(api, mlflow_webhooks):
    client, sent = mlflow_webhooks["client"], mlflow_webhooks["sent"]
    version = _new_version(client, "iris")

    client.set_registered_model_alias("iris", "champion", version)

    (event,) = wait_for(lambda: list(sent), 60, "MLflow's delivery turned into an event")
    assert event["event"] == "mlflow.model_version_alias.created"
    assert event["resource"]["prefect.resource.id"] == "mlflow.registered_model.iris"
    assert event["payload"] == {"name": "iris", "version": str(version), "alias": "champion"}
    runs = wait_for(lambda: runs_of(api, "sync-exports"), 60, "a sync-exports run started by the champion move")
    assert len(runs) == 1 and runs[0].state.is_scheduled()

    # MLflow's delivery sent again verbatim (a replayed delivery id): answered, dropped, no event.
    headers, body = mlflow_webhooks["deliveries"][0]
    assert _post(mlflow_webhooks["receiver"].url, headers, body) == 200
    # An alias other than champion is an event too, and starts nothing.
    client.set_registered_model_alias("iris", "challenger", version)
    wait_for(lambda: len(sent) == 2, 60, "the challenger delivery")
    time.sleep(3)
    assert [e["payload"]["alias"] for e in sent] == ["champion", "challenger"]
    assert len(runs_of(api, "sync-exports")) == 1


@pytest.mark.slow
def test_a_bad_signature_or_a_stale_timestamp_is_refused_and_sends_nothing(mlflow_webhooks):
    from prefect_tensorflow.flows.mlflow_webhooks import signed_headers

    url, sent = mlflow_webhooks["receiver"].url, mlflow_webhooks["sent"]
    before = len(sent)
    body = json.dumps(
        {
            "entity": "model_version_alias",
            "action": "created",
            "timestamp": "",
            "data": {"name": "iris", "alias": "champion", "version": "1"},
        }
    ).encode()
    now = int(time.time())
    assert _post(url, signed_headers("not-the-secret", "forged-1", now, body), body) == 401
    assert _post(url, signed_headers(SECRET, "stale-1", now - 600, body), body) == 401
    tampered = signed_headers(SECRET, "tampered-1", now, body)
    assert _post(url, tampered, body.replace(b'"1"', b'"2"')) == 401
    unsigned = {k: v for k, v in tampered.items() if k != "X-MLflow-Signature"}
    assert _post(url, unsigned, body) == 401
    assert _post(url, signed_headers(SECRET, "malformed-1", now, b"{not json"), b"{not json") == 400
    time.sleep(1)
    assert len(sent) == before
