"""Command-line commands made from the flows' parameters, so a flow parameter is declared once: in the flow.

`flow_command(flow, spelling, text, emit)` turns a Prefect flow into a Typer command
function with one option per flow parameter, by its type:

- a config (`TrainingConfig`, `GateConfig`, an `MlflowConnection`): one option
  per field (`cli_options`), the config built from what was given;
- a number, a text, a choice: `--<name>` (`--<name>/--no-<name>` for a bool);
- a list of those: a repeatable option;
- anything else (a list of candidates): JSON text, or `@FILE` holding it.

The help is the flow's description of the parameter; an option not given
leaves the flow's default. Each value is checked as the flow types it before
the flow runs (a bad one is one line naming the option, exit status 2), and a
parameter annotated `ParsedBy(parse)` is also parsed. `Spelling` holds where
the command line spells a parameter otherwise (`--mlflow/--no-mlflow` for
`track`). `FlowCommands` is the Typer group that makes a flow's command only
when it is used: the flow module (and Prefect) is imported then.

Example:
    >>> from prefect_tensorflow.flows.flow_commands import Spelling, option_flag
    >>> option_flag("registered_model_name", Spelling())
    '--registered-model-name'
    >>> option_flag("track", Spelling(flags={"track": "--mlflow/--no-mlflow"}))
    '--mlflow/--no-mlflow'
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import typer
from pydantic import BaseModel, TypeAdapter
from typer.core import TyperCommand, TyperGroup

from prefect_tensorflow.tasks.configs import TrainingConfig

from .cli_errors import fail, flow_logs_without_reported_tracebacks, named, reported
from .cli_options import base_type, config_from_options, config_options, training_config, training_options
from .parameters import ParsedBy

SCALARS = (int, float, str, bool)
# (summary, the flow's arguments as given) -> the result as text
Text = Callable[[Any, Mapping[str, Any]], str]
# (summary, --json, its text) -> prints the result
Emit = Callable[[Any, bool, Callable[[], str]], None]


@dataclass(frozen=True)
class Spelling:
    """Where the command line spells a flow parameter otherwise than `--<name>`, for every flow command.

    Attributes:
        flags: a parameter's flag (`"aliases": "--alias"`, `"track": "--mlflow/--no-mlflow"`).
        config_prefixes: a config parameter's option prefix (default `<name>_`; `""` for the training's).
        config_flags: a config parameter whose options are only these fields, so named.
        required: parameters the command line asks for although the flow has a default.
    """

    flags: Mapping[str, str] = field(default_factory=dict)
    config_prefixes: Mapping[str, str] = field(default_factory=dict)
    config_flags: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    required: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _Input:
    """One flow parameter on the command line: its options and how their values become the argument."""

    name: str
    options: tuple[inspect.Parameter, ...]
    read: Callable[[Mapping[str, Any]], tuple[bool, Any]]  # option values -> (given, argument)


def option_flag(name: str, spelling: Spelling) -> str:
    """The flag of a flow parameter: its spelling, else `--<name>` with '-' for '_'."""
    return spelling.flags.get(name) or "--" + name.replace("_", "-")


def flow_command(flow: Any, spelling: Spelling, text: Text, emit: Emit) -> Callable[..., None]:
    """A Typer command function running `flow`: an option per parameter, `--json`; `emit` prints the result."""
    hints = typing.get_type_hints(flow.fn, include_extras=True)
    described = flow.parameters.properties
    parameters = inspect.signature(flow.fn).parameters
    inputs = [
        _input(p, hints[p.name], " ".join(described.get(p.name, {}).get("description", p.name).split()), spelling, parameters)
        for p in parameters.values()
    ]
    as_json = inspect.Parameter(
        "as_json",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(False, "--json", help="Print the result as JSON"),
        annotation=bool,
    )
    options = [option for item in inputs for option in item.options] + [as_json]
    names = [option.name for option in options]
    if len(set(names)) != len(names):
        raise TypeError(f"flow {flow.name}: two parameters make the same option: {sorted(names)}")

    def command(**values: Any) -> None:
        arguments = {}
        for item in inputs:
            try:
                given, argument = item.read(values)
            except ValueError as err:
                fail(err)
            if given:
                arguments[item.name] = argument
        with flow_logs_without_reported_tracebacks():
            summary = reported(lambda: flow(**arguments))
        emit(summary, values["as_json"], lambda: text(summary, arguments))

    command.__name__ = flow.name.replace("-", "_")
    command.__signature__ = inspect.Signature(options)  # type: ignore[attr-defined]
    command.__annotations__ = {option.name: option.annotation for option in options}
    return command


def _input(
    parameter: inspect.Parameter, annotation: Any, description: str, spelling: Spelling, flow_parameters: Mapping[str, Any]
) -> _Input:
    name, default = parameter.name, parameter.default
    base = base_type(annotation)
    if inspect.isclass(base) and issubclass(base, BaseModel):
        return _config_input(name, base, spelling, flow_parameters, optional=default is None)
    flag = option_flag(name, spelling)
    required = name in spelling.required or default is inspect.Parameter.empty
    origin = typing.get_origin(base)
    item = base_type(typing.get_args(base)[0]) if origin is list and typing.get_args(base) else None
    if "/" in flag and origin is typing.Literal and len(typing.get_args(base)) == 2:
        # a two-valued choice spelled as a pair of flags: `--approve/--reject` -> "approve" / "reject"
        yes, no = typing.get_args(base)
        option = typer.Option(None, flag, help=description, show_default=False)
        return _Input(name, (_option(name, option, Optional[bool]),), lambda values: _choice(values[name], yes, no))
    if _kind(base) is not None:
        kind = _kind(base)
        shown = "" if default in ("", None, inspect.Parameter.empty) or kind is bool else f" (default: {default})"
        decls = [flag if "/" in flag else f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        option = typer.Option(... if required else None, *decls, help=description + shown, show_default=False)
        return _Input(name, (_option(name, option, Optional[kind]),), lambda values: _scalar(values[name], annotation, flag))
    if origin is list and item is not None and _kind(item) is not None:
        option = typer.Option(... if required else [], flag, help=f"{description} (repeatable)", show_default=False)
        element = typing.get_args(base)[0]
        return _Input(name, (_option(name, option, list[_kind(item)]),), lambda values: _items(values[name], element, flag))  # type: ignore[misc]
    option = typer.Option(... if required else None, flag, help=f"{description} (JSON, or @FILE holding it)", show_default=False)
    return _Input(name, (_option(name, option, Optional[str]),), lambda values: _json(values[name], annotation, flag))


def _config_input(
    name: str, model: type[BaseModel], spelling: Spelling, flow_parameters: Mapping[str, Any], *, optional: bool = False
) -> _Input:
    """A config's options. A training field that is also a flow parameter (`window`) is the parameter's on the
    command line; an optional config none of whose options is given is not given (the flow's None)."""
    if issubclass(model, TrainingConfig):
        shadowed = [f for f in TrainingConfig.model_fields if f in flow_parameters and f != name]
        options = [o for o in training_options() if not any(o.name == f or o.name.startswith(f + "_") for f in shadowed)]
        return _Input(name, tuple(options), lambda values: (True, training_config({o.name: values[o.name] for o in options})))
    prefix = spelling.config_prefixes.get(name, name + "_")
    flags = spelling.config_flags.get(name)
    options = config_options(model, prefix=prefix, flags=flags)

    def read(values: Mapping[str, Any]) -> tuple[bool, Any]:
        given = {o.name: values[o.name] for o in options}
        if optional and all(value is None for value in given.values()):
            return False, None
        return True, config_from_options(model, given, prefix=prefix, flags=flags)

    return _Input(name, tuple(options), read)


def _kind(annotation: Any) -> Optional[type]:
    """The option type of a scalar annotation (a `Literal` is text), else None."""
    if annotation in SCALARS:
        return annotation
    if typing.get_origin(annotation) is typing.Literal:
        return str
    return None


def _option(name: str, option: Any, annotation: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def _scalar(value: Any, annotation: Any, flag: str) -> tuple[bool, Any]:
    if value is None:
        return False, None
    value = named(flag, lambda: TypeAdapter(annotation).validate_python(value))
    for parse in _parsers(annotation):
        parse(value)
    return True, value


def _choice(value: Optional[bool], yes: Any, no: Any) -> tuple[bool, Any]:
    return (False, None) if value is None else (True, yes if value else no)


def _items(values: list[Any], element: Any, flag: str) -> tuple[bool, Any]:
    if not values:
        return False, None
    return True, [named(flag, lambda: TypeAdapter(element).validate_python(value)) for value in values]  # noqa: B023


def _json(text: Optional[str], annotation: Any, flag: str) -> tuple[bool, Any]:
    """JSON text, or `@FILE` holding it, validated as `annotation`."""
    if text is None:
        return False, None
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as handle:
                text = handle.read()
        except OSError as err:
            raise ValueError(f"{flag}: cannot read {text[1:]}: {err.strerror or err}") from err
    try:
        values = json.loads(text)
    except ValueError as err:
        expected = "a JSON list" if typing.get_origin(base_type(annotation)) is list else "JSON"
        raise ValueError(f"{flag}: expected {expected}: {err}") from err
    return True, named(flag, lambda: TypeAdapter(annotation).validate_python(values))


def _parsers(annotation: Any) -> list[Callable[[Any], Any]]:
    if typing.get_origin(annotation) is not typing.Annotated:
        return []
    return [meta.parse for meta in typing.get_args(annotation)[1:] if isinstance(meta, ParsedBy)]


@dataclass(frozen=True)
class FlowEntry:
    """A flow command of the command line: the flow (`module:attribute`), its one-line help, its result as text."""

    flow: str
    help: str
    text: Text


def load_flow(entrypoint: str) -> Any:
    """The flow at `module:attribute`, imported with `sys.stderr` where the process already logs.

    The first import of Prefect reconfigures logging: it closes every handler made before and
    binds its own to the `sys.stderr` of that moment. absl's handler (made when TensorFlow was
    imported) closes its stream on the way unless that stream is the current `sys.stderr`; a
    caller that swapped the streams meanwhile (Click's `CliRunner`) would see the stream it had
    before closed. So the import runs with `sys.stderr` set to absl's stream, else the process's own.
    """
    module, attribute = entrypoint.split(":")
    absl_logging = sys.modules.get("absl.logging")
    absl_stream = getattr(absl_logging.get_absl_handler().python_handler, "stream", None) if absl_logging else None
    with contextlib.redirect_stderr(absl_stream or sys.__stderr__ or sys.stderr):
        return getattr(importlib.import_module(module), attribute)


class LazyFlowCommand(TyperCommand):
    """A flow's command, listed by its help; made from the flow (importing it, and Prefect) when it is used."""

    def __init__(self, name: str, entry: FlowEntry, spelling: Spelling, emit: Emit) -> None:
        super().__init__(name, help=entry.help, short_help=entry.help)
        self.entry, self.spelling, self.emit = entry, spelling, emit

    def make_context(self, info_name: Optional[str], args: list[str], parent: Any = None, **extra: Any) -> Any:
        flow = load_flow(self.entry.flow)
        app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        app.command(name=self.name, help=self.entry.help)(flow_command(flow, self.spelling, self.entry.text, self.emit))
        return typer.main.get_command(app).make_context(info_name, args, parent=parent, **extra)


def flow_commands_group(entries: Callable[[], Mapping[str, FlowEntry]], spelling: Spelling, emit: Emit) -> type[TyperGroup]:
    """A Typer group class holding, besides the app's own commands, one `LazyFlowCommand` per entry of `entries()`."""

    class FlowCommands(TyperGroup):
        def __init__(self, **attrs: Any) -> None:
            super().__init__(**attrs)
            for name, entry in entries().items():
                self.add_command(LazyFlowCommand(name, entry, spelling, emit))

    return FlowCommands
