"""How the command line reports a bad input or a failed command: one line on stderr, exit status 2.

Example:
    >>> from prefect_tensorflow.flows.cli_errors import named
    >>> from pydantic import TypeAdapter
    >>> named("--workers", lambda: TypeAdapter(int).validate_python("many"))
    Traceback (most recent call last):
    ...
    ValueError: --workers: Input should be a valid integer, unable to parse string as an integer, received 'many'
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from pydantic import ValidationError

from prefect_tensorflow.tasks.config_checks import one_line
from prefect_tensorflow.tasks.errors import PrefectTensorFlowError, StorageError
from prefect_tensorflow.tasks.storage.write_failures import describe_write_failure, write_failure_reason

# What a command reports in one line; anything else is a bug and keeps its traceback.
REPORTED = (PrefectTensorFlowError, ValidationError, ValueError, FileNotFoundError)


def fail(err: BaseException) -> NoReturn:
    """Print `error: <one line>` and exit with status 2."""
    typer.echo(f"error: {one_line(err)}", err=True)
    raise typer.Exit(2)


def reported(action: Callable[[], Any]) -> Any:
    """Run `action`, turning the package's and validation errors, and a write the system refused (a full disk,
    permission denied, a read-only file system) wherever it happens, into one-line messages (exit 2)."""
    try:
        return action()
    except REPORTED as err:
        fail(err)
    except OSError as err:
        reason = write_failure_reason(err)
        if reason is None:
            raise
        writing = reason in ("No space left on device", "Disk quota exceeded", "Read-only file system")
        fail(StorageError(f"{'a write failed: ' if writing else ''}{describe_write_failure(err)}"))


@contextmanager
def flow_logs_without_reported_tracebacks() -> Iterator[None]:
    """While a command runs a flow: Prefect logs a failed flow's exception with its traceback; for an error
    the command reports in one line (a package error: bad data, a refused parameter) the log keeps the message."""

    def drop_traceback(record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], REPORTED):
            record.exc_info, record.exc_text = None, None
        return True

    logger = logging.getLogger("prefect.flow_runs")
    logger.addFilter(drop_traceback)
    try:
        yield
    finally:
        logger.removeFilter(drop_traceback)


def named(option: str, check: Callable[[], Any]) -> Any:
    """Run a validation, its error (a `ValueError`) prefixed with the option it is about.

    A nested error keeps its location (`--candidates: 0.seed: ...`); a top-level one loses the type's title.
    """
    try:
        return check()
    except ValidationError as err:
        message = one_line(err).removeprefix(f"{err.title}: ")
        raise ValueError(f"{option}: {message}") from err
