"""Study variants: the paper's ablations as recipes swept side by side.

`study.variants: {name: keys}` names recipes; `study.axes: {axis: {value: keys}}` names their product instead
(`{schedule: {ewa: ..., plain: ...}, ctx: {s64: ..., s128: ...}}` -> `ewa-s64`, `ewa-s128`, `plain-s64`, ...,
the keys of later axes merged over earlier ones). Every variant is swept over the same settings, batch sizes,
learning rates and seeds; its runs carry its name, and `cbs fit` fits S(B) per (setting, variant).

A variant's keys are:
- pretrain keys, merged over `study.base` (schedule, optimizer.beta1, eval, ...), except the keys the study sets
  for each run (config.STUDY_SETS: batch, lr, beta2, EWA decays, ...), refused as in `base`;
- `model`: fields over each setting's model (`model: {seq_len: 64}`: context length as an axis; batches stay in
  sequences, so a step of batch B trains B x seq_len tokens);
- `hparams`: the variant's lr / beta2 / ewa_taus / beta rules, merged over `study.hparams` key by key (`ewa_taus: []` trains
  without EWA weights; the fit then reads the raw weights' crossings).

Targets are SHARED: the reference runs (at B0) of `study.reference_variant` (default: the first variant) set each
setting's target loss, and every variant's runs train until they reach that same loss, so that their steps to
target are comparable. Pure planning: nothing here trains or imports torch.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from cbs.pipeline.config import (STUDY_SETS, ConfigError, HparamGrid, ModelConfig, PretrainConfig, StudyConfig,
                                 StudyMethod, from_dict, to_dict)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
"""A variant (or axis value) name: it ends run directory names, so letters, digits, '_', '.', '+', '-'."""
OWN_KEYS = ("model", "hparams")
"""Keys of a variant that are not merged over study.base: the setting's model fields and the hparams grid."""
PLACEHOLDER = {"data_dir": "-", "run_dir": "-", "train_tokens": 10 ** 18, "global_batch_seqs": 1}
"""The keys the study sets for every run, filled in to validate a variant's own keys alone."""


@dataclass(frozen=True)
class Variant:
    """One recipe of a study: what it changes over study.base, a setting's model and study.hparams."""

    name: str
    base: dict
    """Pretrain keys merged over study.base."""
    model: dict
    """Model fields over each setting's model (empty: the setting's)."""
    hparams: HparamGrid
    """The lr / beta2 / ewa_taus grid of this variant's runs."""
    study_variants: tuple[str, ...] = ()
    """Every variant of the study, in its order (recorded in each run's config for `cbs fit`)."""
    reference: str = ""
    """The study's reference variant: its runs at B0 set the targets all variants share."""

    def metadata(self) -> dict:
        """What a run of this variant records under `study` in its config: how `cbs fit` knows its variant, the
        study's variants in order and the reference one."""
        return {"variant": self.name, "variants": list(self.study_variants), "reference_variant": self.reference}

    def model_of(self, model: ModelConfig) -> ModelConfig:
        """A setting's model with this variant's model fields over it."""
        if not self.model:
            return model
        return from_dict(ModelConfig, ModelConfig.expand({**to_dict(model), **self.model}, self.key("model")),
                         self.key("model"))

    def merged_base(self, base: dict) -> dict:
        """study.base with this variant's pretrain keys merged over it."""
        return merge(base, self.base)

    def key(self, dotted: str = "") -> str:
        return f"study.variants.{self.name}" + (f".{dotted}" if dotted else "")


def has_variants(cfg: StudyConfig) -> bool:
    return bool(cfg.variants or cfg.axes)


def expand_variants(cfg: StudyConfig) -> list[Variant]:
    """The study's variants, in the order written (axes: their product, the first axis varying slowest); [] for a
    study without variants. ConfigError naming the key for anything a variant may not set."""
    if cfg.variants is not None and cfg.axes is not None:
        raise ConfigError("study: give variants or axes, not both (axes name the product of their values)")
    if cfg.variants is None and cfg.axes is None:
        if cfg.reference_variant is not None:
            raise ConfigError("study.reference_variant needs study.variants or study.axes: remove it")
        return []
    if cfg.method is not StudyMethod.sweep:
        raise ConfigError(f"study.variants: method {cfg.method.value} is not supported with variants (a "
                          f"{cfg.method.value} study compares its own runs, not recipes swept over batch sizes); "
                          f"use method: sweep, or run one {cfg.method.value} study per recipe")
    raw = _variant_mapping(cfg.variants) if cfg.variants is not None else _axes_product(cfg, cfg.axes)
    variants = [_variant(cfg, name, keys) for name, keys in raw.items()]
    names = [v.name for v in variants]
    if cfg.reference_variant is not None and cfg.reference_variant not in names:
        raise ConfigError(f"study.reference_variant {cfg.reference_variant!r} is not a variant: give one of "
                          f"{', '.join(names)}")
    reference = cfg.reference_variant or names[0]
    return [dataclasses.replace(v, study_variants=tuple(names), reference=reference) for v in variants]


def _variant_mapping(raw: Any) -> dict[str, dict]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("study.variants must map variant names to pretrain keys, e.g. {ewa: {}, no_ewa: {hparams: "
                          "{ewa_taus: []}}}")
    for name, keys in raw.items():
        _check_name(name, f"study.variants.{name}")
        if keys is not None and not isinstance(keys, dict):
            raise ConfigError(f"study.variants.{name} must be a mapping of pretrain keys ({{}} for the base as is): "
                              f"got {keys!r}")
    return {str(k): dict(v or {}) for k, v in raw.items()}


def _axes_product(cfg: StudyConfig, raw: Any) -> dict[str, dict]:
    """{axis: {value: keys}} -> {"v1-v2": keys merged in axis order}: every combination of one value per axis."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("study.axes must map axis names to {value name: pretrain keys}, e.g. {schedule: {ewa: {}, "
                          "plain: {hparams: {ewa_taus: []}}}, ctx: {s64: {model: {seq_len: 64}}, s128: {}}}")
    levels = []
    for axis, values in raw.items():
        if not isinstance(values, dict) or not values:
            raise ConfigError(f"study.axes.{axis} must map value names to pretrain keys: got {values!r}")
        for name, keys in values.items():
            _check_name(name, f"study.axes.{axis}.{name}")
            if keys is not None and not isinstance(keys, dict):
                raise ConfigError(f"study.axes.{axis}.{name} must be a mapping of pretrain keys: got {keys!r}")
            _variant(cfg, str(name), dict(keys or {}), f"study.axes.{axis}.{name}")  # errors name where it is written
        levels.append([(str(k), dict(v or {})) for k, v in values.items()])
    out: dict[str, dict] = {}
    for combo in itertools.product(*levels):
        merged: dict = {}
        for _, keys in combo:
            merged = merge(merged, keys)
        out["-".join(name for name, _ in combo)] = merged
    return out


def _check_name(name: Any, key: str) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"{key}: the name {name!r} goes into run names: use letters, digits, '_', '.', '+' "
                          f"and '-'")


def merge(base: dict, over: dict) -> dict:
    """`over` merged into `base`, mapping by mapping (a scalar or list in `over` replaces the whole value)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _variant(cfg: StudyConfig, name: str, keys: dict, where: str = "") -> Variant:
    """Check one variant's keys and build it: STUDY_SETS refused, the model fields and the pretrain keys
    validated alone (over the defaults) so that an error names the variant's key (`where`)."""
    where = where or f"study.variants.{name}"
    base = {k: v for k, v in keys.items() if k not in OWN_KEYS}
    for dotted, source in STUDY_SETS.items():
        if dotted == "model" or dotted.split(".")[0] in OWN_KEYS:
            continue
        node: Any = base
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            hint = {"optimizer.lr": "hparams.lr", "optimizer.beta2": "hparams.beta2",
                    "ewa.taus": "hparams.ewa_taus ([] for no EWA)"}.get(dotted)
            raise ConfigError(f"{where}.{dotted} is set by the study for each run ({source}): remove it from the "
                              f"variant" + (f", or give the variant its own {hint}" if hint else ""))
    model = keys.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"{where}.model must be a mapping of model fields over each setting's model (e.g. "
                          f"{{seq_len: 64}}): got {model!r}")
    if "preset" in model:
        raise ConfigError(f"{where}.model.preset: a variant changes fields of each setting's model (e.g. seq_len), "
                          f"not the model itself; give the models in study.settings")
    alone = {**PLACEHOLDER, **json.loads(json.dumps(base)), "model": {**to_dict(ModelConfig()), **model}}
    from_dict(PretrainConfig, alone, where)
    grid = _grid(cfg, merge(cfg.base, base), _hparams_dict(keys.get("hparams") or {}, where), where)
    _check_beta1(merge(cfg.base, base), grid, "optimizer" in base and "beta1" in (base["optimizer"] or {}), where)
    return Variant(name, base, dict(model), grid)


def _grid(cfg: StudyConfig, merged_base: dict, own: dict, where: str) -> HparamGrid:
    """The variant's hparams: its own keys merged over study.hparams, mapping by mapping (`half_life` key by key).
    A beta2 rule of its own drops the study's beta2 values (they belong to the fixed rule), and a schedule-free
    variant keeps no EWA unless it gives its own ewa_taus (its evaluated weights x already are an average)."""
    data = merge(to_dict(cfg.hparams), own)
    if own.get("beta2_rule") not in (None, "fixed") and "beta2" not in own:
        data["beta2"] = None
    if (merged_base.get("optimizer") or {}).get("kind") == "schedule_free" and "ewa_taus" not in own:
        data["ewa_taus"] = []
    return from_dict(HparamGrid, data, f"{where}.hparams")


def _check_beta1(merged_base: dict, grid: HparamGrid, own_beta1: bool, where: str) -> None:
    """A beta1 given in the variant's pretrain keys (or inherited from base) with a per-batch beta1 rule: the rule
    would silently replace it, so the two recipes would train the same beta1."""
    beta1 = (merged_base.get("optimizer") or {}).get("beta1")
    if beta1 is not None and grid.beta1_rule.value != "fixed":
        key = f"{where}.optimizer.beta1" if own_beta1 else "study.base.optimizer.beta1"
        raise ConfigError(f"{key} is {beta1} but {where}.hparams.beta1_rule is {grid.beta1_rule.value}, which sets "
                          f"beta1 per batch and would replace it: remove the beta1, or set the variant's "
                          f"hparams.beta1_rule: fixed")


def _hparams_dict(raw: Any, where: str) -> dict:
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{where}.hparams must be a mapping (lr, beta2, ewa_taus): got {raw!r}")
    return raw
