"""The gradient noise scale B_simple that pretrain logs, read back from metrics.jsonl (docs/method.md, "Gradient
noise scale").

Pretrain logs, at its log steps and only when a step has >= 2 micro-batches or ranks (it needs two batch sizes):

    train/noise_scale          B_simple = tr(Sigma) / |G|^2 in sequences, from EMAs of numerator and denominator
    train/grad_sq_small        |G_small|^2 measured at that step (one micro-batch, mean over the step's)
    train/grad_sq_big          |G_big|^2 measured at that step (the whole global batch)
    train/noise_scale_batches  [B_small, B_big] in sequences

(McCandlish et al. 2018, arXiv 1812.06162, appendix A.1). Values may be the strings "nan"/"inf" (JSON has none):
early in training the EMA of |G|^2 can be ~0 or negative, which makes the ratio meaningless; only finite,
positive B_simple values are used.

For a sweep study, a setting's B_simple is read where its budget D is reached: the median over its reference runs
(study.reference) of the value logged closest to D tokens; when no reference run logged one there, the median
over every run of the setting's model (which may have stopped at the target, hence the NEAR window). B_simple is a
cheap predictor, reported beside the measured B_noise and CBS, never instead: McCandlish et al. show it
under-estimates the critical batch when the Hessian is ill-conditioned.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from analysis.run_metrics import MetricsReader, NoisePoint, read_metrics
from analysis.steps import RunInfo, StepsTable

NEAR = 0.25
"""A run's value counts for a budget D only if it was logged within this relative distance of D tokens: B_simple
grows along training, so a value from much earlier (a run stopped at its target) would describe another point."""


@dataclass(frozen=True)
class BSimple:
    """B_simple of one setting (or one branch point), and where it comes from."""

    value: float
    source: str
    """'reference' (the reference runs) or 'median' (every run of the setting's model)."""
    runs: int
    """Runs whose values entered the median."""
    tokens: float
    """Median tokens at which those values were logged."""


def read_noise_scale(metrics_path: Path) -> list[NoisePoint]:
    """Every logged B_simple of one metrics.jsonl, in file order; [] when the file is missing or has none.

    A line that does not parse (a crash mid-write) is skipped (analysis/run_metrics.py reads the file).
    """
    return read_metrics(metrics_path).noise


def value_near(points: list[NoisePoint], tokens: float, near: float = NEAR) -> NoisePoint | None:
    """The usable point logged closest to `tokens`, if within `near` x tokens of it; None otherwise."""
    usable = [p for p in points if p.usable and abs(p.tokens - tokens) <= near * tokens]
    return min(usable, key=lambda p: (abs(p.tokens - tokens), p.step)) if usable else None


def _median_near(runs: list[RunInfo], tokens: float, reader: MetricsReader, source: str) -> BSimple | None:
    found = [p for p in (value_near(reader.points(r.path), tokens) for r in runs) if p is not None]
    if not found:
        return None
    return BSimple(statistics.median(p.b_simple for p in found), source, len(found),
                   statistics.median(p.tokens for p in found))


def sweep_b_simple(table: StepsTable, reader: MetricsReader | None = None) -> dict[str, BSimple]:
    """Setting name -> B_simple at its budget D (module docstring); settings without one are absent."""
    reader = reader or MetricsReader()
    out = {}
    for s in table.settings():
        refs = [r for r in table.runs if r.reference and s.name in r.settings]
        model = [r for r in table.runs if s.model_params in r.model_params]
        found = _median_near(refs, s.tokens, reader, "reference") or _median_near(model, s.tokens, reader, "median")
        if found is not None:
            out[s.name] = found
    return out

