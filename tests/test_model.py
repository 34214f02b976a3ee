"""cbs/pipeline/model.py against real megatron-core on CPU: attention maths, builds, counts, learning, determinism."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cbs.pipeline import model as M  # first: it imports megatron-core without its TE/Apex warnings
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from cbs.pipeline.config import MODEL_PRESETS, Activation, ModelConfig, Norm, PositionEmbedding

VOCAB = 500  # padded to 512: the loss at init is ~log(512)


def preset(name: str, **overrides) -> ModelConfig:
    """A validated ModelConfig from MODEL_PRESETS, as `model: NAME` in YAML would give."""
    fields = {k: v for k, v in ModelConfig.expand(name, "model").items() if k != "preset"}
    fields.update(overrides)
    enums = {"position_embedding": PositionEmbedding, "activation": Activation, "norm": Norm}
    cfg = ModelConfig(**{k: enums[k](v) if k in enums else v for k, v in fields.items()})
    cfg.validate("model")
    return cfg


@pytest.fixture(scope="module", autouse=True)
def megatron_process():
    """What build_model needs in one process: a world-size-1 gloo group on a free local port, megatron's
    parallel_state at TP = PP = 1. (cbs/pipeline/distributed.py does the same for real runs.) Reuses either if
    another fixture already made it, and tears down only what it made."""
    from megatron.core import parallel_state

    made_group = not torch.distributed.is_initialized()
    if made_group:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0)
    made_state = not parallel_state.model_parallel_is_initialized()
    if made_state:
        parallel_state.initialize_model_parallel(1, 1)
    yield
    if made_state:
        parallel_state.destroy_model_parallel()
    if made_group:
        torch.distributed.destroy_process_group()


def build(cfg: ModelConfig, seed: int = 0, **kwargs):
    M.seed_model_parallel(seed)
    return M.build_model(cfg, VOCAB, **kwargs)


def tokens(batch: int, cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, cfg.seq_len + 1), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# attention


def naive_causal_attention(q, k, v, scale):
    """[s, b, h, d] queries, [s, b, g, d] keys/values -> [s, b, h*d]: softmax(q k^T scale + causal -inf) v."""
    s, b, h, d = q.shape
    k, v = (t.repeat_interleave(h // t.size(2), dim=2) for t in (k, v))  # query head i reads kv head i // (h/g)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) * scale
    future = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhqk,kbhd->qbhd", probs, v).reshape(s, b, h * d)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_sdpa_attention_equals_naive_causal_softmax(kv_heads):
    cfg = preset("tiny", hidden=64, heads=4, kv_heads=kv_heads)
    config = M.transformer_config(cfg, torch.float32, use_cpu_initialization=True)
    attn = M.SDPACoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    assert attn.softmax_scale == pytest.approx(1 / math.sqrt(16))
    g = torch.Generator().manual_seed(0)
    s, b, d = 24, 3, 16
    q = torch.randn(s, b, 4, d, generator=g, requires_grad=True)
    k = torch.randn(s, b, kv_heads, d, generator=g, requires_grad=True)
    v = torch.randn(s, b, kv_heads, d, generator=g, requires_grad=True)

    out = attn(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    ref = naive_causal_attention(q, k, v, attn.softmax_scale)
    assert out.shape == (s, b, 4 * d)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    upstream = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    ref_grads = torch.autograd.grad(ref, (q, k, v), upstream)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sdpa_attention_refuses_non_causal_masks():
    config = M.transformer_config(preset("tiny"), torch.float32, use_cpu_initialization=True)
    with pytest.raises(ValueError, match="causal attention only"):
        M.SDPACoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.padding, attention_type="self")
    attn = M.SDPACoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    q = torch.zeros(8, 1, 4, 32)
    with pytest.raises(ValueError, match="no_mask"):
        attn(q, q, q, None, attn_mask_type=AttnMaskType.no_mask)


# ----------------------------------------------------------------------------------------------------------------
# building, forward, backward

VARIANTS = {
    "tiny": {},
    "learned-positions": dict(position_embedding="learned"),
    "swiglu-rmsnorm": dict(activation="swiglu", norm="rmsnorm"),
    "tied": dict(tied_embeddings=True),
    "bias": dict(bias=True),
    "gqa": dict(kv_heads=2),
    "no-qk-norm": dict(qk_layernorm=False),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_build_forward_backward(name):
    cfg = preset("tiny", **VARIANTS[name])
    model = build(cfg)
    layer = model.decoder.layers[0]
    attention = layer.self_attention
    assert isinstance(attention.core_attention, M.SDPACoreAttention)
    kv = cfg.kv_heads or cfg.heads
    assert attention.linear_qkv.weight.shape == ((cfg.heads + 2 * kv) * cfg.hidden // cfg.heads, cfg.hidden)
    fc1_rows = cfg.ffn * (2 if cfg.activation is Activation.swiglu else 1)
    assert layer.mlp.linear_fc1.weight.shape == (fc1_rows, cfg.hidden)
    norm_type = torch.nn.RMSNorm if cfg.norm is Norm.rmsnorm else torch.nn.LayerNorm
    assert isinstance(layer.input_layernorm, norm_type)
    assert isinstance(attention.q_layernorm, norm_type) == cfg.qk_layernorm
    assert (attention.linear_qkv.bias is not None) == cfg.bias
    assert hasattr(model.embedding, "position_embeddings") == (cfg.position_embedding is PositionEmbedding.learned)
    assert (model.output_layer.weight is None) == cfg.tied_embeddings

    loss, per_token = M.forward_loss(model, tokens(4, cfg))
    assert per_token.shape == (4, cfg.seq_len) and per_token.dtype == torch.float32
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - math.log(M.padded_vocab(VOCAB))) < 0.5
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


def stock_megatron(cfg: ModelConfig):
    """The same GPT through megatron-core's own paths: its linear layers (autograd Functions), its RoPE (in its
    attention, from GPTModel's RotaryEmbedding) and its vocab-parallel cross entropy; SDPA core attention."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization=M._NORMALIZATION[cfg.norm])
    spec.submodules.self_attention.submodules.core_attention = M.SDPACoreAttention  # no rotary_base: no RoPE
    spec.submodules.mlp.params = {**spec.submodules.mlp.params, "ffn_hidden_size": cfg.ffn}
    rope = cfg.position_embedding is PositionEmbedding.rope
    model = GPTModel(config=M.transformer_config(cfg, torch.float32, use_cpu_initialization=True),
                     transformer_layer_spec=spec, vocab_size=M.padded_vocab(VOCAB), max_sequence_length=cfg.seq_len,
                     position_embedding_type="rope" if rope else "learned_absolute", rotary_base=cfg.rope_base,
                     share_embeddings_and_output_weights=cfg.tied_embeddings)
    if rope:  # megatron's get_emb minus its move of the frequencies to CUDA (the only line that needs a GPU)
        rotary = model.rotary_pos_emb
        rotary.get_emb = lambda s, offset=0: torch.cat([rotary.get_freqs_non_repeated(s, offset)] * 2, -1)[
            :, None, None, :]
    return model


@pytest.mark.parametrize("name", ["tiny", "learned-positions", "tied", "bias", "gqa", "swiglu-rmsnorm"])
def test_tp1_paths_equal_megatron_stock_paths(name):
    """Our TP = 1 linear layers, loss and RoPE-in-attention compute what megatron's own paths compute, from the
    same state dict (loaded strictly: same parameter names), forward and backward."""
    cfg = preset("tiny", **VARIANTS[name])
    ours = build(cfg)
    assert isinstance(ours.decoder.layers[0].mlp.linear_fc2, M._LocalRowLinear)
    assert not hasattr(ours, "rotary_pos_emb")  # RoPE is the core attention's
    stock = stock_megatron(cfg)
    stock.load_state_dict(ours.state_dict(), strict=True)
    batch = tokens(3, cfg)
    (loss, per_token), (stock_loss, stock_per_token) = M.forward_loss(ours, batch), M.forward_loss(stock, batch)
    torch.testing.assert_close(per_token, stock_per_token, rtol=1e-5, atol=1e-5)
    loss.backward()
    stock_loss.backward()
    stock_params = dict(stock.named_parameters())
    for pname, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, stock_params[pname].grad, rtol=1e-4, atol=1e-6, msg=pname)


def test_sdpa_rope_is_megatrons_rope_bit_for_bit():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    config = M.transformer_config(preset("tiny"), torch.float32, use_cpu_initialization=True)
    attn = M.SDPACoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                               rotary_base=500.0)
    x = torch.randn(16, 2, 4, 32, generator=torch.Generator().manual_seed(0))
    freqs = RotaryEmbedding(kv_channels=32, rotary_percent=1.0, rotary_base=500, use_cpu_initialization=True)
    freqs = torch.cat([freqs.get_freqs_non_repeated(16)] * 2, -1)[:, None, None, :]
    assert torch.equal(attn._rotate(x), _apply_rotary_pos_emb_bshd(x, freqs))
    assert torch.equal(attn._rotate(x[:8]), _apply_rotary_pos_emb_bshd(x[:8], freqs[:8]))  # table per length


def test_forward_loss_is_shifted_next_token_cross_entropy_and_causal():
    cfg = preset("tiny", seq_len=32)
    model = build(cfg)
    batch = tokens(2, cfg)
    loss, per_token = M.forward_loss(model, batch)
    positions = torch.arange(cfg.seq_len).expand(2, -1)
    logits = model(batch[:, :-1], positions, None)  # no labels: [b, s, padded vocab]
    want = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
    torch.testing.assert_close(per_token, want, rtol=1e-5, atol=1e-5)
    assert loss.item() == pytest.approx(per_token.mean().item())

    k = 20  # a different token at k changes nothing before it: per_token[j] reads tokens[0..j], predicts j+1
    changed = batch.clone()
    changed[:, k] = (changed[:, k] + 1) % VOCAB
    _, per_token2 = M.forward_loss(model, changed)
    torch.testing.assert_close(per_token2[:, : k - 1], per_token[:, : k - 1], rtol=0, atol=0)
    assert not torch.equal(per_token2[:, k:], per_token[:, k:])


def test_bf16_build():
    cfg = preset("tiny")
    model = build(cfg, params_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.bf16 and not model.config.fp16
    loss, _ = M.forward_loss(model, tokens(2, cfg))
    assert loss.dtype == torch.float32 and abs(loss.item() - math.log(512)) < 0.5


# ----------------------------------------------------------------------------------------------------------------
# counts


@pytest.mark.parametrize("name", ["tiny", "learned-positions", "tied", "swiglu-rmsnorm", "gqa", "bias"])
def test_param_counts(name):
    cfg = preset("tiny", **VARIANTS[name])
    model = build(cfg)
    counts = M.param_counts(model, cfg)
    vp, d, L = 512, cfg.hidden, cfg.layers
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["non_embedding"] == 12 * L * d**2
    learned = cfg.position_embedding is PositionEmbedding.learned
    assert counts["embedding"] == vp * d * (1 if cfg.tied_embeddings else 2) + (cfg.seq_len * d if learned else 0)
    assert counts["non_embedding_exact"] == counts["total"] - counts["embedding"]
    assert counts["matmul_params"] == M.matmul_params(cfg, VOCAB)
    two_d = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    lookups = sum(p.numel() for n, p in two_d.items() if "embedding" in n)
    tied_head = vp * d if cfg.tied_embeddings else 0  # a tied head's GEMM reads the (excluded) lookup table
    assert counts["matmul_params"] == sum(p.numel() for p in two_d.values()) - lookups + tied_head
    if name in ("tiny", "learned-positions", "tied", "bias"):  # 4d MLP, full heads: the formula is exact
        assert counts["matmul_params"] == 12 * L * d**2 + vp * d
    assert M.flops_per_token(cfg, VOCAB) == 6 * counts["matmul_params"] + 12 * L * d * cfg.seq_len


@pytest.mark.parametrize("name,params", [("85M", 85e6), ("151M", 151e6), ("302M", 302e6), ("604M", 604e6),
                                         ("1.2B", 1.2e9)])
def test_paper_presets_non_embedding_from_config(name, params):
    assert preset(name).non_embedding_params == pytest.approx(params, rel=0.01)


def test_flops_per_token_reproduces_the_design_mfu_anchor():
    """docs/method.md: GPT-2 small shape (50257-token vocab), 308k tokens/s on an H100 (989 TFLOP/s) is 26.6% MFU."""
    cfg = preset("gpt2-small")
    assert M.padded_vocab(50257) == 50304
    assert 308e3 * M.flops_per_token(cfg, 50257) / 989e12 == pytest.approx(0.266, abs=5e-4)


def test_padded_vocab():
    assert [M.padded_vocab(v) for v in (1, 64, 65, 500, 512)] == [64, 64, 128, 512, 512]
    assert M.padded_vocab(500, multiple=128) == 512
    with pytest.raises(ValueError):
        M.padded_vocab(0)


# ----------------------------------------------------------------------------------------------------------------
# learning and determinism


def test_adamw_overfits_one_batch():
    cfg = preset("tiny")
    model = build(cfg)
    batch = tokens(4, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    first, _ = M.forward_loss(model, batch)
    loss = first
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss, _ = M.forward_loss(model, batch)
    assert loss.item() < 0.5 * first.item(), (first.item(), loss.item())


def test_same_seed_same_initial_weights():
    cfg = preset("tiny", position_embedding="learned", bias=True)
    a, b, c = build(cfg, seed=7).state_dict(), build(cfg, seed=7).state_dict(), build(cfg, seed=8).state_dict()
    weights = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    assert weights and all(torch.equal(a[k], b[k]) for k in weights)
    assert not torch.equal(a["decoder.layers.0.self_attention.linear_qkv.weight"],
                           c["decoder.layers.0.self_attention.linear_qkv.weight"])


def test_import_is_quiet_about_missing_transformer_engine_and_apex():
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    code = "import warnings; warnings.simplefilter('always'); import cbs.pipeline.model"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "not installed" not in out.stderr, out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_build_on_cuda():
    cfg = preset("tiny")
    model = build(cfg, device="cuda", params_dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    loss, _ = M.forward_loss(model, tokens(2, cfg).cuda())
    loss.backward()
    assert abs(loss.item() - math.log(512)) < 0.5
