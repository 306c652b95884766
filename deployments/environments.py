"""Per-environment overrides of the deployments: `deployments/environments/<env>.yaml`.

Example:
    >>> from environments import load_overrides
    >>> load_overrides("dev")["retrain-iris"]["paused"]
    True
"""

from __future__ import annotations

import os
from typing import Any, Optional

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
KNOWN = ("retrain-iris", "export-checkpoint")


def load_overrides(env: Optional[str]) -> dict[str, dict[str, Any]]:
    """The overrides of `env` (none for None), checked: only known deployments and keys."""
    if env is None:
        return {}
    path = os.path.join(HERE, "environments", f"{env}.yaml")
    if not os.path.exists(path):
        choices = sorted(f[:-5] for f in os.listdir(os.path.join(HERE, "environments")) if f.endswith(".yaml"))
        raise SystemExit(f"--env: expected one of {choices}, received {env!r} (no {path})")
    with open(path) as handle:
        overrides = yaml.safe_load(handle) or {}
    for name, settings in overrides.items():
        if name not in KNOWN:
            raise SystemExit(f"{path}: unknown deployment {name!r}; expected one of {list(KNOWN)}")
        unknown = set(settings) - {"parameters", "cron", "paused", "tags", "description"}
        if unknown:
            raise SystemExit(f"{path}: {name}: unknown keys {sorted(unknown)}")
    return overrides
