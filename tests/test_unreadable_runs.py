"""Parameters that the Prefect API stores but cannot return: refused at creation, or failed, and never a stop.

Prefect 3.9 stores a flow run whose parameters it cannot serialize back (lists
nested 300 deep in `hparams`; a string holding a lone surrogate `"\\udcff"`, which
the UI's JSON input sends). Until this module's fixes, the next poll for scheduled
runs answered 500 and `prefect-tensorflow serve` exited ("Service exceeded error
threshold"), unserving every deployment, the nightly schedule too.

Through a real `prefect server` and the real served deployments (`prefect-tensorflow
serve`, then `deployments/deploy.py` + `prefect-tensorflow worker` on a process
pool), each unreadable value class is sent as the Run form sends it. With "Enforce
Parameter Schema" on, the server must refuse it at creation (4xx, naming the field).
With the switch off (or outside the parameters: the run's name), the run is stored,
and it must end Failed with a message saying nothing was run. Then a normal
`export-checkpoint` run must complete, the serving process must still be alive, and
nothing outside that run's own output directory may have changed.

The unit tests at the top check the schema bounding and the halving search without
a server; `test_the_runner_hook_is_installed` fails loudly when a Prefect upgrade
changes the runner internals that `QuarantiningRunner` relies on.
"""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
from served import BIN, REPO, ServedDeployments
from snapshots import changed, tree_snapshot

from prefect_tensorflow.flows.unreadable_runs import (
    MAX_DEPTH,
    PLACEHOLDER_PARAMETERS,
    TOO_DEEP,
    UNREADABLE_MESSAGE,
    bound_parameter_schema,
    find_unreadable,
)
from prefect_tensorflow.tasks.child_processes import log_tail, start_process, stop_process_group

POOL = "tensorflow-process"
pytestmark = pytest.mark.timeout(1800)
RUN_TIMEOUT = 900  # seconds for the normal export run (a process that imports Prefect, TF and MLflow)
FAIL_TIMEOUT = 120  # seconds for an unreadable run to be failed (the poll runs every 2 s)


def nested(levels: int, leaf: Any = 1) -> Any:
    """`leaf` inside `levels` lists."""
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


# --- without a server ----------------------------------------------------------------------------


def _schemas() -> dict[str, dict]:
    from prefect.utilities.callables import parameter_schema

    from prefect_tensorflow.flows.deployments import load_definitions

    return {d.name: parameter_schema(d.flow()).model_dump_for_openapi() for d in load_definitions()}


def _refusal(parameters: dict, schema: dict) -> Optional[str]:
    """The server's own validation (the function `create_flow_run_from_deployment` calls): its message, or None."""
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    try:
        validate(parameters, schema, raise_on_error=True)
    except ValidationError as err:
        return str(err)
    return None


def test_bounded_schemas_accept_what_a_legitimate_run_sends():
    from prefect.utilities.schema_tools.validation import is_valid_schema

    from prefect_tensorflow.flows.deployments import load_definitions

    defaults = {d.name: d.parameters for d in load_definitions()}
    legitimate = {
        "training": {
            "model": "iris",
            "hparams": {"hidden_units": [16, 8], "dropout": 0.1, "optimizer": {"name": "adam", "betas": [0.9, 0.999]}},
            "policy": {"save_checkpoints_steps": 100, "checkpoint_name": "model.ckpt"},
        },
        "registered_model_name": "iris émoji 😀 ok",
        "model_dir": "/srv/models/iris-😀",
        "mlflow": {"$ref": {"block_document_id": "6f1a4d3c-8e0b-4a3e-9d55-0f0d6c1f2a10"}},
        # resubmit-crashed's only parameter, required: its trigger passes the crashed run's event resource id
        "flow_run_id": "prefect.flow-run.0b5c6c1e-2f4e-4d0a-9a53-3f2d1f0e9c11",
    }
    for name, schema in _schemas().items():
        bounded = bound_parameter_schema(schema)
        is_valid_schema(bounded)  # Draft 2020-12, as the server checks it
        assert bound_parameter_schema(bounded) == bounded, f"{name}: bounding twice changes it"
        # what the form renders stays (type, $ref, anyOf, enum, default, title, description, position): only added to
        for prop, before in schema["properties"].items():
            assert _only_added_to(before, bounded["properties"][prop]), (name, prop, bounded["properties"][prop])
        for definition, before in schema["definitions"].items():
            assert _only_added_to(before, bounded["definitions"][definition]), (name, definition)
        supplied = {k: legitimate[k] for k in bounded.get("required", []) if k not in defaults[name] and k in legitimate}
        assert _refusal({**supplied, **defaults[name]}, bounded) is None, name
        if not bounded.get("required"):  # rollback's model name is required: its deployment always sends one
            assert _refusal({}, bounded) is None, name
        parameters = {k: v for k, v in legitimate.items() if k in schema["properties"]}
        assert _refusal(parameters, bounded) is None, (name, _refusal(parameters, bounded))
        if "training" in schema["properties"]:
            deep_enough = {"training": {"hparams": {"x": nested(MAX_DEPTH - 2)}}}  # training > hparams > x
            assert _refusal(deep_enough, bounded) is None, name


def _only_added_to(before: Any, after: Any) -> bool:
    """`after` holds everything `before` does (dicts may have more keys); `true` (any value) may have become the
    bounded value."""
    if before is True and after == {"$ref": f"#/definitions/JsonNestedAtMost{MAX_DEPTH}Levels"}:
        return True
    if isinstance(before, dict) and isinstance(after, dict):
        return all(k in after and _only_added_to(v, after[k]) for k, v in before.items())
    if isinstance(before, list) and isinstance(after, list):
        return len(before) == len(after) and all(_only_added_to(b, a) for b, a in zip(before, after))
    return before == after


@pytest.mark.parametrize(
    "parameters, field",
    [
        ({"training": {"hparams": {"units": nested(300)}}}, "training.hparams.units[0]"),
        ({"training": {"hparams": {"units": nested(MAX_DEPTH + 1)}}}, "training.hparams.units[0]"),
        ({"registered_model_name": "iris\udcff"}, "registered_model_name"),
        ({"model_dir": "/srv/\udcff"}, "model_dir"),
        ({"training": {"hparams": {"name\udcff": 1}}}, "training.hparams"),
        ({"training": {"hparams": {"name": ["a", {"b": "\udcff"}]}}}, "training.hparams.name[1].b"),
        ({"training": {"policy": {"checkpoint_name": "m\udcff"}}}, "training.policy.checkpoint_name"),
        ({"not_a_parameter": nested(300)}, "not_a_parameter[0]"),
        ({"mlflow": {"tracking_uri": "http://x", "extra": nested(300)}}, "mlflow.extra[0]"),
        ({"mlflow": {"$ref": {"block_document_id": "6f1a4d3c-8e0b-4a3e-9d55-0f0d6c1f2a10"}, "x": nested(300)}}, "mlflow.x[0]"),
    ],
)
def test_bounded_schemas_refuse_what_the_api_cannot_return(parameters, field):
    schema = bound_parameter_schema(_schemas()["retrain-iris"])
    message = _refusal(parameters, schema)
    assert message is not None and f"'{field}" in message, message
    assert message.isascii()  # the refusal itself can be serialized (repr escapes the surrogate)
    assert _refusal(parameters, _schemas()["retrain-iris"]) is None  # what Prefect's own schema lets through


def test_bounding_changes_only_a_copy():
    schema = _schemas()["export-checkpoint"]
    before = copy.deepcopy(schema)
    bound_parameter_schema(schema)
    assert schema == before


def test_find_unreadable_asks_about_halves():
    ids = [f"run{i:03d}" for i in range(450)]
    bad = {"run007", "run300", "run301"}
    calls: list[int] = []

    async def readable(chunk: list[str]) -> bool:
        calls.append(len(chunk))
        assert len(chunk) <= 200  # the API's limit for one filter request
        return not bad & set(chunk)

    assert asyncio.run(find_unreadable(ids, readable)) == ["run007", "run300", "run301"]
    assert len(calls) < 60, calls  # not one request per run
    calls.clear()
    assert asyncio.run(find_unreadable(ids, readable=lambda chunk: _true(calls, chunk))) == []
    assert calls == [50, 200, 200]  # a readable chunk costs one request


async def _true(calls: list[int], chunk: list[str]) -> bool:
    calls.append(len(chunk))
    return True


def test_the_runner_hook_is_installed(prefect_api):
    """The one use of Prefect internals: the started runner polls through `runner._client`, which its
    `ScheduledRunPoller` shares. A Prefect upgrade that changes this fails here, not in production."""
    from prefect_tensorflow.flows.unreadable_runs import QuarantiningRunner

    async def enter() -> tuple[bool, bool]:
        runner = QuarantiningRunner(name="hook-check", limit=1)
        async with runner:
            poller = runner._scheduled_run_poller
            poll = runner._client.get_scheduled_flow_runs_for_deployments
            return getattr(poll, "guards_unreadable_runs", False), poller._client is runner._client

    installed, shared = asyncio.run(enter())
    assert installed, "QuarantiningRunner did not wrap the runner's poll for scheduled runs"
    assert shared, "the runner's ScheduledRunPoller no longer polls through runner._client"


# --- through a real server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory, trained_dir, prefect_database):
    """A Prefect server and `prefect-tensorflow serve --limit 2`, confined to `<root>/roots`.

    <root>/roots/data/          PREFECT_TENSORFLOW_HOME (its MLflow store in data/mlflow)
    <root>/roots/data/runs/<c>  each case's own output dirs (where a run that went ahead would write)
    <root>/roots/models/iris    a trained model dir (a copy of the session's)
    """
    root = tmp_path_factory.mktemp("unreadable")
    roots, data = root / "roots", root / "roots" / "data"
    (data / "runs").mkdir(parents=True)
    (data / "mlflow").mkdir()
    shutil.copytree(trained_dir, roots / "models" / "iris")
    environ = ServedDeployments.environ_for(
        root,
        PREFECT_TENSORFLOW_HOME=str(data),
        PREFECT_TENSORFLOW_ROOTS=str(roots),
        MLFLOW_TRACKING_URI=f"sqlite:///{data}/mlflow/mlflow.db",
    )
    served = ServedDeployments(root, environ, limit=2, database=prefect_database)
    try:
        served.start_server()
        served.start_serve()
        _wait_for_bounded_schemas(served)
        yield {"root": root, "roots": roots, "data": data, "trained": roots / "models" / "iris", "served": served}
    finally:
        served.stop()


def _wait_for_bounded_schemas(served: ServedDeployments, timeout: float = 120) -> None:
    """Until serve has created every deployment of prefect.yaml (it creates them in turn: the test compares
    them before and after) and bounded the schemas of these three (right after creating each)."""
    from prefect_tensorflow.flows.deployments import load_definitions

    deadline = time.monotonic() + timeout
    names = ("retrain-iris", "export-checkpoint", "sweep-iris")
    every = {d.name for d in load_definitions()}
    while True:
        with served.api() as client:
            found = {d.name: d for d in client.read_deployments() if not d.paused}
        bounded = [
            n for n in names if n in found and TOO_DEEP in (found[n].parameter_openapi_schema or {}).get("definitions", {})
        ]
        if len(bounded) == len(names) and every <= set(found):
            served.deployments = {n: str(found[n].id) for n in names}
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"after {timeout} s: deployments {sorted(found)}, their schemas bounded: {bounded}")
        time.sleep(1)


@dataclass
class Case:
    """One unreadable value sent to one deployment; `expect` is "refused" (4xx) or "failed" (stored, Failed)."""

    label: str
    deployment: str
    bad: dict[str, Any]  # merged into the case's benign parameters
    enforce: Optional[bool]
    expect: str
    fields: dict[str, Any] = field(default_factory=dict)  # other fields of the create request
    name: str = ""
    # filled in
    status: Optional[int] = None
    error: str = ""
    run_id: Optional[str] = None
    state: str = ""
    message: str = ""
    readable: bool = False  # the API returns the run again, with the placeholder parameters

    def describe(self) -> str:
        outcome = f"created: HTTP {self.status or 201} {self.error[:120]}"
        if self.run_id:
            outcome += f"; stored, {self.state}{' (the API returns it again)' if self.readable else ''}: {self.message[:100]}"
        return f"[{self.label}] {self.deployment} schema {'off' if self.enforce is False else 'on'}: {outcome}"


def _benign(ctx, deployment: str, label: str) -> dict[str, Any]:
    """Parameters that would complete, writing only under data/runs/<label>."""
    own = ctx["data"] / "runs" / label
    common = {"export_base": str(own / "exports"), "frozen_dir": str(own / "frozen"), "registered_model_name": f"iris-{label}"}
    if deployment == "export-checkpoint":
        return {**common, "model_dir": str(ctx["trained"]), "checkpoint": "latest"}
    training = {"steps": 300, "policy": {"save_checkpoints_steps": 100, "keep_checkpoint_max": None}}
    if deployment == "sweep-iris":
        return {**common, "sweep_root": str(own / "sweeps"), "training": training}
    return {**common, "model_dir": str(own / "model"), "training": training}


def _parameters(ctx, case: Case) -> dict[str, Any]:
    parameters = _benign(ctx, case.deployment, case.label)
    for key, value in case.bad.items():
        if isinstance(value, dict) and isinstance(parameters.get(key), dict):
            parameters[key] = {**parameters[key], **value}
        else:
            parameters[key] = value
    return parameters


def _send(ctx, client: Any, cases: list[Case]) -> None:
    """Create each case's run; a refusal (or a 5xx) is recorded, and the stored run looked up by name."""
    import httpx

    served = ctx["served"]
    for case in cases:
        case.name = f"unreadable-{case.label}"
        try:
            case.run_id = served.send_run(
                client, case.deployment, _parameters(ctx, case), name=case.name, enforce=case.enforce, **case.fields
            )
        except httpx.HTTPStatusError as err:
            case.status, case.error = err.response.status_code, err.response.text
            stored = served.stored_run(client, case.name)
            case.run_id = stored[0] if stored else None


def _wait_failed(ctx, client: Any, cases: list[Case], timeout: float = FAIL_TIMEOUT) -> None:
    """Wait until every stored run is in a final state; its state and message, and whether the API returns it."""
    import httpx

    served = ctx["served"]
    deadline = time.monotonic() + timeout
    for case in cases:
        if case.run_id is None:
            continue
        while True:
            stored = served.stored_run(client, case.name)
            if (stored and stored[1] in ("FAILED", "CRASHED", "COMPLETED", "CANCELLED")) or time.monotonic() > deadline:
                break
            time.sleep(1)
        case.state = stored[1] if stored else "GONE"
        try:
            run = client.read_flow_run(case.run_id)
        except httpx.HTTPStatusError as err:
            case.message = f"(the API still cannot return the run: HTTP {err.response.status_code})"
            continue
        case.message = (run.state.message or "") if run.state else ""
        case.readable = run.parameters == PLACEHOLDER_PARAMETERS


def _export_run(ctx, client: Any, label: str, alive: Callable[[], bool]) -> Any:
    """A normal export-checkpoint run (own output dirs); the run once it is final, or once `alive()` is False."""
    served = ctx["served"]
    run_id = served.create_run(client, "export-checkpoint", _benign(ctx, "export-checkpoint", label), name=f"normal-{label}")
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        run = served.wait(client, [run_id], 10)[run_id]
        if (run.state is not None and run.state.is_final()) or not alive() or time.monotonic() > deadline:
            return run


def _snapshot(ctx) -> dict[str, tuple]:
    """Every entry under the test root but the servers' own (Prefect's home, logs), the MLflow store, scratch
    and the gate cache (a normal run adds to them); directories by mode only (a new entry shows by itself)."""
    root = ctx["root"]
    skip = {root / "prefect-home", ctx["data"] / "mlflow", ctx["data"] / "scratch", ctx["data"] / "gate-cache"}
    return tree_snapshot([root], skip, dir_mtimes=False, ignore=lambda path: path.suffix == ".log" and path.parent == root)


def _changed_outside(before: dict, after: dict, own: Path) -> list[str]:
    return [key for key in changed(before, after) if not (key + os.sep).startswith(str(own) + os.sep)]


def _deployment_states(client: Any) -> dict[str, tuple[bool, int]]:
    """(paused, active schedules) by deployment name."""
    return {d.name: (bool(d.paused), sum(1 for s in d.schedules if s.active)) for d in client.read_deployments()}


@pytest.mark.slow
def test_unreadable_runs_are_refused_or_failed_and_serve_keeps_serving(stack):
    ctx = stack
    served = ctx["served"]
    deep = {"training": {"hparams": {"units": nested(300)}}}
    cases = [
        Case("deep-hparams", "retrain-iris", deep, enforce=None, expect="refused"),
        Case("deep-hparams-schema-off", "retrain-iris", deep, enforce=False, expect="failed"),
        Case("surrogate-name-param", "retrain-iris", {"registered_model_name": "iris\udcff"}, enforce=None, expect="refused"),
        Case("surrogate-retrain", "retrain-iris", {"registered_model_name": "iris\udcff"}, enforce=False, expect="failed"),
        Case(
            "surrogate-model-dir", "export-checkpoint", {"model_dir": f"{ctx['trained']}\udcff"}, enforce=False, expect="failed"
        ),
        Case("surrogate-checkpoint", "export-checkpoint", {"checkpoint": "latest\udcff"}, enforce=False, expect="failed"),
        Case("surrogate-sweep", "sweep-iris", {"registered_model_name": "iris\udcff"}, enforce=False, expect="failed"),
        # not a parameter: the run's job variables come in the same request, and no schema covers them
        Case(
            "surrogate-job-variable",
            "export-checkpoint",
            {},
            enforce=None,
            expect="failed",
            fields={"job_variables": {"env": {"X": "\udcff"}}},
        ),
    ]
    before = _snapshot(ctx)
    with served.api() as client:
        states_before = _deployment_states(client)
        started = time.monotonic()
        _send(ctx, client, cases)
        normal = _export_run(ctx, client, "normal-serve", lambda: served.serving)  # queued behind the unreadable runs
        _wait_failed(ctx, client, cases)
        elapsed = time.monotonic() - started
        serving = served.serving
        states_after = _deployment_states(client)
    after = _snapshot(ctx)

    lines = [case.describe() for case in cases]
    refused = [c for c in cases if c.status is not None and 400 <= c.status < 500 and c.run_id is None]
    failed = [c for c in cases if c.state == "FAILED" and c.message == UNREADABLE_MESSAGE and c.readable]
    summary = (
        f"unreadable runs (serve): {len(cases)} values the API cannot return, {len(refused)} refused at creation by "
        f"the bounded schema, {len(failed)} stored and failed without running; the normal export run "
        f"{normal.state.type.value if normal.state else None}, serve {'still serving' if serving else 'EXITED'}; "
        f"{elapsed:.0f} s"
    )
    print("\n" + summary + "\n  " + "\n  ".join(lines))
    warnings.warn(summary, UserWarning, stacklevel=1)

    problems = []
    for case in cases:
        if case.expect == "refused" and case not in refused:
            problems.append(f"not refused at creation: {case.describe()}")
        if case.expect == "refused" and case in refused and "Validation failed for field" not in case.error:
            problems.append(f"refused without naming the field: {case.describe()}")
        if case.expect == "failed" and case not in failed:
            problems.append(f"not failed with the message: {case.describe()}")
    if not serving:
        problems.append(f"serve exited:\n{log_tail(str(served.serve_log), 2000)}")
    if normal.state is None or normal.state.type.value != "COMPLETED":
        problems.append(f"the normal export run: {normal.state}\n{log_tail(str(served.serve_log), 2000)}")
    if states_after != states_before:
        problems.append(f"deployments changed (paused, active schedules): {states_before} -> {states_after}")
    problems += [
        f"changed outside the normal run's output: {p}"
        for p in _changed_outside(before, after, ctx["data"] / "runs" / "normal-serve")
    ]
    log = served.serve_log.read_text(errors="replace")
    problems += [f"serve's log does not name {c.run_id}" for c in failed if c.run_id not in log]
    assert not problems, summary + "\n" + "\n".join(problems)


@pytest.fixture
def worker(stack):
    """`deployments/deploy.py` on the process pool, and `prefect-tensorflow worker --pool` on it (serve stopped:
    the pool's deployments have the same names)."""
    served = stack["served"]
    served.stop_serve()
    deployed = subprocess.run(
        [f"{BIN}/python", str(REPO / "deployments" / "deploy.py"), "--work-pool", POOL],
        env=served.environ,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    with served.api() as client:
        served.deployments = {d.name: str(d.id) for d in client.read_deployments() if d.work_pool_name == POOL}
    log = stack["root"] / "worker.log"
    process = start_process(
        [f"{BIN}/prefect-tensorflow", "worker", "--pool", POOL, "--limit", "2"],
        str(log),
        env=served.environ,
        cwd=str(stack["root"]),
    )
    try:
        yield process, log
    finally:
        stop_process_group(process)


@pytest.mark.slow
def test_the_worker_command_fails_unreadable_runs_and_keeps_working(stack, worker):
    ctx = stack
    served = ctx["served"]
    process, log = worker
    cases = [
        Case("worker-deep-hparams", "retrain-iris", {"training": {"hparams": {"units": nested(300)}}}, False, "failed"),
        Case("worker-surrogate", "export-checkpoint", {"registered_model_name": "iris\udcff"}, False, "failed"),
    ]
    # deploy.py bounds the pool deployments' schemas as serve does: with the schema on, refused at creation
    enforced = Case(
        "worker-deep-hparams-enforced", "retrain-iris", {"training": {"hparams": {"units": nested(300)}}}, True, "refused"
    )
    before = _snapshot(ctx)
    with served.api() as client:
        started = time.monotonic()
        _send(ctx, client, [*cases, enforced])
        normal = _export_run(ctx, client, "normal-worker", lambda: process.poll() is None)
        _wait_failed(ctx, client, cases)
        elapsed = time.monotonic() - started
    after = _snapshot(ctx)
    alive = process.poll() is None
    summary = (
        f"unreadable runs (worker on a process pool): {sum(c.state == 'FAILED' for c in cases)} of {len(cases)} failed "
        f"without running; the normal export run {normal.state.type.value if normal.state else None}, worker "
        f"{'still working' if alive else 'EXITED'}; {elapsed:.0f} s"
    )
    print("\n" + summary + "\n  " + "\n  ".join(case.describe() for case in cases))
    warnings.warn(summary, UserWarning, stacklevel=1)
    problems = [
        f"not failed with the message: {c.describe()}"
        for c in cases
        if not (c.state == "FAILED" and c.message == UNREADABLE_MESSAGE)
    ]
    if not (enforced.status == 409 and enforced.run_id is None):
        problems.append(f"not refused at creation by the bounded schema: {enforced.describe()}")
    if not alive:
        problems.append(f"the worker exited:\n{log_tail(str(log), 2000)}")
    if normal.state is None or normal.state.type.value != "COMPLETED":
        problems.append(f"the normal export run: {normal.state}\n{log_tail(str(log), 2000)}")
    problems += [
        f"changed outside the normal run's output: {p}"
        for p in _changed_outside(before, after, ctx["data"] / "runs" / "normal-worker")
    ]
    assert not problems, summary + "\n" + "\n".join(problems)
