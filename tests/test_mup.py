"""muP (model.mup): the coordinate check on the stdlib corpus, its rules on a built model, standard
parametrisation unchanged (bit for bit), DeepSpeed honouring the per-group LR, and bad input.

The coordinate check (Yang et al. 2021, Tensor Programs V, sec. 5 and Fig. 5): train a few Adam steps at widths
64, 128, 256 and measure the mean |coordinate| of the logits and of the last layer's output. Under muP they stay
flat across widths; under the standard parametrisation (same LR, same init std) they grow with the width. Both
are asserted, so the test can fail.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from cbs.pipeline import model as M  # first: it imports megatron-core without its TE/Apex warnings
from cbs.pipeline import pretrain  # noqa: E402
from cbs.pipeline.config import ConfigError, ModelConfig, MupConfig, OptimizerConfig, from_dict  # noqa: E402
from cbs.pipeline.data import TrainSamples, read_manifest  # noqa: E402
from cbs.pipeline.metrics import read_metrics  # noqa: E402
from cbs.pipeline.optim import make_optimizer, param_groups  # noqa: E402
from test_model import megatron_process  # noqa: E402,F401  (the process group build_model needs)
from test_pretrain import SEQ, make_cfg  # noqa: E402

WIDTHS = (64, 128, 256)
BASE = 64


def model_cfg(width: int, mup: bool, **kw) -> ModelConfig:
    return ModelConfig(layers=2, hidden=width, heads=4, seq_len=SEQ, mup=MupConfig(BASE) if mup else None, **kw)


def build(cfg: ModelConfig, vocab: int, seed: int = 0):
    M.seed_model_parallel(seed)
    return M.build_model(cfg, vocab)


def train(model, data, steps: int, lr: float, batch: int = 8, seed: int = 0) -> list[float]:
    """`steps` AdamW steps on the stdlib train split, each group at lr x its lr_mult (as the trainer sets it)."""
    opt = make_optimizer(model, OptimizerConfig(lr=lr))
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    samples, losses = TrainSamples(data, SEQ, seed), []
    for step in range(steps):
        loss, _ = M.forward_loss(model, samples.batch(step * batch, batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def coordinates(model, data) -> tuple[float, float]:
    """Mean |logit| and mean |last layer output| on a fixed batch of the train split."""
    seen = {}
    hook = model.decoder.layers[-1].register_forward_hook(
        lambda m, i, out: seen.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    x = TrainSamples(data, SEQ, 0).batch(10_000, 8)[:, :-1]
    with torch.no_grad():
        logits = model(x, torch.arange(SEQ).expand(8, SEQ), None)
    hook.remove()
    return logits.abs().mean().item(), seen["h"].abs().mean().item()


def test_coordinate_check_flat_under_mup_growing_under_sp(stdlib_data):
    """8 Adam steps at LR 3e-3 (measured: SP logits 0.75 -> 1.5 -> 2.3 and last-layer 0.42 -> 1.0 -> 4.3 over d 64
    -> 256; muP 0.75 -> 0.81 -> 0.82 and 0.42 -> 0.35 -> 0.36)."""
    vocab = read_manifest(stdlib_data, SEQ)["vocab_size"]
    coords = {}
    for mup in (False, True):
        for width in WIDTHS:
            model = build(model_cfg(width, mup), vocab)
            losses = train(model, stdlib_data, steps=8, lr=3e-3)
            assert all(math.isfinite(x) for x in losses)
            coords[mup, width] = coordinates(model, stdlib_data)
    for i, what in enumerate(("logits", "last layer")):
        sp = [coords[False, w][i] for w in WIDTHS]
        mup = [coords[True, w][i] for w in WIDTHS]
        assert sp[-1] / sp[0] > 2.0 and sp[0] < sp[1] < sp[2], (what, sp)  # SP grows with the width
        assert max(mup) / min(mup) < 1.5, (what, mup)  # muP stays flat
    assert coords[False, BASE] == coords[True, BASE]  # the base width is SP itself


def test_mup_rules_on_a_built_model():
    """Hidden matrices: init std x sqrt(H0/H), lr_mult H0/H; embeddings, norms, head: neither; logits x H0/H;
    attention scale sqrt(d0_head)/d_head."""
    vocab = 500
    for tied in (False, True):
        sp, mup = (build(model_cfg(256, m, tied_embeddings=tied, bias=True), vocab) for m in (False, True))
        sp_p, mup_p = dict(sp.named_parameters()), dict(mup.named_parameters())
        for name, p in mup_p.items():
            hidden = name.endswith(M.HIDDEN_MATRICES) and name.startswith("decoder.layers.")
            expected = sp_p[name] * (0.5 if hidden else 1.0)  # sqrt(64/256): the same draws, scaled
            assert torch.allclose(p, expected, rtol=1e-6, atol=0), name
            assert getattr(p, "lr_mult", None) == (0.25 if hidden else None), name
        assert mup.output_layer.output_mult == 0.25
        x = torch.randint(0, vocab, (2, SEQ))
        pos = torch.arange(SEQ).expand(2, SEQ)
        with torch.no_grad():  # same readout input -> logits x 1/4: check it on the head alone
            h = torch.randn(SEQ, 2, 256)
            w = mup.shared_embedding_or_output_weight() if tied else None
            assert torch.allclose(mup.output_layer(h, weight=w)[0], 0.25 * sp.output_layer(h, weight=w)[0])
            assert mup(x, pos, None).shape == sp(x, pos, None).shape
        attention = mup.decoder.layers[0].self_attention.core_attention
        assert attention.softmax_scale == pytest.approx(math.sqrt(16) / 64)  # d_head 64, base d_head 16
        groups = param_groups(mup, OptimizerConfig(weight_decay=0.1))
        scaled = [g for g in groups if "lr_mult" in g]
        assert len(scaled) == 1 and scaled[0]["lr_mult"] == 0.25 and scaled[0]["weight_decay"] == pytest.approx(0.4)
        assert len(scaled[0]["params"]) == 4 * 2  # qkv, proj, fc1, fc2 x 2 layers
        assert all(g["params"] for g in groups)


def test_sp_param_groups_unchanged():
    """Without model.mup: the two groups of before (matrices decay; norms, biases, embeddings do not), no lr_mult."""
    model = build(model_cfg(128, False, bias=True), 500)
    groups = param_groups(model, OptimizerConfig(weight_decay=0.1))
    assert [set(g) for g in groups] == [{"params", "weight_decay"}] * 2
    names = {id(p): n for n, p in model.named_parameters()}
    decay = sorted(names[id(p)] for p in groups[0]["params"])
    assert decay == sorted(n for n, p in model.named_parameters() if p.ndim == 2 and "embedding" not in n)
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0


def test_mup_at_the_base_width_is_sp_bit_for_bit(stdlib_data):
    """mup.base_hidden = hidden: every multiplier is 1, so the weights and every step's loss equal SP exactly."""
    vocab = read_manifest(stdlib_data, SEQ)["vocab_size"]
    sp, mup = build(model_cfg(BASE, False), vocab), build(model_cfg(BASE, True), vocab)
    assert all(torch.equal(a, b) for a, b in zip(sp.state_dict().values(), mup.state_dict().values())
               if isinstance(a, torch.Tensor))
    assert train(sp, stdlib_data, 4, 3e-3) == train(mup, stdlib_data, 4, 3e-3)


def ds_run(data, run_dir, model: dict, steps: int = 4):
    cfg = make_cfg(data, run_dir, model={"preset": "tiny", "seq_len": SEQ, **model}, train_tokens=8 * SEQ * steps,
                   micro_batch_seqs=8, ewa={"taus": []}, eval={"every_steps": 100, "growth": 0},
                   optimizer={"lr": 3e-3, "grad_clip": 0.0}, checkpoint={"every_steps": 0})
    pretrain.main(cfg)
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def test_pretrain_sp_unchanged_and_deepspeed_applies_mup_lr(stdlib_data, tmp_path):
    """Through DeepSpeed (ZeRO-1, CPU): a run with mup at the base width logs SP's losses bit for bit; a muP run at
    twice the base width logs the losses of the plain-torch loop with the same groups (lr_mult reached the
    engine's optimizer)."""
    sp = ds_run(stdlib_data, tmp_path / "sp", {})
    assert ds_run(stdlib_data, tmp_path / "base", {"mup": 128}) == sp
    wide = ds_run(stdlib_data, tmp_path / "wide", {"mup": 64})
    assert wide != sp
    vocab = read_manifest(stdlib_data, SEQ)["vocab_size"]
    cfg = from_dict(ModelConfig, {"preset": "tiny", "seq_len": SEQ, "mup": 64}, "model")
    reference = train(build(cfg, vocab, seed=7), stdlib_data, 4, 3e-3, seed=7)
    assert [wide[s] for s in sorted(wide)] == pytest.approx(reference, abs=1e-5)


@pytest.mark.parametrize("model,message", [
    ({"mup": 0}, "model.mup.base_hidden must be a width >= 1"),
    ({"mup": -64}, "model.mup.base_hidden must be a width >= 1"),
    ({"mup": 30}, "model.mup.base_hidden (30) must be divisible by model.heads (4)"),
    ({"mup": {}}, "model.mup.base_hidden is required"),
    ({"mup": "wide"}, "model.mup.base_hidden must be an integer"),
    ({"mup": {"base": 64}}, "model.mup.base is not a known key"),
    ({"mup": 64, "ffn_hidden": 256}, "model.ffn_hidden is set (256) with model.mup"),
])
def test_bad_mup_config_names_the_key(model, message):
    with pytest.raises(ConfigError) as e:
        from_dict(ModelConfig, ModelConfig.expand({"preset": "tiny", **model}, "model"), "model")
    assert message in str(e.value)


def test_mup_in_a_config_file_round_trips(tmp_path):
    """`mup: 64` is short for {base_hidden: 64}; the saved config reloads as the same model."""
    from cbs.pipeline.config import PretrainConfig, load_config, to_dict

    path = tmp_path / "c.yaml"
    path.write_text("data_dir: d\nrun_dir: r\ntrain_tokens: 100000\nglobal_batch_seqs: 8\nmodel: tiny\n")
    cfg = load_config(PretrainConfig, path, ["model.mup=64", "model.hidden=256"])
    assert cfg.model.mup == MupConfig(64) and cfg.model.hidden == 256
    again = from_dict(PretrainConfig, json.loads(json.dumps(to_dict(cfg))), "pretrain")
    assert again.model == cfg.model
