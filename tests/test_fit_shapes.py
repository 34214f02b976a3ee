"""Width vs depth in the fit: settings of one D and equal N but another shape, on synthetic S(B) with a known CBS.

The truth: a wide and a deep model of the same N at the same D whose S(B) follow S_min (1 + B_noise/B) with known
B_noise, hence known CBS and ratio. The comparison must pair exactly them, estimate the ratio, and its MOVER
interval must cover the true ratio about as often as it claims. End to end from a steps CSV (with the optional
layers/hidden columns) to report.md and cbs.csv; and the shape read from a study run's config.yaml.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest

from cbs.analysis.fit import critical_batch_size, fit_settings, steps_model
from cbs.analysis.outputs import cbs_csv
from cbs.analysis.report import report_md
from cbs.analysis.shapes import mover_ratio, width_vs_depth
from cbs.analysis.steps import Setting, StepsPoint, _run_settings, load_steps
from cbs.analysis.study_fit import fit_study

BATCHES = 64 * 2 ** np.arange(6)
B0, O = 64.0, 0.2
N, D = 12 * 2 * 256**2, 10_000_000  # tiny width x 2 = tiny depth x 4
WIDE = Setting("wide", N, D, layers=2, hidden=256)
DEEP = Setting("deep", N, D, layers=8, hidden=128)
TRUE = {"wide": (1000.0, 800.0), "deep": (1500.0, 300.0)}  # (S_min, B_noise)
TRUE_RATIO = critical_batch_size(800.0, B0, O) / critical_batch_size(300.0, B0, O)  # 236.8 / 136.8


def synthetic(rng: np.random.Generator, noise: float, settings=(WIDE, DEEP)) -> list[StepsPoint]:
    points = []
    for s in settings:
        s_min, b_noise = TRUE[s.name] if s.name in TRUE else TRUE["deep"]
        steps = steps_model(BATCHES, s_min, b_noise) * np.exp(noise * rng.standard_normal(len(BATCHES)))
        points += [StepsPoint(s, int(b), float(v), 1) for b, v in zip(BATCHES, steps)]
    return points


def fit(points, n_resamples=400, seed=0):
    settings = sorted({p.setting for p in points}, key=lambda s: s.name)
    of = lambda name: sorted((p for p in points if p.setting.name == name), key=lambda p: p.batch_size)  # noqa: E731
    return fit_settings(of, settings, O, B0, n_resamples, seed)


def test_mover_ratio_arithmetic():
    """Symmetric log intervals: the half-width is the root sum of squares of the two; bounds stay bounds."""
    e = math.exp
    lo, hi = mover_ratio(10.0, (10 / e(0.3), 10 * e(0.3)), 5.0, (5 / e(0.4), 5 * e(0.4)))
    assert (lo, hi) == (pytest.approx(2 / e(0.5)), pytest.approx(2 * e(0.5)))
    lo, hi = mover_ratio(10.0, (8.0, 20.0), 5.0, (4.0, 6.0))  # asymmetric: lower uses l1 and u2, upper u1 and l2
    assert lo == pytest.approx(2 * e(-math.hypot(math.log(10 / 8), math.log(6 / 5))))
    assert hi == pytest.approx(2 * e(math.hypot(math.log(20 / 10), math.log(5 / 4))))
    assert mover_ratio(10.0, (8.0, math.inf), 5.0, (4.0, 6.0))[1] == math.inf
    assert mover_ratio(10.0, (8.0, 12.0), 5.0, (0.0, 6.0))[1] == math.inf
    assert all(math.isnan(v) for v in mover_ratio(10.0, (math.nan, math.nan), 5.0, (4.0, 6.0)))


def test_noiseless_pair_recovers_the_true_ratio():
    (pair,) = width_vs_depth(fit(synthetic(np.random.default_rng(0), 0.0), n_resamples=0))
    assert (pair.wide.setting.name, pair.deep.setting.name) == ("wide", "deep")
    assert pair.ratio == pytest.approx(TRUE_RATIO, rel=1e-6)
    assert all(math.isnan(v) for v in pair.ratio_ci)  # no bootstrap, no interval


def test_ratio_interval_covers_the_truth():
    """40 noisy studies (3% noise on log S): the 95% interval covers the true ratio in >= 85% of them (the
    per-setting intervals are t-expanded percentile intervals, cbs/analysis/fit.py), and is not vacuous."""
    rng, covered, widths = np.random.default_rng(1), 0, []
    for i in range(40):
        (pair,) = width_vs_depth(fit(synthetic(rng, 0.03), n_resamples=300, seed=i))
        lo, hi = pair.ratio_ci
        covered += lo <= TRUE_RATIO <= hi
        widths.append(hi / lo)
    assert covered >= 34, covered
    assert np.median(widths) < 3, np.median(widths)


def test_only_same_d_equal_n_different_shape_pairs():
    """Another D, another N (beyond 5%), the same shape, or an unknown shape: no pair."""
    others = [Setting("other_d", N, 2 * D, layers=8, hidden=128), Setting("other_n", 2 * N, D, layers=4, hidden=256),
              Setting("same_shape", N, D, layers=2, hidden=256), Setting("no_shape", N, D),
              Setting("near_n", int(N * 1.04), D, layers=5, hidden=160)]
    pairs = width_vs_depth(fit(synthetic(np.random.default_rng(2), 0.0, (WIDE, DEEP, *others)), n_resamples=0))
    names = sorted((p.wide.setting.name, p.deep.setting.name) for p in pairs)
    assert names == sorted([("wide", "deep"), ("same_shape", "deep"), ("wide", "near_n"), ("same_shape", "near_n"),
                            ("near_n", "deep")])


def write_csv(path, points, shapes=True):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "model_params", "tokens", "batch_size", "steps"] + (["layers", "hidden"] if shapes
                                                                                   else []))
        for p in points:
            s = p.setting
            w.writerow([s.name, s.model_params, s.tokens, p.batch_size, p.steps]
                       + ([s.layers, s.hidden] if shapes else []))
    return path


def test_report_and_cbs_csv_from_a_steps_csv(tmp_path):
    points = synthetic(np.random.default_rng(3), 0.02)
    study = fit_study(load_steps(write_csv(tmp_path / "steps.csv", points)), O, B0, n_resamples=200)
    report = report_md(study).decode()
    assert "## Width vs depth" in report
    (pair,) = width_vs_depth(study.estimates)
    row = next(line for line in report.splitlines() if line.startswith("| 10,000,000 | wide"))
    assert "2 x 256" in row and "8 x 128" in row and f"{pair.ratio:.3g}" in row
    rows = list(csv.DictReader(io.StringIO(cbs_csv(study).decode())))
    assert {(r["setting"], r["layers"], r["hidden"]) for r in rows} == {("wide", "2", "256"), ("deep", "8", "128")}
    # without the shape columns the report has no such section (N alone cannot tell the models apart)
    plain = fit_study(load_steps(write_csv(tmp_path / "plain.csv", points, shapes=False)), O, B0, n_resamples=0)
    assert "Width vs depth" not in report_md(plain).decode()


def test_study_run_config_gives_the_shape(tmp_path):
    config = {"model": {"layers": 8, "hidden": 128, "seq_len": 64},
              "study": {"settings": [{"name": "deep", "model_params": N, "tokens": D, "target_loss": 4.0}]}}
    (s,) = _run_settings(config, tmp_path / "config.yaml", {})
    assert s.shape == (8, 128)
    (s,) = _run_settings({"study": config["study"]}, tmp_path / "config.yaml", {})  # an older config: unknown
    assert s.shape is None
