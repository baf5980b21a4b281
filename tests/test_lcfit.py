"""The learning-curve fit (probes/lcfit.py): known parameters recovered, labels needed, refusals."""

import numpy as np
import pytest
from scipy.optimize import least_squares

from probes.lcfit import (C_BOUNDS, LearningCurveError, PowerLaw, fit_learning_curve, fit_power_law, fit_rows,
                          parse_targets)

SIZES = np.array([20, 40, 80, 160, 320, 640, 1280, 2560], dtype=float)
TRUE = PowerLaw(0.92, 0.9, 0.5)


def _noisy(rng, sd, B=0):
    """The true curve at SIZES plus noise; with B, also B replicates around the noisy means."""
    y = TRUE.auc(SIZES) + rng.normal(0, sd, len(SIZES))
    return y, y + rng.normal(0, sd, (B, len(SIZES)))


def test_recovers_known_parameters_from_noisy_power_law():
    y, reps = _noisy(np.random.default_rng(3), 0.003, B=500)
    fit = fit_learning_curve(SIZES, y, reps)
    assert fit.curve.a == pytest.approx(TRUE.a, abs=0.01)
    assert fit.curve.c == pytest.approx(TRUE.c, abs=0.1)
    assert fit.curve.b == pytest.approx(TRUE.b, rel=0.3)
    for p in "ac":
        low, high = fit.interval(p)
        assert low < getattr(TRUE, p) < high
    assert fit.max_residual < 0.01


def test_agrees_with_scipy_least_squares():
    """The variable-projection solver finds the same weighted optimum as a general bounded solver."""
    rng = np.random.default_rng(5)
    n = np.array([45, 85, 170, 340, 680.0])
    y = TRUE.auc(n) + rng.normal(0, 0.01, len(n))
    w = rng.uniform(0.5, 2.0, len(n))
    ours = fit_power_law(n, y, w)
    ref = least_squares(lambda t: np.sqrt(w) * (y - t[0] + t[1] * n ** -t[2]), [min(1.0, y.max() + 0.01), 1.0, 0.5],
                        bounds=([-np.inf, 0.0, C_BOUNDS[0]], [1.0, np.inf, C_BOUNDS[1]]))
    cost = lambda p: np.sum(w * (y - p.auc(n)) ** 2)  # noqa: E731
    assert cost(ours) <= cost(PowerLaw(*ref.x)) * (1 + 1e-6)
    assert ours.a == pytest.approx(ref.x[0], abs=1e-4) and ours.c == pytest.approx(ref.x[2], rel=1e-3)


def test_labels_needed_on_a_known_curve():
    # AUC(n) = 0.95 - n^-0.5 reaches 0.85 at n = (1 / 0.1)^2 = 100, and 0.90 at 400
    truth = PowerLaw(0.95, 1.0, 0.5)
    n = np.array([25, 50, 100, 200, 400.0])
    reps = truth.auc(n) + np.random.default_rng(0).normal(0, 1e-4, (300, len(n)))
    fit = fit_learning_curve(n, truth.auc(n), reps)
    need = fit.labels_needed(0.85)
    assert need.n == pytest.approx(100, rel=1e-3)
    assert need.low <= 100 <= need.high and need.high < 110
    assert need.status == "interpolated" and need.p_reached == 1.0
    assert fit.labels_needed(0.90).n == pytest.approx(400, rel=1e-3)
    assert fit.labels_needed(0.91).status == "extrapolated"  # 625 labels: within 2x the largest size, 400
    far = fit.labels_needed(0.93)  # 2500 labels, 6x the largest size measured
    assert far.status == "far extrapolation" and "not a measurement" in far.note
    assert fit.labels_needed(0.70).status == "below smallest size"  # 16 labels, under the smallest size 25
    row = fit_rows(fit, [0.85])[0]
    assert row["labels_needed"] in (100, 101) and row["status"] == "interpolated" and row["n_sizes"] == 5


def test_a_target_above_the_asymptote_is_not_reached():
    n = np.array([45, 85, 170, 340.0])
    flat = np.array([0.70, 0.73, 0.745, 0.75])  # levels off near 0.75
    reps = flat + np.random.default_rng(1).normal(0, 0.005, (400, len(n)))
    fit = fit_learning_curve(n, flat, reps)
    assert fit.curve.a < 0.8
    need = fit.labels_needed(0.8)
    assert need.n == np.inf and need.high == np.inf and need.status == "not reached"
    assert "asymptote" in need.note and need.p_reached < 0.05
    row = fit_rows(fit, [0.8])[0]
    assert row["labels_needed"] == np.inf and row["status"] == "not reached"


def test_a_slow_climb_says_its_plateau_is_undetermined():
    n = np.array([45, 85, 170, 350.0])
    slow = 0.55 + 0.02 * np.log(n / 45)  # a logarithmic climb: no plateau within sight
    fit = fit_learning_curve(n, slow, slow + np.random.default_rng(2).normal(0, 0.01, (300, len(n))))
    need = fit.labels_needed(0.8)
    assert fit.curve.a == 1.0 and need.status == "far extrapolation" and need.n > 100 * 350
    assert "not a measurement" in need.note and "do not determine it" in need.note


def test_the_asymptote_never_passes_one():
    n = np.array([10, 20, 40, 80.0])
    steep = np.array([0.80, 0.90, 0.97, 0.999])  # unbounded, a straight extrapolation would pass 1
    fit = fit_power_law(n, steep)
    assert fit.a <= 1.0 and fit.b >= 0 and C_BOUNDS[0] <= fit.c <= C_BOUNDS[1]


@pytest.mark.parametrize("sizes", [[45, 170], [45, 45, 170]])
def test_fewer_than_three_sizes_is_refused(sizes):
    with pytest.raises(LearningCurveError, match="at least 3 different training-set sizes"):
        fit_power_law(sizes, [0.7] * len(sizes))


def test_bad_inputs_are_refused():
    with pytest.raises(LearningCurveError, match="finite"):
        fit_power_law([45, 85, 170], [0.7, np.nan, 0.8])
    with pytest.raises(LearningCurveError, match="replicates"):
        fit_learning_curve([45, 85, 170], [0.7, 0.75, 0.8], np.zeros((10, 2)))
    assert parse_targets("0.8, 0.9") == [0.8, 0.9] and parse_targets("none") == []
    with pytest.raises(LearningCurveError, match="not an AUC"):
        parse_targets("80")
    with pytest.raises(LearningCurveError, match="0.8,0.9"):
        parse_targets("high")


@pytest.mark.parametrize("means", [[0.85, 0.82, 0.80, 0.77, 0.75], [0.80, 0.70, 0.80, 0.70, 0.75]])
def test_a_falling_or_flat_curve_gives_no_number(means):
    """Before, the fit (flat: b at its bound 0) said 0 labels reach 0.78, CI 0-0, for a curve whose AUC
    at 680 labels was 0.75."""
    n = np.array([45, 85, 170, 340, 680.0])
    reps = np.array(means) + np.random.default_rng(2).normal(0, 0.01, (300, len(n)))
    fit = fit_learning_curve(n, means, reps)
    assert fit.curve.b == 0.0
    need = fit.labels_needed(0.74)
    assert need.status == "no trend" and np.isnan(need.n) and np.isnan(need.low) and np.isnan(need.high)
    assert "did not rise with the labels between 45 and 680" in need.note
    row = fit_rows(fit, [0.74])[0]
    assert (row["labels_needed"], row["labels_ci_low"], row["labels_ci_high"], row["status"]) == ("", "", "", "no trend")
