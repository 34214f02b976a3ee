"""The batch plan or ramp of `cbs forecast` in the syntax of the trainers users run next (`--format`):

    megatron    Megatron-LM flags: --global-batch-size, --micro-batch-size, --seq-length, --train-samples and, for a
                ramp, --rampup-batch-size START INCR SAMPLES
    torchtitan  TOML [training] tables (global_batch_size, local_batch_size, seq_len, steps), one per stage
    olmo-core   Python for OLMo-core: the data loader's global batch in tokens and, for a ramp, a
                BatchSizeSchedulerCallback(batch_sizes=[tokens...], schedule=[Duration.tokens(t)...])

A plan is a list of stages (global batch in sequences over [start, end) tokens); a fixed batch plan is one stage.

Megatron-LM's ramp is linear, not a staircase: at `c` consumed samples its batch is

    b_M(c) = START + INCR floor(c / (SAMPLES / K)),  K = (G - START) / INCR,    and G once c > SAMPLES

(megatron/core/num_microbatches_calculator.py, RampupBatchsizeNumMicroBatchesCalculator). The export takes START =
the first stage's batch, G = the last one's, INCR = the ladder unit (GPUs x micro-batch, so that every batch divides
into micro-batches), and the smallest SAMPLES for which b_M(c) never exceeds the plan's batch at c: level j (batch
START + j INCR) is reached at c = j SAMPLES / K and must not come before the first stage whose batch is >= it, so
SAMPLES = K max_j (S_j / j), S_j that stage's first sample. The ramp then never runs above CBS(t) and takes more steps
than the staircase; the export says how many. torchtitan has no batch-size schedule: each stage is its own run that
resumes from the previous stage's checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cbs.analysis.forecast import BatchPlan
from cbs.analysis.ramp import Ramp, Stage

FORMATS = ("megatron", "torchtitan", "olmo-core")


@dataclass(frozen=True)
class TrainerPlan:
    """What every export needs: the stages, and how a batch divides into micro-batches."""

    stages: tuple[Stage, ...]
    seq_len: int
    micro_batch_seqs: int
    gpus: int
    tokens: float
    source: str
    """One line saying where the plan comes from (printed as a comment)."""

    @property
    def unit(self) -> int:
        return self.gpus * self.micro_batch_seqs

    @property
    def train_samples(self) -> int:
        return math.ceil(self.tokens / self.seq_len)


def from_batch_plan(plan: BatchPlan, tokens: float, source: str) -> TrainerPlan:
    stage = Stage(plan.global_batch_seqs, 0.0, float(tokens), plan.steps_for(tokens))
    return TrainerPlan((stage,), plan.seq_len, plan.micro_batch_seqs, plan.gpus, float(tokens), source)


def from_ramp(ramp: Ramp, gpus: int, micro_batch_seqs: int, source: str) -> TrainerPlan:
    return TrainerPlan(ramp.stages, ramp.seq_len, micro_batch_seqs, gpus, ramp.tokens, source)


def _comments(lines: list[str]) -> str:
    return "".join(f"# {line}\n" for line in lines)


# ------------------------------------------------------------------------------------------------------- Megatron


@dataclass(frozen=True)
class MegatronRamp:
    start: int
    increment: int
    samples: int
    steps: int
    """Steps Megatron-LM takes over the whole budget with this ramp."""


def megatron_batch(ramp: MegatronRamp, final: int, consumed: float) -> int:
    """b_M(c) of the module docstring."""
    k = (final - ramp.start) // ramp.increment
    if consumed > ramp.samples or k == 0:
        return final
    return ramp.start + int(consumed / (ramp.samples / k)) * ramp.increment


def megatron_ramp(plan: TrainerPlan) -> MegatronRamp | None:
    """The conservative linear ramp of the module docstring; None for a one-stage plan."""
    first, final = plan.stages[0].batch, plan.stages[-1].batch
    if final == first:
        return None
    inc = plan.unit
    k = (final - first) // inc
    per_level = 0.0
    for j in range(1, k + 1):
        stage = next(s for s in plan.stages if s.batch >= first + j * inc)
        per_level = max(per_level, stage.start_tokens / plan.seq_len / j)
    ramp = MegatronRamp(first, inc, max(1, math.ceil(per_level * k)), 0)
    return MegatronRamp(ramp.start, inc, ramp.samples, _megatron_steps(ramp, final, plan.train_samples))


def _megatron_steps(ramp: MegatronRamp, final: int, total: int) -> int:
    """Steps until `total` samples are consumed, jumping from one batch change to the next: the batch is constant
    until consumed reaches the next level, (j + 1) SAMPLES / K."""
    per_level = ramp.samples / ((final - ramp.start) // ramp.increment)
    consumed, steps = 0, 0
    while consumed < total:
        b = megatron_batch(ramp, final, consumed)
        nxt = total if b == final else min(total, math.ceil(per_level * (int(consumed / per_level) + 1)))
        n = max(1, math.ceil((nxt - consumed) / b))
        consumed, steps = consumed + n * b, steps + n
    return steps


def megatron(plan: TrainerPlan) -> str:
    """Comment lines, then one line of Megatron-LM flags."""
    final = plan.stages[-1].batch
    flags = [f"--global-batch-size {final}", f"--micro-batch-size {plan.micro_batch_seqs}",
             f"--seq-length {plan.seq_len}", f"--train-samples {plan.train_samples}"]
    notes = [f"cbs forecast: {plan.source}", f"Megatron-LM on {plan.gpus} data-parallel GPU(s); "
             f"{plan.train_samples:,} samples = {plan.tokens:,.0f} tokens"]
    ramp = megatron_ramp(plan)
    if ramp is not None:
        flags.insert(1, f"--rampup-batch-size {ramp.start} {ramp.increment} {ramp.samples}")
        planned = sum(s.steps for s in plan.stages)
        notes += [f"Megatron-LM's ramp is linear in samples, not the plan's {len(plan.stages)} stages: this one goes "
                  f"from {ramp.start} to {final} in steps of {ramp.increment} over {ramp.samples:,} samples and never "
                  f"runs above the plan's batch, so it takes {ramp.steps:,} steps instead of {planned:,}",
                  "stages of the plan: " + ", ".join(f"{s.batch} from {s.start_tokens:,.0f} tokens"
                                                     for s in plan.stages)]
    else:
        notes.append(f"fixed global batch {final} sequences: {plan.stages[0].steps:,} steps")
    return _comments(notes) + " ".join(flags) + "\n"


# ----------------------------------------------------------------------------------------------------- torchtitan


def torchtitan_stages(plan: TrainerPlan) -> list[str]:
    """One TOML document per stage; `steps` counts from the start of training (torchtitan resumes a run from
    its checkpoint and trains until `training.steps`)."""
    docs, done = [], 0
    for i, s in enumerate(plan.stages, start=1):
        done += s.steps
        notes = [f"cbs forecast: {plan.source}"]
        if len(plan.stages) > 1:
            notes.append(f"stage {i} of {len(plan.stages)}: global batch {s.batch} from {s.start_tokens:,.0f} to "
                         f"{s.end_tokens:,.0f} tokens; torchtitan has no batch-size schedule, so run the stages "
                         "in order, each resuming from the previous stage's checkpoint")
        body = (f"[training]\nglobal_batch_size = {s.batch}\nlocal_batch_size = {plan.micro_batch_seqs}\n"
                f"seq_len = {plan.seq_len}\nsteps = {done}\n")
        if len(plan.stages) > 1:
            body += "\n[checkpoint]\nenable = true\n"
        docs.append(_comments(notes) + body)
    return docs


STAGE_SEPARATOR = "# ----- next stage: a separate torchtitan config -----\n"


def torchtitan(plan: TrainerPlan) -> str:
    return STAGE_SEPARATOR.join(torchtitan_stages(plan))


# ------------------------------------------------------------------------------------------------------ OLMo-core


def olmo_core(plan: TrainerPlan) -> str:
    """OLMo-core counts the global batch in tokens; a ramp is a BatchSizeSchedulerCallback whose schedule starts at
    0 (stage starts rounded up to whole tokens, so that no batch starts before the plan's)."""
    tokens = [s.batch * plan.seq_len for s in plan.stages]
    lines = [f"# cbs forecast: {plan.source}",
             f"# OLMo-core counts the global batch in tokens: sequences x seq_len {plan.seq_len}",
             f"GLOBAL_BATCH_SIZE_TOKENS = {tokens[0]}  # data loader's global_batch_size (the first stage's)"]
    if len(plan.stages) > 1:
        starts = ", ".join(f"Duration.tokens({math.ceil(s.start_tokens)})" for s in plan.stages)
        lines = lines[:2] + [
            "# the callback also scales the learning rate by sqrt(new batch / old batch) at each switch",
            "from olmo_core.train.callbacks import BatchSizeSchedulerCallback",
            "from olmo_core.train.common import Duration", "", lines[2],
            "batch_size_scheduler = BatchSizeSchedulerCallback(",
            f"    batch_sizes=[{', '.join(str(t) for t in tokens)}],",
            f"    schedule=[{starts}],", ")"]
    return "\n".join(lines) + "\n"


def export(plan: TrainerPlan, fmt: str) -> str:
    return {"megatron": megatron, "torchtitan": torchtitan, "olmo-core": olmo_core}[fmt](plan)
