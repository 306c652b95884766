"""`gate_champion`: score the champion and the challenger on the same data, decide, serve-check, move `champion`.

The gate after registration (`flows/shipping.py` calls it as a Prefect task):

1. resolve `@champion` now to a version number;
2. the eval set (`outcomes.load_eval_set(data)`: the loader's eval split, its
   digest); each version's per-example outcomes through its SavedModel's
   serving signature, cached by (SavedModel digest, eval digest): a nightly
   gate re-scores only the challenger, and the champion again only when the
   eval data changed. The challenger's own export is scored when it is still
   there with the registered digest; otherwise (and for the champion) the
   registered model is downloaded;
3. the pure rule (`registry.gate.decide_gate`); `incomparable` asks for
   approval (`approval.py`: a pause with a form in a flow run, or the CLI's
   `--approve` / `--reject`);
4. before `champion` moves: the serving check of the registered version
   (`serving_check.check_serving`: `mlflow models serve`, REST requests built
   from the eval inputs, answers compared with the in-process outputs,
   limits from `GateConfig.serving`; also `tensorflow_model_server` where it
   is on PATH); a failure keeps the champion, naming it;
5. the move under the registered model's lock, guarded by the champion read
   in step 1 (`aliases.move_alias(expected_from=...)`); if another gate moved
   it meanwhile, the gate runs once more against the new champion (its
   outcomes are cached), then gives up with "kept".

Every decision is recorded: `prefect_tensorflow.gate.*` tags on the challenger
version (`gate.json` holds the whole decision, read back by
`model_versions.recorded_decision`), and an MLflow evaluation run
(`evaluation_run.py`) with the eval data as its input and both scores.

Example:
    >>> from prefect_tensorflow.tasks.promotion.champion_gate import GATE_TAG
    >>> GATE_TAG + "state"
    'prefect_tensorflow.gate.state'
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

from ..configs import GateConfig
from ..errors import RegistryError
from ..export.export_base import saved_model_digest
from ..metric_order import default_mode
from ..registry.gate import GateState
from ..registry.mlflow_connection import MlflowConfig
from ..registry.model_versions import CHAMPION, DECISION_JSON, RegisteredVersion
from ..registry.tracking import TAG_PREFIX
from ..run_context import get_logger
from .approval import Decision, ask_approval, settle
from .evaluation_run import check_tag, verdict

GATE_TAG = TAG_PREFIX + "gate."
SERVED_FILE = "saved_model.pb"
# rows of the eval set sent to the scoring server: enough for p50/p99 and both request formats
SERVING_ROWS = 64


def gate_champion(
    registered: RegisteredVersion,
    connection: MlflowConfig,
    gate: GateConfig,
    *,
    data: Optional[Any],
    head: str = "classifier",
    decision: Optional[Decision] = None,
) -> Any:
    """Decide whether `registered` takes `champion`, on both versions' outcomes on the same eval data; move it if so.

    Args:
        registered: the version `register_model_version` created (it holds `challenger`).
        connection: the MLflow connection of the registry.
        gate: the rule (`GateConfig`): metric, margins, guardrails, slices, floors, serving limits,
            the approval timeout.
        data: the dataset loader whose eval split both versions are scored on (`"iris"`,
            `"module:attr"`, or a `DataSource`: the challenger's window, with the loader's options);
            None: no eval data, the champion is kept (stated).
        head: how outputs become per-example metrics: "classifier" or "raw".
        decision: an answer given in advance for an incomparable decision ("approve" / "reject");
            None: a flow run pauses for it.

    Returns:
        The `GateDecision` (state, reason, both versions and scores, the interval, each check).

    Raises:
        RegistryError: the registered version's model cannot be read back (nothing moves).
        MlflowUnavailableError: the server still failed after the retries.

    Example:
        >>> from prefect import flow
        >>> from prefect_tensorflow.tasks import gate_champion
        >>> @flow
        ... def promote(registered, connection, gate) -> str:
        ...     return gate_champion(registered, connection, gate, data="iris").state
    """
    log = get_logger()
    client = connection.client()
    name, version = registered.name, registered.version
    if data is None:
        champion = connection.retrying("reading @champion", _champion_version, client, name)
        result = stated_decision(
            "kept", "no eval data (data=None): nothing to score both versions on; champion kept", gate, version, champion
        )
        _record(connection, client, registered, result)
        return result

    from . import outcomes as scoring

    eval_set = scoring.load_eval_set(data)
    cache = scoring.OutcomeCache()
    with tempfile.TemporaryDirectory(prefix="prefect-tensorflow-gate-") as workdir:
        scorer = _Scorer(connection, client, name, eval_set, cache, head, workdir)
        challenger = scorer.outcomes(version)
        approved = None
        serving_report = None
        result = None
        for attempt in (1, 2):
            champion_version = connection.retrying("reading @champion", _champion_version, client, name)
            result = _decide(scorer, challenger, champion_version, gate, version)
            if result.state == "incomparable":
                if approved is None:  # asked once per gate: a re-gate after a moved champion reuses the answer
                    approved = ask_approval(_question(registered, result), gate.approval_timeout_seconds, decision=decision)
                result = settle(result, approved)
            if not result.promoted or result.state == "already_champion":
                break
            if serving_report is None:
                serving_report = scorer.serving_check(version, challenger, gate)
            if not serving_report.ok:
                result = result.model_copy(
                    update={
                        "state": "kept",
                        "promoted": False,
                        "reason": f"serving check failed ({serving_report.server}): {serving_report.reason}; champion kept "
                        f"(the rule said: {result.reason})",
                    }
                )
                break
            moved = _move(connection, client, name, version, champion_version, result.reason)
            if moved is None:
                break
            if attempt == 2:
                result = result.model_copy(
                    update={
                        "state": "kept",
                        "promoted": False,
                        "reason": f"champion moved ({f'to v{moved}' if moved > 0 else 'removed'}) while this gate ran, "
                        "twice; champion kept "
                        f"(the rule said: {result.reason})",
                    }
                )
                break
            log.warning("champion gate: %s @champion moved to v%s since it was read; gating again against it", name, moved)
        assert result is not None
        champion_out = scorer.cached.get(result.champion_version) if result.champion_version != version else None
        run_id = _record(connection, client, registered, result, eval_set=eval_set, challenger=challenger, champion=champion_out)
    log.info("champion gate for %s version %s: %s: %s (evaluation run %s)", name, version, result.state, result.reason, run_id)
    return result


def _champion_version(client: Any, name: str) -> Optional[int]:
    from ..registry.aliases import current_alias_version

    return current_alias_version(client, name, CHAMPION)


def _decide(scorer: _Scorer, challenger: Any, champion_version: Optional[int], gate: GateConfig, version: int) -> Any:
    """The rule's decision against `champion_version`; a champion that cannot be scored is `incomparable`."""
    from ..registry.gate import decide_gate

    if champion_version == version:
        return stated_decision("already_champion", f"v{version} is already champion", gate, version, version)
    champion = None
    if champion_version is not None:
        try:
            champion = scorer.outcomes(champion_version)
        except Exception as err:  # noqa: BLE001 - any failure to read or load the champion is stated, not raised
            return stated_decision(
                "incomparable", f"champion v{champion_version} cannot be scored: {_short(err)}", gate, version, champion_version
            )
    return decide_gate(challenger, champion, gate, challenger_version=version, champion_version=champion_version)


def _move(
    connection: MlflowConfig, client: Any, name: str, version: int, expected_from: Optional[int], reason: str
) -> Optional[int]:
    """Move `champion` to `version` if it still names `expected_from`: None when moved, else where it is now."""
    from ..registry.aliases import AliasMovedError, move_alias, registry_lock

    def guarded() -> Optional[int]:
        with registry_lock(name):
            try:
                move_alias(client, name, CHAMPION, version, expected_from=expected_from, reason=reason, kind="gate")
            except AliasMovedError as err:
                if err.current == version:  # our own move, its answer lost and the call retried
                    return None
                return int(err.current) if isinstance(err.current, (int, str)) else -1  # -1: the alias was removed
        return None

    return connection.retrying(f"moving @champion of {name!r} to v{version}", guarded)


def stated_decision(
    state: GateState, reason: str, gate: GateConfig, challenger_version: int, champion_version: Optional[int]
) -> Any:
    """A `GateDecision` the rule did not compute (no eval data, already champion, a champion that does not load).

    Example:
        >>> from prefect_tensorflow.tasks.configs import GateConfig
        >>> stated_decision("kept", "no eval data", GateConfig(), 2, 1).promoted
        False
    """
    from ..registry.gate import GateDecision

    return GateDecision(
        state=state,
        promoted=state in ("promoted", "first_version", "already_champion"),
        reason=reason,
        metric=gate.metric,
        mode=gate.mode or default_mode(gate.metric),
        challenger_version=challenger_version,
        champion_version=champion_version,
        challenger_value=None,
        champion_value=None,
        difference=None,
        interval=None,
        confidence=gate.confidence,
        method=None,
        p_value=None,
        checks=[],
        eval_digest=None,
    )


def _question(registered: RegisteredVersion, decision: Any) -> str:
    return (
        f"**Champion gate: {registered.name} v{registered.version} cannot be compared with champion "
        f"v{decision.champion_version}.**\n\n{decision.reason}\n\nApprove to make v{registered.version} champion "
        f"(it still has to pass the serving check); reject to keep v{decision.champion_version}. "
        f"[The version in MLflow]({registered.version_url})"
    )


class _Scorer:
    """Per-version outcomes (cached), the local SavedModels they came from, and the serving check."""

    def __init__(self, connection: MlflowConfig, client: Any, name: str, eval_set: Any, cache: Any, head: str, workdir: str):
        self.connection, self.client, self.name = connection, client, name
        self.eval_set, self.cache, self.head, self.workdir = eval_set, cache, head, workdir
        self.cached: dict[int, Any] = {}
        self.local: dict[int, str] = {}

    def _model_version(self, version: int) -> Any:
        return self.connection.retrying(
            f"reading {self.name!r} version {version}", self.client.get_model_version, self.name, str(version)
        )

    def outcomes(self, version: int) -> Any:
        """`version`'s outcomes on the eval set: from the cache by (SavedModel digest, eval digest), else scored."""
        from . import outcomes as scoring

        if version in self.cached:
            return self.cached[version]
        digest = self._model_version(version).tags.get(TAG_PREFIX + "export.sha256")
        found = self.cache.get(digest, self.eval_set.digest) if digest else None
        if found is not None and getattr(found, "head", self.head) != self.head:
            found = None  # scored for another head: its per-example metrics are not these
        if found is None:
            found = scoring.score_saved_model(self.local_saved_model(version), self.eval_set, head=self.head)
            self.cache.put(found)
        self.cached[version] = found
        return found

    def local_saved_model(self, version: int) -> str:
        """A local SavedModel directory of `version`: its export when unchanged, else the registered model's copy."""
        if version in self.local:
            return self.local[version]
        mv = self._model_version(version)
        digest = mv.tags.get(TAG_PREFIX + "export.sha256")
        export_dir = mv.tags.get(TAG_PREFIX + "export.dir", "")
        if digest and os.path.isfile(os.path.join(export_dir, SERVED_FILE)) and saved_model_digest(export_dir) == digest:
            path = export_dir
        else:
            path = self.connection.retrying(f"downloading {self.name!r} version {version}", self._download, mv)
            if digest and saved_model_digest(path) != digest:
                raise RegistryError(
                    f"{self.name} version {version}: its registered SavedModel differs from the export it was "
                    f"registered from (expected digest {digest})"
                )
        self.local[version] = path
        return path

    def _download(self, mv: Any) -> str:
        from ..registry import mlflow_client

        model_id = mv.model_id or _model_id_of_source(mv.source)
        if not model_id:
            raise RegistryError(f"{self.name} version {mv.version}: not a logged model (no model id); cannot read it")
        target = os.path.join(self.workdir, f"v{mv.version}")
        local = mlflow_client.download_logged_model(self.client, model_id, target)
        artifacts = os.path.join(local, "artifacts")
        found = sorted(
            os.path.join(artifacts, d)
            for d in (os.listdir(artifacts) if os.path.isdir(artifacts) else [])
            if os.path.isfile(os.path.join(artifacts, d, SERVED_FILE))
        )
        if not found:
            raise RegistryError(f"{self.name} version {mv.version}: no SavedModel under artifacts/ of its logged model")
        return found[0]

    def serving_check(self, version: int, challenger: Any, gate: GateConfig) -> Any:
        """`check_serving` of the registered version, with eval rows and the in-process outputs as expected.

        Where `tensorflow_model_server` is on PATH, the version must also answer the same in it
        (`check_tf_serving`); the report recorded is the first that failed, else the last.
        """
        from ..export.verification import run_saved_model
        from .serving_check import check_serving, check_tf_serving, record_serving_report, tensorflow_model_server

        names = sorted(challenger.signature["inputs"])
        features = [f[:SERVING_ROWS] for f in self.eval_set.features]
        inputs = dict(zip(names, features))
        try:
            expected = run_saved_model(self.local_saved_model(version), features, input_names=names)
        except Exception as err:  # noqa: BLE001 - stated as a failed check
            from .serving_check import ServingReport

            return ServingReport(
                ok=False,
                reason=f"the SavedModel does not run in process: {_short(err)}",
                server="load-only",
                load_seconds=None,
                p50_ms=None,
                p99_ms=None,
                peak_memory_mb=None,
                max_abs_diff=None,
                formats=[],
            )
        report = check_serving(f"models:/{self.name}/{version}", self.connection, inputs, expected, limits=gate.serving)
        if report.ok and tensorflow_model_server() is not None:  # what TF Serving users serve with, where installed
            report = check_tf_serving(self.local_saved_model(version), inputs, expected, limits=gate.serving)
        self.connection.retrying("recording the serving check", record_serving_report, self.client, self.name, version, report)
        return report


def _model_id_of_source(source: Optional[str]) -> Optional[str]:
    """The logged model id in a version's source `models:/<model id>` (a server may leave `model_id` empty).

    Example:
        >>> _model_id_of_source("models:/m-0123abcd"), _model_id_of_source("s3://bucket/x")
        ('m-0123abcd', None)
    """
    if source and source.startswith("models:/m-") and "/" not in source[len("models:/") :]:
        return source[len("models:/") :]
    return None


def decision_tags(decision: Any) -> dict[str, str]:
    """The version tags of a decision: short keys for people, `gate.json` for `recorded_decision`.

    Example:
        >>> from prefect_tensorflow.tasks.configs import GateConfig
        >>> tags = decision_tags(stated_decision("kept", "no eval data", GateConfig(), 2, 1))
        >>> tags["prefect_tensorflow.gate.state"], tags["prefect_tensorflow.gate.champion_version"]
        ('kept', '1')
    """

    def text(value: Any) -> str:
        return "" if value is None else str(value)

    tags = {
        "state": decision.state,
        "decision": "promoted to champion" if decision.promoted else "champion kept",
        "reason": decision.reason[:5000],
        "metric": text(decision.metric),
        "mode": text(decision.mode),
        "challenger_version": text(decision.challenger_version),
        "champion_version": text(decision.champion_version),
        "challenger_value": text(decision.challenger_value),
        "champion_value": text(decision.champion_value),
        "difference": text(decision.difference),
        "interval": "" if decision.interval is None else f"[{decision.interval[0]:.6g}, {decision.interval[1]:.6g}]",
        "confidence": text(decision.confidence),
        "method": text(decision.method),
        "p_value": text(decision.p_value),
        "eval_digest": text(decision.eval_digest),
    }
    for check in decision.checks:
        tags[check_tag(check.name)] = f"{verdict(check)}: {check.reason}"[:5000]
    out = {GATE_TAG + key: value for key, value in tags.items()}
    out[DECISION_JSON] = decision.model_dump_json()
    return out


def _record(
    connection: MlflowConfig,
    client: Any,
    registered: RegisteredVersion,
    decision: Any,
    *,
    eval_set: Any = None,
    challenger: Any = None,
    champion: Any = None,
) -> Optional[str]:
    """The decision as version tags and an MLflow evaluation run (its id, tagged on the version too)."""
    from .evaluation_run import log_evaluation_run

    tags = decision_tags(decision)
    run_id = None
    if eval_set is not None:
        run_id = connection.retrying(
            "logging the gate's evaluation run",
            log_evaluation_run,
            connection,
            client,
            registered,
            decision,
            eval_set,
            challenger,
            champion,
        )
        tags[GATE_TAG + "evaluation_run_id"] = run_id

    def write() -> None:
        for key, value in tags.items():
            client.set_model_version_tag(registered.name, str(registered.version), key, value)

    connection.retrying(f"recording the gate decision on {registered.name!r} version {registered.version}", write)
    return run_id


def _short(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
