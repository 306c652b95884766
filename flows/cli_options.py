"""Command-line options made from the configs' fields, so each setting is spelled out once.

`config_options` makes one option per field of a pydantic config (`GateConfig`
gives `--gate-metric`, `--gate-mode`, `--gate-guardrails loss=0.02`, ... and
`--gate-serving-max-load-seconds` for its nested `ServingLimits`) and
`config_from_options` builds the config back from what was given, so its
defaults stay the config's.

`with_training_options` adds one option per field of `TrainingConfig` and
`CheckpointPolicy` to a Typer command (`--steps`, `--batch-size`,
`--save-checkpoints-steps`, ...), each defaulting to "the config's default",
with the field's description as help; the command receives the validated
`TrainingConfig` as its `training` argument. Validation happens once, in the
config; a bad value is one error line naming the option.

Example:
    >>> import typer
    >>> from prefect_tensorflow.flows.cli_options import with_training_options
    >>> @with_training_options
    ... def show(training) -> None:
    ...     print(training.steps)
    >>> sorted(p for p in __import__("inspect").signature(show).parameters)[:3]
    ['async_save', 'batch_size', 'checkpoint_name']
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Optional

import typer
from pydantic import BaseModel, ValidationError

from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
from prefect_tensorflow.tasks.config_checks import one_line
from prefect_tensorflow.tasks.configs import TrainingConfig

from .cli_errors import fail

# Options whose "None" is spelled 0 on the command line (typer has no way to type None).
ZERO_MEANS_NONE = {"keep_checkpoint_max": "0 keeps every checkpoint"}
SKIPPED = {"policy"}


def base_type(annotation: Any) -> Any:
    """`int` for `Optional[Annotated[int, ...]]`, and so on."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        else:
            return annotation


def config_options(
    model: type[BaseModel], *, prefix: str = "", flags: Optional[Mapping[str, str]] = None
) -> list[inspect.Parameter]:
    """One option per field of `model`, named `--<prefix><field>` (or only the fields `flags` names, as named there).

    Each defaults to None ("the config's default"); the help is the field's description and its default.
    The command's parameter for a field is `<prefix><field>` with '-' as '_'. A nested config gives
    one option per its own field (`GateConfig.serving.max_load_seconds`: `--gate-serving-max-load-seconds`);
    a dict field takes JSON text or `key=value,key=value`; an optional number whose default is not None
    takes text, '' for none.
    """
    params = []
    for name, field in model.model_fields.items():
        if name in SKIPPED or (flags is not None and name not in flags):
            continue
        base = base_type(field.annotation)
        if flags is None and _is_config(base):
            params += config_options(base, prefix=f"{prefix}{name}_")
            continue
        default = field.get_default(call_default_factory=True)
        kind = base if base in (int, float, str, bool) else str  # dicts (hparams) as JSON text
        if kind in (int, float) and default is not None and _allows_none(field.annotation):
            kind = str  # typer has no way to spell None for a number: '' does
        shown = json.dumps(default) if isinstance(default, dict) else default
        help_text = f"{field.description or name}" + (f" (default: {shown})" if default is not None else "")
        if name in ZERO_MEANS_NONE:
            help_text += f"; {ZERO_MEANS_NONE[name]}"
        elif kind is str and default is not None and _allows_none(field.annotation):
            help_text += "; '' for none"
        if _is_mapping(base):
            help_text += "; JSON object or key=value,key=value"
        flag = flags[name] if flags is not None else "--" + (prefix + name).replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        option = typer.Option(None, *decls, help=help_text, show_default=False)
        identifier = (prefix + name).replace("-", "_")
        params.append(inspect.Parameter(identifier, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind]))
    return params


def config_from_options(
    model: type[BaseModel], values: Mapping[str, Any], *, prefix: str = "", flags: Optional[Mapping[str, str]] = None
) -> Any:
    """`model` built from the values of its `config_options` (None: not given; '' for an optional text: None).

    Raises:
        ValueError: one line; an error about an option named after its field says the field
            (`tracking_uri: ...`), one about an option of another name says the option (`--gate-mode: ...`).
    """
    try:
        given = _given(model, values, prefix, flags)
        return model(**given)
    except ValidationError as err:
        location = err.errors()[0]["loc"]
        field_name = str(location[0]) if location else ""
        field = model.model_fields.get(field_name)
        if flags is None and field is not None and _is_config(base_type(field.annotation)) and len(location) > 1:
            field_name = f"{field_name}_{location[1]}"  # a nested config's option: --gate-serving-max-load-seconds
        flag = (flags or {}).get(field_name) or "--" + (prefix + field_name).replace("_", "-")
        if not field_name or flag == "--" + field_name.replace("_", "-"):
            raise ValueError(one_line(err)) from err
        raise ValueError(f"{flag}: {one_line(err).split(': ', 1)[-1]}") from err


def _given(model: type[BaseModel], values: Mapping[str, Any], prefix: str, flags: Optional[Mapping[str, str]]) -> dict[str, Any]:
    """The fields given on the command line, as the config takes them."""
    given: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        base = base_type(field.annotation)
        if flags is None and _is_config(base):
            nested = _given(base, values, f"{prefix}{name}_", None)
            if nested:
                given[name] = nested
            continue
        value = values.get((prefix + name).replace("-", "_"))
        if value is None:
            continue
        flag = (flags or {}).get(name) or "--" + (prefix + name).replace("_", "-")
        if value == "" and _allows_none(field.annotation):
            given[name] = None
        elif isinstance(value, str) and _is_mapping(base):
            given[name] = _mapping(value, flag)
        elif isinstance(value, str) and base in (int, float):
            given[name] = _number(value, base, flag)
        else:
            given[name] = value
    return given


def _is_config(annotation: Any) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, BaseModel)


def _is_mapping(annotation: Any) -> bool:
    return annotation is dict or typing.get_origin(annotation) is dict


def _mapping(text: str, flag: str) -> dict[str, Any]:
    """A JSON object, or `key=value,key=value` (each value read as JSON when it parses, else as text)."""
    if text.lstrip().startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError as err:
            raise ValueError(f"{flag}: expected a JSON object or key=value,key=value: {err}") from err
        if not isinstance(parsed, dict):
            raise ValueError(f"{flag}: expected a JSON object or key=value,key=value, received {text!r}")
        return parsed
    result: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag}: expected a JSON object or key=value,key=value, received {item!r}")
        try:
            result[key.strip()] = json.loads(raw)
        except ValueError:
            result[key.strip()] = raw.strip()
    return result


def _number(text: str, kind: type, flag: str) -> Any:
    try:
        return kind(text)
    except ValueError as err:
        raise ValueError(
            f"{flag}: expected {'an integer' if kind is int else 'a number'} or '' for none, received {text!r}"
        ) from err


def _allows_none(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def training_options() -> list[inspect.Parameter]:
    """The options of `TrainingConfig` and its `CheckpointPolicy` (`--steps`, `--save-checkpoints-steps`, ...)."""
    return config_options(TrainingConfig) + config_options(CheckpointPolicy)


def training_config(values: dict[str, Any]) -> TrainingConfig:
    """A `TrainingConfig` from the options given (None: not given).

    Raises:
        typer.BadParameter-free: a `ValueError` with one line naming the option.
    """
    given = {k: v for k, v in values.items() if v is not None}
    for model in (TrainingConfig, CheckpointPolicy):  # an optional number with a default comes as text ('' for none)
        for name, field in model.model_fields.items():
            if isinstance(given.get(name), str) and base_type(field.annotation) in (int, float):
                flag = "--" + name.replace("_", "-")
                empty = given[name] == "" and _allows_none(field.annotation)
                given[name] = None if empty else _number(given[name], base_type(field.annotation), flag)
    for name in ZERO_MEANS_NONE:
        if given.get(name) == 0:
            given[name] = None
    if isinstance(given.get("hparams"), str):
        try:
            given["hparams"] = json.loads(given["hparams"])
        except ValueError as err:
            raise ValueError(f"--hparams: expected a JSON object, e.g. '{{\"hidden_units\": [16, 8]}}': {err}") from err
    for name, field in TrainingConfig.model_fields.items():  # --data-options JSON, --window-start/--window-end ...
        base = base_type(field.annotation)
        if isinstance(given.get(name), str) and _is_mapping(base):
            given[name] = _mapping(given[name], "--" + name.replace("_", "-"))
        elif _is_config(base) and name != "policy":
            nested = {f: given.pop(f"{name}_{f}") for f in base.model_fields if f"{name}_{f}" in given}
            if nested:
                given[name] = nested
    policy = {k: given.pop(k) for k in list(given) if k in CheckpointPolicy.model_fields}
    try:
        return TrainingConfig(**given, policy=CheckpointPolicy(**policy))
    except ValidationError as err:
        raise ValueError(one_line(err)) from err


def with_training_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a Typer command the training options; it receives `training=TrainingConfig(...)`."""
    option_params = training_options()
    names = {p.name for p in option_params}
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "training"]

    def wrapper(**kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in list(kwargs) if name in names}
        try:
            training = training_config(values)
        except ValueError as err:
            fail(err)
        return command(training=training, **kwargs)

    wrapper.__name__, wrapper.__doc__, wrapper.__module__ = command.__name__, command.__doc__, command.__module__
    wrapper.__signature__ = signature.replace(parameters=own + option_params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in own + option_params}
    return wrapper
