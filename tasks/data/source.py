"""`DataSource`: a dataset loader, its options and its window: the one way every stage reads data.

Training, the sidecar evaluator, export verification and the champion gate
all read examples through a `DataSource`, so they read the same window with
the same options. A loader is `load(split)` (as the bundled iris one), or
`load(split, window=None, **options)` for data that changes; a loader may
carry a `manifest(window=None, **options) -> DataManifest` attribute that
lists what a window is made of without reading it (lineage, "no new data"),
and a `columns(split, window=None, **options) -> Columns` attribute that
gives the raw columns of a split (every column the files hold, the label
among them) for validation before training; a loader without one is read
through its `tf.data.Dataset` (`data.statistics`).

Example:
    >>> from prefect_tensorflow.tasks.data.source import DataSource
    >>> source = DataSource(data="iris")
    >>> source.takes_window(), source.manifest().files[0].rows
    (False, 150)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from .. import model_code
from ..errors import DataError, TrainingError, UnsafeParameterError
from .manifest import DataManifest
from .window import DataWindow

T = TypeVar("T")


@dataclass(frozen=True)
class Columns:
    """The raw columns of one split as the files hold them (numpy arrays, one entry per row), and
    which of them is the label. A column the schema expects may be missing: that is for validation to say."""

    values: dict[str, Any]
    label: str


class DataSource(BaseModel):
    """A dataset loader (registered name or import string), its keyword options and its window."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: str = Field(description="Registered dataset loader name, or 'module:attr'")
    options: dict[str, JsonValue] = Field(default_factory=dict, description="Keyword arguments of the loader")
    window: Optional[DataWindow] = Field(default=None, description="The window it reads (a resolved one)")

    def takes_window(self) -> bool:
        """Whether the loader reads a window (`load(split, window=...)`)."""
        return model_code.takes_window(self.data)

    def load(self, split: str) -> Any:
        """The `split` as the loader gives it: a `tf.data.Dataset` of unbatched `(features, label)`."""
        return model_code.load_split(self.data, split, window=self.window, options=dict(self.options))

    def manifest(self) -> Optional[DataManifest]:
        """The loader's manifest of this window (None: the loader lists nothing).

        Raises:
            TrainingError: naming `data`, when the loader's `manifest` raised or returned something else.
        """
        return self._call_attribute("manifest", DataManifest)

    def columns(self, split: str) -> Optional[Columns]:
        """The loader's raw columns of `split` (None: the loader has no `columns` attribute).

        Raises:
            TrainingError: naming `data`, when the loader's `columns` raised or returned something else.
        """
        return self._call_attribute("columns", Columns, split)

    def _call_attribute(self, name: str, expected: type[T], *args: str) -> Optional[T]:
        """Call the loader's attribute `name` with `args`, its options and window; check it gave an `expected`."""
        attribute = getattr(model_code.load(self.data, "data"), name, None)
        if attribute is None:
            return None
        keywords = model_code.loader_keywords(self.data, self.window, dict(self.options))
        called = f"{name}({', '.join(repr(a) for a in args)})"
        try:
            value = attribute(*args, **keywords)
        except (DataError, UnsafeParameterError):
            raise  # they name the option, partition or file at fault already
        except Exception as err:
            raise TrainingError(f"data {self.data!r}: the loader's {called} raised {type(err).__name__}: {err}") from err
        if not isinstance(value, expected):
            raise TrainingError(
                f"data {self.data!r}: expected the loader's {called} to give a {expected.__name__}, received {type(value).__name__}"
            )
        return value
