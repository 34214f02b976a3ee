"""The GPT of every run: megatron-core's `GPTModel` built from a `ModelConfig`, with SDPA core attention.

What this module adds to megatron-core 0.16.1 and why:
- `SDPACoreAttention` replaces the local spec's `DotProductAttention` (baddbmm + masked softmax + bmm). The stock
  module is 1.9x slower end to end on an H100 (105k vs 201k tokens/s at GPT-2 small; docs/method.md, "Throughput
  and MFU") and cannot run on CPU at all without a mask built by the caller (its causal fallback builds the mask
  on CUDA).
- Lean paths at tensor-parallel size 1, where megatron's generality costs host time on every step without doing
  anything (docs/method.md, "Throughput and MFU"): the linear layers run as one `F.linear` (`_LocalColumnLinear`,
  `_LocalRowLinear`) instead of a Python autograd Function that also checks for tensor-parallel communication;
  the loss is `F.cross_entropy` (`_LocalGPTModel`) instead of the vocab-parallel one, which all-reduces three
  times over a group of one; RoPE is applied by `SDPACoreAttention` from a cos/sin table built once per sequence
  length, instead of megatron recomputing cos and sin for q and k in every layer and forward. Same maths, same
  parameters and state-dict names; with tensor parallelism each falls back to megatron's own path.
- Parameter and FLOP counts with the definitions of docs/method.md (N = 12 L d^2; MFU's 6 x matmul params +
  12 L d T).

Initialisation a process needs before `build_model` (cbs/pipeline/distributed.py owns it; tests do it themselves):
1. `torch.distributed.init_process_group` (gloo on CPU, world size >= 1): megatron's linear layers and the
   vocab-parallel cross entropy query their tensor-parallel group even at TP = 1.
2. `megatron.core.parallel_state.initialize_model_parallel(1, 1)`.
3. `seed_model_parallel(seed)` (below): on CPU initial weights come from torch's default generator
   (`use_cpu_initialization=True`); on CUDA also megatron's model-parallel RNG tracker, which the GPU init uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from cbs.pipeline.config import Activation, ModelConfig, Norm, PositionEmbedding

# megatron-core warns at import that TransformerEngine and Apex are missing (it falls back to torch modules, which
# is what we want); silence exactly those, here, rather than filtering warnings process-wide.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine and Apex|Apex) (are|is) not installed",
                            category=UserWarning)
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.utils import is_layer_window_attention
    from megatron.core.utils import divide

__all__ = [
    "SDPACoreAttention", "layer_spec", "transformer_config", "padded_vocab", "build_model", "forward_loss",
    "param_counts", "matmul_params", "flops_per_token", "seed_model_parallel", "apply_mup", "mup_fan_in_mults",
    "mup_softmax_scale",
]

_NORMALIZATION = {Norm.layernorm: "LayerNorm", Norm.rmsnorm: "RMSNorm"}


# ----------------------------------------------------------------------------------------------------------------
# attention


class SDPACoreAttention(MegatronModule):
    """Causal attention through `torch.nn.functional.scaled_dot_product_attention`: a drop-in `core_attention`.

    Same constructor and forward signature as megatron-core 0.16.1's `DotProductAttention`. Shapes:
    query [sq, b, heads, head_dim], key/value [sk, b, kv_heads, head_dim] (kv_heads < heads for grouped-query
    attention, which SDPA handles itself with `enable_gqa`, without materialising repeated keys/values);
    output [sq, b, heads * head_dim] (per tensor-parallel partition).

    Scale: `softmax_scale` if given, else 1/sqrt(head_dim), as megatron. `apply_query_key_layer_scaling` does not
    change it: megatron divides the scores by the layer number and multiplies them back inside its softmax, a
    trick for fp16 range only, so the softmax sees the same scaled scores.

    RoPE: with `rotary_base` set, queries and keys are rotated here, where megatron's attention would rotate them
    (after the QK norms, before the scores; the GPT is then built without megatron's own RoPE), with megatron's
    maths (non-interleaved, rotate-half, all head dims): x cos + rotate_half(x) sin, the cos/sin of positions x
    base^(-2i/d) computed in fp32 and cast to x's dtype. The tables are built once per (seq_len, dtype, device).

    Only causal self-attention: `attention_mask` is ignored (SDPA's `is_causal=True` is the mask, so no [s, s]
    mask is built, stored or read); any other mask type, packed sequences, attention bias, sliding windows,
    non-vanilla softmax and context parallelism raise errors instead of computing something else.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        rotary_base: Optional[float] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("SDPACoreAttention does not support context parallelism (context_parallel_size "
                                      f"= {config.context_parallel_size}); use TransformerEngine attention")
        _check_causal(attn_mask_type)
        if config.softmax_type != "vanilla":
            raise NotImplementedError(f"SDPACoreAttention supports softmax_type 'vanilla' only: got "
                                      f"{config.softmax_type!r}")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise NotImplementedError(f"SDPACoreAttention does not support sliding-window attention (window_size "
                                      f"= {config.window_size})")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.tp_size = pg_collection.tp.size()

        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, self.tp_size)
        head_dim = divide(projection_size, config.num_attention_heads)
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        if rotary_base is not None and config.rotary_interleaved:
            raise NotImplementedError("SDPACoreAttention applies non-interleaved RoPE only (rotary_interleaved=False)")
        self.rotary_base = rotary_base
        self._rope: Optional[tuple[tuple, torch.Tensor, torch.Tensor]] = None  # (key, cos, signed sin)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """[sq, b, heads, head_dim] x 2 + [sk, b, kv_heads, head_dim] -> [sq, b, heads * head_dim]."""
        if packed_seq_params is not None:
            raise NotImplementedError("SDPACoreAttention does not support packed sequences (packed_seq_params)")
        if attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention does not support an attention bias")
        _check_causal(self.attn_mask_type if attn_mask_type is None else attn_mask_type)
        if query.size(0) != key.size(0):
            # SDPA's causal mask is aligned top-left; a KV cache (sq < sk) would need it bottom-right
            raise NotImplementedError(f"SDPACoreAttention needs as many queries as keys (self-attention over one "
                                      f"sequence, no KV cache): got {query.size(0)} and {key.size(0)}")
        if self.rotary_base is not None:
            query, key = self._rotate(query), self._rotate(key)
        # [s, b, h, d] -> [b, h, s, d] as views: SDPA accepts strided inputs, a copy would cost a read+write
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.dropout_p if self.training else 0.0
        # megatron draws attention dropout from the model-parallel RNG stream so that tensor-parallel ranks (which
        # hold different heads) drop independently; at TP = 1 the default generator is the same thing
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p > 0 and self.tp_size > 1
               else contextlib.nullcontext())
        with rng:
            out = _causal_sdpa(q, k, v, dropout_p, self.softmax_scale)
        # [b, h, s, d] -> [s, b, h * d]
        return out.permute(2, 0, 1, 3).reshape(out.size(2), out.size(0), self.hidden_size_per_partition)


    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """RoPE on [s, b, h, d]: x cos + rotate_half(x) sin, rotate_half(x) = [-x2, x1] (RoFormer, Su et al. 2021,
        eq. 34; megatron-core's `_apply_rotary_pos_emb_bshd`). Written as x cos + roll(x, d/2) [-sin, sin]: the
        same products and sum, bit for bit, in 4 ops instead of megatron's 15 (cos and sin included)."""
        s, d = x.size(0), x.size(-1)
        key = (s, d, x.dtype, x.device)
        if self._rope is None or self._rope[0] != key:
            self._rope = (key, *_rope_tables(s, d, self.rotary_base, x.dtype, x.device))
        _, cos, signed_sin = self._rope
        return x * cos + x.roll(d // 2, dims=-1) * signed_sin


@torch.no_grad()
def _rope_tables(seq_len: int, head_dim: int, base: float, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and [-sin, sin] of RoPE as [s, 1, 1, d] in `dtype`, from megatron's RotaryEmbedding formula: inverse
    frequencies base^(-2i/d) (i < d/2), angles positions x inv_freq in fp32, repeated for the two halves."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    cos, sin = torch.cos(angles), torch.sin(angles)
    cos, signed_sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
    return cos.to(dtype)[:, None, None, :], signed_sin.to(dtype)[:, None, None, :]


def _check_causal(mask_type: AttnMaskType) -> None:
    if mask_type != AttnMaskType.causal:
        raise ValueError(f"SDPACoreAttention implements causal attention only (its mask is SDPA's is_causal); got "
                         f"attn_mask_type {getattr(mask_type, 'name', mask_type)}: use megatron's DotProductAttention "
                         f"or TransformerEngine for padding or arbitrary masks")


def _sdpa_has_gqa() -> bool:
    """`enable_gqa` arrived in torch 2.5; setup.cfg allows 2.4."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 5)


_SDPA_GQA = _sdpa_has_gqa()


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, scale: float) -> torch.Tensor:
    """[b, h, s, d] x [b, g, s, d] x [b, g, s, d] -> [b, h, s, d]; query head i reads kv head i // (h / g)."""
    gqa = q.size(1) != k.size(1)
    if gqa and not _SDPA_GQA:
        # older torch: materialise the repeated heads (h / g times the K/V memory), as megatron's local attention
        k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
        gqa = False
    kwargs = {"enable_gqa": True} if gqa else {}
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# tensor-parallel size 1: the same layers without megatron's communication machinery


def _is_single_rank(layer: torch.nn.Module) -> bool:
    """A megatron linear layer that communicates nothing: TP = 1 and none of sequence parallelism, expert
    communication, fused gradient accumulation (Apex), deferred embedding wgrad or CPU offloading (which all need
    megatron's own autograd function)."""
    cfg = layer.config
    return ((layer.tp_group is None or layer.tp_group.size() == 1) and not layer.sequence_parallel
            and not layer.explicit_expert_comm and not layer.gradient_accumulation_fusion
            and not cfg.defer_embedding_wgrad_compute and not cfg.cpu_offloading)


class _LocalColumnLinear(ColumnParallelLinear):
    """megatron's ColumnParallelLinear (same parameters, init and outputs) computed by one `F.linear` at TP = 1.

    megatron's path runs a Python autograd Function (forward and backward in Python, with its group lookups and
    checks) per linear layer and call: about 40 us of host time per layer per step that does nothing at TP = 1.
    """

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not self.single_rank:
            return super().forward(input_, weight, runtime_gather_output)
        if weight is None:
            weight = self.weight
        elif weight.shape != (self.output_size_per_partition, self.input_size):
            raise RuntimeError(f"supplied weight's shape is {tuple(weight.shape)}, not "
                               f"{(self.output_size_per_partition, self.input_size)} as expected")
        if self.skip_bias_add:
            return F.linear(input_, weight), self.bias
        return F.linear(input_, weight, self.bias), None

    @property
    def single_rank(self) -> bool:
        if not hasattr(self, "_single_rank"):
            self._single_rank = _is_single_rank(self)
        return self._single_rank


class _LocalRowLinear(RowParallelLinear):
    """megatron's RowParallelLinear computed by one `F.linear` at TP = 1 (see `_LocalColumnLinear`)."""

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not self.single_rank:
            return super().forward(input_)
        if self.skip_bias_add:
            return F.linear(input_, self.weight), self.bias
        return F.linear(input_, self.weight, self.bias), None

    single_rank = _LocalColumnLinear.single_rank


class _MupReadout(_LocalColumnLinear):
    """The LM head under muP: logits x `output_mult` = base_hidden / hidden (`apply_mup`), tied or not."""

    output_mult: float = 1.0

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        out, bias = super().forward(input_, weight, runtime_gather_output)
        return out * self.output_mult, (None if bias is None else bias * self.output_mult)


class _LocalGPTModel(GPTModel):
    """GPTModel whose loss at TP = 1 is `F.cross_entropy` over fp32 logits, the maths of megatron's vocab-parallel
    cross entropy (also fp32) without its three all-reduces over a one-rank group and its Python backward."""

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """labels [b, s], logits [s, b, V] -> per-token loss [b, s] (fp32)."""
        if self.pg_collection.tp.size() > 1 or self.config.cross_entropy_loss_fusion:
            return super().compute_language_model_loss(labels, logits)
        s, b, v = logits.shape
        loss = F.cross_entropy(logits.float().view(s * b, v), labels.t().reshape(s * b), reduction="none")
        return loss.view(s, b).t()


# ----------------------------------------------------------------------------------------------------------------
# building


def layer_spec(cfg: ModelConfig) -> ModuleSpec:
    """megatron-core's local GPT layer (`get_gpt_layer_local_spec`) with SDPA core attention (which applies RoPE
    for RoPE models) and the TP = 1 linear layers.

    The norms are torch's LayerNorm/RMSNorm (megatron's WrappedTorchNorm, or Apex's fused LayerNorm where Apex is
    installed); which one follows `TransformerConfig.normalization`, so `transformer_config` must agree with it.
    """
    spec = get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization=_NORMALIZATION[cfg.norm])
    attention = spec.submodules.self_attention.submodules
    rope = cfg.position_embedding is PositionEmbedding.rope
    attention.core_attention = ModuleSpec(module=SDPACoreAttention,
                                          params={"rotary_base": cfg.rope_base} if rope else {})
    attention.linear_qkv, attention.linear_proj = _LocalColumnLinear, _LocalRowLinear
    spec.submodules.mlp.submodules.linear_fc1 = _LocalColumnLinear
    spec.submodules.mlp.submodules.linear_fc2 = _LocalRowLinear
    # megatron 0.16's MLP warns (DeprecationWarning) on every layer unless its spec names the width; same value
    spec.submodules.mlp.params = {**spec.submodules.mlp.params, "ffn_hidden_size": cfg.ffn}
    return spec


def transformer_config(cfg: ModelConfig, params_dtype: torch.dtype, use_cpu_initialization: bool) -> TransformerConfig:
    """The megatron `TransformerConfig` of a ModelConfig.

    Weights are N(0, init_std) and megatron scales the two residual output projections (attention out and MLP
    fc2) by 1/sqrt(2 L) itself (`scaled_init_method_normal`). Every fusion is off: they need Apex,
    TransformerEngine or CUDA kernels, and the masked-softmax one is bypassed by SDPA anyway.
    """
    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"params_dtype must be torch.float32, torch.bfloat16 or torch.float16: got {params_dtype}")
    swiglu = cfg.activation is Activation.swiglu
    return TransformerConfig(
        num_layers=cfg.layers,
        hidden_size=cfg.hidden,
        num_attention_heads=cfg.heads,
        num_query_groups=cfg.kv_heads or cfg.heads,
        kv_channels=cfg.hidden // cfg.heads,
        ffn_hidden_size=cfg.ffn,
        add_bias_linear=cfg.bias,  # also the QKV bias (megatron: add_bias_linear or add_qkv_bias)
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        normalization=_NORMALIZATION[cfg.norm],
        qk_layernorm=cfg.qk_layernorm,
        init_method_std=cfg.init_std,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
        persist_layer_norm=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        cuda_graph_scope=[],  # the default ("full") only draws a deprecation warning on every build
        softmax_scale=mup_softmax_scale(cfg) if cfg.mup is not None else None,
    )


def padded_vocab(vocab_size: int, multiple: int = 64) -> int:
    """The embedding/LM-head rows: vocab_size rounded up to a multiple (tensor-core friendly GEMM shapes).

    The extra rows are never a label, so they only learn to lower their logits; the loss at init is
    log(padded_vocab), not log(vocab_size).
    """
    if vocab_size < 1 or multiple < 1:
        raise ValueError(f"vocab_size and multiple must be >= 1: got {vocab_size}, {multiple}")
    return -(-vocab_size // multiple) * multiple


def build_model(cfg: ModelConfig, vocab_size: int, params_dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> GPTModel:
    """A megatron-core GPTModel (one pipeline stage: embedding, decoder, LM head) on `device` in `params_dtype`.

    Needs torch.distributed + parallel_state initialised and the RNG seeded (module docstring). On CPU the
    weights are drawn on the host from torch's default generator (`use_cpu_initialization`); on CUDA megatron
    draws them on the current device from its RNG tracker. Norms and position tables are created in fp32 by
    torch; the final `.to(dtype)` casts them too, as megatron's Float16Module and DeepSpeed's bf16 mode do.
    RoPE is the core attention's (`layer_spec`), so megatron's GPTModel is built without position embedding then.
    """
    device = torch.device(device)
    on_cpu = device.type == "cpu"
    model = _LocalGPTModel(
        config=transformer_config(cfg, params_dtype, use_cpu_initialization=on_cpu),
        transformer_layer_spec=layer_spec(cfg),
        vocab_size=padded_vocab(vocab_size),
        max_sequence_length=cfg.seq_len,
        position_embedding_type="learned_absolute" if cfg.position_embedding is PositionEmbedding.learned else "none",
        share_embeddings_and_output_weights=cfg.tied_embeddings,
        pre_process=True,
        post_process=True,
    )
    # GPTModel builds its output layer itself: same object, same init, only forward changes (a class swap)
    model.output_layer.__class__ = _LocalColumnLinear
    model = model.to(device=device, dtype=params_dtype)
    if cfg.mup is not None:
        apply_mup(model, cfg)
    return model


# ----------------------------------------------------------------------------------------------------------------
# muP


HIDDEN_MATRICES = ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                   "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
"""The decoder's matrix-like weights (both dimensions grow with the width): muP's "hidden weights"."""


def mup_fan_in_mults(cfg: ModelConfig) -> dict[str, float]:
    """Each hidden matrix's fan-in over its fan-in in the base model (hidden = mup.base_hidden, same heads): d/d0
    for QKV, attention out and fc1; ffn/ffn0 for fc2 (exactly d/d0 for gelu's 4 d; SwiGLU rounds its width)."""
    base = dataclasses.replace(cfg, hidden=cfg.mup.base_hidden, mup=None)
    width = cfg.hidden / base.hidden
    return {HIDDEN_MATRICES[0]: width, HIDDEN_MATRICES[1]: width, HIDDEN_MATRICES[2]: width,
            HIDDEN_MATRICES[3]: cfg.ffn / base.ffn}


def mup_softmax_scale(cfg: ModelConfig) -> float:
    """muP's 1/d_head attention (Tensor Programs V: attention logits q.k/d_head instead of q.k/sqrt(d_head)): q.k
    scaled by sqrt(d0_head)/d_head = 1/sqrt(d_head) x sqrt(base_hidden/hidden), so that it is SP's 1/sqrt(d_head)
    at the base width, bit for bit, and 1/d_head up to that constant elsewhere (heads fixed: d_head ~ hidden)."""
    return 1.0 / math.sqrt(cfg.hidden // cfg.heads) * math.sqrt(cfg.mup.base_hidden / cfg.hidden)


@torch.no_grad()
def apply_mup(model: GPTModel, cfg: ModelConfig) -> None:
    """muP for Adam on a built standard-parametrisation model (docs/method.md, "muP"; Yang et al. 2021, Tensor
    Programs V, Table 3, in the multiplier form of the mup package's MuReadout / MuAdam):
    - hidden matrices (HIDDEN_MATRICES): init std x (fan_in/fan_in0)^(-1/2), scaled in place (the same draws);
      Adam LR x fan_in0/fan_in, declared as the parameter's `lr_mult` (cbs/pipeline/optim.py groups by it);
    - embeddings (input, position), norms and biases: init and LR as in SP (vector-like: one dimension finite);
    - the LM head: logits x base_hidden/hidden (`_MupReadout`); its weight keeps init and LR. Tied embeddings:
      the shared matrix keeps the embedding's init and LR, and the logits take the same multiplier (the mup
      package's MuSharedReadout);
    - attention: `mup_softmax_scale` (set in `transformer_config`).
    At hidden = base_hidden every multiplier is 1 and nothing changes."""
    mults = mup_fan_in_mults(cfg)
    for name, p in model.named_parameters():
        suffix = next((s for s in HIDDEN_MATRICES if name.startswith("decoder.layers.") and name.endswith(s)), None)
        if suffix is None:
            continue
        if mults[suffix] != 1.0:
            p.mul_(mults[suffix] ** -0.5)
        p.lr_mult = 1.0 / mults[suffix]
    output_mult = cfg.mup.base_hidden / cfg.hidden
    if output_mult != 1.0:
        model.output_layer.__class__ = _MupReadout
        model.output_layer.output_mult = output_mult


def forward_loss(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross entropy of `tokens` [b, s+1]: (mean over b x s tokens, fp32 scalar; per token [b, s]).

    Inputs are tokens[:, :-1], labels tokens[:, 1:]. `model` is a GPTModel or a wrapper that forwards its
    arguments (a DeepSpeed engine). No attention mask: SDPA's is_causal is the mask. megatron computes the loss
    in fp32 from the logits (vocab-parallel cross entropy), so `per_token` is fp32 whatever the params dtype.
    """
    if tokens.dim() != 2 or tokens.size(1) < 2:
        raise ValueError(f"tokens must be [batch, seq_len + 1] with seq_len >= 1: got shape {tuple(tokens.shape)}")
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    b, s = inputs.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)  # read by learned positions only
    per_token = model(inputs, position_ids, None, labels=labels).float()
    return per_token.mean(), per_token


# ----------------------------------------------------------------------------------------------------------------
# counting


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside wrappers that keep it as `.module` (DeepSpeed engine, DDP, Float16Module)."""
    while not isinstance(model, GPTModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, GPTModel):
        raise TypeError(f"expected a megatron GPTModel (possibly wrapped): got {type(model).__name__}")
    return model


def matmul_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Weights that multiply activations per token, from the config: QKV, attention out, MLP, and the LM head
    (padded vocab x d, tied or not: the head's GEMM runs either way); not the embedding/position lookups."""
    d, heads = cfg.hidden, cfg.heads
    head_dim, kv = d // heads, cfg.kv_heads or heads
    attention = d * (heads + 2 * kv) * head_dim + heads * head_dim * d
    mlp = d * cfg.ffn * (2 if cfg.activation is Activation.swiglu else 1) + cfg.ffn * d
    return cfg.layers * (attention + mlp) + d * padded_vocab(vocab_size)


def param_counts(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of a built model (shared weights counted once).

    total:               every parameter.
    embedding:           input embedding + output layer if untied + learned position table.
    non_embedding:       N = 12 L d^2 from the config: the paper's (and Kaplan's) x axis of the scaling laws.
    non_embedding_exact: total - embedding (adds norms, biases; differs from N with GQA or a non-4d MLP).
    matmul_params:       every 2-D weight incl. the LM head, excl. the input-embedding and position lookups:
                         the P of MFU's 6 P + 12 L d T (equals `matmul_params(cfg, vocab)`).
    """
    m = _unwrap(model)
    params = {id(p): p for p in m.parameters()}
    word = m.embedding.word_embeddings.weight
    positions = getattr(m.embedding, "position_embeddings", None)
    lookups = {id(word)} | ({id(positions.weight)} if positions is not None else set())
    head = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else m.output_layer.weight

    total = sum(p.numel() for p in params.values())
    embedding = sum(params[i].numel() for i in lookups) + (0 if id(head) in lookups else head.numel())
    matmul = sum(p.numel() for i, p in params.items() if p.dim() == 2 and i not in lookups)
    if id(head) in lookups:  # tied: the head's GEMM uses the embedding table
        matmul += head.numel()
    return {"total": total, "embedding": embedding, "non_embedding": cfg.non_embedding_params,
            "non_embedding_exact": total - embedding, "matmul_params": matmul}


def flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    """Training FLOPs per token (forward + backward) of the MFU in docs/method.md: 6 P + 12 L d T.

    P = `matmul_params` (LM head included, padded vocab): 2 FLOPs per weight forward, 4 backward. 12 L d T is
    attention's QK^T and AV (2 x 2 T d forward per layer and token, times 3), counted over the full T x T
    square as in PaLM, although causal SDPA skips half of it. MFU = tokens/s x this / peak FLOP/s.
    """
    return float(6 * matmul_params(cfg, vocab_size) + 12 * cfg.layers * cfg.hidden * cfg.seq_len)


# ----------------------------------------------------------------------------------------------------------------
# seeding


def seed_model_parallel(seed: int) -> None:
    """Seed every generator model building and dropout draw from, on CPU and on CUDA.

    Python, NumPy and torch's default generator (CPU initialisation draws from it). Where CUDA is available,
    also megatron's RNG tracker (`model_parallel_cuda_manual_seed`: data-parallel, tensor-parallel and expert
    streams), which GPU initialisation forks; that needs parallel_state initialised first. On CPU the tracker is
    left empty: megatron's tracker only stores CUDA generator states, and nothing our CPU model runs forks it
    (only GPU init, sequence parallelism, and attention dropout at TP > 1 do).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("seed_model_parallel on a CUDA machine needs megatron's parallel_state initialised "
                               "first (initialize_model_parallel): the RNG tracker seeds by tensor-parallel rank")
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
