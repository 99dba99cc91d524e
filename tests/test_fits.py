"""The science fits on synthetic data drawn from known parameters: each recovers them within
its reported uncertainty, and a degenerate input is a one-line FitError, never a NaN fit."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parcae_jax.science import fits


def _within(fit, truth: dict, level: float = 0.999):
    """Every true value inside the fit's `level` confidence interval (fixed seeds)."""
    for k, v in truth.items():
        lo, hi = fit.interval(k, level)
        assert lo <= v <= hi, (k, fit.values[k], v, fit.stderr[k])


def _coverage(draw, fit_of, truth: dict, n: int = 200) -> dict[str, float]:
    """The fraction of n noisy draws whose 95% interval holds each true value."""
    hits = dict.fromkeys(truth, 0)
    for seed in range(n):
        fit = fit_of(draw(np.random.default_rng(seed)))
        for k, v in truth.items():
            lo, hi = fit.interval(k)
            hits[k] += lo <= v <= hi
    return {k: h / n for k, h in hits.items()}


def test_the_reported_intervals_hold_the_truth_as_often_as_they_say():
    truth = {"L_inf": 3.0, "A": 1.2, "kappa": 0.5}
    T = np.arange(1, 17)
    draw = lambda rng: truth["L_inf"] + truth["A"] * np.exp(-truth["kappa"] * T) + rng.normal(0, 0.01, T.size)  # noqa: E731
    for k, c in _coverage(draw, lambda L: fits.saturating_exponential(T, L), truth).items():
        assert 0.89 <= c <= 0.995, (k, c)
    C = np.geomspace(1e18, 1.6e19, 5)
    draw = lambda rng: 1e-4 * C ** 0.4 * np.exp(rng.normal(0, 0.05, C.size))  # noqa: E731
    for k, c in _coverage(draw, lambda y: fits.power_law(C, y), {"a": 0.4, "log_k": np.log(1e-4)}).items():
        assert 0.89 <= c <= 0.995, (k, c)


def test_the_isoflop_vertex_and_the_additive_law_cover_the_truth_as_often_as_they_say():
    mu = np.array([1, 2, 4, 6, 8, 10, 12])
    vertex = {"log_opt": math.log(4.0), "opt": 4.0, "loss_opt": 3.0}
    draw = lambda rng: 3.0 + 0.1 * (np.log(mu) - math.log(4.0)) ** 2 + rng.normal(0, 0.003, mu.size)  # noqa: E731
    for k, c in _coverage(draw, lambda L: fits.isoflop_minimum(mu, L), vertex).items():
        assert 0.89 <= c <= 0.995, (k, c)
    truth = {"E": 2.0, "A": 0.6, "alpha": 0.5, "B": 0.8, "beta": 0.4}
    m, D = np.meshgrid([1, 2, 4, 6, 8, 10, 12], [1e8, 2e8, 4e8, 8e8])
    d0 = float(np.exp(np.log(D).mean()))
    clean = truth["E"] + truth["A"] * m ** -truth["alpha"] + truth["B"] * (D / d0) ** -truth["beta"]
    draw = lambda rng: clean + rng.normal(0, 0.003, m.shape)  # noqa: E731
    for k, c in _coverage(draw, lambda L: fits.additive_law(m, D, L), truth, n=100).items():
        assert 0.86 <= c <= 1.0, (k, c)


def test_the_optimal_recurrences_interval_is_the_exp_of_its_log_interval():
    mu = np.array([1, 2, 4, 6, 8, 10, 12])
    L = 3.0 + 0.05 * (np.log(mu) - math.log(5.0)) ** 2 + np.random.default_rng(0).normal(0, 0.01, mu.size)
    fit = fits.isoflop_minimum(mu, L)
    lo, hi = fit.interval("log_opt")
    assert fit.interval("opt") == pytest.approx((math.exp(lo), math.exp(hi)))
    assert 0 < fit.interval("opt")[0] < fit.values["opt"] < fit.interval("opt")[1]


@pytest.mark.parametrize("seed", range(5))
def test_the_saturating_exponential_recovers_its_parameters(seed):
    rng = np.random.default_rng(seed)
    truth = {"L_inf": rng.uniform(2, 4), "A": rng.uniform(0.5, 2), "kappa": rng.uniform(0.2, 0.8)}
    T = np.arange(1, 17)
    L = truth["L_inf"] + truth["A"] * np.exp(-truth["kappa"] * T) + rng.normal(0, 0.005, T.size)
    fit = fits.saturating_exponential(T, L)
    _within(fit, truth)
    assert fit.r2 > 0.99 and fit.dof == 13
    assert 0 < fit.stderr["kappa"] < 0.2


@pytest.mark.parametrize("seed", range(5))
def test_a_power_law_recovers_its_exponent(seed):
    rng = np.random.default_rng(seed)
    a, k = rng.uniform(0.2, 0.9), rng.uniform(1e-6, 1e-3)
    C = np.array([1e18, 2e18, 4e18, 8e18, 16e18])
    y = k * C ** a * np.exp(rng.normal(0, 0.05, C.size))
    fit = fits.power_law(C, y)
    _within(fit, {"a": a, "log_k": math.log(k)})


@settings(max_examples=30, deadline=None)
@given(st.floats(-2, 2), st.floats(-5, 5), st.lists(st.floats(0.1, 1e6), min_size=3, max_size=8, unique=True))
def test_a_noiseless_power_law_is_exact(a, log_k, C):
    C = np.array(C)
    if np.ptp(np.log(C)) < 1e-3:
        return
    fit = fits.power_law(C, np.exp(log_k) * C ** a)
    assert fit.values["a"] == pytest.approx(a, abs=1e-7)
    assert fit.values["log_k"] == pytest.approx(log_k, abs=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_the_isoflop_parabola_finds_the_optimal_recurrence(seed):
    rng = np.random.default_rng(seed)
    mu = np.array([1, 2, 4, 6, 8, 10, 12])
    opt, curv, floor = rng.uniform(3, 8), rng.uniform(0.05, 0.2), rng.uniform(2.5, 3.5)
    L = floor + curv * (np.log(mu) - np.log(opt)) ** 2 + rng.normal(0, 0.003, mu.size)
    fit = fits.isoflop_minimum(mu, L)
    _within(fit, {"log_opt": math.log(opt), "loss_opt": floor, "c2": curv})
    assert fit.values["inside"] == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_the_additive_law_recovers_its_exponents(seed):
    rng = np.random.default_rng(seed)
    truth = {"E": 2.0, "A": 0.6, "alpha": rng.uniform(0.3, 0.8), "B": 0.8, "beta": rng.uniform(0.2, 0.6)}
    mu, D = np.meshgrid([1, 2, 4, 6, 8, 10, 12], [1e8, 2e8, 4e8, 8e8])
    d0 = float(np.exp(np.log(D).mean()))
    L = (truth["E"] + truth["A"] * mu ** -truth["alpha"] + truth["B"] * (D / d0) ** -truth["beta"]
         + rng.normal(0, 0.002, mu.shape))
    fit = fits.additive_law(mu, D, L)
    _within(fit, truth)


@pytest.mark.parametrize("call,message", [
    (lambda: fits.saturating_exponential([1, 2, 3], [3.0, 2.5, 2.4]), "3 distinct points"),
    (lambda: fits.saturating_exponential([1, 2, 3, 4, 5], [3.0] * 5), "does not change"),
    (lambda: fits.saturating_exponential([1, 2, 3, 4, 5], [2.0, 2.1, 2.2, 2.3, 2.4]), "does not fall"),
    (lambda: fits.saturating_exponential([1, 2, 3, 4], [3.0, np.nan, 2.4, 2.3]), "not finite"),
    (lambda: fits.power_law([1e18, 2e18], [1.0, 2.0]), "2 distinct points"),
    (lambda: fits.power_law([1e18, 2e18, 4e18], [1.0, -2.0, 3.0]), "<= 0"),
    (lambda: fits.isoflop_minimum([1, 2, 4, 8], [3.0, 3.2, 3.2, 3.0]), "no minimum"),
    (lambda: fits.isoflop_minimum([1, 2, 4, 8], [3.0] * 4), "does not change"),
    (lambda: fits.additive_law([1, 2, 4], [1e8] * 3, [3.0, 2.9, 2.8]), "cannot determine 5 parameters"),
    (lambda: fits.additive_law([1, 2, 4, 6, 8, 12], [6e8, 4e8, 3e8, 2e8, 1.5e8, 1e8], [3.0, 2.9, 2.8, 2.85, 2.9, 3.0]),
     "tokens are a function of recurrence"),
])
def test_degenerate_points_are_one_line_errors(call, message):
    with pytest.raises(fits.FitError, match=message) as e:
        call()
    assert "\n" not in str(e.value)


def test_a_fit_is_json_with_intervals():
    fit = fits.power_law([1, 2, 4, 8], [1.0, 1.4, 2.1, 2.9])
    out = fit.to_json()
    lo, hi = out["ci95"]["a"]
    assert lo < out["values"]["a"] < hi and all(math.isfinite(v) for v in out["stderr"].values())


def test_a_nearly_straight_isoflop_curve_is_a_one_line_error_not_an_overflow():
    mu = np.array([1, 2, 4, 8])
    L = 3.0 - 0.1 * np.log(mu) + 1e-9 * np.log(mu) ** 2  # a vertex at ln(mu) ~ 5e7
    with pytest.raises(fits.FitError, match="nearly straight"):
        fits.isoflop_minimum(mu, L)
