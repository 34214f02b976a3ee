"""pretrain: one GPT run in a DeepSpeed engine, with EWA, periodic eval, steps-to-target and checkpoints.

Run directory (cbs/pipeline/rundir.py; docs/architecture.md): config.yaml (resolved, with the DeepSpeed config),
metrics.jsonl, tb/, checkpoints/, result.json. The loop is short; logging, evaluation and checkpointing are hooks
with their own schedules. A run killed and resumed (resume: auto) continues exactly: model, optimizer, EWA,
targets and data position (a function of the step) all come back from the newest complete checkpoint.

SIGTERM, SIGUSR1 or SIGINT (a Slurm preemption or time limit, a study stopped, Ctrl-C) make every rank finish its
step, save a checkpoint and exit with status `preempted` (exit code 75): the next start continues from there. A
second signal ends the process at once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from cbs.pipeline import rundir
from cbs.pipeline.batch_stages import AdaptiveRamp, BatchStages
from cbs.pipeline.config import ConfigError, PretrainConfig, Resume, steps_for, to_dict
from cbs.pipeline.data import TrainSamples, check_batch_fits, data_identity, eval_sequences, read_manifest
from cbs.pipeline.distributed import Dist, deepspeed_config, init_distributed, uses_cuda
from cbs.pipeline.evaluate import sharded_eval_loss
from cbs.pipeline.metrics import Tracker, eval_records, run_identity
from cbs.pipeline.model import build_model, flops_per_token, forward_loss, param_counts
from cbs.pipeline.noise import NoiseScale
from cbs.pipeline.optim import EWA, lr_at, make_optimizer
from cbs.pipeline.targets import TargetTracker, eval_key, weight_kinds
from cbs.pipeline.utils import atomic_write_json, atomic_write_text, log

# Peak dense bf16 FLOP/s by device name (substring match), for MFU; none on CPU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
STEP_STOP_GRACE_S = 10.0
"""A one-rank step still running this long after a stop signal is abandoned (docs: README, "Preemption")."""
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: "try again later"; jobs/pretrain.sbatch requeues on it


def peak_flops(dist: Dist) -> Optional[float]:
    if not dist.cuda:
        return None
    name = torch.cuda.get_device_name(dist.device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ---------------------------------------------------------------------------------------------------- schedules


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


# ---------------------------------------------------------------------------------------------------- the run


@dataclass
class Hook:
    fn: Callable[[int], None]
    due: Callable[[int], bool]


class Trainer:
    def __init__(self, cfg: PretrainConfig, dist: Dist, manifest: Optional[dict] = None,
                 data: Optional[dict] = None):
        import deepspeed

        self.cfg, self.dist = cfg, dist
        self.run_dir = Path(cfg.run_dir)
        self.manifest = manifest or read_manifest(cfg.data_dir, cfg.model.seq_len)
        self.data = data or data_identity(cfg.data_dir, self.manifest)
        self.ds_config = deepspeed_config(cfg, dist.world_size, dist.cuda)
        self.zero_stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        self.batches = cfg.batches  # the batch of every step (cbs/pipeline/batch_stages.py applies it)
        self.total_steps = self.batches.total_steps(cfg.train_tokens)
        model = build_model(cfg.model, self.manifest["vocab_size"], device=dist.device)
        self.params = param_counts(model, cfg.model)
        self.flops_per_token = flops_per_token(cfg.model, self.manifest["vocab_size"])
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, cfg.optimizer),
                                               config=self.ds_config)
        if cfg.compile:
            self.engine.compile()  # in place: parameter and state-dict names stay those of the GPTModel
        self.ewa = EWA(self.engine.module.parameters(), cfg.ewa.taus)
        self.targets = TargetTracker(cfg.targets, weight_kinds(cfg.ewa.taus))
        self.base = self._init_from_meta()
        self.samples = TrainSamples(cfg.data_dir, cfg.model.seq_len, cfg.seed,
                                    offset_seqs=self.base["tokens"] // cfg.model.seq_len if self.base else 0)
        self.eval_set = eval_sequences(cfg.data_dir, cfg.model.seq_len, cfg.eval.eval_tokens)
        self.eval_grid = self.eval_grid_steps()
        self.kept_steps = self.steps_at(cfg.checkpoint.at_tokens)  # saved there and never pruned
        self.step = 0
        self.first_loss: Optional[float] = None
        self.last_eval: dict[str, float] = {}
        self.elapsed = 0.0  # wall seconds of training before this process (from the checkpoint)
        self.stop_reason: Optional[str] = None
        self.diverged: Optional[str] = None  # why, when the run diverged
        self.saved_step = 0  # the step of the newest checkpoint (loaded or saved)
        self.stop_signal: Optional[int] = None  # set by the stop-signal handler (STOP_SIGNALS)
        self._signal_time = 0.0  # time.monotonic() of the first stop signal
        # Ranks must agree on the step they stop at, or their checkpoint saves would not line up. A flag is
        # all-reduced over a gloo group on the host, asynchronously: launched after step t, read after step t + 1,
        # so the round trip overlaps a step (no GPU sync, no wait) and a stop lands one step later.
        self._stop_group = None
        self._stop_vote: Optional[tuple] = None  # (the all-reduce in flight, its flag tensor)
        if dist.world_size > 1:
            import torch.distributed as torch_dist

            self._stop_group = torch_dist.new_group(backend="gloo")
        self.peak = peak_flops(dist)
        self._window = (time.perf_counter(), 0)  # perf window: start time, step at start
        self._loss_sum = torch.zeros((), device=dist.device)
        self._loss_count = 0
        # the first step of every stage is logged, with its batch
        self.log_due = lambda s: (s % cfg.log.every_steps == 0 or s in (1, self.total_steps)
                                  or s - 1 in self.batches.start_steps)
        accum = self.ds_config["gradient_accumulation_steps"]
        self.noise = NoiseScale(self.engine.module.parameters(), cfg.micro_batch, self.batches.first_batch, accum,
                                dist.device)
        self.stages = BatchStages(cfg, self.engine, self.ewa, self.noise, dist.world_size)
        self.adaptive = AdaptiveRamp(cfg) if cfg.batch_schedule and cfg.batch_schedule.adaptive else None
        if not self.noise.possible and dist.is_main:
            log.info("train/noise_scale is not measured: it needs >= 2 micro-batches or ranks per step (here one "
                     "micro-batch of %d sequences is the whole step)", cfg.micro_batch)
        self.hooks = [
            Hook(self.log_hook, self.log_due),
            Hook(self.eval_hook, lambda s: s in self.eval_grid),
            Hook(self.checkpoint_hook, lambda s: (cfg.checkpoint.every_steps > 0
                                                  and s % cfg.checkpoint.every_steps == 0) or s in self.kept_steps),
        ]

    def steps_at(self, tokens: list[int]) -> set[int]:
        """The first step that has seen at least each token count (the last step for counts beyond it)."""
        return {min(self.batches.steps_for(t), self.total_steps) for t in tokens}

    def tokens_at(self, step: int) -> int:
        """Tokens seen after `step` steps."""
        return self.batches.tokens_before(step)

    @property
    def grad_accum(self) -> int:
        return self.stages.grad_accum

    def eval_grid_steps(self) -> set[int]:
        """eval_steps' grid laid in tokens, at the first stage's batch b0: the steps that first see k b0 T tokens
        for every k of the grid, so a ramp is evaluated at the tokens a fixed-b0 run is (the same steps for a
        fixed batch), plus eval.at_tokens and the last step."""
        tokens_b0 = self.batches.first_batch * self.cfg.model.seq_len
        grid_b0 = eval_steps(steps_for(self.cfg.train_tokens, tokens_b0), self.cfg.eval.every_steps,
                             self.cfg.eval.growth)
        return self.steps_at([k * tokens_b0 for k in grid_b0] + self.cfg.eval.at_tokens) | {self.total_steps}

    # ----------------------------------------------------------------------------------------- one step

    def train_step(self) -> torch.Tensor:
        """One optimizer step over the global batch: micro-batches x gradient accumulation on every rank."""
        self.stages.sync(self.step)
        lr = self.stages.lr_factor * lr_at(self.tokens_at(self.step), self.cfg.optimizer.lr, self.cfg.train_tokens,
                                           self.cfg.schedule)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)  # muP's hidden matrices (cbs/pipeline/optim.py)
        batch = self.samples.step_batch(self.batches.seqs_before(self.step), self.stages.batch, self.dist.rank,
                                        self.dist.world_size)
        total = torch.zeros((), device=self.dist.device)
        micros = batch.split(self.cfg.micro_batch)
        for i, micro in enumerate(micros):
            if self._step_overdue():
                raise StepAbandoned()
            # said, not counted: DeepSpeed counts micro-steps since the start modulo the accumulation, which a
            # changed accumulation would put out of step
            self.engine.set_gradient_accumulation_boundary(i + 1 == len(micros))
            loss, _ = forward_loss(self.engine, micro.to(self.dist.device, non_blocking=True))
            self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps
            self.engine.step()  # only steps the optimizer at the accumulation boundary
            total += loss.detach()
        self.ewa.update()
        self.step += 1
        self._lr = lr
        return total / self.grad_accum

    def train(self) -> str:
        while self.step < self.total_steps and self.stop_reason is None:
            self.stages.sync(self.step)  # before `possible`: a stage's accumulation decides it
            measure = self.noise.possible and self.log_due(self.step + 1)
            if measure:
                self.noise.arm()
            loss = self.train_step()
            if measure:
                self.noise.collect(self.engine.get_global_grad_norm(), self.dist.world_size)
                if self.adaptive is not None:
                    self._adapt()
            self._loss_sum += loss
            self._loss_count += 1
            for hook in self.hooks:
                if hook.due(self.step):
                    hook.fn(self.step)
                if self.stop_reason:
                    break
            if self.stop_reason is None and self._signalled():
                self.stop_reason = "preempted"
        return self.stop_reason or "budget"

    def _adapt(self) -> None:
        """batch_schedule.adaptive: a decision on the noise scale just measured (every rank holds the same value:
        it is all-reduced), and the schedule, step count and grids that follow from it."""
        b_simple = self.noise.metrics().get("train/noise_scale")
        decision = self.adaptive.decide(self.step, self.tokens_at(self.step), b_simple, self.stages.batch)
        if decision is None:
            return
        self._reschedule()
        self.tracker.log({"batch_decision": decision["batch"], "batch_decision/b_simple": b_simple}, self.step,
                         self.tokens_at(self.step))
        if self.dist.is_main:
            log.info("step %d: B_simple %.1f x %g reaches batch %d: %d sequences from the next step",
                     self.step, b_simple, self.adaptive.factor, decision["batch"], decision["batch"])

    def _reschedule(self) -> None:
        self.batches = self.stages.batches = self.adaptive.schedule()
        self.total_steps = self.batches.total_steps(self.cfg.train_tokens)
        self.eval_grid = self.eval_grid_steps()
        self.kept_steps = self.steps_at(self.cfg.checkpoint.at_tokens)

    # ----------------------------------------------------------------------------------------- preemption

    def _on_signal(self, signum, frame) -> None:
        """Only note it: the step in flight finishes, then `train` stops and `run` saves. A second stop signal
        gets the default action (the process ends at once), for a user who does not want to wait."""
        if self.stop_signal is None:
            self.stop_signal = signum  # the first one names the reason
            self._signal_time = time.monotonic()
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_DFL)

    def _step_overdue(self) -> bool:
        """A stop signal came STEP_STOP_GRACE_S ago and the step still runs (a huge batch, a slow host): a Slurm
        grace period would end in SIGKILL before the step and its save. Only with one rank: ranks that left an
        accumulation at different micro-batches would wait on each other's reductions."""
        return (self.stop_signal is not None and self.dist.world_size == 1
                and time.monotonic() - self._signal_time > STEP_STOP_GRACE_S)

    def _signalled(self) -> bool:
        """True on every rank, at the same step, once any rank got a stop signal: each step reads the vote launched
        after the step before (every rank launches and reads the same votes, so all agree) and launches the next."""
        if self._stop_group is None:
            return self.stop_signal is not None
        import torch.distributed as dist

        agreed = False
        if self._stop_vote is not None:
            work, flag = self._stop_vote
            work.wait()
            agreed = bool(flag.item())
        flag = torch.tensor([int(self.stop_signal is not None)])
        self._stop_vote = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._stop_group, async_op=True), flag)
        return agreed

    def _settle_vote(self) -> None:
        """Wait for the vote still in flight when training ends (every rank launched it), so none is left."""
        if self._stop_vote is not None:
            self._stop_vote[0].wait()
            self._stop_vote = None

    # ----------------------------------------------------------------------------------------- hooks

    def _mean_train_loss(self) -> float:
        """Mean train loss since the last log, averaged over data-parallel ranks (a sync point: log steps only)."""
        import torch.distributed as dist

        value = self._loss_sum / max(self._loss_count, 1)
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        self._loss_sum.zero_()
        self._loss_count = 0
        return value.item() / self.dist.world_size

    def log_hook(self, step: int) -> None:
        loss = self._mean_train_loss()
        now = time.perf_counter()
        start, start_step = self._window
        tokens_per_s = (self.tokens_at(step) - self.tokens_at(start_step)) / max(now - start, 1e-9)
        metrics = {"train/loss": loss, "lr": self._lr, "batch_seqs": self.batches.batch_at(step - 1),
                   "perf/tokens_per_s": tokens_per_s,
                   "perf/tokens_per_s_per_rank": tokens_per_s / self.dist.world_size, **self.noise.metrics()}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if self.peak:
            metrics["perf/mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.dist.world_size)
        metrics["perf/memory_gib"] = (torch.cuda.max_memory_allocated(self.dist.device) / 2**30 if self.dist.cuda
                                      else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        self.tracker.log(metrics, step, self.tokens_at(step))
        if self.dist.is_main:
            log.info("step %d/%d  loss %.4f  lr %.3g  %s tok/s", step, self.total_steps, loss, self._lr,
                     f"{tokens_per_s:,.0f}")
        self._window = (time.perf_counter(), step)
        if self.first_loss is None:
            self.first_loss = loss
        if not math.isfinite(loss) or loss > self.cfg.divergence_factor * self.first_loss:
            self.diverged = f"train loss {loss:.4g} at step {step} (first logged {self.first_loss:.4g})"
            self.stop_reason = "diverged"

    def eval_hook(self, step: int) -> None:
        started = time.perf_counter()
        losses = {"raw": self.evaluate()}
        for tau in self.cfg.ewa.taus:
            with self.ewa.swapped_in(tau):
                losses[f"ewa/{tau}"] = self.evaluate()
        self.last_eval = losses
        self.targets.update(step, self.tokens_at(step), losses)
        metrics = {eval_key(k): v for k, v in losses.items()}
        metrics["perf/eval_seconds"] = time.perf_counter() - started
        metrics["batch_seqs"] = self.batches.batch_at(step - 1)
        self.tracker.log(metrics, step, self.tokens_at(step))
        if self.dist.is_main:
            log.info("eval step %d: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        if not math.isfinite(losses["raw"]):
            self.diverged = f"eval loss {losses['raw']} at step {step}"
            self.stop_reason = "diverged"
        elif self.cfg.stop_at_targets and self.targets.all_reached(self.cfg.stop_weights.value):
            self.stop_reason = "targets"
        self._window = (time.perf_counter(), step)  # eval time is not training throughput

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

    # ----------------------------------------------------------------------------------------- checkpoints

    @property
    def checkpoint_dir(self) -> Path:
        return rundir.checkpoint_dir(self.run_dir)

    def checkpoint_hook(self, step: int) -> None:
        self.save_checkpoint(step)

    def save_checkpoint(self, step: int) -> None:
        """DeepSpeed's checkpoint (model, optimizer; every rank its shard) + our state (EWA, targets, RNG).

        Every rank saves, a barrier, then rank 0 writes complete.json (the file sizes) and `latest`
        (rundir.mark_complete): a save cut short leaves an incomplete tag directory that resume skips.
        """
        tag_dir = self.checkpoint_dir / rundir.tag(step)
        try:
            self._save(step, tag_dir)
        except (OSError, RuntimeError) as e:  # torch.save on a full disk: "enforce fail at inline_container.cc"
            raise self._save_failed(tag_dir, e) from None
        self.saved_step = step

    def _save_failed(self, tag_dir: Path, error: Exception) -> rundir.CheckpointError:
        """The message for a save that failed (a full disk, most often): what happened, and that nothing complete
        is lost. With one rank the half-written tag is removed at once, to give its space back."""
        if self.dist.world_size == 1:
            shutil.rmtree(tag_dir, ignore_errors=True)
        free_mb = shutil.disk_usage(self.checkpoint_dir).free / 2**20
        since = (f"its newest complete checkpoint (step {self.saved_step})" if self.saved_step
                 else "step 0 (no checkpoint was complete yet)")
        return rundir.CheckpointError(
            f"saving checkpoint {tag_dir} failed ({str(error).splitlines()[0][:200]}); {free_mb:.0f} MiB free on its "
            f"file system: free disk space (or lower checkpoint.keep) and run the same command again: it resumes "
            f"from {since}")

    def _save(self, step: int, tag_dir: Path) -> None:
        import torch.distributed as dist

        tag_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main or self.zero_stage == 3:  # ZeRO-3: each rank holds a shard of the averages
            path = rundir.ewa_file(tag_dir, self.dist.rank)
            torch.save(self.ewa.state_dict(), path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
        client = {"cbs": {"step": step, "first_loss": self.first_loss, "last_eval": self.last_eval,
                          "targets": self.targets.state_dict(), "elapsed": self.elapsed + self._run_seconds(),
                          "world_size": self.dist.world_size, "zero_stage": self.zero_stage,
                          "noise_scale": self.noise.state_dict(), "torch_rng": torch.get_rng_state(),
                          "loss_window": self._loss_window(),
                          "batch_decisions": self.adaptive.decisions if self.adaptive else []}}
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag_dir.name, client_state=client,
                                    save_latest=False)
        dist.barrier()
        if self.dist.is_main:
            rundir.mark_complete(tag_dir, {"step": step, "tokens": self.tokens_at(step),
                                           "world_size": self.dist.world_size, "zero_stage": self.zero_stage})
            rolling = [t for t in rundir.tags(self.run_dir) if rundir.tag_step(t) not in self.kept_steps]
            for old in rolling[:-self.cfg.checkpoint.keep]:
                shutil.rmtree(self.checkpoint_dir / old, ignore_errors=True)
            log.info("checkpoint %s", tag_dir)

    def resume(self) -> bool:
        """Load the newest complete checkpoint; True if the run continues from one.

        Incomplete saves (killed mid-save) are skipped. A complete checkpoint that is damaged (a file resized
        or unreadable) is reported, moved aside as `<tag>.damaged`, and the previous one is used. Only a run
        directory with no checkpoint directory at all, or only cut-short first saves, starts from step 0; one
        whose every checkpoint is damaged is refused, never silently restarted.
        """
        import torch.distributed as dist

        good, bad = rundir.usable_tags(self.run_dir)
        if bad and self.dist.is_main:  # out of the way of the saves to come: cut-short ones go, damaged ones aside
            log.warning("%s: skipping checkpoint(s) %s", self.checkpoint_dir, rundir.describe_bad(bad))
            for name, why in bad.items():
                if rundir.INCOMPLETE in why:
                    shutil.rmtree(self.checkpoint_dir / name, ignore_errors=True)
                else:
                    rundir.set_aside(self.checkpoint_dir / name)
        dist.barrier()  # every rank lists the same checkpoints below
        for name in good:
            self._check_world_size(rundir.checkpoint_meta(self.checkpoint_dir / name), self.checkpoint_dir)
            problem = self._agreed_failure(self._load(name))
            if problem is None:
                return True
            bad[name] = problem
            if self.dist.is_main:
                log.warning("%s: checkpoint %s cannot be loaded (%s); trying the previous one",
                            self.checkpoint_dir, name, problem)
                rundir.set_aside(self.checkpoint_dir / name)
        damaged = {k: v for k, v in bad.items() if rundir.INCOMPLETE not in v}
        if damaged:
            raise rundir.CheckpointError(
                f"{self.checkpoint_dir} holds no usable checkpoint ({rundir.describe_bad(bad)}): restore the damaged "
                f"files, or move {self.checkpoint_dir} aside to train the run again from step 0")
        if bad and self.dist.is_main:
            log.warning("%s: no save ever finished; starting from step 0", self.checkpoint_dir)
        return False

    def _init_from_meta(self) -> Optional[dict]:
        """The checkpoint `init_from` names, checked before anything loads: complete, same model, same ranks."""
        init = self.cfg.init_from
        if init is None:
            return None
        tag_dir = rundir.checkpoint_dir(init.run_dir) / rundir.tag(init.step)
        problem = rundir.checkpoint_problem(tag_dir) if tag_dir.is_dir() else "it does not exist"
        if problem:
            raise ConfigError(f"pretrain.init_from: the checkpoint {tag_dir} cannot be used: {problem}")
        base = yaml.safe_load((Path(init.run_dir) / rundir.CONFIG).read_text()) or {}
        if base.get("model") != to_dict(self.cfg.model):
            raise ConfigError(f"pretrain.init_from: {init.run_dir} trained another model; a branch keeps the model")
        meta = rundir.checkpoint_meta(tag_dir)
        self._check_world_size(meta, tag_dir.parent)
        return meta

    def warm_start(self) -> None:
        """Load `init_from`'s weights and optimizer state (not its step, EWA or targets: this run starts at 0)."""
        init = self.cfg.init_from
        path, _ = self.engine.load_checkpoint(str(rundir.checkpoint_dir(init.run_dir)), tag=rundir.tag(init.step),
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise rundir.CheckpointError(f"pretrain.init_from: DeepSpeed found no model states in "
                                         f"{rundir.checkpoint_dir(init.run_dir) / rundir.tag(init.step)}")
        if self.dist.is_main:
            log.info("starting from %s step %d (%d tokens into its data stream)", init.run_dir, init.step,
                     self.base["tokens"])

    def _check_world_size(self, meta: dict, where: Path) -> None:
        """ZeRO partitions the optimizer state (stage 1/2) and the parameters and EWA (stage 3) per rank, and
        DeepSpeed cannot re-partition them: a checkpoint resumes on as many ranks as wrote it."""
        ranks, stage = meta.get("world_size"), meta.get("zero_stage", 0)
        if ranks is not None and stage >= 1 and ranks != self.dist.world_size:
            raise ConfigError(f"the checkpoints in {where} were written by {ranks} rank(s) under ZeRO-"
                              f"{stage}, which shards the optimizer state per rank; resume with {ranks} rank(s) "
                              f"(this launch has {self.dist.world_size}), or start a new run_dir")

    def _loss_window(self) -> list:
        """[sum, count] of the train losses since the last log, the sum averaged over ranks (rank 0's client state
        is what every rank loads): a resume off the log grid then logs the mean over the whole window, as the
        uninterrupted run does, not over the steps since the resume only."""
        import torch.distributed as dist

        window = self._loss_sum.detach().clone()
        if self.dist.world_size > 1:
            dist.all_reduce(window, op=dist.ReduceOp.SUM)
        return [window.item() / self.dist.world_size, self._loss_count]

    def _load(self, name: str) -> Optional[str]:
        """Load one checkpoint into the engine, EWA and our state; the reason if it failed on this rank."""
        tag_dir = self.checkpoint_dir / name
        try:
            path, client = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=name)
            if path is None:
                return "DeepSpeed found no model states in it"
            state = client["cbs"]
            rank = self.dist.rank if state["zero_stage"] == 3 else 0
            self.ewa.load_state_dict(torch.load(rundir.ewa_file(tag_dir, rank), map_location=self.dist.device,
                                                weights_only=True))
        except Exception as e:  # a damaged file: torch's zip reader, pickle, a shape mismatch
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        self.step = self.saved_step = state["step"]
        self.first_loss = state["first_loss"]
        self.last_eval = state["last_eval"]
        if self.targets.load_state_dict(state["targets"]):  # targets changed since: recompute from the curve
            self.targets = TargetTracker(self.cfg.targets, self.targets.kinds)
            self.targets.replay(eval_records(self.run_dir), until_step=self.step)
        self.elapsed = state["elapsed"]
        self.noise.load_state_dict(state.get("noise_scale", self.noise.state_dict()))
        window_sum, self._loss_count = state.get("loss_window", [0.0, 0])  # older checkpoints: the window restarts
        self._loss_sum.fill_(window_sum)
        if self.adaptive is not None:  # the decisions up to the checkpoint: the schedule it trained
            self.adaptive.decisions = list(state.get("batch_decisions", []))
            self._reschedule()
        torch.set_rng_state(state["torch_rng"])
        if self.dist.is_main:
            log.info("resumed from %s at step %d", tag_dir, self.step)
        return None

    def _agreed_failure(self, problem: Optional[str]) -> Optional[str]:
        """Every rank must take the same checkpoint: a load that failed on any rank failed on all."""
        if self._stop_group is None:
            return problem
        import torch.distributed as dist

        flag = torch.tensor([int(problem is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._stop_group)
        return (problem or "failed on another rank") if flag.item() else None

    # ----------------------------------------------------------------------------------------- the whole run

    def _run_seconds(self) -> float:
        return time.perf_counter() - self._started

    def run(self) -> dict:
        self._started = time.perf_counter()
        resumed = self.resume()
        if not resumed and self.cfg.init_from:
            self.warm_start()
        self.tracker = Tracker(self.run_dir, enabled=self.dist.is_main, tensorboard=self.cfg.log.tensorboard,
                               resume_step=self.step if resumed else None, identity=run_identity(self.cfg),
                               wandb=self.cfg.log.wandb)
        self._window = (time.perf_counter(), self.step)
        self.stages.sync(self.step)
        self._lr = self.stages.lr_factor * lr_at(self.tokens_at(self.step), self.cfg.optimizer.lr,
                                                 self.cfg.train_tokens, self.cfg.schedule)
        if self.dist.is_main:
            log.info("%s: %d steps of %s sequences (%s tokens), micro %d x accumulation %s x %d ranks, "
                     "ZeRO-%d, %s params (N = %s)", self.run_dir, self.total_steps, _per_stage(self, "batch"),
                     _per_stage(self, "tokens"), self.cfg.micro_batch, _per_stage(self, "accum"),
                     self.dist.world_size, self.zero_stage, f"{self.params['total']:,}",
                     f"{self.params['non_embedding']:,}")
        try:
            with _stop_signals(self._on_signal):
                reason = self.train()
                self._settle_vote()
                if reason != "diverged" and self.saved_step != self.step:
                    self.save_checkpoint(self.step)  # the last step, whatever ended the run (not a diverged one)
        except StepAbandoned:  # nothing saved: the newest checkpoint is complete, and the run resumes from it
            reason = "abandoned"
        finally:
            self.tracker.close()
        return self.result(reason)

    def result(self, reason: str) -> dict:
        status = {"diverged": "diverged", "preempted": rundir.PREEMPTED,
                  "abandoned": rundir.PREEMPTED}.get(reason, "completed")
        why = {"diverged": self.diverged, "targets": "every target reached", "budget": "token budget trained",
               "preempted": f"stopped by {_signal_name(self.stop_signal)} after step {self.step}; starting the run "
                            f"again resumes from that checkpoint",
               "abandoned": f"stopped by {_signal_name(self.stop_signal)} during step {self.step + 1}, which still "
                            f"ran {STEP_STOP_GRACE_S:g} s later and was abandoned; starting the run again resumes "
                            f"from the checkpoint of step {self.saved_step}"}[reason]
        steps = self.saved_step if reason == "abandoned" else self.step
        result = {
            "status": status,
            "reason": why,
            "steps": steps,
            "tokens": self.tokens_at(steps),
            "total_steps": self.total_steps,
            "wall_seconds": round(self.elapsed + self._run_seconds(), 3),
            "final": {eval_key(k): v for k, v in self.last_eval.items()},
            "targets": self.targets.to_json(),
            "params": self.params,
            "world_size": self.dist.world_size,
        }
        if self.dist.is_main:
            atomic_write_json(self.run_dir / rundir.RESULT, result)
        if status == rundir.PREEMPTED and self.dist.is_main:
            log.warning("%s: %s", self.run_dir, why)
        return result


class StepAbandoned(Exception):
    """Raised inside a step that outlived STEP_STOP_GRACE_S after a stop signal; `run` ends the run without a save."""


def _per_stage(trainer: Trainer, what: str) -> str:
    """A fixed batch's number, or a ramp's numbers per stage joined by '->' (for the start line)."""
    b, T = trainer.batches, trainer.cfg.model.seq_len
    value = {"batch": lambda s: s.batch, "tokens": lambda s: s.batch * T,
             "accum": lambda s: s.batch // (trainer.cfg.micro_batch * trainer.dist.world_size)}[what]
    return "->".join(str(value(s)) for s in b.stages)


def _signal_name(signum: Optional[int]) -> str:
    return signal.Signals(signum).name if signum else "a signal"


@contextlib.contextmanager
def _stop_signals(handler):
    """Route SIGTERM/SIGUSR1/SIGINT to `handler` for the block (main thread only), then restore the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------------- entry


def _check_run_dir(cfg: PretrainConfig, data: dict) -> Optional[dict]:
    """Refuse to mix runs: a run_dir with checkpoints must hold the same run, trained on the same data (`data`:
    data_identity of cfg.data_dir). Returns a finished result, if any."""
    run_dir = Path(cfg.run_dir)
    has_checkpoints = rundir.has_checkpoints(run_dir)
    if has_checkpoints and cfg.resume is Resume.never:
        raise ConfigError(f"{run_dir} already holds checkpoints and pretrain.resume is never: choose a new "
                          f"run_dir, or set resume: auto to continue it")
    if has_checkpoints:
        saved = _saved_config(run_dir)
        changed = [k for k in rundir.changed_settings(saved, to_dict(cfg)) if k != "data_dir"]
        if changed:
            raise ConfigError(f"{run_dir} holds a run with other settings ({', '.join(changed)} differ): it cannot "
                              f"be resumed with this config; choose a new run_dir")
        _check_same_data(cfg, saved.get("resolved") or {}, data)
    return _finished_result(run_dir) if has_checkpoints and cfg.resume is Resume.auto else None


def _saved_config(run_dir: Path) -> dict:
    """config.yaml of a run directory that holds checkpoints: without it the settings guard has nothing to compare
    with, so a missing or unreadable one is refused, never taken as "no settings"."""
    path = run_dir / rundir.CONFIG
    keep = (f"restore it (from a backup or a copy of this run) to resume, or choose a new run_dir (or move "
            f"{run_dir / rundir.CHECKPOINTS} away) to start afresh")
    if not path.is_file():
        raise ConfigError(f"{path} is missing but {run_dir / rundir.CHECKPOINTS} holds a run: its settings cannot be "
                          f"checked against this config; {keep}")
    try:
        saved = yaml.safe_load(path.read_bytes())
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path} cannot be read ({str(e).splitlines()[0]}): {keep}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} is not a mapping of settings: {keep}")
    return saved


def _check_same_data(cfg: PretrainConfig, resolved: dict, data: dict) -> None:
    """The data a run resumes on must be the data it started on, compared by content (data_identity), never by
    the data_dir string. Keys an older config.yaml lacks are not compared."""
    differ = [k for k, v in data.items() if k in resolved and resolved[k] != v]
    if differ:
        raise ConfigError(f"{cfg.run_dir} was trained on other data than data_dir {cfg.data_dir} holds now "
                          f"({', '.join(differ)} differ from {Path(cfg.run_dir) / rundir.CONFIG}): point data_dir "
                          f"at the data the run started on, or choose a new run_dir")


def _finished_result(run_dir: Path) -> Optional[dict]:
    """result.json of a finished run. One that is not JSON (damaged by hand or by the disk; cbs writes it
    atomically) does not stop a run with checkpoints: the run resumes from its newest checkpoint and writes it
    again."""
    path = run_dir / rundir.RESULT
    if not path.is_file():
        return None
    try:
        done = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("%s is not JSON (%s): resuming from the newest checkpoint, which writes it again", path, e)
        return None
    if isinstance(done, dict) and done.get("status") in rundir.FINISHED and done.get("steps") is not None:
        return done
    return None


def _finished(cfg: PretrainConfig, data: dict) -> Optional[dict]:
    """result.json of a run that already finished in run_dir (after checking run_dir holds this run)."""
    done = _check_run_dir(cfg, data)
    if done is not None:
        log.info("%s already finished (%s at step %d); nothing to do", cfg.run_dir, done["status"], done["steps"])
    return done


def _write_config(trainer: Trainer) -> None:
    cfg = trainer.cfg
    data = to_dict(cfg)
    data["resolved"] = {
        "deepspeed": trainer.ds_config, "world_size": trainer.dist.world_size,
        "gradient_accumulation_steps": trainer.grad_accum, "micro_batch_seqs": cfg.micro_batch,
        "tokens_per_step": None if cfg.batch_schedule else cfg.tokens_per_step, "total_steps": trainer.total_steps,
        "vocab_size": trainer.manifest["vocab_size"], "params": trainer.params,
        **trainer.data,
        "data_offset_seqs": trainer.samples.offset_seqs,
        "eval_sequences": len(trainer.eval_set), "device": str(trainer.dist.device),
        "precision": "bf16" if trainer.ds_config["bf16"]["enabled"] else "fp32",
    }
    if rundir.has_checkpoints(trainer.run_dir):  # a resume: the data the run started on stays on record
        started = _saved_config(trainer.run_dir).get("resolved") or {}
        data["resolved"].update({k: started[k] for k in trainer.data if k in started})
    if cfg.batch_schedule is not None:  # the stages as trained (a file's contents too, not only its path)
        data["resolved"]["batch_stages"] = trainer.stages.describe()
    atomic_write_text(trainer.run_dir / rundir.CONFIG, yaml.safe_dump(data, sort_keys=False))


def main(cfg: PretrainConfig) -> dict:
    """Train one run; returns result.json's content. A diverged run returns status `diverged` and a signalled
    one `preempted` (no exception)."""
    # batch arithmetic and the DeepSpeed file are checked before anything starts or is written
    deepspeed_config(cfg, int(os.environ.get("WORLD_SIZE", 1)), uses_cuda())
    manifest = read_manifest(cfg.data_dir, cfg.model.seq_len)  # whole shards, each split >= one sequence long
    if cfg.batch_schedule is None:
        check_batch_fits(cfg.data_dir, manifest, cfg.model.seq_len, cfg.global_batch_seqs)
    else:  # a ramp: its largest batch
        check_batch_fits(cfg.data_dir, manifest, cfg.model.seq_len, max(cfg.batch_schedule.all_batches),
                         "pretrain.batch_schedule's largest batch")
    data = data_identity(cfg.data_dir, manifest)
    done = _finished(cfg, data)
    if done is not None:  # the cheap way out, before any process group or lock
        return done
    dist = init_distributed(cfg.seed)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        # rank 0 alone holds the run's lock (other ranks would conflict with it); every rank waits for it, then
        # looks again: a predecessor it waited for (a run still saving) may have finished the run meanwhile
        with rundir.exclusive(cfg.run_dir) if dist.is_main else contextlib.nullcontext():
            torch.distributed.barrier()
            done = _finished(cfg, data)
            if done is not None:
                return done
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                trainer = Trainer(cfg, dist, manifest, data)
            if dist.is_main:
                _write_config(trainer)
            result = trainer.run()
            if dist.is_main and cfg.batch_schedule is not None and cfg.batch_schedule.adaptive:
                _write_config(trainer)  # the stages its decisions made, and their steps (evaluate and the fit read them)
            return result
    except (ConfigError, rundir.CheckpointError, rundir.RunDirBusy, KeyboardInterrupt):
        raise
    except Exception as e:
        if dist.is_main:  # the study executor reads this and goes on with the next run
            atomic_write_json(Path(cfg.run_dir) / rundir.RESULT, {
                "status": "failed", "reason": f"{type(e).__name__}: {e}",
                "wall_seconds": round(time.perf_counter() - started, 3), "targets": [], "final": {}})
        raise


def load(path: str, overrides: list[str]) -> PretrainConfig:
    from cbs.pipeline.config import load_config

    return load_config(PretrainConfig, path, overrides)
