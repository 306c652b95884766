"""Hostile parameters typed into the Run form of a real served deployment: all refused, nothing touched.

Whoever can press Run in the Prefect UI can send any JSON as a deployment's
parameters, and the run acts with the worker's rights. This module serves the
deployments for real (export-checkpoint, retrain-iris, sweep-iris, and issue 20's
rollback-champion and sync-exports; the gate's fields and `decision` too) with
`prefect server start` + `prefect-tensorflow serve --limit`, as `make serve`
does, with `PREFECT_TENSORFLOW_HOME` and
`PREFECT_TENSORFLOW_ROOTS` under a test root and a trained model dir copied
under the roots, then sends a table of hostile values, one (parameter, value)
pair per flow run, through the API the Run form posts to
(`client.create_flow_run_from_deployment`; a raw POST of the same body where
the client cannot encode the value, i.e. lone surrogates).

A pair is refused when either
- the server rejects the parameters at creation (the deployment's enforced
  parameter schema, or the API's parameter size limit), or
- the run ends Failed with a state message that names the parameter.

Every pair refused at creation is sent again with "Enforce Parameter Schema"
switched off (the Run form has that switch; the POST carries
`enforce_parameter_schema: false`): the schema is a convenience any user can
turn off, so the flows' own checks must refuse those values too.

Before and after the whole matrix it takes a snapshot of the filesystem (the
whole test root: the roots, the trained model dir, a canary dir outside the
roots with a model dir and a few sensitive files, the session's trained dir)
as (path, size, mtime, sha1) tuples, and of the MLflow store (registered
models, versions, aliases and tags; experiments and runs). Outside each run's
own output directory nothing may change; paths in the hostile values name the
case, so any change says which pair did it. A benign run through the same
machinery (`test_a_benign_run_through_the_same_machinery_changes_what_it_should`)
shows the snapshots do see writes and that the baseline parameters work.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Optional

import pytest
from served import REPO, ServedDeployments
from snapshots import tree_snapshot

from prefect_tensorflow.tasks.child_processes import log_tail
from prefect_tensorflow.tasks.data.synthetic import write_daily_dataset

# About 200 pairs (and ~35 replays with the schema off) reach a flow run, each a process that imports
# Prefect and the flows (~3 CPU-s): ~8 min on 2 cores shared with another test run.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
LIMIT = 6  # flow runs the serve process runs at once (`serve --limit`)
MATRIX_TIMEOUT = 2400  # seconds for every run of the matrix to end
IN_FLIGHT = 2 * LIMIT  # runs created and not yet ended: each of the runner's polls (2 s) finds the next ones
POLL = 0.5  # seconds between reads of the unfinished runs' states
TOKEN = uuid.uuid4().hex[:8]  # in every path a hostile value names outside the test root
BIG = 10 * 1024 * 1024  # a 10 MB string: over the API's parameter size limit (512 KiB)
LARGE = 400 * 1024  # a 400 KB string: under that limit, so it reaches the flow
DEPLOYMENTS = (
    "export-checkpoint",
    "retrain-iris",
    "sweep-iris",
    "rollback-champion",
    "sync-exports",
    "data-sensor",
    "retrain-daily",
)
TARGET = "hostile-target"  # the registered model the baseline parameters would register to
SURROGATE = "lone-surrogate"  # pairs left out here: a run the API cannot read has its own test (test_unreadable_runs.py)


# --- the served deployments ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, trained_dir, prefect_database):
    """Both deployments served for real, confined to `<root>/roots`; the layout the snapshots watch.

    <root>/roots/               PREFECT_TENSORFLOW_ROOTS
        data/                   PREFECT_TENSORFLOW_HOME (the worker's MLflow store in data/mlflow)
        data/runs/<case>/       each run's own output (export_base, frozen_dir; retrain's model dir copy)
        models/iris/            the trained model dir (a copy of the session's)
        models/photos/          a directory that is not a model dir
        escape -> <root>/canary a symlink inside the roots pointing out of them
    <root>/rootmodel/           a second root that is itself a model dir (from_scratch must not move it)
    <root>/train/, eval/        in the runs' working directory: what a loader `rmtree` would delete
    <root>/canary/              outside the roots: a model dir, a non-model dir, sensitive files
    <root>/pylib/               on the worker's PYTHONPATH, not allowed: importing it leaves a mark
    """
    root = tmp_path_factory.mktemp("hostile")
    roots, canary = root / "roots", root / "canary"
    data = roots / "data"
    for path in (data / "runs", roots / "models" / "photos", canary / ".ssh", canary / "important", root / "pylib"):
        path.mkdir(parents=True)
    for split in ("train", "eval"):
        (root / split).mkdir()
        (root / split / "part-0.csv").write_text("5.1,3.5,1.4,0.2,0\n")
    shutil.copytree(trained_dir, root / "rootmodel")
    shutil.copytree(trained_dir, roots / "models" / "iris")
    shutil.copytree(trained_dir, canary / "iris")
    (roots / "models" / "photos" / "cat.jpg").write_bytes(os.urandom(2048))
    (roots / "escape").symlink_to(canary)
    (canary / ".ssh" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-real-key\n")
    (canary / "secrets.env").write_text("AWS_SECRET_ACCESS_KEY=canary\n")
    (canary / "important" / "thesis.tex").write_text("\\documentclass{article}\n")
    (root / "pylib" / "side_effect_models.py").write_text(
        f"open({str(canary / 'IMPORTED')!r}, 'w').close()\n\ndef build(**kwargs):\n    raise SystemExit(3)\n"
    )

    environ = ServedDeployments.environ_for(
        root,
        PREFECT_TENSORFLOW_HOME=str(data),
        PREFECT_TENSORFLOW_ROOTS=f"{roots},{root / 'rootmodel'}",
        PREFECT_TENSORFLOW_ALLOWED_MODULES="models_for_tests",
        MLFLOW_TRACKING_URI=f"sqlite:///{data}/mlflow/mlflow.db",
        PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(root / "pylib")]),
    )
    stack = ServedDeployments(root, environ, limit=LIMIT, database=prefect_database)
    ctx = {
        "root": root,
        "roots": roots,
        "data": data,
        "canary": canary,
        "trained": roots / "models" / "iris",
        "session_trained": Path(trained_dir),
        "environ": environ,
        "mlflow_uri": environ["MLFLOW_TRACKING_URI"],
        "stack": stack,
    }
    _seed_registry(ctx)
    try:
        stack.start_server()
        ctx["outside_block"] = stack.save_block(
            "outside-roots", tracking_uri=f"sqlite:///{canary}/mlflow/mlflow.db", experiment_name="hostile"
        )
        ctx["blocks"] = {
            label: stack.save_block(f"store-{label}", experiment_name="hostile", **fields)
            for label, fields in _store_blocks(ctx).items()
        }
        stack.start_serve()
        deadline = time.monotonic() + 60
        while not set(DEPLOYMENTS) <= set(stack.deployments) and time.monotonic() < deadline:  # created in turn
            time.sleep(1)
            with stack.api() as client:
                stack.deployments = {d.name: str(d.id) for d in client.read_deployments() if not d.paused}
        yield ctx
    finally:
        stack.stop()


STORE_BLOCKS = (
    "relative-sqlite",
    "upper-case-scheme",
    "percent-encoded-dots",
    "file-store",
    "registry-outside",
)


def _saved_block(ctx, label: str) -> dict[str, Any]:
    """The Run form's value for a saved block: a reference to its document."""
    return {"$ref": {"block_document_id": ctx["blocks"][label]}}


def _store_blocks(ctx) -> dict[str, dict[str, str]]:
    """Saved blocks (any API user can save one) naming MLflow stores that look inside the roots to a
    naive check but are outside as MLflow and SQLAlchemy read them."""
    canary, roots, data = ctx["canary"], ctx["roots"], ctx["data"]
    return {
        "relative-sqlite": {"tracking_uri": f"sqlite:///relative-{TOKEN}/mlflow.db"},  # the runs' working dir
        "upper-case-scheme": {"tracking_uri": f"SQLITE:///{canary}/upper.db"},
        "percent-encoded-dots": {"tracking_uri": f"sqlite:///{roots}/data/%2e%2e/%2e%2e/canary/percent.db"},
        "file-store": {"tracking_uri": f"file://{canary}/mlruns"},
        "registry-outside": {"tracking_uri": f"sqlite:///{data}/mlflow/mlflow.db", "registry_uri": f"SQLITE:///{canary}/r.db"},
    }


def _seed_registry(ctx) -> None:
    """The worker's MLflow store holds a registered model `iris` with a champion version, so that a
    hostile run that moved an alias, tagged or added a version would show in the snapshot."""
    from mlflow import MlflowClient

    (ctx["data"] / "mlflow" / "artifacts").mkdir(parents=True)
    client = MlflowClient(ctx["mlflow_uri"], ctx["mlflow_uri"])
    experiment = client.create_experiment("seed", artifact_location=f"file://{ctx['data']}/mlflow/artifacts")
    run = client.create_run(experiment, run_name="seed")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("iris", tags={"prefect_tensorflow.registered_by": "prefect-tensorflow"})
    version = client.create_model_version("iris", f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags={"seed": "1"})
    client.set_registered_model_alias("iris", "champion", version.version)


# --- the matrix ----------------------------------------------------------------------------------


@dataclass
class Case:
    """One (deployment, parameter, hostile value) pair; `value(ctx, case)` builds the value."""

    deployment: str
    parameter: str  # dotted: "training.policy.checkpoint_name"
    label: str
    value: Callable[[dict, Case], Any]
    names: tuple[str, ...] = ()  # a refusal must contain one of these; default: the parameter's last part
    extra: dict[str, Any] = field(default_factory=dict)  # other parameters the pair needs (from_scratch)
    # filled in while the matrix runs
    id: str = ""
    run_id: Optional[str] = None
    created_error: Optional[str] = None
    created_status: Optional[int] = None
    state: Optional[str] = None
    message: str = ""
    replay: Optional[Case] = None  # the same pair sent with the schema switched off

    def expected_names(self) -> tuple[str, ...]:
        return self.names or (self.parameter.rsplit(".", 1)[-1],)

    @property
    def refused_at_creation(self) -> bool:
        """A 4xx answer to the create request (a 5xx may come after the run was stored: no refusal)."""
        return self.created_status is not None and 400 <= self.created_status < 500

    @property
    def refused_at_run_time(self) -> bool:
        return self.state == "FAILED"

    @property
    def refused(self) -> bool:
        return self.refused_at_creation or self.refused_at_run_time

    @property
    def size_limited(self) -> bool:
        return self.created_error is not None and "Flow run parameters must be less than" in self.created_error

    @property
    def named(self) -> bool:
        """The refusal names the parameter (the API's size limit covers the whole request: it names none)."""
        text = self.created_error if self.refused_at_creation else self.message
        return self.size_limited or any(name in (text or "") for name in self.expected_names())

    def describe(self) -> str:
        outcome = f"creation: {self.created_error}" if self.created_error else f"{self.state}: {self.message}"
        return f"[{self.id}] {self.deployment} {self.parameter}={self.label}: {_short(outcome, 400)}"


def const(value: Any) -> Callable[[dict, Case], Any]:
    return lambda ctx, case: value


Value = Callable[[dict, Case], Any]
PATHS: dict[str, Value] = {
    "dotdot": lambda ctx, case: f"{ctx['data']}/../../canary/{case.id}",
    "dotdot-relative": const("../../../../../../../../etc"),
    "/etc": const("/etc"),
    "/root": const("/root"),
    "/tmp/elsewhere": lambda ctx, case: f"/tmp/elsewhere-{TOKEN}-{case.id}",
    "symlink-out": lambda ctx, case: f"{ctx['roots']}/escape/{case.id}",
    "/proc/self/environ": const("/proc/self/environ"),
    "file-uri-out": const("file:///etc"),
    "os:system": const("os:system"),
    "NUL": lambda ctx, case: f"{ctx['data']}/runs/{case.id}/x\x00y",
    SURROGATE: lambda ctx, case: f"{ctx['data']}/runs/{case.id}/\udcff",
    "400KB": lambda ctx, case: f"{ctx['data']}/" + "a" * LARGE,
    "10MB": const("a" * BIG),
    # a real model dir out of reach: what an export would read, or training would write into
    "model-dir-outside-roots": lambda ctx, case: str(ctx["canary"] / "iris"),
    "session-trained-dir": lambda ctx, case: str(ctx["session_trained"]),
    "symlink-to-model-dir": lambda ctx, case: f"{ctx['roots']}/escape/iris",
    # literal folder names inside the roots that a URI parser (MLflow) would decode or cut
    "percent-encoded-dots": lambda ctx, case: f"{ctx['data']}/runs/{case.id}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/canary",
    "query-fragment": lambda ctx, case: f"{ctx['data']}/runs/{case.id}/x?y=1#z",
}
CODE: dict[str, Value] = {
    "os:system": const("os:system"),
    "shutil:rmtree": const("shutil:rmtree"),
    "subprocess:run": const("subprocess:run"),
    "__import__": const("__import__"),
    "builtins:exec": const("builtins:exec"),
    "not-allowed-module": const("side_effect_models:build"),  # importing it would leave canary/IMPORTED
    "allowed-prefix-lookalike": const("models_for_tests_evil:build"),
    # through an allowed module (models_for_tests imports os and shutil.rmtree)
    "dotted-through-module": const("models_for_tests:os.system"),
    "imported-into-module": const("models_for_tests:rmtree"),
    "private-function": const("models_for_tests:_private_builder"),
    "class-in-module": const("models_for_tests:ModelClass"),
    "dotted-benign": const("models_for_tests:iris.build_model"),
    "path": const("../../etc/passwd"),
    "NUL": const("iris\x00"),
    SURROGATE: const("iris\udcff"),
    "400KB": const("a" * LARGE),
    "10MB": const("a" * BIG),
}
NAMES: dict[str, Value] = {
    "path-separators": const("../../etc/passwd"),
    "slash": const("team/iris"),
    "models-uri": const("models:/iris/1"),
    "NUL": const("iris\x00"),
    SURROGATE: const("iris\udcff"),
    "400KB": const("a" * LARGE),
    "10MB": const("a" * BIG),
}
ALIASES: dict[str, Value] = {
    "path-separators": const(["../../etc/passwd"]),
    "slash": const(["prod/champion"]),
    "reserved-latest": const(["latest"]),
    "reserved-version": const(["v1"]),
    "NUL": const(["staging\x00"]),
    SURROGATE: const(["staging\udcff"]),
    "400KB": const(["a" * LARGE]),
    "10MB": const(["a" * BIG]),
    "not-a-list": const("os:system"),
}
SELECTIONS: dict[str, Value] = {
    "path": const("../../../../etc/passwd"),
    "absolute-path": lambda ctx, case: str(ctx["canary"] / "iris" / "model.ckpt-300"),
    "best-path": const("best:../../etc/passwd"),
    "os:system": const("os:system"),
    "negative": const("-1"),
    "huge": const("9" * 40),
    "bad-mode": const("best:accuracy:sideways"),
    "NUL": const("300\x00"),
    SURROGATE: const("latest\udcff"),
    "400KB": const("a" * LARGE),
    "10MB": const("a" * BIG),
}
METRICS: dict[str, Value] = {
    "os:system": const("os:system"),
    "path": const("../../etc/passwd"),
    "NUL": const("accuracy\x00"),
    SURROGATE: const("accuracy\udcff"),
    "400KB": const("a" * LARGE),
    "10MB": const("a" * BIG),
}
OTHER: dict[str, Value] = {
    "os:system": const("os:system"),
    "NUL": const("max\x00"),
    "number": const(-1),
    "negative": const(-1),
    "zero": const(0),
    "huge": const(10**30),
    "float": const(1e308),
    "text": const("os:system"),
    "true": const(True),
    "dunder-import": const({"__import__": "os"}),
    "import-string-key": const({"builtins:exec": "print(1)"}),
    "dotdot": const("../../../canary/ckpt"),
    "absolute": const("/tmp/ckpt"),
    "ckpt-NUL": const("model\x00.ckpt"),
    SURROGATE: const("model\udcff"),
    "400KB": const("a" * LARGE),
}
MLFLOWS: dict[str, Value] = {
    "inline-sqlite-outside": lambda ctx, case: {"tracking_uri": f"sqlite:///{ctx['canary']}/{case.id}.db"},
    "inline-file-outside": lambda ctx, case: {"tracking_uri": f"file:///tmp/elsewhere-{TOKEN}-{case.id}"},
    "inline-sqlite-inside": lambda ctx, case: {"tracking_uri": f"sqlite:///{ctx['data']}/runs/{case.id}/mlflow.db"},
    "inline-http": const({"tracking_uri": "http://127.0.0.1:9", "username": "x", "password": "y"}),
    "inline-bad-scheme": const({"tracking_uri": "os:system"}),
    "saved-block-outside": lambda ctx, case: {"$ref": {"block_document_id": ctx["outside_block"]}},
    **{f"saved-{label}": lambda ctx, case, label=label: _saved_block(ctx, label) for label in STORE_BLOCKS},
    "text": const("os:system"),
    "10MB": const({"tracking_uri": "sqlite:///" + "a" * BIG}),
}
# the gate's numbers and dicts (GateConfig), rollback's version
NUMBERS: dict[str, Value] = {
    "negative": const(-1),
    "huge": const(10**30),
    "huge-int": const(10**400),  # past float's range: JSON carries it, float() of it overflows
    "text": const("os:system"),
    "NaN": const("NaN"),  # JSON has no NaN; the string is what pydantic would read as one
    "Infinity": const("Infinity"),
}
DICTS: dict[str, Value] = {
    "not-a-dict": const("os:system"),
    "os:system-key": const({"os:system": 0.1}),
    "NaN-value": const({"accuracy": "NaN"}),
    "10MB": const({"a" * BIG: 0.1}),
}
# sync-exports' export base: object storage under the roots only (the roots here are local)
REMOTE: dict[str, Value] = {
    "s3-outside": lambda ctx, case: f"s3://other-bucket-{TOKEN}/{case.id}",
    "gs-outside": lambda ctx, case: f"gs://other-bucket-{TOKEN}/{case.id}",
    "inline-http": const("http://127.0.0.1:9/exports"),
}

# from_scratch moves the model dir aside: only ever a model dir under the roots
SCRATCH_DIRS: dict[str, Value] = {
    "not-a-model-dir": lambda ctx, case: str(ctx["roots"] / "models" / "photos"),
    "the-data-home": lambda ctx, case: str(ctx["data"]),
    "the-roots": lambda ctx, case: str(ctx["roots"]),
    "model-dir-outside-roots": lambda ctx, case: str(ctx["canary"] / "iris"),
    "non-model-dir-through-symlink": lambda ctx, case: f"{ctx['roots']}/escape/important",
    "a-root-that-is-a-model-dir": lambda ctx, case: str(ctx["root"] / "rootmodel"),
}

E, R, S, B = ("export-checkpoint",), ("retrain-iris",), ("sweep-iris",), DEPLOYMENTS[:2]
RB, SY = ("rollback-champion",), ("sync-exports",)
DS, RD = ("data-sensor",), ("retrain-daily",)  # issue 21: the data sensor and the retraining it triggers
# (deployments, parameter, values, labels). Every parameter gets every class of hostile value that
# applies to it; a class that goes through the same check for both flows is sent to one of them
# (alternating), so that the matrix stays within minutes: each run is a process that imports Prefect.
TABLE: list[tuple[tuple[str, ...], str, dict[str, Value], str]] = [
    (B, "model_dir", PATHS, "dotdot /etc symlink-out NUL model-dir-outside-roots lone-surrogate percent-encoded-dots"),
    (E, "model_dir", PATHS, "os:system /proc/self/environ symlink-to-model-dir /root file-uri-out 10MB"),
    (R, "model_dir", PATHS, "400KB session-trained-dir dotdot-relative /tmp/elsewhere"),
    (E, "export_base", PATHS, "dotdot /etc /tmp/elsewhere NUL file-uri-out 10MB percent-encoded-dots query-fragment"),
    (R, "export_base", PATHS, "symlink-out /root /proc/self/environ os:system 400KB lone-surrogate"),
    (E, "frozen_dir", PATHS, "symlink-out /root /proc/self/environ os:system 400KB lone-surrogate"),
    (R, "frozen_dir", PATHS, "dotdot /etc /tmp/elsewhere NUL file-uri-out 10MB percent-encoded-dots"),
    (R, "export_base", PATHS, "query-fragment"),
    (E, "registered_model_name", NAMES, "path-separators models-uri 400KB"),
    (R, "registered_model_name", NAMES, "slash NUL 10MB lone-surrogate"),
    (E, "gate.metric", METRICS, "path NUL 10MB"),
    (R, "gate.metric", METRICS, "os:system 400KB"),
    (E, "gate.mode", OTHER, "os:system"),
    (R, "gate.mode", OTHER, "number NUL"),
    (B, "mlflow", MLFLOWS, "inline-sqlite-outside saved-block-outside text"),
    (E, "mlflow", MLFLOWS, "inline-sqlite-inside inline-bad-scheme 10MB"),
    (R, "mlflow", MLFLOWS, "inline-file-outside inline-http"),
    (E, "mlflow", MLFLOWS, "saved-relative-sqlite saved-percent-encoded-dots saved-file-store"),
    (R, "mlflow", MLFLOWS, "saved-upper-case-scheme saved-registry-outside"),
    (E, "checkpoint", SELECTIONS, "path absolute-path best-path os:system huge bad-mode NUL 400KB 10MB"),
    (R, "select", SELECTIONS, "path best-path os:system NUL 10MB lone-surrogate"),
    (E, "aliases", ALIASES, "path-separators slash reserved-latest reserved-version NUL 400KB 10MB not-a-list lone-surrogate"),
    (
        E,
        "model",
        CODE,
        "os:system shutil:rmtree __import__ builtins:exec not-allowed-module allowed-prefix-lookalike NUL 400KB 10MB "
        "lone-surrogate dotted-through-module imported-into-module private-function class-in-module dotted-benign",
    ),
    (E, "data", CODE, "shutil:rmtree not-allowed-module path 10MB imported-into-module dotted-through-module"),
    (R, "training.model", CODE, "os:system builtins:exec not-allowed-module allowed-prefix-lookalike 10MB class-in-module"),
    (R, "training.data", CODE, "shutil:rmtree subprocess:run NUL 10MB imported-into-module private-function"),
    (R, "training.steps", OTHER, "negative huge float text"),
    (R, "training.more_steps", OTHER, "negative huge"),
    (R, "training.batch_size", OTHER, "zero huge"),
    (R, "training.seed", OTHER, "negative huge"),
    (R, "training.workers", OTHER, "huge"),
    (R, "training.shuffle_buffer", OTHER, "huge"),
    (R, "training.hparams", OTHER, "dunder-import import-string-key text"),
    (R, "training.__import__", OTHER, "text"),
    (R, "training.policy.save_checkpoints_steps", OTHER, "zero"),
    (R, "training.policy.save_checkpoints_secs", OTHER, "negative text"),
    (R, "training.policy.keep_checkpoint_max", OTHER, "negative"),
    (R, "training.policy.keep_checkpoint_every_n_hours", OTHER, "negative"),
    (R, "training.policy.async_save", OTHER, "text"),
    (R, "training.policy.__import__", OTHER, "text"),
    (R, "training.policy.checkpoint_name", OTHER, "dotdot absolute ckpt-NUL 400KB lone-surrogate"),
    (R, "from_scratch", OTHER, "text"),
    # sweep-iris goes through the same prelude checks: one value of each class
    (S, "sweep_root", PATHS, "dotdot symlink-out percent-encoded-dots"),
    (S, "export_base", PATHS, "query-fragment /etc"),
    (S, "training.model", CODE, "os:system dotted-through-module imported-into-module"),
    (S, "training.data", CODE, "not-allowed-module private-function"),
    (S, "mlflow", MLFLOWS, "inline-http saved-block-outside saved-upper-case-scheme saved-relative-sqlite"),
    # issue 20: the gate's new fields (one GateConfig for the three flows: each class sent to one of them)
    (E, "gate.guardrails", DICTS, "not-a-dict os:system-key 10MB"),
    (R, "gate.floors", DICTS, "os:system-key NaN-value"),
    (E, "gate.min_improvement", NUMBERS, "huge-int"),
    (S, "gate.max_regression", NUMBERS, "NaN"),
    (R, "gate.slice_max_regression", NUMBERS, "text"),
    (E, "gate.confidence", NUMBERS, "Infinity"),
    (R, "gate.bootstrap_samples", NUMBERS, "huge"),
    (E, "gate.approval_timeout_seconds", NUMBERS, "huge"),
    (R, "gate.serving.max_load_seconds", NUMBERS, "negative"),
    (E, "gate.serving.max_p99_latency_ms", NUMBERS, "NaN"),
    (S, "gate.serving.max_peak_memory_mb", NUMBERS, "text"),
    (E, "gate.serving.__import__", OTHER, "text"),
    # an answer given in advance: a deployment run asks in its pause form (each flow calls the check)
    (E, "decision", {"approve": const("approve")}, "approve"),
    (R, "decision", {"reject": const("reject")}, "reject"),
    (S, "decision", {"approve": const("approve")}, "approve"),
    # rollback-champion moves @champion in the worker's store
    (RB, "registered_model_name", NAMES, "path-separators"),
    (RB, "to_version", NUMBERS, "negative huge text NaN"),
    (RB, "reason", OTHER, "400KB"),
    (RB, "mlflow", MLFLOWS, "inline-http"),
    # sync-exports writes into target_dir what it reads from export_base
    (SY, "export_base", PATHS, "dotdot file-uri-out 10MB lone-surrogate"),
    (SY, "export_base", REMOTE, "s3-outside inline-http"),
    (SY, "target_dir", PATHS, "/etc dotdot symlink-out NUL model-dir-outside-roots lone-surrogate"),
    (SY, "aliases", ALIASES, "path-separators not-a-list"),
    (SY, "mlflow", MLFLOWS, "inline-sqlite-outside"),
    # issue 21: the data prefix (listed by the sensor, read by retrain-daily) and the window
    (DS, "data_options.prefix", PATHS, "dotdot /etc symlink-out file-uri-out NUL percent-encoded-dots"),
    (DS, "data_options.prefix", REMOTE, "s3-outside"),
    (DS, "data_options.name", NAMES, "path-separators"),
    (DS, "days", OTHER, "negative huge text"),
    (DS, "catch_up_days", NUMBERS, "huge-int"),
    (RD, "training.data_options.prefix", PATHS, "dotdot /root symlink-out 400KB"),
    (RD, "training.data_options.prefix", REMOTE, "gs-outside"),
    (RD, "window", OTHER, "text"),
    (RD, "window.start", OTHER, "dotdot"),
]


# The classes of hostile value, as the security issues named them; a label not listed is a path,
# code, name or number value of the first round.
CLASSES: dict[str, tuple[str, ...]] = {
    "code through an allowed module": (
        "dotted-through-module",
        "imported-into-module",
        "private-function",
        "class-in-module",
        "dotted-benign",
        "dotted-through-module+hparams",
        "imported+hparams",
    ),
    "store URIs read as MLflow reads them": tuple(f"saved-{label}" for label in STORE_BLOCKS),
    "paths a URI parser re-reads": ("percent-encoded-dots", "query-fragment"),
    "moves out of the roots": ("a-root-that-is-a-model-dir", "the-roots", "the-data-home"),
}


def _by_class(cases: list[Case]) -> dict[str, list[Case]]:
    """The cases of each class (`CLASSES`), the rest under "first round"."""
    grouped: dict[str, list[Case]] = {name: [] for name in CLASSES}
    grouped["first round"] = []
    for case in cases:
        name = next((n for n, labels in CLASSES.items() if case.label in labels), "first round")
        grouped[name].append(case)
    return grouped


def _cases() -> list[Case]:
    cases: list[Case] = []
    for deployments, parameter, values, labels in TABLE:
        names = ("model_dir", "model dir") if parameter == "model_dir" else ()
        for deployment in deployments:
            cases += [Case(deployment, parameter, label, values[label], names) for label in labels.split()]
    for label, model_dir in SCRATCH_DIRS.items():
        cases.append(Case("retrain-iris", "from_scratch", label, const(True), ("model_dir",), {"model_dir": model_dir}))
    # a function reached through an allowed module, its arguments typed as hparams: a shell command
    # that would leave a file in the canary dir
    shell = lambda ctx, case: {"command": f"touch {ctx['canary']}/{case.id}-shell"}  # noqa: E731
    for label, ref in (
        ("dotted-through-module+hparams", "models_for_tests:os.system"),
        ("imported+hparams", "models_for_tests:rmtree"),
    ):
        hparams = shell if label.startswith("dotted") else (lambda ctx, case: {"path": str(ctx["canary"] / "important")})
        cases.append(Case("retrain-iris", "training.model", label, const(ref), ("model",), {"training.hparams": hparams}))
    for number, case in enumerate(cases):
        case.id = f"c{number:03d}"
    return cases


def _baseline(ctx, case: Case) -> dict[str, Any]:
    """Benign parameters that would complete (and register to `TARGET`) with the pair's own output dir."""
    own = ctx["data"] / "runs" / case.id
    if case.deployment == "rollback-champion":  # version 1 is champion already: a stated no-op
        return {"registered_model_name": "iris", "to_version": 1, "reason": "hostile-input matrix"}
    if case.deployment == "data-sensor":  # an empty prefix of its own: the pass lists it and completes
        return {"data_options": {"prefix": str(own)}, "days": 1, "catch_up_days": 30}
    if case.deployment == "sync-exports":
        # no object store here: a baseline run stops at "export_base is a local directory", after the
        # checks of every parameter and before anything is opened (so a target_dir the checks let
        # through fails naming export_base, not target_dir: reported as not named)
        return {
            "export_base": str(own / "exports"),
            "target_dir": str(own / "serving"),
            "registered_model_name": TARGET,
            "aliases": [],
        }
    common = {"export_base": str(own / "exports"), "frozen_dir": str(own / "frozen"), "registered_model_name": TARGET}
    if case.deployment == "sweep-iris":
        return {
            **common,
            "sweep_root": str(own / "sweep"),
            "training": {"model": "iris", "data": "iris", "steps": 100, "policy": {"save_checkpoints_steps": 50}},
            "candidates": [{"hparams": {"learning_rate": 0.05}, "seed": 0}],
            "select": "best:accuracy",
            "dask_workers": 1,
        }
    if case.deployment == "export-checkpoint":
        return {
            **common,
            "model_dir": str(ctx["trained"]),
            "checkpoint": "latest",
            "model": "iris",
            "data": "iris",
            "aliases": [],
        }
    if case.deployment == "retrain-daily":  # one day of data of its own (_prepare_own_outputs)
        return {
            **common,
            "model_dir": str(own / "model"),
            "training": {"model": "iris", "data": "partitioned", "data_options": {"prefix": str(own / "daily")}, "steps": 20},
            "window": {"start": "2026-11-30", "end": "2026-12-01"},
        }
    return {
        **common,
        "model_dir": str(own / "model"),  # a copy of the trained dir at step 300: nothing left to train
        "training": {
            "model": "iris",
            "data": "iris",
            "steps": 300,
            "policy": {"save_checkpoints_steps": 100, "keep_checkpoint_max": None},
        },
        "select": "latest",
    }


def _parameters(ctx, case: Case) -> dict[str, Any]:
    parameters = _baseline(ctx, case)
    for key, make in case.extra.items():
        *parents, leaf = key.split(".")
        target = parameters
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = make(ctx, case)
    *parents, leaf = case.parameter.split(".")
    target = parameters
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = case.value(ctx, case)
    if leaf == "save_checkpoints_secs":  # one save trigger only, or the refusal would be about both
        target.pop("save_checkpoints_steps", None)
    return parameters


def _error_text(err: Exception) -> str:
    response = getattr(err, "response", None)
    if response is not None:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        return f"HTTP {response.status_code}: {_short(str(detail), 600)}"
    return f"{type(err).__name__}: {_short(str(err), 600)}"


def _send(ctx, cases: list[Case], enforce: Optional[bool] = None, timeout: float = MATRIX_TIMEOUT) -> list[Case]:
    """Create the cases' runs a few at a time (at most `IN_FLIGHT` unfinished; the serve process runs
    LIMIT at once) until every one was created and has ended.

    Not all at once: a hundred runs left Scheduled would each be marked Late by the server every few
    seconds (a state write contending on SQLite with the runs' own: "database is locked") and be read,
    parameters and all, on each of the runner's polls. Each run is named after its case
    (`hostile-<id>`). Returns the cases whose run had not ended (or not been created) after `timeout` s."""
    import httpx

    stack = ctx["stack"]
    queue = list(cases)
    unfinished: dict[str, Case] = {}
    deadline = time.monotonic() + timeout
    with stack.api() as client:
        while queue or unfinished:
            while queue and len(unfinished) < IN_FLIGHT:
                case = queue.pop(0)
                parameters = _parameters(ctx, case)
                try:
                    case.run_id = stack.create_run(
                        client, case.deployment, parameters, name=f"hostile-{case.id}", enforce=enforce
                    )
                    unfinished[case.run_id] = case
                except httpx.HTTPStatusError as err:
                    case.created_status = err.response.status_code
                    case.created_error = _error_text(err)
            ended = list(stack.final_states(client, list(unfinished))) if unfinished else []
            for run_id, run in stack.read_runs(client, ended).items():  # each run read in full once, when it ended
                case = unfinished.pop(run_id)
                case.state = run.state.type.value
                case.message = run.state.message or ""
            if time.monotonic() > deadline:
                break
            if unfinished:
                time.sleep(POLL)
        for run_id, run in stack.read_runs(client, list(unfinished)).items():
            unfinished[run_id].state = run.state.name if run.state else None
    late = list(unfinished.values()) + queue
    for case in late:
        case.state = f"NOT ENDED after {timeout:.0f} s ({case.state if case.run_id else 'never created'})"
    return late


def _stored_run_ids(ctx, cases: list[Case]) -> list[str]:
    """Ids of the runs stored for these cases, found by name without reading their parameters
    (`/ui/flow_runs/history` answers ids and states only): a run whose parameters the server
    cannot serialize breaks every endpoint that returns them."""
    with ctx["stack"].api() as client:
        response = client.request(
            "POST",
            "/ui/flow_runs/history",
            json={
                "history_start": "2000-01-01T00:00:00Z",
                "history_end": "2100-01-01T00:00:00Z",
                "history_interval_seconds": 3153600000,
                "flow_runs": {"name": {"any_": [f"hostile-{case.id}" for case in cases]}},
            },
        )
    return [str(run["id"]) for run in response.json()]


# --- snapshots -----------------------------------------------------------------------------------


def fs_snapshot(ctx) -> dict[str, tuple]:
    """(kind, size, mtime, sha1 or link target) of every entry under the test root and the session's
    trained dir, but the servers' own files (Prefect's home and logs) and the MLflow store (see
    `mlflow_snapshot`)."""
    root = ctx["root"]
    stack = ctx["stack"]
    skip = {root / "prefect-home", stack.server_log, stack.serve_log, ctx["data"] / "mlflow"}
    entries = tree_snapshot([root, ctx["session_trained"]], skip)
    for place in ("/tmp", "/etc", "/root"):  # what hostile values name outside the test root
        for name in os.listdir(place):
            if TOKEN in name or name in ("1", "model.ckpt-300.pb", "ckpt") or name.startswith(".prefect-tensorflow"):
                entries[os.path.join(place, name)] = ("outside",)
    return entries


def mlflow_snapshot(ctx) -> dict[str, Any]:
    """The worker's MLflow store: registered models (tags, aliases), versions (source, run, tags, status),
    experiments and runs."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(ctx["mlflow_uri"], ctx["mlflow_uri"])
    registry = {
        model.name: (sorted(model.tags.items()), sorted(model.aliases.items()))
        for model in client.search_registered_models(max_results=1000)
    }
    versions = {
        (v.name, str(v.version)): (v.source, v.run_id, v.status, sorted(v.tags.items()))
        for v in client.search_model_versions(max_results=10000)
    }
    experiments = client.search_experiments(view_type=ViewType.ALL)
    runs = {}
    if experiments:
        for run in client.search_runs([e.experiment_id for e in experiments], run_view_type=ViewType.ALL, max_results=50000):
            runs[run.info.run_id] = (run.info.experiment_id, run.info.status, run.info.run_name)
    return {
        "registered_models": registry,
        "versions": versions,
        "experiments": sorted((e.experiment_id, e.name) for e in experiments),
        "runs": runs,
    }


def diff(before: dict, after: dict) -> list[tuple[Any, str]]:
    """(key, what changed) for every key added, removed or changed."""
    changes = []
    for key in sorted(set(before) | set(after), key=str):
        if key not in after:
            changes.append((key, f"removed {key}"))
        elif key not in before:
            changes.append((key, f"added {key}: {after[key]}"))
        elif before[key] != after[key]:
            changes.append((key, f"changed {key}: {before[key]} -> {after[key]}"))
    return changes


def _owner(path: str, ctx, cases: list[Case]) -> Optional[Case]:
    """The case whose own output dir (data/runs/<id>) `path` is in, if any."""
    runs = str(ctx["data"] / "runs") + os.sep
    if not path.startswith(runs):
        return None
    case_id = path[len(runs) :].split(os.sep, 1)[0]
    return next((c for c in cases if c.id == case_id), None)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _prepare_own_outputs(ctx, cases: list[Case]) -> None:
    for case in cases:
        own = ctx["data"] / "runs" / case.id
        own.mkdir(parents=True, exist_ok=True)
        if case.deployment == "retrain-iris":
            shutil.copytree(ctx["trained"], own / "model")
        if case.deployment == "retrain-daily":
            write_daily_dataset(str(own / "daily"), date(2026, 11, 30), 1, rows_per_day=20)


# --- the tests -----------------------------------------------------------------------------------


def test_hostile_parameters_from_the_run_form_are_refused_and_change_nothing(hostile, record_property):
    ctx = hostile
    cases = [case for case in _cases() if case.label != SURROGATE]
    _prepare_own_outputs(ctx, cases)
    fs_before, mlflow_before = fs_snapshot(ctx), mlflow_snapshot(ctx)
    started = time.monotonic()

    unfinished = _send(ctx, cases)
    assert not unfinished, [c.describe() for c in unfinished] + [log_tail(str(ctx["stack"].serve_log), 3000)]
    # The Run form's "Enforce Parameter Schema" switch, off: the first pair of each parameter that the
    # schema refused is sent again, and must be refused by the flow itself.
    first: dict[tuple[str, str], Case] = {}
    for case in cases:
        if case.refused_at_creation and not case.size_limited:
            first.setdefault((case.deployment, case.parameter), case)
    for case in first.values():
        case.replay = Case(case.deployment, case.parameter, case.label, case.value, case.names, case.extra, id=case.id)
    replays = [case.replay for case in first.values()]
    unfinished = _send(ctx, replays, enforce=False)
    assert not unfinished, [c.describe() for c in unfinished] + [log_tail(str(ctx["stack"].serve_log), 3000)]
    elapsed = time.monotonic() - started

    fs_after, mlflow_after = fs_snapshot(ctx), mlflow_snapshot(ctx)
    fs_changes = diff(fs_before, fs_after)
    own_output = [text for path, text in fs_changes if _owner(path, ctx, cases) is not None]
    outside = [text for path, text in fs_changes if _owner(path, ctx, cases) is None]
    mlflow_changes = {part: diff(mlflow_before[part], mlflow_after[part]) for part in ("registered_models", "versions")}
    tracking_changes = diff(mlflow_before["runs"], mlflow_after["runs"])

    at_creation = [c for c in cases if c.refused_at_creation]
    at_run_time = [c for c in cases if c.refused_at_run_time]
    replayed = [c.replay for c in cases if c.replay is not None]
    summary = (
        f"hostile-input matrix: {len(cases)} (parameter, value) pairs over "
        f"{len({(c.deployment, c.parameter) for c in cases})} parameters of {len(DEPLOYMENTS)} deployments; "
        f"refused at creation {len(at_creation)} ({sum(c.size_limited for c in at_creation)} by the API's size limit), "
        f"at run time {len(at_run_time)}, not refused {len(cases) - len(at_creation) - len(at_run_time)}; "
        f"{len(replayed)} of the creation refusals (one a parameter) re-sent with the schema switched off: "
        f"{sum(r.refused_at_run_time for r in replayed)} refused at run time, "
        f"{sum(r.refused_at_creation for r in replayed)} still at creation; "
        f"{elapsed:.0f} s with serve --limit {LIMIT}; by class: "
        + ", ".join(f"{name} {sum(c.refused for c in members)}/{len(members)}" for name, members in _by_class(cases).items())
    )
    print("\n" + summary)
    by_parameter: dict[tuple[str, str], Counter] = {}
    for case in cases:
        counter = by_parameter.setdefault((case.deployment, case.parameter), Counter())
        counter["creation" if case.refused_at_creation else "run time" if case.refused_at_run_time else "NOT refused"] += 1
    for (deployment, parameter), counter in sorted(by_parameter.items()):
        print(f"  {deployment:18s} {parameter:45s} {dict(counter)}")
    for change in own_output:
        print(f"  wrote into its own output: {change[:200]}")
    for _, change in tracking_changes:  # a refused run may leave a FAILED MLflow run (not the registry)
        print(f"  MLflow tracking: {change[:200]}")
    for replay in replayed:
        print(f"  schema off: {replay.describe()[:260]}")
    record_property("hostile_pairs", len(cases))
    record_property("hostile_refused_at_creation", len(at_creation))
    record_property("hostile_refused_at_run_time", len(at_run_time))
    record_property("hostile_replays_refused_at_run_time", sum(r.refused_at_run_time for r in replayed))
    warnings.warn(summary, UserWarning, stacklevel=1)  # shown in the -ra summary of CI logs

    problems = []
    for case in cases:
        if not case.refused:
            problems.append(f"NOT refused {case.describe()}")
        elif not case.named:
            problems.append(f"refused without naming {case.expected_names()} {case.describe()}")
        if case.replay is not None:
            if not case.replay.refused:
                problems.append(f"NOT refused with the schema switched off {case.replay.describe()}")
            elif not case.replay.named:
                problems.append(f"schema off, refused without naming {case.expected_names()} {case.replay.describe()}")
    problems += [f"outside the runs' own output: {c[:300]}" for c in outside]
    problems += [f"MLflow {part}: {text[:300]}" for part, changes in mlflow_changes.items() for _, text in changes]
    assert not problems, f"{summary}\n" + "\n".join(problems)


def test_a_benign_run_through_the_same_machinery_changes_what_it_should(hostile):
    """The control: the baseline parameters of each deployment complete, and the snapshots see
    exactly their output and their new model version. So the matrix's refusals come from the
    hostile values, and its snapshots would have shown a write."""
    ctx = hostile
    cases = [Case(d, "registered_model_name", "benign", const(f"{TARGET}-control-{d}")) for d in DEPLOYMENTS[:2]]
    # rollback's baseline (to the champion it has) completes and moves nothing: its pairs are refused for their value
    cases.append(Case("rollback-champion", "reason", "benign", const("control")))
    # the data sensor's baseline lists an empty prefix of its own and writes nothing
    cases.append(Case("data-sensor", "days", "benign", const(1)))
    for number, case in enumerate(cases):
        case.id = f"control{number}"
    _prepare_own_outputs(ctx, cases)
    fs_before, mlflow_before = fs_snapshot(ctx), mlflow_snapshot(ctx)
    assert not _send(ctx, cases)
    for case in cases:
        assert case.state == "COMPLETED", f"{case.describe()}\n{log_tail(str(ctx['stack'].serve_log), 3000)}"
    fs_changes = diff(fs_before, fs_snapshot(ctx))
    # Besides its own output, a run may use <data home>/scratch (staging for exports and frozen graphs)
    # and <data home>/gate-cache (the gate's scored outcomes, issue 20).
    shared_dirs = [str(ctx["data"] / "scratch"), str(ctx["data"] / "gate-cache")]
    shared = [p for p, _ in fs_changes if p == str(ctx["data"]) or any(p == d or p.startswith(d + os.sep) for d in shared_dirs)]
    outside = [text for path, text in fs_changes if _owner(path, ctx, cases) is None and path not in shared]
    assert fs_changes and not outside, outside
    cases = cases[:2]
    for case in cases:
        saved_model = ctx["data"] / "runs" / case.id / "exports" / "1" / "saved_model.pb"
        assert str(saved_model) in [path for path, _ in fs_changes], case.id
    mlflow_after = mlflow_snapshot(ctx)
    assert mlflow_after["registered_models"]["iris"] == mlflow_before["registered_models"]["iris"]  # @champion stayed
    versions = diff(mlflow_before["versions"], mlflow_after["versions"])
    assert sorted(key for key, _ in versions) == [
        (f"{TARGET}-control-export-checkpoint", "1"),
        (f"{TARGET}-control-retrain-iris", "1"),
    ]
