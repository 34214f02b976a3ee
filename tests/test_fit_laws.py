"""Scaling laws over settings (cbs/analysis/laws.py) on synthetic settings with known exponents."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cbs.analysis.fit import CbsEstimate, critical_batch_size
from cbs.analysis.fit_checks import NoiseLevel
from cbs.analysis.laws import (
    COLLINEAR_R2, collinearity, fit_laws, fit_power_law, law_from_json, law_to_json, log_interval_se,
)
from cbs.analysis.steps import Setting

POOLED = NoiseLevel(0.05, 36)
"""One pooled noise level for every synthetic setting, as fit_settings gives them."""
GRID_N = (1e8, 3e8, 1e9)
GRID_D = (1e9, 4e9, 1.6e10)
CHINCHILLA_N = (85_000_000, 151_000_000, 302_000_000, 604_000_000, 1_200_000_000)


def _estimate(n, d, cbs, ci=None, b_noise=None, s_min=1000.0, note=""):
    """A fitted setting as estimate_setting returns it (only what the laws read)."""
    ci = ci if ci is not None else (cbs / 1.1, cbs * 1.1)
    b_noise = b_noise if b_noise is not None else cbs
    return CbsEstimate(Setting(f"n{n:.3g}_d{d:.3g}", int(n), int(d)), 6, 64.0, s_min=s_min, b_noise=b_noise,
                       cbs=cbs, cbs_ci=ci, b_noise_ci=ci, note=note, noise=POOLED)


def _unfitted(n, d, note):
    return CbsEstimate(Setting(f"n{n:.3g}_d{d:.3g}_x", int(n), int(d)), 6, 64.0, note=note)


def _joint_truth(n, d, a=0.45, b=0.1, c=2e-3):
    return c * d**a * n**b


def test_joint_law_recovers_exponents_with_covering_intervals():
    """9 settings on a 3 x 3 (N, D) grid, 10% noise: the 95% intervals of both exponents cover the truth in
    90-99% of 300 seeded draws, and the point estimates centre on it."""
    rng = np.random.default_rng(7)
    nd = [(n, d) for n in GRID_N for d in GRID_D]
    hits = {"tokens": 0, "model_params": 0}
    a_hat = []
    draws = 300
    for _ in range(draws):
        cbs = [_joint_truth(n, d) * math.exp(rng.normal(0, 0.1)) for n, d in nd]
        law = fit_power_law({"tokens": [d for _, d in nd], "model_params": [n for n, _ in nd]}, cbs, "cbs")
        for v, truth in (("tokens", 0.45), ("model_params", 0.1)):
            lo, hi = law.exponents_ci[v]
            hits[v] += lo <= truth <= hi
        a_hat.append(law.exponents["tokens"])
    for v, h in hits.items():
        assert 0.90 <= h / draws <= 0.99, (v, h / draws)
    assert np.median(a_hat) == pytest.approx(0.45, abs=0.02)


def test_joint_law_in_fit_laws_and_its_json():
    ests = [_estimate(n, d, _joint_truth(n, d)) for n in GRID_N for d in GRID_D]
    laws = fit_laws(ests)
    joint = laws.cbs["joint"]
    assert joint.identifiable and joint.exponents == {"tokens": pytest.approx(0.45), "model_params": pytest.approx(0.1)}
    assert joint.r2 == pytest.approx(1.0) and not laws.collinearity.collinear
    d = law_to_json(joint)
    assert d["variables"] == ["tokens", "params"]
    assert set(d["exponents"]) == set(d["exponents_ci"]) == {"tokens", "params"}
    assert d["exponents"]["tokens"] == pytest.approx(0.45) and len(d["exponents_ci"]["params"]) == 2
    back = law_from_json(d)
    assert back.exponents == pytest.approx(joint.exponents)
    assert back.predict((2e9, 2e8))[0] == pytest.approx(_joint_truth(2e8, 2e9), rel=1e-9)
    # the one-variable laws pool over the other variable; the compute law is fitted beside them
    assert laws.cbs["tokens"].pooled and laws.cbs["model_params"].pooled and "compute" in laws.cbs


def test_chinchilla_design_is_collinear_and_the_joint_law_is_not_reported():
    """D = 20 N: log D = log N + log 20 exactly, so a D^a N^b law only knows a + b."""
    ests = [_estimate(n, 20 * n, 0.05 * (20 * n) ** 0.47 * f) for n, f in zip(CHINCHILLA_N, (1, 1.05, .97, 1.02, 1))]
    laws = fit_laws(ests)
    coll = laws.collinearity
    assert coll.collinear and coll.r2 == pytest.approx(1.0) and coll.ratio == pytest.approx(20.0)
    assert coll.slope == pytest.approx(1.0)
    for family in (laws.cbs, laws.cbs_weighted, laws.b_noise):
        joint = family["joint"]
        assert not joint.identifiable and "collinear" in joint.reason and "cannot be separated" in joint.reason
        assert math.isnan(joint.exponents["tokens"])
    assert law_to_json(laws.cbs["joint"])["exponents"] == {"tokens": None, "params": None}
    assert not law_from_json(law_to_json(laws.cbs["joint"])).identifiable
    assert laws.cbs["tokens"].exponent == pytest.approx(0.47, abs=0.05)  # the one-variable law still stands
    # a design with a little spread in D/N is still collinear by the rule; a factorial one is not
    almost = collinearity([1e8, 2e8, 4e8, 8e8], [2e9, 4.2e9, 7.9e9, 1.6e10])
    assert almost.r2 >= COLLINEAR_R2 and almost.collinear
    assert not collinearity([1e8, 1e8, 4e8, 4e8], [1e9, 4e9, 1e9, 4e9]).collinear


def test_joint_law_needs_both_variables_to_vary():
    laws = fit_laws([_estimate(1e8, d, 0.01 * d**0.5) for d in GRID_D])
    assert not laws.cbs["joint"].identifiable and "N takes a single value" in laws.cbs["joint"].reason
    assert "model_params" not in laws.cbs and laws.cbs["tokens"].exponent == pytest.approx(0.5)


def test_b_noise_law_is_free_of_the_b0_floor():
    """B_noise = c D^0.5 over a 100x range of D, B0 = 256: the CBS law's exponent is flattened well below 0.5 by
    the (1 + o) B0 floor, the B_noise law's is exact."""
    ds = np.geomspace(1e9, 1e11, 6)
    b_noise = 0.01 * ds**0.5
    cbs = critical_batch_size(b_noise, 256.0, 0.2)
    laws = fit_laws([_estimate(1e8, d, c, b_noise=b) for d, c, b in zip(ds, cbs, b_noise)])
    assert laws.b_noise["tokens"].exponent == pytest.approx(0.5, abs=1e-9)
    assert laws.cbs["tokens"].exponent < 0.35


def test_weighted_law_discounts_uncertain_settings_and_lists_open_intervals():
    ds = np.geomspace(1e9, 3.2e10, 6)
    cbs = 0.01 * ds**0.5 * np.exp([0.02, -0.02, 0.01, -0.01, 0.02, 0.0])
    ests = [_estimate(1e8, d, c) for d, c in zip(ds, cbs)]
    ests[-1] = _estimate(1e8, ds[-1], cbs[-1] * 2.0, ci=(cbs[-1] * 0.3, cbs[-1] * 12))  # off the line, very unsure
    ests.append(_estimate(1e8, 6.4e10, 5000.0, ci=(2000.0, math.inf)))  # interval open above
    laws = fit_laws(ests)
    plain, weighted = laws.cbs["tokens"], laws.cbs_weighted["tokens"]
    assert abs(weighted.exponent - 0.5) < 0.03 < abs(plain.exponent - 0.5)
    assert weighted.weighted and weighted.n_points == 6 and plain.n_points == 7
    assert [name for name, _ in laws.unweighted] == [ests[-1].setting.name]
    assert "open" in laws.unweighted[0][1]
    assert log_interval_se((2.0, 8.0)) == pytest.approx(math.log(4) / (2 * 1.959963984540054))


def test_no_bootstrap_means_no_weighted_laws_and_unfitted_settings_are_listed():
    ests = [_estimate(1e8, d, 0.01 * d**0.5, ci=(math.nan, math.nan)) for d in GRID_D]
    ests.append(_unfitted(1e8, 1e11, "no saturation: S ~ 1/B up to B=1024; CBS is beyond the measured batch sizes"))
    laws = fit_laws(ests)
    assert laws.cbs_weighted == {} and len(laws.unweighted) == 3 and "--bootstrap 0" in laws.unweighted[0][1]
    assert laws.excluded == [(ests[-1].setting.name, ests[-1].note)]
    assert laws.cbs["tokens"].n_points == 3


def test_compute_law():
    """CBS = c (N D)^0.3 is CBS = c' C^0.3 with C = 6 N D."""
    ests = [_estimate(n, d, 1e-4 * (n * d) ** 0.3) for n in GRID_N for d in GRID_D]
    law = fit_laws(ests).cbs["compute"]
    assert law.exponent == pytest.approx(0.3) and law.coefficient == pytest.approx(1e-4 / 6**0.3)
    assert law.x_range == (6 * 1e8 * 1e9, pytest.approx(6 * 1e9 * 1.6e10))


def test_version_1_entries_still_read():
    """scaling.json version 1 had no `response`, `weighted`, `identifiable` keys."""
    law = fit_power_law({"tokens": [1e9, 2e9, 4e9]}, [100.0, 140.0, 190.0], "cbs")
    old = {k: v for k, v in law_to_json(law).items() if k not in ("response", "weighted", "identifiable", "reason")}
    assert law_from_json(old) == law
