"""Small validators shared by the configs, and one-line messages from pydantic's errors.

Every check says what was expected and what was received, in the package's
style (`steps: expected an integer >= 0, received -4`); `one_line` turns a
pydantic `ValidationError` into that single line, naming the field at fault.

Example:
    >>> from typing import Annotated
    >>> from pydantic import BaseModel, BeforeValidator
    >>> from prefect_tensorflow.tasks.config_checks import integer_between, one_line
    >>> class Counts(BaseModel):
    ...     steps: Annotated[int, BeforeValidator(integer_between(0))] = 1
    >>> try:
    ...     Counts(steps=-4)
    ... except ValueError as err:
    ...     print(one_line(err))
    steps: expected an integer >= 0, received -4
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Annotated, Any, Optional

from pydantic import BeforeValidator, ValidationError

MAX_TEXT = 1024  # longer text parameters are refused before any other check


def integer_between(minimum: int, maximum: Optional[int] = None, *, none_means: Optional[str] = None) -> Callable[[Any], Any]:
    """A validator: a real integer (not a bool, not a float) in `[minimum, maximum]`.

    `none_means` says, in the message, what None does where the field is optional.
    """

    def check(value: Any) -> Any:
        too_big = maximum is not None and isinstance(value, int) and value > maximum
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or too_big:
            bound = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
            alternative = f" (or None to {none_means})" if none_means else ""
            raise ValueError(f"expected an integer {bound}{alternative}, received {short_repr(value)}")
        return value

    return check


def positive_number(value: Any) -> Any:
    """A validator: an int or float > 0 (not a bool, not NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value != value:
        raise ValueError(f"expected a number > 0, received {short_repr(value)}")
    return value


PositiveNumber = Annotated[float, BeforeValidator(positive_number)]


def _is_number(value: Any) -> bool:
    """An int or a finite float, not a bool. Any int: `math.isfinite` of one past float's range raises
    OverflowError, which pydantic would not turn into an error naming the field (the field's float type
    then refuses it, naming the field)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def finite_number(value: Any) -> Any:
    """A validator: an int or float, finite (not a bool, not NaN or infinite)."""
    if not _is_number(value):
        raise ValueError(f"expected a finite number, received {short_repr(value)}")
    return value


FiniteNumber = Annotated[float, BeforeValidator(finite_number)]


def finite_number_at_least(minimum: float) -> Callable[[Any], Any]:
    """A validator: a finite int or float >= `minimum`."""

    def check(value: Any) -> Any:
        if not _is_number(value) or value < minimum:
            raise ValueError(f"expected a finite number >= {minimum:g}, received {short_repr(value)}")
        return value

    return check


def number_in_open_interval(low: float, high: float) -> Callable[[Any], Any]:
    """A validator: an int or float strictly between `low` and `high`."""

    def check(value: Any) -> Any:
        if not _is_number(value) or not low < value < high:
            raise ValueError(f"expected a number in ({low:g}, {high:g}), received {short_repr(value)}")
        return value

    return check


def text_matching(pattern: str, expected: str, max_length: int = 256) -> Callable[[Any], Any]:
    """A validator: `value` is a str of at most `max_length` characters matching `pattern`."""
    compiled = re.compile(pattern)

    def check(value: Any) -> Any:
        if not isinstance(value, str) or len(value) > max_length or not compiled.fullmatch(value):
            raise ValueError(f"expected {expected}, received {short_repr(value)}")
        return value

    return check


def one_of(*choices: str) -> Callable[[Any], Any]:
    """A validator: `value` is one of `choices` (put before a `Literal`, whose enum the UI shows)."""

    def check(value: Any) -> Any:
        if value not in choices:
            raise ValueError(f"expected {' or '.join(repr(c) for c in choices)}, received {short_repr(value)}")
        return value

    return check


def short_repr(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters, so a 10 MB parameter does not make a 10 MB message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


def one_line(err: BaseException) -> str:
    """One line per error: `<field path>: <message>`, joined with '; '. Other exceptions as `str()`."""
    if not isinstance(err, ValidationError):
        return str(err)
    parts = []
    for error in err.errors(include_url=False):
        where = ".".join(str(part) for part in error.get("loc", ())) or err.title
        message = error.get("msg", "")
        message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if error.get("type") != "value_error" and "received" not in message:
            message = f"{message}, received {short_repr(error.get('input'))}"
        prefix = f"{where}: "
        parts.append(message if message.startswith(prefix) else prefix + message)
    return "; ".join(parts)
