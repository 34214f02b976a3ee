"""A pretrain run's checkpoints: save (every rank, then a complete marker), resume, warm start from another run.

A checkpoint (RUN_DIR/checkpoints/<tag>/, cbs/pipeline/rundir.py) is DeepSpeed's (model, optimizer; each rank its
shard), the EWA averages (`ewa_rank<r>.pt`: rank 0's under ZeRO 1/2, every rank's shard under ZeRO-3) and our
own state, `TrainState`, stored in DeepSpeed's client state under the key "cbs" as a plain dict (so checkpoints
load without this module's classes, and those of every cbs version load in every other). A save is complete
once every rank saved and rank 0 wrote `complete.json` and `latest` (rundir.mark_complete): a save cut short is
skipped on resume, a damaged one set aside, and the run continues from the newest complete one.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from cbs.pipeline import rundir
from cbs.pipeline.config import CheckpointConfig, ConfigError, InitFrom, ModelConfig, OptimizerKind, to_dict
from cbs.pipeline.distributed import Dist
from cbs.pipeline.optim import EWA
from cbs.pipeline.utils import log

CLIENT_KEY = "cbs"
"""The key of TrainState's dict in DeepSpeed's client state."""


@dataclass
class TrainState:
    """Where a run stands after `step` steps, beyond the engine's and EWA's tensors: what a resume restores.

    On disk it is `to_dict()`'s plain dict with these field names as keys. Fields added after the first
    checkpoints were written have defaults, so `from_dict` reads every older checkpoint: one without `noise_scale`
    keeps the noise scale's fresh state, one without `loss_window` restarts the window, one without
    `batch_decisions` had none.
    """

    step: int
    first_loss: Optional[float]
    """The first logged train loss (the divergence guard's reference); None before the first log."""
    last_eval: dict[str, float]
    """The latest eval losses by weights kind (`raw`, `ewa/<tau>`): result.json's `final`."""
    targets: dict
    """TargetTracker.state_dict(): the target crossings so far."""
    elapsed: float
    """Wall seconds of training up to this checkpoint, over every process of the run."""
    world_size: int
    zero_stage: int
    torch_rng: torch.Tensor
    """torch.get_rng_state() of the saving rank."""
    noise_scale: Optional[dict] = None
    """NoiseScale.state_dict(); None: a checkpoint written before the noise scale was measured."""
    loss_window: tuple[float, int] = (0.0, 0)
    """(sum, count) of the train losses since the last log, the sum averaged over ranks."""
    batch_decisions: list[dict] = field(default_factory=list)
    """An adaptive ramp's decisions up to this step (batch_stages.AdaptiveRamp)."""

    def to_dict(self) -> dict:
        """The dict stored in the checkpoint, key for key as every cbs version wrote it."""
        return {"step": self.step, "first_loss": self.first_loss, "last_eval": self.last_eval,
                "targets": self.targets, "elapsed": self.elapsed, "world_size": self.world_size,
                "zero_stage": self.zero_stage, "noise_scale": self.noise_scale, "torch_rng": self.torch_rng,
                "loss_window": list(self.loss_window), "batch_decisions": self.batch_decisions}

    @classmethod
    def from_dict(cls, state: dict) -> TrainState:
        """A stored dict, of this version or an older one (missing fields take their defaults)."""
        window_sum, window_count = state.get("loss_window", (0.0, 0))
        return cls(step=state["step"], first_loss=state["first_loss"], last_eval=state["last_eval"],
                   targets=state["targets"], elapsed=state["elapsed"], world_size=state.get("world_size"),
                   zero_stage=state["zero_stage"], torch_rng=state["torch_rng"],
                   noise_scale=state.get("noise_scale"), loss_window=(window_sum, window_count),
                   batch_decisions=list(state.get("batch_decisions", [])))


class CheckpointManager:
    """The checkpoints of one run directory, for one rank of a DeepSpeed engine and its EWA.

    `agree(problem)` turns this rank's load failure into the ranks' common verdict (StopVote.agreed_failure), so
    that every rank takes the same checkpoint.
    """

    def __init__(self, run_dir: str | os.PathLike, cfg: CheckpointConfig, engine, ewa: EWA, dist: Dist,
                 zero_stage: int, agree: Callable[[Optional[str]], Optional[str]]):
        self.run_dir, self.cfg, self.engine, self.ewa, self.dist = Path(run_dir), cfg, engine, ewa, dist
        self.zero_stage, self.agree = zero_stage, agree
        self.saved_step = 0  # the step of the newest checkpoint (loaded or saved)

    @property
    def dir(self) -> Path:
        return rundir.checkpoint_dir(self.run_dir)

    # ----------------------------------------------------------------------------------------- save

    def save(self, state: TrainState, tokens: int, kept_steps: set[int]) -> None:
        """Save the engine, EWA and `state` (after `state.step` steps, `tokens` seen) on every rank; then rank 0
        marks it complete and removes the rolling checkpoints beyond checkpoint.keep (never those of
        `kept_steps`). A failed save (a full disk, most often) raises rundir.CheckpointError."""
        tag_dir = self.dir / rundir.tag(state.step)
        try:
            self._save(state, tag_dir, tokens, kept_steps)
        except (OSError, RuntimeError) as e:  # torch.save on a full disk: "enforce fail at inline_container.cc"
            raise self._save_failed(tag_dir, e) from None
        self.saved_step = state.step

    def _save(self, state: TrainState, tag_dir: Path, tokens: int, kept_steps: set[int]) -> None:
        import torch.distributed as dist

        tag_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main or self.zero_stage == 3:  # ZeRO-3: each rank holds a shard of the averages
            path = rundir.ewa_file(tag_dir, self.dist.rank)
            torch.save(self.ewa.state_dict(), path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
        self.engine.save_checkpoint(str(self.dir), tag=tag_dir.name, client_state={CLIENT_KEY: state.to_dict()},
                                    save_latest=False)
        dist.barrier()
        if self.dist.is_main:
            rundir.mark_complete(tag_dir, {"step": state.step, "tokens": tokens, "world_size": self.dist.world_size,
                                           "zero_stage": self.zero_stage})
            rolling = [t for t in rundir.tags(self.run_dir) if rundir.tag_step(t) not in kept_steps]
            for old in rolling[:-self.cfg.keep]:
                shutil.rmtree(self.dir / old, ignore_errors=True)
            log.info("checkpoint %s", tag_dir)

    def _save_failed(self, tag_dir: Path, error: Exception) -> rundir.CheckpointError:
        """The message for a save that failed: what happened, and that nothing complete is lost. With one rank the
        half-written tag is removed at once, to give its space back."""
        if self.dist.world_size == 1:
            shutil.rmtree(tag_dir, ignore_errors=True)
        free_mb = shutil.disk_usage(self.dir).free / 2**20
        since = (f"its newest complete checkpoint (step {self.saved_step})" if self.saved_step
                 else "step 0 (no checkpoint was complete yet)")
        return rundir.CheckpointError(
            f"saving checkpoint {tag_dir} failed ({str(error).splitlines()[0][:200]}); {free_mb:.0f} MiB free on its "
            f"file system: free disk space (or lower checkpoint.keep) and run the same command again: it resumes "
            f"from {since}")

    # ----------------------------------------------------------------------------------------- resume

    def resume(self) -> Optional[TrainState]:
        """Load the newest complete checkpoint into the engine and EWA; its TrainState, or None to start at 0.

        Incomplete saves (killed mid-save) are skipped. A complete checkpoint that is damaged (a file resized
        or unreadable) is reported, moved aside as `<tag>.damaged`, and the previous one is used. Only a run
        directory with no checkpoint directory at all, or only cut-short first saves, starts from step 0; one
        whose every checkpoint is damaged is refused, never silently restarted.
        """
        import torch.distributed as dist

        good, bad = rundir.usable_tags(self.run_dir)
        if bad and self.dist.is_main:  # out of the way of the saves to come: cut-short ones go, damaged ones aside
            log.warning("%s: skipping checkpoint(s) %s", self.dir, rundir.describe_bad(bad))
            for name, why in bad.items():
                if rundir.INCOMPLETE in why:
                    shutil.rmtree(self.dir / name, ignore_errors=True)
                else:
                    rundir.set_aside(self.dir / name)
        dist.barrier()  # every rank lists the same checkpoints below
        for name in good:
            self.check_world_size(rundir.checkpoint_meta(self.dir / name), self.dir)
            problem, state = self._load(name)
            problem = self.agree(problem)
            if problem is None:
                self.saved_step = state.step
                if self.dist.is_main:
                    log.info("resumed from %s at step %d", self.dir / name, state.step)
                return state
            bad[name] = problem
            if self.dist.is_main:
                log.warning("%s: checkpoint %s cannot be loaded (%s); trying the previous one", self.dir, name,
                            problem)
                rundir.set_aside(self.dir / name)
        damaged = {k: v for k, v in bad.items() if rundir.INCOMPLETE not in v}
        if damaged:
            raise rundir.CheckpointError(
                f"{self.dir} holds no usable checkpoint ({rundir.describe_bad(bad)}): restore the damaged files, or "
                f"move {self.dir} aside to train the run again from step 0")
        if bad and self.dist.is_main:
            log.warning("%s: no save ever finished; starting from step 0", self.dir)
        return None

    def _load(self, name: str) -> tuple[Optional[str], Optional[TrainState]]:
        """Load one checkpoint into the engine and EWA: (the reason it failed on this rank, or None; its state)."""
        tag_dir = self.dir / name
        try:
            path, client = self.engine.load_checkpoint(str(self.dir), tag=name)
            if path is None:
                return "DeepSpeed found no model states in it", None
            state = TrainState.from_dict(client[CLIENT_KEY])
            rank = self.dist.rank if state.zero_stage == 3 else 0
            self.ewa.load_state_dict(torch.load(rundir.ewa_file(tag_dir, rank), map_location=self.dist.device,
                                                weights_only=True))
        except Exception as e:  # a damaged file: torch's zip reader, pickle, a shape mismatch
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", None
        return None, state

    def check_world_size(self, meta: dict, where: Path) -> None:
        """ZeRO partitions the optimizer state (stage 1/2) and the parameters and EWA (stage 3) per rank, and
        DeepSpeed cannot re-partition them: a checkpoint resumes on as many ranks as wrote it."""
        ranks, stage = meta.get("world_size"), meta.get("zero_stage", 0)
        if ranks is not None and stage >= 1 and ranks != self.dist.world_size:
            raise ConfigError(f"the checkpoints in {where} were written by {ranks} rank(s) under ZeRO-"
                              f"{stage}, which shards the optimizer state per rank; resume with {ranks} rank(s) "
                              f"(this launch has {self.dist.world_size}), or start a new run_dir")

    # ----------------------------------------------------------------------------------------- warm start

    def init_from_meta(self, init: Optional[InitFrom], model: ModelConfig,
                       kind: OptimizerKind = OptimizerKind.adamw) -> Optional[dict]:
        """complete.json of the checkpoint `init_from` names, checked before anything loads: complete, same model,
        same ranks. None without init_from."""
        if init is None:
            return None
        tag_dir = rundir.checkpoint_dir(init.run_dir) / rundir.tag(init.step)
        problem = rundir.checkpoint_problem(tag_dir) if tag_dir.is_dir() else "it does not exist"
        if problem:
            raise ConfigError(f"pretrain.init_from: the checkpoint {tag_dir} cannot be used: {problem}")
        base = yaml.safe_load((Path(init.run_dir) / rundir.CONFIG).read_text()) or {}
        if base.get("model") != to_dict(model):
            raise ConfigError(f"pretrain.init_from: {init.run_dir} trained another model; a branch keeps the model")
        base_kind = (base.get("optimizer") or {}).get("kind", OptimizerKind.adamw.value)
        if base_kind != kind.value:
            raise ConfigError(f"pretrain.init_from: {init.run_dir} trained with optimizer.kind {base_kind}, whose "
                              f"state this run's {kind.value} cannot continue; a branch keeps the optimizer")
        meta = rundir.checkpoint_meta(tag_dir)
        self.check_world_size(meta, tag_dir.parent)
        return meta

    def warm_start(self, init: InitFrom, base_tokens: int) -> None:
        """Load `init_from`'s weights and optimizer state (not its step, EWA or targets: this run starts at 0);
        `base_tokens`: the tokens it had seen, for the log."""
        path, _ = self.engine.load_checkpoint(str(rundir.checkpoint_dir(init.run_dir)), tag=rundir.tag(init.step),
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise rundir.CheckpointError(f"pretrain.init_from: DeepSpeed found no model states in "
                                         f"{rundir.checkpoint_dir(init.run_dir) / rundir.tag(init.step)}")
        if self.dist.is_main:
            log.info("starting from %s step %d (%d tokens into its data stream)", init.run_dir, init.step,
                     base_tokens)
