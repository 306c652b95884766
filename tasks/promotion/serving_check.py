"""The serving check (infra validation): a SavedModel loads and answers where serving runs it, before it is trusted.

Two checks, one report (`ServingReport`):

- `check_loads(local_path, ...)`: a cold load in a fresh `python -I` process
  with no project code (`serving_check_main.py`), `serving_default` called on
  the inputs; cheap enough to run before an export is registered at all
  (`registry.model_versions` does, and registers nothing when it fails);
- `check_serving(model_uri, connection, ...)`: the registered version behind
  MLflow's own HTTP scoring server (`mlflow models serve`,
  `scoring_server.py`), queried in TF Serving's REST row (`instances`) and
  columnar (`inputs`) formats;
- `check_tf_serving(local_path, ...)`: where `tensorflow_model_server` is on
  PATH, the export version loaded in it and its REST API queried the same way.

Both compare the answers with in-process predictions within a tolerance (a
NaN or infinite value fails, naming the output), record the load time, p50
and p99 latency of single-row requests and the peak memory, and apply
`ServingLimits` (a limit exceeded fails with the reason). The report is kept
as version tags (`record_serving_report`, `SERVING_TAGS`), which
`passed_serving_check` reads.

Example:
    >>> from prefect_tensorflow.tasks.promotion.serving_check import ServingReport, compare_answers
    >>> import numpy as np
    >>> compare_answers({"y": np.array([1.0, 2.0])}, {"y": np.array([1.0, np.nan])}, 1e-5)
    (None, 'output y has non-finite values (1 of 2)')
    >>> ServingReport(ok=True, reason="r", server="load-only").formats
    []
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Final, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..child_processes import log_tail, start_process, stop_process_group
from ..configs import ServingLimits
from ..errors import RegistryError
from ..registry.mlflow_connection import MlflowConfig
from ..registry.tracking import TAG_PREFIX

MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serving_check_main.py")
LOAD_ONLY: Final = "load-only"
MLFLOW_SERVE: Final = "mlflow models serve"
WARM_SERVE: Final = "mlflow scoring server (warm template)"
TF_SERVING: Final = "tensorflow_model_server"
SERVING_TAGS = {
    "ok": TAG_PREFIX + "serving.ok",
    "reason": TAG_PREFIX + "serving.reason",
    "server": TAG_PREFIX + "serving.server",
    "load_seconds": TAG_PREFIX + "serving.load_seconds",
    "p50_ms": TAG_PREFIX + "serving.p50_ms",
    "p99_ms": TAG_PREFIX + "serving.p99_ms",
    "peak_memory_mb": TAG_PREFIX + "serving.peak_memory_mb",
}
LATENCY_REQUESTS = 50


Server = Literal["load-only", "mlflow models serve", "mlflow scoring server (warm template)", "tensorflow_model_server"]


class ServingReport(BaseModel):
    """What one serving check found: ok or why not, and the figures it measured (None: not measured)."""

    model_config = ConfigDict(frozen=True)

    ok: bool
    reason: str
    server: Server
    load_seconds: Optional[float] = Field(default=None, description="cold load (load-only) or start -> ready (a server)")
    p50_ms: Optional[float] = None
    p99_ms: Optional[float] = None
    peak_memory_mb: Optional[float] = Field(default=None, description="peak resident memory of the loading process(es)")
    max_abs_diff: Optional[float] = None
    formats: list[str] = Field(default_factory=list, description="REST formats checked: 'instances', 'inputs'")


def compare_answers(expected: dict[str, Any], actual: dict[str, Any], tolerance: float) -> tuple[Optional[float], Optional[str]]:
    """(largest absolute difference, None) when `actual` matches `expected` within `tolerance`; else (figure, why not).

    Every output of `actual` must be finite; names and shapes must match `expected`.
    """
    if set(expected) != set(actual):
        return None, f"outputs differ: expected {sorted(expected)}, got {sorted(actual)}"
    worst = 0.0
    for name in sorted(expected):
        a, b = np.asarray(expected[name]), np.asarray(actual[name])
        if b.dtype.kind in "fc" and not np.all(np.isfinite(b)):
            return None, f"output {name} has non-finite values ({int(b.size - np.isfinite(b).sum())} of {b.size})"
        if a.shape != b.shape:
            return None, f"output {name}: expected shape {a.shape}, got {b.shape}"
        if a.size:
            worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    if worst > tolerance:
        return worst, f"answers differ from the expected ones by {worst:.3g} (tolerance {tolerance:g})"
    return worst, None


def _non_finite(outputs: dict[str, Any]) -> Optional[str]:
    for name in sorted(outputs):
        value = np.asarray(outputs[name])
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            return f"output {name} has non-finite values ({int(value.size - np.isfinite(value).sum())} of {value.size})"
    return None


def limits_exceeded(
    limits: ServingLimits, load_seconds: Optional[float], p99_ms: Optional[float], peak_memory_mb: Optional[float]
) -> Optional[str]:
    """Why a figure is over its limit (all of them, '; '-joined), or None.

    Example:
        >>> limits_exceeded(ServingLimits(max_load_seconds=0.5), 2.0, None, None)
        'load took 2 s, over max_load_seconds 0.5'
    """
    over = []
    if limits.max_load_seconds is not None and load_seconds is not None and load_seconds > limits.max_load_seconds:
        over.append(f"load took {load_seconds:.3g} s, over max_load_seconds {limits.max_load_seconds:g}")
    if limits.max_p99_latency_ms is not None and p99_ms is not None and p99_ms > limits.max_p99_latency_ms:
        over.append(f"p99 latency {p99_ms:.3g} ms, over max_p99_latency_ms {limits.max_p99_latency_ms:g}")
    if limits.max_peak_memory_mb is not None and peak_memory_mb is not None and peak_memory_mb > limits.max_peak_memory_mb:
        over.append(f"peak memory {peak_memory_mb:.4g} MB, over max_peak_memory_mb {limits.max_peak_memory_mb:g}")
    return "; ".join(over) or None


def cold_load(
    local_path: str,
    inputs: Optional[dict[str, np.ndarray]] = None,
    *,
    latency_calls: int = 20,
    timeout: float = 600.0,
    warm: bool = True,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Run `serving_check_main.py` on `local_path` in a fresh process: (its report, its outputs).

    With `warm` the process is forked from the warm template (`warm_template.fork_check`: TensorFlow
    imported already, no project code), else (or when the template cannot fork) it is a new
    `python -I` process. The report has `ok`, `error` (one line), `import_seconds`, `load_seconds`,
    `first_call_seconds`, `p50_ms`, `p99_ms`, `peak_memory_mb`, `signature`, `project_code_imported`
    (see `serving_check_main`) and `warm` (whether the template ran it).
    """
    from .warm_template import ForkedProcess, fork_check

    with tempfile.TemporaryDirectory(prefix="prefect-tensorflow-cold-load-") as tmp:
        request: dict[str, Any] = {
            "saved_model": os.path.abspath(local_path),
            "inputs": None,
            "outputs": os.path.join(tmp, "outputs.npz"),
            "report": os.path.join(tmp, "report.json"),
            "latency_calls": latency_calls,
        }
        if inputs is not None:
            request["inputs"] = os.path.join(tmp, "inputs.npz")
            arrays: dict[str, Any] = {name: np.asarray(value) for name, value in inputs.items()}
            np.savez(request["inputs"], **arrays)
        with open(os.path.join(tmp, "request.json"), "w", encoding="utf-8") as handle:
            json.dump(request, handle)
        log = os.path.join(tmp, "child.log")
        process: Optional[subprocess.Popen | ForkedProcess] = None
        if warm:
            process = fork_check("load", {"request": os.path.join(tmp, "request.json")}, log)
        forked = process is not None
        if process is None:
            # -I: no PYTHON* variables, no user site, neither cwd nor the script's directory on sys.path
            process = start_process([sys.executable, "-I", MAIN, os.path.join(tmp, "request.json")], log, cwd=tmp)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"no answer within {timeout:g} s", "warm": forked}, {}
        finally:
            stop_process_group(process, grace=5.0)  # type: ignore[arg-type]  # a ForkedProcess has what it uses
        try:
            with open(request["report"], encoding="utf-8") as handle:
                report = json.load(handle)
        except (OSError, ValueError):
            lines = [line for line in log_tail(log).splitlines() if line.strip()]
            last = lines[-1].strip() if lines else "(no output)"
            error = f"the loading process exited with status {process.returncode}: {last}"
            return {"ok": False, "error": error, "warm": forked}, {}
        report["warm"] = forked
        outputs: dict[str, np.ndarray] = {}
        if report.get("ok"):
            with np.load(request["outputs"], allow_pickle=False) as npz:
                outputs = {name: npz[name] for name in npz.files}
        return report, outputs


def check_loads(
    local_path: str,
    inputs: Optional[dict[str, np.ndarray]] = None,
    expected: Optional[dict[str, np.ndarray]] = None,
    limits: ServingLimits = ServingLimits(),
    tolerance: float = 1e-5,
    *,
    warm: bool = True,
) -> ServingReport:
    """Load the SavedModel at `local_path` cold in a fresh process with no project code, call it, time it, check it.

    Args:
        local_path: a SavedModel directory on this machine.
        inputs: input name -> batch for `serving_default` (default: seeded values made from its signature).
        expected: output name -> what the answers must be within `tolerance` (default: not compared;
            any non-finite output still fails).
        limits: load time, p99 latency (single-row calls in that process) and peak RSS limits.
        tolerance: largest absolute difference accepted.
        warm: fork the process from the warm template (`warm_template`: TensorFlow imported once per
            parent process); False, or a template that cannot fork: a new `python -I` process. The
            reason says which ran. `peak_memory_mb` is the process's peak RSS, which for a forked
            process counts the pages it shares with the template (its imports): what a serving process
            holding TensorFlow and the model holds.

    Returns:
        `ok=False` with the reason (TensorFlow's one-line error and the path, a difference, a limit);
        never raises for a broken model.

    Example:
        >>> from prefect_tensorflow.tasks.promotion.serving_check import check_loads
        >>> check_loads("/nonexistent/1").ok
        False
    """
    if not os.path.isdir(local_path):
        return ServingReport(ok=False, reason=f"SavedModel {local_path}: no such directory", server=LOAD_ONLY)
    report, outputs = cold_load(local_path, inputs, warm=warm)
    figures: dict[str, Any] = {
        "load_seconds": report.get("load_seconds"),
        "p50_ms": report.get("p50_ms"),
        "p99_ms": report.get("p99_ms"),
        "peak_memory_mb": report.get("peak_memory_mb"),
    }
    if not report.get("ok"):
        where = f" ({report['stage']})" if report.get("stage") in ("load", "call") else ""
        reason = f"SavedModel {local_path} failed to load in a fresh process{where}: {report.get('error')}"
        return ServingReport(ok=False, reason=reason, server=LOAD_ONLY, **figures)
    diff, why = compare_answers(expected, outputs, tolerance) if expected is not None else (None, _non_finite(outputs))
    if report.get("project_code_imported"):  # the check would prove nothing about a serving process without it
        why = f"the loading process imported project code ({', '.join(report['project_code_imported'][:3])})"
    if why is None:
        why = limits_exceeded(limits, figures["load_seconds"], figures["p99_ms"], figures["peak_memory_mb"])
    if why is not None:
        return ServingReport(ok=False, reason=f"SavedModel {local_path}: {why}", server=LOAD_ONLY, max_abs_diff=diff, **figures)
    where = "a fresh process forked from the warm template" if report.get("warm") else "a fresh python -I process"
    reason = f"loaded cold in {figures['load_seconds']:.3g} s in {where}, without project code"
    if diff is not None:
        reason += f"; answers within {tolerance:g} of the expected ones (max abs diff {diff:.3g})"
    return ServingReport(ok=True, reason=reason, server=LOAD_ONLY, max_abs_diff=diff, **figures)


def require_loads(local_path: str, what: str, limits: Optional[ServingLimits] = None) -> ServingReport:
    """`check_loads(local_path)` before registering `what`: its report, or RegistryError with the reason.

    Raises:
        RegistryError: the SavedModel does not load cold, answers non-finite values or exceeds `limits`;
            the message ends "Nothing was registered".
    """
    report = check_loads(local_path, limits=limits or ServingLimits())
    if not report.ok:
        raise RegistryError(f"{what}: the load-only serving check failed: {report.reason}. Nothing was registered")
    return report


def load_check_tags(report: ServingReport) -> dict[str, str]:
    """The load-only check's figures as version tags (`prefect_tensorflow.load_check.*`), set when it is registered.

    Example:
        >>> load_check_tags(ServingReport(ok=True, reason="r", server="load-only", load_seconds=0.25))["prefect_tensorflow.load_check.load_seconds"]
        '0.25'
    """
    return {
        TAG_PREFIX + "load_check.reason": report.reason[:4900],
        TAG_PREFIX + "load_check.load_seconds": _figure(report.load_seconds),
        TAG_PREFIX + "load_check.peak_memory_mb": _figure(report.peak_memory_mb),
    }


def _answers(answer: Any, names: list[str]) -> dict[str, np.ndarray]:
    """The outputs in MLflow's answer: `{"predictions": {name: lists}}` (or a bare list for a single output)."""
    predictions = answer.get("predictions", answer) if isinstance(answer, dict) else answer
    if isinstance(predictions, dict):
        return {name: np.asarray(value) for name, value in predictions.items()}
    if len(names) == 1:
        return {names[0]: np.asarray(predictions)}
    if isinstance(predictions, list) and predictions and isinstance(predictions[0], dict):  # one object per row
        return {name: np.asarray([row[name] for row in predictions]) for name in predictions[0]}
    raise RegistryError(f"unexpected answer from the scoring server: {str(answer)[:200]}")


def _percentiles(times_ms: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not times_ms:
        return None, None
    return float(np.percentile(times_ms, 50)), float(np.percentile(times_ms, 99))


def _query(
    invoke: Any,
    inputs: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    tolerance: float,
    requests: int,
    answers: Any = _answers,
) -> tuple[Optional[float], Optional[str], list[float]]:
    """Both REST formats, compared with `expected`, then `requests` single-row requests timed."""
    from .scoring_server import inputs_payload, instances_payload

    worst = 0.0
    for label, payload in (("instances", instances_payload(inputs)), ("inputs", inputs_payload(inputs))):
        got = answers(invoke(payload), sorted(expected))
        got = {name: value.astype(np.asarray(expected[name]).dtype) if name in expected else value for name, value in got.items()}
        diff, why = compare_answers(expected, got, tolerance)
        if why is not None:
            return diff, f"{label} format: {why}", []
        worst = max(worst, diff or 0.0)
    rows = min(len(v) for v in inputs.values())
    times = []
    for i in range(requests):
        row = {name: value[i % rows : i % rows + 1] for name, value in inputs.items()}
        payload = instances_payload(row)
        t0 = time.perf_counter()
        invoke(payload)
        times.append((time.perf_counter() - t0) * 1000.0)
    return worst, None, times


def check_serving(
    model_uri: str,
    connection: MlflowConfig,
    inputs: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    limits: ServingLimits = ServingLimits(),
    tolerance: float = 1e-5,
    *,
    requests: int = LATENCY_REQUESTS,
    timeout: float = 600.0,
    warm: bool = True,
) -> ServingReport:
    """Serve `model_uri` with MLflow's scoring server, query it over REST in both TF Serving formats, measure it.

    Args:
        model_uri: the registered version, `models:/<name>/<version>`.
        connection: where it is registered (URIs and credentials are passed to the server's environment).
        inputs: input name -> rows (e.g. the eval data's features) for both REST formats.
        expected: output name -> what in-process predictions gave on `inputs`.
        limits: start -> ready time, p99 latency over `requests` single-row requests, peak memory of the
            server's process tree.
        tolerance: largest absolute difference accepted.
        warm: the server forked from the warm template (`scoring_server.served_model`: the same app
            `mlflow models serve --env-manager local` runs, started without importing MLflow and
            TensorFlow again; `server` is "mlflow scoring server (warm template)"); False, or a template
            that cannot fork: `mlflow models serve` itself. `load_seconds` is start -> ready either way;
            a forked server's peak memory counts the pages it shares with the template.

    Returns:
        The report; `ok=False` with the reason when the server does not start, answers wrongly or a limit
        is exceeded. The server is always stopped.

    Example:
        >>> from prefect_tensorflow.tasks.promotion.serving_check import check_serving
        >>> check_serving.__name__
        'check_serving'
    """
    from .scoring_server import served_model

    kind: Literal["mlflow models serve", "mlflow scoring server (warm template)"] = WARM_SERVE if warm else MLFLOW_SERVE
    try:
        with served_model(model_uri, connection, timeout=timeout, warm=warm) as server:
            kind = WARM_SERVE if server.warm else MLFLOW_SERVE
            diff, why, times = _query(server.invoke, inputs, expected, tolerance, requests)
            peak = server.peak_memory_mb()
            load_seconds = server.ready_seconds
    except RegistryError as err:
        return ServingReport(ok=False, reason=f"{model_uri}: {err}", server=kind)
    return _served_report(kind, f"{model_uri} behind {kind}", why, limits, tolerance, times, load_seconds, peak, diff)


def _tf_serving_answers(answer: Any, names: list[str]) -> dict[str, np.ndarray]:
    """TF Serving's answer: `{"predictions": rows}` (row format) or `{"outputs": columns}` (columnar format)."""
    if isinstance(answer, dict) and "outputs" in answer:
        outputs = answer["outputs"]
        return {k: np.asarray(v) for k, v in outputs.items()} if isinstance(outputs, dict) else {names[0]: np.asarray(outputs)}
    return _answers(answer, names)


def check_tf_serving(
    local_path: str,
    inputs: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    limits: ServingLimits = ServingLimits(),
    tolerance: float = 1e-5,
    *,
    model_name: str = "model",
    requests: int = LATENCY_REQUESTS,
    timeout: float = 300.0,
) -> ServingReport:
    """Load the SavedModel version at `local_path` in `tensorflow_model_server` and query its REST API in both formats.

    The version is linked as version 1 of a temporary model base, so the server loads exactly it. Needs
    the binary on PATH (`tensorflow_model_server()`); otherwise `ok=False` saying so.

    Example:
        >>> check_tf_serving.__name__
        'check_tf_serving'
    """
    import urllib.error
    import urllib.request

    from ..child_processes import free_ports
    from .scoring_server import HOST

    binary = tensorflow_model_server()
    if binary is None:
        return ServingReport(ok=False, reason="tensorflow_model_server not on PATH", server=TF_SERVING)
    url = None

    def invoke(payload: dict[str, Any]) -> Any:
        body = json.dumps({"signature_name": "serving_default", **payload}).encode()
        request = urllib.request.Request(f"{url}:predict", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise RegistryError(f"{url}:predict answered HTTP {err.code}: {err.read()[:300]!r}") from err

    with tempfile.TemporaryDirectory(prefix="prefect-tensorflow-tfs-") as tmp:
        os.symlink(os.path.abspath(local_path), os.path.join(tmp, "1"))
        grpc_port, rest_port = free_ports(2, HOST)
        url = f"http://{HOST}:{rest_port}/v1/models/{model_name}"
        command = [
            binary, f"--port={grpc_port}", f"--rest_api_port={rest_port}", f"--rest_api_bind_address={HOST}",
            f"--model_name={model_name}", f"--model_base_path={tmp}",
        ]  # fmt: skip
        log = os.path.join(tmp, "..", os.path.basename(tmp) + ".log")
        started = time.perf_counter()
        process = start_process(command, log)
        try:
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        states = [v.get("state") for v in json.loads(response.read()).get("model_version_status", [])]
                    if "AVAILABLE" in states:
                        break
                except (OSError, ValueError):
                    pass
                if process.poll() is not None or time.perf_counter() - started > timeout:
                    lines = [line for line in log_tail(log).splitlines() if line.strip()]
                    last = lines[-1].strip() if lines else "(empty log)"
                    return ServingReport(
                        ok=False, reason=f"{local_path}: tensorflow_model_server did not load it: {last}", server=TF_SERVING
                    )
                time.sleep(0.1)
            load_seconds = time.perf_counter() - started
            try:
                diff, why, times = _query(invoke, inputs, expected, tolerance, requests, _tf_serving_answers)
            except RegistryError as err:
                return ServingReport(ok=False, reason=f"{local_path}: {err}", server=TF_SERVING, load_seconds=load_seconds)
            from .scoring_server import _peak_rss_mb

            peak = _peak_rss_mb(process.pid)
        finally:
            stop_process_group(process, grace=10.0)
            if os.path.exists(log):
                os.remove(log)
    where = f"{local_path} in tensorflow_model_server"
    return _served_report(TF_SERVING, where, why, limits, tolerance, times, load_seconds, peak, diff)


def _served_report(
    kind: Server,
    where: str,
    why: Optional[str],
    limits: ServingLimits,
    tolerance: float,
    times: list[float],
    load_seconds: Optional[float],
    peak: Optional[float],
    diff: Optional[float],
) -> ServingReport:
    """The report of a server queried in both REST formats: `why` (a wrong answer) or a limit fails it."""
    p50, p99 = _percentiles(times)
    figures: dict[str, Any] = {
        "load_seconds": load_seconds,
        "p50_ms": p50,
        "p99_ms": p99,
        "peak_memory_mb": peak,
        "max_abs_diff": diff,
    }
    formats = ["instances", "inputs"] if why is None else []
    why = why or limits_exceeded(limits, load_seconds, p99, peak)
    if why is not None:
        return ServingReport(ok=False, reason=f"{where}: {why}", server=kind, formats=formats, **figures)
    reason = (
        f"served by {kind}, ready in {load_seconds:.3g} s; both REST formats answered within "
        f"{tolerance:g} (max abs diff {diff:.3g}); p99 {p99:.3g} ms over {len(times)} requests"
    )
    return ServingReport(ok=True, reason=reason, server=kind, formats=formats, **figures)


def record_serving_report(client: Any, name: str, version: int | str, report: ServingReport) -> None:
    """Write `report` as the version's `prefect_tensorflow.serving.*` tags (`SERVING_TAGS`)."""
    values = {
        "ok": "true" if report.ok else "false",
        "reason": report.reason[:4900],
        "server": report.server,
        "load_seconds": _figure(report.load_seconds),
        "p50_ms": _figure(report.p50_ms),
        "p99_ms": _figure(report.p99_ms),
        "peak_memory_mb": _figure(report.peak_memory_mb),
    }
    for key, value in values.items():
        client.set_model_version_tag(name, str(version), SERVING_TAGS[key], value)


def _figure(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.6g}"


def passed_serving_check(mv: Any) -> bool:
    """Whether the MLflow `ModelVersion` `mv` carries a passed serving check (`prefect_tensorflow.serving.ok`).

    Example:
        >>> from types import SimpleNamespace
        >>> passed_serving_check(SimpleNamespace(tags={"prefect_tensorflow.serving.ok": "true"}))
        True
        >>> passed_serving_check(SimpleNamespace(tags={}))
        False
    """
    return (getattr(mv, "tags", None) or {}).get(SERVING_TAGS["ok"]) == "true"


def tensorflow_model_server() -> Optional[str]:
    """The `tensorflow_model_server` binary on PATH, or None."""
    return shutil.which(TF_SERVING)
