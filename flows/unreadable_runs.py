"""Flow runs the Prefect API stores but cannot return: refused at creation where possible, failed where not.

Prefect 3.9 stores a flow run whose parameters it cannot serialize again: a value
nested deeper than about 250 levels (pydantic's serialization limit), or text that
is not valid Unicode, such as a lone surrogate `"\\udcff"` (the UI's JSON input can
send one). The create request answers 500 after the run was stored, and from then
on every request that returns that run answers 500. That includes the poll for
scheduled runs: `prefect.serve` exits after three failed polls (pausing every
deployment it served, the nightly schedule too), and a `prefect worker` exits
after about eight minutes, having run nothing in between.

Two defences:

- `bound_parameter_schema` tightens a deployment's parameter schema. Wherever it
  accepted any JSON value (`hparams` values, unknown parameters, extra keys of a
  block), it now accepts a value nested at most `MAX_DEPTH` levels, and no string
  or key anywhere may hold a lone surrogate. With "Enforce Parameter Schema" on
  (the Run form's default), the server refuses such parameters at creation (409,
  naming the field) and stores nothing. The Run form renders the same fields as
  before. `serve` bounds each deployment's schema right after creating it
  (`bound_deployment_schemas`).
- When a poll for scheduled runs answers 5xx, `quarantine_unreadable_runs` looks
  for the Scheduled runs of that poll's scope (the served deployments, or the
  worker's pool) that the API cannot return. It reads ids only:
  `POST /ui/flow_runs/history` returns no parameters, and `POST /flow_runs/filter`
  over halves of them finds the ones it cannot return. Each is confirmed twice,
  its parameters are replaced by `PLACEHOLDER_PARAMETERS` (then, if still needed,
  its job variables, name and tags) so that the API can list it again, and it is
  marked Failed with `UNREADABLE_MESSAGE`: nothing was run. It is logged, and the
  poll is repeated. A 5xx for any other reason (the API is down) is raised as
  before, and Prefect's own error threshold applies.

`serve` runs a `QuarantiningRunner`, which hooks the runner's poll (the one place
where this module relies on Prefect internals: the runner's `_client`, checked by
`tests/test_unreadable_runs.py::test_the_runner_hook_is_installed`). `run_worker`
(`prefect-tensorflow worker`) runs Prefect's process worker with `guard_worker`,
which wraps its public `get_and_submit_flow_runs`.

Example:
    >>> from prefect_tensorflow.flows.unreadable_runs import bound_parameter_schema
    >>> schema = bound_parameter_schema({"type": "object", "properties": {"hparams": {"type": "object"}}})
    >>> schema["properties"]["hparams"]["additionalProperties"]
    {'$ref': '#/definitions/JsonNestedAtMost32Levels'}
"""

from __future__ import annotations

import asyncio
import copy
import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Optional, cast
from uuid import UUID

import httpx
from prefect.logging import get_logger
from prefect.runner import Runner
from typing_extensions import Self

from .poll_probe import FULL_POLL_SECONDS, probe_before_poll

MAX_DEPTH = 32  # levels of lists and objects a free-form value may nest (the API fails past ~250)
DEFINITIONS = "definitions"  # where Prefect's parameter schemas keep their definitions
LONE_SURROGATE = "TextHoldingALoneSurrogate"  # the names appear in the server's refusal messages
TOO_DEEP = f"ListsOrObjectsNestedDeeperThan{MAX_DEPTH}Levels"
BOUNDED = "JsonNestedAtMost{levels}Levels"
UNREADABLE_MESSAGE = (
    "Not run: the Prefect API stored this run but cannot return it, so no worker can read its parameters "
    "(a value nested too deeply, or text that is not valid Unicode such as a lone surrogate). Nothing was run. "
    "prefect-tensorflow replaced its parameters so that the API can list it again."
)
PLACEHOLDER_PARAMETERS = {
    "unreadable_parameters": "The Prefect API could not return the parameters this run was created with; "
    "they were replaced so that the run can be listed. The run was not started."
}
HISTORY_LIMIT = 1000  # scheduled runs looked at per failed poll, the next due first (the API's maximum)
FILTER_CHUNK = 200  # runs asked for in one /flow_runs/filter request (the API's default maximum)
CONFIRMATIONS = 2  # a run counts as unreadable after this many 5xx answers while the API answers otherwise
CONFIRM_PAUSE = 0.5

logger = get_logger("prefect_tensorflow.unreadable_runs")


# --- the schema ------------------------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/{DEFINITIONS}/{name}"}


def _bounded_definitions(max_depth: int) -> dict[str, Any]:
    """`JsonNestedAtMost<k>Levels` for k = 0..max_depth: any JSON value with at most k levels of lists and
    objects below it, and no string or key holding a lone surrogate. The keywords apply by type, so one
    schema covers strings, numbers, lists and objects; a level is a definition, not a recursion, so the
    validator never descends further than `max_depth`."""
    no_surrogate = {"not": _ref(LONE_SURROGATE)}
    definitions: dict[str, Any] = {
        # Python's `re` and the server's validator see code points: a pair from JSON is one code point.
        LONE_SURROGATE: {"type": "string", "pattern": "[\\ud800-\\udfff]"},
        TOO_DEEP: {"type": ["array", "object"]},
        BOUNDED.format(levels=0): {"allOf": [{"not": _ref(TOO_DEEP)}, no_surrogate]},
    }
    for levels in range(1, max_depth + 1):
        below = _ref(BOUNDED.format(levels=levels - 1))
        definitions[BOUNDED.format(levels=levels)] = {
            **no_surrogate,
            "propertyNames": no_surrogate,
            "items": below,
            "additionalProperties": below,
        }
    return definitions


def _types(node: dict[str, Any]) -> set[str]:
    kind = node.get("type")
    return {kind} if isinstance(kind, str) else set(kind or ())


_CONSTRAINING = {"type", "$ref", "anyOf", "oneOf", "allOf", "not", "enum", "const", "properties", "items"}


def _subschemas(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The schemas directly inside `node` that describe parts of the value (not `not`: it only refuses)."""
    for key in ("properties", "patternProperties", "$defs", DEFINITIONS):
        yield from (v for v in (node.get(key) or {}).values() if isinstance(v, dict))
    for key in ("items", "additionalProperties", "contains", "if", "then", "else"):
        if isinstance(node.get(key), dict):
            yield node[key]
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        yield from (v for v in node.get(key) or () if isinstance(v, dict))


def _tighten(node: dict[str, Any], any_value: dict[str, str], blocks: set[str]) -> None:
    """Bound `node` and everything inside it, in place (see `bound_parameter_schema`)."""
    no_surrogate = {"not": _ref(LONE_SURROGATE)}
    if not _CONSTRAINING & node.keys():  # any value at all ({} or only a title and a description)
        node.update(any_value)
        return
    types = _types(node)
    if "string" in types and no_surrogate["not"] != node.get("not") and no_surrogate not in node.get("allOf", []):
        if "not" in node:
            node.setdefault("allOf", []).append(no_surrogate)
        else:
            node.update(no_surrogate)
    if "object" in types:
        if node.get("additionalProperties", True) is True:
            node["additionalProperties"] = dict(any_value)
        node.setdefault("propertyNames", no_surrogate)
    if "array" in types and node.get("items", True) is True:
        node["items"] = dict(any_value)
    if str(node.get("$ref", "")).rsplit("/", 1)[-1] in blocks:
        # The server also accepts a block as {"$ref": <block document>} plus any other keys.
        node.setdefault("additionalProperties", dict(any_value))
        node.setdefault("propertyNames", no_surrogate)
    for inner in _subschemas(node):
        _tighten(inner, any_value, blocks)


def bound_parameter_schema(schema: dict[str, Any], max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """`schema` (a deployment's parameter schema) with every free-form value bounded; a new dict.

    Where the schema accepted any JSON value (an untyped parameter, `hparams` values, an object's
    extra keys, an array without `items`), it now accepts one nested at most `max_depth` levels; and
    no string or key anywhere may hold a lone surrogate (`"\\udcff"`). Only keywords are added:
    parameters the schema accepted before that nest less deeply and hold valid Unicode are still
    accepted, and the Prefect UI renders the same form. Applying it twice changes nothing more.
    """
    bounded = copy.deepcopy(schema)
    definitions = bounded.setdefault(DEFINITIONS, {})
    ours = _bounded_definitions(max_depth)
    any_value = _ref(BOUNDED.format(levels=max_depth))
    blocks = {
        name for name, definition in definitions.items() if isinstance(definition, dict) and "block_type_slug" in definition
    }
    for name, definition in definitions.items():
        if name not in ours and isinstance(definition, dict):
            _tighten(definition, any_value, blocks)
    definitions.update(ours)
    others = {k: v for k, v in bounded.items() if k != DEFINITIONS}
    _tighten(others, any_value, blocks)
    bounded.update(others)
    return bounded


def bound_deployment_schemas(deployment_ids: Sequence[UUID]) -> None:
    """Apply `bound_parameter_schema` to these deployments' schemas on the server (once each is created)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    with get_client(sync_client=True) as client:
        for deployment_id in deployment_ids:
            current = client.read_deployment(deployment_id).parameter_openapi_schema or {}
            bounded = bound_parameter_schema(current)
            if bounded != current:
                client.update_deployment(deployment_id, DeploymentUpdate(parameter_openapi_schema=bounded))


# --- finding and failing unreadable runs -----------------------------------------------------------


async def find_unreadable(ids: Sequence[str], readable: Callable[[list[str]], Awaitable[bool]]) -> list[str]:
    """The ids among `ids` that `readable` refuses, found by halving: a chunk the API returns costs one call.

    Example:
        >>> import asyncio
        >>> async def readable(chunk):
        ...     return "b" not in chunk
        >>> asyncio.run(find_unreadable(["a", "b", "c", "d"], readable))
        ['b']
    """
    found: set[str] = set()
    pending = [list(ids[i : i + FILTER_CHUNK]) for i in range(0, len(ids), FILTER_CHUNK)]
    while pending:
        chunk = pending.pop()
        if not chunk or await readable(chunk):
            continue
        if len(chunk) == 1:
            found.add(chunk[0])
        else:
            middle = len(chunk) // 2
            pending += [chunk[middle:], chunk[:middle]]
    return [run_id for run_id in ids if run_id in found]


async def _scheduled_runs(client: Any, scope: dict[str, Any], run_ids: Optional[list[str]] = None) -> dict[str, str]:
    """State type by id of the runs in `scope` (and `run_ids`) that are Scheduled, from an endpoint that
    returns no parameters. Raises what the API raises."""
    flow_runs: dict[str, Any] = {"state": {"type": {"any_": ["SCHEDULED"]}}}
    if run_ids is not None:
        flow_runs["id"] = {"any_": run_ids}
    body = {**scope, "flow_runs": flow_runs, "sort": "NEXT_SCHEDULED_START_TIME_ASC", "limit": HISTORY_LIMIT}
    response = await client.request("POST", "/ui/flow_runs/history", json=body)
    return {str(run["id"]): run["state_type"] for run in response.json()}


async def _readable(client: Any, run_ids: list[str]) -> bool:
    try:
        await client.request("POST", "/flow_runs/filter", json={"flow_runs": {"id": {"any_": run_ids}}, "limit": len(run_ids)})
    except httpx.HTTPStatusError as err:
        if err.response.status_code >= 500:
            return False
        raise
    return True


async def _unreadable(client: Any, scope: dict[str, Any], run_id: str) -> bool:
    """Whether the API still lists `run_id` as Scheduled but answers 5xx for it, `CONFIRMATIONS` times."""
    for attempt in range(CONFIRMATIONS):
        if attempt:
            await asyncio.sleep(CONFIRM_PAUSE)
        if run_id not in await _scheduled_runs(client, scope, [run_id]):
            return False
        if await _readable(client, [run_id]):
            return False
    return True


async def _repair_and_fail(client: Any, run_id: str) -> bool:
    """Make the API able to return the run again, then mark it Failed (nothing ran); whether it is readable.

    The fields come from the create request, any of them may be what the API cannot serialize: the
    parameters first, then the job variables (only while the run is Scheduled, hence this order), then the
    name and tags. The run is in no runner's hands meanwhile (this runs inside the poll), and its
    placeholder parameters fail any flow's validation.
    """
    from prefect.states import Failed

    repairs: tuple[dict[str, Any], ...] = (
        {"parameters": PLACEHOLDER_PARAMETERS},
        {"job_variables": {}},
        {"name": f"unreadable-{run_id[:8]}", "tags": []},
    )
    readable = False
    for fields in repairs:
        try:
            await client.update_flow_run(UUID(run_id), **fields)
        except httpx.HTTPStatusError as err:
            logger.debug("flow run %s: could not replace %s: %s", run_id, sorted(fields), err)
            continue
        readable = await _readable(client, [run_id])
        if readable:
            break
    await client.set_flow_run_state(run_id, Failed(message=UNREADABLE_MESSAGE), force=True)
    if readable:
        logger.warning("flow run %s: the Prefect API could not return it; marked Failed, not run", run_id)
    else:
        logger.error(
            "flow run %s: the Prefect API cannot return it; marked Failed, not run, but it still breaks listings "
            "of flow runs: delete it (prefect flow-run delete %s)",
            run_id,
            run_id,
        )
    return readable


async def quarantine_unreadable_runs(client: Any, scope: dict[str, Any]) -> list[str]:
    """Fail the Scheduled runs in `scope` that the API cannot return; their ids.

    Args:
        client: a `PrefectClient`.
        scope: the filters of `POST /ui/flow_runs/history` besides `flow_runs`, e.g.
            `{"deployments": {"id": {"any_": [...]}}}` or `{"work_pools": {"name": {"any_": [pool]}}}`.

    Raises:
        httpx.HTTPStatusError: the API failed otherwise (e.g. it is down).
    """
    ids = list(await _scheduled_runs(client, scope))
    failed = []
    for run_id in await find_unreadable(ids, lambda chunk: _readable(client, chunk)):
        if await _unreadable(client, scope, run_id):
            await _repair_and_fail(client, run_id)
            failed.append(run_id)
    return failed


async def _quarantined_any(client: Any, scope: dict[str, Any]) -> bool:
    try:
        return bool(await quarantine_unreadable_runs(client, scope))
    except Exception as err:  # noqa: BLE001 - the poll's own error is the one to report
        logger.debug("looking for unreadable flow runs failed: %s", err)
        return False


# --- the runner (`serve`) and the worker -----------------------------------------------------------


def guard_runner_client(runner: Runner) -> bool:
    """Make the started `runner`'s poll for scheduled runs quarantine unreadable runs on a 5xx, then retry.

    Returns False (and changes nothing) when Prefect's runner no longer polls through the client it
    keeps as `_client` (a Prefect upgrade changed its internals).
    """
    client = getattr(runner, "_client", None)
    poller = getattr(runner, "_scheduled_run_poller", None)
    if client is None or getattr(poller, "_client", None) is not client:
        return False
    return _guard_poll(client)


def _guard_poll(client: Any) -> bool:
    original = getattr(client, "get_scheduled_flow_runs_for_deployments", None)
    if original is None:
        return False

    async def get_scheduled_flow_runs_for_deployments(
        deployment_ids: list[UUID], scheduled_before: Any = None, limit: Optional[int] = None
    ) -> Any:
        try:
            return await original(deployment_ids, scheduled_before=scheduled_before, limit=limit)
        except httpx.HTTPStatusError as err:
            scope = {"deployments": {"id": {"any_": [str(d) for d in deployment_ids]}}}
            if err.response.status_code < 500 or not await _quarantined_any(client, scope):
                raise
        return await original(deployment_ids, scheduled_before=scheduled_before, limit=limit)

    get_scheduled_flow_runs_for_deployments.guards_unreadable_runs = True  # type: ignore[attr-defined]
    client.get_scheduled_flow_runs_for_deployments = get_scheduled_flow_runs_for_deployments
    return True


class QuarantiningRunner(Runner):
    """Prefect's `Runner` (what `prefect.serve` runs) that keeps serving past runs the API cannot return, and,
    polling faster than Prefect's default, probes with a read before each writing poll (`poll_probe`)."""

    async def __aenter__(self) -> Self:
        runner = await super().__aenter__()
        if not guard_runner_client(self):
            logger.error(
                "this Prefect version's runner polls differently: a flow run the API cannot return will stop "
                "serving (see prefect_tensorflow.flows.unreadable_runs)"
            )
        elif self.query_seconds < FULL_POLL_SECONDS:
            probe_before_poll(self._client)  # a poll every query_seconds would write as often
        return runner


def serve(
    deployments: Sequence[Any],
    limit: Optional[int] = None,
    runner_class: type[QuarantiningRunner] = QuarantiningRunner,
    **runner_options: Any,
) -> None:
    """`prefect.serve(*deployments, limit=limit)` with a `QuarantiningRunner` (or the subclass `runner_class`,
    given `runner_options`) and bounded parameter schemas."""
    from prefect.exceptions import TerminationSignal

    runner = runner_class(pause_on_shutdown=True, limit=limit, **runner_options)
    ids: list[UUID] = []
    for deployment in deployments:
        ids.append(cast(UUID, runner.add_deployment(deployment)))  # called outside an event loop: the sync form
        bound_deployment_schemas(ids[-1:])  # at once: until then, the quarantine is the only guard
    print(f"Serving {len(ids)} deployments and polling for scheduled runs (Ctrl-C stops).", flush=True)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal) as exc:
        logger.info("Received %s, shutting down...", type(exc).__name__)


def guard_worker(worker: Any, pool: str) -> None:
    """Make `worker` (a Prefect `BaseWorker`, not started) quarantine the unreadable runs of `pool` when its
    poll answers 5xx, then poll again; through its public `get_and_submit_flow_runs`."""
    original = worker.get_and_submit_flow_runs
    scope = {"work_pools": {"name": {"any_": [pool]}}}

    async def get_and_submit_flow_runs() -> Any:
        try:
            return await original()
        except httpx.HTTPStatusError as err:
            if err.response.status_code < 500 or not await _quarantined_any(worker.client, scope):
                raise
        return await original()

    worker.get_and_submit_flow_runs = get_and_submit_flow_runs


def run_worker(pool: str, limit: Optional[int] = None, name: Optional[str] = None) -> None:
    """`prefect worker start --pool POOL --type process [--limit N]`, with `guard_worker`, until interrupted."""
    from prefect.exceptions import TerminationSignal
    from prefect.utilities.processutils import setup_signal_handlers_worker
    from prefect.workers.process import ProcessWorker

    worker = ProcessWorker(work_pool_name=pool, limit=limit, name=name)
    guard_worker(worker, pool)
    setup_signal_handlers_worker(os.getpid(), "the process worker", print)
    try:
        asyncio.run(worker.start(printer=print))
    except (KeyboardInterrupt, TerminationSignal) as exc:
        logger.info("Received %s, worker stopped", type(exc).__name__)
