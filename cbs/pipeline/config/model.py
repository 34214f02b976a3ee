"""`model` config: the GPT's shape, and the paper's (and CPU-scale) presets."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional

from cbs.pipeline.config.loader import ConfigError, _check


class PositionEmbedding(str, enum.Enum):
    rope = "rope"
    learned = "learned"


class Activation(str, enum.Enum):
    gelu = "gelu"
    swiglu = "swiglu"


class Norm(str, enum.Enum):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


# The paper's GPT sizes (non-embedding params N = 12 L d^2; docs/method.md) and small ones for CPU runs and tests.
# Paper recipe: RoPE, QK-layernorm, GELU MLP 4d, no biases, untied embeddings, context 512.
_PAPER = dict(seq_len=512, position_embedding="rope", qk_layernorm=True, activation="gelu", norm="layernorm",
              bias=False, tied_embeddings=False)
MODEL_PRESETS: dict[str, dict] = {
    "85M": dict(layers=12, hidden=768, heads=12, **_PAPER),
    "151M": dict(layers=12, hidden=1024, heads=16, **_PAPER),
    "302M": dict(layers=24, hidden=1024, heads=16, **_PAPER),
    "604M": dict(layers=12, hidden=2048, heads=16, **_PAPER),
    "1.2B": dict(layers=24, hidden=2048, heads=32, **_PAPER),
    # GPT-2 small shape, the throughput anchor of docs/method.md
    "gpt2-small": dict(layers=12, hidden=768, heads=12, seq_len=1024, position_embedding="learned",
                       qk_layernorm=False, activation="gelu", norm="layernorm", bias=True, tied_embeddings=True),
    # CPU scale: the probe model of docs/method.md (2 layers, d 128, seq 128) and a 4-layer one
    "tiny": dict(layers=2, hidden=128, heads=4, **{**_PAPER, "seq_len": 128}),
    "cpu-small": dict(layers=4, hidden=256, heads=4, **{**_PAPER, "seq_len": 256}),
}


@dataclass
class MupConfig:
    """muP (Yang et al. 2021, "Tensor Programs V", arXiv 2203.03466): hyper-parameters tuned at width base_hidden
    transfer to other widths (docs/method.md, "muP"). In YAML `mup: 128` is short for `mup: {base_hidden: 128}`."""

    base_hidden: int
    """The width H0 the learning rate and init were tuned at; at hidden = base_hidden the model is the standard
    parametrisation bit for bit. It must split into the model's heads (the base model has the same heads)."""

    @classmethod
    def expand(cls, data: Any, key: str) -> Any:
        return {"base_hidden": data} if isinstance(data, (int, str)) and not isinstance(data, bool) else data

    def validate(self, p: str) -> None:
        _check(self.base_hidden >= 1, f"{p}.base_hidden must be a width >= 1: got {self.base_hidden}")


@dataclass
class ModelConfig:
    """A GPT built from megatron-core layers. `preset` fills every field not given explicitly; `scale` (consumed
    on load) multiplies the width or depth: `{preset: tiny, scale: {width: 2}}` or `{depth: 4}` (same N = 12 L d^2;
    cbs/pipeline/model_shapes.py)."""

    preset: Optional[str] = None
    """One of MODEL_PRESETS (85M 151M 302M 604M 1.2B gpt2-small tiny cpu-small); explicit fields override it.
    In YAML `model: 85M` is short for `model: {preset: 85M}`."""
    layers: int = 2
    """Transformer layers L."""
    hidden: int = 128
    """Model width d."""
    heads: int = 4
    """Attention heads; hidden must divide by it."""
    kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention; default: heads (plain multi-head attention)."""
    ffn_hidden: Optional[int] = None
    """MLP width; default 4 d for gelu, and 8/3 d rounded up to a multiple of 64 for swiglu (same parameters)."""
    seq_len: int = 128
    """Context length T in tokens: every training sequence has exactly this many."""
    position_embedding: PositionEmbedding = PositionEmbedding.rope
    """rope | learned."""
    rope_base: float = 10000.0
    """RoPE base frequency."""
    qk_layernorm: bool = True
    """Normalise queries and keys per head before attention (stabilises large learning rates)."""
    activation: Activation = Activation.gelu
    """gelu | swiglu."""
    norm: Norm = Norm.layernorm
    """layernorm | rmsnorm."""
    bias: bool = False
    """Biases in linear layers."""
    tied_embeddings: bool = False
    """Share the input embedding with the output layer."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init (output projections scaled by 1/sqrt(2L), as Megatron)."""
    mup: Optional[MupConfig] = None
    """muP instead of the standard parametrisation: {base_hidden: H0} (docs/method.md, "muP"); off by default."""

    @classmethod
    def expand(cls, data: Any, key: str) -> Any:
        """`model: NAME` or `model: {preset: NAME, ...}` -> the preset's fields, overridden by those given."""
        if isinstance(data, str):
            data = {"preset": data}
        if not isinstance(data, dict):
            raise ConfigError(f"{key} must be a preset name ({', '.join(MODEL_PRESETS)}) or a mapping of model "
                              f"fields: got {data!r}")
        if data.get("preset") is not None:
            name = str(data["preset"])
            if name not in MODEL_PRESETS:
                raise ConfigError(f"{key}.preset must be one of {', '.join(MODEL_PRESETS)}: got {name!r}")
            data = {**MODEL_PRESETS[name], **data}
        if "scale" in data:
            from cbs.pipeline.model_shapes import apply_scale

            data = apply_scale(data, f"{key}.scale")
        return data

    def validate(self, p: str) -> None:
        for name in ("layers", "hidden", "heads", "seq_len"):
            _check(getattr(self, name) >= 1, f"{p}.{name} must be >= 1: got {getattr(self, name)}")
        _check(self.hidden % self.heads == 0,
               f"{p}.hidden ({self.hidden}) must be divisible by {p}.heads ({self.heads})")
        kv = self.kv_heads or self.heads
        _check(kv >= 1 and self.heads % kv == 0, f"{p}.kv_heads ({kv}) must divide {p}.heads ({self.heads})")
        _check(self.ffn_hidden is None or self.ffn_hidden >= 1, f"{p}.ffn_hidden must be >= 1: got {self.ffn_hidden}")
        _check(self.init_std > 0, f"{p}.init_std must be > 0: got {self.init_std}")
        if self.position_embedding is PositionEmbedding.rope:
            _check((self.hidden // self.heads) % 2 == 0,
                   f"{p}: rope needs an even head size (hidden/heads = {self.hidden // self.heads})")
        if self.mup is not None:
            _check(self.mup.base_hidden % self.heads == 0,
                   f"{p}.mup.base_hidden ({self.mup.base_hidden}) must be divisible by {p}.heads ({self.heads}): "
                   f"muP's multipliers are ratios to a base model of the same heads; give a multiple of {self.heads}")
            _check(self.ffn_hidden is None, f"{p}.ffn_hidden is set ({self.ffn_hidden}) with {p}.mup: muP here "
                                            f"scales the MLP with the width; remove ffn_hidden (4 d, or ~8/3 d)")

    @property
    def ffn(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.activation is Activation.swiglu:
            return -(-8 * self.hidden // 3 // 64) * 64
        return 4 * self.hidden

    @property
    def non_embedding_params(self) -> int:
        """N = 12 L d^2: the paper's (and Kaplan's) count of attention + MLP weights, without embeddings."""
        return 12 * self.layers * self.hidden**2
