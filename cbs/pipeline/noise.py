"""The gradient noise scale B_simple of a run, from gradients the step computes anyway (no extra backward).

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", arXiv 1812.06162, appendix A.1): with
squared gradient norms at a small batch B_small and a big batch B_big,

    E|G_small|^2 = |G|^2 + tr(Sigma) / B_small        E|G_big|^2 = |G|^2 + tr(Sigma) / B_big

so that unbiased estimates of the true gradient's |G|^2 and of the per-example covariance's trace are

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

and B_simple = tr(Sigma) / |G|^2, with numerator and denominator averaged separately (bias-corrected EMAs)
before dividing: each single estimate is very noisy, and the ratio of averages is far less biased than the
average of ratios. docs/method.md, "Gradient noise scale".

Here B_small is one micro-batch on one rank and B_big the global batch. |G_small|^2 is the mean over the step's
micro-batches and ranks of each micro-batch gradient's squared norm, read by tensor hooks on the parameters as
autograd produces them (before DeepSpeed accumulates or reduces anything, so it works for every ZeRO stage);
|G_big|^2 is DeepSpeed's pre-clip global norm of the averaged gradient, squared. The hooks are armed only on
measured steps (the log steps): one squared-norm reduction per parameter and micro-batch there, nothing between.
A step of a single micro-batch on a single rank has B_small = B_big: nothing to measure, nothing logged.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from cbs.runfiles import GRAD_SQ_BIG, GRAD_SQ_SMALL, NOISE_SCALE, NOISE_SCALE_BATCHES


class NoiseScale:
    """Measures |G_small|^2 with parameter hooks on armed steps and keeps the EMAs of the two estimates."""

    def __init__(self, params: Iterable[torch.nn.Parameter], micro_seqs: int, global_seqs: int, grad_accum: int,
                 device: torch.device, ema: float = 0.9):
        self.params = [p for p in params if p.requires_grad]
        self.b_small, self.b_big = micro_seqs, global_seqs
        self.grad_accum = grad_accum
        self.beta = ema
        self.device = device
        self._sum_sq = torch.zeros((), dtype=torch.float32, device=device)
        self._handles: list = []
        self.state = {"updates": 0, "trace": 0.0, "grad_sq": 0.0, "small": math.nan, "big": math.nan}

    def set_batch(self, global_seqs: int, grad_accum: int) -> None:
        """A batch ramp's new stage: B_big and the accumulation change; the EMAs go on (each step's estimates of
        |G|^2 and tr(Sigma) are unbiased at any B_big, so steps at different batches average together)."""
        self.b_big, self.grad_accum = global_seqs, grad_accum

    @property
    def possible(self) -> bool:
        return self.b_big > self.b_small

    def arm(self) -> None:
        """Hook every parameter for the next step's backward passes."""
        self._sum_sq.zero_()
        self._handles = [p.register_hook(self._hook) for p in self.params]

    def _hook(self, grad: torch.Tensor) -> None:
        # DeepSpeed scales the loss by 1 / accumulation: this is g_micro / A for this parameter
        self._sum_sq.add_(torch.linalg.vector_norm(grad.detach(), dtype=torch.float32).square())

    def collect(self, big_norm: Optional[float], world_size: int) -> None:
        """After the step: remove the hooks, average |G_small|^2 over ranks, update the EMAs (a sync point)."""
        import torch.distributed as dist

        for handle in self._handles:
            handle.remove()
        self._handles = []
        small = self._sum_sq * self.grad_accum  # sum over A micro-steps of |g/A|^2, times A^2 / A: the mean
        if world_size > 1:
            dist.all_reduce(small, op=dist.ReduceOp.SUM)
            small = small / world_size
        small_sq, big_sq = small.item(), (float(big_norm) ** 2 if big_norm is not None else math.nan)
        if not (math.isfinite(small_sq) and math.isfinite(big_sq)):
            return  # a step with an inf/nan gradient says nothing about the noise
        s = self.state
        grad_sq = (self.b_big * big_sq - self.b_small * small_sq) / (self.b_big - self.b_small)
        trace = (small_sq - big_sq) / (1 / self.b_small - 1 / self.b_big)
        s["grad_sq"] = self.beta * s["grad_sq"] + (1 - self.beta) * grad_sq
        s["trace"] = self.beta * s["trace"] + (1 - self.beta) * trace
        s["small"], s["big"] = small_sq, big_sq
        s["updates"] += 1

    def metrics(self) -> dict:
        """train/noise_scale (B_simple, sequences) and its ingredients, from the bias-corrected EMAs."""
        s = self.state
        if not s["updates"]:
            return {}
        correction = 1 - self.beta ** s["updates"]
        grad_sq, trace = s["grad_sq"] / correction, s["trace"] / correction
        return {NOISE_SCALE: trace / grad_sq if grad_sq > 0 else math.nan,
                GRAD_SQ_SMALL: s["small"], GRAD_SQ_BIG: s["big"], NOISE_SCALE_BATCHES: [self.b_small, self.b_big]}

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)
