"""Branched local CBS(t) beside a sweep's CBS at a matching data budget (docs/method.md, "Branched local CBS").

What is compared with what: the sweep's CBS of a setting (N, D) is B* = (1 + o) B0 + o B_noise from full runs at
each batch trained to that setting's target (Zhang et al. 2025, sec. 3.1): the batch to train a whole run of D
tokens with. The local CBS(t) is the largest batch at which a short branch from the base run's state after t tokens
loses nothing measurable (Merrill et al. 2025): the batch to switch to at t. A pair is made where both have the
same model (N) and the sweep's D is within MATCH of t. They agree when training at a fixed batch is limited by the
late phase: Merrill et al. find the local CBS near 0 at initialisation, rising fast, then plateauing. The sweep
side is read from the sweep fit's cbs.csv, so any `cbs fit` output serves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cbs.analysis import InputError, csv_dicts, csv_float, read_csv_lines
from cbs.analysis.branched import LocalCbs

MATCH = 0.1
"""A sweep setting matches a branch point t when |D - t| <= MATCH x t (and N is the same)."""
SWEEP_COLUMNS = ("setting", "model_params", "tokens", "cbs", "cbs_low", "cbs_high")


@dataclass(frozen=True)
class SweepCbs:
    """One setting of a sweep fit (a row of its cbs.csv)."""

    setting: str
    model_params: int
    tokens: int
    cbs: float
    cbs_low: float
    cbs_high: float
    """Its interval (NaN when the fit gave none)."""


@dataclass(frozen=True)
class Comparison:
    point: LocalCbs
    sweep: SweepCbs

    @property
    def ratio(self) -> float:
        """Local CBS(t) over the sweep's CBS at D."""
        return self.point.cbs / self.sweep.cbs


def read_sweep_cbs(path: str | Path) -> tuple[list[SweepCbs], str]:
    """The fitted settings of a sweep fit (OUT_DIR of `cbs fit`, or its cbs.csv), and the file read."""
    path = Path(path)
    csv_path = path / "cbs.csv" if path.is_dir() else path
    if not csv_path.is_file():
        raise InputError(f"--compare {path}: no cbs.csv there; give the output directory of `cbs fit` on a sweep "
                         "study")
    rows = csv_dicts(read_csv_lines(csv_path, f"--compare {csv_path}"))
    missing = [c for c in SWEEP_COLUMNS if not rows or c not in rows[0]]
    if missing:
        raise InputError(f"--compare {csv_path}: not a sweep fit's cbs.csv (missing column(s) {', '.join(missing)}"
                         " or no rows); give the output directory of `cbs fit` on a sweep study")
    out = []
    for i, row in enumerate(rows, start=2):
        if not row["cbs"]:
            continue  # a setting the sweep could not fit: nothing to compare
        try:
            out.append(SweepCbs(row["setting"], int(float(row["model_params"])), int(float(row["tokens"])),
                                float(row["cbs"]), csv_float(row["cbs_low"]), csv_float(row["cbs_high"])))
        except ValueError as e:
            raise InputError(f"--compare {csv_path}, line {i}: {e}; rewrite it with `cbs fit`") from None
    return out, str(csv_path)


def compare(points: list[LocalCbs], sweep: list[SweepCbs], match: float = MATCH) -> list[Comparison]:
    """Every (point with a CBS, sweep setting) pair with the same N and |D - t| <= match x t."""
    pairs = []
    for p in points:
        if not math.isfinite(p.cbs):
            continue
        for s in sweep:
            if s.model_params == p.setting.model_params and abs(s.tokens - p.tokens) <= match * p.tokens:
                pairs.append(Comparison(p, s))
    return pairs
