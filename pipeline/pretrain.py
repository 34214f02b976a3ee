"""pretrain: one GPT run in a DeepSpeed engine, with EWA, periodic eval, steps-to-target and checkpoints.

Run directory (docs/architecture.md contract): config.yaml (resolved, with the DeepSpeed config), metrics.jsonl, tb/,
checkpoints/, result.json. The loop is short; logging, evaluation and checkpointing are hooks with their own
schedules. A run killed and resumed (resume: auto) continues exactly: model, optimizer, EWA, targets and data
position (a function of the step) all come back from the checkpoint.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from pipeline.config import ConfigError, PretrainConfig, Resume, to_dict
from pipeline.data import TrainSamples, eval_sequences, read_manifest
from pipeline.distributed import Dist, deepspeed_config, init_distributed
from pipeline.metrics import Tracker
from pipeline.optim import EWA, lr_at, make_optimizer
from pipeline.utils import atomic_write_json, atomic_write_text, log

RESULT = "result.json"
CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
# What may differ between a run and its resumption: none of it changes the maths of the remaining steps.
RESUME_MAY_CHANGE = ("run_dir", "micro_batch_seqs", "checkpoint", "log", "resume", "stop_at_targets", "study",
                     "targets", "eval")
# Peak dense bf16 FLOP/s by device name (substring match), for MFU; none on CPU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def eval_key(kind: str) -> str:
    """The metrics key of a weights kind: `raw` -> eval/loss, `ewa/0.99` -> eval/loss_ewa/0.99."""
    return "eval/loss" if kind == "raw" else f"eval/loss_{kind}"


def ewa_file(tag_dir: Path, rank: int) -> Path:
    """A checkpoint's EWA state: rank 0's under ZeRO 1/2, every rank's shard under ZeRO-3."""
    return tag_dir / f"ewa_rank{rank}.pt"


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


# ---------------------------------------------------------------------------------------------------- targets


class TargetTracker:
    """First crossing of each target loss by each kind of weights (`raw`, `ewa/<tau>`).

    A crossing records the eval step where loss <= target first held, its tokens, and `step_interp`: the step
    interpolated linearly in log-loss between that eval and the previous one (steps-to-target to better than
    the eval grid's spacing).
    """

    def __init__(self, targets: list[float], kinds: list[str]):
        self.targets = list(targets)
        self.kinds = list(kinds)
        self.crossings: dict[str, list[Optional[dict]]] = {k: [None] * len(targets) for k in kinds}
        self.previous: dict[str, tuple[int, float]] = {}

    def update(self, step: int, tokens_per_step: int, losses: dict[str, float]) -> None:
        for kind, loss in losses.items():
            prev = self.previous.get(kind)
            for i, target in enumerate(self.targets):
                if self.crossings[kind][i] is not None or not (loss <= target):
                    continue
                interp = float(step)
                if prev is not None and prev[1] > target and loss > 0:
                    frac = (math.log(prev[1]) - math.log(target)) / (math.log(prev[1]) - math.log(loss))
                    interp = prev[0] + frac * (step - prev[0])
                self.crossings[kind][i] = {"step": step, "tokens": step * tokens_per_step,
                                           "step_interp": round(interp, 4),
                                           "tokens_interp": round(interp * tokens_per_step, 1)}
            if math.isfinite(loss):
                self.previous[kind] = (step, loss)

    def all_reached(self, weights: str = "any") -> bool:
        """Every target reached by some kind of weights: any kind, `raw`, or `ewa` (any EWA tau)."""
        kinds = [k for k in self.kinds if weights == "any" or k == weights or k.startswith(f"{weights}/")]
        return all(any(self.crossings[k][i] is not None for k in kinds) for i in range(len(self.targets)))

    def to_json(self) -> list[dict]:
        out = []
        for i, target in enumerate(self.targets):
            entry = {"loss": target, "raw": self.crossings.get("raw", [None] * len(self.targets))[i], "ewa": {}}
            for kind in self.kinds:
                if kind.startswith("ewa/"):
                    entry["ewa"][kind[4:]] = self.crossings[kind][i]
            out.append(entry)
        return out

    def state_dict(self) -> dict:
        return {"crossings": self.crossings, "previous": self.previous}

    def load_state_dict(self, state: dict) -> None:
        self.crossings.update({k: v for k, v in state["crossings"].items() if k in self.crossings})
        self.previous = {k: tuple(v) for k, v in state["previous"].items()}


# ---------------------------------------------------------------------------------------------------- the run


@dataclass
class Hook:
    fn: Callable[[int], None]
    due: Callable[[int], bool]


class Diverged(Exception):
    pass


class Trainer:
    def __init__(self, cfg: PretrainConfig, dist: Dist):
        import deepspeed

        from pipeline.model import build_model, flops_per_token, param_counts

        self.cfg, self.dist = cfg, dist
        self.run_dir = Path(cfg.run_dir)
        self.manifest = read_manifest(cfg.data_dir)
        self.ds_config = deepspeed_config(cfg, dist.world_size, dist.cuda)
        self.grad_accum = self.ds_config["gradient_accumulation_steps"]
        self.zero_stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        self.tokens_per_step = cfg.tokens_per_step
        self.total_steps = cfg.total_steps
        model = build_model(cfg.model, self.manifest["vocab_size"], device=dist.device)
        self.params = param_counts(model, cfg.model)
        self.flops_per_token = flops_per_token(cfg.model, self.manifest["vocab_size"])
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, cfg.optimizer),
                                               config=self.ds_config)
        if cfg.compile:
            self.engine.compile()  # in place: parameter and state-dict names stay those of the GPTModel
        self.ewa = EWA(self.engine.module.parameters(), cfg.ewa.taus)
        kinds = ["raw"] + [f"ewa/{t}" for t in cfg.ewa.taus]
        self.targets = TargetTracker(cfg.targets, kinds)
        self.samples = TrainSamples(cfg.data_dir, cfg.model.seq_len, cfg.seed)
        self.eval_set = eval_sequences(cfg.data_dir, cfg.model.seq_len, cfg.eval.eval_tokens)
        self.eval_grid = eval_steps(self.total_steps, cfg.eval.every_steps, cfg.eval.growth)
        self.eval_grid |= {min(-(-t // self.tokens_per_step), self.total_steps) for t in cfg.eval.at_tokens}
        self.step = 0
        self.first_loss: Optional[float] = None
        self.last_eval: dict[str, float] = {}
        self.elapsed = 0.0  # wall seconds of training before this process (from the checkpoint)
        self.stop_reason: Optional[str] = None
        self.diverged: Optional[str] = None  # why, when the run diverged
        self.peak = peak_flops(dist)
        self._window = (time.perf_counter(), 0)  # perf window: start time, step at start
        self._loss_sum = torch.zeros((), device=dist.device)
        self._loss_count = 0
        self.hooks = [
            Hook(self.log_hook, lambda s: s % cfg.log.every_steps == 0 or s in (1, self.total_steps)),
            Hook(self.eval_hook, lambda s: s in self.eval_grid),
            Hook(self.checkpoint_hook, lambda s: (cfg.checkpoint.every_steps > 0
                                                  and s % cfg.checkpoint.every_steps == 0)),
        ]

    # ----------------------------------------------------------------------------------------- one step

    def train_step(self) -> torch.Tensor:
        """One optimizer step over the global batch: micro-batches x gradient accumulation on every rank."""
        from pipeline.model import forward_loss

        lr = lr_at(self.step * self.tokens_per_step, self.cfg.optimizer.lr, self.cfg.train_tokens,
                   self.cfg.schedule)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        batch = self.samples.step_batch(self.step, self.cfg.global_batch_seqs, self.dist.rank,
                                        self.dist.world_size)
        total = torch.zeros((), device=self.dist.device)
        for micro in batch.split(self.cfg.micro_batch):
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
            loss = self.train_step()
            self._loss_sum += loss
            self._loss_count += 1
            for hook in self.hooks:
                if hook.due(self.step):
                    hook.fn(self.step)
                if self.stop_reason:
                    break
        return self.stop_reason or "budget"

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
        tokens_per_s = (step - start_step) * self.tokens_per_step / max(now - start, 1e-9)
        metrics = {"train/loss": loss, "lr": self._lr, "perf/tokens_per_s": tokens_per_s,
                   "perf/tokens_per_s_per_rank": tokens_per_s / self.dist.world_size}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if self.peak:
            metrics["perf/mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.dist.world_size)
        metrics["perf/memory_gib"] = (torch.cuda.max_memory_allocated(self.dist.device) / 2**30 if self.dist.cuda
                                      else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        self.tracker.log(metrics, step, step * self.tokens_per_step)
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
        self.targets.update(step, self.tokens_per_step, losses)
        metrics = {eval_key(k): v for k, v in losses.items()}
        metrics["perf/eval_seconds"] = time.perf_counter() - started
        self.tracker.log(metrics, step, step * self.tokens_per_step)
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
        from pipeline.evaluate import sharded_eval_loss

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
        return self.run_dir / CHECKPOINTS

    def checkpoint_hook(self, step: int) -> None:
        self.save_checkpoint(step)

    def save_checkpoint(self, step: int) -> None:
        """DeepSpeed's checkpoint (model, optimizer; every rank its shard) + our state. The EWA file goes in first
        and DeepSpeed writes `latest` last, so a save cut short leaves `latest` on the previous complete one."""
        import torch.distributed as dist

        tag = f"step{step:08d}"
        tag_dir = self.checkpoint_dir / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main or self.zero_stage == 3:  # ZeRO-3: each rank holds a shard of the averages
            tmp = ewa_file(tag_dir, self.dist.rank).with_suffix(".tmp")
            torch.save(self.ewa.state_dict(), tmp)
            os.replace(tmp, ewa_file(tag_dir, self.dist.rank))
        client = {"cbs": {"step": step, "first_loss": self.first_loss, "last_eval": self.last_eval,
                          "targets": self.targets.state_dict(), "elapsed": self.elapsed + self._run_seconds(),
                          "world_size": self.dist.world_size, "zero_stage": self.zero_stage,
                          "torch_rng": torch.get_rng_state()}}
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, client_state=client)
        dist.barrier()
        if self.dist.is_main:
            tags = sorted(p for p in self.checkpoint_dir.glob("step*") if p.is_dir())
            for old in tags[:-self.cfg.checkpoint.keep]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint %s", tag_dir)

    def resume(self) -> bool:
        """Load the newest checkpoint if there is one; True if the run continues from it."""
        if not (self.checkpoint_dir / "latest").is_file():
            return False
        path, client = self.engine.load_checkpoint(str(self.checkpoint_dir))
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint named in {self.checkpoint_dir / 'latest'}")
        state = client["cbs"]
        if state["zero_stage"] == 3 and state["world_size"] != self.dist.world_size:
            raise ConfigError(f"the checkpoint in {self.checkpoint_dir} was written by {state['world_size']} ranks "
                              f"under ZeRO-3; resume it with the same number of ranks")
        tag_dir = self.checkpoint_dir / (self.checkpoint_dir / "latest").read_text().strip()
        rank = self.dist.rank if state["zero_stage"] == 3 else 0
        self.ewa.load_state_dict(torch.load(ewa_file(tag_dir, rank), map_location=self.dist.device,
                                            weights_only=True))
        self.step = state["step"]
        self.first_loss = state["first_loss"]
        self.last_eval = state["last_eval"]
        self.targets.load_state_dict(state["targets"])
        self.elapsed = state["elapsed"]
        torch.set_rng_state(state["torch_rng"])
        if self.dist.is_main:
            log.info("resumed from %s at step %d", tag_dir, self.step)
        return True

    # ----------------------------------------------------------------------------------------- the whole run

    def _run_seconds(self) -> float:
        return time.perf_counter() - self._started

    def run(self) -> dict:
        self._started = time.perf_counter()
        resumed = self.resume()
        self.tracker = Tracker(self.run_dir, enabled=self.dist.is_main, tensorboard=self.cfg.log.tensorboard,
                               resume_step=self.step if resumed else None)
        self._window = (time.perf_counter(), self.step)
        self._lr = lr_at(self.step * self.tokens_per_step, self.cfg.optimizer.lr, self.cfg.train_tokens,
                         self.cfg.schedule)
        if self.dist.is_main:
            log.info("%s: %d steps of %d sequences (%d tokens), micro %d x accumulation %d x %d ranks, "
                     "ZeRO-%d, %s params (N = %s)", self.run_dir, self.total_steps, self.cfg.global_batch_seqs,
                     self.tokens_per_step, self.cfg.micro_batch, self.grad_accum, self.dist.world_size,
                     self.zero_stage, f"{self.params['total']:,}", f"{self.params['non_embedding']:,}")
        try:
            reason = self.train()
            if reason != "diverged" and self.step not in self.eval_grid:
                self.eval_hook(self.step)  # stopped early at targets: the final losses are those of this step
            if reason != "diverged" and (self.cfg.checkpoint.every_steps == 0
                                         or self.step % self.cfg.checkpoint.every_steps):
                self.save_checkpoint(self.step)
        finally:
            self.tracker.close()
        return self.result(reason)

    def result(self, reason: str) -> dict:
        final = {eval_key(k): v for k, v in self.last_eval.items()}
        result = {
            "status": "diverged" if reason == "diverged" else "completed",
            "reason": self.diverged if reason == "diverged" else
            ("every target reached" if reason == "targets" else "token budget trained"),
            "steps": self.step,
            "tokens": self.step * self.tokens_per_step,
            "total_steps": self.total_steps,
            "wall_seconds": round(self.elapsed + self._run_seconds(), 3),
            "final": final,
            "targets": self.targets.to_json(),
            "params": self.params,
            "world_size": self.dist.world_size,
        }
        if self.dist.is_main:
            atomic_write_json(self.run_dir / RESULT, result)
        return result


# ---------------------------------------------------------------------------------------------------- entry


def _check_run_dir(cfg: PretrainConfig) -> Optional[dict]:
    """Refuse to mix runs: a run_dir with checkpoints must hold the same run. Returns a finished result, if any."""
    run_dir = Path(cfg.run_dir)
    saved = run_dir / CONFIG
    has_checkpoints = (run_dir / CHECKPOINTS / "latest").is_file()
    if has_checkpoints and cfg.resume is Resume.never:
        raise ConfigError(f"{run_dir} already holds checkpoints and pretrain.resume is never: choose a new "
                          f"run_dir, or set resume: auto to continue it")
    if saved.is_file() and has_checkpoints:
        old = yaml.safe_load(saved.read_text()) or {}
        old.pop("resolved", None)
        new = to_dict(cfg)
        changed = [k for k in sorted(set(old) | set(new))
                   if k not in RESUME_MAY_CHANGE and old.get(k) != new.get(k)]
        if changed:
            raise ConfigError(f"{run_dir} holds a run with other settings ({', '.join(changed)} differ): it cannot "
                              f"be resumed with this config; choose a new run_dir")
    result = run_dir / RESULT
    if result.is_file() and has_checkpoints and cfg.resume is Resume.auto:
        import json

        done = json.loads(result.read_text())
        if done.get("status") in ("completed", "diverged") and done.get("steps") is not None:
            return done
    return None


def _write_config(trainer: Trainer) -> None:
    cfg = trainer.cfg
    data = to_dict(cfg)
    data["resolved"] = {
        "deepspeed": trainer.ds_config, "world_size": trainer.dist.world_size,
        "gradient_accumulation_steps": trainer.grad_accum, "micro_batch_seqs": cfg.micro_batch,
        "tokens_per_step": trainer.tokens_per_step, "total_steps": trainer.total_steps,
        "vocab_size": trainer.manifest["vocab_size"], "params": trainer.params,
        "data_manifest_fingerprint": trainer.manifest.get("fingerprint"),
        "eval_sequences": len(trainer.eval_set), "device": str(trainer.dist.device),
    }
    atomic_write_text(trainer.run_dir / CONFIG, yaml.safe_dump(data, sort_keys=False))


def main(cfg: PretrainConfig) -> dict:
    """Train one run; returns result.json's content. A diverged run returns status `diverged` (no exception)."""
    # batch arithmetic and the DeepSpeed file are checked before anything starts or is written
    deepspeed_config(cfg, int(os.environ.get("WORLD_SIZE", 1)), torch.cuda.is_available())
    read_manifest(cfg.data_dir)
    done = _check_run_dir(cfg)
    if done is not None:
        log.info("%s already finished (%s at step %d); nothing to do", cfg.run_dir, done["status"], done["steps"])
        return done
    dist = init_distributed(cfg.seed)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            trainer = Trainer(cfg, dist)
        if dist.is_main:
            _write_config(trainer)
        return trainer.run()
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception as e:
        if dist.is_main:  # the study executor reads this and goes on with the next run
            atomic_write_json(Path(cfg.run_dir) / RESULT, {
                "status": "failed", "reason": f"{type(e).__name__}: {e}",
                "wall_seconds": round(time.perf_counter() - started, 3), "targets": [], "final": {}})
        raise


def load(path: str, overrides: list[str]) -> PretrainConfig:
    from pipeline.config import load_config

    return load_config(PretrainConfig, path, overrides)
