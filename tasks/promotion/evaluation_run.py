"""The MLflow evaluation run of a gate: the eval data as the run's input, both versions' scores, the decision.

One run per gate in the connection's experiment, named
`gate-<model>-v<version>`: the eval set is logged as a dataset input
(digest, source, context `evaluation`), the primary metric of each version
as `challenger.<metric>` / `champion.<metric>`, the paired `difference` and
its interval (`ci_low`, `ci_high`), every other supported metric of both
versions, and the decision as tags (`prefect_tensorflow.gate.*`). Everything
goes through the connection's own client (no fluent API, no globals).

MLflow keeps a dataset digest to 36 characters: the logged digest is the
eval digest's first 36 (`sha256:` + 29 hex digits); the run's tag
`prefect_tensorflow.gate.eval_digest` and the dataset's profile hold it whole.

Example:
    >>> from prefect_tensorflow.tasks.promotion.evaluation_run import dataset_digest
    >>> dataset_digest("sha256:" + "ab" * 32)
    'sha256:ababababababababababababababa'
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Optional

from ..registry.tracking import TAG_PREFIX
from ..run_context import prefect_run_tags

MAX_DIGEST = 36


def dataset_digest(eval_digest: str) -> str:
    """The eval digest as MLflow stores a dataset digest (at most 36 characters)."""
    return eval_digest[:MAX_DIGEST]


def _metrics(prefix: str, outcomes: Any) -> dict[str, float]:
    values = {}
    for metric in sorted(outcomes.per_example):
        value = outcomes.value(metric)
        if value == value and abs(value) != float("inf"):  # MLflow stores no NaN/inf metric: the tags say why
            values[f"{prefix}.{metric}"] = float(value)
    return values


def verdict(check: Any) -> str:
    """A check's verdict for a tag: `pass`, `FAIL`, or `shown` (a failed check that does not gate)."""
    if check.passed:
        return "pass"
    return "FAIL" if getattr(check, "gating", True) else "shown"


def check_tag(name: str) -> str:
    """`check.<name>`, in the characters MLflow allows in a tag key (`slice class=0` -> `check.slice class_0`).

    Example:
        >>> check_tag("slice class=0")
        'check.slice class_0'
    """
    return "check." + re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)[:200]


def log_evaluation_run(
    connection: Any,
    client: Any,
    registered: Any,
    decision: Any,
    eval_set: Any,
    challenger: Any,
    champion: Optional[Any],
) -> str:
    """Log the gate's evaluation run; returns its run id.

    Args:
        connection: the `MlflowConfig` (its experiment).
        client: its client.
        registered: the challenger's `RegisteredVersion`.
        decision: the `GateDecision`.
        eval_set: the `EvalSet` both versions were scored on.
        challenger: the challenger's `Outcomes`.
        champion: the champion's `Outcomes`, or None (no champion, or it could not be scored).
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, RunTag

    experiment_id = connection.experiment_id()
    tags = {
        **prefect_run_tags(),
        TAG_PREFIX + "stage": "gate",
        TAG_PREFIX + "gate.model": registered.name,
        TAG_PREFIX + "gate.challenger_version": str(decision.challenger_version),
        TAG_PREFIX + "gate.champion_version": "" if decision.champion_version is None else str(decision.champion_version),
        TAG_PREFIX + "gate.state": decision.state,
        TAG_PREFIX + "gate.promoted": str(decision.promoted).lower(),
        TAG_PREFIX + "gate.reason": decision.reason[:7900],
        TAG_PREFIX + "gate.eval_digest": eval_set.digest,
        TAG_PREFIX + "gate.eval_source": eval_set.source,
        "mlflow.note.content": f"Champion gate of {registered.name} v{registered.version}: **{decision.state}**: {decision.reason}"[
            :7900
        ],
    }
    run = client.create_run(experiment_id, run_name=f"gate-{registered.name}-v{registered.version}", tags=tags)
    run_id = run.info.run_id
    schema = json.dumps(
        {
            "features": [[str(f.dtype), list(f.shape)] for f in eval_set.features],
            "labels": [str(eval_set.labels.dtype), list(eval_set.labels.shape)],
        }
    )
    dataset = Dataset(
        name=eval_set.source,
        digest=dataset_digest(eval_set.digest),
        source_type="prefect_tensorflow",
        source=json.dumps({"loader": eval_set.source}),
        schema=schema,
        profile=json.dumps(
            {"num_rows": int(eval_set.labels.shape[0]), "digest": eval_set.digest, "slices": sorted(eval_set.slices)}
        ),
    )
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "evaluation")])])
    values = _metrics("challenger", challenger)
    if champion is not None:
        values.update(_metrics("champion", champion))
    for key, value in (("difference", decision.difference), ("p_value", decision.p_value)):
        if value is not None:
            values[key] = float(value)
    if decision.interval is not None:
        values["ci_low"], values["ci_high"] = float(decision.interval[0]), float(decision.interval[1])
    now = int(time.time() * 1000)
    checks = [RunTag(f"{TAG_PREFIX}gate.{check_tag(c.name)}", f"{verdict(c)}: {c.reason}"[:7900]) for c in decision.checks]
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in values.items()], tags=checks)
    client.set_terminated(run_id)
    return run_id
