"""The gradient noise scale estimator (cbs/pipeline/noise.py) against the exact B_simple of a known problem.

Linear regression y = w*.x + e with x ~ N(0, I_d): at fixed weights w the per-example gradient of the squared
error is g = (w.x - y) x, whose mean G and covariance Sigma are exact population quantities (estimated here on
a million samples), so B_simple = tr(Sigma) / |G|^2 is known. The estimator sees only what pretrain gives it:
the gradients of micro-batches (loss scaled by 1 / accumulation, as DeepSpeed does) and the norm of the step's
accumulated gradient.
"""

from __future__ import annotations

import math

import pytest
import torch

from cbs.pipeline.noise import NoiseScale

D = 8


def _batch(n: int, w_true: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, D, generator=gen)
    return x, x @ w_true + 0.5 * torch.randn(n, generator=gen)


@pytest.mark.parametrize("micro, accum", [(4, 8), (16, 2)])
def test_estimate_converges_to_the_exact_noise_scale(micro, accum):
    gen = torch.Generator().manual_seed(0)
    w_true = torch.randn(D, generator=gen)
    w = torch.nn.Parameter(w_true + 0.3 * torch.randn(D, generator=gen))
    x, y = _batch(1_000_000, w_true, gen)
    with torch.no_grad():
        per_example = (x @ w - y)[:, None] * x  # d/dw of (w.x - y)^2 / 2
        g = per_example.mean(0)
        exact = per_example.var(0).sum().item() / g.square().sum().item()
    noise = NoiseScale([w], micro, micro * accum, accum, torch.device("cpu"), ema=0.99)
    for _ in range(1500):
        noise.arm()
        for _ in range(accum):
            xb, yb = _batch(micro, w_true, gen)
            loss = ((xb @ w - yb).square() / 2).mean() / accum  # DeepSpeed divides by the accumulation steps
            loss.backward()
        noise.collect(w.grad.norm().item(), world_size=1)
        w.grad = None
    estimate = noise.metrics()["train/noise_scale"]
    assert estimate == pytest.approx(exact, rel=0.1), (estimate, exact)
    assert noise.metrics()["train/noise_scale_batches"] == [micro, micro * accum]


def test_one_micro_batch_per_step_measures_nothing():
    w = torch.nn.Parameter(torch.zeros(3))
    noise = NoiseScale([w], 8, 8, 1, torch.device("cpu"))
    assert not noise.possible and noise.metrics() == {}


def test_non_finite_gradients_are_skipped():
    w = torch.nn.Parameter(torch.zeros(3))
    noise = NoiseScale([w], 2, 4, 2, torch.device("cpu"))
    noise.arm()
    (w * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    noise.collect(math.inf, world_size=1)
    assert noise.metrics() == {} and not w._backward_hooks  # no update, hooks removed
