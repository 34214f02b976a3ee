"""What a batch ramp changes in a running DeepSpeed engine at a stage change (docs/method.md, "Batch ramp").

The stage of a step is a function of the step (cbs/analysis/batch_schedule.py), so a resumed run finds its stage
again from the step alone; `sync(step)` applies it before the step trains. At a stage of batch b, first stage
b0 (k = b / b0):

- gradient accumulation = b / (micro x ranks) (`engine.set_train_batch_size`; the micro-batch stays, so the
  per-sample computation is unchanged);
- LR x k^(1/2) (sqrt, Adam's rule), k (linear) or 1 (none): `batch_schedule.lr_scaling`;
- AdamW beta2 = the paper's for b (PAPER_BETA2, the study's rule), optimizer.beta2 throughout, or the half-life
  rule's value for b (config.half_life_beta);
- EWA decays by tau^k per step, so that it averages over the same tokens as at b0 (optim.EWA);
- the noise scale's B_big and accumulation (noise.NoiseScale.set_batch).

A fixed batch is the one-stage schedule: k = 1, the configured beta2, nothing changes.
"""

from __future__ import annotations

import math
from typing import Optional

from cbs.pipeline.config import PretrainConfig
from cbs.pipeline.noise import NoiseScale
from cbs.pipeline.optim import EWA


class BatchStages:
    def __init__(self, cfg: PretrainConfig, engine, ewa: EWA, noise: NoiseScale, world_size: int):
        self.cfg, self.engine, self.ewa, self.noise, self.world_size = cfg, engine, ewa, noise, world_size
        self.batches = cfg.batches
        self.stage: Optional[int] = None  # none applied yet: the first sync applies the step's stage
        self.batch = self.batches.first_batch
        self.layout = cfg.layout(world_size)  # the first stage's; every stage checked to split on every rank
        self.grad_accum = self.layout.gradient_accumulation
        self.lr_factor = 1.0

    def sync(self, step: int) -> bool:
        """Apply the stage of `step` (0-based) if it is not the one applied; True when it changed."""
        stage = self.batches.stage_of(step)
        if stage == self.stage:
            return False
        self.stage = stage
        self.batch = self.batches.stages[stage].batch
        self.grad_accum = self.layout.at(self.batch).gradient_accumulation
        self.engine.set_train_batch_size(self.batch)
        if hasattr(self.engine.optimizer, "gradient_accumulation_steps"):  # ZeRO keeps a copy (CPU offload reads it)
            self.engine.optimizer.gradient_accumulation_steps = self.grad_accum
        self.noise.set_batch(self.batch, self.grad_accum)
        first, opt, schedule = self.batches.first_batch, self.cfg.optimizer, self.cfg.batch_schedule
        self.ewa.scale = self.batch / first
        self.lr_factor = schedule.lr_factor(self.batch, first) if schedule else 1.0
        beta2 = schedule.beta2_at(self.batch, opt.beta2) if schedule else opt.beta2
        for group in self.engine.optimizer.param_groups:
            group["betas"] = (opt.beta1, beta2)
        self.beta2 = beta2
        return True

    def describe(self) -> list[dict]:
        """Each stage with its steps within the budget, for config.yaml's `resolved`."""
        b, steps = self.batches, self.batches.stage_steps(self.cfg.train_tokens)
        return [{"batch": s.batch, "until_tokens": s.until_tokens, "start_step": b.start_steps[i],
                 "start_tokens": b.start_seqs[i] * b.seq_len, "steps": steps[i],
                 "gradient_accumulation_steps": self.layout.at(s.batch).gradient_accumulation,
                 "lr_factor": self.cfg.batch_schedule.lr_factor(s.batch, b.first_batch),
                 "beta2": self.cfg.batch_schedule.beta2_at(s.batch, self.cfg.optimizer.beta2)}
                for i, s in enumerate(b.stages)]


class AdaptiveRamp:
    """`batch_schedule.adaptive: noise_scale`: the stages are decided during training. At a log step where the
    noise scale was measured, with B_simple the logged estimate (bias-corrected EMA, noise.py) and f the stated
    `noise_factor`, the batch moves to the highest rung b of the ladder with b <= f B_simple, if that is above the
    batch now; never down. A decision after step s makes step s + 1 the first of the new stage (a stage that ends
    at the tokens seen after s). Decisions go into checkpoints, so a resumed run has the same schedule; the
    metrics log each one (`batch_decision`)."""

    def __init__(self, cfg: PretrainConfig):
        schedule = cfg.batch_schedule
        self.ladder, self.factor, self.seq_len = list(schedule.ladder), schedule.noise_factor, cfg.model.seq_len
        self.decisions: list[dict] = []

    def schedule(self):
        from cbs.analysis.batch_schedule import BatchSchedule, Stage

        stages, batch = [], self.ladder[0]
        for d in self.decisions:
            stages.append(Stage(batch, d["tokens"]))
            batch = d["batch"]
        return BatchSchedule(stages + [Stage(batch)], self.seq_len)

    def decide(self, step: int, tokens: int, b_simple: Optional[float], batch: int) -> Optional[dict]:
        """The decision after `step` steps (`tokens` seen) at `batch`, or None."""
        if b_simple is None or not math.isfinite(b_simple):
            return None
        reach = [b for b in self.ladder if b <= self.factor * b_simple]
        if not reach or reach[-1] <= batch:
            return None
        self.decisions.append({"step": step, "tokens": tokens, "batch": reach[-1], "b_simple": b_simple})
        return self.decisions[-1]
