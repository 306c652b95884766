"""Which of two metric values is better: the one rule shared by checkpoint selection, the sweep and the gate.

A mode says which way a metric improves: `"max"` (higher is better, e.g.
accuracy) or `"min"` (lower is better). When a mode is not given it follows
the metric's name: a name containing `loss` or `error` is minimised (and
Keras's short error names `mse`, `mae`, `rmse`), anything else maximised.
`best:<metric>`, the sweep's ranking and `GateConfig` all take their default
from `default_mode`, and all compare with `better`; nothing else spells out
min or max.

Example:
    >>> from prefect_tensorflow.tasks.metric_order import best_first, better, default_mode
    >>> default_mode("eval/loss"), default_mode("accuracy")
    ('min', 'max')
    >>> better(0.2, 0.3, "min"), better(0.3, 0.3, "max")
    (True, False)
    >>> best_first(["a", "b", "c"], {"a": 0.9, "b": 0.97, "c": 0.97}.__getitem__, "max")
    ['b', 'c', 'a']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import cmp_to_key
from typing import Literal, Optional, TypeVar

Mode = Literal["min", "max"]
MODES = ("min", "max")
# Keras's short names of error metrics (`mse`, `val_mae`, `rmse`), which hold no "error".
_ERROR_ABBREVIATION = re.compile(r"(?:^|[/_.])r?m[as]e$")
T = TypeVar("T")


def default_mode(metric: Optional[str]) -> Mode:
    """`"min"` for a metric named like a loss or an error (`loss`, `eval/error_rate`, `mse`, `mae`), else `"max"` (None too).

    Example:
        >>> default_mode("val_loss"), default_mode("error"), default_mode("auc"), default_mode(None)
        ('min', 'min', 'max', 'max')
        >>> default_mode("mse"), default_mode("eval/mae"), default_mode("val_rmse")
        ('min', 'min', 'min')
    """
    if metric is not None and ("loss" in metric or "error" in metric or _ERROR_ABBREVIATION.search(metric)):
        return "min"
    return "max"


def better(a: float, b: float, mode: Mode) -> bool:
    """Whether `a` is strictly better than `b`: higher for `"max"`, lower for `"min"` (a tie is not better).

    Raises:
        ValueError: `mode` is neither "min" nor "max".

    Example:
        >>> better(0.97, 0.9, "max"), better(0.97, 0.9, "min"), better(1.0, 1.0, "min")
        (True, False, False)
    """
    if mode == "max":
        return a > b
    if mode == "min":
        return a < b
    raise ValueError(f"mode: expected 'min' or 'max', received {mode!r}")


def best_first(items: Iterable[T], value: Callable[[T], float], mode: Mode) -> list[T]:
    """`items` sorted best first by `value(item)` under `better`; ties keep the order they came in.

    Example:
        >>> best_first([0, 1, 2], [0.3, 0.1, 0.3].__getitem__, "min")
        [1, 0, 2]
    """
    better(0.0, 0.0, mode)  # a bad mode fails here, even for fewer than two items

    def compare(x: T, y: T) -> int:
        vx, vy = value(x), value(y)
        return -1 if better(vx, vy, mode) else 1 if better(vy, vx, mode) else 0

    return sorted(items, key=cmp_to_key(compare))
