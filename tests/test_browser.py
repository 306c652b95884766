"""End to end in a real browser: Run the served `export-checkpoint` deployment from the Prefect UI, then
follow its links to the MLflow UI and back, as a person would; and answer a paused champion gate
(a challenger that cannot be compared with `@champion`) with the run's typed "Resume" form.

The stack is real and local (127.0.0.1): `prefect server start`, `mlflow server` (SQLite,
`--serve-artifacts`), and `prefect-tensorflow serve` with a trained model dir under its data home,
which is also its only root. Playwright drives Debian's Chromium (`make install` installs it as
root; elsewhere this module is skipped, naming what to install). The selectors are those of Prefect
3.9's default UI (V2, React, under /v2) and MLflow 3.17's model version page.

Screenshots of each step go to `test-output/browser/<test>/` (gitignored; the path is printed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from browser_helpers import (
    ACTION_TIMEOUT_MS,
    CHROMIUM,
    CHROMIUM_ARGS,
    NAVIGATION_TIMEOUT_MS,
    Screens,
    chromium_missing,
    error_log_lines,
    final_state_badge,
    mlflow_version_page,
    param,
)
from mlflow_server import MlflowServer
from served import seed_prefect_home

from prefect_tensorflow.flows.servers import free_port, start_prefect_server, wait_until_healthy
from prefect_tensorflow.tasks.child_processes import log_tail, start_process, stop_process_group

_MISSING = chromium_missing()
if _MISSING and os.environ.get("CI") == "true" and os.geteuid() == 0 and shutil.which("apt-get"):
    # CI runs as root with apt-get: `make install` installs Chromium there, so a missing one is a failure.
    raise RuntimeError(f"tests/test_browser.py cannot run in CI: {_MISSING}")
if _MISSING:
    pytest.skip(f"BROWSER TEST SKIPPED: {_MISSING}", allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = os.path.dirname(sys.executable)
OUTPUT = REPO / "test-output" / "browser"
RUN_TIMEOUT_MS = 420_000  # a fresh export and freeze took 25-80 s on a loaded 2-core machine
RESUME_ATTEMPTS = 3  # presses of the dialog's "Resume" while the server answers 503
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _copy_model_dir(source: Path, target: Path) -> None:
    """A copy of a trained model dir whose `checkpoint` state file is newer than the files, as in place."""
    shutil.copytree(source, target)
    state, tmp = target / "checkpoint", target / "checkpoint.tmp"
    shutil.copyfile(state, tmp)
    os.replace(tmp, state)


def _deployment_names(api_url: str) -> set[str]:
    request = urllib.request.Request(
        f"{api_url}/deployments/filter", data=b"{}", headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with _DIRECT.open(request, timeout=10) as answer:
            return {d["name"] for d in json.load(answer)}
    except OSError:
        return set()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request, prefect_database):
    """Prefect server, MLflow server and `prefect-tensorflow serve`, started in parallel where they can be."""
    root = tmp_path_factory.mktemp("browser")
    data = root / "data"
    port = free_port()
    mlflow = MlflowServer(root / "mlflow")
    mlflow.env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner and huey consumers: 2 processes
    api_url = f"http://127.0.0.1:{port}/api"
    environ = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_TENSORFLOW_HOME": str(data),
        "PREFECT_TENSORFLOW_ROOTS": str(data),
        "MLFLOW_TRACKING_URI": mlflow.uri,  # the artifacts' MLflow links point at this server's UI
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    environ.pop("PREFECT_TENSORFLOW_ALLOWED_MODULES", None)  # `model` and `data` stay selects of registered names
    processes = []
    try:  # MLflow and `serve` start while the model trains; `serve` needs MLflow only when a run starts
        ml = start_process(mlflow.command(), str(mlflow.log_path), env=mlflow.env, cwd=str(mlflow.root))
        processes.append(ml)
        seed_prefect_home(root / "prefect-home", prefect_database)
        processes.append(start_prefect_server("127.0.0.1", port, str(root / "prefect-server.log"), env=environ, timeout=240))
        serve_log = root / "serve.log"
        serve = start_process([f"{BIN}/prefect-tensorflow", "serve"], str(serve_log), env=environ, cwd=str(root))
        processes.append(serve)
        _copy_model_dir(request.getfixturevalue("trained_dir"), data / "models" / "iris")
        wait_until_healthy(f"{mlflow.uri}/health", ml, str(mlflow.log_path), timeout=240)
        deadline = time.monotonic() + 240
        while not {"retrain-iris", "export-checkpoint"} <= _deployment_names(api_url):
            if serve.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serve did not create the deployments:\n{log_tail(str(serve_log))}")
            time.sleep(1)
        yield {"ui": api_url.removesuffix("/api"), "mlflow": mlflow.uri, "data": data, "serve_log": serve_log}
    finally:
        for process in reversed(processes):  # serve before the Prefect server it talks to, MLflow last
            stop_process_group(process)


@pytest.fixture(scope="module")
def browser_context():
    """Debian's Chromium, headless; one context for the module, so the UI's 11 MB of JavaScript is cached."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = chromium.new_context(viewport={"width": 1400, "height": 1000})
            context.set_default_timeout(ACTION_TIMEOUT_MS)
            context.set_default_navigation_timeout(NAVIGATION_TIMEOUT_MS)
            expect.set_options(timeout=ACTION_TIMEOUT_MS)
            yield context
        finally:
            chromium.close()


@pytest.fixture
def page(browser_context):
    page = browser_context.new_page()
    try:
        yield page
    finally:
        page.close()


@pytest.fixture
def screens(request, capsys):
    directory = OUTPUT / request.node.name
    shutil.rmtree(directory, ignore_errors=True)
    with capsys.disabled():
        return Screens(directory)


def run_export_from_the_form(page, stack, screens, *, checkpoint: str, name: str, alias: str) -> str:
    """Deployments -> export-checkpoint -> Run -> Custom run, fill the form, Submit, "View run".

    Returns the flow run's id; the page is on the flow run (V2).
    """
    page.goto(stack["ui"] + "/")  # redirects to /v2/, the default UI
    page.get_by_role("link", name="Deployments", exact=True).click()
    # each row links the deployment and its flow, both named export-checkpoint
    page.get_by_role("link", name="export-checkpoint", exact=True).first.click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Custom run").click()
    page.get_by_role("heading", name="Parameters").wait_for()
    deployment_url = page.url.split("/run?")[0]

    param(page, "checkpoint").get_by_role("textbox").fill(checkpoint)
    param(page, "registered_model_name").get_by_role("textbox").fill(name)
    aliases = param(page, "aliases")
    aliases.get_by_role("button", name="Add item").click()
    aliases.get_by_role("textbox").last.fill(alias)
    param(page, "model").get_by_role("button", name="Select model").click()
    page.get_by_role("option", name="iris", exact=True).click()
    expect(param(page, "model").get_by_role("button", name="Select model")).to_have_text("iris")
    screens(page, "run-form-filled")

    submit = page.get_by_role("button", name="Submit")
    for _ in range(3):  # a busy server (SQLite) may answer 503: the form stays, and a person presses Submit again
        with page.expect_response(lambda r: r.url.endswith("/create_flow_run") and r.request.method == "POST") as answer:
            submit.click()
        if answer.value.status != 503:
            break
    assert answer.value.status == 201, f"{answer.value.status}: {answer.value.text()[:500]}"
    run_id = answer.value.json()["id"]
    toast = page.get_by_role("region", name=re.compile("Notifications")).locator("li").filter(has_text="scheduled to start")
    toast.first.wait_for()
    # After Submit the UI goes back to the deployment's Runs tab; a click on the toast before that
    # navigation has landed is undone by it.
    page.wait_for_url(re.compile(re.escape(deployment_url) + r"\?tab=Runs"))
    screens(page, "submitted", full_page=False)
    toast.first.get_by_role("button", name="View run").click()
    page.wait_for_url(re.compile(rf"/v2/runs/flow-run/{run_id}"))
    return run_id


def wait_for_final_state(page, stack, run_id: str) -> str:
    """The final state the run page shows, checked against the server's own record of the run."""
    badge = final_state_badge(page)
    badge.wait_for(timeout=RUN_TIMEOUT_MS)
    assert run_id in page.url, f"left the run page for {page.url}"
    shown = badge.inner_text()
    with _DIRECT.open(f"{stack['ui']}/api/flow_runs/{run_id}", timeout=30) as answer:
        recorded = json.load(answer)["state"]["name"]
    assert shown == recorded, f"the run page shows {shown!r}, the server has {recorded!r}"
    return shown


def state_message(page) -> str:
    page.get_by_role("tab", name="Details").click(force=True)  # force: the run graph's overlay can cover the tabs
    message = page.get_by_role("tabpanel", name="Details").locator("dt:text-is('State Message') + dd")
    return message.inner_text()


def open_artifact(page, key: str):
    """From the run page's Artifacts tab, open one artifact's page; returns its rendered body."""
    page.get_by_role("tab", name="Artifacts").click(force=True)
    panel = page.get_by_role("tabpanel", name="Artifacts")
    panel.get_by_role("link").filter(has=page.get_by_role("heading", name=key, exact=True)).click()
    body = page.get_by_role("tabpanel", name="Artifact", exact=True)  # not "Artifacts": the list the click leaves
    body.wait_for()
    return body


def test_export_from_the_run_form_then_follow_the_links_to_mlflow_and_back(stack, page, screens):
    import mlflow

    run_id = run_export_from_the_form(page, stack, screens, checkpoint="200", name="ui-iris", alias="staging")
    state = wait_for_final_state(page, stack, run_id)
    screens(page, "run-final")
    if state != "Completed":
        pytest.fail(f"run {state}: {state_message(page)}\n{log_tail(str(stack['serve_log']))}")
    run_name = "export-ui-iris-200"  # the flow_run_name template
    expect(page.get_by_role("navigation", name="breadcrumb")).to_contain_text(run_name)

    page.get_by_role("tab", name="Artifacts").click(force=True)
    cards = page.get_by_role("tabpanel", name="Artifacts").get_by_role("heading")
    expect(cards).to_have_count(6)
    assert sorted(cards.all_inner_texts()) == [
        "alias-history-ui-iris",  # champion moved: the first version
        "champion-gate",
        "checkpoints",
        "export-summary",
        "mlflow-model-version",
        "mlflow-run",
    ]
    screens(page, "artifacts")

    table = open_artifact(page, "checkpoints")
    rows = table.get_by_role("row")
    expect(rows).to_have_count(5)  # the header and steps 300, 200, 100, 0
    selected = rows.filter(has=page.get_by_role("cell", name="200", exact=True))
    expect(selected.get_by_role("cell").nth(1)).to_have_text("yes")  # the selected column
    screens(page, "artifact-checkpoints")
    page.go_back()

    summary = open_artifact(page, "export-summary")
    expect(summary.get_by_role("heading", name="Export summary")).to_be_visible()
    expect(summary).to_contain_text("ui-iris version 1 from checkpoint step 200")
    expect(summary).to_contain_text("SavedModel version 1")
    expect(summary).to_contain_text(str(stack["data"] / "exports" / "ui-iris" / "1"))
    expect(summary).to_contain_text("promoted to champion")
    text = summary.inner_text()
    export_digest = re.search(r"digest (sha256:[0-9a-f]{64})", text)
    assert export_digest, text
    screens(page, "artifact-export-summary")
    page.go_back()

    link_body = open_artifact(page, "mlflow-model-version")
    link = link_body.get_by_role("link", name="ui-iris version 1")
    expected_url = f"{stack['mlflow']}/#/models/ui-iris/versions/1"
    expect(link).to_have_attribute("href", expected_url)
    screens(page, "artifact-mlflow-link")
    link.click()  # the link opens in the same tab
    page.wait_for_url(expected_url)
    shown = mlflow_version_page(page, "1")
    screens(page, "mlflow-model-version")
    assert shown["aliases"] == ["challenger", "champion", "staging"], shown
    tags = shown["tags"]
    assert tags.get("prefect_tensorflow.checkpoint.step") == "200", tags
    assert tags.get("prefect_tensorflow.export.sha256") == export_digest.group(1), tags
    assert tags.get("prefect_tensorflow.export.dir") == str(stack["data"] / "exports" / "ui-iris" / "1"), tags
    assert tags.get("prefect.flow_run_id") == run_id and tags.get("prefect.flow_run_name") == run_name, tags
    flow_run_url = tags.get("prefect.flow_run_url", "")
    assert run_id in flow_run_url, tags

    # The tag's link leads back to the same run. Prefect makes it without /v2, so it opens the V1 UI.
    page.goto(flow_run_url)
    page.wait_for_url(re.compile(rf"/runs/flow-run/{run_id}"))
    banner = page.get_by_role("banner")
    expect(banner).to_contain_text(run_name)
    expect(banner).to_contain_text("Completed")
    expect(page.get_by_text(f"Beginning flow run '{run_name}'").first).to_be_visible()  # its logs have loaded
    screens(page, "prefect-run-from-mlflow-tag")

    client = mlflow.MlflowClient(stack["mlflow"])
    assert str(client.get_model_version_by_alias("ui-iris", "staging").version) == "1"


def test_a_bad_checkpoint_typed_in_the_form_fails_the_run_and_registers_nothing(stack, page, screens):
    import mlflow

    run_id = run_export_from_the_form(page, stack, screens, checkpoint="best:no_such_metric", name="ui-bad-iris", alias="staging")
    state = wait_for_final_state(page, stack, run_id)
    screens(page, "run-final")
    assert state == "Failed", f"{state}\n{log_tail(str(stack['serve_log']))}"

    errors = error_log_lines(page)
    screens(page, "run-error-logs")
    assert any("no_such_metric" in line for line in errors), errors
    message = state_message(page)
    screens(page, "run-state-message")
    assert "no_such_metric" in message and "recorded metrics: accuracy, loss, train_loss" in message, message
    client = mlflow.MlflowClient(stack["mlflow"])
    assert client.search_registered_models("name = 'ui-bad-iris'") == []

    assert re.search(r"\bcheckpoint\b\s*[:=]|\bcheckpoint '|`checkpoint`", message), (
        f"the failure must name the `checkpoint` parameter: {message}"
    )


def resume_with_input(page, screens, *, question: str, approve: bool, reason: str) -> None:
    """On a paused flow run's page: "Open menu" -> "Resume", the question shown, the typed form filled, "Resume"."""
    page.get_by_role("button", name="Open menu").click()
    page.get_by_role("menuitem", name="Resume", exact=True).click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_text("Provide input to resume")).to_be_visible()
    expect(dialog).to_contain_text(question)  # the gate's question, above the form
    screens(page, "resume-form")
    approve_box = dialog.get_by_role("switch").or_(dialog.get_by_role("checkbox")).first
    if approve_box.is_checked() != approve:
        approve_box.click()
    dialog.get_by_role("textbox").last.fill(reason)
    screens(page, "resume-form-filled")
    for attempt in range(1, RESUME_ATTEMPTS + 1):
        with page.expect_response(lambda r: r.url.endswith("/resume") and r.request.method == "POST") as answer:
            dialog.get_by_role("button", name="Resume", exact=True).click()
        if answer.value.status != 503 or attempt == RESUME_ATTEMPTS:
            break
        # 503 is the Prefect server's "try again": on SQLite, another write between the resume's read and its
        # write (SQLITE_BUSY_SNAPSHOT). Prefect's Python client retries it; the UI leaves that to the person.
        screens(page, f"resume-answered-503-{attempt}")
        expect(dialog.get_by_role("button", name="Resume", exact=True)).to_be_enabled()
    assert answer.value.status in (200, 201), f"{answer.value.status}: {answer.value.text()[:500]}"
    assert str(answer.value.json().get("status")).upper() == "ACCEPT", answer.value.text()[:500]


def test_an_incomparable_challenger_pauses_the_run_and_the_resume_form_approves_it(stack, page, screens, trained_dir, tmp_path):
    import mlflow
    from browser_gate import incomparable_champion

    name = "ui-gate-iris"
    client = mlflow.MlflowClient(stack["mlflow"])
    champion = incomparable_champion(trained_dir, tmp_path, name=name, mlflow_uri=stack["mlflow"], api_url=f"{stack['ui']}/api")

    run_id = run_export_from_the_form(page, stack, screens, checkpoint="300", name=name, alias="staging")
    paused = page.locator("main [data-slot=badge]").filter(has_text=re.compile(r"^(Paused|Failed|Crashed|Completed)$")).first
    paused.wait_for(timeout=RUN_TIMEOUT_MS)
    screens(page, "run-paused")
    assert paused.inner_text() == "Paused", f"{paused.inner_text()}\n{log_tail(str(stack['serve_log']))}"
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(champion)

    reason = "serving clients now send 'features'"
    question = f"{name} v2 cannot be compared with champion v{champion}"
    resume_with_input(page, screens, question=question, approve=True, reason=reason)
    state = wait_for_final_state(page, stack, run_id)
    screens(page, "run-final")
    if state != "Completed":
        pytest.fail(f"run {state}: {state_message(page)}\n{log_tail(str(stack['serve_log']))}")

    run_name = f"export-{name}-300"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    tags = client.get_model_version(name, "2").tags
    assert tags["prefect_tensorflow.gate.state"] == "promoted", tags
    assert tags["prefect_tensorflow.gate.champion_version"] == str(champion), tags
    approved = f"approved by Prefect flow run {run_name} resumed with input: {reason}"
    assert tags["prefect_tensorflow.gate.reason"].startswith(approved), tags["prefect_tensorflow.gate.reason"]
    assert "input names differ" in tags["prefect_tensorflow.gate.reason"], tags["prefect_tensorflow.gate.reason"]

    body = open_artifact(page, "champion-gate")
    expect(body.get_by_role("heading", name=f"Champion gate: {name} v2")).to_be_visible()  # the markdown rendered
    expect(body).to_contain_text(f"promoted to champion: {approved}")
    screens(page, "artifact-champion-gate")
    page.go_back()

    history = open_artifact(page, f"alias-history-{name}")
    expect(history).to_contain_text(approved)  # the champion move 1 -> 2, with who approved it and why
    screens(page, "artifact-alias-history")
