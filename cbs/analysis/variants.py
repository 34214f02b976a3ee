"""`cbs fit` on a study with variants (study.variants / study.axes): each variant fitted as its own study, then
put side by side.

A variant is a recipe (EWA or not, a schedule, a context length, ...) swept over the same settings, batches and
learning rates, with the targets its study shares across variants (the reference variant's). Each variant's runs
(`study.variant` in their config.yaml) form a table that the single-recipe fit reads unchanged: S(B) per setting,
CBS with intervals, degradation range and, where the settings allow, the laws in D and N (cbs/analysis/
study_fit.py). This module adds what only a comparison has:

- tables with a `variant` column (steps.csv, cbs.csv, degradation.csv, time_to_target.csv), and the CBS in tokens
  beside the CBS in sequences (tokens = sequences x the variant's model.seq_len: a shorter context halves the
  tokens of a batch of the same sequences);
- where the fitted hyperbolas of two variants cross. With S_i(B) = a_i + b_i / B (a = S_min, b = S_min B_noise;
  McCandlish et al. 2018, eq. 2.11), S_1(B) = S_2(B) at

      B_x = (b_2 - b_1) / (a_1 - a_2),

  a crossing only when B_x > 0. S_1 - S_2 = (a_1 - a_2) + (b_1 - b_2) / B is monotone in 1/B, so two hyperbolas
  cross at most once: below B_x one variant needs fewer steps, above it the other. A crossing outside the swept
  batches is extrapolated and reported as "no crossing in the swept range";
- figures/variants_<setting>.png: S(B) of every variant with its fit (the paper's EWA-vs-cosine figure).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from cbs.analysis import InputError
from cbs.analysis.fit import CbsEstimate
from cbs.analysis.steps import StepsTable
from cbs.analysis.study_fit import StudyFit

CSV_VARIANT_COLUMN = "variant"
TOKEN_COLUMNS = ["seq_len", "cbs_tokens", "cbs_tokens_low", "cbs_tokens_high"]
"""Appended to cbs.csv of a study with variants: a variant may change model.seq_len, so its CBS in tokens."""


@dataclass(frozen=True)
class Crossover:
    """Where the fitted S(B) of `variant` crosses the reference variant's, for one setting."""

    setting: str
    reference: str
    variant: str
    batch: float | None
    """B_x within the swept batches; None when the hyperbolas do not cross there (or a fit is missing)."""
    faster_below: str
    """The variant with fewer fitted steps at the smallest swept batch (below B_x)."""
    faster_above: str
    """The variant with fewer fitted steps at the largest swept batch (above B_x)."""
    swept: tuple[float, float]
    extrapolated: float | None = None
    """B_x outside the swept batches (a crossing the data do not show); None if the hyperbolas never cross."""
    note: str = ""
    """Why there is no comparison (a variant without a fit)."""
    ratio: tuple[float, float] = (math.nan, math.nan)
    """Fitted S_variant / S_reference at the smallest and the largest swept batch."""

    def sentence(self) -> str:
        lo, hi = self.swept
        where = f"B = {lo:g}..{hi:g}"
        if self.note:
            return f"{self.setting}: {self.variant} vs {self.reference}: no comparison ({self.note})."
        if self.batch is not None:
            return (f"{self.setting}: {self.faster_above} overtakes {self.faster_below} at B = {self.batch:.3g} "
                    f"sequences: below it {self.faster_below} needs fewer steps to the target, above it "
                    f"{self.faster_above} (S_{self.variant} / S_{self.reference} = {self.ratio[0]:.2f} at B = {lo:g}, "
                    f"{self.ratio[1]:.2f} at B = {hi:g}).")
        outside = (f"; the fitted curves cross at B = {self.extrapolated:.3g}, outside the swept batches"
                   if self.extrapolated is not None else "")
        return (f"{self.setting}: no crossing of {self.variant} and {self.reference} in the swept range ({where}): "
                f"{self.faster_below} needs fewer steps at every swept batch (S_{self.variant} / S_{self.reference} "
                f"= {self.ratio[0]:.2f} at B = {lo:g}, {self.ratio[1]:.2f} at B = {hi:g}){outside}.")


@dataclass
class VariantsFit:
    """Every variant's fit of a study with variants, in the study's order, and their crossings."""

    table: StepsTable
    fits: dict[str, StudyFit]
    reference_variant: str
    crossovers: list[Crossover] = field(default_factory=list)

    @property
    def variants(self) -> list[str]:
        return list(self.fits)


def crossover_batch(s_min_1: float, b_noise_1: float, s_min_2: float, b_noise_2: float) -> float | None:
    """B_x with S_1(B_x) = S_2(B_x) for S_i(B) = S_min,i (1 + B_noise,i / B); None if they never cross at B > 0.

    a_1 + b_1 / B = a_2 + b_2 / B  =>  B = (b_2 - b_1) / (a_1 - a_2), with a = S_min and b = S_min B_noise."""
    a1, b1, a2, b2 = s_min_1, s_min_1 * b_noise_1, s_min_2, s_min_2 * b_noise_2
    if a1 == a2:
        return None
    batch = (b2 - b1) / (a1 - a2)
    return batch if batch > 0 and math.isfinite(batch) else None


def crossover(setting: str, reference: str, ref: CbsEstimate | None, variant: str, est: CbsEstimate | None,
              swept: tuple[float, float]) -> Crossover:
    """Where variant's fitted S(B) crosses the reference variant's within the swept batches `swept`."""
    base = dict(setting=setting, reference=reference, variant=variant, swept=swept)
    missing = [name for name, e in ((reference, ref), (variant, est)) if e is None or e.fit is None]
    if missing:
        return Crossover(**base, batch=None, faster_below="", faster_above="",
                         note=f"{' and '.join(missing)} has no fit of S(B)")
    lo, hi = swept
    s_ref = ref.fit.steps(np.array([lo, hi]))
    s_var = est.fit.steps(np.array([lo, hi]))
    ratio = (float(s_var[0] / s_ref[0]), float(s_var[1] / s_ref[1]))
    below = variant if s_var[0] < s_ref[0] else reference
    above = variant if s_var[1] < s_ref[1] else reference
    b_x = crossover_batch(ref.fit.s_min, ref.fit.b_noise, est.fit.s_min, est.fit.b_noise)
    inside = b_x is not None and lo <= b_x <= hi and below != above
    return Crossover(**base, batch=b_x if inside else None, faster_below=below, faster_above=above if inside
                     else below, extrapolated=None if inside else b_x, ratio=ratio)


def study_crossovers(fits: dict[str, StudyFit], reference: str) -> list[Crossover]:
    """Every other variant against the reference one, per setting both measured."""
    out = []
    ref_fit = fits[reference]
    for variant, fit in fits.items():
        if variant == reference:
            continue
        for e in fit.estimates:
            r = next((x for x in ref_fit.estimates if x.setting.name == e.setting.name), None)
            if r is None:
                continue
            batches = [p.batch_size for p in ref_fit.table.points_of(e.setting.name) + fit.table.points_of(
                e.setting.name) if not p.censored]
            if not batches:
                continue
            out.append(crossover(e.setting.name, reference, r if r.fit else None, variant,
                                 e if e.fit else None, (float(min(batches)), float(max(batches)))))
    return out


def fit_variants(table: StepsTable, fit_one) -> VariantsFit:
    """`fit_one(sub_table) -> StudyFit` for each variant's table, then the crossings against the reference
    variant (the study's `reference_variant`, else the first)."""
    variants = table.variants
    if not variants:
        raise InputError(f"{table.source}: no variants (no run records study.variant)")
    fits = {}
    for v in variants:
        sub = table.of_variant(v)
        if not sub.points:
            continue
        fits[v] = fit_one(sub)
    reference = table.reference_variant if table.reference_variant in fits else next(iter(fits))
    return VariantsFit(table=table, fits=fits, reference_variant=reference,
                       crossovers=study_crossovers(fits, reference))


def slug(variant: str) -> str:
    """A variant name as a directory name (figures/<slug>/)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", variant).strip("._") or "variant"
