"""Bias of steps-to-target interpolated between horizon runs (cbs/analysis/horizons.py), on a known truth.

At a fixed batch, a run of horizon h trains S = h S_1 steps and ends at a final loss L(h) = L_inf + A (h D)^-alpha.
The true steps to a target T solve L(h*) = T; the study interpolates linearly in (log S, L) between the horizons
that bracket T. For each data exponent alpha and horizon grid, this prints the largest and the mean relative error
S_interp / S_true - 1 over targets spread evenly (in log S) across the grid. The error depends on alpha and the
grid's ratio r only (in u = log S, L is L_inf + c exp(-alpha u)); to first order its maximum is alpha (ln r)^2 / 8.

    python bench/horizon_bias.py        (a second; pure Python)
"""

from __future__ import annotations

import math

from cbs.analysis.horizons import HorizonRun, estimate

L_INF, AMPLITUDE, BUDGET_TOKENS, STEPS_AT_D = 2.0, 40.0, 1e8, 1000.0
GRIDS = {"[1, 4] (r 4)": [1, 4], "[0.5, 1, 2, 4] (r 2)": [0.5, 1, 2, 4],
         "r sqrt 2, 0.5..4": [0.5 * 2 ** (k / 2) for k in range(7)],
         "r 2^(1/4), 0.5..4": [0.5 * 2 ** (k / 4) for k in range(13)]}
ALPHAS = (0.1, 0.28, 0.5, 1.0)


def final_loss(h: float, alpha: float) -> float:
    return L_INF + AMPLITUDE * (h * BUDGET_TOKENS) ** -alpha


def errors(grid: list[float], alpha: float, targets: int = 500) -> list[float]:
    """S_interp / S_true - 1 at `targets` true horizons evenly spaced in log h strictly inside the grid."""
    runs = [HorizonRun(f"h{h:g}", h, h * STEPS_AT_D, final_loss(h, alpha)) for h in grid]
    lo, hi = math.log(grid[0]), math.log(grid[-1])
    out = []
    for i in range(1, targets):
        h_true = math.exp(lo + (hi - lo) * i / targets)
        est = estimate(runs, final_loss(h_true, alpha))
        out.append(est.steps / (h_true * STEPS_AT_D) - 1)
    return out


def main() -> None:
    print(f"{'grid':<22} {'alpha':>5} {'max bias':>9} {'mean bias':>9} {'alpha ln(r)^2/8':>15}")
    for name, grid in GRIDS.items():
        ratio = grid[1] / grid[0]
        for alpha in ALPHAS:
            e = errors(grid, alpha)
            assert min(e) > -1e-12  # never below the truth
            print(f"{name:<22} {alpha:>5.2f} {max(e):>9.2%} {sum(e) / len(e):>9.2%} "
                  f"{alpha * math.log(ratio) ** 2 / 8:>15.2%}")


if __name__ == "__main__":
    main()
