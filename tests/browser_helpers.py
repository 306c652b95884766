"""Playwright helpers for driving the Prefect 3 UI (V2, React) and the MLflow 3 UI in Debian's Chromium.

The selectors are the ones recorded in the notes on Prefect 3.9.1 and MLflow 3.17: accessible
roles and names where the UI has them, and a label-container helper for the run form's
parameters (textboxes inside list items and nested objects have no accessible name).

Example:
    >>> from browser_helpers import chromium_missing
    >>> isinstance(chromium_missing(), (str, type(None)))
    True
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
FINAL_STATES = re.compile(r"^(Completed|Failed|Crashed|Cancelled)$")
# A shared 2-core machine: the first load of the UI (11 MB of JavaScript) took up to 13 s under load.
NAVIGATION_TIMEOUT_MS = 120_000
ACTION_TIMEOUT_MS = 60_000


def chromium_missing() -> Optional[str]:
    """Why the browser test cannot run here, or None when it can."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright Python package is missing: pip install -e '.[test]' (or `make install`)"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        how = "`make install` as root does it" if shutil.which("apt-get") else "no apt-get here: install a Chromium at that path"
        return f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install -y chromium; {how})"
    return None


class Screens:
    """Numbered full-page screenshots in one directory (printed, so a person can find them)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.count = 0
        print(f"\nbrowser screenshots: {self.directory}")

    def __call__(self, page: Any, name: str, full_page: bool = True) -> Path:
        self.count += 1
        path = self.directory / f"{self.count:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        return path


def param(page: Any, name: str) -> Any:
    """The container of one parameter in the V2 run form: the innermost div holding both its <label>
    ("name" or "name (Optional)") and its <fieldset>."""
    label = page.locator("label").filter(has_text=re.compile(rf"^{re.escape(name)}( \(Optional\))?$"))
    return page.locator("main div").filter(has=label).filter(has=page.locator("fieldset")).last


def final_state_badge(page: Any) -> Any:
    """The flow-run page's state badge once the run has reached a final state.

    After "View run" the URL changes before the page does: the router keeps the deployment page, whose
    Runs tab lists earlier runs with their own state badges, until the flow run has loaded. So this
    waits for a tab only the flow-run page has ("Subflow Runs") before it looks for the badge.
    """
    page.get_by_role("tab", name="Subflow Runs").wait_for()
    return page.locator("main [data-slot=badge]").filter(has_text=FINAL_STATES).first


def error_log_lines(page: Any, timeout: float = 60) -> list[str]:
    """The ERROR lines of the Logs tab. The list is virtualized, so it is filtered to "Error and above"
    first; logs reach the server in batches after the state change, so the tab is reloaded when it
    still says the run produced none."""

    def show_errors_only() -> None:
        page.get_by_role("combobox", name="log level filter").click()
        page.get_by_role("option", name="Error and above").click()

    def lines() -> list[str]:
        rows = page.get_by_role("tabpanel", name="Logs").get_by_role("log").get_by_role("listitem")
        return rows.filter(has=page.get_by_text("ERROR", exact=True)).all_inner_texts()

    show_errors_only()
    deadline = time.monotonic() + timeout
    next_reload = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = lines()
        if found:
            return [line.replace("\n", " | ") for line in found]
        if time.monotonic() > next_reload:
            page.reload()
            page.get_by_role("tabpanel", name="Logs").wait_for()
            show_errors_only()
            next_reload = time.monotonic() + 15
        page.wait_for_timeout(1000)
    return []


def close_mlflow_assistant(page: Any) -> None:
    """MLflow 3.17 opens an "MLflow Assistant" side panel by default, over a third of the page."""
    close = page.get_by_role("button", name="Close")
    if close.count() and close.first.is_visible():
        close.first.click()


def mlflow_version_page(page: Any, version: str) -> dict[str, Any]:
    """What the open MLflow model version page shows: its aliases and its tags (name -> value)."""
    main = page.get_by_role("main")
    main.get_by_role("heading", name=f"Version {version}", level=2).wait_for()
    close_mlflow_assistant(page)
    aliases = sorted(s.inner_text().lstrip("@").strip() for s in main.get_by_role("status").all())
    tags = {}
    for row in main.get_by_role("row").all():
        cells = row.get_by_role("cell")
        if cells.count() == 3 and cells.nth(2).get_by_role("button").count() == 2:  # tag rows: edit + delete
            tags[cells.nth(0).inner_text().strip()] = cells.nth(1).inner_text().strip()
    return {"aliases": aliases, "tags": tags}
