"""Checks that decide whether one setting's S(B) fit may speak for a law: the study's pooled noise level of log S,
lack of fit of the hyperbola against it, and whether the sweep brackets the CBS and B_noise (docs/method.md,
"Diagnostics" and "What enters a law"). Pure functions of arrays; cbs/analysis/fit.py applies them per setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

SIGMA_FLOOR = 0.01
"""Smallest residual s.d. of log S any check or interval assumes: with 3 points per setting the estimate can be
~0, which would make a lower bound a wall and an interval a point; 1% is below any run-to-run spread we have
seen."""
LACK_OF_FIT_P = 0.01
"""Flag a setting whose residual variance exceeds the study's pooled one at this significance (F test)."""
MIN_POOLED_SETTINGS = 2
"""Other settings a pooled level must come from before a setting's residual size is judged against it."""
MONOTONE_Z = 3.0
"""Flag S(B) rising with B by more than this many s.d. of a difference of two points, sqrt(2) sigma: about one
false flag in 700 pairs of a flat S(B) under Gaussian noise."""


@dataclass(frozen=True)
class NoiseLevel:
    """Residual s.d. of log S pooled over settings, sigma^2 = sum_j RSS_j / sum_j (n_j - 2), with its dof.

    Run-to-run noise of log S is a property of the training recipe, not of one setting, so pooling its estimate
    over a study's settings replaces each setting's 1-2 dof estimate (3-4 batches) by one with 9-36 dof.
    """

    sigma: float
    dof: int
    settings: tuple[str, ...] = ()
    """The settings it was pooled over."""

    @property
    def scale(self) -> float:
        """sigma floored at SIGMA_FLOOR (what checks and intervals use)."""
        return max(self.sigma, SIGMA_FLOOR) if math.isfinite(self.sigma) else SIGMA_FLOOR

    def describe(self) -> str:
        return f"{self.sigma:.3g} ({self.dof} dof over {len(self.settings)} setting(s))"


def pooled_noise(parts: dict[str, tuple[float, int]], leave_out=()) -> NoiseLevel | None:
    """Pool {setting: (RSS of log S, n - 2)} over the settings not in `leave_out`; None without a dof."""
    keep = {k: v for k, v in parts.items() if k not in set(leave_out) and v[1] > 0}
    dof = sum(d for _, d in keep.values())
    if dof == 0:
        return None
    return NoiseLevel(math.sqrt(sum(r for r, _ in keep.values()) / dof), dof, tuple(sorted(keep)))


def lack_of_fit(batch: np.ndarray, log_steps: np.ndarray, fitted_log_steps: np.ndarray,
                noise: NoiseLevel | None) -> tuple[str, ...]:
    """Why the hyperbola does not describe this setting's reached points (empty: nothing found).

    Two checks against the pooled noise level sigma of the *other* settings (so that a bad setting does not hide
    behind its own residuals):
    - monotonicity: S(B) = S_min (1 + B_noise/B) decreases in B, so log S_j - log S_i > MONOTONE_Z sqrt(2) sigma
      for some B_j > B_i is a rise the noise does not explain (a U shape, a zig-zag, a run that failed late);
    - residual size: F = (RSS / (n - 2)) / sigma^2 against F(n - 2, dof of sigma), flagged at p < LACK_OF_FIT_P
      (the classical lack-of-fit test with the pure-error variance taken from replicate settings; Draper & Smith
      1998, Applied Regression Analysis, sec. 2.1).
    The residual-size check needs a level pooled over MIN_POOLED_SETTINGS other settings: with one, a disagreement
    between two settings cannot say which of them is off. Without a pooled level (a one-setting study) only the
    monotonicity check runs, at SIGMA_FLOOR.
    """
    order = np.argsort(batch)
    b, y = np.asarray(batch, float)[order], np.asarray(log_steps, float)[order]
    sigma = noise.scale if noise is not None else SIGMA_FLOOR
    out = []
    rises = y[None, :] - y[:, None]  # rises[i, j] = log S_j - log S_i
    rises[np.tril_indices(len(y))] = -np.inf  # only j > i (larger batch)
    i, j = np.unravel_index(np.argmax(rises), rises.shape)
    if rises[i, j] > MONOTONE_Z * math.sqrt(2) * sigma:
        out.append(f"not monotone: S(B={b[j]:g}) is {math.exp(rises[i, j]):.3g}x S(B={b[i]:g}), a rise of "
                   f"{rises[i, j] / sigma:.1f} noise s.d. (sigma {sigma:.3g}); S(B) cannot grow with B, check those "
                   "runs' targets and hyper-parameters")
    n = len(y)
    if noise is not None and n > 2 and len(noise.settings) >= MIN_POOLED_SETTINGS:
        rss = float(((np.asarray(log_steps, float) - fitted_log_steps) ** 2).sum())
        f = rss / (n - 2) / sigma ** 2
        p = float(stats.f.sf(f, n - 2, noise.dof))
        if p < LACK_OF_FIT_P:
            out.append(f"lack of fit: residual s.d. {math.sqrt(rss / (n - 2)):.3g} of log S against the other "
                       f"settings' pooled {noise.describe()} (F test p = {p:.2g}); the hyperbola does not describe "
                       "this S(B)")
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------------
# what a setting may contribute to the laws


def cbs_bound(cbs: float, observed_batches) -> str:
    """Why the CBS is only a one-sided bound ('' when the sweep brackets it: min B <= CBS <= max B).

    Beyond the largest batch the curve's bend is not measured: the CBS rests on the curvature of a few points
    that are still ~1/B, and noise alone puts it anywhere above (an unsaturated setting gets a finite CBS in
    about half of noisy draws). Such a setting says only CBS > max B.
    """
    lo, hi = float(min(observed_batches)), float(max(observed_batches))
    if cbs > hi:
        return (f"CBS {cbs:.4g} above the largest batch {hi:g}: only CBS > {hi:g} is measured (a lower bound); "
                "add larger batches")
    if cbs < lo:
        return f"CBS {cbs:.4g} below the smallest batch {lo:g}: only CBS < {lo:g} is measured (an upper bound)"
    return ""


def b_noise_bound(b_noise: float, observed_batches) -> str:
    """Why B_noise (and with it S_min, the other half of the same fit) is only a one-sided bound ('' if bracketed).

    Below the smallest batch S(B) is flat over the sweep and B_noise is any value under it (the fit often puts it
    at the search bound); above the largest, S(B) is ~1/B and S_min an extrapolation.
    """
    lo, hi = float(min(observed_batches)), float(max(observed_batches))
    if b_noise < lo:
        return (f"B_noise {b_noise:.4g} below the smallest batch {lo:g}: S is flat over the sweep, only "
                f"B_noise < {lo:g} is measured (an upper bound); add smaller batches")
    if b_noise > hi:
        return (f"B_noise {b_noise:.4g} above the largest batch {hi:g}: S ~ 1/B over the sweep, only "
                f"B_noise > {hi:g} is measured (a lower bound); add larger batches")
    return ""


def reference_batch_warning(reference_batch: float, observed_batches) -> str:
    """A B0 outside the measured batches anchors the linear-scaling line at an extrapolated S(B0)."""
    lo, hi = float(min(observed_batches)), float(max(observed_batches))
    if lo <= reference_batch <= hi:
        return ""
    return (f"reference batch B0={reference_batch:g} is outside the measured batches {lo:g}..{hi:g}: S(B0) is "
            "extrapolated from the fit and the CBS inherits that extrapolation; choose --reference-batch within "
            "the sweep")
