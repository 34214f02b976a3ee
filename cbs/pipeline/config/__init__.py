"""Typed configs of every stage, loaded from YAML plus dotted overrides and validated on load.

Each stage has one dataclass tree, in its own module: `preprocess`, `model`, `pretrain` (with `batch_schedule`,
its batch ramp) and `study` (with `paper`, the paper's per-batch tables). `loader` reads YAML, applies `--set a.b=c`
overrides, builds the dataclasses with type checks and calls each section's `validate()`; every problem is a
`ConfigError` naming the full dotted key and how to fix it, e.g. "preprocess.val_fraction must be in (0, 0.5): got
0.7".

Field documentation is the string literal under each field (OLMo style); the README's tables follow them. Every
name is re-exported here: `from cbs.pipeline.config import PretrainConfig, load_config` is the way to import them.
"""

from cbs.batching import steps_for
from cbs.pipeline.config.loader import (ConfigError, TokenCount, _check, _coerce, _expand_shorthands, _type_name,
                                        _UniqueKeyLoader, apply_overrides, from_dict, load_config, parse_tokens,
                                        read_yaml, to_dict)
from cbs.pipeline.config.preprocess import OnError, PreprocessConfig, TokenizerConfig, TokenizerType
from cbs.pipeline.config.model import (_PAPER, MODEL_PRESETS, Activation, ModelConfig, MupConfig, Norm,
                                       PositionEmbedding)
from cbs.pipeline.config.paper import (PAPER_BETA1, PAPER_BETA2, PAPER_TAU, BetaRule, HalfLifeBetas, half_life_beta,
                                      paper_value, rule_beta)
from cbs.pipeline.config.batch_schedule import ADAPTIVE_SIGNALS, BatchScheduleConfig, Beta2Rule, LrScaling
from cbs.pipeline.config.pretrain import (CheckpointConfig, EvalConfig, EwaConfig, InitFrom, LogConfig,
                                          OptimizerConfig, OptimizerKind, Precision, PretrainConfig, Resume,
                                          ScheduleConfig, ScheduleKind, StopWeights, WandbConfig, WandbMode,
                                          gradient_accumulation)
from cbs.pipeline.config.study import (GENERATOR_KEYS, STUDY_SETS, BranchedConfig, BranchRule, HparamGrid,
                                       ReferenceTargets, SettingEntry, SettingsGenerator, SlurmConfig, StudyConfig,
                                       StudyMethod, StudySettings, StudyTargets, check_model)

__all__ = [
    "ConfigError", "TokenCount", "apply_overrides", "from_dict", "load_config", "parse_tokens", "read_yaml", "to_dict",
    "OnError", "PreprocessConfig", "TokenizerConfig", "TokenizerType",
    "MODEL_PRESETS", "Activation", "ModelConfig", "MupConfig", "Norm", "PositionEmbedding",
    "PAPER_BETA1", "PAPER_BETA2", "PAPER_TAU", "BetaRule", "HalfLifeBetas", "half_life_beta", "paper_value", "rule_beta",
    "ADAPTIVE_SIGNALS", "BatchScheduleConfig", "Beta2Rule", "LrScaling",
    "CheckpointConfig", "EvalConfig", "EwaConfig", "InitFrom", "LogConfig", "OptimizerConfig", "OptimizerKind", "Precision",
    "PretrainConfig", "Resume", "ScheduleConfig", "ScheduleKind", "StopWeights", "WandbConfig", "WandbMode",
    "gradient_accumulation", "steps_for",
    "GENERATOR_KEYS", "STUDY_SETS", "BranchedConfig", "BranchRule", "HparamGrid", "ReferenceTargets", "SettingEntry",
    "SettingsGenerator", "SlurmConfig", "StudyConfig", "StudyMethod", "StudySettings", "StudyTargets", "check_model",
]
