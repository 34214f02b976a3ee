"""`pretrain.batch_schedule` config: a global batch that grows with the tokens seen (and `study.ramp`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

from cbs.pipeline.config.loader import ConfigError, _check
from cbs.pipeline.config.paper import Beta2Rule, BetaRule, HalfLifeBetas, rule_beta  # noqa: F401 (Beta2Rule: the old name)


class LrScaling(str, enum.Enum):
    sqrt = "sqrt"
    """LR x sqrt(k) at k times the batch: the rule for Adam."""
    linear = "linear"
    """LR x k (SGD's rule)."""
    none = "none"


ADAPTIVE_SIGNALS = ("noise_scale",)


@dataclass
class BatchScheduleConfig:
    """`pretrain.batch_schedule`: the global batch grows with the tokens seen (cbs/analysis/batch_schedule.py). In YAML
    a list is short for `{stages: LIST}` and a string for `{file: PATH}`."""

    file: Optional[str] = None
    """A batch schedule file written by `cbs forecast --ramp --out FILE`."""
    stages: Optional[list[Any]] = None
    """Stages {batch: B, until_tokens: T}: batch B while fewer than T tokens were seen; the last stage has no
    until_tokens (it runs to the budget). Batches never decrease."""
    lr_scaling: LrScaling = LrScaling.sqrt
    """How a stage at k times the first stage's batch scales optimizer.lr: sqrt (Adam), linear, none."""
    beta2: BetaRule = BetaRule.paper
    """paper (each stage's beta2 from the paper's per-batch table, the study's rule) | fixed (optimizer.beta2) |
    half_life (clip(ref ** (b / ref_batch), lo, hi) with half_life's constants)."""
    half_life: HalfLifeBetas = field(default_factory=HalfLifeBetas)
    """Constants of beta2: half_life (its beta2_ref, beta2_clip and ref_batch)."""
    adaptive: Optional[str] = None
    """noise_scale: instead of stages, raise the batch along `ladder` during training, at a log step where
    noise_factor x the logged B_simple (train/noise_scale) reaches a higher rung (the highest such rung; never
    down). The decisions are logged (`batch_decision`) and kept in checkpoints."""
    ladder: Optional[list[int]] = None
    """adaptive: the batches it may take, increasing; it starts at the first."""
    noise_factor: float = 1.0
    """adaptive: the multiple of B_simple compared with the ladder (B_simple estimates the critical batch up to
    a factor; McCandlish et al. 2018)."""

    @classmethod
    def expand(cls, data: Any, key: str) -> Any:
        if isinstance(data, list):
            return {"stages": data}
        return {"file": data} if isinstance(data, str) else data

    def validate(self, p: str) -> None:
        given = [k for k in ("file", "stages", "adaptive") if getattr(self, k) is not None]
        _check(len(given) == 1, f"{p}: give exactly one of file (a `cbs forecast --ramp --out` file), stages and "
                                f"adaptive: got {', '.join(given) or 'none'}")
        if self.adaptive is not None:
            _check(self.adaptive in ADAPTIVE_SIGNALS, f"{p}.adaptive must be one of {', '.join(ADAPTIVE_SIGNALS)}: "
                                                      f"got {self.adaptive!r}")
            ladder = self.ladder or []
            _check(len(ladder) >= 2 and all(b >= 1 for b in ladder) and ladder == sorted(set(ladder)),
                   f"{p}.ladder must list >= 2 increasing batches (the first is where training starts): got "
                   f"{self.ladder}")
            _check(self.noise_factor > 0, f"{p}.noise_factor must be > 0: got {self.noise_factor}")
        else:
            _check(self.ladder is None, f"{p}.ladder goes with adaptive: noise_scale")
        self.parsed(p)

    @property
    def all_batches(self) -> list[int]:
        """Every batch the run may train at (each must split into micro-batches on every rank)."""
        return list(self.ladder) if self.adaptive else [s.batch for s in self.parsed()]

    def parsed(self, p: str = "pretrain.batch_schedule", train_tokens: Optional[int] = None) -> list:
        """The stages, read (from the file) and checked; ConfigError naming the key."""
        from cbs.analysis.batch_schedule import ScheduleError, Stage, parse_stages, read_schedule_file

        if self.adaptive is not None:  # it starts at the ladder's first rung; the run decides the rest
            return [Stage(self.ladder[0])]
        try:
            if self.file is None:
                return parse_stages(self.stages, train_tokens)
            # read once per config: `batches` (the micro-batch default, every step's stage) asks often
            if getattr(self, "_file_stages", None) is None:
                self._file_stages = read_schedule_file(self.file)
            return parse_stages(self._file_stages, train_tokens)
        except ScheduleError as e:
            # every message starts with its key (stages[1].batch ...): prefixed, it names the full key
            raise ConfigError(f"{p}.file ({self.file}): {e}" if self.file is not None else f"{p}.{e}") from None

    def check_budget(self, p: str, train_tokens: int) -> None:
        self.parsed(p, train_tokens)

    def lr_factor(self, batch: int, first_batch: int) -> float:
        """LR multiplier of a stage at `batch`: (b / b0)^(1/2) for sqrt, b / b0 for linear, 1 for none."""
        k = batch / first_batch
        return {LrScaling.sqrt: k ** 0.5, LrScaling.linear: k, LrScaling.none: 1.0}[self.lr_scaling]

    def beta2_at(self, batch: int, fixed: float) -> float:
        return rule_beta(self.beta2, "beta2", batch, fixed, self.half_life)
