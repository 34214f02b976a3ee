"""Width- and depth-scaled model families (model.scale): equal non-embedding size for the pairs they produce, the
exact count against a built model, the config key, and a study's settings of both shapes."""

from __future__ import annotations

import pytest

from cbs.pipeline import model as M  # first: it imports megatron-core without its TE/Apex warnings
from cbs.pipeline.config import MODEL_PRESETS, ConfigError, ModelConfig, from_dict  # noqa: E402
from cbs.pipeline.model_shapes import equal_size_pair, non_embedding_exact, scaled  # noqa: E402
from cbs.pipeline.study_plan import expand_settings  # noqa: E402
from test_model import megatron_process  # noqa: E402,F401  (the process group build_model needs)

VOCAB = 500


def model(fields: dict) -> ModelConfig:
    return from_dict(ModelConfig, ModelConfig.expand(fields, "model"), "model")


@pytest.mark.parametrize("name", ["tiny", "cpu-small", "85M", "151M", "gpt2-small"])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_width_and_depth_pairs_have_equal_non_embedding_size(name, k, activation):
    """12 L d^2 is equal exactly; the exact count (norms, biases, SwiGLU's rounded width) within 3%, except SwiGLU
    at d = 128, whose MLP width 8/3 d rounds up to 384 = 3 d (d 256: 2.75 d, 384: 2.67 d): 6% and 8.5% apart."""
    wide, deep = (model(f) for f in equal_size_pair({**MODEL_PRESETS[name], "activation": activation}, k))
    base = model({"preset": name, "activation": activation})
    assert (wide.hidden, wide.layers) == (k * base.hidden, base.layers)
    assert (deep.hidden, deep.layers) == (base.hidden, k * k * base.layers)
    assert wide.non_embedding_params == deep.non_embedding_params == k * k * base.non_embedding_params
    exact = non_embedding_exact(wide), non_embedding_exact(deep)
    tolerance = 0.09 if activation == "swiglu" and base.hidden < 256 else 0.03
    assert abs(exact[0] - exact[1]) / min(exact) < tolerance, exact


@pytest.mark.parametrize("fields", [
    {"preset": "tiny"}, {"preset": "tiny", "bias": True, "position_embedding": "learned", "tied_embeddings": True},
    {"preset": "tiny", "activation": "swiglu", "norm": "rmsnorm", "kv_heads": 2},
    {"preset": "tiny", "qk_layernorm": False, "scale": {"width": 1.5}},
])
def test_exact_count_equals_the_built_model(fields):
    cfg = model(fields)
    M.seed_model_parallel(0)
    assert non_embedding_exact(cfg) == M.param_counts(M.build_model(cfg, VOCAB), cfg)["non_embedding_exact"]


def test_scale_key_in_a_model_mapping():
    assert (model({"preset": "tiny", "scale": {"width": 2}}).hidden, model({"preset": "tiny"}).hidden) == (256, 128)
    assert model({"preset": "tiny", "scale": {"depth": 4}}).layers == 8
    assert model({"layers": 3, "hidden": 64, "heads": 4, "scale": {"width": 2, "depth": 2}}).layers == 6
    assert scaled(MODEL_PRESETS["tiny"], width=2) == {**MODEL_PRESETS["tiny"], "hidden": 256}


@pytest.mark.parametrize("fields,message", [
    ({"scale": 2}, "model.scale must be a mapping"),
    ({"scale": {}}, "model.scale must be a mapping"),
    ({"scale": {"wide": 2}}, "model.scale.wide is not a known key (width, depth)"),
    ({"scale": {"width": 0}}, "model.scale.width must be a factor > 0"),
    ({"scale": {"depth": "two"}}, "model.scale.depth must be a factor > 0"),
    ({"scale": {"width": True}}, "model.scale.width must be a factor > 0"),
    ({"scale": {"width": 1.3}}, "model.scale.width: hidden 128 x 1.3 = 166.4 is not a whole number"),
    ({"heads": 32, "scale": {"width": 1.125}}, "model.hidden (144) must be divisible by model.heads (32)"),
])
def test_bad_scale_names_the_key(fields, message):
    with pytest.raises(ConfigError) as e:
        model({"preset": "tiny", **fields})
    assert message in str(e.value)


def test_study_settings_of_both_shapes_share_n_and_differ_in_label():
    settings = expand_settings({"generator": "fixed_data", "tokens": "1M", "models": [
        {"preset": "tiny", "scale": {"width": 2}}, {"preset": "tiny", "scale": {"depth": 4}}]})
    assert [s.model_label for s in settings] == ["L2d256", "L8d128"]
    assert settings[0].model_params == settings[1].model_params
