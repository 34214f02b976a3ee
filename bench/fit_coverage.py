"""Bias and coverage of the fit on simulated studies with a known law (not a test; prints the figures that
docs/method.md quotes, "Coverage of the fit").

Truth: CBS = c D^0.45 N^0.10 (B0 = 64, o = 0.2, so B_noise = (CBS - 1.2 B0) / 0.2) on a 3 x 3 grid of settings,
S(B) = S_min (1 + B_noise/B) with log-normal run-to-run noise of s.d. `--noise` on every S(B). Designs:
- grid: N in {1e8, 3e8, 1e9} x D in {1e9, 4e9, 1.6e10} (log D and log N independent);
- collinear: the same N x D/N in {14, 20, 28} (near the Chinchilla design D = 20 N; R^2 of log D on log N ~0.9,
  the joint law still identifiable but its exponents inflated).
Batches: 3 (64, 512, 4096) or 6 (64 .. 4096, x2.3). Censoring: each setting's runs stop at a token budget 1.1x
what the largest batch needs on the true curve, so a noisy draw above it is a lower bound S > cap (mostly at the
largest batch). Every replicate goes through `fit_settings` and `fit_laws`, as `cbs fit --reference-batch 64`.

Printed per scenario: CBS (all fitted settings): median log(est/true) and coverage of the 95% interval; the share
of settings that enter the CBS laws; joint-law exponents a (D) and b (N), plain OLS and weighted: mean bias, s.d.
and coverage of the 95% t intervals ("-" where the weighted laws were not fitted).

    .venv/bin/python bench/fit_coverage.py [--replicates 100] [--bootstrap 200] [--noise 0.1]
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cbs.analysis.fit import critical_batch_size, fit_settings, steps_model  # noqa: E402
from cbs.analysis.laws import fit_laws  # noqa: E402
from cbs.analysis.steps import Setting, StepsPoint  # noqa: E402

A_TRUE, B_TRUE, B0, OVERHEAD = 0.45, 0.10, 64.0, 0.2
C_TRUE = 1.9e-3  # CBS ~135 .. 760 over the designs: every B_noise (290 .. 3400) inside 64 .. 4096
N_GRID = (1e8, 3e8, 1e9)
D_GRID = (1e9, 4e9, 1.6e10)
RATIOS = (14.0, 20.0, 28.0)
BATCHES = {3: np.array([64.0, 512.0, 4096.0]), 6: np.round(np.geomspace(64, 4096, 6))}
S_MIN = 1000.0
TOKEN_SLACK = 1.1


def design(kind: str) -> list[Setting]:
    pairs = itertools.product(N_GRID, D_GRID) if kind == "grid" else ((n, k * n) for n in N_GRID for k in RATIOS)
    return [Setting(f"n{n:.0e}_d{d:.1e}", int(n), int(d)) for n, d in pairs]


def true_cbs(s: Setting) -> float:
    return C_TRUE * s.tokens ** A_TRUE * s.model_params ** B_TRUE


def draw_points(s: Setting, batch: np.ndarray, noise: float, censor: bool, rng) -> list[StepsPoint]:
    b_noise = (true_cbs(s) - (1 + OVERHEAD) * B0) / OVERHEAD
    truth = steps_model(batch, S_MIN, b_noise)
    steps = truth * np.exp(rng.normal(0, noise, len(batch)))
    caps = truth[-1] * batch[-1] * TOKEN_SLACK / batch if censor else np.full(len(batch), np.inf)
    return [StepsPoint(s, int(b), float(v), 1) if v <= cap else StepsPoint(s, int(b), None, 1, censored_at_steps=cap)
            for b, v, cap in zip(batch, steps, caps)]


class Tally:
    """Running sums of one scenario."""

    def __init__(self):
        self.cbs_err, self.cbs_hit, self.in_laws = [], [], []
        self.exps = {k: [] for k in ("plain", "weighted")}  # (a, b, a covered, b covered)

    def add_estimates(self, estimates):
        for e in estimates:
            if not e.fitted:
                self.in_laws.append(False)
                continue
            truth = true_cbs(e.setting)
            self.cbs_err.append(math.log(e.cbs / truth))
            self.cbs_hit.append(e.cbs_ci[0] <= truth <= e.cbs_ci[1])
            self.in_laws.append(not e.cbs_exclusion)

    def add_law(self, kind: str, law):
        if law is None or not law.identifiable or law.df_resid < 1:
            return
        (a_lo, a_hi), (b_lo, b_hi) = law.exponents_ci["tokens"], law.exponents_ci["model_params"]
        a, b = law.exponents["tokens"], law.exponents["model_params"]
        self.exps[kind].append((a, b, a_lo <= A_TRUE <= a_hi, b_lo <= B_TRUE <= b_hi))

    def row(self) -> list[str]:
        cells = [f"{np.median(self.cbs_err):+.3f}", f"{np.mean(self.cbs_hit):.2f}", f"{np.mean(self.in_laws):.2f}"]
        for kind in ("plain", "weighted"):
            v = np.array(self.exps[kind], float)
            if len(v) == 0:
                cells += ["-"] * 6
                continue
            cells += [f"{v[:, 0].mean() - A_TRUE:+.3f}", f"{v[:, 0].std():.3f}", f"{v[:, 2].mean():.2f}",
                      f"{v[:, 1].mean() - B_TRUE:+.3f}", f"{v[:, 1].std():.3f}", f"{v[:, 3].mean():.2f}"]
        return cells


def run_scenario(kind: str, n_batches: int, censor: bool, args) -> Tally:
    settings, batch, tally = design(kind), BATCHES[n_batches], Tally()
    rng = np.random.default_rng([args.seed, n_batches, censor, kind == "grid"])
    for rep in range(args.replicates):
        points = {s.name: draw_points(s, batch, args.noise, censor, rng) for s in settings}
        estimates = fit_settings(points.get, settings, OVERHEAD, B0, args.bootstrap, seed=rep)
        laws = fit_laws(estimates)
        tally.add_estimates(estimates)
        tally.add_law("plain", laws.cbs.get("joint"))
        tally.add_law("weighted", laws.cbs_weighted.get("joint"))
    return tally


HEADER = ["design", "batches", "censored", "CBS log-bias", "CBS cover", "in laws",
          "a bias", "a sd", "a cover", "b bias", "b sd", "b cover",
          "wa bias", "wa sd", "wa cover", "wb bias", "wb sd", "wb cover"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicates", type=int, default=100)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--noise", type=float, default=0.1, help="s.d. of log S per batch point")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    start = time.perf_counter()
    print(f"truth CBS = {C_TRUE:g} D^{A_TRUE} N^{B_TRUE}, B0 {B0:g}, o {OVERHEAD}, noise {args.noise}, "
          f"{args.replicates} replicates, {args.bootstrap} resamples; 95% intervals")
    print("| " + " | ".join(HEADER) + " |\n|" + " --- |" * len(HEADER))
    for kind, n_batches, censor in itertools.product(("grid", "collinear"), (3, 6), (False, True)):
        tally = run_scenario(kind, n_batches, censor, args)
        print("| " + " | ".join([kind, str(n_batches), "yes" if censor else "no"] + tally.row()) + " |", flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
