"""Guarded alias moves (`tasks/registry/aliases.py`): the per-model lock, compare-and-set, the history tags.

Real parts: a Prefect API (the session's test server) holds the locks, MLflow
is a SQLite store, and for the races the team's `mlflow server` on PostgreSQL
with moves from separate processes at once.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest

from prefect_tensorflow.tasks.errors import AliasMovedError, RegistryError
from prefect_tensorflow.tasks.registry.aliases import (
    MOVE_TAG_PREFIX,
    alias_history,
    current_alias_version,
    lock_name,
    move_alias,
    point_alias,
    registry_lock,
)
from prefect_tensorflow.tasks.registry.model_versions import set_alias


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def model_with_versions(client, name: str, count: int) -> None:
    """A registered model with `count` versions (no artifacts: aliases only need the rows)."""
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment(unique("aliases")))
    for _ in range(count):
        client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)


def test_a_move_checks_what_the_alias_names_then_records_who_from_to_and_why(mlflow_store, prefect_api):
    client = mlflow_store.client()
    name = unique("cas")
    model_with_versions(client, name, 3)
    with registry_lock(name):
        first = move_alias(client, name, "champion", 1, expected_from=None, reason="first version", kind="gate")
        second = move_alias(client, name, "champion", 2, expected_from=1, reason="better on the eval data")
    assert (first.from_version, first.to_version, second.from_version, second.to_version) == (None, 1, 1, 2)
    assert "@" in second.by and second.run_url is None  # outside a flow run: user@host
    assert current_alias_version(client, name, "champion") == 2

    with pytest.raises(AliasMovedError) as stale:  # decided against version 1, but 2 is champion now
        move_alias(client, name, "champion", 3, expected_from=1, reason="beats version 1")
    assert stale.value.current == 2 and "names version 2 now, not 1" in str(stale.value)
    assert current_alias_version(client, name, "champion") == 2

    same = move_alias(client, name, "champion", 2, expected_from=2, reason="again")
    assert same.from_version == same.to_version == 2  # nothing moved, nothing recorded

    tags = client.get_model_version(name, "2").tags
    (key,) = [k for k in tags if k.startswith(MOVE_TAG_PREFIX)]
    assert key.startswith(MOVE_TAG_PREFIX + "champion.") and len(tags[key]) < 400
    history = alias_history(client, name, "champion")
    assert [(m.from_version, m.to_version, m.reason, m.kind) for m in history] == [
        (None, 1, "first version", "gate"),
        (1, 2, "better on the eval data", "gate"),
    ]


def test_every_alias_this_project_sets_is_in_the_history(mlflow_store, prefect_api):
    client = mlflow_store.client()
    name = unique("history")
    model_with_versions(client, name, 2)
    set_alias(client, name, "challenger", 1, reason="registered: the newest version")
    set_alias(client, name, "challenger", 2, reason="registered: the newest version")
    set_alias(client, name, "staging", 2, reason="asked for (aliases)", kind="manual")
    assert point_alias(client, name, "staging", 2, reason="again") is None  # already there: not recorded
    client.set_model_version_tag(name, "1", MOVE_TAG_PREFIX + "challenger.1-abc", "{not json")  # skipped
    everything = alias_history(client, name)
    assert [(m.alias, m.from_version, m.to_version, m.kind) for m in everything] == [
        ("challenger", None, 1, "gate"),
        ("challenger", 1, 2, "gate"),
        ("staging", None, 2, "manual"),
    ]
    assert [m.when for m in everything] == sorted(m.when for m in everything)
    assert alias_history(client, name, "champion") == []


def test_an_unknown_registered_model_is_named(mlflow_store, prefect_api):
    client = mlflow_store.client()
    for call in (
        lambda: current_alias_version(client, "no-such-model", "champion"),
        lambda: alias_history(client, "no-such-model"),
        lambda: move_alias(client, "no-such-model", "champion", 1, expected_from=None, reason="x"),
    ):
        with pytest.raises(RegistryError, match="registered_model_name: no registered model 'no-such-model'"):
            call()


def test_the_lock_admits_one_holder_per_model_and_a_timeout_names_the_model(prefect_api):
    name = unique("locked")
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with registry_lock(name):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(60)
        started = time.monotonic()
        with pytest.raises(RegistryError) as refused:
            with registry_lock(name, timeout_seconds=2):
                pytest.fail("two holders of one model's lock")
        assert time.monotonic() - started < 30
        assert f"registered model {name!r}" in str(refused.value) and lock_name(name) in str(refused.value)
        with registry_lock(unique("other"), timeout_seconds=10):  # another model's lock is its own
            pass
    finally:
        release.set()
        thread.join(60)
    with registry_lock(name, timeout_seconds=30):  # released when the holder left its block
        pass


def test_lock_names_keep_to_the_allowed_characters_and_apart():
    names = ["iris", "iris v2/<&%>", "iris v2 &", "x" * 255]
    locks = [lock_name(n) for n in names]
    assert len(set(locks)) == len(locks)
    assert all(set(lock) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") for lock in locks)
    assert all(len(lock) < 100 for lock in locks)


# --- at once, from separate processes, on the team's MLflow (PostgreSQL) -------------------------------


def _gate_process(server: str, api_url: str, name: str, index: int, rounds: int, barrier, results) -> None:
    """One process: `rounds` first-time moves of fresh aliases (no lock, as challenger and user aliases
    move), each round started with the others at `barrier`; then one guarded move of `champion` from
    version 1 to its own version. Reports (index, errors of the fresh moves, the guarded outcome)."""
    import os

    os.environ["PREFECT_API_URL"] = api_url
    from mlflow import MlflowClient

    client = MlflowClient(server, server)
    version = index + 2
    errors = []
    for number in range(rounds):
        barrier.wait(timeout=300)
        try:
            point_alias(client, name, f"fresh{number}", version, reason="race", kind="manual")
        except Exception as err:  # noqa: BLE001 - reported to the test
            errors.append(" ".join(str(err).split())[:300])
    barrier.wait(timeout=300)
    try:
        with registry_lock(name, timeout_seconds=120):
            decided_against = 1  # what this gate read before scoring (both read the same)
            move = move_alias(client, name, "champion", version, expected_from=decided_against, reason=f"gate {index}")
        outcome = ("moved", move.to_version)
    except AliasMovedError as err:
        outcome = ("refused", err.current)
    except Exception as err:  # noqa: BLE001 - reported to the test
        outcome = ("error", f"{type(err).__name__}: {err}")
    results.put((index, errors, outcome))


@pytest.mark.slow
def test_two_gates_at_once_end_with_one_champion_and_a_consistent_history(mlflow_team_server, prefect_api):
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL

    client = MlflowClient(mlflow_team_server, mlflow_team_server)
    name = unique("two-gates")
    model_with_versions(client, name, 3)
    set_alias(client, name, "champion", 1, reason="first version")

    processes, rounds = 2, 15
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(
            target=_gate_process,
            args=(mlflow_team_server, PREFECT_API_URL.value(), name, i, rounds, barrier, results),
        )
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        reports = sorted(results.get(timeout=600) for _ in workers)
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()

    assert [errors for _, errors, _ in reports] == [[], []]  # every first-time race retried
    for number in range(rounds):
        moves = alias_history(client, name, f"fresh{number}")
        assert current_alias_version(client, name, f"fresh{number}") in {m.to_version for m in moves}
    outcomes = sorted(outcome for _, _, outcome in reports)
    (moved,) = [value for kind, value in outcomes if kind == "moved"]
    assert outcomes == [("moved", moved), ("refused", moved)], outcomes
    assert current_alias_version(client, name, "champion") == moved
    assert [(m.from_version, m.to_version) for m in alias_history(client, name, "champion")] == [(None, 1), (1, moved)]


PROBE_SECONDS = 50  # how long after the kill the lock must stay taken (its lease is 60 s)


@dataclass
class KilledHolder:
    """A process that took a model's lock and was SIGKILLed inside it; a probe tries to take the lock from
    the kill on for `PROBE_SECONDS`, in a thread, while the module's other tests run."""

    name: str
    killed: float  # time.monotonic() of the kill
    probe: threading.Thread
    outcome: list[str] = field(default_factory=list)  # the probe's error, or "taken after <s> s"


@pytest.fixture(scope="module", autouse=True)
def killed_holder(prefect_pg_server, tmp_path_factory):
    """A holder killed inside the lock when the module starts: its lease (60 s, the shortest the Prefect API
    accepts) runs out while the module's other tests run, not in a wait of the test that checks it."""
    import os
    import signal
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL, temporary_settings

    name = unique("crashed")
    home = tmp_path_factory.mktemp("killed-holder") / "prefect-home"
    env = {**os.environ, "PREFECT_API_URL": prefect_pg_server, "PREFECT_HOME": str(home)}
    script = (
        "import time\nfrom prefect_tensorflow.tasks.registry.aliases import registry_lock\n"
        f"with registry_lock({name!r}):\n    print('held', flush=True)\n    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(60)
    killed = time.monotonic()

    def probe() -> None:
        try:
            with temporary_settings(updates={PREFECT_API_URL: prefect_pg_server}):
                with registry_lock(name, timeout_seconds=PROBE_SECONDS):
                    record.outcome.append(f"taken after {time.monotonic() - killed:.0f} s")
        except RegistryError as err:  # anything else: the thread's traceback, and no outcome
            record.outcome.append(f"{type(err).__name__}: {err}")

    record = KilledHolder(name, killed, threading.Thread(target=probe, daemon=True))
    record.probe.start()
    yield record
    record.probe.join(PROBE_SECONDS + 60)


@pytest.mark.slow
def test_a_holder_killed_inside_the_lock_is_out_once_its_lease_expires(prefect_pg_server, killed_holder):
    """SIGKILL a process holding a model's lock (it never releases): a `prefect server` frees the slot when
    the lease expires (60 s, then its repossessor, every 15 s): about 70 s after the kill, which happened
    when the module started (`killed_holder`), not in this test."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    killed_holder.probe.join(PROBE_SECONDS + 60)
    (outcome,) = killed_holder.outcome
    assert outcome.startswith("RegistryError") and f"was not free within {PROBE_SECONDS} s" in outcome, outcome
    with temporary_settings(updates={PREFECT_API_URL: prefect_pg_server}):
        with registry_lock(killed_holder.name, timeout_seconds=240):
            waited = time.monotonic() - killed_holder.killed
    print(f"lock of a killed holder free again after {waited:.0f} s")
