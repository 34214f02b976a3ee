"""Horizons: how a study measures steps-to-target for a learning-rate schedule that decays (cosine, WSD).

A decaying schedule ends at its run's own length, so a run's loss at step t depends on that length (its horizon):
one run trained to the largest budget cannot serve smaller ones, and the step where its curve crosses a target is
not the steps-to-target of a run scheduled to end there. A study with `study.horizons: [h1, h2, ...]` (multiples
of the setting's data budget D) therefore trains, per (setting, batch, lr, beta2, seed), one run per horizon h,
its schedule decaying to its end at h x D tokens; the fit reads the FINAL loss of each and interpolates the steps
at which the target is reached between horizons (cbs/analysis/horizons.py; docs/method.md, "Decaying schedules").

Pure planning, torch-free: `needs_horizons` decides from a run's resolved schedule (the study's base, or a
variant's keys over it), so a constant-schedule run in the same study is planned as before.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

from cbs.analysis.horizons import GROUP_KEY, HORIZON_KEY
from cbs.pipeline.config import ConfigError, ScheduleConfig, ScheduleKind


def needs_horizons(schedule: Any) -> bool:
    """Whether a run with this learning-rate schedule (a ScheduleConfig, or its mapping as in a pretrain config;
    None: the default, constant) needs horizons: its LR decays over the run's own length (cosine or wsd ending
    below the peak). A cosine or wsd with final_lr_factor 1 never decays and is read like a constant one."""
    if schedule is None:
        return False
    if isinstance(schedule, ScheduleConfig):
        kind, final = schedule.kind, schedule.final_lr_factor
    elif isinstance(schedule, dict):
        kind, final = schedule.get("kind", ScheduleKind.constant.value), schedule.get("final_lr_factor", 0.0)
    else:
        raise TypeError(f"a schedule config or mapping, not {type(schedule).__name__}")
    kind = ScheduleKind(kind.value if isinstance(kind, ScheduleKind) else kind)
    return kind is not ScheduleKind.constant and float(final) < 1.0


def check_horizons(horizons: Optional[Sequence[float]], decays: bool, kind: str, where: str = "study.base") -> None:
    """Refuse a decaying schedule without horizons and horizons where no run decays (exit 2 via ConfigError).

    `decays`: whether any run of the study decays (`needs_horizons` of its resolved schedule); `kind`: a decaying
    schedule's kind, for the message; `where`: the key that set it."""
    if decays and not horizons:
        raise ConfigError(
            f"{where}.schedule.kind is {kind}: a {kind} schedule decays over each run's own length, so one run "
            f"cannot serve every budget and steps-to-target cannot be read off one curve; give study.horizons "
            f"(e.g. [0.5, 1, 2, 4]: one run per horizon h, its schedule ending at h x D tokens, S(B) interpolated "
            f"between their final losses), or set {where}.schedule.kind: constant (the paper's method, with EWA)")
    if horizons and not decays:
        raise ConfigError(
            f"study.horizons is given but no run's schedule decays (horizons on a constant schedule): a constant "
            f"LR reads every budget off one run; remove study.horizons, or set {where}.schedule.kind to cosine or wsd")


def check_warmup(horizons: Sequence[float], warmup_tokens: int, budgets: dict[str, int]) -> None:
    """The warmup must end before the shortest horizon does: otherwise that run's schedule would end mid-warmup
    (its decay never starts). `budgets`: {setting name: D}."""
    for name, tokens in budgets.items():
        shortest = int(round(min(horizons) * tokens))
        if warmup_tokens >= shortest:
            raise ConfigError(
                f"study.horizons: the shortest horizon ({min(horizons):g} x D = {shortest} tokens of setting {name}) "
                f"ends inside the warmup ({warmup_tokens} tokens); use longer horizons or a shorter "
                f"schedule.warmup_tokens")


def horizon_name(name: str, horizon: float) -> str:
    """A run's name with its horizon: `..._lr0.003_h0.5`."""
    return f"{name}_h{horizon:g}"


def horizon_tokens(horizon: float, budget_tokens: int) -> int:
    """The tokens a run of horizon h trains (its schedule's end): round(h x D), at least 1."""
    return max(1, int(round(horizon * budget_tokens)))


def expand(run: Any, horizons: Sequence[float]) -> list:
    """One copy of a planned run (study_plan.Run, serving one setting) per horizon: named with the horizon, trained
    h x D tokens, `horizon` set; only the horizon-1 copy stays a reference run (the target is its final loss)."""
    if len(run.settings) != 1:
        raise ValueError("a run with horizons serves one setting (one_sweep does not apply to horizons)")
    budget = run.settings[0].tokens
    return [dataclasses.replace(run, name=horizon_name(run.name, h), train_tokens=horizon_tokens(h, budget),
                                reference=run.reference and math.isclose(h, 1.0), horizon=float(h),
                                settings=list(run.settings), config={})
            for h in horizons]


def study_keys(run: Any) -> dict:
    """What a horizon run adds to config.yaml's `study` block (read back by cbs/analysis/horizons.py)."""
    if getattr(run, "horizon", None) is None:
        return {}
    return {HORIZON_KEY: run.horizon, GROUP_KEY: run.name.rsplit("_h", 1)[0]}
