"""Pure pieces of pretrain: batch arithmetic, schedules in tokens, EWA against a hand computation, eval grid,
target tracking on a known loss curve, the DeepSpeed config written from the run config."""

from __future__ import annotations

import math

import pytest
import torch

from cbs.pipeline.config import (ConfigError, PretrainConfig, ScheduleConfig, ScheduleKind, from_dict,
                                 gradient_accumulation)
from cbs.pipeline.distributed import deepspeed_config
from cbs.pipeline.optim import EWA, lr_at, param_groups
from cbs.pipeline.pretrain import eval_steps
from cbs.pipeline.targets import TargetTracker, crossings_match


def cfg(**kw) -> PretrainConfig:
    base = {"data_dir": "d", "run_dir": "r", "global_batch_seqs": 64, "train_tokens": 10**6, "model": "tiny"}
    return from_dict(PretrainConfig, {**base, **kw}, "pretrain")


def test_gradient_accumulation_is_exact_or_refused():
    assert gradient_accumulation(256, 8, 4) == 8
    assert gradient_accumulation(8, 8, 1) == 1
    with pytest.raises(ConfigError, match=r"global_batch_seqs \(100\).*micro_batch_seqs \(8\).*data-parallel size "
                                          r"\(2\) = 16"):
        gradient_accumulation(100, 8, 2)


@pytest.mark.parametrize("name", ["zero1.json", "zero2", "ds_configs/zero3.json"])
def test_deepspeed_config_batch_fields_come_from_the_run(name):
    c = cfg(global_batch_seqs=64, micro_batch_seqs=4, deepspeed_config=name, optimizer={"grad_clip": 0.5})
    ds = deepspeed_config(c, world_size=2, cuda=False)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (64, 4, 8)
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False  # fp32 on CPU
    assert deepspeed_config(c, world_size=2, cuda=True)["bf16"]["enabled"] is True
    with pytest.raises(ConfigError, match=r"global_batch_seqs \(64\).*\(4\).*\(32\)"):
        deepspeed_config(c, world_size=32, cuda=False)


def test_deepspeed_config_refuses_batch_fields_in_the_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"train_batch_size": 32, "zero_optimization": {"stage": 1}}')
    with pytest.raises(ConfigError, match="sets train_batch_size"):
        deepspeed_config(cfg(deepspeed_config=str(path)), world_size=1, cuda=False)


def test_schedules_are_defined_in_tokens():
    peak, total = 1e-3, 1000
    warm = ScheduleConfig(kind=ScheduleKind.constant, warmup_tokens=100, warmup_start_factor=0.1)
    assert lr_at(0, peak, total, warm) == pytest.approx(1e-4)
    assert lr_at(50, peak, total, warm) == pytest.approx(5.5e-4)
    assert lr_at(100, peak, total, warm) == lr_at(999, peak, total, warm) == peak
    cos = ScheduleConfig(kind=ScheduleKind.cosine, warmup_tokens=100, final_lr_factor=0.1)
    assert lr_at(100, peak, total, cos) == pytest.approx(peak)
    assert lr_at(550, peak, total, cos) == pytest.approx(0.55e-3)  # half way: the mean of peak and final
    assert lr_at(1000, peak, total, cos) == pytest.approx(1e-4)
    wsd = ScheduleConfig(kind=ScheduleKind.wsd, decay_fraction=0.2, final_lr_factor=0.0)
    assert lr_at(800, peak, total, wsd) == peak
    assert lr_at(900, peak, total, wsd) == pytest.approx(0.5e-3)
    assert lr_at(1000, peak, total, wsd) == pytest.approx(0.0)
    # runs at different batch sizes reach the peak after the same tokens, so after different numbers of steps
    warmup_tokens = 64 * 128 * 8
    for batch, steps in ((64, 8), (256, 2)):
        c = cfg(global_batch_seqs=batch, schedule={"warmup_tokens": warmup_tokens})
        lrs = [lr_at(s * c.tokens_per_step, c.optimizer.lr, c.train_tokens, c.schedule) for s in range(12)]
        assert lrs.index(c.optimizer.lr) == steps and lrs[steps - 1] < c.optimizer.lr


def test_ewa_equals_hand_computation():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(5))
    taus = [0.9, 0.99]
    ewa = EWA([p], taus)
    thetas = [torch.randn(5) for _ in range(7)]
    for theta in thetas:
        p.data.copy_(theta)
        ewa.update()
    for tau in taus:
        t = len(thetas)
        # w_t = sum_i (1 - tau) tau^(t - i) theta_i, bias-corrected by 1 / (1 - tau^t)
        w = sum((1 - tau) * tau ** (t - i) * theta for i, theta in enumerate(thetas, 1))
        torch.testing.assert_close(ewa.corrected(tau)[0], w / (1 - tau**t), rtol=1e-6, atol=1e-7)
    # swapped in for evaluation, then the training weights are back exactly
    with ewa.swapped_in(0.9):
        torch.testing.assert_close(p.data, ewa.corrected(0.9)[0])
    assert torch.equal(p.data, thetas[-1])
    # a constant parameter is its own average from the first step (the point of the bias correction)
    q = torch.nn.Parameter(torch.full((3,), 2.5))
    e = EWA([q], [0.999])
    e.update()
    torch.testing.assert_close(e.corrected(0.999)[0], q.data)


def test_ewa_state_round_trip():
    p = torch.nn.Parameter(torch.randn(4))
    a, b = EWA([p], [0.9]), EWA([p], [0.9])
    a.update()
    a.update()
    b.load_state_dict(a.state_dict())
    assert b.steps == 2 and torch.equal(b.corrected(0.9)[0], a.corrected(0.9)[0])
    with pytest.raises(ValueError, match="taus"):
        EWA([p], [0.5]).load_state_dict(a.state_dict())


def test_no_weight_decay_on_norms_biases_and_embeddings():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(10, 4)
            self.linear = torch.nn.Linear(4, 4)
            self.norm = torch.nn.LayerNorm(4)

    opt = cfg(optimizer={"weight_decay": 0.1}).optimizer
    decay, no_decay = param_groups(M(), opt)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 4)]
    assert len(no_decay["params"]) == 4  # embedding, linear bias, norm weight and bias


def test_eval_grid_resolves_steps_to_target_at_every_scale():
    grid = sorted(eval_steps(5000, every=1000, growth=1.1))
    assert grid[:3] == [1, 2, 3] and grid[-1] == 5000 and {1000, 2000, 3000, 4000} <= set(grid)
    gaps = [(b - a) / a for a, b in zip(grid, grid[1:]) if a >= 20]
    assert max(gaps) <= 0.11  # about 10% resolution everywhere
    assert sorted(eval_steps(30, every=10, growth=0)) == [1, 10, 20, 30]


def test_target_tracking_on_a_known_curve():
    tracker = TargetTracker([3.0, 2.0, 0.5], ["raw", "ewa/0.99"])
    curve = {10: 4.0, 20: 3.2, 30: 2.8, 40: 1.9}  # loss(step)
    for step, loss in curve.items():
        tracker.update(step, step * 100, {"raw": loss, "ewa/0.99": loss - 0.5})
    out = tracker.to_json()
    raw3 = out[0]["raw"]
    assert raw3["step"] == 30 and raw3["tokens"] == 3000
    # interpolated in log-loss between (20, 3.2) and (30, 2.8)
    expected = 20 + 10 * (math.log(3.2) - math.log(3.0)) / (math.log(3.2) - math.log(2.8))
    assert raw3["step_interp"] == pytest.approx(expected, abs=1e-4)
    assert out[0]["ewa"]["0.99"]["step"] == 20  # 2.7 <= 3 at step 20
    assert out[1]["raw"]["step"] == 40 and out[1]["ewa"]["0.99"]["step"] == 40
    assert out[2]["raw"] is None and out[2]["ewa"]["0.99"] is None
    assert not tracker.all_reached()
    tracker.update(50, 5000, {"raw": 0.6, "ewa/0.99": 0.4})
    assert tracker.all_reached()  # the last target reached by EWA weights only
    first = TargetTracker([5.0], ["raw"])
    first.update(1, 10, {"raw": 4.0})  # below at the first eval: no earlier point to interpolate from
    assert first.to_json()[0]["raw"]["step_interp"] == 1


def test_stop_weights_choose_which_crossings_count():
    tracker = TargetTracker([3.0], ["raw", "ewa/0.9", "ewa/0.99"])
    tracker.update(10, 1000, {"raw": 2.9, "ewa/0.9": 3.2, "ewa/0.99": 3.5})
    assert tracker.all_reached("any") and tracker.all_reached("raw") and not tracker.all_reached("ewa")
    tracker.update(20, 2000, {"raw": 2.8, "ewa/0.9": 3.1, "ewa/0.99": 2.95})
    assert tracker.all_reached("ewa")
    with pytest.raises(ConfigError, match="stop_weights is ewa but pretrain.ewa.taus is empty"):
        cfg(stop_weights="ewa", targets=[3.0], stop_at_targets=True)


def test_targets_restore_by_value_never_by_position():
    """A checkpoint's crossings belong to its target values: a resumed run with other targets must not inherit
    the crossing of the target that used to sit at the same position."""
    old = TargetTracker([3.0, 2.0], ["raw"])
    curve = [(10, 3.5), (20, 2.9), (30, 2.5)]
    for step, loss in curve:
        old.update(step, step * 100, {"raw": loss})
    new = TargetTracker([2.7, 3.0], ["raw"])  # 3.0 moved to position 1; 2.7 is new
    missing = new.load_state_dict(old.state_dict())
    assert missing == [2.7]
    assert new.crossings["raw"][1] == old.crossings["raw"][0]  # 3.0's crossing, found by value
    assert new.crossings["raw"][0] is None  # not 3.0's crossing at position 0
    replayed = TargetTracker([2.7, 3.0], ["raw"])
    replayed.replay([{"step": s, "eval/loss": loss} for s, loss in curve], 100, until_step=30)
    assert replayed.crossings["raw"][1] == old.crossings["raw"][0]
    assert replayed.crossings["raw"][0]["step"] == 30  # 2.5 <= 2.7 first at step 30
    assert crossings_match({"targets": replayed.to_json()}, [3.0, 2.7])
    assert not crossings_match({"targets": old.to_json()}, [2.7, 3.0])


def test_non_finite_losses_logged_as_strings_are_read_as_floats():
    """metrics.jsonl holds "nan"/"inf" for non-finite values (JSON has none): the tracker must not compare
    strings with targets (a study crashed on `"nan" <= target`)."""
    tracker = TargetTracker([3.0], ["raw"])
    tracker.replay([{"step": 1, "eval/loss": 4.0}, {"step": 2, "eval/loss": "nan"}, {"step": 3, "eval/loss": "inf"},
                    {"step": 4, "eval/loss": 2.5}], 10)
    crossing = tracker.to_json()[0]["raw"]
    assert crossing["step"] == 4  # interpolated from step 1 (the last finite eval)
    assert 1 < crossing["step_interp"] < 4


def test_a_micro_batch_larger_than_the_batch_is_the_batch_as_in_a_study():
    """micro_batch_seqs above the (first) global batch trains one micro-batch of the whole batch, as a study's runs
    always did; a direct pretrain used to refuse it at start."""
    c = cfg(global_batch_seqs=4, micro_batch_seqs=8)
    ds = deepspeed_config(c, world_size=1, cuda=False)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (4, 4, 1)
    # over 2 ranks: micro 4 x 2 ranks does not divide 4, refused naming the key
    with pytest.raises(ConfigError, match=r"global_batch_seqs \(4\) must be divisible by micro_batch_seqs \(4\) x "
                                          r"data-parallel size \(2\) = 8"):
        c.layout(2)
