"""Time and cost to the target loss: wall-clock hours and GPU-hours at each batch size and GPU count, and the
batch that gets there fastest under a GPU budget (docs/method.md, "Time and cost").

    hours(B, G)     = S(B) B T / tokens_per_s(B, G) / 3600         (T tokens per sequence)
    gpu_hours(B, G) = G hours(B, G)

S(B) is the measured steps-to-target (in `cbs fit`) or the fitted/forecast S_min (1 + B_noise / B) (in
`cbs forecast`). Throughput comes from each run's `perf/tokens_per_s` in metrics.jsonl (median over its logged
windows; the strings "nan"/"inf" that metrics.jsonl writes for non-finite values are read as floats and skipped)
at the run's world size, or from a `--throughput` CSV. A (B, G) not measured is modelled as data parallelism
with per-GPU throughput a function of the local batch b = B / G only: tokens_per_s(B, G) = G t(B / G), t
interpolated linearly in log b between measured local batches, held constant above the largest (a saturated
GPU) and proportional to b below the smallest (a step takes no less time than there). Communication costs are
those of the measurements; more GPUs than measured are assumed to scale perfectly. For another model
size N' (a forecast) t is scaled by N / N' (the same model FLOP/s per GPU: 6 N FLOPs per token).
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbs.analysis import InputError, read_csv_lines
from cbs.analysis.run_metrics import MetricsReader, read_metrics
from cbs.analysis.steps import RunInfo
from cbs.batching import splits

THROUGHPUT_COLUMNS = ("batch_size", "gpus", "tokens_per_s")


@dataclass(frozen=True)
class ThroughputPoint:
    """Measured training throughput of a whole job (all GPUs) at one (model, global batch, GPU count)."""

    model_params: int | None
    """N of the model measured; None: applies to every model (a --throughput CSV without the column)."""
    batch_size: int
    gpus: int
    tokens_per_s: float

    @property
    def local_batch(self) -> float:
        return self.batch_size / self.gpus

    @property
    def per_gpu(self) -> float:
        return self.tokens_per_s / self.gpus


# ----------------------------------------------------------------------------------------------------------------
# reading


def run_tokens_per_s(metrics_path: Path) -> float | None:
    """Median of the finite, positive `perf/tokens_per_s` values of one metrics.jsonl; None when there are none.

    A line that does not parse (a crash mid-write) is skipped; values may be the strings "nan", "inf", "-inf"
    (cbs/analysis/run_metrics.py reads the file).
    """
    return read_metrics(metrics_path).tokens_per_s


def study_throughput(runs: list[RunInfo], reader: MetricsReader | None = None) -> list[ThroughputPoint]:
    """One point per run with a usable metrics.jsonl (a run of unknown world size counts as 1 GPU); `reader`
    shares each run's one pass over metrics.jsonl with the noise scale (cbs/analysis/study_fit.py)."""
    reader = reader or MetricsReader()
    points = []
    for run in runs:
        value = reader.tokens_per_s(run.path)
        if value is None:
            continue
        for n in run.model_params or (None,):
            points.append(ThroughputPoint(n, run.batch_size, run.world_size or 1, value))
    return points


def device_word(runs: list[RunInfo]) -> str:
    """What the time/cost text calls a device: 'CPU' when every run that recorded its device ran on the CPU,
    'device' when they differ, else 'GPU' (CUDA runs, and runs or CSV input that do not say)."""
    kinds = {r.device for r in runs} - {None}
    return "GPU" if not kinds or kinds == {"cuda"} else "CPU" if kinds == {"cpu"} else "device"


def read_throughput_csv(path: str | Path) -> list[ThroughputPoint]:
    """Rows `batch_size,gpus,tokens_per_s[,model_params]`: whole-job tokens/s measured at each (B, G)."""
    path = Path(path)
    lines = read_csv_lines(path, f"--throughput {path}")
    header = [c.strip() for c in lines[0]] if lines else []
    missing = [c for c in THROUGHPUT_COLUMNS if c not in header]
    if missing:
        raise InputError(f"--throughput {path}: missing column(s) {', '.join(missing)}; expected "
                         f"{','.join(THROUGHPUT_COLUMNS)}[,model_params]")
    points, seen = [], {}
    for i, cells in enumerate(lines[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        point = _throughput_row(header, cells, f"--throughput {path}, line {i}")
        key = (point.model_params, point.batch_size, point.gpus)
        if key in seen:
            raise InputError(f"--throughput {path}, line {i}: batch_size {point.batch_size}, gpus {point.gpus}"
                             f"{'' if key[0] is None else f', model_params {key[0]}'} already on line {seen[key]}; "
                             "keep one row per measurement (average them)")
        seen[key] = i
        points.append(point)
    if not points:
        raise InputError(f"--throughput {path}: no data rows")
    return points


def _throughput_row(header: list[str], cells: list[str], where: str) -> ThroughputPoint:
    if len(cells) != len(header):
        raise InputError(f"{where}: {len(cells)} cells, the header has {len(header)}; fix the row")
    row = {k: v.strip() for k, v in zip(header, cells)}
    values = {}
    for key in THROUGHPUT_COLUMNS + (("model_params",) if row.get("model_params") else ()):
        try:
            x = float(row[key])
        except ValueError:
            x = math.nan
        whole = key != "tokens_per_s"
        if not (math.isfinite(x) and x > 0) or (whole and not x.is_integer()):
            kind = "a positive whole number" if whole else "a positive number"
            raise InputError(f"{where}: {key} must be {kind}: got {row[key]!r}")
        values[key] = x
    batch, gpus = int(values["batch_size"]), int(values["gpus"])
    if batch % gpus:
        raise InputError(f"{where}: batch_size {batch} is not a multiple of gpus {gpus}; every GPU trains the "
                         "same number of sequences")
    n = int(values["model_params"]) if "model_params" in values else None
    return ThroughputPoint(n, batch, gpus, values["tokens_per_s"])


# ----------------------------------------------------------------------------------------------------------------
# the throughput model


@dataclass(frozen=True)
class ThroughputModel:
    """tokens/s of a job at (N, B, G): the measurement when there is one, else G t(B / G) (module docstring)."""

    points: tuple[ThroughputPoint, ...]
    source: str = ""

    def __bool__(self) -> bool:
        return bool(self.points)

    def gpu_counts_measured(self) -> list[int]:
        return sorted({p.gpus for p in self.points})

    def _for_model(self, n: int | None) -> tuple[list[ThroughputPoint], float]:
        """The points that describe model N and the factor on their tokens/s (N_measured / N)."""
        same = [p for p in self.points if p.model_params == n]
        if same:
            return same, 1.0
        generic = [p for p in self.points if p.model_params is None]
        if generic or n is None:
            return generic or list(self.points), 1.0
        nearest = min({p.model_params for p in self.points}, key=lambda m: abs(math.log(m / n)))
        return [p for p in self.points if p.model_params == nearest], nearest / n

    def scaled_from(self, n: int | None) -> int | None:
        """The measured model size whose throughput stands in for N (scaled by N_measured / N), or None when
        the points describe N itself or any model (a CSV without model_params)."""
        points, scale = self._for_model(n)
        return points[0].model_params if scale != 1.0 and points else None

    @functools.cache
    def _curve(self, n: int | None):
        """(exact medians by (B, G), log local batches, log per-GPU medians, scale) of model N; None if no data."""
        points, scale = self._for_model(n)
        if not points:
            return None
        exact: dict[tuple[int, int], list[float]] = {}
        by_local: dict[float, list[float]] = {}
        for p in points:
            exact.setdefault((p.batch_size, p.gpus), []).append(p.tokens_per_s)
            by_local.setdefault(p.local_batch, []).append(p.per_gpu)
        local = sorted(by_local)
        return ({k: statistics.median(v) for k, v in exact.items()}, np.log(local),
                np.log([statistics.median(by_local[b]) for b in local]), scale)

    def tokens_per_s(self, n: int | None, batch: int, gpus: int) -> tuple[float, bool]:
        """(tokens/s, measured at exactly this N, B, G)."""
        curve = self._curve(n)
        if curve is None:
            return math.nan, False
        exact, log_local, log_per_gpu, scale = curve
        if (batch, gpus) in exact and scale == 1.0:
            return exact[batch, gpus], True
        b, smallest = batch / gpus, math.exp(log_local[0])
        # above the largest measured local batch: held (a GPU is saturated); below the smallest: proportional to
        # b (a step takes no less time than at the smallest measured one), so small local batches are not flattered
        t = math.exp(float(np.interp(math.log(max(b, smallest)), log_local, log_per_gpu)))
        return gpus * t * min(1.0, b / smallest) * scale, False


# ----------------------------------------------------------------------------------------------------------------
# time to target


@dataclass(frozen=True)
class TimeToTarget:
    """Wall-clock and GPU-hours for one setting to reach its target at global batch B on G GPUs."""

    setting: str
    batch_size: int
    gpus: int
    steps: float
    tokens: float
    """S(B) B T: tokens trained until the target."""
    tokens_per_s: float
    hours: float
    gpu_hours: float
    measured: bool
    """The throughput was measured at this (N, B, G); otherwise modelled (module docstring)."""


def hours_to_target(steps: float, batch: int, seq_len: int, tokens_per_s: float) -> float:
    """S(B) B T / tokens_per_s, in hours."""
    return steps * batch * seq_len / tokens_per_s / 3600.0


def hours_text(h: float) -> str:
    """A duration in hours for a report line: '12.5 min' below an hour, else '3.2 h'."""
    return f"{h * 60:.3g} min" if h < 1 else f"{h:.3g} h"


def gpu_counts(budget: int, batch: int | None = None, extra=()) -> list[int]:
    """GPU counts to tabulate: powers of two up to the budget, the budget and `extra` (<= budget); at a given
    batch, those that give every GPU a whole number (>= 1) of sequences."""
    counts = {2 ** k for k in range(int(math.log2(budget)) + 1)} | {budget} | {g for g in extra if g <= budget}
    return sorted(g for g in counts if batch is None or (g <= batch and batch % g == 0))


def time_rows(name: str, n: int | None, steps_at: dict[int, float], model: ThroughputModel, seq_len: int,
              budget: int) -> list[TimeToTarget]:
    """One row per (batch with a measured S(B), GPU count <= budget); none without throughput for N."""
    rows = []
    measured = model.gpu_counts_measured()
    for batch, steps in sorted(steps_at.items()):
        for g in gpu_counts(budget, batch, measured):
            row = time_row(name, n, batch, steps, g, model, seq_len)
            if row is not None:
                rows.append(row)
    return rows


def time_row(name: str, n: int | None, batch: int, steps: float, gpus: int, model: ThroughputModel,
             seq_len: int) -> TimeToTarget | None:
    """The row of one (batch, GPU count); None without a finite, positive throughput there."""
    tps, exact = model.tokens_per_s(n, batch, gpus)
    if not (math.isfinite(tps) and tps > 0):
        return None
    hours = hours_to_target(steps, batch, seq_len, tps)
    return TimeToTarget(name, batch, gpus, steps, steps * batch * seq_len, tps, hours, gpus * hours, exact)


def fastest(rows: list[TimeToTarget]) -> TimeToTarget | None:
    """The row with the least wall-clock time (ties: fewer GPU-hours)."""
    return min(rows, key=lambda r: (r.hours, r.gpu_hours)) if rows else None


def cheapest(rows: list[TimeToTarget]) -> TimeToTarget | None:
    """The row with the fewest GPU-hours (ties: less wall-clock time)."""
    return min(rows, key=lambda r: (r.gpu_hours, r.hours)) if rows else None


def plan_rows(name: str, s_min: float, b_noise: float, n: int | None, model: ThroughputModel, seq_len: int,
              budget: int, micro_batch: int, max_batch: float) -> list[TimeToTarget]:
    """Forecast rows: S(B) = S_min (1 + B_noise/B) at B = G x micro x 2^k <= max_batch, for G <= budget."""
    steps_at = {}
    for g in gpu_counts(budget):
        b = g * micro_batch
        while b <= max_batch:
            steps_at.setdefault(b, s_min * (1 + b_noise / b))
            b *= 2
    rows = time_rows(name, n, steps_at, model, seq_len, budget)
    return [r for r in rows if splits(r.batch_size, micro_batch, r.gpus)]
