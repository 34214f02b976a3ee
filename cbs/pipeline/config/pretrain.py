"""`pretrain` config: one GPT run (batch, model, optimizer, schedule, EWA, eval, checkpoints, logging)."""

from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass, field
from typing import Optional

from cbs import batching
from cbs.analysis.batch_schedule import BatchSchedule
from cbs.batching import BatchLayout
from cbs.pipeline.config.batch_schedule import BatchScheduleConfig
from cbs.pipeline.config.loader import ConfigError, _check
from cbs.pipeline.config.model import ModelConfig


class ScheduleKind(str, enum.Enum):
    constant = "constant"
    cosine = "cosine"
    wsd = "wsd"


class OptimizerKind(str, enum.Enum):
    adamw = "adamw"
    """torch AdamW with the LR schedule of `schedule`."""
    schedule_free = "schedule_free"
    """Schedule-free AdamW (Defazio et al. 2024; the `schedulefree` package): trains the point y, evaluates and
    saves the average x (docs/method.md, "Schedule-free AdamW"); wants schedule.kind constant and no EWA."""


@dataclass
class OptimizerConfig:
    kind: OptimizerKind = OptimizerKind.adamw
    """adamw | schedule_free (evaluated and checkpointed at its averaged weights x; constant LR after warmup)."""
    lr: float = 3.16e-3
    """Peak learning rate (the paper's ~3.16e-3)."""
    beta1: float = 0.95
    beta2: float = 0.99
    """AdamW beta2; the paper tunes it per batch size (docs/method.md table), studies fill it in."""
    eps: float = 1e-8
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices only (never norms, biases or embeddings)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""

    def validate(self, p: str) -> None:
        for name in ("lr", "eps", "weight_decay", "grad_clip"):  # .inf passes `> 0` and trains NaN weights
            _check(math.isfinite(getattr(self, name)), f"{p}.{name} must be a finite number: got "
                                                        f"{getattr(self, name)}")
        _check(self.lr > 0, f"{p}.lr must be > 0: got {self.lr}")
        for name in ("beta1", "beta2"):
            _check(0 <= getattr(self, name) < 1, f"{p}.{name} must be in [0, 1): got {getattr(self, name)}")
        _check(self.eps > 0, f"{p}.eps must be > 0: got {self.eps}")
        _check(self.weight_decay >= 0, f"{p}.weight_decay must be >= 0: got {self.weight_decay}")
        _check(self.grad_clip >= 0, f"{p}.grad_clip must be >= 0 (0 disables): got {self.grad_clip}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, defined in tokens so that runs at different batch sizes share it."""

    kind: ScheduleKind = ScheduleKind.constant
    """constant | cosine | wsd (warmup-stable-decay)."""
    warmup_tokens: int = 0
    """Linear warmup from warmup_start_factor x lr to lr over this many tokens."""
    warmup_start_factor: float = 0.1
    """LR at token 0, as a fraction of the peak (the paper starts at 0.1 lr)."""
    final_lr_factor: float = 0.0
    """cosine and wsd end at this fraction of the peak LR, at train_tokens."""
    decay_fraction: float = 0.2
    """wsd: the decay takes the last decay_fraction of train_tokens (linear to final_lr_factor)."""

    def validate(self, p: str) -> None:
        _check(self.warmup_tokens >= 0, f"{p}.warmup_tokens must be >= 0: got {self.warmup_tokens}")
        _check(0 <= self.warmup_start_factor <= 1,
               f"{p}.warmup_start_factor must be in [0, 1]: got {self.warmup_start_factor}")
        _check(0 <= self.final_lr_factor <= 1, f"{p}.final_lr_factor must be in [0, 1]: got {self.final_lr_factor}")
        _check(0 < self.decay_fraction <= 1, f"{p}.decay_fraction must be in (0, 1]: got {self.decay_fraction}")


@dataclass
class EwaConfig:
    taus: list[float] = field(default_factory=list)
    """Decays of the exponential weight averages kept at once (w <- tau w + (1 - tau) theta each step); empty
    disables EWA. The paper uses 0.99-0.9995 depending on the batch size."""

    def validate(self, p: str) -> None:
        for i, tau in enumerate(self.taus):
            _check(0 < tau < 1, f"{p}.taus[{i}] must be in (0, 1): got {tau}")
        _check(len(set(self.taus)) == len(self.taus), f"{p}.taus has duplicates: {self.taus}")


@dataclass
class EvalConfig:
    every_steps: int = 100
    """Evaluate every this many steps (plus step 1, the geometric grid, and the last step)."""
    growth: float = 1.1
    """Also evaluate on the geometric grid of steps 1, g, g^2, ... so that steps-to-target is resolved to about
    (growth - 1) at every scale; 0 disables the grid."""
    eval_tokens: int = 65536
    """Tokens of validation data evaluated each time (a fixed set of sequences: the first ones of val)."""
    micro_batch_seqs: Optional[int] = None
    """Sequences per eval forward pass; default: the training micro-batch."""
    at_tokens: list[int] = field(default_factory=list)
    """Also evaluate at the first step that has seen at least each of these token counts (a study measures its
    reference run's loss at every data budget this way)."""

    def validate(self, p: str) -> None:
        _check(self.every_steps >= 1, f"{p}.every_steps must be >= 1: got {self.every_steps}")
        _check(all(t >= 1 for t in self.at_tokens), f"{p}.at_tokens must be >= 1: got {self.at_tokens}")
        _check(self.growth == 0 or self.growth > 1, f"{p}.growth must be > 1 (or 0 to disable): got {self.growth}")
        _check(self.eval_tokens >= 1, f"{p}.eval_tokens must be >= 1: got {self.eval_tokens}")


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    """Save every this many steps (and at the end); 0 saves only at the end."""
    keep: int = 2
    """Keep the newest this many checkpoints (older are deleted after a save succeeds)."""
    at_tokens: list[int] = field(default_factory=list)
    """Also save at the first step that has seen at least each of these token counts, and keep those
    checkpoints whatever `keep` says (a branched study starts its branches from them)."""

    def validate(self, p: str) -> None:
        _check(self.every_steps >= 0, f"{p}.every_steps must be >= 0: got {self.every_steps}")
        _check(self.keep >= 1, f"{p}.keep must be >= 1: got {self.keep}")
        _check(all(t >= 1 for t in self.at_tokens), f"{p}.at_tokens must be >= 1: got {self.at_tokens}")


@dataclass
class InitFrom:
    """A checkpoint of another run to start from (a branch of it)."""

    run_dir: str
    """The run directory holding the checkpoint."""
    step: int
    """Its step: a complete checkpoint must exist there."""

    def validate(self, p: str) -> None:
        _check(self.step >= 1, f"{p}.step must be >= 1: got {self.step}")


class StopWeights(str, enum.Enum):
    any = "any"
    raw = "raw"
    ewa = "ewa"


class Precision(str, enum.Enum):
    auto = "auto"
    """bf16 on a GPU, fp32 on the CPU."""
    bf16 = "bf16"
    """bf16 weights and activations with fp32 master weights and optimizer state (DeepSpeed's bf16 mode); runs on
    DeepSpeed's CPU accelerator too, so the GPU's precision path can be tested without a GPU."""
    fp32 = "fp32"


class Resume(str, enum.Enum):
    auto = "auto"
    """Continue from the newest checkpoint in run_dir if there is one, else start."""
    never = "never"
    """Start afresh; refuse a run_dir that already holds checkpoints."""


class WandbMode(str, enum.Enum):
    online = "online"
    offline = "offline"
    """Written under RUN_DIR/wandb/ only; upload later with `wandb sync RUN_DIR/wandb/offline-run-*`."""
    disabled = "disabled"


@dataclass
class WandbConfig:
    """Weights & Biases logging beside metrics.jsonl and TensorBoard (cbs/pipeline/metrics.py), rank 0 only. Needs the
    optional package: `pip install -e '.[wandb]'`."""

    project: str
    """The W&B project."""
    entity: Optional[str] = None
    """The W&B team or user; default: your default entity."""
    group: Optional[str] = None
    """Default: the study's name, so that a study's runs group together (standalone runs: no group)."""
    mode: Optional[WandbMode] = None
    """online | offline | disabled; default: the WANDB_MODE environment variable, else online."""

    def validate(self, p: str) -> None:
        import importlib.util

        _check(bool(self.project), f"{p}.project must name a W&B project")
        _check(importlib.util.find_spec("wandb") is not None,
               f"{p} is set but the wandb package is not installed: `pip install -e '.[wandb]'`, or remove {p}")


@dataclass
class LogConfig:
    every_steps: int = 10
    """Train metrics (loss, lr, grad norm, tokens/s) every this many steps."""
    tensorboard: bool = True
    """TB scalars in RUN_DIR/tb (per step), loss against tokens in RUN_DIR/tb/by_tokens, hyper-parameters."""
    wandb: Optional[WandbConfig] = None
    """Also log to Weights & Biases (project, group = the study's name, run name = the run directory's name,
    config = the hyper-parameters); off by default."""

    def validate(self, p: str) -> None:
        _check(self.every_steps >= 1, f"{p}.every_steps must be >= 1: got {self.every_steps}")


@dataclass
class PretrainConfig:
    """`cbs pretrain`: train one GPT run and write the run-directory contract of docs/architecture.md."""

    section = "pretrain"

    data_dir: str
    """A directory made by `cbs preprocess` (manifest.json, train/val shards, tokenizer)."""
    run_dir: str
    """Where config.yaml, metrics.jsonl, tb/, checkpoints/ and result.json go."""
    train_tokens: int
    """Token budget: the run stops after ceil(train_tokens / tokens per step) steps."""
    global_batch_seqs: Optional[int] = None
    """The global batch in sequences: the independent variable of every study. Tokens per step =
    global_batch_seqs x model.seq_len. Gradient accumulation = global / (micro x data-parallel size). Give this or
    batch_schedule."""
    batch_schedule: Optional[BatchScheduleConfig] = None
    """A batch that grows with the tokens seen, instead of global_batch_seqs: a list of stages {batch,
    until_tokens}, or the path of a file `cbs forecast --ramp --out FILE` wrote (docs/method.md, "Batch ramp")."""
    micro_batch_seqs: Optional[int] = None
    """Sequences per forward/backward pass on each rank; default 8. A (first) global batch smaller than it trains as
    one micro-batch of itself, as in a study's sweep (cbs/batching.py)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ewa: EwaConfig = field(default_factory=EwaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    targets: list[float] = field(default_factory=list)
    """Target eval losses: result.json records the first step and tokens at which each is reached."""
    stop_at_targets: bool = False
    """End the run once every target is reached by some weights (see stop_weights): saves compute in sweeps."""
    stop_weights: StopWeights = StopWeights.any
    """Which weights count for stop_at_targets: any (raw or an EWA), raw, or ewa (any EWA tau). A study sets ewa
    so that runs stop on the weights its fit reads."""
    deepspeed_config: str = "ds_configs/zero1.json"
    """ZeRO settings (a file in ds_configs/); batch, clipping and precision fields are written from this config."""
    precision: Precision = Precision.auto
    """auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32. EWA averages and the eval loss are fp32 either way."""
    compile: bool = False
    """torch.compile the model inside the DeepSpeed engine (`engine.compile()`, inductor): the forward and backward
    run as compiled kernels instead of op-by-op Python. Costs a compile at start (tens of seconds; cached across
    runs) and float-rounding-level differences from eager; off by default (docs/method.md, "Throughput and MFU")."""
    seed: int = 1234
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: Resume = Resume.auto
    log: LogConfig = field(default_factory=LogConfig)
    divergence_factor: float = 3.0
    """The run is `diverged` when the train loss is NaN/inf or exceeds this many times its first value."""
    init_from: Optional[InitFrom] = None
    """Start from another run's checkpoint: its weights and optimizer state (it must have the same model and
    number of ranks), continuing its data stream where it stopped; this run counts its own steps and tokens
    from 0 and starts its EWA afresh. A branched study sets it."""
    study: Optional[dict] = None
    """Written by `cbs study`: the settings (model, data budget, target) this run serves; passed through."""

    def validate(self, p: str) -> None:
        _check((self.global_batch_seqs is None) != (self.batch_schedule is None),
               f"{p}: give exactly one of global_batch_seqs (a fixed batch) and batch_schedule (a batch ramp)")
        _check(self.global_batch_seqs is None or self.global_batch_seqs >= 1,
               f"{p}.global_batch_seqs must be >= 1: got {self.global_batch_seqs}")
        if self.batch_schedule is not None:
            self.batch_schedule.check_budget(f"{p}.batch_schedule", self.train_tokens)
        _check(self.micro_batch_seqs is None or self.micro_batch_seqs >= 1,
               f"{p}.micro_batch_seqs must be >= 1: got {self.micro_batch_seqs}")
        _check(self.train_tokens >= 1, f"{p}.train_tokens must be >= 1: got {self.train_tokens}")
        if self.batch_schedule is not None:  # its stage boundaries are checked by check_budget, its first batch here
            first = self.batch_schedule.all_batches[0]
            _check(first * self.model.seq_len <= self.train_tokens,
                   f"{p}.batch_schedule's first batch {first} x model.seq_len {self.model.seq_len} = "
                   f"{first * self.model.seq_len:,} tokens per step is more than {p}.train_tokens "
                   f"({self.train_tokens:,}): one step would train past the budget; lower the first batch or raise "
                   f"train_tokens")
        else:
            _check(self.tokens_per_step <= self.train_tokens,
                   f"{p}.global_batch_seqs {self.global_batch_seqs} x model.seq_len {self.model.seq_len} = "
                   f"{self.tokens_per_step:,} tokens per step is more than {p}.train_tokens "
                   f"({self.train_tokens:,}): one step would train past the budget; lower global_batch_seqs to at "
                   f"most {max(self.train_tokens // self.model.seq_len, 1)} or raise train_tokens")
        for i, t in enumerate(self.targets):
            _check(t > 0, f"{p}.targets[{i}] must be a loss > 0: got {t}")
        _check(not self.stop_at_targets or self.targets, f"{p}.stop_at_targets needs {p}.targets")
        _check(self.stop_weights is not StopWeights.ewa or self.ewa.taus,
               f"{p}.stop_weights is ewa but {p}.ewa.taus is empty: give taus or stop_weights any")
        _check(self.divergence_factor > 1, f"{p}.divergence_factor must be > 1: got {self.divergence_factor}")
        if self.optimizer.kind is OptimizerKind.schedule_free:
            self._validate_schedule_free(p)

    def _validate_schedule_free(self, p: str) -> None:
        """Schedule-free AdamW replaces the LR decay by its own averaging: a decaying schedule would anneal twice,
        and an EWA would average y, the point it trains, not x, the average it evaluates."""
        _check(self.schedule.kind is ScheduleKind.constant,
               f"{p}.schedule.kind is {self.schedule.kind.value} but {p}.optimizer.kind is schedule_free, which "
               f"averages its iterates in place of a decaying LR (it wants a constant LR after warmup): set "
               f"{p}.schedule.kind: constant, or optimizer.kind: adamw for a {self.schedule.kind.value} schedule")
        _check(not self.ewa.taus,
               f"{p}.ewa.taus is set but {p}.optimizer.kind is schedule_free, whose evaluated weights x already are "
               f"an average of the iterates (an EWA would average the training point y instead): set ewa.taus: []")

    @property
    def micro_batch(self) -> int:
        """The micro-batch every rank trains (cbs.batching.micro_batch_for): micro_batch_seqs or the default, at
        most the first global batch."""
        return batching.micro_batch_for(self.batches.first_batch, self.micro_batch_seqs)

    def layout(self, data_parallel: int = 1) -> BatchLayout:
        """The first (or only) batch on `data_parallel` ranks, after checking that every batch the run may train
        at (each stage of a ramp, each rung of an adaptive ladder) splits into micro-batches on every rank;
        ConfigError naming the batch's key otherwise."""
        schedule = self.batch_schedule
        with batch_errors_as_config_errors():
            if schedule is None:
                return BatchLayout.resolve(self.global_batch_seqs, self.model.seq_len, data_parallel,
                                           self.micro_batch_seqs)
            batches = schedule.all_batches
            kind = "ladder[{}]" if schedule.adaptive else "stages[{}].batch"
            keys = [f"pretrain.batch_schedule.{kind.format(i)}" for i in range(len(batches))]
            first = BatchLayout.resolve(batches[0], self.model.seq_len, data_parallel, self.micro_batch_seqs,
                                        keys[0])
            for batch, key in zip(batches[1:], keys[1:]):
                first.at(batch, key)
            return first

    @property
    def batches(self) -> BatchSchedule:
        """The batch of every step (one stage for a fixed batch): cbs/analysis/batch_schedule.py's arithmetic."""
        if self.batch_schedule is None:
            return BatchSchedule.fixed(self.global_batch_seqs, self.model.seq_len)
        return BatchSchedule(self.batch_schedule.parsed(), self.model.seq_len)

    @property
    def tokens_per_step(self) -> int:
        """Of a fixed batch (a ramp has one per stage: see `batches`)."""
        if self.batch_schedule is not None:
            raise ValueError("a batch schedule has no single tokens per step; use cfg.batches")
        return self.global_batch_seqs * self.model.seq_len

    @property
    def total_steps(self) -> int:
        return self.batches.total_steps(self.train_tokens)


def gradient_accumulation(global_batch_seqs: int, micro_batch_seqs: int, data_parallel: int,
                          key: str = "global_batch_seqs") -> int:
    """global = micro x data-parallel x accumulation, exactly; anything else is refused before a run starts
    (cbs.batching.gradient_accumulation, its BatchError a ConfigError here)."""
    with batch_errors_as_config_errors():
        return batching.gradient_accumulation(global_batch_seqs, micro_batch_seqs, data_parallel, key)


@contextlib.contextmanager
def batch_errors_as_config_errors():
    """cbs.batching's refusals (torch-free, no ConfigError there) as ConfigErrors: bad input, exit 2."""
    try:
        yield
    except batching.BatchError as e:
        raise ConfigError(str(e)) from None
