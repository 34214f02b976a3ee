"""Steps-to-target from horizon runs: runs of one (setting, batch, hyper-parameters) whose learning-rate schedule
decays (cosine, WSD) to its end at h x D tokens, one run per horizon h (`study.horizons`).

A decaying schedule's loss at step t depends on where the schedule ends, so no single run's eval curve gives the
steps to a target. What a horizon run measures is its FINAL loss L_i after S_i steps (the end of its schedule).
The steps-to-target at this batch is the shortest schedule whose final loss reaches the target T, interpolated
between the last horizon that misses (i-1) and the first that reaches it (i), linearly in (log S, L):

    log S* = log S_{i-1} + (L_{i-1} - T) / (L_{i-1} - L_i) * (log S_i - log S_{i-1})

(docs/method.md, "Decaying schedules"). If even the longest horizon misses, S* > S_longest: censored (right), a
lower bound like a constant-schedule run that never crossed (steps.py, "Censored fit" in docs/method.md). If the
shortest horizon already reaches T, S* <= S_shortest: the point enters the fit at S_shortest flagged as an upper
bound (`upper_bound`), so that the report says its S is at most that. The interpolation's bias (a final loss
that is convex in log S makes the chord overestimate S*) is measured in tests/test_horizons.py and
bench/horizon_bias.py: for a final loss L_inf + A (h D)^-alpha and horizons spaced by a ratio r it is at most
about alpha (ln r)^2 / 8 (1.8% for r = 2 at alpha = 0.3), never negative.

Pure Python: the study's runs are read by cbs/analysis/steps.py, which calls `estimate` per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

HORIZON_KEY = "horizon"
"""config.yaml `study.horizon` (written by `cbs study`): the run's schedule length in multiples of D."""
GROUP_KEY = "horizon_group"
"""config.yaml `study.horizon_group`: the runs that share it differ only in their horizon."""


@dataclass(frozen=True)
class HorizonRun:
    """One run of a horizon group: its horizon, the steps it trained (its schedule's end) and its final loss."""

    name: str
    horizon: float
    steps: float
    final_loss: Optional[float]
    """The eval loss after the last step; None when the run diverged, failed or stopped before its end."""


@dataclass(frozen=True)
class HorizonEstimate:
    """Steps-to-target of one horizon group (see the module docstring)."""

    steps: Optional[float]
    """Interpolated S*, or S_shortest when `upper_bound`; None when censored or without any final loss."""
    run_name: str = ""
    """The first run (shortest horizon) whose final loss reached the target."""
    censored_at: Optional[float] = None
    """Right-censored: the longest horizon's steps, whose final loss still missed (S* > this)."""
    upper_bound: bool = False
    """Left: the shortest horizon already reached the target (S* <= steps)."""


def interpolate_log_steps(steps_miss: float, loss_miss: float, steps_hit: float, loss_hit: float,
                          target: float) -> float:
    """S at which the chord from (log S_miss, L_miss) to (log S_hit, L_hit) reaches L = target
    (L_miss > target >= L_hit)."""
    frac = (loss_miss - target) / (loss_miss - loss_hit)
    return math.exp(math.log(steps_miss) + frac * (math.log(steps_hit) - math.log(steps_miss)))


def estimate(runs: Iterable[HorizonRun], target: float) -> HorizonEstimate:
    """Steps-to-target from the horizon runs of one group (runs without a final loss are skipped)."""
    usable = sorted((r for r in runs if r.final_loss is not None and math.isfinite(r.final_loss)),
                    key=lambda r: (r.steps, r.horizon))
    if not usable:
        return HorizonEstimate(None)
    first = next((i for i, r in enumerate(usable) if r.final_loss <= target), None)
    if first is None:
        return HorizonEstimate(None, censored_at=usable[-1].steps)
    hit = usable[first]
    if first == 0:
        return HorizonEstimate(hit.steps, hit.name, upper_bound=True)
    miss = usable[first - 1]
    return HorizonEstimate(interpolate_log_steps(miss.steps, miss.final_loss, hit.steps, hit.final_loss, target),
                           hit.name)


def final_loss(result: dict, kind: str) -> Optional[float]:
    """A completed run's final eval loss from result.json's `final` ({"eval/loss": x, "eval/loss_ewa/<tau>": y}):
    `raw`, the min over EWA decays (`ewa`), or the min of both (`best`) -- the weights the fit reads, which are
    also those the study took the target from. None unless the run completed at the end of its schedule."""
    if result.get("status") != "completed":
        return None
    total, steps = result.get("total_steps"), result.get("steps")
    if isinstance(total, int) and isinstance(steps, int) and steps < total:
        return None  # stopped before its schedule ended: its last loss is not the horizon's
    final = result.get("final") or {}
    raw = _number(final.get("eval/loss")) if isinstance(final, dict) else None
    ewa = [_number(v) for k, v in final.items() if k.startswith("eval/loss_ewa/")] if isinstance(final, dict) else []
    ewa_best = min((x for x in ewa if x is not None), default=None)
    choices = {"raw": [raw], "ewa": [ewa_best], "best": [raw, ewa_best]}[kind]
    return min((x for x in choices if x is not None), default=None)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    try:
        x = float(value)  # metrics write non-finite values as "nan"/"inf"
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def horizon_of(study: dict) -> Optional[tuple[float, str]]:
    """(horizon, group) of a run's config.yaml `study` block; None for a run without horizons."""
    horizon, group = study.get(HORIZON_KEY), study.get(GROUP_KEY)
    if horizon is None:
        return None
    if isinstance(horizon, bool) or not isinstance(horizon, (int, float)) or not horizon > 0 \
            or not isinstance(group, str) or not group:
        raise ValueError(f"study.{HORIZON_KEY} must be a number > 0 with a study.{GROUP_KEY} name: got "
                         f"{horizon!r}, {group!r}")
    return float(horizon), group
