"""One pass over a run's metrics.jsonl for everything the analysis reads from it: the throughput
`perf/tokens_per_s` (cbs/analysis/cost.py), the gradient noise scale `train/noise_scale` with its parts
(cbs/analysis/noise_scale.py describes them) and the eval curve `eval/loss`, `eval/loss_ewa/<tau>` (a branched study's
eval noise, cbs/analysis/branch_rules.py).

Most lines are eval or plain train events: a line is parsed only when it names one of those keys (the one reader,
cbs/runfiles.py's metrics_records, which skips a line cut short by a crash). Values may be the strings "nan", "inf",
"-inf" (JSON has none).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from cbs.runfiles import (EVAL_LOSS, EVAL_LOSS_EWA_PREFIX, GRAD_SQ_BIG, GRAD_SQ_SMALL, METRICS, NOISE_SCALE,
                          NOISE_SCALE_BATCHES, STEP, TOKENS, TOKENS_PER_S, as_float, metrics_records)


@dataclass(frozen=True)
class NoisePoint:
    """One logged B_simple."""

    step: int
    tokens: int
    b_simple: float
    """Sequences; NaN/inf as logged."""
    grad_sq_small: float | None = None
    grad_sq_big: float | None = None
    batches: tuple[float, float] | None = None
    """(B_small, B_big) in sequences."""

    @property
    def usable(self) -> bool:
        return math.isfinite(self.b_simple) and self.b_simple > 0


@dataclass(frozen=True)
class RunMetrics:
    """What one metrics.jsonl says (read_metrics)."""

    tokens_per_s: float | None
    """Median of the finite, positive `perf/tokens_per_s` values; None when there are none."""
    noise: list[NoisePoint]
    """Every logged B_simple, in file order."""
    evals: list[tuple[int, float | None, float | None]] = field(default_factory=list)
    """(step, raw eval loss, min over the EWA decays' eval losses) of every eval, in file order; None: not
    logged or not finite."""


def read_metrics(metrics_path: Path) -> RunMetrics:
    """The throughput and the noise scale of one metrics.jsonl in one pass; (None, []) when it cannot be read."""
    speeds: list[float] = []
    noise: list[NoisePoint] = []
    evals: list[tuple[int, float | None, float | None]] = []
    try:
        for record in metrics_records(metrics_path, keys=(TOKENS_PER_S, NOISE_SCALE, EVAL_LOSS)):
            _scan_record(record, speeds, noise, evals)
    except OSError:
        return RunMetrics(None, [])
    return RunMetrics(statistics.median(speeds) if speeds else None, noise, evals)


def _scan_record(record: dict, speeds: list[float], noise: list[NoisePoint], evals: list) -> None:
    """Append the record's finite, positive tokens/s to `speeds`, its B_simple to `noise` and its eval losses to
    `evals` (module docstring)."""
    _append_eval(record, evals)
    v = as_float(record.get(TOKENS_PER_S))
    if v is not None and math.isfinite(v) and v > 0:
        speeds.append(v)
    point = _noise_point(record)
    if point is not None:
        noise.append(point)


def _append_eval(record: dict, evals: list) -> None:
    step = as_float(record.get(STEP))
    if step is None or not math.isfinite(step):
        return
    raw = as_float(record.get(EVAL_LOSS))
    ewa = [as_float(v) for k, v in record.items() if k.startswith(EVAL_LOSS_EWA_PREFIX)]
    ewa = [v for v in ewa if v is not None and math.isfinite(v)]
    if raw is not None or ewa:
        evals.append((int(step), raw if raw is not None and math.isfinite(raw) else None, min(ewa) if ewa else None))


def _noise_point(record: dict) -> NoisePoint | None:
    """The B_simple of one record; None without a value, or without a finite step and token count."""
    value, step, tokens = as_float(record.get(NOISE_SCALE)), as_float(record.get(STEP)), as_float(record.get(TOKENS))
    if value is None or step is None or tokens is None or not (math.isfinite(step) and math.isfinite(tokens)):
        return None
    batches = record.get(NOISE_SCALE_BATCHES)
    pair = None
    if isinstance(batches, list) and len(batches) == 2:
        b = [as_float(x) for x in batches]
        pair = (b[0], b[1]) if None not in b else None
    return NoisePoint(int(step), int(tokens), value, as_float(record.get(GRAD_SQ_SMALL)),
                      as_float(record.get(GRAD_SQ_BIG)), pair)


class MetricsReader:
    """Reads each run's metrics.jsonl once, by run directory: one pass serves the throughput and the noise scale
    of a `cbs fit`, and every setting a run of a sweep serves."""

    def __init__(self):
        self._cache: dict[Path, RunMetrics] = {}

    def of(self, run_path: Path) -> RunMetrics:
        """The run's metrics, read on first use."""
        if run_path not in self._cache:
            self._cache[run_path] = read_metrics(run_path / METRICS)
        return self._cache[run_path]

    def points(self, run_path: Path) -> list[NoisePoint]:
        """Every B_simple the run logged (RunMetrics.noise)."""
        return self.of(run_path).noise

    def evals(self, run_path: Path) -> list[tuple[int, float | None, float | None]]:
        """The run's eval curve (RunMetrics.evals)."""
        return self.of(run_path).evals

    def tokens_per_s(self, run_path: Path) -> float | None:
        """The run's median tokens/s (RunMetrics.tokens_per_s)."""
        return self.of(run_path).tokens_per_s
