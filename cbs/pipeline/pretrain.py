"""pretrain: one GPT run in a DeepSpeed engine, with EWA, periodic eval, steps-to-target and checkpoints.

Run directory (cbs/pipeline/rundir.py; docs/architecture.md): config.yaml (resolved, with the DeepSpeed config),
metrics.jsonl, tb/, checkpoints/, result.json. The Trainer wires the pieces and runs the loop, which is short:
logging, evaluation and checkpointing are hooks with their own schedules (cbs/pipeline/hooks.py), checkpoints and
the resume state are cbs/pipeline/checkpointing.py's, stop signals and the ranks' stop vote
cbs/pipeline/stopping.py's. A run killed and resumed (resume: auto) continues exactly: model, optimizer, EWA,
targets and data position (a function of the step) all come back from the newest complete checkpoint.

SIGTERM, SIGUSR1 or SIGINT (a Slurm preemption or time limit, a study stopped, Ctrl-C) make every rank finish its
step, save a checkpoint and exit with status `preempted` (exit code 75): the next start continues from there. A
second signal ends the process at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import yaml

from cbs.pipeline import rundir
from cbs.pipeline.batch_stages import AdaptiveRamp, BatchStages
from cbs.pipeline.checkpointing import CheckpointManager, TrainState
from cbs.pipeline.config import ConfigError, OptimizerKind, PretrainConfig, Resume, from_dict, to_dict
from cbs.pipeline.data import TrainSamples, check_batch_fits, data_identity, eval_sequences, read_manifest
from cbs.pipeline.distributed import Dist, deepspeed_config, init_distributed, uses_cuda
from cbs.pipeline.hooks import (PEAK_FLOPS, CheckpointHook, EvalHook, Hook, LogHook, LossWindow, StepPlan,
                                eval_steps, peak_flops)
from cbs.pipeline.metrics import Tracker, eval_records, run_identity
from cbs.pipeline.model import build_model, flops_per_token, forward_loss, param_counts
from cbs.pipeline.noise import NoiseScale
from cbs.pipeline.optim import EWA, ScheduleFreeModes, lr_at, make_optimizer
from cbs.pipeline.stopping import (DIVERGED, EXIT_PREEMPTED, PREEMPTED, STEP_STOP_GRACE_S, STOP_SIGNALS,
                                   StepAbandoned, Stop, StopVote, signal_name)
from cbs.pipeline.targets import TargetTracker, eval_key, weight_kinds
from cbs.pipeline.utils import atomic_write_json, atomic_write_text, log
from cbs.runfiles import NOISE_SCALE, SETTLED, Status

__all__ = ["EXIT_PREEMPTED", "PEAK_FLOPS", "STEP_STOP_GRACE_S", "STOP_SIGNALS", "StepAbandoned", "Trainer",
           "eval_steps", "load", "main", "peak_flops"]


class Trainer:
    """One run: the engine and its step (`train_step`), the loop (`train`) and the whole run in its directory
    (`run`: resume or warm start, train, the last save, result.json). `Trainer.for_bench` builds the step alone."""

    def __init__(self, cfg: PretrainConfig, dist: Dist, manifest: Optional[dict] = None,
                 data: Optional[dict] = None, samples: Optional[TrainSamples] = None, bench: bool = False):
        self.cfg, self.dist = cfg, dist
        self.manifest = manifest or read_manifest(cfg.data_dir, cfg.model.seq_len)
        self.ds_config = deepspeed_config(cfg, dist.world_size, dist.cuda)
        self.zero_stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        self.plan = StepPlan(cfg, cfg.batches)  # the batch of every step (batch_stages.py applies it) and grids
        self._build_engine()
        self.vote = StopVote(dist.world_size)  # its gloo group also agrees checkpoint loads
        self.step, self.lr = 0, 0.0
        self.hooks: list[Hook] = []
        if bench:
            self.samples = samples or TrainSamples(cfg.data_dir, cfg.model.seq_len, cfg.seed)
        else:
            self._build_run(data, samples)

    @classmethod
    def for_bench(cls, cfg: PretrainConfig | dict, dist: Dist, samples: Optional[TrainSamples] = None) -> Trainer:
        """The engine and `train_step` alone, to time the step `cbs pretrain` runs: no run directory is read or
        written, no eval set, hooks, checkpoints or result.json. `cfg`: a PretrainConfig, or its keys as a dict
        (`run_dir` may be left out: it is not used); `samples`: the data (default: cfg.data_dir's train split)."""
        if isinstance(cfg, dict):
            cfg = from_dict(PretrainConfig, {"run_dir": "", **cfg}, "pretrain")
        return cls(cfg, dist, samples=samples, bench=True)

    def _build_engine(self) -> None:
        """The model in its DeepSpeed engine, EWA, the noise scale and the batch stages."""
        import deepspeed

        cfg, dist = self.cfg, self.dist
        model = build_model(cfg.model, self.manifest["vocab_size"], device=dist.device)
        self.params = param_counts(model, cfg.model)
        self.flops_per_token = flops_per_token(cfg.model, self.manifest["vocab_size"])
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, cfg.optimizer),
                                               config=self.ds_config)
        if cfg.compile:
            self.engine.compile()  # in place: parameter and state-dict names stay those of the GPTModel
        self.schedule_free = (ScheduleFreeModes(self.engine) if cfg.optimizer.kind is OptimizerKind.schedule_free
                              else None)
        self.ewa = EWA(self.engine.module.parameters(), cfg.ewa.taus)
        self.noise = NoiseScale(self.engine.module.parameters(), cfg.micro_batch, self.batches.first_batch,
                                self.ds_config["gradient_accumulation_steps"], dist.device)
        self.stages = BatchStages(cfg, self.engine, self.ewa, self.noise, dist.world_size)
        self.adaptive = AdaptiveRamp(cfg) if cfg.batch_schedule and cfg.batch_schedule.adaptive else None
        if not self.noise.possible and dist.is_main:
            log.info("train/noise_scale is not measured: it needs >= 2 micro-batches or ranks per step (here one "
                     "micro-batch of %d sequences is the whole step)", cfg.micro_batch)

    def _build_run(self, data: Optional[dict], samples: Optional[TrainSamples]) -> None:
        """The run directory's side: checkpoints (and init_from's, checked first), data, eval set and hooks."""
        cfg, dist = self.cfg, self.dist
        self.run_dir = Path(cfg.run_dir)
        self.data = data or data_identity(cfg.data_dir, self.manifest)
        self.checkpoints = CheckpointManager(self.run_dir, cfg.checkpoint, self.engine, self.ewa, dist,
                                             self.zero_stage, self.vote.agreed_failure)
        self.base = self.checkpoints.init_from_meta(cfg.init_from, cfg.model, cfg.optimizer.kind)
        offset = self.base["tokens"] // cfg.model.seq_len if self.base else 0  # a branch continues its base's stream
        self.samples = samples or TrainSamples(cfg.data_dir, cfg.model.seq_len, cfg.seed, offset_seqs=offset)
        self.eval_set = eval_sequences(cfg.data_dir, cfg.model.seq_len, cfg.eval.eval_tokens)
        self.elapsed = 0.0  # wall seconds of training before this process (from the checkpoint)
        self.stop: Optional[Stop] = None
        self.loss_window = LossWindow(dist)
        self.log_hook = LogHook(cfg, dist, self.engine, self.noise, self.plan, self.loss_window, lambda: self.lr,
                                self.flops_per_token, self._emit)
        self.eval_hook = EvalHook(cfg, dist, self.engine, self.ewa, self.eval_set, self.zero_stage, self.plan,
                                  TargetTracker(cfg.targets, weight_kinds(cfg.ewa.taus)), self._emit,
                                  self.eval_weights, self.log_hook.restart_window)
        self.hooks = [self.log_hook, self.eval_hook, CheckpointHook(cfg.checkpoint, self.plan, self.save_checkpoint)]

    @property
    def batches(self):
        return self.plan.batches

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    @property
    def grad_accum(self) -> int:
        return self.stages.grad_accum

    @property
    def targets(self) -> TargetTracker:
        return self.eval_hook.targets

    @contextlib.contextmanager
    def eval_weights(self):
        """The block in which the model holds the weights to evaluate and to save: the one place to switch an
        optimizer whose evaluation weights differ from its training iterate. AdamW trains and evaluates the same
        weights: nothing to switch. Schedule-free AdamW: its averaged weights x go in on entry; the next
        `train_step` forms its training point y again (not the block's exit: one switch to x serves a step that
        evaluates and saves, as a y -> x -> y round trip is exact only up to rounding). Checkpoints hold x (and z,
        from which y follows): `cbs evaluate` of a checkpoint evaluates the weights pretrain logged at that step,
        and a resumed run forms y from the same x and z, with the same rounding, as the uninterrupted run does
        after its save, so it continues bitwise identically."""
        if self.schedule_free is not None:
            self.schedule_free.eval()  # a no-op when x is already in place
        yield

    def _emit(self, metrics: dict, step: int) -> None:
        self.tracker.log(metrics, step, self.plan.tokens_at(step))

    def _lr_at(self, step: int) -> float:
        return self.stages.lr_factor * lr_at(self.plan.tokens_at(step), self.cfg.optimizer.lr, self.cfg.train_tokens,
                                             self.cfg.schedule)

    # ----------------------------------------------------------------------------------------- the step and loop

    def train_step(self) -> torch.Tensor:
        """One optimizer step over the global batch: micro-batches x gradient accumulation on every rank."""
        self.stages.sync(self.step)
        if self.schedule_free is not None:
            self.schedule_free.train()  # after sync: a stage's betas are set before y is formed from x and z
        lr = self._lr_at(self.step)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)  # muP's hidden matrices (cbs/pipeline/optim.py)
        batch = self.samples.step_batch(self.batches.seqs_before(self.step), self.stages.batch, self.dist.rank,
                                        self.dist.world_size)
        total = torch.zeros((), device=self.dist.device)
        micros = batch.split(self.cfg.micro_batch)
        for i, micro in enumerate(micros):
            if self.vote.step_overdue():
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
        self.lr = lr
        return total / self.grad_accum

    def train(self) -> str:
        """Steps until the token budget, a hook's Stop, or a stop signal every rank agreed on; the stop reason."""
        while self.step < self.total_steps:  # an adaptive ramp moves total_steps as it decides
            self.stages.sync(self.step)  # before `possible`: a stage's accumulation decides it
            measure = self.noise.possible and self.plan.log_due(self.step + 1)
            if measure:
                self.noise.arm()
            loss = self.train_step()
            if measure:
                self.noise.collect(self.engine.get_global_grad_norm(), self.dist.world_size)
                if self.adaptive is not None:
                    self._adapt()
            self.loss_window.add(loss)
            self.stop = self._run_hooks(self.step) or (Stop(PREEMPTED) if self.vote.signalled() else None)
            if self.stop is not None:
                return self.stop.reason
        return "budget"

    def _run_hooks(self, step: int) -> Optional[Stop]:
        """The due hooks in order, up to the first that asks to stop."""
        for hook in self.hooks:
            if hook.due(step):
                stop = hook(step)
                if stop is not None:
                    return stop
        return None

    def _adapt(self) -> None:
        """batch_schedule.adaptive: a decision on the noise scale just measured (every rank holds the same value:
        it is all-reduced), and the schedule, step count and grids that follow from it."""
        b_simple = self.noise.metrics().get(NOISE_SCALE)
        decision = self.adaptive.decide(self.step, self.plan.tokens_at(self.step), b_simple, self.stages.batch)
        if decision is None:
            return
        self._reschedule()
        self._emit({"batch_decision": decision["batch"], "batch_decision/b_simple": b_simple}, self.step)
        if self.dist.is_main:
            log.info("step %d: B_simple %.1f x %g reaches batch %d: %d sequences from the next step",
                     self.step, b_simple, self.adaptive.factor, decision["batch"], decision["batch"])

    def _reschedule(self) -> None:
        self.plan.reschedule(self.adaptive.schedule())
        self.stages.batches = self.plan.batches

    # ----------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, step: int) -> None:
        """Every rank saves the engine, EWA and the TrainState of `step` (CheckpointManager.save)."""
        with self.eval_weights():
            self.checkpoints.save(self.train_state(step), self.plan.tokens_at(step), self.plan.kept_steps)

    def train_state(self, step: int) -> TrainState:
        """The state a checkpoint of `step` stores besides the engine and EWA (collective: the loss window)."""
        return TrainState(step=step, first_loss=self.log_hook.first_loss, last_eval=self.eval_hook.last_eval,
                          targets=self.targets.state_dict(), elapsed=self.elapsed + self._run_seconds(),
                          world_size=self.dist.world_size, zero_stage=self.zero_stage,
                          torch_rng=torch.get_rng_state(), noise_scale=self.noise.state_dict(),
                          loss_window=self.loss_window.saved(),
                          batch_decisions=self.adaptive.decisions if self.adaptive else [])

    def restore(self, state: TrainState) -> None:
        """Continue from a loaded checkpoint's state (the engine and EWA are loaded already)."""
        self.step = state.step
        self.log_hook.first_loss = state.first_loss
        self.eval_hook.last_eval = state.last_eval
        if self.targets.load_state_dict(state.targets):  # targets changed since: recompute from the curve
            self.eval_hook.targets = TargetTracker(self.cfg.targets, self.targets.kinds)
            self.targets.replay(eval_records(self.run_dir), until_step=self.step)
        self.elapsed = state.elapsed
        if state.noise_scale is not None:  # older checkpoints: the noise scale starts afresh
            self.noise.load_state_dict(state.noise_scale)
        self.loss_window.load(state.loss_window)
        if self.adaptive is not None:  # the decisions up to the checkpoint: the schedule it trained
            self.adaptive.decisions = list(state.batch_decisions)
            self._reschedule()
        torch.set_rng_state(state.torch_rng)

    # ----------------------------------------------------------------------------------------- the whole run

    def _run_seconds(self) -> float:
        return time.perf_counter() - self._started

    def run(self) -> dict:
        """Resume (or warm start), train, save the last step (not a diverged one), write result.json."""
        self._started = time.perf_counter()
        state = self.checkpoints.resume()
        if state is not None:
            self.restore(state)
        elif self.cfg.init_from:
            self.checkpoints.warm_start(self.cfg.init_from, self.base["tokens"])
        self.tracker = Tracker(self.run_dir, enabled=self.dist.is_main, tensorboard=self.cfg.log.tensorboard,
                               resume_step=self.step if state is not None else None,
                               identity=run_identity(self.cfg), wandb=self.cfg.log.wandb)
        self.log_hook.restart_window(self.step)
        self.stages.sync(self.step)
        self.lr = self._lr_at(self.step)
        self._log_start()
        try:
            with self.vote.catching():
                reason = self.train()
                self.vote.settle()
                if reason != DIVERGED and self.checkpoints.saved_step != self.step:
                    self.save_checkpoint(self.step)  # the last step, whatever ended the run (not a diverged one)
        except StepAbandoned:  # nothing saved: the newest checkpoint is complete, and the run resumes from it
            reason = "abandoned"
        finally:
            self.tracker.close()
        return self.result(reason)

    def _log_start(self) -> None:
        if self.dist.is_main:
            log.info("%s: %d steps of %s sequences (%s tokens), micro %d x accumulation %s x %d ranks, "
                     "ZeRO-%d, %s params (N = %s)", self.run_dir, self.total_steps, _per_stage(self, "batch"),
                     _per_stage(self, "tokens"), self.cfg.micro_batch, _per_stage(self, "accum"),
                     self.dist.world_size, self.zero_stage, f"{self.params['total']:,}",
                     f"{self.params['non_embedding']:,}")

    def result(self, reason: str) -> dict:
        """result.json's content for a run that ended for `reason` (written by rank 0)."""
        status = {DIVERGED: Status.DIVERGED, PREEMPTED: Status.PREEMPTED,
                  "abandoned": Status.PREEMPTED}.get(reason, Status.COMPLETED)
        steps = self.checkpoints.saved_step if reason == "abandoned" else self.step
        result = {
            "status": status,
            "reason": self._why(reason),
            "steps": steps,
            "tokens": self.plan.tokens_at(steps),
            "total_steps": self.total_steps,
            "wall_seconds": round(self.elapsed + self._run_seconds(), 3),
            "final": {eval_key(k): v for k, v in self.eval_hook.last_eval.items()},
            "targets": self.targets.to_json(),
            "params": self.params,
            "world_size": self.dist.world_size,
        }
        if self.dist.is_main:
            atomic_write_json(self.run_dir / rundir.RESULT, result)
        if status == Status.PREEMPTED and self.dist.is_main:
            log.warning("%s: %s", self.run_dir, result["reason"])
        return result

    def _why(self, reason: str) -> str:
        """result.json's `reason`: the stop reason in words."""
        signal = signal_name(self.vote.stop_signal)
        return {DIVERGED: self.stop.why if self.stop else "", "targets": "every target reached",
                "budget": "token budget trained",
                PREEMPTED: f"stopped by {signal} after step {self.step}; starting the run again resumes from that "
                           f"checkpoint",
                "abandoned": f"stopped by {signal} during step {self.step + 1}, which still ran "
                             f"{STEP_STOP_GRACE_S:g} s later and was abandoned; starting the run again resumes from "
                             f"the checkpoint of step {self.checkpoints.saved_step}"}[reason]


def _per_stage(trainer: Trainer, what: str) -> str:
    """A fixed batch's number, or a ramp's numbers per stage joined by '->' (for the start line)."""
    b, T = trainer.batches, trainer.cfg.model.seq_len
    value = {"batch": lambda s: s.batch, "tokens": lambda s: s.batch * T,
             "accum": lambda s: trainer.stages.layout.at(s.batch).gradient_accumulation}[what]
    return "->".join(str(value(s)) for s in b.stages)


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
    if isinstance(done, dict) and done.get("status") in SETTLED and done.get("steps") is not None:
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
        "tokens_per_step": None if cfg.batch_schedule else trainer.stages.layout.tokens_per_step,
        "total_steps": trainer.total_steps,
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
                "status": Status.FAILED, "reason": f"{type(e).__name__}: {e}",
                "wall_seconds": round(time.perf_counter() - started, 3), "targets": [], "final": {}})
        raise


def load(path: str, overrides: list[str]) -> PretrainConfig:
    from cbs.pipeline.config import load_config

    return load_config(PretrainConfig, path, overrides)
