"""Everything `cbs fit` computes for a branched study: CBS(t) per setting, the base run's B_simple along t, the
comparison with a sweep, and the warnings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cbs.analysis.branch_rules import eval_noise
from cbs.analysis.branched import BranchedStudy, LocalCbs, RuleChoice, cbs_curve
from cbs.analysis.compare import MATCH, Comparison, SweepCbs, compare
from cbs.analysis.noise_scale import BSimple, b_simple_along, b_simple_near
from cbs.analysis.run_metrics import MetricsReader, NoisePoint


@dataclass
class BranchedFit:
    study: BranchedStudy
    points: list[LocalCbs]
    noise: dict[str, list[NoisePoint]] = field(default_factory=dict)
    """Setting name -> the noise-scale readings its base run logged, in file order."""
    noise_logged: bool = False
    """Whether any base run logged train/noise_scale at all (finite or not)."""
    sweep: list[SweepCbs] = field(default_factory=list)
    sweep_source: str | None = None
    comparison: list[Comparison] = field(default_factory=list)

    def points_of(self, name: str) -> list[LocalCbs]:
        return [p for p in self.points if p.setting.name == name]

    def b_simple_at(self, point: LocalCbs) -> BSimple | None:
        """The base run's B_simple over its readings within noise_scale.NEAR of the branch point t."""
        return b_simple_near([self.noise.get(point.setting.name, [])], point.tokens, "base run")

    def b_simple_along(self, name: str) -> list[tuple[int, float]]:
        """(tokens, B_simple) along the setting's base run (cbs/analysis/noise_scale.py, b_simple_along)."""
        return b_simple_along(self.noise.get(name, []))


def base_eval_noise(study: BranchedStudy, reader: MetricsReader) -> dict[str, float]:
    """Setting name -> sigma from its base run's eval curve of the loss kind compared (branch_rules.eval_noise):
    raw `eval/loss`, the min over the EWA decays, or the lower of the two ('best')."""
    out = {}
    for name, path in study.base_runs.items():
        steps, losses = [], []
        for step, raw, ewa in reader.evals(path):
            candidates = {"raw": [raw], "ewa": [ewa], "best": [raw, ewa]}[study.loss_kind]
            finite = [v for v in candidates if v is not None]
            if finite:
                steps.append(step)
                losses.append(min(finite))
        out[name] = eval_noise(steps, losses)
    return out


def fit_branched(study: BranchedStudy, choice: RuleChoice = RuleChoice(), sweep: list[SweepCbs] | None = None,
                 sweep_source: str | None = None) -> BranchedFit:
    reader = MetricsReader()
    logged = {name: reader.points(path) for name, path in study.base_runs.items()}
    points = cbs_curve(study, choice, base_eval_noise(study, reader))
    return BranchedFit(study, points, logged, any(logged.values()), sweep or [], sweep_source,
                       compare(points, sweep or []))


def branched_warnings(fit: BranchedFit) -> list[str]:
    out = []
    for p in fit.points:
        where = f"{p.setting.name} at t = {p.tokens:,} tokens"
        if not p.complete:
            out.append(f"{where}: incomplete, no CBS (branches not finished: {', '.join(p.missing)}); finish them "
                       "(`cbs study` resumes) and fit again")
        elif math.isnan(p.cbs):
            out.append(f"{where}: no batch passes, the branch at the smallest batch {p.verdicts[0].verdict}; check "
                       "the base learning rate")
        elif math.isinf(p.cbs_high):
            out.append(f"{where}: every batch passes, CBS(t) >= {p.cbs:g} (a lower bound); add larger batches")
    for name in fit.study.settings:
        mine = [p for p in fit.points_of(name) if math.isfinite(p.cbs)]
        if len(mine) >= 2 and all(p.cbs == p.verdicts[0].batch for p in mine):
            out.append(f"{name}: CBS(t) is the smallest batch at every t: the curve is below the batches tried; "
                       "branch from a smaller base batch, or raise the tolerance")
    if fit.study.base_runs and not fit.noise_logged:
        out.append("no base run logged train/noise_scale: B_simple needs two batch sizes in one step, i.e. >= 2 "
                   "micro-batches (gradient accumulation) or >= 2 data-parallel ranks, and the base runs had a "
                   "single micro-batch on a single rank")
    if fit.sweep_source and not fit.comparison:
        out.append(f"--compare {fit.sweep_source}: no sweep setting has the same N and a D within {MATCH:.0%} of a "
                   "branch point t: nothing compared")
    return out
