"""Model families scaled in width or in depth at equal non-embedding size, and exact non-embedding counts.

Why: the CBS of two models of the same N = 12 L d^2 (docs/method.md) may still depend on their shape. Scaling a
model's width d by k multiplies N by k^2; scaling its depth L by k^2 does too, so `{width: k}` and `{depth: k^2}`
of one model are a pair of equal N and different shape (`equal_size_pair`). The exact count (norms, biases,
grouped-query attention, a SwiGLU MLP rounded to a multiple of 64) differs from 12 L d^2 by a few percent at
most for such pairs (tests/test_model_shapes.py).

Torch-free: the config loader applies `scale` (ModelConfig.expand), and a study plans with these counts.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cbs.pipeline.config import ModelConfig

__all__ = ["SCALE_KEYS", "apply_scale", "scaled", "equal_size_pair", "non_embedding_exact"]

SCALE_KEYS = {"width": "hidden", "depth": "layers"}
"""`model.scale` keys and the field each multiplies (heads stay: the head size grows with the width)."""


def _error(message: str) -> Exception:
    from cbs.pipeline.config import ConfigError  # late: config imports this module

    return ConfigError(message)


def apply_scale(data: dict, key: str) -> dict:
    """A model mapping with `scale: {width: k, depth: j}` -> the same mapping with hidden x k and layers x j and
    no `scale` (so a saved config.yaml reloads as the same model). Factors are numbers > 0 whose product with the
    field is a whole number; the result is validated as any model (hidden divisible by heads, ...)."""
    out = {k: v for k, v in data.items() if k != "scale"}
    scale = data["scale"]
    if not isinstance(scale, dict) or not scale:
        raise _error(f"{key} must be a mapping {{width: k}} and/or {{depth: k}}: got {scale!r}")
    for name, factor in scale.items():
        if name not in SCALE_KEYS:
            raise _error(f"{key}.{name} is not a known key (width, depth)")
        field = SCALE_KEYS[name]
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) \
                or factor <= 0:
            raise _error(f"{key}.{name} must be a factor > 0 (e.g. 2): got {factor!r}")
        base = out.get(field, 128 if field == "hidden" else 2)  # ModelConfig's defaults
        if isinstance(base, bool) or not isinstance(base, int):
            raise _error(f"{key}.{name} scales the model's {field}, which is not an integer: {base!r}")
        value = base * factor
        if abs(value - round(value)) > 1e-9 or round(value) < 1:
            raise _error(f"{key}.{name}: {field} {base} x {factor} = {value:g} is not a whole number >= 1; "
                         f"give a factor that makes it one")
        out[field] = int(round(value))
    return out


def scaled(fields: dict, width: float = 1, depth: float = 1) -> dict:
    """Model fields (a preset's, or a mapping) scaled: hidden x width, layers x depth."""
    scale = {k: v for k, v in (("width", width), ("depth", depth)) if v != 1}
    return apply_scale({**fields, "scale": scale}, "scale") if scale else dict(fields)


def equal_size_pair(fields: dict, k: int) -> tuple[dict, dict]:
    """(wider, deeper): the model `fields` with width x k, and with depth x k^2: the same N = 12 L d^2."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer >= 2: got {k!r}")
    return scaled(fields, width=k), scaled(fields, depth=k * k)


def non_embedding_exact(cfg: "ModelConfig") -> int:
    """Every parameter outside the embeddings and the LM head, from the config (what `param_counts` calls
    non_embedding_exact of a built model): per layer QKV (d x (heads + 2 kv) head_dim), attention out, the MLP (fc1
    doubled for SwiGLU), two norms (and QK norms over the head size), linear biases; plus the final norm."""
    d, heads = cfg.hidden, cfg.heads
    head_dim, kv = d // heads, cfg.kv_heads or heads
    norm = 2 if cfg.norm.value == "layernorm" else 1  # weight (+ bias)
    gate = 2 if cfg.activation.value == "swiglu" else 1
    qkv_out, ffn = (heads + 2 * kv) * head_dim, cfg.ffn
    layer = d * qkv_out + heads * head_dim * d + d * ffn * gate + ffn * d + 2 * norm * d
    if cfg.qk_layernorm:
        layer += 2 * norm * head_dim
    if cfg.bias:
        layer += qkv_out + d + ffn * gate + d
    return cfg.layers * layer + norm * d
