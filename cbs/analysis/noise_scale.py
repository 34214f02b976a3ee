"""The gradient noise scale B_simple of a run, estimated from the ingredients pretrain logs in metrics.jsonl
(docs/method.md, "Gradient noise scale").

Pretrain logs, at its log steps and only when a step has >= 2 micro-batches or ranks (it needs two batch sizes):

    train/noise_scale          tr(Sigma) / |G|^2 from EMAs of numerator and denominator (a live indicator)
    train/grad_sq_small        |G_small|^2 measured at that step (one micro-batch, mean over the step's)
    train/grad_sq_big          |G_big|^2 measured at that step (the whole global batch)
    train/noise_scale_batches  [B_small, B_big] in sequences

From each step's pair (McCandlish et al. 2018, arXiv 1812.06162, appendix A.1), unbiased estimates of |G|^2 and of
tr(Sigma) are

    g_k = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    s_k = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

and cbs fit estimates B_simple over a window of readings as the ratio of sums

    B_simple = sum_k s_k / sum_k g_k

(McCandlish et al., A.1: average numerator and denominator separately, then divide). It does not read the logged
ratio: an EMA of g_k over ~10 readings is often <= 0 when B_simple is much larger than B_big (low-rank noise),
pretrain then logs NaN, and a median of the remaining ratios keeps the small ones and drops the large ones
(0.56-0.75x the truth in tests/test_analysis_noise.py's simulation, where the ratio of sums gives 0.95-1.02x).
The share of the window's logged values that are not finite and positive is reported beside the estimate
(`unusable`), as a measure of how noisy the readings are. A window whose sum_k g_k <= 0 has no resolved
B_simple (it is larger than these batches can measure).

For a sweep study, a setting's B_simple pools the readings of its reference runs (study.reference) within NEAR of
its budget D tokens; when they have none there (or their sums resolve none), those of every run of the setting's model (which may have stopped
at the target, hence the window). B_simple is a cheap predictor, reported beside the measured B_noise and CBS,
never instead: McCandlish et al. show it under-estimates the critical batch when the Hessian is ill-conditioned.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbs.analysis.run_metrics import MetricsReader, NoisePoint, read_metrics
from cbs.analysis.steps import StepsTable

NEAR = 0.25
"""A run's readings count for a budget D only if logged within this relative distance of D tokens: B_simple
grows along training, so readings from much earlier (a run stopped at its target) would describe another point."""


@dataclass(frozen=True)
class BSimple:
    """B_simple of one setting (or one branch point), and where it comes from."""

    value: float
    """sum s_k / sum g_k over the readings (module docstring), sequences; finite and positive."""
    source: str
    """'reference' (the reference runs) or 'model' (every run of the setting's model)."""
    runs: int
    """Runs whose readings entered the sums."""
    tokens: float
    """Median tokens at which those readings were logged."""
    readings: int = 0
    """Readings (log steps) in the sums."""
    unusable: float = 0.0
    """Share of those readings whose logged EMA ratio `train/noise_scale` is not finite and positive."""


def step_estimates(small_sq: np.ndarray, big_sq: np.ndarray, b_small: np.ndarray,
                   b_big: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(g_k, s_k): each reading's unbiased estimates of |G|^2 and tr(Sigma) from |G_small|^2 at batch B_small and
    |G_big|^2 at B_big (McCandlish et al. 2018, appendix A.1; module docstring). Arrays broadcast."""
    small_sq, big_sq = np.asarray(small_sq, float), np.asarray(big_sq, float)
    b_small, b_big = np.asarray(b_small, float), np.asarray(b_big, float)
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
    return grad_sq, trace


def ratio_of_sums(grad_sq: np.ndarray, trace: np.ndarray) -> float:
    """B_simple = sum s_k / sum g_k; inf when sum g_k <= 0 (unresolved: larger than the batches can measure),
    NaN without readings. A ratio of sums, not a mean or median of ratios: each g_k is noisy and often <= 0."""
    grad_sq, trace = np.asarray(grad_sq, float), np.asarray(trace, float)
    if grad_sq.size == 0:
        return math.nan
    g, s = float(grad_sq.sum()), float(trace.sum())
    return s / g if g > 0 else math.inf


def _has_parts(p: NoisePoint) -> bool:
    """Whether a reading carries finite |G_small|^2, |G_big|^2 and B_small < B_big (what step_estimates needs)."""
    return (p.grad_sq_small is not None and p.grad_sq_big is not None and p.batches is not None
            and all(math.isfinite(v) for v in (p.grad_sq_small, p.grad_sq_big, *p.batches))
            and 0 < p.batches[0] < p.batches[1])


def readings_near(points: list[NoisePoint], tokens: float, near: float = NEAR) -> list[NoisePoint]:
    """The readings with their parts logged within `near` x tokens of `tokens`."""
    return [p for p in points if _has_parts(p) and abs(p.tokens - tokens) <= near * tokens]


def pooled_b_simple(points: list[NoisePoint]) -> float:
    """ratio_of_sums over readings (of one run or several: each g_k, s_k is unbiased whatever its batches)."""
    grad_sq, trace = step_estimates([p.grad_sq_small for p in points], [p.grad_sq_big for p in points],
                                    [p.batches[0] for p in points], [p.batches[1] for p in points])
    return ratio_of_sums(grad_sq, trace)


def unusable_share(points: list[NoisePoint]) -> float:
    """Share of readings whose logged train/noise_scale is not finite and positive (NaN when there are none)."""
    return sum(not p.usable for p in points) / len(points) if points else math.nan


def read_noise_scale(metrics_path: Path) -> list[NoisePoint]:
    """Every logged B_simple of one metrics.jsonl, in file order; [] when the file is missing or has none.

    A line that does not parse (a crash mid-write) is skipped (cbs/analysis/run_metrics.py reads the file).
    """
    return read_metrics(metrics_path).noise


def b_simple_near(points_by_run: list[list[NoisePoint]], tokens: float, source: str,
                  near: float = NEAR) -> BSimple | None:
    """B_simple pooled over the runs' readings within `near` x tokens of `tokens`; None without readings there
    or when the pooled sum g_k <= 0 (unresolved)."""
    found = [readings_near(points, tokens, near) for points in points_by_run]
    pooled = [p for run in found for p in run]
    value = pooled_b_simple(pooled) if pooled else math.nan
    if not (math.isfinite(value) and value > 0):
        return None
    return BSimple(value, source, sum(bool(run) for run in found), statistics.median(p.tokens for p in pooled),
                   len(pooled), unusable_share(pooled))


def b_simple_along(points: list[NoisePoint], near: float = NEAR) -> list[tuple[int, float]]:
    """(tokens, B_simple over the readings within `near` x tokens) at each reading's tokens, resolved ones only:
    the run's B_simple along training. Cumulative sums make it O(n log n) for runs with many log steps."""
    ok = sorted((p for p in points if _has_parts(p)), key=lambda p: p.tokens)
    if not ok:
        return []
    t = np.array([p.tokens for p in ok], float)
    grad_sq, trace = step_estimates([p.grad_sq_small for p in ok], [p.grad_sq_big for p in ok],
                                    [p.batches[0] for p in ok], [p.batches[1] for p in ok])
    cum_g, cum_s = np.concatenate([[0.0], np.cumsum(grad_sq)]), np.concatenate([[0.0], np.cumsum(trace)])
    lo = np.searchsorted(t, t * (1 - near), side="left")
    hi = np.searchsorted(t, t * (1 + near), side="right")
    g, s = cum_g[hi] - cum_g[lo], cum_s[hi] - cum_s[lo]
    return [(int(tk), float(sk / gk)) for tk, gk, sk in zip(t, g, s) if gk > 0 and sk > 0]


def sweep_b_simple(table: StepsTable, reader: MetricsReader | None = None) -> dict[str, BSimple]:
    """Setting name -> B_simple at its budget D (module docstring); settings without one are absent."""
    reader = reader or MetricsReader()
    out = {}
    for s in table.settings():
        refs = [reader.points(r.path) for r in table.runs if r.reference and s.name in r.settings]
        model = [reader.points(r.path) for r in table.runs if s.model_params in r.model_params]
        found = b_simple_near(refs, s.tokens, "reference") or b_simple_near(model, s.tokens, "model")
        if found is not None:
            out[s.name] = found
    return out
