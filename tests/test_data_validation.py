"""Validation before training: statistics, the schema file, each anomaly kind, and TFDV's drift formulas."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest
from helpers import cli_command

from prefect_tensorflow.tasks.data.drift import jensen_shannon, l_infinity, measure_drift
from prefect_tensorflow.tasks.data.schema import SCHEMA_FILE, infer_schema, read_schema, write_schema
from prefect_tensorflow.tasks.data.source import Columns, DataSource
from prefect_tensorflow.tasks.data.statistics import compute_statistics, histogram, statistics_of
from prefect_tensorflow.tasks.data.training_errors import refused_data_error
from prefect_tensorflow.tasks.data.validation import block_message, find_anomalies
from prefect_tensorflow.tasks.errors import DataError


def window(rows: int = 40, **changes) -> Columns:
    """An iris-like window: two numeric features, a site, a string label; `changes` replace columns."""
    rng = np.random.default_rng(rows)
    values = {
        "petal_length": rng.uniform(1.0, 6.9, rows).astype(np.float32),
        "sepal_width": rng.uniform(2.0, 4.4, rows).astype(np.float32),
        "site": np.array(["north", "south"] * (rows // 2), dtype=object),
        "species": np.array(["setosa", "versicolor", "virginica", "setosa"] * (rows // 4)),
    }
    values["petal_length"][:2] = [1.0, 6.9]  # the range people read in the schema
    values.update(changes)
    return Columns({k: v for k, v in values.items() if v is not None}, label="species")


@pytest.fixture(scope="module")
def schema():
    return infer_schema(compute_statistics(window()))


def anomalies_of(columns: Columns, schema) -> list[tuple[str, str, str]]:
    return [(a.feature, a.kind, str(a)) for a in find_anomalies(compute_statistics(columns, schema.edges()), schema)]


# --- inference and the file ----------------------------------------------------------------------


def test_inferred_schema_holds_the_first_window(schema):
    petal = schema.feature("petal_length")
    assert (petal.kind, petal.dtype, petal.min, petal.max) == ("numeric", "float32", 1.0, 6.9)
    assert petal.edges is not None and len(petal.edges) == 11 and petal.edges[0] == 1.0 and petal.edges[-1] == 6.9
    assert schema.feature("site").vocabulary == ["north", "south"]
    assert schema.label == "species" and schema.label_values == ["setosa", "versicolor", "virginica"]
    assert schema.min_rows == 20 and all(f.drift_threshold == 0.1 and f.max_missing_fraction == 0.0 for f in schema.features)
    # the window it was inferred from passes its own schema
    assert anomalies_of(window(), schema) == []


def test_missing_cap_is_twice_the_observed_rate_at_most_one():
    width = np.array([3.0, np.nan, 3.1, 3.2], dtype=np.float32)
    site = np.array([None, None, None, "north"], dtype=object)
    stats = compute_statistics(Columns({"w": width, "site": site, "y": np.array([0, 1, 0, 1])}, label="y"))
    schema = infer_schema(stats)
    assert schema.feature("w").max_missing_fraction == 0.5
    assert schema.feature("site").max_missing_fraction == 1.0
    assert schema.label_values == ["0", "1"] and schema.min_rows == 2


def test_schema_file_round_trip_is_sorted_pretty_json(tmp_path, schema):
    uri = write_schema(str(tmp_path), schema)
    text = (tmp_path / SCHEMA_FILE).read_text()
    assert uri == str(tmp_path / SCHEMA_FILE)
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert read_schema(str(tmp_path)) == schema
    assert read_schema(str(tmp_path / "elsewhere")) is None


def test_a_hand_edit_is_kept(tmp_path, schema):
    write_schema(str(tmp_path), schema)
    raw = json.loads((tmp_path / SCHEMA_FILE).read_text())
    next(f for f in raw["features"] if f["name"] == "petal_length")["max"] = 50.0
    (tmp_path / SCHEMA_FILE).write_text(json.dumps(raw))
    edited = read_schema(str(tmp_path))
    assert edited is not None
    assert anomalies_of(window(petal_length=np.full(40, 37.5, np.float32)), edited) == []


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw.update(colour="red"), "key 'colour': unknown key (expected features, label, label_values"),
        (lambda raw: raw["features"][0].update(maximum=3), "key 'features.0.maximum': unknown key (expected name, kind, dtype"),
        (lambda raw: raw["features"][0].update(min=9.0, max=1.0), "key 'features.0': expected min <= max, received min 9.0"),
        (lambda raw: raw["features"][0].update(edges=[2.0, 1.0]), "edges: expected at least 2 increasing numbers"),
        (
            lambda raw: raw["features"][0].update(kind="ordinal"),
            "key 'features.0.kind': Input should be 'numeric' or 'categorical'",
        ),
        (lambda raw: raw.update(label="colour"), "label: expected one of the features' names"),
        (lambda raw: raw.pop("label_values"), "key 'label_values': Field required"),
        (lambda raw: raw.update(version=2), "key 'version': Input should be 1"),
    ],
)
def test_a_malformed_schema_file_names_the_file_and_key(tmp_path, schema, edit, message):
    write_schema(str(tmp_path), schema)
    raw = json.loads((tmp_path / SCHEMA_FILE).read_text())
    edit(raw)
    (tmp_path / SCHEMA_FILE).write_text(json.dumps(raw))
    with pytest.raises(DataError) as caught:
        read_schema(str(tmp_path))
    assert str(caught.value).startswith(f"schema file {tmp_path / SCHEMA_FILE}: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_schema_file_that_is_not_json(tmp_path):
    (tmp_path / SCHEMA_FILE).write_text("{features: ")
    with pytest.raises(DataError, match=rf"^schema file {tmp_path / SCHEMA_FILE}: expected JSON"):
        read_schema(str(tmp_path))


# --- each anomaly kind ---------------------------------------------------------------------------


def test_a_dropped_column(schema):
    assert anomalies_of(window(sepal_width=None), schema) == [("sepal_width", "missing_column", "sepal_width: column missing")]


def test_a_new_category(schema):
    site = np.array(["north", "south", "east", "north"] * 10, dtype=object)
    assert anomalies_of(window(site=site), schema) == [
        ("site", "new_category", "site: new category 'east' (vocabulary: north, south)")
    ]


def test_values_out_of_range(schema):
    petal = window().values["petal_length"].copy()
    petal[5], petal[6] = 37.5, -1.0
    found = anomalies_of(window(petal_length=petal), schema)
    assert found == [
        ("petal_length", "out_of_range", "petal_length: -1 below min 1"),
        ("petal_length", "out_of_range", "petal_length: 37.5 above max 6.9"),
    ]
    petal[5], petal[6] = np.inf, 2.0
    assert anomalies_of(window(petal_length=petal), schema) == [
        ("petal_length", "out_of_range", "petal_length: inf above max 6.9")
    ]


def test_a_nan_burst(schema):
    width = window().values["sepal_width"].copy()
    width[:16] = np.nan
    assert anomalies_of(window(sepal_width=width), schema) == [
        ("sepal_width", "missing_rate", "sepal_width: 40% missing (max 0%)")
    ]


def test_text_where_numbers_were(schema):
    width = np.array(["3.1"] * 40)
    assert anomalies_of(window(sepal_width=width), schema) == [
        ("sepal_width", "dtype", "sepal_width: dtype string (expected float32)")
    ]


def test_an_unknown_label(schema):
    species = np.array(["setosa", "daisy"] * 20)
    assert anomalies_of(window(species=species), schema) == [
        ("species", "unknown_label", "species: unknown label 'daisy' (label values: setosa, versicolor, virginica)")
    ]


def test_too_few_rows(schema):
    assert anomalies_of(window(rows=8), schema) == [
        ("rows", "too_few_rows", "rows: 8 rows (expected at least 20: the schema's min_rows)")
    ]


def test_the_block_message_names_each_feature_and_value(schema):
    site = np.array(["east"] * 40, dtype=object)
    found = find_anomalies(compute_statistics(window(site=site, sepal_width=None), schema.edges()), schema)
    message = block_message("data 'partitioned' [2026-11-30, 2026-12-01)", found)
    assert message.splitlines() == [
        "data 'partitioned' [2026-11-30, 2026-12-01): 2 anomalies against the data schema; nothing was trained:",
        "  sepal_width: column missing",
        "  site: new category 'east' (vocabulary: north, south)",
    ]


# --- drift ---------------------------------------------------------------------------------------


def test_jensen_shannon_by_hand():
    assert jensen_shannon([5, 3, 2], [5, 3, 2]) == 0.0
    assert jensen_shannon([10, 20], [1, 2]) == 0.0  # normalized first
    assert jensen_shannon([4, 0, 0], [0, 0, 9]) == 1.0  # disjoint
    # P = (1/2, 1/2), Q = (1, 0), M = (3/4, 1/4): (1/2 log2(2/3) + 1/2 log2 2 + log2(4/3)) / 2
    expected = (0.5 * math.log2(2 / 3) + 0.5 * 1 + math.log2(4 / 3)) / 2
    assert jensen_shannon([1, 1], [2, 0]) == pytest.approx(expected, abs=1e-12)
    assert jensen_shannon([1, 1], [2, 0]) == jensen_shannon([2, 0], [1, 1])


def test_l_infinity_by_hand():
    assert l_infinity({"a": 5, "b": 5}, {"b": 1, "a": 1}) == 0.0
    assert l_infinity({"a": 1}, {"b": 3}) == 1.0
    # 0.5 - 0.2 = 0.3 (a), 0.5 - 0.3 = 0.2 (b), 0 - 0.5 = 0.5 (c: a new value)
    assert l_infinity({"a": 2, "b": 2}, {"a": 2, "b": 3, "c": 5}) == pytest.approx(0.5)


def test_histograms_have_an_underflow_and_an_overflow_bin():
    assert histogram([-5.0, 0.0, 0.99, 1.0, 1.5, 2.0, 9.0], [0.0, 1.0, 2.0]) == [1, 2, 3, 1]


def test_drift_of_a_shifted_window(schema):
    baseline = compute_statistics(window(), schema.edges())
    same = measure_drift(baseline, baseline, schema, against="previous")
    assert same.max == 0.0 and same.exceeded == [] and len(same.features) == 4

    shifted = window(petal_length=window().values["petal_length"] + np.float32(0.5), site=np.array(["north"] * 40, dtype=object))
    report = measure_drift(compute_statistics(shifted, schema.edges()), baseline, schema, against="champion")
    by_name = {f.feature: f for f in report.features}
    assert report.against == "champion"
    assert by_name["site"].measure == "l_infinity" and by_name["site"].value == pytest.approx(0.5)
    assert by_name["species"].measure == "l_infinity" and by_name["species"].value == 0.0
    assert by_name["sepal_width"].value == 0.0
    assert by_name["petal_length"].measure == "jensen_shannon" and 0.0 < by_name["petal_length"].value <= 1.0
    assert by_name["petal_length"].value == pytest.approx(
        jensen_shannon(
            compute_statistics(shifted, schema.edges()).features["petal_length"].histogram,
            baseline.features["petal_length"].histogram,
        )
    )
    assert "site" in report.exceeded and "species" not in report.exceeded
    assert report.max == max(f.value for f in report.features)


def test_drift_skips_what_it_cannot_compare(schema):
    baseline = compute_statistics(window(), schema.edges())
    current = compute_statistics(window(sepal_width=None), {"petal_length": [0.0, 10.0]})  # other edges, a dropped column
    report = measure_drift(current, baseline, schema, against="previous")
    assert report.skipped == {
        "sepal_width": "not in the current window",
        "petal_length": "histograms on different bin edges (compute both on the schema's edges)",
    }
    assert {f.feature for f in report.features} == {"site", "species"}


# --- statistics of a loader ----------------------------------------------------------------------


def test_statistics_of_iris_through_its_tf_data_split():
    stats = statistics_of(DataSource(data="iris"), "train")
    assert stats.rows == 120 and stats.label == "label"
    assert list(stats.features) == ["sepal_length", "sepal_width", "petal_length", "petal_width", "label"]
    assert stats.features["label"].kind == "categorical" and stats.features["label"].values == {"0": 40, "1": 40, "2": 40}
    petal = stats.features["petal_length"]
    assert (petal.kind, petal.dtype, petal.count, petal.missing, petal.min, petal.max) == ("numeric", "float32", 120, 0, 1.0, 6.9)
    schema = infer_schema(stats)
    assert schema.label_values == ["0", "1", "2"]
    found = find_anomalies(statistics_of(DataSource(data="iris"), "eval", schema.edges()), schema)
    assert [str(a) for a in found] == [
        "rows: 30 rows (expected at least 60: the schema's min_rows)"
    ]  # the eval split is a quarter of train


# --- bad data inside TensorFlow during training --------------------------------------------------


def test_tensorflows_label_message_is_parsed_and_other_reasons_quoted():
    message = 'Graph execution error:\n\nDetected at node x defined at (most recent call last):\n  File "a.py", line 1\n\n'
    tf_label = (
        message
        + "Received a label value of 7 which is outside the valid range of [0, 3).  Label values: 0 7 1\n\t [[{{node x}}]]"
    )
    assert str(refused_data_error(tf_label, "mine:load")) == (
        "data 'mine:load': label 7 is outside the model's 3 classes (expected 0 to 2); TensorFlow refused it during training"
    )
    other = message + "Matrix size-incompatible: In[0]: [16,5], In[1]: [4,10]\n\t [[{{node x}}]] [Op:__inference_train_step_9]"
    assert str(refused_data_error(other, "mine:load")) == (
        "data 'mine:load': TensorFlow refused a training batch: Matrix size-incompatible: In[0]: [16,5], In[1]: [4,10]"
    )


def test_a_label_tensorflow_does_not_name_is_found_in_the_splits():
    from bad_data_loaders import label_seven

    gradient_op = "segment_ids[31] = 100 is out of range [0, 96)\n\t [[{{node UnsortedSegmentSum}}]]"
    splits = {"train": DataSource(data="iris").load("train"), "eval": label_seven("eval")}
    error = refused_data_error(gradient_op, "bad_data_loaders:label_seven", splits, classes=3)
    assert "label 7 (split 'eval') is outside the model's 3 classes" in str(error)


@pytest.mark.slow
def test_retrain_on_a_label_outside_the_classes_is_one_line_and_exit_2(tmp_path, cli_env):
    """Before: exit 1 and two tracebacks (the task's and the flow's), TensorFlow's graph traceback in each."""
    cmd = cli_command(
        "retrain",
        "--data",
        "bad_data_loaders:label_seven",
        "--model-dir",
        str(tmp_path / "m"),
        "--steps",
        "20",
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:  # files: the ephemeral server outlives a pipe
        code = subprocess.run(cmd, env=cli_env, stdout=out, stderr=err, timeout=600).returncode
    stderr = (tmp_path / "err").read_text()
    assert code == 2, stderr[-3000:]
    expected = (
        "error: data 'bad_data_loaders:label_seven': label 7 (split 'train') is outside the model's 3 classes (expected 0 to 2);"
        " TensorFlow refused it during training"
    )
    assert expected in stderr.splitlines(), stderr[-3000:]
    assert "Traceback" not in stderr and "InvalidArgumentError" not in stderr, stderr[-3000:]


def test_statistics_of_a_loader_with_raw_columns_reads_them_not_its_tf_data_split():
    stats = statistics_of(DataSource(data="bad_data_loaders:with_columns"), "eval")
    assert stats.rows == 30 and stats.label == "species" and list(stats.features) == ["petal_length", "site", "species"]
    assert stats.features["site"].values == {"north": 15, "south": 15}
    assert stats.features["species"].values == {"setosa": 10, "versicolor": 10, "virginica": 10}


@pytest.mark.slow
def test_two_workers_on_a_label_outside_the_classes_fail_at_once_naming_it(tmp_path, monkeypatch, caplog):
    """A worker's bad batch is fatal (the same on every attempt): no restart, one line naming the loader and label."""
    import logging
    from pathlib import Path

    from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    from prefect_tensorflow.tasks.configs import TrainingConfig
    from prefect_tensorflow.tasks.training.multi_worker import MultiWorkerError, train_multi_worker

    caplog.set_level(logging.INFO, logger="prefect_tensorflow")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the workers import the test loader
    config = TrainingConfig(
        steps=20,
        workers=2,
        data="bad_data_loaders:label_seven",
        policy=CheckpointPolicy(save_checkpoints_steps=100),
        evaluation="none",
    )
    with pytest.raises(MultiWorkerError, match=r"DataError: data 'bad_data_loaders:label_seven': label 7 \(split 'train'\)"):
        train_multi_worker(str(tmp_path / "iris"), config)
    assert "multi-worker attempt 1:" not in caplog.text  # not restarted
