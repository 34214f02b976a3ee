"""Config loading: types, unknown keys, required keys, overrides, and every shipped YAML validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbs.pipeline.config import (ConfigError, PreprocessConfig, TokenizerType, apply_overrides, load_config, read_yaml)

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_types_defaults_and_overrides(tmp_path):
    path = write(tmp_path, "inputs: stdlib\noutput_dir: out\ntokenizer: {vocab_size: 1e3, type: unigram}\n")
    cfg = load_config(PreprocessConfig, path, ["val_fraction=0.05", "tokenizer.split_digits=false", "workers=3"])
    assert cfg.inputs == ["stdlib"]  # a single item where a list is expected
    assert cfg.tokenizer.vocab_size == 1000 and isinstance(cfg.tokenizer.vocab_size, int)
    assert cfg.tokenizer.type is TokenizerType.unigram and cfg.tokenizer.split_digits is False
    assert cfg.val_fraction == 0.05 and cfg.workers == 3 and cfg.text_field == "text"


@pytest.mark.parametrize("text, overrides, message", [
    ("inputs: [stdlib]\noutput_dir: o\nval_fraction: 0.7\n", [], r"preprocess\.val_fraction must be in \(0, 0\.5\): got 0\.7"),
    ("inputs: [stdlib]\noutput_dir: o\nval_fractoin: 0.1\n", [], r"preprocess\.val_fractoin is not a known key; did you mean preprocess\.val_fraction\?"),
    ("inputs: [stdlib]\n", [], r"preprocess\.output_dir is required"),
    ("inputs: [stdlib]\noutput_dir: o\n", ["tokenizer.vocab_size=lots"], r"preprocess\.tokenizer\.vocab_size must be an integer: got 'lots'"),
    ("inputs: [stdlib]\noutput_dir: o\n", ["tokenizer.type=wordpiece"], r"preprocess\.tokenizer\.type must be one of 'bpe', 'unigram': got 'wordpiece'"),
    ("inputs: [stdlib]\noutput_dir: o\n", ["on_error=ignore"], r"preprocess\.on_error must be one of 'fail', 'skip'"),
    ("inputs: [stdlib]\noutput_dir: o\n", ["workers=0"], r"preprocess\.workers must be >= 1: got 0"),
    ("inputs: [stdlib]\noutput_dir: o\n", ["tokenizer=3"], r"preprocess\.tokenizer must be a mapping"),
    ("inputs: []\noutput_dir: o\n", [], r"preprocess\.inputs must list at least one source"),
    ("- a\n- b\n", [], r"must hold a mapping"),
    ("inputs: [stdlib]\noutput_dir: o\n", ["nonsense"], r"override 'nonsense' must look like key\.subkey=value"),
])
def test_errors_name_the_key_and_the_fix(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PreprocessConfig, write(tmp_path, text), overrides)


def test_overrides_create_nested_keys_and_parse_yaml():
    data = apply_overrides({"a": 1}, ["b.c.d=[1, 2]", "a=null", "e=3e-3"])
    assert data == {"a": None, "b": {"c": {"d": [1, 2]}}, "e": "3e-3"}  # the float is coerced by its field


def test_every_shipped_preprocess_config_validates():
    shipped = sorted((ROOT / "configs").glob("preprocess*.yaml"))
    assert shipped, "configs/ ships at least one preprocess example"
    for path in shipped:
        cfg = load_config(PreprocessConfig, path)
        assert cfg.inputs


def test_every_shipped_pretrain_config_and_ds_config_is_accepted_by_deepspeed():
    """DeepSpeed's own parser (pydantic: an unknown or mistyped key fails) reads the config we build from every
    shipped pretrain YAML with every shipped ZeRO file, and derives the batch arithmetic and stage we meant."""
    import json

    from deepspeed.runtime.config import DeepSpeedConfig

    from cbs.pipeline.config import PretrainConfig
    from cbs.pipeline.distributed import deepspeed_config

    shipped = sorted((ROOT / "configs").glob("pretrain*.yaml"))
    zero_files = sorted((ROOT / "ds_configs").glob("*.json"))
    assert shipped and zero_files
    for path in shipped:
        cfg = load_config(PretrainConfig, path)
        for zero in zero_files:
            stage = json.loads(zero.read_text())["zero_optimization"]["stage"]
            assert zero.name == f"zero{stage}.json"
            cfg.deepspeed_config = zero.name
            for cuda in (True, False):
                parsed = DeepSpeedConfig(deepspeed_config(cfg, world_size=1, cuda=cuda))
                assert parsed.train_batch_size == cfg.global_batch_seqs, (path, zero)
                assert parsed.train_micro_batch_size_per_gpu * parsed.gradient_accumulation_steps == \
                    cfg.global_batch_seqs
                assert parsed.zero_optimization_stage == stage
                assert parsed.bfloat16_config.enabled is cuda  # bf16 on GPU, fp32 on CPU


def test_a_preset_shorthand_can_be_refined_by_overrides(tmp_path):
    from cbs.pipeline.config import MODEL_PRESETS, PretrainConfig

    path = write(tmp_path, "data_dir: d\nrun_dir: r\nglobal_batch_seqs: 8\ntrain_tokens: 1000000\nmodel: tiny\n")
    cfg = load_config(PretrainConfig, path, ["model.seq_len=64"])
    assert cfg.model.preset == "tiny" and cfg.model.seq_len == 64
    assert cfg.model.hidden == MODEL_PRESETS["tiny"]["hidden"] and cfg.model.layers == MODEL_PRESETS["tiny"]["layers"]
    other = load_config(PretrainConfig, path, ["model.preset=85M"])  # the new preset, not tiny's fields
    assert (other.model.layers, other.model.hidden) == (12, 768)
    with pytest.raises(ConfigError, match=r"pretrain\.model\.preset must be one of .*: got 'huge'"):
        load_config(PretrainConfig, write(tmp_path, path.read_text().replace("tiny", "huge")), ["model.seq_len=64"])


def test_yaml_problems_name_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml:4:1: not valid YAML \(while parsing a flow mapping that starts "
                                         r"at line 3: expected ',' or '}', but got '<stream end>'\): fix the YAML "
                                         r"there"):
        load_config(PreprocessConfig, write(tmp_path, "inputs: [stdlib]\noutput_dir: o\ntokenizer: {vocab_size: 4\n"))
    with pytest.raises(ConfigError, match=r"c\.yaml:5: vocab_size is given twice in one mapping: keep one"):
        load_config(PreprocessConfig, write(tmp_path, "inputs: [stdlib]\noutput_dir: o\ntokenizer:\n"
                                                      "  vocab_size: 400\n  vocab_size: 500\n"))
    anchors = write(tmp_path, "inputs: [stdlib]\noutput_dir: o\nbase: &b {vocab_size: 400, type: unigram}\n"
                              "tokenizer:\n  <<: *b\n  vocab_size: 500\n")  # a merge key may be overridden
    with pytest.raises(ConfigError, match=r"preprocess\.base is not a known key"):  # the anchor parsed fine
        load_config(PreprocessConfig, anchors)
    assert read_yaml(anchors)["tokenizer"] == {"vocab_size": 500, "type": "unigram"}


STUDY = "data: data\nbatch_sizes: [4, 8]\n"


@pytest.mark.parametrize("text, message", [
    ("settings: [{model: tiny, train_tokens: 1M, name: [1]}]\n", r"study\.settings\[0\]\.name must be a string"),
    ("settings: [{model: tiny, train_tokens: 1M, target: abc}]\n", r"study\.settings\[0\]\.target must be a number"),
    ("settings: [{model: tiny, train_tokens: 1M, target: -1}]\n", r"study\.settings\[0\]\.target must be a loss > 0"),
    ("settings: [{model: tiny, train_tokens: 1M, oops: 1}]\n", r"study\.settings\[0\]\.oops is not a known key"),
    ("settings: [{model: tiny, train_tokens: 1.5}]\n", r"study\.settings\[0\]\.train_tokens must be a whole number"),
    ("settings: [{model: {preset: tiny, layers: x}, train_tokens: 1M}]\n",
     r"study\.settings\[0\]\.model\.layers must be an integer: got 'x'"),
    ("settings: {generator: fixed_model, model: tiny}\n", r"study\.settings\.tokens is required by the fixed_model"),
    ("settings: {generator: fixed_data, models: [tiny], tokens: [1M, 2M]}\n",
     r"study\.settings\.tokens: the fixed_data generator trains every model on one budget"),
    ("settings: {generator: chinchilla, models: [tiny], tokens_per_param: yes}\n",
     r"study\.settings\.tokens_per_param must be a number"),
    ("settings: {generator: chinchilla, models: [huge]}\n", r"study\.settings\.models\[0\]\.preset must be one of"),
    ("settings: tiny\n", r"study\.settings must be a list of settings or a mapping with a generator"),
    ("settings: [{model: tiny, train_tokens: 1M}]\nslurm: {nodes: 0}\n",
     r"study\.slurm\.nodes must be an integer >= 1"),
    ("settings: [{model: tiny, train_tokens: 1M}]\nslurm: {extra: qos}\n", r"study\.slurm\.extra must be a list of"),
    ("settings: [{model: tiny, train_tokens: 1M}]\nbase: {optimizer: {lrr: 1}}\n",
     r"study\.base\.optimizer\.lrr is not a known key; did you mean study\.base\.optimizer\.lr\?"),
    ("settings: [{model: tiny, train_tokens: 1M}]\nbase: {micro_batch_seqs: 0}\n",
     r"study\.base\.micro_batch_seqs must be >= 1"),
])
def test_study_settings_slurm_and_base_are_checked_at_load_naming_the_key(tmp_path, text, message):
    """The study schema is typed (config/study.py): a bad setting, Slurm resource or base key is refused when the
    file is read, named where it was written."""
    from cbs.pipeline.config import StudyConfig

    with pytest.raises(ConfigError, match=message):
        load_config(StudyConfig, write(tmp_path, STUDY + text))


def test_typed_study_sections_round_trip(tmp_path):
    """What study.yaml holds (to_dict of the typed config) reads back as the same config."""
    from cbs.pipeline.config import StudyConfig, from_dict, to_dict

    text = (STUDY + "settings: {generator: fixed_model, model: tiny, tokens: [300K, 1M]}\n"
            "slurm: {partition: gpu, nodes: 2, gpus_per_node: 4, extra: ['--qos=high']}\n")
    cfg = load_config(StudyConfig, write(tmp_path, text), ["slurm.time=01:00:00"])
    assert cfg.settings.tokens == [300_000, 1_000_000] and cfg.slurm.processes == 8
    assert cfg.slurm.fields({"nodes": 1})["nodes"] == 1 and cfg.slurm.time == "01:00:00"
    assert from_dict(StudyConfig, to_dict(cfg), "study") == cfg
