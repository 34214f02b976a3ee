"""Estimators of analysis.fit / forecast / steps on synthetic data with known answers (pure unit tests, < 10 s)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import least_squares

from analysis.fit import (
    MIN_BATCHES, critical_batch_size, estimate_setting, fit_hyperbola, fit_log_hyperbola, setting_rng, steps_model,
)
from analysis.laws import fit_scaling_law, law_from_json, law_to_json
from analysis.forecast import batch_plan, forecast_cbs
from analysis.steps import Setting, StepsPoint, TargetKind, steps_to_target

BATCHES = 64.0 * 2 ** np.arange(6)  # 64 .. 2048 sequences: a typical sweep, 6 points
SETTING = Setting("m_d", 85_000_000, 1_700_000_000)


def _points(batch, steps, setting=SETTING):
    return [StepsPoint(setting, int(b), None if s is None else float(s), 1) for b, s in zip(batch, steps)]


# ------------------------------------------------------------------------------------------------- exact algebra


def test_cbs_formula_on_hand_made_hyperbola():
    a, b, b0, o = 1000.0, 200_000.0, 64.0, 0.2  # S_min = 1000, B_noise = 200
    b_star = critical_batch_size(b / a, b0, o)
    assert b_star == pytest.approx(1.2 * 64 + 0.2 * 200)  # 116.8
    s = lambda batch: a + b / batch  # noqa: E731
    # the definition: S(B*) = (1 + o) x the linear-scaling prediction S(B0) B0 / B*
    assert s(b_star) == pytest.approx((1 + o) * s(b0) * b0 / b_star, rel=1e-12)
    assert steps_model(b_star, a, b / a) == pytest.approx(s(b_star), rel=1e-12)


@pytest.mark.parametrize("a,b,b0,o", [(50.0, 1e6, 256.0, 0.2), (3e4, 7e5, 32.0, 0.5), (10.0, 1.0, 1.0, 0.1)])
def test_cbs_definition_holds_for_any_parameters(a, b, b0, o):
    b_star = float(critical_batch_size(b / a, b0, o))
    assert a + b / b_star == pytest.approx((1 + o) * (a + b / b0) * b0 / b_star, rel=1e-12)


def test_cbs_small_reference_batch_limit_is_overhead_times_noise_scale():
    assert critical_batch_size(500.0, 1e-12, 0.2) == pytest.approx(0.2 * 500.0)


# ---------------------------------------------------------------------------------------------------- the solver


def test_fit_recovers_noiseless_hyperbola_exactly():
    fit = fit_hyperbola(BATCHES, steps_model(BATCHES, 1234.0, 321.0))
    assert (fit.s_min, fit.b_noise, fit.bound) == (pytest.approx(1234.0, rel=1e-6), pytest.approx(321.0, rel=1e-6), 0)
    assert fit.b == pytest.approx(1234.0 * 321.0, rel=1e-6)


def _scipy_fit(batch, steps):
    """The textbook route: least_squares in (log a, log b) from a linear fit of S on 1/B."""
    slope, intercept = np.polyfit(1.0 / batch, steps, 1)
    p0 = np.log([max(intercept, steps.min() / 10), max(slope, steps.min())])
    r = least_squares(lambda p: np.log(np.exp(p[0]) + np.exp(p[1]) / batch) - np.log(steps), p0,
                      xtol=1e-14, ftol=1e-14, gtol=1e-14)
    return np.exp(r.x[0]), np.exp(r.x[1] - r.x[0]), 2 * r.cost


def test_profile_solver_agrees_with_scipy_least_squares():
    rng = np.random.default_rng(1)
    for _ in range(20):
        s_min, b_noise = 10 ** rng.uniform(2, 5), 10 ** rng.uniform(1.5, 3.5)
        steps = steps_model(BATCHES, s_min, b_noise) * np.exp(rng.normal(0, 0.1, len(BATCHES)))
        fit = fit_hyperbola(BATCHES, steps)
        a, bn, rss = _scipy_fit(BATCHES, steps)
        assert fit.rss <= rss * (1 + 1e-6) + 1e-15  # never worse than scipy's local optimum
        assert (fit.s_min, fit.b_noise) == (pytest.approx(a, rel=1e-4), pytest.approx(bn, rel=1e-4))


def test_vectorised_fit_equals_one_at_a_time():
    rng = np.random.default_rng(2)
    y = np.log(steps_model(BATCHES, 500.0, 300.0)) + rng.normal(0, 0.1, (5, len(BATCHES)))
    many = fit_log_hyperbola(BATCHES, y)
    for i in range(5):
        one = fit_hyperbola(BATCHES, np.exp(y[i]))
        assert math.exp(many.log_b_noise[i]) == pytest.approx(one.b_noise, rel=1e-9)


def test_boundary_fits_are_flagged():
    assert fit_hyperbola(BATCHES, 1e6 / BATCHES).bound == 1  # S = b/B: perfect scaling, no saturation
    assert fit_hyperbola(BATCHES, np.full(len(BATCHES), 500.0)).bound == -1  # flat: B_noise ~ 0


# ----------------------------------------------------------------------------------------------- recovery + CIs


def test_recovery_and_bootstrap_coverage():
    """95% intervals from 200 resamples cover the truth in >= 90% of 200 noisy draws (6 batch points, 10% noise)."""
    s_min, b_noise, o = 2000.0, 400.0, 0.2
    truth_cbs = critical_batch_size(b_noise, BATCHES[0], o)
    rng = np.random.default_rng(12345)
    covered, estimates = {"cbs": 0, "s_min": 0, "b_noise": 0}, []
    draws = 200
    for i in range(draws):
        steps = steps_model(BATCHES, s_min, b_noise) * np.exp(rng.normal(0, 0.1, len(BATCHES)))
        est = estimate_setting(SETTING, _points(BATCHES, steps), o, n_resamples=200, seed=i)
        estimates.append(est.cbs)
        covered["cbs"] += est.cbs_ci[0] <= truth_cbs <= est.cbs_ci[1]
        covered["s_min"] += est.s_min_ci[0] <= s_min <= est.s_min_ci[1]
        covered["b_noise"] += est.b_noise_ci[0] <= b_noise <= est.b_noise_ci[1]
    assert np.median(estimates) == pytest.approx(truth_cbs, rel=0.05)
    for name, hits in covered.items():
        assert hits / draws >= 0.90, (name, hits / draws)


def test_intervals_are_reproducible_and_bracket_the_estimate():
    rng = np.random.default_rng(3)
    steps = steps_model(BATCHES, 800.0, 150.0) * np.exp(rng.normal(0, 0.05, len(BATCHES)))
    one = estimate_setting(SETTING, _points(BATCHES, steps), 0.2, n_resamples=300, seed=7)
    two = estimate_setting(SETTING, _points(BATCHES, steps), 0.2, n_resamples=300, seed=7)
    assert one.cbs_ci == two.cbs_ci
    assert one.cbs_ci[0] < one.cbs < one.cbs_ci[1] and one.s_min_ci[0] < one.s_min < one.s_min_ci[1]
    assert one.cbs_ci[0] == pytest.approx(critical_batch_size(one.b_noise_ci[0], 64.0, 0.2))
    assert setting_rng(7, "a").integers(1 << 30) != setting_rng(7, "b").integers(1 << 30)


def test_reference_batch_and_censored_points():
    steps = list(steps_model(BATCHES, 1000.0, 500.0))
    points = _points(BATCHES, [None] + steps[1:])  # smallest batch censored: out of the fit, still B0
    est = estimate_setting(SETTING, points, 0.2, n_resamples=0)
    assert est.n_batches == len(BATCHES) - 1 and est.reference_batch == BATCHES[0]
    assert est.cbs == pytest.approx(1.2 * BATCHES[0] + 0.2 * 500.0, rel=1e-6)
    given = estimate_setting(SETTING, points, 0.2, reference_batch=256, n_resamples=0)
    assert given.cbs == pytest.approx(1.2 * 256 + 0.2 * 500.0, rel=1e-6)
    assert math.isnan(est.cbs_ci[0])  # --bootstrap 0: no interval


def test_too_few_batches_is_insufficient_not_an_error():
    est = estimate_setting(SETTING, _points(BATCHES[:3], [100.0, None, 60.0]), 0.2)
    assert not est.fitted and math.isnan(est.s_min) and "insufficient" in est.note
    assert MIN_BATCHES == 3


def test_no_saturation_gives_no_cbs_with_a_note():
    est = estimate_setting(SETTING, _points(BATCHES, 1e6 / BATCHES), 0.2, n_resamples=50)
    assert not est.fitted and "no saturation" in est.note
    far = estimate_setting(SETTING, _points(BATCHES, steps_model(BATCHES, 10.0, 5e4)), 0.2, n_resamples=50)
    assert far.cbs > BATCHES.max() and "extrapolated" in far.note


# --------------------------------------------------------------------------------------------------- scaling law


def test_scaling_law_recovery_and_interval_coverage():
    c, alpha = 3e-4, 0.47
    x = np.geomspace(1e8, 1e10, 8)
    rng = np.random.default_rng(4)
    hits, draws = 0, 200
    for _ in range(draws):
        law = fit_scaling_law(x, c * x**alpha * np.exp(rng.normal(0, 0.1, len(x))), "tokens")
        lo, hi = law.exponent_ci
        hits += lo <= alpha <= hi
    assert 0.90 <= hits / draws <= 0.99
    law = fit_scaling_law(x, c * x**alpha * np.exp(rng.normal(0, 0.02, len(x))), "tokens")
    assert law.exponent == pytest.approx(alpha, abs=0.03) and law.coefficient == pytest.approx(c, rel=0.5)
    assert law.coefficient_ci[0] < law.coefficient < law.coefficient_ci[1] and law.r2 > 0.99


def test_prediction_interval_matches_statsmodels():
    import statsmodels.api as sm

    rng = np.random.default_rng(5)
    x = np.geomspace(1e8, 1e10, 6)
    y = 1e-3 * x**0.4 * np.exp(rng.normal(0, 0.1, len(x)))
    law = fit_scaling_law(x, y, "tokens")
    res = sm.OLS(np.log(y), sm.add_constant(np.log(x))).fit()
    frame = res.get_prediction(np.array([[1.0, np.log(3e10)]])).summary_frame(alpha=0.05)
    point, low, high = law.predict(3e10)
    assert np.log(point) == pytest.approx(frame["mean"].iloc[0])
    assert (np.log(low), np.log(high)) == (pytest.approx(frame["obs_ci_lower"].iloc[0]),
                                           pytest.approx(frame["obs_ci_upper"].iloc[0]))
    _, mlow, _ = law.predict(3e10, prediction=False)
    assert np.log(mlow) == pytest.approx(frame["mean_ci_lower"].iloc[0])


def test_scaling_law_edge_cases_and_json_round_trip():
    assert fit_scaling_law([1e9, 1e9, 1e9], [10.0, 11.0, 12.0], "tokens") is None  # one distinct X
    two = fit_scaling_law([1e9, 4e9], [100.0, 200.0], "tokens")
    assert two.exponent == pytest.approx(0.5) and two.r2 == 1.0 and math.isnan(two.exponent_ci[0])
    assert math.isnan(forecast_cbs(two, 2e9).low) and forecast_cbs(two, 2e9).cbs == pytest.approx(100 * 2**0.5)
    law = fit_scaling_law([1e8, 1e9, 1e10], [10.0, 30.0, 80.0], "model_params", ["a", "b", "c"], pooled=True)
    back = law_from_json(law_to_json(law))
    assert back == law
    assert law_to_json(two)["exponent_ci"] == [None, None]  # JSON has no NaN


# -------------------------------------------------------------------------------------------------------- forecast


@pytest.mark.parametrize("cbs,gpus,micro,want_global,want_accum,above", [
    (1000.0, 8, 4, 992, 31, False),  # largest multiple of 32 <= 1000
    (32.0, 8, 4, 32, 1, False),
    (20.0, 8, 4, 32, 1, True),  # one micro-batch per GPU already exceeds the CBS
    (513.7, 1, 1, 513, 513, False),
])
def test_batch_plan(cbs, gpus, micro, want_global, want_accum, above):
    plan = batch_plan(cbs, gpus, micro, seq_len=512)
    assert (plan.global_batch_seqs, plan.grad_accum, plan.above_cbs) == (want_global, want_accum, above)
    assert plan.global_batch_seqs == plan.grad_accum * gpus * micro
    assert plan.tokens_per_step == want_global * 512


def test_forecast_flags_extrapolation():
    law = fit_scaling_law([1e9, 2e9, 4e9], [100.0, 140.0, 190.0], "tokens")
    assert not forecast_cbs(law, 3e9).extrapolated and forecast_cbs(law, 1e10).extrapolated
    f = forecast_cbs(law, 3e9)
    assert f.low < f.cbs < f.high


# --------------------------------------------------------------------------------------------- steps to target


def test_steps_to_target_kinds():
    target = {"loss": 3.3, "raw": {"step": 120, "step_interp": 113.4},
              "ewa": {"0.999": {"step": 118, "step_interp": None}, "0.9995": {"step": 125, "step_interp": 121.0},
                      "0.99": None}}
    assert steps_to_target(target, TargetKind.RAW) == 113.4  # step_interp when present
    assert steps_to_target(target, TargetKind.EWA) == 118.0  # min over taus; null interp -> step
    assert steps_to_target(target, TargetKind.BEST) == 113.4
    never = {"loss": 3.3, "raw": None, "ewa": {"0.999": None}}
    assert all(steps_to_target(never, k) is None for k in TargetKind)
    with pytest.raises(ValueError):
        steps_to_target({"loss": 3.3, "raw": {"step": -5}}, TargetKind.RAW)
