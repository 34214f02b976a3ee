"""The rules that turn one branch point's losses into a local CBS, and its interval under eval noise
(docs/method.md, "Branched local CBS"). Pure functions of (batch, loss, status) outcomes.

With the branches sorted by batch, b_1 < b_2 < ... < b_n, and L(b) a branch's final eval loss:

- `absolute` (Merrill et al. 2025, arXiv 2505.23971: the largest batch whose loss is within epsilon of every
  smaller batch's):

      b_j passes  iff  j = 1  or  L(b_j) <= min_{i<j} L(b_i) + epsilon + Z sqrt(2) sigma min_{i<j} L(b_i)
      CBS(t) = max { b_j : b_j passes }

  epsilon in nats. Every batch is judged, not only those after a pass: a batch that fails by noise does not hide
  a larger one that passes. sigma is the relative s.d. of one branch's eval loss (0: Merrill et al.'s rule as it
  stands); Z sqrt(2) sigma L is Z standard deviations of the difference of two losses, so a batch fails only
  when it is worse than a smaller one by more than epsilon and the excess is significant at the one-sided 5%
  level (Z = 1.645).
- `relative` (cbs's earlier rule): a chain, b_1 passes; b_j passes iff b_{j-1} passed and
  L(b_j) <= (1 + tolerance) min_{i<j} L(b_i); the first failure ends it.

Both: a diverged or failed branch, or a completed one with a non-finite loss, fails its batch and ends the search
(a batch that cannot train at its LR is past the CBS; larger ones are 'not needed'). An unfinished branch before
that makes the point incomplete: no CBS, only the lower bound passed below it. The interval [CBS, b_f) runs to the
next batch tried above the CBS (which failed), inf when the largest batch passes.

noise_interval gives a second interval that accounts for eval noise: a parametric bootstrap that redraws every
finite loss as L exp(sigma z), z ~ N(0, 1), applies the same rule, and takes the 2.5% and 97.5% quantiles of
the CBS. eval_noise estimates sigma from a run's eval curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cbs.runfiles import RESUMABLE, Status

UNFINISHED = Status.UNFINISHED
NOT_NEEDED = "not needed"
"""The verdict of a branch whose outcome cannot change its point's CBS; the study never trains it."""
RULES = ("absolute", "relative")
Z = 1.645
"""Standard deviations of a loss difference that eval noise may explain before a batch fails (absolute rule)."""
TIE = 1e-12
"""Relative slack on the comparison: 3.0 + 0.01 and 3.01 differ in the last bit, and a loss at the bound passes."""
DRAWS = 2000


@dataclass(frozen=True)
class Rule:
    """A rule and its parameters (module docstring)."""

    kind: str
    """'absolute' or 'relative'."""
    threshold: float
    """epsilon in nats (absolute) or the relative tolerance (relative)."""
    noise: float = 0.0
    """sigma, the relative s.d. of a branch's eval loss; the absolute rule's allowance (0: none)."""

    def bound(self, best_smaller: float) -> float:
        """The largest loss that passes against the best smaller batch's loss."""
        if self.kind == "relative":
            return (1.0 + self.threshold) * best_smaller * (1 + TIE)
        noise = self.noise if math.isfinite(self.noise) else 0.0
        return (best_smaller + self.threshold + Z * math.sqrt(2) * noise * best_smaller) * (1 + TIE)


Outcome = tuple[int, "float | None", str]
"""(batch, final loss or None, status) of one branch."""


def _is_unfinished(status: str) -> bool:
    return status == UNFINISHED or status in RESUMABLE


def _cannot_train(loss: float | None, status: str) -> bool:
    return loss is None or not math.isfinite(loss) or status != Status.COMPLETED


def judge(outcomes: list[Outcome], rule: Rule) -> tuple[list[str], float, float, float, bool]:
    """Judge one branch point's outcomes under `rule` (module docstring).

    Returns (verdict per outcome in batch order, cbs, cbs_low, cbs_high, complete); verdicts are 'pass', 'fail',
    'diverged' / 'failed', 'unfinished', 'pending' (absolute rule: judged once an unfinished smaller branch is
    done) or 'not needed' (after a branch that cannot train; relative rule: after the chain ended or stalled).
    """
    outcomes = sorted(outcomes, key=lambda o: o[0])
    verdicts: list[str] = []
    best, passed, high, state = math.inf, math.nan, math.nan, "open"
    for j, (batch, loss, status) in enumerate(outcomes):
        if state == "closed":
            verdicts.append(NOT_NEEDED)
        elif state == "incomplete":  # the relative chain resumes only if the unfinished branch passes
            verdicts.append("pending" if rule.kind == "absolute" else NOT_NEEDED)
        elif _is_unfinished(status):
            verdicts.append(UNFINISHED)
            state = "incomplete"
        elif _cannot_train(loss, status):
            verdicts.append(status if status in (Status.DIVERGED, Status.FAILED) else Status.DIVERGED)
            high = float(batch) if math.isnan(high) else high
            state = "closed"
        elif j == 0 or loss <= rule.bound(best):
            verdicts.append("pass")
            passed, high = float(batch), math.nan
        else:
            verdicts.append("fail")
            high = float(batch) if math.isnan(high) else high
            if rule.kind == "relative":
                state = "closed"
        if loss is not None and math.isfinite(loss) and state != "incomplete":
            best = min(best, loss)
    if state == "incomplete":
        return verdicts, math.nan, passed, math.nan, False
    return verdicts, passed, passed, (math.inf if math.isnan(high) else high), True


def noise_interval(outcomes: list[Outcome], rule: Rule, sigma: float, seed: int = 0,
                   draws: int = DRAWS) -> tuple[float, float]:
    """(low, high): the 2.5% and 97.5% quantiles of the CBS when every finite loss is redrawn as
    L exp(sigma z), z ~ N(0, 1) (a parametric bootstrap of eval noise; module docstring). (NaN, NaN) without a
    usable sigma > 0 or when the point has no CBS. Seeded: the same inputs give the same interval."""
    _, cbs, _, _, complete = judge(outcomes, rule)
    if not (complete and math.isfinite(cbs) and math.isfinite(sigma) and sigma > 0):
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    found = np.empty(draws)
    for d in range(draws):
        z = rng.standard_normal(len(outcomes))
        redrawn = [(b, loss * math.exp(sigma * z[i]) if loss is not None and math.isfinite(loss) else loss, s)
                   for i, (b, loss, s) in enumerate(outcomes)]
        found[d] = judge(redrawn, rule)[1]
    found = found[np.isfinite(found)]
    if found.size == 0:
        return math.nan, math.nan
    return float(np.quantile(found, 0.025, method="lower")), float(np.quantile(found, 0.975, method="higher"))


def eval_noise(steps: list[float], losses: list[float], skip_fraction: float = 0.1) -> float:
    """The relative s.d. sigma of a run's eval loss, from the jitter of its eval curve.

    With l_k = log L at eval step s_k (the first `skip_fraction` of the run left out: the fast early drop is
    curvature, not noise), each interior eval is compared with the straight line in (log s, l) through its two
    neighbours: r_k = l_k - ((1 - w) l_{k-1} + w l_{k+1}), w = (log s_k - log s_{k-1}) / (log s_{k+1} - log s_{k-1}).
    For independent noise of s.d. sigma on each l, r_k has s.d. sigma sqrt(1 + (1 - w)^2 + w^2); sigma is
    1.4826 x the median |r_k| / sqrt(1 + (1 - w)^2 + w^2) (the MAD: robust to the odd spike). NaN with fewer than
    5 residuals. The jitter of one run's successive evals stands for the spread between branches evaluated on the
    same set after different trajectories; it is an approximation (`cbs fit --eval-noise` overrides it).
    """
    pairs = sorted((s, v) for s, v in zip(steps, losses) if s > 0 and v is not None and math.isfinite(v) and v > 0)
    if not pairs:
        return math.nan
    last = pairs[-1][0]
    pairs = [(s, v) for s, v in pairs if s >= skip_fraction * last]
    if len(pairs) < 7:
        return math.nan
    x, y = np.log([s for s, _ in pairs]), np.log([v for _, v in pairs])
    w = (x[1:-1] - x[:-2]) / (x[2:] - x[:-2])
    r = y[1:-1] - ((1 - w) * y[:-2] + w * y[2:])
    return float(1.4826 * np.median(np.abs(r) / np.sqrt(1 + (1 - w) ** 2 + w ** 2)))
