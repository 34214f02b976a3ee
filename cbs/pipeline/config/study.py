"""`study` config: settings x batch sizes x hyper-parameters, its methods (sweep, branched, ramp), and the pretrain
keys a study decides for each run."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from cbs.pipeline.config.batch_schedule import BatchScheduleConfig, LrScaling
from cbs.pipeline.config.loader import ConfigError, TokenCount, _check, from_dict, to_dict
from cbs.pipeline.config.model import ModelConfig
from cbs.pipeline.config.paper import BetaRule, HalfLifeBetas
from cbs.pipeline.config.preprocess import PreprocessConfig
from cbs.pipeline.config.pretrain import PretrainConfig
from cbs.pipeline.slurm import SlurmError, SlurmResources


# Pretrain keys a study decides for each run, and where to set them instead; `base` may not hold them.
STUDY_SETS = {
    "data_dir": "from study.data", "run_dir": "STUDY_DIR/runs/<run>", "global_batch_seqs": "from batch_sizes",
    "train_tokens": "from settings and max_tokens_factor", "model": "from settings", "targets": "from targets",
    "study": "written by the study", "seed": "from seeds", "optimizer.lr": "from hparams.lr",
    "optimizer.beta2": "from hparams.beta2 or hparams.beta2_rule", "ewa.taus": "from hparams.ewa_taus",
    "stop_at_targets": "on for every run but the reference ones", "stop_weights": "ewa, the weights the fit reads",
    "batch_schedule": "from study.ramp (method: ramp)",
}


@dataclass
class HparamGrid:
    """Hyper-parameters tried at every batch size; steps-to-target is the minimum over them."""

    lr: list[float] = field(default_factory=lambda: [3.16e-3])
    """Peak learning rates."""
    beta2: Optional[list[float]] = None
    """AdamW beta2 values (the fixed rule); default: the beta2 rule's value per batch."""
    beta2_rule: Optional[BetaRule] = None
    """paper (the paper's per-batch table) | fixed (the hparams.beta2 values) | half_life (half_life's formula);
    default: fixed when hparams.beta2 is given, else paper."""
    beta1_rule: BetaRule = BetaRule.fixed
    """fixed (base.optimizer.beta1, default 0.95) | paper (0.95) | half_life (half_life's formula)."""
    half_life: HalfLifeBetas = field(default_factory=HalfLifeBetas)
    """Constants of the half_life rule: beta(B) = clip(ref ** (B / ref_batch), lo, hi)."""
    ewa_taus: Optional[list[float]] = None
    """EWA decays kept at once in every run (the best is used); default: the paper's per-batch tau. Short CPU
    runs want smaller taus (0.98-0.995) than the paper's long runs (0.99-0.9995)."""

    def validate(self, p: str) -> None:
        _check(bool(self.lr) and all(x > 0 for x in self.lr), f"{p}.lr must list learning rates > 0: {self.lr}")
        _check(self.beta2 is None or all(0 <= b < 1 for b in self.beta2), f"{p}.beta2 must be in [0, 1)")
        _check(self.beta2 is None or self.beta2_rule in (None, BetaRule.fixed),
               f"{p}.beta2 is given but {p}.beta2_rule is {getattr(self.beta2_rule, 'value', '')}: remove "
               f"hparams.beta2, or set beta2_rule: fixed to train the given values")
        _check(self.beta2_rule is not BetaRule.fixed or self.beta2,
               f"{p}.beta2_rule is fixed: give the values in {p}.beta2")
        _check(self.ewa_taus is None or all(0 < t < 1 for t in self.ewa_taus), f"{p}.ewa_taus must be in (0, 1)")


@dataclass
class ReferenceTargets:
    batch: Optional[int] = None
    """B0: the reference batch whose runs go first; a setting's target is their best EWA eval loss after the
    setting's budget of tokens. Default: the smallest of batch_sizes."""


@dataclass
class StudyTargets:
    reference: Optional[ReferenceTargets] = None
    """The paper's method (the default when losses is not given)."""
    losses: Optional[dict] = None
    """Explicit target loss per setting name (every setting needs one); no reference phase."""

    def validate(self, p: str) -> None:
        _check(not (self.reference and self.losses), f"{p}: give either reference or losses, not both")
        for name, loss in (self.losses or {}).items():
            _check(isinstance(loss, (int, float)) and loss > 0, f"{p}.losses.{name} must be a loss > 0: got {loss}")


class StudyMethod(str, enum.Enum):
    sweep = "sweep"
    """The paper's: a full run per batch size, steps-to-target fitted over them (docs/method.md)."""
    branched = "branched"
    """Merrill et al. 2025: short branches at k x B from checkpoints of one base run give CBS(t) along training
    (docs/method.md, "Branched local CBS")."""
    ramp = "ramp"
    """A batch ramp (study.ramp) beside the fixed batches it is compared with, its first and its largest, all to
    the same target: steps, tokens and wall-clock to the target, the saving predicted against the one measured."""


class BranchRule(str, enum.Enum):
    absolute = "absolute"
    """Merrill et al. 2025: the largest batch whose loss is within epsilon_nats (plus an allowance for eval noise)
    of every smaller batch's (docs/method.md, "Branched local CBS")."""
    relative = "relative"
    """A chain: each batch within (1 + tolerance) of the best smaller one, up to the first that is not."""


def check_model(spec: Any, key: str) -> ModelConfig:
    """A setting's model (a preset name or a mapping of model fields) as pretrain reads it; ConfigError naming
    `key`."""
    return from_dict(ModelConfig, ModelConfig.expand(spec, key), key)


@dataclass
class SettingEntry:
    """One setting of `study.settings` (a list): a model trained on a data budget."""

    model: Any
    """A model preset name or a mapping of model fields, as pretrain's `model` (kept as given: it names the
    setting)."""
    train_tokens: TokenCount
    """The data budget D in tokens (300K, 1e9, 10B)."""
    name: Optional[str] = None
    """Default: m<model>_d<D>."""
    target: Optional[float] = None
    """This setting's target loss (instead of one from the reference runs)."""

    @classmethod
    def expand(cls, data: Any, key: str) -> Any:
        if not isinstance(data, dict) or "model" not in data or "train_tokens" not in data:
            raise ConfigError(f"{key} must be a mapping with model and train_tokens: got {data!r}")
        return data

    def validate(self, p: str) -> None:
        check_model(self.model, f"{p}.model")
        _check(self.name is None or bool(self.name), f"{p}.name must not be empty: give a name or remove it")
        _check(self.target is None or (math.isfinite(self.target) and self.target > 0),
               f"{p}.target must be a loss > 0: got {self.target}")


GENERATOR_KEYS = {"fixed_model": ("model", "tokens"), "fixed_data": ("models", "tokens"),
                  "chinchilla": ("models", "tokens_per_param")}
"""The keys each settings generator takes (besides `generator`); chinchilla's tokens_per_param has a default."""


@dataclass
class SettingsGenerator:
    """`study.settings` as a generator: fixed_model (one model, budgets `tokens`), fixed_data (models `models`,
    one budget `tokens`) or chinchilla (models `models`, D = tokens_per_param x N)."""

    generator: str
    """fixed_model | fixed_data | chinchilla."""
    model: Any = None
    """fixed_model: the model (a preset name or a mapping of model fields)."""
    models: Optional[list[Any]] = None
    """fixed_data, chinchilla: the models."""
    tokens: Optional[list[TokenCount]] = None
    """fixed_model: the budgets; fixed_data: the one budget."""
    tokens_per_param: Optional[float] = None
    """chinchilla: D / N (default 20, Chinchilla's)."""

    @classmethod
    def expand(cls, data: Any, key: str) -> Any:
        """Refuse what is no generator, and keys another generator takes, before the fields are read."""
        if not isinstance(data, dict) or "generator" not in data:
            raise ConfigError(f"{key} must be a list of settings or a mapping with a generator "
                              f"(fixed_model, fixed_data, chinchilla)")
        gen = data["generator"]
        if gen not in GENERATOR_KEYS:
            raise ConfigError(f"{key}.generator must be one of {', '.join(GENERATOR_KEYS)}: got {gen!r}")
        allowed = ("generator",) + GENERATOR_KEYS[gen]
        extra = sorted(str(k) for k, v in data.items() if k not in allowed and v is not None)
        if extra:
            raise ConfigError(f"{key}.{extra[0]} is not a key of the {gen} generator ({', '.join(sorted(allowed))})")
        return data

    def validate(self, p: str) -> None:
        gen = self.generator
        if gen == "fixed_model":
            check_model(self.model, f"{p}.model")
        else:
            _check(bool(self.models), f"{p}.models must list model presets or field mappings")
            for i, spec in enumerate(self.models):
                check_model(spec, f"{p}.models[{i}]")
        if gen != "chinchilla":
            _check(bool(self.tokens), f"{p}.tokens is required by the {gen} generator: give the data budget"
                                      + ("s" if gen == "fixed_model" else ""))
        if gen == "fixed_data":
            _check(len(self.tokens) == 1, f"{p}.tokens: the fixed_data generator trains every model on one budget: "
                                          f"got {len(self.tokens)}; give one (or use a list of settings)")
        ratio = self.tokens_per_param
        _check(ratio is None or (math.isfinite(ratio) and ratio > 0),
               f"{p}.tokens_per_param must be a number of tokens per parameter > 0 (Chinchilla: 20): got {ratio}")


StudySettings = Union[list[SettingEntry], SettingsGenerator]
"""`study.settings`: a list of settings, or a generator."""


@dataclass
class SlurmConfig(SlurmResources):
    """`study.slurm`: the resources of each job under --executor slurm, the fields of cbs/pipeline/slurm.py's
    SlurmResources (partition, account, nodes, gpus_per_node, cpus_per_task, time, max_parallel, extra), checked by
    `validate` once loaded so that an error names `study.slurm.KEY`; command-line flags override them."""

    def __post_init__(self) -> None:
        """No check here: the loader builds the dataclass first, then `validate` checks it and names the key."""

    def validate(self, p: str) -> None:
        try:
            SlurmResources(**self.fields())
        except SlurmError as e:  # its messages start with "slurm.KEY"
            raise ConfigError(f"study.{e}" if str(e).startswith("slurm.") else f"{p}: {e}") from None

    def fields(self, overrides: Optional[dict] = None) -> dict:
        """SlurmResources' keyword arguments: these, then `overrides` (the command line's flags) over them."""
        return {**to_dict(self), **(overrides or {})}


@dataclass
class BranchedConfig:
    """Settings of `method: branched`. Each setting gets one base run at `batch_sizes`' smallest batch B,
    trained to the setting's budget D and checkpointed at every branch point t; from each, one branch per batch
    b of `batch_sizes` (k = b / B, B itself included) trains `branch_tokens` more tokens."""

    at_fractions: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])
    """Branch points t as fractions of each setting's budget D (after the warmup: t >= warmup_tokens)."""
    branch_tokens: Optional[int] = None
    """Tokens each branch trains (Delta); default: 10% of the setting's budget."""
    lr_scaling: LrScaling = LrScaling.sqrt
    """How a branch at k x B scales the base LR: sqrt (Adam), linear, none."""
    rule: BranchRule = BranchRule.absolute
    """How `cbs fit` turns a branch point's losses into the local CBS: absolute (Merrill et al.) or relative."""
    epsilon_nats: float = 0.01
    """absolute rule: a batch passes when its loss is within this many nats (plus the eval-noise allowance) of
    every smaller batch's."""
    tolerance: float = 0.01
    """relative rule: a batch passes when the smaller ones did and its loss is within this relative tolerance of
    the best loss of the branches at smaller batches."""

    def validate(self, p: str) -> None:
        _check(bool(self.at_fractions) and all(0 < f <= 1 for f in self.at_fractions),
               f"{p}.at_fractions must list fractions of the budget in (0, 1]: got {self.at_fractions}")
        _check(len(set(self.at_fractions)) == len(self.at_fractions), f"{p}.at_fractions has duplicates")
        _check(self.branch_tokens is None or self.branch_tokens >= 1,
               f"{p}.branch_tokens must be >= 1: got {self.branch_tokens}")
        _check(0 < self.tolerance < 1, f"{p}.tolerance must be in (0, 1): got {self.tolerance}")
        _check(0 <= self.epsilon_nats < 1, f"{p}.epsilon_nats must be in [0, 1) nats: got {self.epsilon_nats}")


@dataclass
class StudyConfig:
    """`cbs study`: settings x batch sizes x hyper-parameters -> runs -> evaluate -> fit."""

    section = "study"

    data: Union[str, dict]
    """A preprocess config (mapping; its output_dir defaults to STUDY_DIR/data) or an existing data directory."""
    settings: StudySettings
    """A list of {model, train_tokens[, name, target]}, or a generator: {generator: fixed_model, model, tokens:
    [D...]}, {generator: fixed_data, tokens: D, models: [...]}, {generator: chinchilla, models: [...],
    tokens_per_param: 20} (D = 20 N)."""
    batch_sizes: list[int]
    """Global batch sizes in sequences (>= 3 of them for a fit; the paper sweeps 64 to 16384)."""
    name: str = "study"
    hparams: HparamGrid = field(default_factory=HparamGrid)
    seeds: list[int] = field(default_factory=lambda: [1234])
    targets: StudyTargets = field(default_factory=StudyTargets)
    base: dict = field(default_factory=dict)
    """Pretrain config keys shared by every run (micro_batch_seqs, schedule, eval, deepspeed_config, ...)."""
    one_sweep: bool = True
    """Runs of one model serve all of its data budgets: trained once to the largest budget's target, each
    budget's crossing read off the same eval curve (docs/method.md, "Target loss"). False: separate runs per setting."""
    max_tokens_factor: float = 4.0
    """Non-reference runs stop once every target is reached, or after this many times the largest budget of
    their model (a run that gets there without reaching a target is censored in the fit)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """Resources for --executor slurm: partition, account, nodes, gpus_per_node, cpus_per_task, time,
    max_parallel, extra (list of raw sbatch flags). Command-line flags override them."""
    method: StudyMethod = StudyMethod.sweep
    """sweep (the paper's full runs per batch size) | branched (CBS along training from one base run)."""
    branched: BranchedConfig = field(default_factory=BranchedConfig)
    """Settings of method: branched."""
    ramp: Optional[BatchScheduleConfig] = None
    """method: ramp: the batch schedule (stages or a `cbs forecast --ramp --out` file, lr_scaling, beta2) every
    setting's ramp run trains; batch_sizes are its first and largest batch (the fixed runs)."""
    horizons: Optional[list[float]] = None
    """Schedule lengths, as multiples of each setting's data budget D, for runs whose LR schedule decays (cosine,
    wsd): each (setting, batch, lr, beta2, seed) trains one run per horizon h, its schedule ending at h x D tokens,
    and S(B) is interpolated between the final losses of its horizons (docs/method.md, "Decaying schedules").
    Sorted, distinct, > 0, at least 2; with reference targets it must hold 1 (the reference run of exactly D
    tokens). Refused when no run's schedule decays."""
    variants: Optional[dict] = None
    """Recipes swept side by side over the same grid: {name: pretrain keys over base, `model` fields over each
    setting's model, `hparams` merged over study.hparams} (cbs/pipeline/study_variants.py)."""
    axes: Optional[dict] = None
    """Variants as a product: {axis: {value: keys}} -> one variant per combination, named value1-value2."""
    reference_variant: Optional[str] = None
    """The variant whose reference runs set the target losses every variant shares; default: the first."""

    def validate(self, p: str) -> None:
        _check(len(self.batch_sizes) >= 1 and all(b >= 1 for b in self.batch_sizes),
               f"{p}.batch_sizes must list batch sizes >= 1: got {self.batch_sizes}")
        _check(len(set(self.batch_sizes)) == len(self.batch_sizes), f"{p}.batch_sizes has duplicates")
        _check(len(self.seeds) >= 1, f"{p}.seeds must list at least one seed")
        _check(self.max_tokens_factor >= 1, f"{p}.max_tokens_factor must be >= 1: got {self.max_tokens_factor}")
        ref = self.targets.reference
        if ref and ref.batch is not None:
            _check(ref.batch in self.batch_sizes,
                   f"{p}.targets.reference.batch ({ref.batch}) must be one of batch_sizes {self.batch_sizes}")
        if self.method is StudyMethod.branched:
            _check(len(self.hparams.lr) == 1 and len(self.hparams.beta2 or [0]) == 1 and len(self.seeds) == 1,
                   f"{p}: method branched has one base run per setting: give one hparams.lr, hparams.beta2 and seed")
            _check(len(self.batch_sizes) >= 2, f"{p}.batch_sizes: method branched needs the base batch and at least "
                                               f"one larger one")
            _check(self.targets.losses is None and (self.targets.reference is None or self.targets.reference.batch
                                                    in (None, min(self.batch_sizes))),
                   f"{p}.targets: method branched has no target losses (it compares branch losses): remove targets")
        if self.method is StudyMethod.ramp:
            self._validate_ramp(p)
        if self.horizons is not None:
            self._validate_horizons(p)
        _check(self.method is StudyMethod.sweep or self.hparams.ewa_taus != [],
               f"{p}.hparams.ewa_taus: [] (no EWA) is for method sweep; a {self.method.value} study keeps EWA weights: "
               f"give taus, or omit it for the paper's")
        if self.variants is not None or self.axes is not None or self.reference_variant is not None:
            from cbs.pipeline.study_variants import expand_variants  # it imports this module

            expand_variants(self)
        beta1 = (self.base.get("optimizer") or {}).get("beta1") if isinstance(self.base, dict) else None
        _check(beta1 is None or self.hparams.beta1_rule is BetaRule.fixed,
               f"{p}.base.optimizer.beta1 is set but {p}.hparams.beta1_rule is {self.hparams.beta1_rule.value}, "
               f"which sets beta1 per batch: remove base.optimizer.beta1, or set hparams.beta1_rule: fixed")
        for dotted, where in STUDY_SETS.items():
            node = self.base
            for part in dotted.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            _check(node is None, f"{p}.base.{dotted} is set by the study for each run ({where}): remove it from base")
        self._validate_base(p)
        if isinstance(self.data, dict):  # its output_dir defaults to STUDY_DIR/data: any path checks the rest
            from_dict(PreprocessConfig, {**self.data, "output_dir": self.data.get("output_dir") or "data"}, f"{p}.data")

    def _validate_horizons(self, p: str) -> None:
        h = self.horizons
        _check(isinstance(h, list) and len(h) >= 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                          and math.isfinite(x) and x > 0 for x in h),
               f"{p}.horizons must list at least 2 schedule lengths > 0, in multiples of the data budget D (e.g. "
               f"[0.5, 1, 2, 4]): got {h!r}")
        _check(all(a < b for a, b in zip(h, h[1:])), f"{p}.horizons must be sorted and distinct: got {h}")
        _check(self.method is StudyMethod.sweep, f"{p}.horizons: method {self.method.value} has no horizons (they "
                                                 f"belong to method sweep with a cosine or wsd schedule): remove it")
        _check(self.targets.losses is not None or any(math.isclose(x, 1.0) for x in h),
               f"{p}.horizons must hold 1 with reference targets: a setting's target is the final loss of the "
               f"reference batch's run of exactly D tokens (horizon 1); add 1 to {h}, or give targets.losses")

    def _validate_base(self, p: str) -> None:
        """Every key of base as pretrain reads it (a misspelt key, a bad value: named as study.base.KEY), with
        stand-ins for what the study sets per run; the checks that need those (budget, batch) come at plan time."""
        stand_ins = {"data_dir": ".", "run_dir": ".", "train_tokens": 10**18, "global_batch_seqs": 1}
        try:
            from_dict(PretrainConfig, {**stand_ins, **self.base}, f"{p}.base")
        except ConfigError as e:
            if any(f"{p}.base.{k}" in str(e) for k in stand_ins):  # a stand-in's check: not the user's key
                return
            raise

    def _validate_ramp(self, p: str) -> None:
        _check(self.ramp is not None, f"{p}.ramp is required with method ramp: give its stages (or a file of "
                                      f"`cbs forecast --ramp --out`)")
        _check(self.ramp.adaptive is None, f"{p}.ramp.adaptive: a ramp study compares a planned schedule (stages or "
                                           f"a file) with its fixed batches; train an adaptive ramp as one run "
                                           f"(pretrain.batch_schedule.adaptive)")
        stages = self.ramp.parsed(f"{p}.ramp")
        want = sorted({stages[0].batch, stages[-1].batch})
        _check(sorted(self.batch_sizes) == want, f"{p}.batch_sizes must be the ramp's first and largest batch "
                                                 f"{want} (the fixed runs it is compared with): got {self.batch_sizes}")
        _check(len(self.hparams.lr) == 1 and len(self.hparams.beta2 or [0]) == 1,
               f"{p}.hparams: method ramp compares one recipe: give one lr (and at most one beta2)")
        _check(self.hparams.beta2 is None or self.ramp.beta2 is BetaRule.fixed,
               f"{p}.ramp.beta2 is {self.ramp.beta2.value} but hparams.beta2 is given: set ramp.beta2: fixed (the "
               f"ramp then keeps hparams.beta2, as the fixed runs do), or remove hparams.beta2")
        _check(self.ramp.beta2 is not BetaRule.fixed or self.hparams.beta2 is not None,
               f"{p}.ramp.beta2 is fixed: give the beta2 in hparams.beta2 (the fixed runs use it too)")
        _check(self.hparams.beta2_rule in (None, self.ramp.beta2) and self.hparams.half_life == HalfLifeBetas(),
               f"{p}.hparams.beta2_rule / half_life: in a ramp study study.ramp.beta2 and study.ramp.half_life "
               f"decide beta2 for the ramp and its fixed runs alike; set them there")
        _check(self.hparams.beta1_rule is not BetaRule.half_life,
               f"{p}.hparams.beta1_rule is half_life, but a ramp keeps one beta1 through its stages: use fixed or "
               f"paper in a ramp study")
