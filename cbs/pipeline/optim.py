"""AdamW parameter groups, learning-rate schedules in tokens, exponential weight averaging (EWA), and the
train/eval weights of schedule-free AdamW wherever DeepSpeed keeps them."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Iterator

import schedulefree
import torch

from cbs.pipeline.config import ConfigError, OptimizerConfig, OptimizerKind, ScheduleConfig, ScheduleKind


def param_groups(model: torch.nn.Module, opt: OptimizerConfig) -> list[dict]:
    """AdamW groups: matrices decay; norms, biases and embeddings (input and position) do not.

    Standard parametrisation: exactly two groups. A parameter that declares an `lr_mult` (muP's hidden matrices,
    cbs/pipeline/model.py `apply_mup`) goes to a decaying group per multiplier, with `lr_mult` in the group: the
    trainer sets each group's LR to the schedule's LR x lr_mult. Its weight decay is divided by lr_mult so that
    AdamW's per-step decay lr x weight_decay stays width-independent (the mup package's MuAdam default)."""
    decay, no_decay, scaled = [], [], {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "lr_mult"):
            scaled.setdefault(float(p.lr_mult), []).append(p)
        elif p.ndim < 2 or "embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": opt.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if not scaled:
        return groups
    groups += [{"params": ps, "weight_decay": opt.weight_decay / mult, "lr_mult": mult}
               for mult, ps in sorted(scaled.items())]
    return [g for g in groups if g["params"]]  # tied muP has no other decaying matrix (the head is the embedding)


def make_optimizer(model: torch.nn.Module, opt: OptimizerConfig) -> torch.optim.Optimizer:
    # foreach: one kernel per group instead of one per tensor (the default where supported, said explicitly)
    if opt.kind is OptimizerKind.schedule_free:
        # warmup_steps=0: the warmup is the trainer's, in tokens (lr_at), as for AdamW
        return ScheduleFreeAdamW(param_groups(model, opt), lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                                 warmup_steps=0, foreach=True)
    return torch.optim.AdamW(param_groups(model, opt), lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                             foreach=True)


class ScheduleFreeAdamW(schedulefree.AdamWScheduleFree):
    """Schedule-free AdamW (Defazio et al. 2024, "The Road Less Scheduled"; docs/method.md) whose step advances
    only the groups that hold parameters.

    The step keeps z (the base SGD-like sequence), x (the weighted average of z, the weights to evaluate) and trains
    at y = (1 - beta1) z + beta1 x; the parameters hold y in train mode and x in eval mode. Each group counts its
    own steps (k, the averaging weights); DeepSpeed's ZeRO-3 steps one group at a time with the others emptied,
    which the library would count as a step of every group: empty groups are left out of the step here.
    """

    @torch.no_grad()
    def step(self, closure=None):
        groups = self.param_groups
        self.param_groups = [g for g in groups if g["params"]]
        try:
            return super().step(closure)
        finally:
            self.param_groups = groups


class ScheduleFreeModes:
    """Puts a DeepSpeed engine's schedule-free optimizer in train mode (weights y) or eval mode (weights x).

    The optimizer holds the master weights it steps: the model's own parameters without ZeRO; DeepSpeed's flat
    fp32 partitions under ZeRO-1/2 and its bf16 optimizer (copied into the model with `update_lp_params`); the
    fp32 partitions of each ZeRO-3 sub-group (copied into the parameter shards, then the gathered parameters are
    released so that the next forward gathers the new ones). `train()` and `eval()` are idempotent: the trainer
    switches to eval before evaluating or saving and back to train before the next step, so a step that
    evaluates and saves sees one x.
    """

    def __init__(self, engine):
        self.engine = engine
        wrapper = engine.optimizer
        self.client = getattr(wrapper, "optimizer", wrapper)
        if not isinstance(self.client, ScheduleFreeAdamW):
            raise TypeError("the engine's optimizer is not schedule-free")
        self.stage3 = hasattr(wrapper, "fp32_partitioned_groups_flat")
        if self.stage3:
            groups = list(wrapper.sub_group_to_group_id.values())
            if len(groups) != len(set(groups)):
                raise ConfigError("optimizer.kind schedule_free under ZeRO-3 needs one sub-group per parameter group "
                                  "(each group counts its own averaging steps): raise zero_optimization."
                                  "sub_group_size in the DeepSpeed config above the parameters of a group")
        elif wrapper is not self.client and not hasattr(wrapper, "update_lp_params"):
            raise ConfigError(f"optimizer.kind schedule_free: DeepSpeed's {type(wrapper).__name__} keeps master "
                              f"weights this trainer cannot switch between train and eval; use ZeRO stage 0-3 in "
                              f"fp32 or bf16, or optimizer.kind adamw")

    @property
    def training(self) -> bool:
        return all(g["train_mode"] for g in self.client.param_groups)

    def train(self) -> None:
        if not self.training:
            self._switch(self.client.train)

    def eval(self) -> None:
        if any(g["train_mode"] for g in self.client.param_groups):
            self._switch(self.client.eval)

    @torch.no_grad()
    def _switch(self, switch) -> None:
        wrapper = self.engine.optimizer
        if not self.stage3:
            switch()
            if wrapper is not self.client:
                wrapper.update_lp_params()  # the fp32 partitions -> the model's (all-gathered) parameters
            return
        self.engine.empty_partition_cache()  # nothing stays gathered from the old weights
        wrapper._set_fp32_optimizer_param_groups()
        try:
            switch()
        finally:
            wrapper._clear_fp32_optimizer_param_groups()
        for sub_group in range(len(wrapper.fp16_groups)):
            wrapper._reassign_or_swap_out_partitioned_parameters(sub_group)


def lr_at(tokens: float, peak: float, train_tokens: int, s: ScheduleConfig) -> float:
    """The LR after `tokens` tokens, defined in tokens so that runs at any batch size share one schedule.

    Warmup: linear from warmup_start_factor x peak at 0 tokens to peak at warmup_tokens. Then
    constant: peak; cosine: peak -> final x peak along a half cosine until train_tokens;
    wsd: peak until (1 - decay_fraction) train_tokens, then linear to final x peak at train_tokens.
    """
    if s.warmup_tokens and tokens < s.warmup_tokens:
        return peak * (s.warmup_start_factor + (1 - s.warmup_start_factor) * tokens / s.warmup_tokens)
    final = s.final_lr_factor * peak
    if s.kind is ScheduleKind.constant:
        return peak
    if s.kind is ScheduleKind.cosine:
        span = max(train_tokens - s.warmup_tokens, 1)
        progress = min(max(tokens - s.warmup_tokens, 0) / span, 1.0)
        return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = (1 - s.decay_fraction) * train_tokens
    if tokens <= decay_start:
        return peak
    progress = min((tokens - decay_start) / max(train_tokens - decay_start, 1), 1.0)
    return peak + (final - peak) * progress


def local_tensor(p: torch.nn.Parameter) -> torch.Tensor:
    """The part of a parameter this rank holds: its ZeRO-3 shard (`ds_tensor`), else the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class EWA:
    """Exponential weight averages of the parameters for several decays at once (Zhang et al. 2025; docs/method.md).

    w_tau <- tau w_tau + (1 - tau) theta every optimizer step, starting from w = 0; evaluated bias-corrected as
    w_tau / (1 - tau^t) after t updates (so that the early average is not pulled towards 0). Averages are fp32
    copies of what this rank holds of each parameter (a ZeRO-3 shard, or the whole tensor), so under ZeRO-3 the
    memory is sharded like the parameters. Costs one fp32 copy of the parameters per tau.

    Under a batch ramp a step at k times the first stage's batch sees k times the tokens, so it decays by tau^k
    (`scale = k`): the average then spans the same tokens as at the first batch. After steps of scales k_1..k_t the
    weights sum to 1 - tau^(k_1 + ... + k_t), the bias correction (`tau_steps` = sum k_i; = steps when k = 1).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], taus: Iterable[float]):
        self.params = list(params)
        self.taus = [float(t) for t in taus]
        self.steps = 0
        self.tau_steps = 0.0
        self.scale = 1.0
        self.averages = {tau: [torch.zeros_like(local_tensor(p), dtype=torch.float32) for p in self.params]
                         for tau in self.taus}

    @torch.no_grad()
    def update(self) -> None:
        current = [local_tensor(p).float() for p in self.params]
        for tau, avg in self.averages.items():
            # avg = tau avg + (1 - tau) theta = avg + (1 - tau)(theta - avg): one lerp pass over the averages
            # (read avg and theta, write avg) where a multiply then an add would read and write avg twice
            torch._foreach_lerp_(avg, current, 1 - tau ** self.scale)
        self.steps += 1
        self.tau_steps += self.scale

    def corrected(self, tau: float) -> list[torch.Tensor]:
        scale = 1.0 / (1.0 - tau ** self.tau_steps) if self.steps else 0.0
        return [a * scale for a in self.averages[tau]]

    @contextmanager
    @torch.no_grad()
    def swapped_in(self, tau: float) -> Iterator[None]:
        """Within the block the model holds the bias-corrected EWA weights; training weights are restored after."""
        saved = [local_tensor(p).clone() for p in self.params]
        try:
            for p, w in zip(self.params, self.corrected(tau)):
                local_tensor(p).copy_(w)
            yield
        finally:
            for p, s in zip(self.params, saved):
                local_tensor(p).copy_(s)

    def state_dict(self) -> dict:
        return {"taus": self.taus, "steps": self.steps, "tau_steps": self.tau_steps,
                "averages": {str(t): [a.cpu() for a in avg] for t, avg in self.averages.items()}}

    def load_state_dict(self, state: dict) -> None:
        if [float(t) for t in state["taus"]] != self.taus:
            raise ValueError(f"checkpoint holds EWA taus {state['taus']}, this run has {self.taus}")
        self.steps = int(state["steps"])
        self.tau_steps = float(state.get("tau_steps", self.steps))  # a checkpoint from before ramps: all k = 1
        for tau in self.taus:
            for a, saved in zip(self.averages[tau], state["averages"][str(tau)]):
                a.copy_(saved)
