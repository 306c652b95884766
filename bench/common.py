"""Helpers shared by the benchmarks: interleaved timing, medians, the table, the JSON file."""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Optional

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def interleaved(cases: Mapping[str, Callable[[], Any]], rounds: int, seed: int = 0) -> dict[str, list[Any]]:
    """Run every case once per round, in a fresh random order each round; collect what each returns.

    A seeded shuffle per round (not a fixed or rotated order, where a case
    would always follow the same neighbour) spreads the effect of "runs right
    after the heavy case" evenly. A case returns its own measurement (a float
    of seconds, or a dict), so it decides what is inside the timed region.
    """
    rng = random.Random(seed)
    names = list(cases)
    out: dict[str, list[Any]] = {name: [] for name in names}
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            out[name].append(cases[name]())
    return out


def timed(fn: Callable[[], Any]) -> float:
    """Seconds `fn()` took (perf_counter)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def spread(values: Sequence[float]) -> str:
    """`min..max` of a sample, for the table: how noisy a median is."""
    return f"{min(values):.4g}..{max(values):.4g}"


def fmt(value: Optional[float], digits: int = 4) -> str:
    if value is None:
        return "-"
    if value == 0 or 1e-3 <= abs(value) < 1e6:
        return f"{value:.{digits}g}"
    return f"{value:.3e}"


def ratio_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()) -> str:
    """A plain-text table: a title line, aligned columns, then notes."""
    cells = [[str(c) for c in header]] + [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        # first column left-aligned (labels), the rest right-aligned (numbers)
        return "  ".join(row[i].ljust(widths[i]) if i == 0 else row[i].rjust(widths[i]) for i in range(len(row))).rstrip()

    rule = "-" * len(line(cells[0]))
    text = [title, rule, line(cells[0]), rule] + [line(r) for r in cells[1:]] + [rule]
    text += [f"  {n}" for n in notes]
    return "\n".join(text)


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if "tensorflow" in sys.modules:
        env["tensorflow"] = sys.modules["tensorflow"].__version__
    return env


def write_results(name: str, data: Mapping[str, Any]) -> str:
    """Write `bench/results/<name>.json` (atomically); return its path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    payload = {"benchmark": name, "environment": environment(), **data}
    fd, tmp = tempfile.mkstemp(dir=RESULTS_DIR, prefix=f".{name}.", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
    os.replace(tmp, path)
    return path


class Scratch:
    """A temporary directory removed on exit, for a benchmark's files."""

    def __init__(self, prefix: str):
        self.path = tempfile.mkdtemp(prefix=f"bench-{prefix}-")

    def fresh(self, name: str) -> str:
        """A new empty subdirectory (the old one of that name removed)."""
        path = os.path.join(self.path, name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: Any) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def report(name: str, run) -> dict:
    """Run one benchmark, print its table and write its results JSON."""
    result = run()
    print(result["table"])
    print(f"  results: {write_results(name, result)}")
    return result


@contextmanager
def s3_requests(client) -> Iterator[Counter]:
    """Count the S3 requests `client` sends while the block runs, by operation name."""
    counts: Counter = Counter()

    def hook(model, **_):
        counts[model.name] += 1

    client.meta.events.register("before-call.s3", hook)
    try:
        yield counts
    finally:
        client.meta.events.unregister("before-call.s3", hook)


@contextmanager
def s3_server_environment(scratch: Scratch) -> Iterator[Any]:
    """A moto S3 server for the block, with the environment (its endpoint and keys, a data home under `scratch`)
    set for the library's own clients, and put back afterwards. Yields the server."""
    from devtools.team_stack import S3Server

    server = S3Server(os.path.join(scratch.path, "s3.log")).start()
    saved = {k: os.environ.get(k) for k in (*server.env, "PREFECT_TENSORFLOW_HOME", "NO_PROXY")}
    os.environ.update(server.env)
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    os.environ["PREFECT_TENSORFLOW_HOME"] = os.path.join(scratch.path, "home")
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def wait_for_deployment(client, name: str, serve, serve_log: str, timeout: float) -> Any:
    """The deployment `name` once `serve` (its process) has created it, polled on `client` (a sync Prefect
    client); RuntimeError with the serve log's tail when serve exits or `timeout` seconds pass first."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from prefect_tensorflow.tasks.child_processes import log_tail

    deadline = time.monotonic() + timeout
    while True:
        found = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
        if found:
            return found[0]
        if serve.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"serve did not create the {name} deployment:\n{log_tail(serve_log)}")
        time.sleep(0.5)
