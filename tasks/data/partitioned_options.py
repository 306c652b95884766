"""`PartitionedFiles`: the options (`data_options`) of the partitioned-files loader, checked before anything is read.

The spec is a config, not code: where the files are (`prefix`), their
`format`, the `features` stacked into the model's input vector (in the order
given), the `label` column (with `label_classes` for string labels), the
other `columns` read for validation only, the `eval` rule, and whether a
partition needs its `_SUCCESS` marker. The defaults describe the synthetic
`iris-daily` dataset (`data.synthetic`), so only `prefix` is needed for it.

A bad option is one `DataError` naming `data_options.<key>`.

Example:
    >>> from prefect_tensorflow.tasks.data.partitioned_options import partitioned_options
    >>> spec = partitioned_options({"prefix": "/data/iris-daily", "eval": {"last_days": 1}})
    >>> list(spec.features), spec.label, spec.eval.description
    (['sepal_length', 'sepal_width', 'petal_length', 'petal_width'], 'species', 'the last 1 day(s) of the window are eval')
    >>> partitioned_options({"colour": "red"})
    Traceback (most recent call last):
    ...
    prefect_tensorflow.tasks.errors.DataError: data_options.colour: not an option of the partitioned loader (accepted: prefix, name, format, features, label, label_classes, columns, eval, require_success), received 'red'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import date
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, model_validator

from ..config_checks import short_repr, text_matching
from ..errors import DataError
from .window import MAX_DAYS

Format = Literal["csv", "parquet", "tfrecord"]
FeatureType = Literal["float32", "int64"]
ColumnType = Literal["float32", "int64", "string"]
EXTENSIONS: dict[str, str] = {"csv": ".csv", "parquet": ".parquet", "tfrecord": ".tfrecord"}
DatasetName = Annotated[
    str,
    AfterValidator(text_matching(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", "a dataset name of letters, digits, '.', '_' or '-'", 64)),
]
ColumnName = Annotated[StrictStr, Field(min_length=1, max_length=256)]

IRIS_FEATURES: dict[str, FeatureType] = {
    "sepal_length": "float32",
    "sepal_width": "float32",
    "petal_length": "float32",
    "petal_width": "float32",
}
IRIS_CLASSES = ["setosa", "versicolor", "virginica"]
IRIS_COLUMNS: dict[str, ColumnType] = {"site": "string"}


class EvalRule(BaseModel):
    """Which rows are eval: row i of each file with `i % every == every - 1`, or the files of the `last_days` days.

    Example:
        >>> from datetime import date
        >>> EvalRule(last_days=2).file_splits(date(2026, 11, 29), last_day=date(2026, 11, 30))
        ('eval',)
        >>> EvalRule.model_validate({}).description
        'row i of each file is eval when i % 5 == 4'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    every: Optional[int] = Field(default=None, ge=2, le=1_000_000, strict=True)
    last_days: Optional[int] = Field(default=None, ge=1, le=MAX_DAYS, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _one_rule(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            if "every" in value and "last_days" in value:
                raise ValueError(f"expected one of 'every' or 'last_days', received both ({dict(value)})")
            if not value:
                return {"every": 5}
        return value

    @property
    def description(self) -> str:
        """The rule as people read it (the manifest's `split_rule`)."""
        if self.last_days is not None:
            return f"the last {self.last_days} day(s) of the window are eval"
        return f"row i of each file is eval when i % {self.every} == {self.every - 1}" if self.every else ""

    def file_splits(self, day: date, last_day: date) -> tuple[str, ...]:
        """The splits that read rows of a file of `day`, in a window whose last day is `last_day`."""
        if self.last_days is None:
            return ("train", "eval")
        return ("eval",) if (last_day - day).days < self.last_days else ("train",)


class PartitionedFiles(BaseModel):
    """The partitioned-files loader's options (`data_options`); see the module docstring.

    Example:
        >>> PartitionedFiles(prefix="s3://team/iris-daily", format="parquet").extension
        '.parquet'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    prefix: StrictStr = Field(
        default="",
        description="Local directory, s3:// or gs:// prefix holding dt=YYYY-MM-DD/ partitions; '' = <data home>/datasets/<name>",
    )
    name: DatasetName = Field(default="iris-daily", description="The dataset's name (events, the default prefix)")
    format: Format = Field(default="csv", description="The files' format: csv, parquet or tfrecord")
    features: dict[ColumnName, FeatureType] = Field(
        default_factory=lambda: dict(IRIS_FEATURES),
        min_length=1,
        description="Model inputs, stacked in this order into one float32 vector",
    )
    label: ColumnName = Field(default="species", description="The label column")
    label_classes: Optional[list[StrictStr]] = Field(
        default_factory=lambda: list(IRIS_CLASSES), description="String labels' classes (label = index); None: integer labels"
    )
    columns: dict[ColumnName, ColumnType] = Field(
        default_factory=lambda: dict(IRIS_COLUMNS), description="Other columns, read for validation only"
    )
    eval: EvalRule = Field(default_factory=lambda: EvalRule(every=5), description="{'every': N} (default 5) or {'last_days': N}")
    require_success: StrictBool = Field(default=True, description="A partition counts only once its _SUCCESS marker is there")

    @model_validator(mode="after")
    def _consistent(self) -> PartitionedFiles:
        if self.label in self.features:
            raise ValueError(f"label: {self.label!r} is also a feature; expected a column of its own")
        if self.label_classes is not None and (not self.label_classes or len(set(self.label_classes)) != len(self.label_classes)):
            raise ValueError(f"label_classes: expected distinct class names, received {self.label_classes}")
        return self

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]

    def location(self) -> str:
        """The prefix as a URI or absolute path ('' -> `<data home>/datasets/<name>`), confined in deployment runs.

        Raises:
            UnsafeParameterError: naming `data_options.prefix`, outside the roots in a deployment run.
        """
        from ..security import confine
        from ..settings import get_settings

        return confine(self.prefix or os.path.join(get_settings().home, "datasets", self.name), parameter="data_options.prefix")


def partitioned_options(options: Mapping[str, Any]) -> PartitionedFiles:
    """`options` (the loader's keyword arguments) as `PartitionedFiles`.

    Example:
        >>> partitioned_options({"format": "tfrecord"}).format
        'tfrecord'

    Raises:
        DataError: naming `data_options.<key>`, what was expected and what was received.
    """
    try:
        return PartitionedFiles.model_validate(dict(options))
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            accepted = ", ".join(PartitionedFiles.model_fields)
            message = f"not an option of the partitioned loader (accepted: {accepted})"
        else:
            message = first["msg"].removeprefix("Value error, ")
        field, _, rest = message.partition(": ")
        if not key and field in PartitionedFiles.model_fields:  # a check across fields names its field first
            raise DataError(f"data_options.{field}: {rest}") from None
        where = f"data_options.{key}" if key else "data_options"
        raise DataError(f"{where}: {message}, received {short_repr(first.get('input'))}") from None
