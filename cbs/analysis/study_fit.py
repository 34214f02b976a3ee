"""Everything `cbs fit` computes for a study: per-setting fits, the laws over settings, time and cost to target,
and the warnings that say where the numbers are weaker than their intervals."""

from __future__ import annotations

from dataclasses import dataclass, field

from cbs.analysis import InputError
from cbs.analysis.cost import ThroughputModel, TimeToTarget, time_rows
from cbs.analysis.fit import DEGRADATION_OVERHEADS, LEVEL, CbsEstimate, fit_settings
from cbs.analysis.laws import SYMBOLS, LawSet, fit_laws
from cbs.analysis.noise_scale import BSimple, sweep_b_simple
from cbs.analysis.run_metrics import MetricsReader
from cbs.analysis.steps import StepsTable

EXPONENT_GAP = 0.05
"""Warn when the CBS law's exponent and the B_noise law's differ by more than this (the (1+o)B0 floor)."""


@dataclass
class StudyFit:
    table: StepsTable
    estimates: list[CbsEstimate]
    laws: LawSet
    overhead: float
    reference_batch: float | None
    """As given on the command line; None = each setting's smallest batch."""
    n_resamples: int
    seed: int
    level: float = LEVEL
    overheads: tuple[float, ...] = DEGRADATION_OVERHEADS
    throughput: ThroughputModel = field(default_factory=lambda: ThroughputModel(()))
    times: list[TimeToTarget] = field(default_factory=list)
    gpu_budget: int | None = None
    seq_len: int | None = None
    time_note: str = ""
    """Why there is no time/cost table (empty when there is one)."""
    b_simple: dict[str, BSimple] = field(default_factory=dict)
    """Setting name -> the gradient noise scale the runs logged at its budget (cbs/analysis/noise_scale.py)."""
    noise_logged: bool = False
    """Whether any run logged train/noise_scale at all."""

    def times_of(self, name: str) -> list[TimeToTarget]:
        return [r for r in self.times if r.setting == name]


def fit_study(table: StepsTable, overhead: float = 0.2, reference_batch: float | None = None,
              n_resamples: int = 1000, seed: int = 0, level: float = LEVEL, overheads=None,
              throughput: ThroughputModel | None = None, gpu_budget: int | None = None,
              seq_len: int | None = None, metrics: MetricsReader | None = None) -> StudyFit:
    """Every setting's S(B) fit and CBS, the laws over the settings that could be fitted, time and cost.

    `metrics`: the reader that gave the throughput, so that each run's metrics.jsonl is read once.
    """
    if reference_batch is not None:
        check_reference_batch(table, reference_batch)
    overheads = tuple(sorted(set(DEGRADATION_OVERHEADS if overheads is None else overheads) | {overhead}))
    estimates = fit_settings(table.points_of, table.settings(), overhead, reference_batch, n_resamples, seed,
                             level, overheads)
    fit = StudyFit(table=table, estimates=estimates, laws=fit_laws(estimates, level), overhead=overhead,
                   reference_batch=reference_batch, n_resamples=n_resamples, seed=seed, level=level,
                   overheads=overheads, throughput=throughput or ThroughputModel(()),
                   seq_len=seq_len or table.seq_len)
    _add_times(fit, gpu_budget)
    if table.input_kind == "study":
        reader = metrics or MetricsReader()
        fit.b_simple = sweep_b_simple(table, reader)
        fit.noise_logged = bool(fit.b_simple) or any(reader.points(r.path) for r in table.runs)
    return fit


def check_reference_batch(table: StepsTable, reference_batch: float) -> None:
    """Refuse a B0 outside every batch the study measured (reached, or a lower bound): every CBS would then rest
    on an S(B0) extrapolated from the fit. Within the study's range but outside one setting's, that setting
    carries a warning instead (cbs/analysis/fit.py)."""
    measured = [p.batch_size for p in table.points if not p.censored or p.lower_bound]
    if measured and not min(measured) <= reference_batch <= max(measured):
        raise InputError(f"--reference-batch {reference_batch:g} is outside the measured batches "
                         f"{min(measured)}..{max(measured)}: every CBS would rest on an S(B0) extrapolated from the "
                         "fit; choose B0 within them, or omit it (B0 = each setting's smallest batch)")


def _add_times(fit: StudyFit, gpu_budget: int | None) -> None:
    if not fit.throughput:
        fit.time_note = ("no throughput: the runs have no perf/tokens_per_s in metrics.jsonl; give --throughput "
                         "CSV" if fit.table.input_kind == "study" else "no throughput: give --throughput CSV")
        return
    if not fit.seq_len:
        fit.time_note = "no sequence length (a CSV input or runs of several lengths): give --seq-len"
        return
    fit.gpu_budget = gpu_budget or max(fit.throughput.gpu_counts_measured())
    for s in fit.table.settings():
        steps_at = {p.batch_size: p.steps for p in fit.table.points_of(s.name) if not p.censored}
        fit.times += time_rows(s.name, s.model_params, steps_at, fit.throughput, fit.seq_len, fit.gpu_budget)


# ----------------------------------------------------------------------------------------------------------------
# warnings


def study_warnings(fit: StudyFit) -> list[str]:
    """Per-setting warnings, then those about the laws; each one line, saying what to do."""
    out = [f"{e.setting.name}: {w}" for e in fit.estimates for w in e.warnings]
    laws = fit.laws
    unsaturated = [name for name, why in laws.excluded if why.startswith("no saturation") or "lower bound" in why]
    if unsaturated and laws.cbs:
        out.append(f"the laws leave out {len(unsaturated)} setting(s) whose CBS is only a lower bound (no saturation"
                   f" within the sweep: {', '.join(unsaturated)}): these are the largest-CBS ones, so the laws are "
                   "biased low; add larger batches to them")
    misfit = [e.setting.name for e in fit.estimates if e.lack_of_fit]
    if misfit:
        out.append(f"the hyperbola does not describe {len(misfit)} setting(s) ({', '.join(misfit)}): no law uses "
                   "them; see their warnings above")
    if laws.weighted_note:
        out.append(f"no weighted laws: {laws.weighted_note}; the plain (OLS) laws stand")
    joint = laws.cbs.get("joint")
    if joint is not None and not joint.identifiable and laws.collinearity and laws.collinearity.collinear:
        out.append(f"{joint.reason}; the joint law is not reported and forecasts use the one-variable D law")
    for v in ("tokens", "model_params", "compute"):
        cbs, noise = laws.cbs.get(v), laws.b_noise.get(v)
        if cbs and noise and abs(cbs.exponent - noise.exponent) > EXPONENT_GAP:
            out.append(f"the CBS law's exponent in {SYMBOLS[v]} ({cbs.exponent:.3f}) differs from the B_noise "
                       f"law's ({noise.exponent:.3f}): the (1+o)B0 floor of the CBS "
                       f"{'flattens' if cbs.exponent < noise.exponent else 'bends'} it; extrapolate with the "
                       "B_noise law, or refit with a smaller --reference-batch")
    b0s = sorted({e.reference_batch for e in fit.estimates if e.fitted})
    if len(b0s) > 1:
        out.append(f"B0 differs across settings ({', '.join(f'{b:g}' for b in b0s)}): their CBS are not on a common "
                   "reference and the CBS laws mix them; rerun with --reference-batch")
    lost = sum(p.lost_runs for p in fit.table.points)
    if lost:
        out.append(f"{lost} (run, setting) observation(s) lost: the run diverged or failed before reaching the "
                   "setting's target; check their learning rates")
    at_most = [p for p in fit.table.points if p.upper_bound]
    if at_most:
        out.append(f"{len(at_most)} point(s) reached the target already at their shortest horizon (`<= S` under "
                   "Steps to target): the fit takes that horizon's steps, which may overestimate S; add a shorter "
                   "horizon to study.horizons")
    diverged_after = [p for p in fit.table.points if p.diverged_after]
    if diverged_after:
        out.append(f"{len(diverged_after)} point(s) come from a run that diverged after crossing the target "
                   "(listed under Steps to target): their hyper-parameters are at the edge of stability")
    return out
