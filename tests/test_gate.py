"""The champion gate's rule and the one metric order, without TensorFlow or MLflow.

`registry.gate.decide_gate` over two metric records and a `GateConfig`;
`metric_order` (`better`, `default_mode`, `best_first`) as selection, the
sweep and the gate use it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from prefect_tensorflow.tasks.checkpoints.selection import CheckpointSelection
from prefect_tensorflow.tasks.configs import GateConfig
from prefect_tensorflow.tasks.metric_order import best_first, better, default_mode
from prefect_tensorflow.tasks.registry.gate import GateDecision, MetricRecord, decide_gate
from prefect_tensorflow.tasks.training.sweep_candidates import rank_candidates


def test_the_gate_and_the_metric_order_import_neither_tensorflow_nor_mlflow():
    code = (
        "import sys\n"
        "import prefect_tensorflow.tasks.registry.gate, prefect_tensorflow.tasks.metric_order\n"
        "print(sorted(m for m in ('tensorflow', 'mlflow') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- the mode's default follows the metric, the same way everywhere ----------------------------------


@pytest.mark.parametrize(
    ("metric", "mode"),
    [("loss", "min"), ("eval/loss", "min"), ("error", "min"), ("top1_error_rate", "min"), ("accuracy", "max"), ("auc", "max")],
)
def test_a_metric_named_like_a_loss_or_an_error_is_minimised_everywhere(metric, mode):
    assert default_mode(metric) == mode
    assert GateConfig(metric=metric).mode == mode
    assert CheckpointSelection.parse(f"best:{metric}").mode == mode


def test_gate_config_for_loss_defaults_to_min_and_an_explicit_mode_wins():
    assert GateConfig(metric="loss").mode == "min"
    assert GateConfig(metric="loss", mode="max").mode == "max"
    assert GateConfig(metric="accuracy", mode="min").mode == "min"
    assert GateConfig(metric="loss", mode=None).mode == "min"  # the CLI's and the UI's "not given"
    assert GateConfig().mode == "max" and GateConfig().metric == "accuracy"  # the default gate is unchanged
    assert GateConfig(metric=None).mode == "max"
    assert GateConfig.model_validate({"metric": "loss"}).mode == "min"  # a flow parameter as the UI sends it


def test_gate_config_refuses_a_bad_mode_naming_it():
    with pytest.raises(ValidationError, match=r"mode\n.*expected 'min' or 'max', received 'up'"):
        GateConfig(metric="loss", mode="up")


def test_better_is_strict_and_refuses_an_unknown_mode():
    assert better(0.97, 0.9, "max") and not better(0.9, 0.97, "max")
    assert better(0.1, 0.3, "min") and not better(0.3, 0.1, "min")
    assert not better(0.5, 0.5, "max") and not better(0.5, 0.5, "min")  # a tie is not better
    with pytest.raises(ValueError, match="mode: expected 'min' or 'max', received 'up'"):
        better(1.0, 0.0, "up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode: expected 'min' or 'max'"):
        best_first([], float, "sideways")  # type: ignore[arg-type]


def test_best_first_keeps_the_input_order_of_ties():
    assert best_first(["a", "b", "c", "d"], {"a": 2, "b": 1, "c": 2, "d": 3}.__getitem__, "max") == ["d", "a", "c", "b"]
    assert best_first(["a", "b", "c", "d"], {"a": 2, "b": 1, "c": 2, "d": 3}.__getitem__, "min") == ["b", "a", "c", "d"]


def test_the_sweep_ranks_with_the_same_order():
    assert rank_candidates({2: 0.5, 0: 0.9, 1: 0.9}, "max") == [0, 1, 2]  # ties: the lower index first
    assert rank_candidates({0: 0.3, 1: 0.1, 2: 0.1}, "min") == [1, 2, 0]


# --- each state of the decision ----------------------------------------------------------------------

LOSS = GateConfig(metric="loss")
ACCURACY = GateConfig(metric="accuracy")


def test_the_first_version_is_promoted():
    decision = decide_gate(MetricRecord(1, 0.9), None, ACCURACY)
    assert decision == GateDecision(
        metric="accuracy",
        mode="max",
        challenger_version=1,
        challenger_value=0.9,
        champion_version=None,
        champion_value=None,
        promoted=True,
        reason="first version: no champion yet",
    )


def test_the_champion_itself_stays_promoted():
    decision = decide_gate(MetricRecord(4, 0.9), MetricRecord(4, 0.9), ACCURACY)
    assert (decision.promoted, decision.reason, decision.champion_version) == (True, "already champion", 4)


def test_without_a_gate_metric_the_champion_stays():
    decision = decide_gate(MetricRecord(2, None), MetricRecord(1, 0.9), GateConfig(metric=None))
    assert (decision.promoted, decision.reason) == (False, "no gate metric: champion stays")
    assert decision.champion_value is None and decision.metric is None


def test_a_champion_without_the_metric_recorded_is_replaced():
    decision = decide_gate(MetricRecord(2, 0.4), MetricRecord(1, None), LOSS)
    assert (decision.promoted, decision.reason) == (True, "champion v1 has no recorded loss")


def test_a_lower_loss_beats_the_champion_and_a_higher_one_does_not():
    lower = decide_gate(MetricRecord(2, 0.2), MetricRecord(1, 0.3), LOSS)
    assert (lower.promoted, lower.mode) == (True, "min")
    assert lower.reason == "loss 0.2 beats champion v1's 0.3 (min)"
    higher = decide_gate(MetricRecord(2, 0.4), MetricRecord(1, 0.3), LOSS)
    assert not higher.promoted
    assert higher.reason == "loss 0.4 does not beat champion v1's 0.3 (min)"
    assert (higher.challenger_value, higher.champion_value, higher.champion_version) == (0.4, 0.3, 1)


def test_a_higher_accuracy_beats_the_champion():
    decision = decide_gate(MetricRecord(3, 0.97), MetricRecord(2, 0.9), ACCURACY)
    assert decision.promoted and decision.reason == "accuracy 0.97 beats champion v2's 0.9 (max)"


def test_a_tie_keeps_the_champion_in_either_mode():
    for config in (LOSS, ACCURACY, GateConfig(metric="loss", mode="max")):
        decision = decide_gate(MetricRecord(2, 0.5), MetricRecord(1, 0.5), config)
        assert not decision.promoted, config
        assert "does not beat" in decision.reason


def test_an_explicit_mode_reverses_the_rule():
    decision = decide_gate(MetricRecord(2, 0.4), MetricRecord(1, 0.3), GateConfig(metric="loss", mode="max"))
    assert decision.promoted and decision.reason == "loss 0.4 beats champion v1's 0.3 (max)"


def test_the_cli_gate_mode_left_out_follows_the_metric():
    from prefect_tensorflow.flows.cli_options import config_from_options

    def _gate(metric, mode):  # the flow commands' `--gate-metric`, `--gate-mode` (None: left out)
        return config_from_options(GateConfig, {"gate_metric": metric, "gate_mode": mode}, prefix="gate_")

    assert _gate("loss", None).mode == "min"  # `--gate-metric loss` without `--gate-mode`
    assert _gate("accuracy", None).mode == "max"
    assert _gate("loss", "max").mode == "max"
