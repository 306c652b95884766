"""Served flow runs forked from a warm template: no new Python, no TensorFlow import per press of Run.

`prefect-tensorflow serve` runs Prefect's runner (`unreadable_runs.QuarantiningRunner`); for the
deployments named in `WARM_DEPLOYMENTS` its `WarmRunner` replaces the runner's cold start (a new
`python -m prefect.engine` that imports Prefect, the flow and then TensorFlow) by a fork of a
template process (`warm_runs_main`) that imported them once. The template is the serving check's
machinery (`tasks/warm_process.py`'s `WarmTemplate`, `warm_template_main.fork_loop`), with serve's
environment and the flows' modules instead of `python -I`.

What stays as in the cold path:

- Isolation: each run is a fresh child in a session of its own; an exception, a segfault or a kill
  ends that child only (the runner marks the run Crashed with the exit status), and the template
  forks the next run as before. A template found dead (killed, or its import failed) is started
  again for the next run; its children die with it (`PR_SET_PDEATHSIG`) and are reported killed.
  A template that cannot start or fork sends the run down the cold path (logged).
- Cancel and the heartbeat: the child gets the environment the runner builds for a spawned run
  (`PREFECT__FLOW_RUN_ID`, the control channel's port and token, the heartbeat); the runner stops
  its process group as it would a spawned one's.
- Parameters: the child reads the run from the API and runs the flow, whose checks come first,
  exactly as `python -m prefect.engine` does; nothing of a run's parameters reaches the template.
- The serving check: a run forks its own serving template from itself before its run starts
  (`warm_template.fork_template_here`), so its check does not wait for a new Python to import
  TensorFlow and MLflow; the run stops it when it ends.
- Code: before each fork the installed code's fingerprint (`code_fingerprint`: the package's
  source files, the installed distributions) is compared with the template's; a changed one starts
  a new template for this and later runs, and the old one is stopped once its runs have ended.

Example:
    >>> from prefect_tensorflow.flows.warm_runs import WARM_DEPLOYMENTS, code_fingerprint
    >>> WARM_DEPLOYMENTS
    ('export-checkpoint',)
    >>> code_fingerprint() == code_fingerprint()
    True
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any, Optional

import anyio
import anyio.abc
from prefect.logging import get_logger

from prefect_tensorflow.tasks.child_processes import log_tail
from prefect_tensorflow.tasks.warm_process import ForkedProcess, WarmTemplate, WarmTemplateError

from .unreadable_runs import QuarantiningRunner

WARM_DEPLOYMENTS = ("export-checkpoint",)
"""Deployments whose runs fork from the warm template (the ones pressed from the UI and waited for)."""
WARM_POLL_SECONDS = 0.5
"""The runner's poll for scheduled runs while serving warm (a run waits half of it on average)."""
MAIN_MODULE = "prefect_tensorflow.flows.warm_runs_main"

logger = get_logger("prefect_tensorflow.warm_runs")


def code_fingerprint() -> str:
    """A digest of the installed code: this package's source files (path, size, mtime) and the names of the
    distributions installed beside Prefect (their versions are in the names)."""
    digest = hashlib.sha256()
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for part in ("flows", "tasks"):
        for root, dirs, files in os.walk(os.path.join(package, part)):
            dirs.sort()
            for name in sorted(files):
                if name.endswith((".py", ".yaml")):
                    stat = os.stat(os.path.join(root, name))
                    digest.update(f"{root}/{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    import prefect

    site = os.path.dirname(os.path.dirname(os.path.abspath(prefect.__file__)))
    for name in sorted(os.listdir(site)):
        if name.endswith(".dist-info"):
            digest.update(f"{name}\n".encode())
    return digest.hexdigest()


class WarmRunTemplates:
    """The template the runs fork from (started, restarted when dead or when the code changed) and the
    retired ones still running older runs."""

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = list(modules)
        self.current: Optional[WarmTemplate] = None
        self.fingerprint: Optional[str] = None
        self.retired: list[WarmTemplate] = []
        self.children: dict[int, set[int]] = {}  # id(template) -> pids of its running children
        self._lock = threading.Lock()

    def template(self) -> WarmTemplate:
        """The running template for the installed code, started (blocking) if there is none.

        Raises:
            WarmTemplateError: it could not start.
        """
        fingerprint = code_fingerprint()
        with self._lock:
            current = self.current
            if current is not None and current.alive() and fingerprint == self.fingerprint:
                return current
            if current is not None:
                why = "the installed code changed" if current.alive() else "it is not running"
                logger.warning("Starting a new warm flow-run template: %s", why)
                self.retired.append(current)
                self.current = None
            template = WarmTemplate([sys.executable, "-m", MAIN_MODULE, *self.modules], env=dict(os.environ))
            template.start()
            self.current, self.fingerprint = template, fingerprint
            self._stop_idle_retired()
            return template

    def fork(self, flow_run_id: str, env: dict[str, str], cwd: str) -> tuple[ForkedProcess, str, WarmTemplate]:
        """A child running the flow run `env` names; its log path and its template.

        Raises:
            WarmTemplateError: no template could start, or the fork failed.
        """
        template = self.template()
        log = os.path.join(template.directory, f"flow-run-{flow_run_id}.log")
        child = template.fork("flow-run", {"env": env, "cwd": cwd}, log)
        with self._lock:
            self.children.setdefault(id(template), set()).add(child.pid)
        return child, log, template

    def ended(self, template: WarmTemplate, pid: int) -> None:
        """Forget a child that exited; stop retired templates with no run left."""
        with self._lock:
            self.children.get(id(template), set()).discard(pid)
            self._stop_idle_retired()

    def _stop_idle_retired(self) -> None:
        for template in [t for t in self.retired if not self.children.get(id(t))]:
            self.retired.remove(template)
            self.children.pop(id(template), None)
            threading.Thread(target=template.stop, name="warm-runs-retire", daemon=True).start()

    def stop(self) -> None:
        """Stop every template (their running children die with them)."""
        with self._lock:
            templates = [t for t in [self.current, *self.retired] if t is not None]
            self.current, self.retired = None, []
        for template in templates:
            template.stop()


def run_environment(flow_run: Any, runner: Any, control_env: dict[str, str], deployment_name: Optional[str]) -> dict[str, str]:
    """The environment Prefect's cold start (`EngineCommandStarter`) gives a run's process, for a fork."""
    from prefect.settings import get_current_settings

    env: dict[str, Optional[str]] = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True)}
    env.update(
        {
            "PREFECT__FLOW_RUN_ID": str(flow_run.id),
            "PREFECT__STORAGE_BASE_PATH": str(runner._tmp_dir),
            "PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS": "false",
            "PREFECT__DEPLOYMENT_NAME": deployment_name,
            **control_env,
        }
    )
    if runner._heartbeat_seconds is not None:
        env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(int(runner._heartbeat_seconds))
    return {key: value for key, value in env.items() if value is not None}


class WarmRunStarter:
    """A Prefect runner `ProcessStarter` that forks the run from the warm template, or starts it cold."""

    def __init__(self, templates: WarmRunTemplates, runner: Any, cold: Any, deployment_name: Optional[str]) -> None:
        self.templates, self.runner, self.cold, self.deployment_name = templates, runner, cold, deployment_name

    async def start(self, flow_run: Any, task_status: anyio.abc.TaskStatus[Any] = anyio.TASK_STATUS_IGNORED) -> None:
        from prefect.runner._process_manager import ProcessHandle, create_isolated_termination_scope

        channel = self.runner._control_channel
        control_env: dict[str, str] = {}
        try:
            port, token = channel.register(flow_run.id)
            control_env = {"PREFECT__CONTROL_PORT": str(port), "PREFECT__CONTROL_TOKEN": token}
        except RuntimeError:  # no control channel: cancel falls back to stopping the process
            pass
        env = run_environment(flow_run, self.runner, control_env, self.deployment_name)
        try:
            child, log, template = await anyio.to_thread.run_sync(self.templates.fork, str(flow_run.id), env, os.getcwd())
        except WarmTemplateError as err:
            logger.warning("Flow run %s: the warm template is unavailable (%s); starting it cold", flow_run.id, err)
            if control_env:
                channel.unregister(flow_run.id)
            await self.cold.start(flow_run, task_status=task_status)
            return
        print(f"Flow run {flow_run.id}: forked from the warm template (pid {child.pid}, template {template.pid})", flush=True)
        task_status.started(ProcessHandle(child, termination_scope=create_isolated_termination_scope(child.pid)))  # type: ignore[arg-type]
        try:
            await anyio.to_thread.run_sync(child.wait, abandon_on_cancel=True)
        finally:
            self.templates.ended(template, child.pid)
            _echo(log)


def _echo(log: str) -> None:
    """The child's output on serve's, as the cold path streams it; then the file is removed."""
    try:
        with open(log, errors="replace") as out:
            text = out.read()
        os.remove(log)
    except OSError:
        return
    if text.strip():
        sys.stdout.write(text if len(text) < 200_000 else log_tail(log))
        sys.stdout.flush()


class WarmRunner(QuarantiningRunner):
    """The runner `prefect-tensorflow serve` runs: `QuarantiningRunner`, with the runs of `warm` deployments
    forked from a warm template (`WarmRunStarter`), the template started as the runner starts."""

    def __init__(self, *args: Any, warm: Sequence[str] = WARM_DEPLOYMENTS, modules: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.warm = set(warm)
        self.templates = WarmRunTemplates(modules)

    async def __aenter__(self) -> Any:
        runner = await super().__aenter__()
        poller = getattr(self, "_scheduled_run_poller", None)
        original = getattr(poller, "_resolve_starter", None)
        if poller is None or original is None or not self.warm:
            logger.error("this Prefect version's runner starts runs differently: every run starts cold")
            return runner

        def resolve_starter(flow_run: Any) -> Any:
            cold = original(flow_run)
            name = self._deployment_registry.get_deployment_name(flow_run.deployment_id) if flow_run.deployment_id else None
            if name not in self.warm:
                return cold
            return WarmRunStarter(self.templates, self, cold, name)

        poller._resolve_starter = resolve_starter
        threading.Thread(target=self._start_template, name="warm-runs-start", daemon=True).start()
        return runner

    def _start_template(self) -> None:
        try:
            self.templates.template()
            print("Warm flow-run template ready (TensorFlow imported)", flush=True)
        except WarmTemplateError as err:
            logger.warning("The warm flow-run template could not start (%s): runs start cold until it does", err)

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await super().__aexit__(*exc_info)
        finally:
            self.templates.stop()
