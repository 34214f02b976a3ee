"""Estimators of cbs.analysis.fit / forecast / steps on synthetic data with known answers (pure unit tests, < 10 s)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special
from scipy.optimize import least_squares, minimize

from cbs.analysis.fit import (
    MIN_BATCHES, critical_batch_size, degradation_range, estimate_setting, fit_hyperbola, fit_log_hyperbola,
    setting_rng, steps_model,
)
from cbs.analysis.laws import fit_scaling_law, law_from_json, law_to_json
from cbs.analysis.forecast import batch_plan, forecast_cbs
from cbs.analysis.steps import (
    Setting, StepsPoint, TargetKind, _Observation, as_float, reduce_observations, steps_to_target,
)

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
    steps = steps_model(BATCHES, 1000.0, 300.0)
    enough = estimate_setting(SETTING, _points(BATCHES[:MIN_BATCHES], steps[:MIN_BATCHES]), 0.2, n_resamples=50)
    assert enough.fitted and enough.n_batches == MIN_BATCHES
    # one point short: the fit is refused whether the missing point is absent or censored
    short = [None] + list(steps[1:MIN_BATCHES])
    for points in (_points(BATCHES[1:MIN_BATCHES], steps[1:MIN_BATCHES]), _points(BATCHES[:MIN_BATCHES], short)):
        est = estimate_setting(SETTING, points, 0.2)
        assert not est.fitted and math.isnan(est.s_min) and est.fit is None
        assert f"insufficient: {MIN_BATCHES - 1} batch size(s)" in est.note


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


# ------------------------------------------------------------------------------------------------ censored fit


def _censored_nll(log_a, u, batch, steps, cens_batch, caps, sigma):
    """The Tobit objective written out directly (docs/method.md, "Censored fit")."""
    mu = np.log(np.exp(log_a) * (1 + np.exp(u) / batch))
    mu_c = np.log(np.exp(log_a) * (1 + np.exp(u) / cens_batch))
    return (((np.log(steps) - mu) ** 2).sum() / (2 * sigma**2)
            - special.log_ndtr(-(np.log(caps) - mu_c) / sigma).sum())


def test_censored_fit_maximises_the_tobit_likelihood():
    """Same optimum as scipy's Nelder-Mead from 8 starts on the likelihood written out by hand."""
    rng = np.random.default_rng(6)
    for _ in range(10):
        steps = steps_model(BATCHES, 10 ** rng.uniform(2, 4), 10 ** rng.uniform(1.5, 3.5)) * np.exp(
            rng.normal(0, 0.1, len(BATCHES)))
        cap = steps[-1:] * np.exp(rng.uniform(-0.1, 0.3))  # the largest batch: S > cap, cap near the curve
        fit = fit_hyperbola(BATCHES[:-1], steps[:-1], BATCHES[-1:], cap)
        assert fit.n_censored == 1 and fit.sigma == pytest.approx(max(math.sqrt(
            fit_hyperbola(BATCHES[:-1], steps[:-1]).rss / 3), 0.01))
        args = (BATCHES[:-1], steps[:-1], BATCHES[-1:], cap, fit.sigma)
        best = min((minimize(lambda p: _censored_nll(*p, *args), [math.log(steps.min()), u0], method="Nelder-Mead",
                             options=dict(xatol=1e-10, fatol=1e-12, maxiter=5000)) for u0 in np.linspace(2, 9, 8)),
                   key=lambda r: r.fun)
        ours = _censored_nll(math.log(fit.s_min), math.log(fit.b_noise), *args)
        assert ours <= best.fun + 1e-9
        assert fit.b_noise == pytest.approx(math.exp(best.x[1]), rel=1e-4)


def test_a_lower_bound_moves_the_fit_only_when_it_binds():
    steps = steps_model(BATCHES, 1000.0, 300.0) * np.exp([0.05, -0.05, 0.03, -0.02, 0.04, -0.06])
    plain = fit_hyperbola(BATCHES[:-1], steps[:-1])
    far = fit_hyperbola(BATCHES[:-1], steps[:-1], BATCHES[-1:], [plain.steps(BATCHES[-1]) / 3])
    assert (far.s_min, far.b_noise) == (pytest.approx(plain.s_min, rel=1e-6), pytest.approx(plain.b_noise, rel=1e-5))
    cap = plain.steps(BATCHES[-1]) * 1.3  # the run trained 30% longer than the curve says S is, and never got there
    bound = fit_hyperbola(BATCHES[:-1], steps[:-1], BATCHES[-1:], [cap])
    assert bound.steps(BATCHES[-1]) > plain.steps(BATCHES[-1]) * 1.1  # the curve is pushed up towards the bound
    assert bound.s_min > plain.s_min and bound.rss > plain.rss


def test_censored_batches_enter_estimate_setting_and_its_bootstrap():
    steps = list(steps_model(BATCHES, 1000.0, 300.0) * np.exp([0.05, -0.05, 0.03, -0.02, 0.04, -0.06]))
    plain = estimate_setting(SETTING, _points(BATCHES[:-1], steps[:-1]), 0.2, n_resamples=200)
    cap = float(plain.fit.steps(BATCHES[-1]) * 1.2)
    points = _points(BATCHES[:-1], steps[:-1]) + [StepsPoint(SETTING, int(BATCHES[-1]), None, 3,
                                                             censored_at_steps=cap)]
    est = estimate_setting(SETTING, points, 0.2, n_resamples=200)
    assert est.n_censored == 1 and est.n_batches == len(BATCHES) - 1
    assert est.b_noise < plain.b_noise and est.cbs_ci[0] < est.cbs < est.cbs_ci[1]
    assert not any("conflicts" in w for w in est.warnings)  # the curve met the bound
    far = points[:-1] + [StepsPoint(SETTING, int(BATCHES[-1]), None, 3, censored_at_steps=cap * 3)]
    conflict = estimate_setting(SETTING, far, 0.2, n_resamples=0)
    assert any(f"at B={int(BATCHES[-1])} no run reached the target" in w and "conflicts" in w
               for w in conflict.warnings)
    unbounded = points[:-1] + [StepsPoint(SETTING, int(BATCHES[-1]), None, 3, lost_runs=3)]  # all diverged
    assert estimate_setting(SETTING, unbounded, 0.2, n_resamples=0).b_noise == pytest.approx(plain.b_noise)


def test_censored_likelihood_removes_the_bias_of_dropping_censored_batches():
    """Runs stop at a token cap, so the largest batches reach the target only with a lucky draw: dropping the
    unlucky ones leaves S(B) biased low there. Over 300 draws the censored fit is unbiased, the dropped one not."""
    s_min, b_noise = 1000.0, 300.0
    caps = steps_model(BATCHES[-2], s_min, b_noise) * BATCHES[-2] * 1.05 / BATCHES  # one token budget for all
    rng = np.random.default_rng(0)
    dropped, censored = [], []
    for _ in range(300):
        steps = steps_model(BATCHES, s_min, b_noise) * np.exp(rng.normal(0, 0.1, len(BATCHES)))
        ok = steps <= caps
        dropped.append(math.log(fit_hyperbola(BATCHES[ok], steps[ok]).b_noise / b_noise))
        censored.append(math.log(fit_hyperbola(BATCHES[ok], steps[ok], BATCHES[~ok], caps[~ok]).b_noise / b_noise))
    assert abs(np.mean(censored)) < 0.02 and np.mean(dropped) > 0.04


# --------------------------------------------------------------------------------------------- degradation range


def test_degradation_range_arithmetic():
    rows = degradation_range(200.0, (150.0, 280.0), 64.0, (0.1, 0.2, 0.5, 1.0))
    assert [(d.overhead, d.batch, d.low, d.high) for d in rows] == [
        (0.1, pytest.approx(1.1 * 64 + 0.1 * 200), pytest.approx(1.1 * 64 + 0.1 * 150), pytest.approx(1.1 * 64 + 28)),
        (0.2, pytest.approx(116.8), pytest.approx(106.8), pytest.approx(132.8)),
        (0.5, pytest.approx(196.0), pytest.approx(171.0), pytest.approx(236.0)),
        (1.0, pytest.approx(328.0), pytest.approx(278.0), pytest.approx(408.0))]
    s = lambda b: 1000.0 * (1 + 200.0 / b)  # noqa: E731  the definition: S(B(o)) = (1 + o) S(B0) B0 / B(o)
    for d in rows:
        assert s(d.batch) == pytest.approx((1 + d.overhead) * s(64.0) * 64.0 / d.batch, rel=1e-12)
    assert degradation_range(200.0, (0.0, math.inf), 64.0, (0.5,))[0].high == math.inf


def test_estimate_carries_the_degradation_range():
    steps = steps_model(BATCHES, 1000.0, 500.0)
    est = estimate_setting(SETTING, _points(BATCHES, steps), 0.2, n_resamples=100, overheads=(0.1, 0.2, 1.0))
    assert [d.overhead for d in est.degradation] == [0.1, 0.2, 1.0]
    at_o = {d.overhead: d for d in est.degradation}
    assert at_o[0.2].batch == pytest.approx(est.cbs) and (at_o[0.2].low, at_o[0.2].high) == pytest.approx(est.cbs_ci)
    assert at_o[0.1].batch < at_o[0.2].batch < at_o[1.0].batch


# --------------------------------------------------------------------------------------------------- diagnostics


def test_diagnostics_and_warnings():
    noise = np.array([0.02, -0.03, 0.01, 0.0, -0.01, 0.02])
    good = estimate_setting(SETTING, _points(BATCHES, steps_model(BATCHES, 1000.0, 400.0) * np.exp(noise)), 0.2,
                            n_resamples=0)  # B0 = 64: (1+o)B0 is 49% of the CBS, just under the warning
    d = good.diagnostics
    assert d.batches == tuple(int(b) for b in BATCHES) and len(d.residuals) == len(BATCHES)
    assert d.max_abs_residual == pytest.approx(max(abs(r) for r in d.residuals))
    assert d.residual_sd == pytest.approx(math.sqrt(sum(r * r for r in d.residuals) / 4)) and d.r2 > 0.95
    assert good.warnings == ()
    below = estimate_setting(SETTING, _points(BATCHES, steps_model(BATCHES, 100.0, 5000.0)), 0.2, n_resamples=0)
    assert any("every batch is below it" in w for w in below.warnings)
    above = estimate_setting(SETTING, _points(BATCHES, steps_model(BATCHES, 1000.0, 30.0)), 0.2, n_resamples=0)
    assert any("every batch is above it" in w for w in above.warnings)
    assert any("CBS ~ (1+o)B0" in w for w in above.warnings) and above.b0_share > 0.9
    flat = estimate_setting(SETTING, _points(BATCHES, np.full(len(BATCHES), 500.0)), 0.2, n_resamples=0)
    assert any("lower search bound" in w for w in flat.warnings)
    linear = estimate_setting(SETTING, _points(BATCHES, 1e6 / BATCHES), 0.2, n_resamples=0)
    assert not linear.fitted and any("upper search bound" in w for w in linear.warnings)


# ------------------------------------------------------------------------------------ steps table: what runs say


def test_reduction_keeps_crossings_of_diverged_runs_and_the_smallest_cap():
    obs = [_Observation(SETTING, 64, 120.0, 1, "lr_hi", diverged=True),
           _Observation(SETTING, 64, 150.0, 1, "lr_lo"),
           _Observation(SETTING, 128, None, 1, "a", censored_at=900.0),
           _Observation(SETTING, 128, None, 1, "b", censored_at=700.0),
           _Observation(SETTING, 128, None, 1, "c", diverged=True, lost=1),
           _Observation(SETTING, 256, None, 1, "d", diverged=True, lost=1)]
    p64, p128, p256 = reduce_observations(obs)
    assert (p64.steps, p64.best_run, p64.diverged_after, p64.runs) == (120.0, "lr_hi", True, 2)
    assert (p128.steps, p128.censored_at_steps, p128.lower_bound, p128.lost_runs) == (None, 700.0, True, 1)
    assert p128.runs == 3
    assert (p256.censored, p256.lower_bound, p256.lost_runs) == (True, False, 1)  # no observation, no bound


@pytest.mark.parametrize("value,want", [(3.5, 3.5), (7, 7.0), ("nan", math.nan), ("inf", math.inf),
                                        ("-inf", -math.inf), ("fast", None), (None, None), (True, None)])
def test_as_float_reads_the_non_finite_strings_of_metrics_jsonl(value, want):
    got = as_float(value)
    assert (got is None and want is None) or (math.isnan(want) and math.isnan(got)) or got == want
