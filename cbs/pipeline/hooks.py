"""The pretrain loop's hooks: log (train loss, throughput, MFU, memory, the divergence guard), eval (raw and EWA
weights, target crossings) and checkpoint, and the step grid that says when each is due.

A hook is a small object with `due(step) -> bool` and `__call__(step) -> Optional[Stop]`: the loop calls each due
hook after the step, in order, and a hook that returns a `Stop` (cbs/pipeline/stopping.py) ends the run after it
(the hooks after it are not called for that step). Hooks write metrics through `emit(metrics, step)` and never
touch the trainer; what they hold that a resume restores (the first logged loss, the latest evals, the target
crossings) goes into the checkpoint's TrainState (cbs/pipeline/checkpointing.py).
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from typing import Callable, ContextManager, Optional, Protocol

import torch

from cbs.pipeline.config import CheckpointConfig, PretrainConfig, steps_for
from cbs.pipeline.distributed import Dist
from cbs.pipeline.evaluate import sharded_eval_loss
from cbs.pipeline.noise import NoiseScale
from cbs.pipeline.optim import EWA
from cbs.pipeline.stopping import DIVERGED, TARGETS, Stop
from cbs.pipeline.targets import TargetTracker, eval_key
from cbs.pipeline.utils import log
from cbs.runfiles import TOKENS_PER_S, TRAIN_LOSS

# Peak dense bf16 FLOP/s by device name (substring match), for MFU; none on CPU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}

Emit = Callable[[dict, int], None]
"""Writes metrics logged after a step: emit(metrics, step) (the trainer adds the tokens seen)."""


def peak_flops(dist: Dist) -> Optional[float]:
    if not dist.cuda:
        return None
    name = torch.cuda.get_device_name(dist.device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class Hook(Protocol):
    def due(self, step: int) -> bool:
        """Whether the hook runs after `step` (1-based: the steps trained so far)."""

    def __call__(self, step: int) -> Optional[Stop]:
        """Run after `step`; a Stop ends the run."""


# ---------------------------------------------------------------------------------------------------- when


def eval_steps(total_steps: int, every: int, growth: float) -> set[int]:
    """Steps (1-based) at which to evaluate: 1, every multiple of `every`, the geometric grid round(g^k) (so
    steps-to-target is resolved to about g - 1 at every scale), and the last step."""
    steps = {1, total_steps} | set(range(every, total_steps + 1, every))
    if growth:
        s = 1
        while s <= total_steps:  # floor(s g) keeps every gap within growth - 1 of the step before it
            steps.add(s)
            s = max(s + 1, int(s * growth))
    return {s for s in steps if 1 <= s <= total_steps}


class StepPlan:
    """A run's steps: the batch of each (a BatchSchedule), their number within the token budget, and the steps at
    which logs, evals and kept checkpoints fall. An adaptive ramp replaces the schedule as it decides
    (`reschedule`), and every grid follows."""

    def __init__(self, cfg: PretrainConfig, batches):
        self.cfg = cfg
        self.reschedule(batches)

    def reschedule(self, batches) -> None:
        self.batches = batches
        self.total_steps = batches.total_steps(self.cfg.train_tokens)
        self.eval_grid = self.eval_grid_steps()
        self.kept_steps = self.steps_at(self.cfg.checkpoint.at_tokens)  # saved there and never pruned

    def steps_at(self, tokens: list[int]) -> set[int]:
        """The first step that has seen at least each token count (the last step for counts beyond it)."""
        return {min(self.batches.steps_for(t), self.total_steps) for t in tokens}

    def tokens_at(self, step: int) -> int:
        """Tokens seen after `step` steps."""
        return self.batches.tokens_before(step)

    def eval_grid_steps(self) -> set[int]:
        """eval_steps' grid laid in tokens, at the first stage's batch b0: the steps that first see k b0 T tokens
        for every k of the grid, so a ramp is evaluated at the tokens a fixed-b0 run is (the same steps for a
        fixed batch), plus eval.at_tokens and the last step."""
        tokens_b0 = self.batches.first_batch * self.cfg.model.seq_len
        grid_b0 = eval_steps(steps_for(self.cfg.train_tokens, tokens_b0), self.cfg.eval.every_steps,
                             self.cfg.eval.growth)
        return self.steps_at([k * tokens_b0 for k in grid_b0] + self.cfg.eval.at_tokens) | {self.total_steps}

    def log_due(self, step: int) -> bool:
        """Every log.every_steps steps, the first and the last step, and the first step of every stage (logged
        with its batch)."""
        return (step % self.cfg.log.every_steps == 0 or step in (1, self.total_steps)
                or step - 1 in self.batches.start_steps)


# ---------------------------------------------------------------------------------------------------- log


class LossWindow:
    """The train losses since the last log, summed on the device (no host sync per step); read at log steps."""

    def __init__(self, dist: Dist):
        self.dist = dist
        self.sum = torch.zeros((), device=dist.device)
        self.count = 0

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss
        self.count += 1

    def take_mean(self) -> float:
        """Mean train loss since the last log, averaged over data-parallel ranks (a sync point: log steps only);
        the window restarts."""
        import torch.distributed as dist

        value = self.sum / max(self.count, 1)
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        self.sum.zero_()
        self.count = 0
        return value.item() / self.dist.world_size

    def saved(self) -> tuple[float, int]:
        """(sum, count), the sum averaged over ranks (rank 0's checkpoint state is what every rank loads): a resume
        off the log grid then logs the mean over the whole window, as the uninterrupted run does. Collective."""
        import torch.distributed as dist

        window = self.sum.detach().clone()
        if self.dist.world_size > 1:
            dist.all_reduce(window, op=dist.ReduceOp.SUM)
        return window.item() / self.dist.world_size, self.count

    def load(self, window: tuple[float, int]) -> None:
        window_sum, self.count = window
        self.sum.fill_(window_sum)


class LogHook:
    """Train loss (mean since the last log), LR, batch, throughput, MFU, peak memory, gradient norm and noise scale;
    and the divergence guard: a non-finite loss, or one above divergence_factor x the first logged one, stops the
    run as diverged."""

    def __init__(self, cfg: PretrainConfig, dist: Dist, engine, noise: NoiseScale, plan: StepPlan,
                 losses: LossWindow, lr: Callable[[], float], flops_per_token: float, emit: Emit):
        self.cfg, self.dist, self.engine, self.noise, self.plan = cfg, dist, engine, noise, plan
        self.losses, self.lr, self.flops_per_token, self.emit = losses, lr, flops_per_token, emit
        self.peak = peak_flops(dist)
        self.first_loss: Optional[float] = None
        self.restart_window(0)

    def due(self, step: int) -> bool:
        return self.plan.log_due(step)

    def restart_window(self, step: int) -> None:
        """Throughput is measured from now and `step` (after an eval: eval time is not training throughput)."""
        self._window = (time.perf_counter(), step)

    def __call__(self, step: int) -> Optional[Stop]:
        loss = self.losses.take_mean()
        start, start_step = self._window
        tokens_per_s = (self.plan.tokens_at(step) - self.plan.tokens_at(start_step)) / max(time.perf_counter()
                                                                                          - start, 1e-9)
        metrics = {TRAIN_LOSS: loss, "lr": self.lr(), "batch_seqs": self.plan.batches.batch_at(step - 1),
                   TOKENS_PER_S: tokens_per_s,
                   "perf/tokens_per_s_per_rank": tokens_per_s / self.dist.world_size, **self.noise.metrics()}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if self.peak:
            metrics["perf/mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.dist.world_size)
        metrics["perf/memory_gib"] = (torch.cuda.max_memory_allocated(self.dist.device) / 2**30 if self.dist.cuda
                                      else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        self.emit(metrics, step)
        if self.dist.is_main:
            log.info("step %d/%d  loss %.4f  lr %.3g  %s tok/s", step, self.plan.total_steps, loss, self.lr(),
                     f"{tokens_per_s:,.0f}")
        self.restart_window(step)
        return self.divergence(loss, step)

    def divergence(self, loss: float, step: int) -> Optional[Stop]:
        """A Stop if the train loss `loss` logged after `step` diverged (the first logged loss is the reference)."""
        if self.first_loss is None:
            self.first_loss = loss
        if not math.isfinite(loss) or loss > self.cfg.divergence_factor * self.first_loss:
            return Stop(DIVERGED, f"train loss {loss:.4g} at step {step} (first logged {self.first_loss:.4g})")
        return None


# ---------------------------------------------------------------------------------------------------- eval


class EvalHook:
    """The eval loss of the raw weights and of each EWA average on the fixed eval set, at the eval grid; the target
    crossings they make; a non-finite raw loss stops the run as diverged, and with stop_at_targets every target
    reached (by the stop_weights) stops it.

    `eval_weights()` is the block in which the weights to evaluate are in place (the trainer's single place for an
    optimizer whose evaluation weights differ from its training iterate); `after(step)` runs after each eval
    (the log hook's throughput window restarts: eval time is not training throughput)."""

    def __init__(self, cfg: PretrainConfig, dist: Dist, engine, ewa: EWA, eval_set, zero_stage: int, plan: StepPlan,
                 targets: TargetTracker, emit: Emit, eval_weights: Callable[[], ContextManager] = contextlib.nullcontext,
                 after: Callable[[int], None] = lambda step: None):
        self.cfg, self.dist, self.engine, self.ewa, self.eval_set = cfg, dist, engine, ewa, eval_set
        self.zero_stage, self.plan, self.targets, self.emit = zero_stage, plan, targets, emit
        self.eval_weights, self.after = eval_weights, after
        self.last_eval: dict[str, float] = {}

    def due(self, step: int) -> bool:
        return step in self.plan.eval_grid

    def __call__(self, step: int) -> Optional[Stop]:
        started = time.perf_counter()
        with self.eval_weights():
            losses = {"raw": self.evaluate()}
            for tau in self.cfg.ewa.taus:
                with self.ewa.swapped_in(tau):
                    losses[f"ewa/{tau}"] = self.evaluate()
        self.last_eval = losses
        self.targets.update(step, self.plan.tokens_at(step), losses)
        metrics = {eval_key(k): v for k, v in losses.items()}
        metrics["perf/eval_seconds"] = time.perf_counter() - started
        metrics["batch_seqs"] = self.plan.batches.batch_at(step - 1)
        self.emit(metrics, step)
        if self.dist.is_main:
            log.info("eval step %d: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        self.after(step)
        if not math.isfinite(losses["raw"]):
            return Stop(DIVERGED, f"eval loss {losses['raw']} at step {step}")
        if self.cfg.stop_at_targets and self.targets.all_reached(self.cfg.stop_weights.value):
            return Stop(TARGETS)
        return None

    def evaluate(self) -> float:
        """Mean token loss over the fixed eval set with the weights the model holds now (see sharded_eval_loss)."""
        self._release_gathered_params()
        self.engine.eval()
        loss = sharded_eval_loss(self.engine, self.eval_set, self.cfg.eval.micro_batch_seqs or self.cfg.micro_batch,
                                 self.dist.rank, self.dist.world_size, self.dist.device)
        self.engine.train()
        self._release_gathered_params()
        return loss

    def _release_gathered_params(self) -> None:
        """ZeRO-3 keeps gathered parameters cached across forwards (stage3_max_reuse_distance), so weights
        swapped into the shards would go unseen, and EWA weights could stay cached for training. Re-partition
        them all around an evaluation; it costs one gather per evaluation."""
        if self.zero_stage == 3:
            self.engine.empty_partition_cache()


# ---------------------------------------------------------------------------------------------------- checkpoint


class CheckpointHook:
    """A checkpoint every checkpoint.every_steps steps (0: none on a grid) and at the steps of
    checkpoint.at_tokens (kept: never pruned by checkpoint.keep); `save(step)` saves one."""

    def __init__(self, cfg: CheckpointConfig, plan: StepPlan, save: Callable[[int], None]):
        self.cfg, self.plan, self.save = cfg, plan, save

    def due(self, step: int) -> bool:
        return (self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0) or step in self.plan.kept_steps

    def __call__(self, step: int) -> Optional[Stop]:
        self.save(step)
        return None
