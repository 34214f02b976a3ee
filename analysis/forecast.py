"""Forecast the critical batch size of a new data budget (or model size) from scaling.json, and plan a batch.

CBS(x) = c x^alpha with an OLS prediction interval on the log scale (see fit.ScalingLaw.predict). The batch plan
takes the largest global batch <= CBS that is a whole number of micro-batches on every GPU
(global = k * gpus * micro_batch, gradient accumulation k), so that every step is still in the
near-linear-scaling regime: at B* a step already buys only 1/(1 + o) of what linear scaling promises.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from analysis import InputError
from analysis.fit import ScalingLaw, law_from_json

DEFAULT_SEQ_LEN = 512  # the paper's context length (Zhang et al. 2025, sec. 2)


@dataclass(frozen=True)
class ScalingFile:
    """What forecast needs from scaling.json."""

    laws: dict[str, ScalingLaw]
    seq_len: int | None
    overhead: float | None
    path: str


def load_scaling(path: str | Path) -> ScalingFile:
    """Read and check scaling.json; InputError with the reason when missing or malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file (write it with `cbs fit ... --out DIR`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("laws"), dict):
        raise InputError(f"{path}: not a scaling.json written by `cbs fit` (no 'laws' mapping)")
    laws = {}
    for name, entry in data["laws"].items():
        try:
            laws[name] = law_from_json(entry)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise InputError(f"{path}: law {name!r} is malformed ({type(e).__name__}: {e})") from None
    seq_len = data.get("seq_len")
    seq_len = seq_len if isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len > 0 else None
    overhead = data.get("overhead") if isinstance(data.get("overhead"), (int, float)) else None
    return ScalingFile(laws=laws, seq_len=seq_len, overhead=overhead, path=str(path))


@dataclass(frozen=True)
class Forecast:
    variable: str
    x: float
    cbs: float
    low: float
    high: float
    """Prediction interval (NaN when the law was fitted through 2 points)."""
    level: float
    extrapolated: bool
    """x outside the range of the settings the law was fitted on."""


def forecast_cbs(law: ScalingLaw, x: float) -> Forecast:
    """CBS = c x^alpha with the law's prediction interval (a new setting's CBS, not the mean line)."""
    point, low, high = (float(v) for v in law.predict(x))
    lo, hi = law.x_range
    return Forecast(law.variable, float(x), point, low, high, law.level, not (lo <= x <= hi))


@dataclass(frozen=True)
class BatchPlan:
    global_batch_seqs: int
    micro_batch_seqs: int
    gpus: int
    grad_accum: int
    seq_len: int
    above_cbs: bool
    """True when even one micro-batch on every GPU exceeds the CBS."""

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_seqs * self.seq_len

    def steps_for(self, tokens: float) -> int:
        return math.ceil(tokens / self.tokens_per_step)


def batch_plan(cbs: float, gpus: int, micro_batch_seqs: int, seq_len: int) -> BatchPlan:
    """Largest global batch <= CBS that is a multiple of gpus * micro_batch; at least one such multiple."""
    unit = gpus * micro_batch_seqs
    k = int(cbs // unit) if math.isfinite(cbs) else 0
    return BatchPlan(global_batch_seqs=max(k, 1) * unit, micro_batch_seqs=micro_batch_seqs, gpus=gpus,
                     grad_accum=max(k, 1), seq_len=seq_len, above_cbs=k < 1)


def _fmt(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def describe(f: Forecast, law: ScalingLaw) -> str:
    """One line: CBS forecast, interval, law and extrapolation warning."""
    interval = (f"{f.level:.0%} prediction interval [{_fmt(f.low)}, {_fmt(f.high)}]"
                if math.isfinite(f.low) else "no interval (law fitted through 2 points)")
    where = (f"; extrapolated beyond the fitted {law.symbol} range [{law.x_range[0]:.3g}, {law.x_range[1]:.3g}]"
             if f.extrapolated else "")
    return (f"CBS({law.symbol}={f.x:.4g}) = {_fmt(f.cbs)} sequences, {interval}; "
            f"law CBS = {law.coefficient:.4g} * {law.symbol}^{law.exponent:.3f} (n={law.n_points}){where}")


def describe_plan(plan: BatchPlan, cbs: Forecast, tokens: float) -> list[str]:
    lines = [f"batch plan: global batch {plan.global_batch_seqs} sequences = {plan.tokens_per_step:,} tokens "
             f"(seq_len {plan.seq_len}) = {plan.gpus} GPU(s) x micro-batch {plan.micro_batch_seqs} x "
             f"gradient accumulation {plan.grad_accum}; {plan.steps_for(tokens):,} steps for {tokens:.4g} tokens"]
    if plan.above_cbs:
        lines.append(f"warning: one micro-batch on every GPU ({plan.gpus * plan.micro_batch_seqs} sequences) "
                     f"already exceeds the CBS {_fmt(cbs.cbs)}; use fewer GPUs or a smaller micro-batch")
    elif math.isfinite(cbs.low) and plan.global_batch_seqs > cbs.low:
        lines.append(f"note: a global batch <= {_fmt(cbs.low)} sequences stays below the CBS's lower "
                     f"{cbs.level:.0%} prediction bound")
    return lines
