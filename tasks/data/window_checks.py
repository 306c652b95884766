"""A window checked before training: its statistics against the schema contract, its drift against baselines.

`check_window(source, model_dir, baselines)`:

1. reads the schema `<model_dir>/data-schema.json` (`schema.read_schema`); on the
   first window there is none: it is inferred from the window's train split and
   written (`schema.write_schema`), for people to edit from then on;
2. computes the train and eval splits' statistics on the schema's histogram
   edges (`statistics.statistics_of`), so every window is binned alike;
3. finds the anomalies (`validation.find_anomalies`; the eval split is not held
   to `min_rows`, which counts a training window's rows): any anomaly raises
   `DataValidationError` with one line per anomaly, before anything is trained;
4. measures drift against each baseline given (the previous trained window's
   train statistics, the champion's), which is recorded and never blocks.

`WindowCheck` carries what the run records: `data.drift.<against>.max` tags,
`data/statistics.json`, `data/drift.json`, `data/data-schema.json`.

Example:
    >>> from prefect_tensorflow.tasks.data.window_checks import drift_tags
    >>> from prefect_tensorflow.tasks.data.drift import DriftReport, FeatureDrift
    >>> report = DriftReport(against="previous", features=[FeatureDrift(feature="site", measure="l_infinity",
    ...                      value=0.25, threshold=0.1, exceeded=True)])
    >>> drift_tags([report])
    {'data.drift.previous.max': '0.25', 'data.drift.previous.exceeded': 'site'}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from ..errors import DataValidationError
from .drift import DriftReport, measure_drift
from .schema import DataSchema, infer_schema, read_schema, write_schema
from .source import DataSource
from .statistics import WindowStatistics, statistics_of
from .validation import Anomaly, block_message, find_anomalies

SPLITS = ("train", "eval")


class WindowCheck(BaseModel):
    """What checking a window found: its statistics per split, the schema it kept to, its drift per baseline."""

    model_config = ConfigDict(frozen=True)

    statistics: dict[str, WindowStatistics]
    data_schema: DataSchema
    schema_inferred: bool = False
    drift: list[DriftReport] = []

    def tags(self) -> dict[str, str]:
        """`data.drift.<against>.max` (and `.exceeded`) per baseline."""
        return drift_tags(self.drift)

    def documents(self) -> dict[str, Any]:
        """The run's `data/` JSON artifacts: `statistics.json`, `drift.json`, `data-schema.json`."""
        return {
            "statistics.json": {split: stats.model_dump(mode="json") for split, stats in self.statistics.items()},
            "drift.json": {report.against: report.model_dump(mode="json") for report in self.drift},
            "data-schema.json": self.data_schema.model_dump(mode="json"),
        }


def drift_tags(reports: Sequence[DriftReport]) -> dict[str, str]:
    """The drift figures as tags: the largest per baseline, and the columns above their threshold."""
    tags = {}
    for report in reports:
        tags[f"data.drift.{report.against}.max"] = f"{report.max:.6g}"
        if report.exceeded:
            tags[f"data.drift.{report.against}.exceeded"] = ",".join(report.exceeded)
    return tags


def split_anomalies(split: str, stats: WindowStatistics, schema: DataSchema) -> list[Anomaly]:
    """The anomalies of one split; the eval split is not held to `min_rows` (a training window's count).

    Example:
        >>> import numpy as np
        >>> from prefect_tensorflow.tasks.data.source import Columns
        >>> from prefect_tensorflow.tasks.data.statistics import compute_statistics
        >>> first = compute_statistics(Columns({"x": np.arange(8.0), "y": np.zeros(8, int)}, "y"))
        >>> few = compute_statistics(Columns({"x": np.array([1.0]), "y": np.array([0])}, "y"))
        >>> [a.kind for a in split_anomalies("train", few, infer_schema(first))], split_anomalies("eval", few, infer_schema(first))
        (['too_few_rows'], [])
    """
    found = find_anomalies(stats, schema)
    return found if split == "train" else [a for a in found if a.kind != "too_few_rows"]


def widened(schema: DataSchema, stats: WindowStatistics) -> DataSchema:
    """`schema` (inferred from a first window's train split) widened to hold its eval split too: ranges,
    vocabularies and label values, so that the window the schema comes from keeps to it.

    Example:
        >>> import numpy as np
        >>> from prefect_tensorflow.tasks.data.source import Columns
        >>> from prefect_tensorflow.tasks.data.statistics import compute_statistics
        >>> train = compute_statistics(Columns({"x": np.array([1.0, 2.0]), "y": np.array([0, 1])}, "y"))
        >>> wide = widened(infer_schema(train), compute_statistics(Columns({"x": np.array([3.0]), "y": np.array([2])}, "y")))
        >>> wide.feature("x").max, wide.label_values
        (3.0, ['0', '1', '2'])
    """
    from .statistics import natural_key

    features = []
    for entry in schema.features:
        stat = stats.features.get(entry.name)
        update: dict[str, Any] = {}
        if stat is not None and entry.min is not None and stat.min is not None:
            update["min"] = min(entry.min, stat.min)
        if stat is not None and entry.max is not None and stat.max is not None:
            update["max"] = max(entry.max, stat.max)
        if stat is not None and entry.vocabulary is not None:
            update["vocabulary"] = sorted(set(entry.vocabulary) | set(stat.values), key=natural_key)
        features.append(entry.model_copy(update=update))
    label = stats.features.get(schema.label)
    values = set(schema.label_values) | (set(label.values) if label is not None else set())
    return schema.model_copy(update={"features": features, "label_values": sorted(values, key=natural_key)})


def check_window(
    source: DataSource, model_dir: str, baselines: Optional[Mapping[str, Optional[WindowStatistics]]] = None
) -> WindowCheck:
    """Check `source`'s window against the schema in `model_dir` (inferred and written on the first window).

    Args:
        source: the loader, its options and its (resolved) window.
        model_dir: where `data-schema.json` is (a checked model dir: local or an object store URI).
        baselines: train statistics to measure drift against, by name (`previous`, `champion`); None: skipped.

    Raises:
        DataValidationError: one line per anomaly (with `anomalies` attached); nothing may be trained.
        DataError: a malformed schema file (naming the file and the key).
    """
    schema = read_schema(model_dir)
    edges = schema.edges() if schema is not None else None
    statistics = {split: statistics_of(source, split, edges) for split in SPLITS}
    inferred = schema is None
    if schema is None:
        schema = widened(infer_schema(statistics["train"]), statistics["eval"])
    anomalies: list[Anomaly] = []
    for split in SPLITS:  # a column broken in both splits is named once (the train split's figures)
        seen = {(a.feature, a.kind) for a in anomalies}
        anomalies += [a for a in split_anomalies(split, statistics[split], schema) if (a.feature, a.kind) not in seen]
    if anomalies:
        label = f"data {source.data!r} {source.window.label if source.window is not None else ''}".rstrip()
        raise DataValidationError(block_message(label, anomalies), tuple(anomalies))
    if inferred:
        write_schema(model_dir, schema)
    drift = [
        measure_drift(statistics["train"], baseline, schema, against=name)
        for name, baseline in (baselines or {}).items()
        if baseline is not None
    ]
    return WindowCheck(statistics=statistics, data_schema=schema, schema_inferred=inferred, drift=drift)


def train_statistics(document: Any) -> Optional[WindowStatistics]:
    """The train statistics in a kept `statistics.json` document (`WindowCheck.documents`), or None if unreadable.

    Example:
        >>> train_statistics({"train": {"rows": 0, "features": {}, "label": "y"}}).rows, train_statistics({"x": 1})
        (0, None)
    """
    from pydantic import ValidationError

    if not isinstance(document, dict) or "train" not in document:
        return None
    try:
        return WindowStatistics.model_validate(document["train"])
    except ValidationError:
        return None
