"""The champion gate's rule, the paired statistics and the one metric order, without TensorFlow or MLflow.

`registry.gate.decide_gate` over two `Outcomes` (per-example values on one
eval set) and a `GateConfig`; `promotion.paired` (bootstrap interval,
McNemar) checked against brute force; `metric_order` as selection, the sweep
and the gate use it. Outcomes here are made by hand or simulated: scoring real
SavedModels is `test_outcomes.py`.
"""

from __future__ import annotations

import inspect
import itertools
import math
import subprocess
import sys
from typing import Any, Optional

import numpy as np
import pytest
from pydantic import ValidationError

from prefect_tensorflow.tasks.checkpoints.selection import CheckpointSelection
from prefect_tensorflow.tasks.config_checks import one_line
from prefect_tensorflow.tasks.configs import GateConfig
from prefect_tensorflow.tasks.errors import GateError
from prefect_tensorflow.tasks.metric_order import best_first, better, default_mode
from prefect_tensorflow.tasks.promotion import paired
from prefect_tensorflow.tasks.promotion.outcomes import Outcomes
from prefect_tensorflow.tasks.promotion.paired import mcnemar, paired_interval
from prefect_tensorflow.tasks.registry.gate import (
    GateDecision,
    comparability,
    decide_gate,
)
from prefect_tensorflow.tasks.training.sweep_candidates import rank_candidates

SIGNATURE = {
    "inputs": {"features": ["float32", [None, 4]]},
    "outputs": {
        "class_ids": ["int64", [None]],
        "logits": ["float32", [None, 3]],
        "probabilities": ["float32", [None, 3]],
    },
}


def outcomes(
    correct: Any,
    *,
    loss: Optional[Any] = None,
    labels: Optional[Any] = None,
    digest: str = "sha256:model",
    eval_digest: str = "sha256:eval",
    signature: Optional[dict] = None,
    finite: bool = True,
) -> Outcomes:
    """Classifier outcomes from per-example correctness (and loss: 1 - correct / 2 unless given)."""
    correct = [float(c) for c in correct]
    n = len(correct)
    labels = list(labels) if labels is not None else [float(i % 3) for i in range(n)]
    loss = list(loss) if loss is not None else [1.0 - c / 2 for c in correct]
    return Outcomes(
        saved_model_digest=digest,
        eval_digest=eval_digest,
        n=n,
        signature=signature or SIGNATURE,
        labels=labels,
        per_example={"accuracy": correct, "error": [1.0 - c for c in correct], "loss": loss},
        finite=finite,
        non_finite_outputs=[] if finite else ["logits", "probabilities"],
        slices={f"class={int(k)}": [i for i, label in enumerate(labels) if label == k] for k in sorted(set(labels))},
    )


def gate(challenger: Outcomes, champion: Optional[Outcomes], config: GateConfig = GateConfig(), v: int = 3, c: Optional[int] = 2):
    return decide_gate(challenger, champion, config, challenger_version=v, champion_version=c if champion is not None else None)


def test_the_gate_and_the_metric_order_import_neither_tensorflow_nor_mlflow():
    code = (
        "import sys\n"
        "import prefect_tensorflow.tasks.registry.gate, prefect_tensorflow.tasks.metric_order\n"
        "import prefect_tensorflow.tasks.promotion.paired, prefect_tensorflow.tasks.promotion.outcomes\n"
        "print(sorted(m for m in ('tensorflow', 'mlflow', 'prefect') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- the mode's default follows the metric, the same way everywhere ----------------------------------


@pytest.mark.parametrize(
    ("metric", "mode"),
    [("loss", "min"), ("eval/loss", "min"), ("error", "min"), ("top1_error_rate", "min"), ("accuracy", "max"), ("auc", "max"),
     ("mse", "min"), ("val_mae", "min"), ("rmse", "min")],
)  # fmt: skip
def test_a_metric_named_like_a_loss_or_an_error_is_minimised_everywhere(metric, mode):
    assert default_mode(metric) == mode
    assert CheckpointSelection.parse(f"best:{metric}").mode == mode


@pytest.mark.parametrize(
    ("metric", "mode"), [("loss", "min"), ("error", "min"), ("mse", "min"), ("mae", "min"), ("accuracy", "max")]
)
def test_every_gate_metric_takes_its_mode_from_its_name(metric, mode):
    assert GateConfig(metric=metric).mode == mode


def test_gate_config_for_loss_defaults_to_min_and_an_explicit_mode_wins():
    assert GateConfig(metric="loss").mode == "min"
    assert GateConfig(metric="loss", mode="max").mode == "max"
    assert GateConfig(metric="accuracy", mode="min").mode == "min"
    assert GateConfig(metric="loss", mode=None).mode == "min"  # the CLI's and the UI's "not given"
    assert GateConfig().mode == "max" and GateConfig().metric == "accuracy"
    assert GateConfig().min_improvement == 0.0 and GateConfig().confidence == 0.95
    assert GateConfig(metric=None).mode == "max"
    assert GateConfig.model_validate({"metric": "loss"}).mode == "min"  # a flow parameter as the UI sends it


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mode": "up"}, "mode: expected 'min' or 'max', received 'up'"),
        ({"metric": "f1"}, "metric: expected 'accuracy' or 'error' or 'loss' or 'mse' or 'mae', received 'f1'"),
        ({"confidence": 1.0}, "confidence: expected a number in (0.5, 1), received 1.0"),
        ({"confidence": 0.3}, "confidence: expected a number in (0.5, 1), received 0.3"),
        ({"min_improvement": -0.1}, "min_improvement: expected a finite number >= 0, received -0.1"),
        ({"max_regression": math.nan}, "max_regression: expected a finite number >= 0, received nan"),
        ({"guardrails": {"auc": 0.1}}, "guardrails.auc.[key]: expected 'accuracy' or 'error'"),
        ({"guardrails": {"loss": -1}}, "guardrails.loss: expected a finite number >= 0, received -1"),
        ({"floors": {"accuracy": math.inf}}, "floors.accuracy: expected a finite number, received inf"),
        # an int past float's range (JSON carries it): refused naming the field, not an OverflowError
        ({"min_improvement": 10**400}, "min_improvement: Input should be a valid number"),
        ({"floors": {"accuracy": 10**400}}, "floors.accuracy: Input should be a valid number"),
        ({"confidence": 10**400}, "confidence: expected a number in (0.5, 1)"),
        ({"bootstrap_samples": 10}, "bootstrap_samples: expected an integer >= 100 and <= 100000, received 10"),
        ({"approval_timeout_seconds": -1}, "approval_timeout_seconds: expected an integer >= 0"),
        ({"serving": {"max_load_seconds": 0}}, "serving.max_load_seconds: expected a number > 0, received 0"),
        ({"serving": {"max_p99": 1}}, "serving.max_p99: Extra inputs are not permitted"),
    ],
)
def test_gate_config_refuses_bad_values_naming_the_field(values, message):
    with pytest.raises(ValidationError) as info:
        GateConfig(**values)
    assert message in one_line(info.value)


def _cli(*args: str) -> tuple[int, Any, str]:
    """Parse `args` with the options the flow commands make for a `gate: GateConfig` parameter."""
    import typer
    from typer.testing import CliRunner

    from prefect_tensorflow.flows.cli_options import config_from_options, config_options

    options = config_options(GateConfig, prefix="gate_")
    built = []

    def command(**values: Any) -> None:
        try:
            built.append(config_from_options(GateConfig, values, prefix="gate_"))
        except ValueError as err:
            raise typer.BadParameter(str(err)) from err

    command.__signature__ = inspect.Signature(options)  # type: ignore[attr-defined]
    command.__annotations__ = {o.name: o.annotation for o in options}
    app = typer.Typer()
    app.command()(command)
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, built[0] if built else None, result.output


def test_the_cli_gate_options_build_the_gate_config():
    code, config, output = _cli("--gate-metric", "loss")
    assert code == 0, output
    assert config.mode == "min"  # `--gate-metric loss` without `--gate-mode`
    assert _cli("--gate-metric", "loss", "--gate-mode", "max")[1].mode == "max"
    code, config, output = _cli(
        "--gate-guardrails", "loss=0.05,error=0.02", "--gate-floors", '{"accuracy": 0.8}', "--gate-min-improvement", "",
        "--gate-max-regression", "0.01", "--gate-serving-max-load-seconds", "20", "--gate-confidence", "0.9",
    )  # fmt: skip
    assert code == 0, output
    assert config.guardrails == {"loss": 0.05, "error": 0.02} and config.floors == {"accuracy": 0.8}
    assert (config.min_improvement, config.max_regression, config.confidence) == (None, 0.01, 0.9)
    assert config.serving.max_load_seconds == 20.0
    for bad, message in (
        (["--gate-guardrails", "f1=0.1"], "--gate-guardrails: expected 'accuracy'"),
        (["--gate-floors", "accuracy"], "--gate-floors: expected a JSON object or key=value"),
        (["--gate-serving-max-load-seconds", "-1"], "--gate-serving-max-load-seconds: expected a number > 0"),
        (["--gate-confidence", "1.5"], "--gate-confidence: expected a number in (0.5, 1)"),
    ):
        code, _, output = _cli(*bad)
        assert code == 2 and message in " ".join(output.replace("│", " ").split()), output


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


# --- the paired statistics against brute force ---------------------------------------------------------


def _exact_bootstrap_quantiles(d: list[float], confidence: float) -> tuple[float, float]:
    """The percentiles of the mean over all n**n resamples (the distribution the bootstrap samples from)."""
    n = len(d)
    means = np.sort([sum(d[i] for i in pick) / n for pick in itertools.product(range(n), repeat=n)])
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


@pytest.mark.parametrize(
    "values", [([1, 1, 0, 1, 0, 1], [0, 1, 0, 0, 1, 0]), ([0.3, 0.1, 0.9, 0.4, 0.2], [0.5, 0.1, 0.2, 0.6, 0.1])]
)
def test_the_bootstrap_interval_matches_the_exact_resampling_distribution(values):
    a, b = values
    d = [x - y for x, y in zip(a, b)]
    low, high = _exact_bootstrap_quantiles(d, 0.9)
    interval = paired_interval(a, b, mode="max", confidence=0.9, samples=100_000, seed=1)
    assert interval.estimate == pytest.approx(np.mean(d))
    spacing = 1 / len(d) ** 2  # a fraction of the gap between neighbouring atoms of the resampled means
    assert abs(interval.low - low) <= spacing and abs(interval.high - high) <= spacing, (interval, low, high)
    # "min" is the same interval of the other difference
    flipped = paired_interval(b, a, mode="min", confidence=0.9, samples=100_000, seed=1)
    assert (flipped.low, flipped.high) == (interval.low, interval.high)


def test_the_interval_is_seeded_and_identical_differences_give_a_point():
    a, b = [1, 0, 1, 1, 0] * 6, [1, 1, 0, 1, 0] * 6
    first = paired_interval(a, b, mode="max", confidence=0.95, samples=500, seed=7)
    assert first == paired_interval(a, b, mode="max", confidence=0.95, samples=500, seed=7)
    same = paired_interval(a, a, mode="max", confidence=0.95, samples=500)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="expected two 1-D arrays of one length"):
        paired_interval([1, 0], [1], mode="max", confidence=0.95, samples=100)


def test_above_the_bootstrap_size_the_interval_is_the_normal_approximation(monkeypatch):
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.5, 1, 3000), rng.normal(0.45, 1, 3000)
    boot = paired_interval(a, b, mode="max", confidence=0.95, samples=4000)
    monkeypatch.setattr(paired, "NORMAL_ABOVE", 1000)
    normal = paired_interval(a, b, mode="max", confidence=0.95, samples=4000)
    d = a - b
    half = 1.959963984540054 * d.std(ddof=1) / math.sqrt(d.size)
    assert (normal.method, boot.method) == ("normal approximation", "paired bootstrap")
    assert normal.low == pytest.approx(d.mean() - half) and normal.high == pytest.approx(d.mean() + half)
    assert abs(normal.low - boot.low) < 0.01 and abs(normal.high - boot.high) < 0.01


def test_mcnemar_matches_the_binomial_and_the_chi_square():
    from scipy import stats

    a = [1] * 7 + [0] * 2 + [1] * 20
    b = [0] * 7 + [1] * 2 + [1] * 20  # 7 vs 2 discordant: exact
    assert mcnemar(a, b) == pytest.approx(stats.binomtest(2, 9, 0.5).pvalue)
    a = [1] * 30 + [0] * 12 + [0] * 10
    b = [0] * 30 + [1] * 12 + [0] * 10  # 42 discordant: chi-square with continuity
    assert mcnemar(a, b) == pytest.approx(stats.chi2.sf((abs(30 - 12) - 1) ** 2 / 42, 1))
    assert mcnemar([1, 0], [1, 0]) == 1.0
    with pytest.raises(ValueError, match="0/1 values"):
        mcnemar([0.5], [1])


# --- each state of the decision ----------------------------------------------------------------------

CHAMPION = outcomes([1] * 27 + [0] * 3)  # 0.900


def test_the_first_version_is_promoted_and_floors_apply_to_it():
    first = gate(outcomes([1] * 29 + [0]), None, v=1)
    assert (first.state, first.promoted, first.reason) == ("first_version", True, "first version: no champion yet")
    assert first.challenger_value == pytest.approx(29 / 30) and first.champion_version is None
    low = gate(outcomes([1] * 20 + [0] * 10), None, GateConfig(floors={"accuracy": 0.8, "loss": 0.9}), v=1)
    assert (low.state, low.promoted) == ("first_version", False)
    assert low.reason == "first version: no champion yet; floor accuracy >= 0.8: 0.667 fails"
    assert [c.passed for c in low.checks] == [False, True]


def test_the_champion_itself_is_already_champion():
    decision = gate(CHAMPION, CHAMPION, v=2, c=2)
    assert (decision.state, decision.promoted, decision.reason) == ("already_champion", True, "already champion")


def test_a_clearly_better_challenger_is_promoted_and_the_reason_quotes_the_interval():
    decision = gate(outcomes([1] * 30), outcomes([1] * 22 + [0] * 8))
    assert (decision.state, decision.promoted) == ("promoted", True)
    low, high = decision.interval
    assert decision.reason == (
        f"accuracy 1.000 vs champion v2's 0.733: +0.267 [95% CI {low:+.3f}, {high:+.3f}] clears min_improvement 0"
    )
    assert low > 0 and decision.difference == pytest.approx(8 / 30) and decision.method == "paired bootstrap"
    assert decision.p_value == pytest.approx(2 / 2**8)  # McNemar, 8 discordant pairs all one way
    assert [c.name for c in decision.checks] == ["primary", "slice class=0", "slice class=1", "slice class=2"]
    assert decision.eval_digest == "sha256:eval" and decision.confidence == 0.95


def test_a_challenger_whose_interval_touches_zero_is_kept_and_the_reason_says_so():
    decision = gate(outcomes([1] * 29 + [0]), CHAMPION)
    assert (decision.state, decision.promoted) == ("kept", False)
    assert decision.reason.startswith("accuracy 0.967 vs champion v2's 0.900: +0.067 [95% CI +0.000, +")
    assert decision.reason.endswith("] does not clear min_improvement 0")


def test_a_min_metric_improves_downwards():
    champion = outcomes([1] * 30, loss=[0.5] * 30)
    better_loss = gate(outcomes([1] * 30, loss=[0.3 + 0.01 * (i % 3) for i in range(30)]), champion, GateConfig(metric="loss"))
    assert better_loss.promoted and better_loss.mode == "min" and better_loss.difference == pytest.approx(0.19)
    assert "(lower is better): +0.190" in better_loss.reason
    worse = gate(outcomes([1] * 30, loss=[0.6] * 30), champion, GateConfig(metric="loss"))
    assert not worse.promoted and "-0.100 [95% CI -0.100, -0.100]" in worse.reason


def test_non_inferiority_promotes_an_equal_challenger_within_the_margin():
    config = GateConfig(min_improvement=None, max_regression=0.05)
    equal = gate(outcomes([1] * 200), outcomes([1] * 200))
    assert equal.state == "kept"  # superiority: equal is not better
    equal = gate(outcomes([1] * 200), outcomes([1] * 200), config)
    assert equal.promoted and equal.reason.endswith("clears max_regression 0.05")
    worse = gate(outcomes([1] * 180 + [0] * 20), outcomes([1] * 200), config)
    assert not worse.promoted and worse.reason.endswith("does not clear max_regression 0.05")
    both = gate(outcomes([1] * 200), outcomes([1] * 200), GateConfig(min_improvement=0.0, max_regression=0.05))
    assert not both.promoted and both.reason.endswith("does not clear min_improvement 0")


@pytest.mark.parametrize(
    ("config", "why"),
    [(GateConfig(metric=None), "gate.metric is None"),
     (GateConfig(min_improvement=None), "neither min_improvement nor max_regression is set")],
)  # fmt: skip
def test_no_rule_is_a_stated_decision_never_a_promotion(config, why):
    decision = gate(outcomes([1] * 30), outcomes([0] * 30), config)
    assert (decision.state, decision.promoted) == ("kept", False)
    assert decision.reason == f"no rule: champion kept ({why})"


def test_non_finite_challenger_outcomes_are_never_promoted():
    broken = outcomes([1] * 30, finite=False)
    for champion in (CHAMPION, None):
        decision = gate(broken, champion, GateConfig(metric=None))
        assert (decision.state, decision.promoted) == ("kept", False)
        assert decision.reason == "challenger v3's outcomes are not finite (NaN or inf in logits, probabilities): never promoted"
    nan_loss = outcomes([1] * 30, loss=[math.nan] + [0.1] * 29)
    nan_loss = nan_loss.model_copy(update={"finite": False, "non_finite_outputs": []})
    assert "NaN or inf in its per-example outcomes" in gate(nan_loss, CHAMPION).reason


def test_a_champion_with_non_finite_outcomes_is_replaced():
    decision = gate(outcomes([1] * 29 + [0]), outcomes([0] * 30, finite=False))
    assert (decision.state, decision.reason) == (
        "promoted",
        "champion v2's outcomes are not finite: any finite challenger is better",
    )


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"eval_digest": "sha256:other"}, "scored on different eval data"),
        ({"signature": {**SIGNATURE, "outputs": {**SIGNATURE["outputs"], "scores": SIGNATURE["outputs"]["probabilities"]}}},
         "output names differ"),
        ({"signature": {**SIGNATURE, "outputs": {**SIGNATURE["outputs"], "probabilities": ["float32", [None, 4]]}}},
         "output 'probabilities' label sets differ (number of classes)"),
        ({"signature": {**SIGNATURE, "inputs": {"features": ["float64", [None, 4]]}}}, "input 'features' dtypes differ"),
        ({"signature": {**SIGNATURE, "inputs": {"x": ["float32", [None, 4]]}}}, "input names differ"),
        ({"labels": [1.0] * 30}, "label sets differ"),
    ],
)  # fmt: skip
def test_incomparable_versions_are_a_state_with_the_reason(change, why):
    challenger = outcomes([1] * 30).model_copy(update=change)
    assert why in (comparability(challenger, CHAMPION) or "")
    decision = gate(challenger, CHAMPION)
    assert (decision.state, decision.promoted) == ("incomparable", False)
    assert decision.reason.startswith("incomparable with champion v2: ") and why in decision.reason


def test_a_guardrail_blocks_a_better_primary_once():
    challenger = outcomes([1] * 30, loss=[0.9] * 30)  # right everywhere, but far less sure
    champion = outcomes([1] * 22 + [0] * 8, loss=[0.3] * 30)
    allowed = gate(challenger, champion, GateConfig(guardrails={"loss": 1.0}))
    assert allowed.promoted
    blocked = gate(challenger, champion, GateConfig(guardrails={"loss": 0.1}))
    assert (blocked.state, blocked.promoted) == ("kept", False)
    assert (
        "clears min_improvement 0; kept: guardrail loss 0.900 vs 0.300: -0.600 regresses more than the allowed regression 0.1"
        in (blocked.reason)
    )
    guard = next(c for c in blocked.checks if c.name == "guardrail")
    assert (guard.metric, guard.passed, guard.difference) == ("loss", False, pytest.approx(-0.6))


def test_a_slice_blocks_only_when_slices_gate():
    labels = [float(i % 3) for i in range(60)]
    # better on classes 0 and 1, worse on class 2
    challenger = outcomes([1 if label != 2 else (0 if i < 30 else 1) for i, label in enumerate(labels)], labels=labels)
    champion = outcomes([0 if label != 2 else 1 for label in labels], labels=labels)
    shown = gate(challenger, champion)
    assert shown.promoted
    slice2 = next(c for c in shown.checks if c.name == "slice class=2")
    assert (slice2.passed, slice2.gating) == (False, False) and "(shown, not gating)" in slice2.reason
    blocked = gate(challenger, champion, GateConfig(slice_max_regression=0.1))
    assert (blocked.state, blocked.promoted) == ("kept", False)
    assert (
        "kept: slice class=2 (20 examples): accuracy 0.500 vs 1.000: -0.500 (regresses more than slice_max_regression 0.1)"
        in (blocked.reason)
    )


def test_a_floor_blocks_a_better_challenger_once():
    challenger, champion = outcomes([1] * 20 + [0] * 10), outcomes([1] * 5 + [0] * 25)
    assert gate(challenger, champion).promoted
    blocked = gate(challenger, champion, GateConfig(floors={"accuracy": 0.9}))
    assert (blocked.state, blocked.promoted) == ("kept", False)
    assert blocked.reason.endswith("; kept: floor accuracy >= 0.9: 0.667 fails")


def test_a_metric_the_head_does_not_compute_is_a_clear_error():
    with pytest.raises(
        GateError, match=r"gate.metric: 'mse' cannot be computed for the classifier head; it computes accuracy, error, loss"
    ):
        gate(outcomes([1] * 30), CHAMPION, GateConfig(metric="mse"))
    with pytest.raises(GateError, match="'mae' cannot be computed"):
        gate(outcomes([1] * 30), CHAMPION, GateConfig(guardrails={"mae": 0.1}))


def test_a_decision_recorded_before_states_reads_back():
    old = GateDecision(
        metric="accuracy", mode="max", challenger_version=2, challenger_value=0.9, champion_version=1, champion_value=0.8,
        promoted=True, reason="accuracy 0.9 beats champion v1's 0.8 (max)",
    )  # fmt: skip
    assert (old.state, old.checks, old.interval) == ("promoted", [], None)
    assert GateDecision.model_validate_json(old.model_dump_json()) == old


# --- the rule over many gates: equally good models, and data shift ------------------------------------


@pytest.mark.parametrize("shared", [0.5, 0.0])
def test_false_promotion_rate_of_two_equally_good_models(capsys, shared):
    """400 gates between two iris-like classifiers of the same true accuracy, each on a fresh 30-example eval set.

    `shared`: the part of the examples both get right or wrong together (same architecture, other seed);
    0.0 is the worst case, independent mistakes. The rule promotes when the lower bound of a 95% interval
    is above 0: at most ~2.5% of the time for equal models (one tail), plus a slack for 400 draws.
    """
    rng = np.random.default_rng(20)
    population = 5000
    accuracy = 0.93
    a = rng.random(population) < accuracy
    b = a.copy()
    own = np.flatnonzero(rng.random(population) >= shared)
    b[own] = rng.permutation(a[own])  # the other half: shuffled, so exactly the same accuracy
    assert a.sum() == b.sum()
    promoted = 0
    gates = 400
    for i in range(gates):
        pick = rng.integers(0, population, 30)
        decision = gate(outcomes(a[pick]), outcomes(b[pick]), GateConfig(bootstrap_samples=1000), v=10 + i)
        promoted += decision.promoted
    rate = promoted / gates
    with capsys.disabled():
        print(f"\nfalse-promotion rate, equal models ({shared:.0%} shared outcomes), 400 gates of n=30 at 95%: {rate:.4f}")
    assert rate <= (1 - 0.95) / 2 + 0.02


def test_data_shift_replaces_a_champion_that_is_worse_on_the_current_data():
    """The champion's training-time accuracy (0.97) beat the challenger's (0.93), but on today's data it is worse."""
    today_champion = outcomes([1] * 18 + [0] * 12)
    today_challenger = outcomes([1] * 28 + [0] * 2)
    decision = gate(today_challenger, today_champion)
    assert (decision.state, decision.champion_value, decision.challenger_value) == ("promoted", 0.6, pytest.approx(28 / 30))
    reverse = gate(today_champion, today_challenger, v=4, c=3)
    assert (reverse.state, reverse.promoted) == ("kept", False)
