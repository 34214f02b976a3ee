"""A batch-size schedule from CBS(t): the batch grows with the tokens seen, never above the local critical batch
(docs/method.md, "Batch ramp"). Merrill et al. 2025 (arXiv 2505.23971) report 43% fewer steps at matched
loss on OLMo with such a batch-size warmup.

CBS(t) is either a measured curve (cbs_curve.csv of a branched fit: points (t_i, c_i), interpolated linearly in
log t / log c between them and held flat beyond them) or a fitted law CBS = c t^a (scaling.json's CBS law in D, read
as CBS(t) = law(t)). Given the ladder of batches u 2^j (u = GPUs x micro-batch, j >= 0, so that every batch is a
whole number of micro-batches on every GPU):

    raw(t)  = the largest ladder value <= CBS(t)   (u itself when CBS(t) < u: no smaller batch exists)
    b(t)    = min_{s in [t, D]} raw(s)             the largest non-decreasing schedule that stays <= raw

so the batch never decreases and never exceeds CBS(t) (except where even u does). Steps are counted as training
counts them (cbs/analysis/batch_schedule.py: a step is never split, so a stage starts where the one before ended,
at or just past its planned start); the fixed batch B_f takes ceil(D / (B_f T)). Steps saved = 1 - sum(stage
steps) / fixed steps. `cbs forecast --ramp --out FILE` writes the stages as the file `pretrain.batch_schedule`
trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cbs.analysis import InputError, csv_dicts, csv_float, read_csv_lines
from cbs.analysis.batch_schedule import BatchSchedule
from cbs.analysis.batch_schedule import Stage as ScheduleStage

CURVE_COLUMNS = ("setting", "tokens", "cbs", "cbs_low", "cbs_high")
_EPS = 1e-9  # log2 of a CBS exactly on the ladder (16 / 4 = 2^2) must not floor to the rung below


@dataclass(frozen=True)
class Segment:
    """log CBS(t) = log c0 + slope (log t - log t0) for t in [t_lo, t_hi)."""

    t_lo: float
    t_hi: float
    t0: float
    c0: float
    slope: float

    def at(self, t: float) -> float:
        return self.c0 if self.slope == 0 else self.c0 * (t / self.t0) ** self.slope

    def crossing(self, level: float) -> float | None:
        """The t inside (t_lo, t_hi) where CBS(t) = level, if any."""
        if self.slope == 0:
            return None
        t = self.t0 * (level / self.c0) ** (1.0 / self.slope)
        return t if self.t_lo < t < self.t_hi else None


@dataclass(frozen=True)
class CbsCurve:
    segments: tuple[Segment, ...]
    source: str
    measured: tuple[float, float] | None = None
    """(first, last) measured t of a curve; None for a law."""

    def at(self, t: float) -> float:
        for seg in self.segments:
            if seg.t_lo <= t < seg.t_hi:
                return seg.at(t)
        return self.segments[-1].at(t)


def curve_from_points(points: list[tuple[float, float]], source: str) -> CbsCurve:
    """Knots (t_i, CBS_i), t_i distinct and positive: log-log linear between them, flat beyond them."""
    points = sorted(points)
    if not points:
        raise InputError(f"{source}: no point with a CBS; nothing to ramp")
    segs = [Segment(0.0, points[0][0], points[0][0], points[0][1], 0.0)]
    for (t1, c1), (t2, c2) in zip(points, points[1:]):
        segs.append(Segment(t1, t2, t1, c1, math.log(c2 / c1) / math.log(t2 / t1)))
    segs.append(Segment(points[-1][0], math.inf, points[-1][0], points[-1][1], 0.0))
    return CbsCurve(tuple(segs), source, (points[0][0], points[-1][0]))


def curve_from_law(coefficient: float, exponent: float, source: str) -> CbsCurve:
    """CBS(t) = c t^a for every t."""
    return CbsCurve((Segment(0.0, math.inf, 1.0, coefficient, exponent),), source)


def read_curve(path: str | Path, setting: str | None) -> tuple[CbsCurve, str, int | None]:
    """CBS(t) of one setting of a cbs_curve.csv (`--setting` when it holds several): its complete points with a
    CBS. Returns the curve, the setting and the file's seq_len (None when absent)."""
    path = Path(path)
    rows = csv_dicts(read_csv_lines(path, f"--curve {path}",
                                    "no such file (write it with `cbs fit` on a branched study)"))
    missing = [c for c in CURVE_COLUMNS if not rows or c not in rows[0]]
    if missing:
        raise InputError(f"--curve {path}: not a cbs_curve.csv (missing column(s) {', '.join(missing)} or no rows); "
                         "write it with `cbs fit` on a branched study")
    names = sorted({r["setting"] for r in rows})
    if setting is None and len(names) > 1:
        raise InputError(f"--curve {path} holds settings {', '.join(names)}: choose one with --setting")
    setting = setting or names[0]
    if setting not in names:
        raise InputError(f"--setting {setting}: not in {path} (it has {', '.join(names)})")
    points, seq_lens = {}, set()
    for i, row in enumerate(rows, start=2):
        if row["setting"] != setting:
            continue
        try:
            t, c = float(row["tokens"]), csv_float(row["cbs"])
        except ValueError as e:
            raise InputError(f"--curve {path}, line {i}: {e}; rewrite it with `cbs fit`") from None
        if not (math.isfinite(t) and t > 0):
            raise InputError(f"--curve {path}, line {i}: tokens must be positive: got {row['tokens']!r}")
        if t in points:
            raise InputError(f"--curve {path}, line {i}: tokens {row['tokens']} appears twice for {setting}")
        if math.isfinite(c) and c > 0:  # incomplete points and those where no batch passed have no CBS
            points[t] = c
        if row.get("seq_len"):
            seq_lens.add(int(float(row["seq_len"])))
    curve = curve_from_points(list(points.items()), f"{path} ({setting})")
    return curve, setting, seq_lens.pop() if len(seq_lens) == 1 else None


# ----------------------------------------------------------------------------------------------------------------
# the ramp


@dataclass(frozen=True)
class Stage:
    batch: int
    """Global batch in sequences."""
    start_tokens: float
    end_tokens: float
    steps: int


@dataclass(frozen=True)
class Ramp:
    stages: tuple[Stage, ...]
    unit: int
    """Ladder unit u = GPUs x micro-batch."""
    seq_len: int
    tokens: float
    fixed_batch: int
    below_unit_until: float
    """Tokens up to which CBS(t) < u (the ramp runs at u, above CBS(t)); 0 when never."""

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def fixed_steps(self) -> int:
        return math.ceil(self.tokens / (self.fixed_batch * self.seq_len))

    @property
    def saved(self) -> float:
        """Fraction of the fixed batch's steps the ramp saves (negative: it takes more)."""
        return 1.0 - self.steps / self.fixed_steps

    def schedule_stages(self) -> list[ScheduleStage]:
        """The stages as `pretrain.batch_schedule` trains them (boundaries rounded up to whole tokens: exact)."""
        return [ScheduleStage(s.batch, math.ceil(s.end_tokens)) for s in self.stages[:-1]] + \
            [ScheduleStage(self.stages[-1].batch)]

    def planned(self) -> dict:
        """What the plan predicts, for the schedule file's `planned`."""
        return {"tokens": self.tokens, "seq_len": self.seq_len, "unit": self.unit, "steps": self.steps,
                "fixed_batch": self.fixed_batch, "fixed_steps": self.fixed_steps, "saved": round(self.saved, 6)}


def ladder_floor(cbs: float, unit: int) -> int:
    """The largest u 2^j <= cbs (j >= 0); u when cbs < u."""
    if not cbs >= unit:
        return unit
    return unit * 2 ** int(math.floor(math.log2(cbs / unit) + _EPS))


def _breakpoints(curve: CbsCurve, tokens: float, unit: int, cap: int) -> list[float]:
    """0, D, every knot inside, and every t inside where CBS(t) crosses a ladder value <= cap."""
    cuts = {0.0, float(tokens)}
    for seg in curve.segments:
        cuts.update(t for t in (seg.t_lo, seg.t_hi) if 0 < t < tokens)
    for j in range(int(round(math.log2(cap / unit))) + 1):
        for seg in curve.segments:
            t = seg.crossing(unit * 2 ** j)
            if t is not None and 0 < t < tokens:
                cuts.add(t)
    return sorted(cuts)


def batch_ramp(curve: CbsCurve, tokens: float, unit: int, seq_len: int, fixed_batch: int | None = None) -> Ramp:
    """The schedule of the module docstring, over [0, D] tokens.

    b(t) <= raw(D) everywhere, so ladder values above cap = raw(D) never appear: only their crossings are needed.
    """
    cap = ladder_floor(curve.at(tokens), unit)
    cuts = _breakpoints(curve, tokens, unit, cap)
    spans = list(zip(cuts, cuts[1:]))
    mids = [math.sqrt(a * b) if a > 0 else b / 2 for a, b in spans]  # no crossing inside a span: any point serves
    raw = [min(ladder_floor(curve.at(m), unit), cap) for m in mids]
    below = max((b for (a, b), m in zip(spans, mids) if curve.at(m) < unit), default=0.0)
    batches = raw[:]
    for i in range(len(batches) - 2, -1, -1):  # min over [t, D]: the batch waits where CBS(t) dips later
        batches[i] = min(batches[i], batches[i + 1])
    ends, start = [], 0.0
    for i, (span, b) in enumerate(zip(spans, batches)):
        if i + 1 == len(spans) or batches[i + 1] != b:
            ends.append((b, start, span[1]))
            start = span[1]
    schedule = BatchSchedule([ScheduleStage(b, math.ceil(end)) for b, _, end in ends[:-1]] +
                             [ScheduleStage(ends[-1][0])], seq_len)
    steps = schedule.stage_steps(math.ceil(tokens))
    stages = tuple(Stage(b, a, end, n) for (b, a, end), n in zip(ends, steps))
    return Ramp(stages, unit, seq_len, float(tokens), fixed_batch or stages[0].batch, below)


def describe_ramp(ramp: Ramp, curve: CbsCurve, gpus: int, micro_batch: int) -> list[str]:
    lines = [f"batch ramp for D = {ramp.tokens:,.0f} tokens from CBS(t) of {curve.source}: batches on the ladder "
             f"{ramp.unit} x 2^j ({gpus} GPU(s) x micro-batch {micro_batch}), seq_len {ramp.seq_len}"]
    for i, s in enumerate(ramp.stages, start=1):
        lines.append(f"  stage {i}: global batch {s.batch} (accumulation {s.batch // ramp.unit}) from "
                     f"{s.start_tokens:,.0f} to {s.end_tokens:,.0f} tokens: {s.steps:,} steps")
    lines.append(f"total {ramp.steps:,} steps vs {ramp.fixed_steps:,} at the fixed batch {ramp.fixed_batch}: "
                 f"{100 * ramp.saved:.1f}% {'fewer' if ramp.saved >= 0 else 'more'} steps")
    if ramp.below_unit_until > 0:
        lines.append(f"note: CBS(t) < {ramp.unit} (one micro-batch on every GPU) up to {ramp.below_unit_until:,.0f} "
                     "tokens: the ramp starts above it there; use fewer GPUs or a smaller micro-batch")
    if curve.measured is not None and ramp.tokens > curve.measured[1]:
        lines.append(f"note: CBS(t) is measured up to t = {curve.measured[1]:,.0f} tokens and held flat beyond")
    lines.append("the steps saved hold at matched loss only while each stage's batch is <= CBS(t) (a branch at it "
                 "lost less than the tolerance); Merrill et al. 2025 report 43% fewer steps on OLMo")
    return lines
