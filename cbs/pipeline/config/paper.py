"""The paper's near-optimal per-batch hyper-parameters (Zhang et al. 2025; docs/method.md), B in sequences."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from cbs.pipeline.config.loader import _check

# Batches between or beyond the table take the nearest entry in log space.
PAPER_BETA2 = {64: .999, 128: .999, 256: .995, 512: .99, 1024: .99, 2048: .95, 4096: .95, 8192: .95, 16384: .95}
PAPER_TAU = {64: .9995, 128: .9995, 256: .9995, 512: .9995, 1024: .999, 2048: .998, 4096: .995, 8192: .99,
             16384: .99}


def paper_value(table: dict[int, float], batch: int) -> float:
    """The table's value at the entry nearest to `batch` in log space."""
    return table[min(table, key=lambda b: abs(math.log(b) - math.log(batch)))]


PAPER_BETA1 = 0.95
"""The paper's AdamW beta1, the same at every batch."""


class BetaRule(str, enum.Enum):
    """How an AdamW beta follows the batch B (sequences) across a study's runs or a ramp's stages."""

    paper = "paper"
    """The paper's value for B: beta2 from its per-batch table (PAPER_BETA2), beta1 0.95 at every batch."""
    fixed = "fixed"
    """The given value at every batch (beta2: hparams.beta2 in a study, optimizer.beta2 in a ramp; beta1:
    optimizer.beta1)."""
    half_life = "half_life"
    """beta(B) = clip(ref ** (B / ref_batch), lo, hi): the same half-life in tokens at every batch (half_life)."""


Beta2Rule = BetaRule  # the ramp's beta2 rule, by its older name


def half_life_beta(batch: float, ref: float, ref_batch: float, lo: float, hi: float) -> float:
    """beta(B) = clip(ref ** (B / ref_batch), lo, hi) (Marek et al. 2025, "Small batch size training for language
    models"). An EMA with decay beta per step of B sequences of T tokens halves a contribution after
    ln(1/2) / ln(beta) steps, i.e. B T ln(1/2) / ln(beta) tokens; ref ** (B / ref_batch) keeps that token
    half-life at ref_batch's at every B. The clip keeps beta below 1 at tiny batches (an average that never moves)
    and above a floor at huge ones (an average over only a few steps)."""
    return min(max(ref ** (batch / ref_batch), lo), hi)


@dataclass
class HalfLifeBetas:
    """The half_life rule's constants (docs/method.md, "AdamW betas per batch"). Defaults: beta2 0.999 at 64
    sequences, the paper's smallest batch and its value there (the rule is then within 0.006 of the paper's table
    up to 1024 sequences, 0.018 at 2048), clipped to [0.95, 0.9999]; beta1 0.95 (the paper's) at 64, clipped to
    [0.9, 0.99]."""

    ref_batch: int = 64
    """B_ref: the batch (sequences) at which the betas are beta2_ref and beta1_ref."""
    beta2_ref: float = 0.999
    beta2_clip: list[float] = field(default_factory=lambda: [0.95, 0.9999])
    """[lo, hi] of beta2."""
    beta1_ref: float = 0.95
    beta1_clip: list[float] = field(default_factory=lambda: [0.9, 0.99])
    """[lo, hi] of beta1."""

    def validate(self, p: str) -> None:
        _check(self.ref_batch >= 1, f"{p}.ref_batch must be a batch >= 1 (sequences): got {self.ref_batch}")
        for name in ("beta2", "beta1"):
            ref, clip = getattr(self, f"{name}_ref"), getattr(self, f"{name}_clip")
            _check(0 <= ref < 1, f"{p}.{name}_ref must be in [0, 1): got {ref}")
            _check(len(clip) == 2 and all(0 <= c < 1 for c in clip) and clip[0] <= clip[1],
                   f"{p}.{name}_clip must be [lo, hi] with 0 <= lo <= hi < 1: got {clip}")

    def at(self, name: str, batch: int) -> float:
        """beta1 or beta2 (`name`) at `batch` sequences, rounded to 6 digits (as written into configs)."""
        lo, hi = getattr(self, f"{name}_clip")
        return round(half_life_beta(batch, getattr(self, f"{name}_ref"), self.ref_batch, lo, hi), 6)

    def describe(self, name: str) -> str:
        lo, hi = getattr(self, f"{name}_clip")
        return f"{name}(B) = clip({getattr(self, f'{name}_ref'):g}^(B/{self.ref_batch}), {lo:g}, {hi:g})"


def rule_beta(rule: BetaRule, name: str, batch: int, fixed: float, half_life: HalfLifeBetas) -> float:
    """beta1 or beta2 (`name`) at `batch` sequences under `rule`; `fixed` is the given value."""
    if rule is BetaRule.half_life:
        return half_life.at(name, batch)
    if rule is BetaRule.paper:
        return paper_value(PAPER_BETA2, batch) if name == "beta2" else PAPER_BETA1
    return fixed
