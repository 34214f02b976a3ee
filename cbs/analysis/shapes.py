"""Width vs depth: the CBS of settings of one data budget whose models have (near-)equal non-embedding size N but
another shape (layers L, width d), and their ratio with an interval.

Which settings: the same D, N within SAME_N_TOLERANCE of each other (relative to the smaller), both shapes known
and different (a width-scaled and a depth-scaled model of one family: `model.scale`, docs/method.md, "Width vs
depth"). Each pair is reported once, the wider model first: ratio = CBS(wider) / CBS(deeper).

Ratio interval: MOVER on the log scale (Zou & Donner 2008, Stat. Med. 27:1693, "method of variance estimates
recovery"): with each CBS's interval [l_i, u_i] about its estimate c_i taken as independent (two models, two sets
of runs), log r = log c_1 - log c_2 and

    lower = log r - sqrt((log c_1 - log l_1)^2 + (log u_2 - log c_2)^2),
    upper = log r + sqrt((log u_1 - log c_1)^2 + (log c_2 - log l_2)^2),

which recovers each interval's own (possibly asymmetric) half-widths instead of assuming symmetric normal errors.
An infinite upper limit of the wider model's CBS makes the upper limit infinite (of the deeper's: the lower 0).
It is as good as the per-setting intervals (parametric bootstrap, cbs/analysis/fit.py) and their independence:
the two share the study's pooled noise scale, a small common part the formula ignores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cbs.analysis.fit import CbsEstimate

SAME_N_TOLERANCE = 0.05
"""Two models count as the same size when their N differ by at most this share (width k vs depth k^2 of one
model have the same N = 12 L d^2 exactly; other shapes may come close)."""


@dataclass(frozen=True)
class ShapeComparison:
    """Two settings of one D and (near-)equal N: the wider model and the deeper one."""

    wide: CbsEstimate
    deep: CbsEstimate
    ratio: float
    """CBS(wide) / CBS(deep)."""
    ratio_ci: tuple[float, float]
    """MOVER interval (module docstring); NaN when either CBS has no interval."""


def mover_ratio(c1: float, ci1: tuple[float, float], c2: float, ci2: tuple[float, float]) -> tuple[float, float]:
    """The interval of c1 / c2 from independent intervals of c1 and c2 (MOVER on the log scale, module docstring).
    Limits <= 0 or infinite are handled as bounds: a lower limit of 0 is log -inf."""
    if not all(math.isfinite(v) and v > 0 for v in (c1, c2)) or any(math.isnan(v) for v in (*ci1, *ci2)):
        return math.nan, math.nan

    def log(v: float) -> float:
        return math.log(v) if v > 0 else -math.inf

    lr = log(c1) - log(c2)
    down = math.hypot(log(c1) - log(ci1[0]), log(ci2[1]) - log(c2))
    up = math.hypot(log(ci1[1]) - log(c1), log(c2) - log(ci2[0]))
    return math.exp(lr - down), math.exp(lr + up)


def same_size(n1: int, n2: int, tolerance: float = SAME_N_TOLERANCE) -> bool:
    return abs(n1 - n2) <= tolerance * min(n1, n2)


def width_vs_depth(estimates: list[CbsEstimate], tolerance: float = SAME_N_TOLERANCE) -> list[ShapeComparison]:
    """Every pair of fitted settings with the same D, N within `tolerance` and different known shapes, wider first;
    ordered by D, then N, then the wider model's width."""
    fitted = [e for e in estimates if e.fitted and e.setting.shape is not None]
    out = []
    for i, a in enumerate(fitted):
        for b in fitted[i + 1:]:
            sa, sb = a.setting, b.setting
            if sa.tokens != sb.tokens or sa.shape == sb.shape or not same_size(sa.model_params, sb.model_params,
                                                                               tolerance):
                continue
            wide, deep = (a, b) if (sa.hidden, -sa.layers) > (sb.hidden, -sb.layers) else (b, a)
            out.append(ShapeComparison(wide, deep, wide.cbs / deep.cbs,
                                       mover_ratio(wide.cbs, wide.cbs_ci, deep.cbs, deep.cbs_ci)))
    return sorted(out, key=lambda c: (c.wide.setting.tokens, c.wide.setting.model_params, c.wide.setting.hidden,
                                      c.deep.setting.layers))
