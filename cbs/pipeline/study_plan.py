"""A study's plan: settings x batch sizes x hyper-parameters -> runs, each with its pretrain config.

Pure planning: nothing here trains, reads run directories or imports torch. `plan` checks the whole grid before
anything runs (every run's pretrain config validates), and refuses grids that would measure the wrong thing:
a learning-rate schedule that is not constant after warmup without `study.horizons` (one sweep reads every budget
off runs of different lengths; docs/method.md, "Target loss"; with horizons, one run per horizon instead:
cbs/pipeline/study_horizons.py), and a warmup that ends after a setting's budget (its target would be a mid-warmup
loss).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cbs import batching
from cbs.pipeline.config import (PAPER_TAU, BetaRule, ConfigError, LrScaling, ModelConfig, OptimizerConfig,
                                 OptimizerKind, PretrainConfig, ScheduleKind, StudyConfig, StudyMethod, from_dict,
                                 paper_value, parse_tokens, rule_beta, steps_for, to_dict)
from cbs.pipeline.config.loader import _coerce
from cbs.pipeline.config.study import SettingEntry, SettingsGenerator, StudySettings, check_model
from cbs.pipeline.study_horizons import check_horizons, check_warmup, expand, needs_horizons, study_keys
from cbs.pipeline.study_variants import Variant, expand_variants
from cbs.pipeline.utils import log
from cbs.runfiles import RUNS
WARMUP_SHARE_WARNING = 0.5
"""A warmup longer than this share of a budget is allowed but worth a warning (the paper warms up over 25% of
the reference run)."""


@dataclass
class Setting:
    name: str
    model: ModelConfig
    model_label: str
    tokens: int
    target: Optional[float] = None

    @property
    def model_params(self) -> int:
        return self.model.non_embedding_params


@dataclass
class Run:
    name: str
    settings: list[Setting]
    batch: int
    lr: float
    beta2: float
    taus: list[float]
    seed: int
    reference: bool
    train_tokens: int
    config: dict = field(default_factory=dict)
    branch: Optional[dict] = None
    """method branched: where this branch starts (base run, tokens, step) and its multiplier; None otherwise."""
    schedule: Optional[dict] = None
    """method ramp: the ramp run's pretrain batch_schedule (it trains no fixed batch); None otherwise."""
    beta1: Optional[float] = None
    """AdamW beta1 (hparams.beta1_rule at the run's batch); None: base.optimizer.beta1 or its default."""
    horizon: Optional[float] = None
    """study.horizons: this run's schedule length in multiples of its setting's budget D; None otherwise."""
    variant: Optional[Variant] = None
    """study.variants: the recipe this run trains (its keys over study.base); None in a study without variants."""


def human(n: float) -> str:
    """300000 -> 300K, 1.7e9 -> 1.7B (names of settings and runs)."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def _model(spec: Any, key: str) -> tuple[ModelConfig, str]:
    """A setting's model and its label in names: the preset's name when only a preset is given, else L<l>d<d>."""
    model = check_model(spec, key)
    label = model.preset if (isinstance(spec, str) or (isinstance(spec, dict) and len(spec) == 1)) \
        and model.preset else f"L{model.layers}d{model.hidden}"
    return model, label


def expand_settings(raw: Any) -> list[Setting]:
    """The `settings` key -> settings: an explicit list, or a generator (fixed_model, fixed_data, chinchilla).
    `raw` is the typed study.settings (config/study.py), or YAML data that is read as it first."""
    p = "study.settings"
    typed = isinstance(raw, SettingsGenerator) or (isinstance(raw, list) and
                                                   all(isinstance(e, SettingEntry) for e in raw))
    if not typed:
        raw = _coerce(raw, StudySettings, p)
    if isinstance(raw, list):
        out = []
        for i, entry in enumerate(raw):
            model, label = _model(entry.model, f"{p}[{i}].model")
            out.append(Setting(entry.name or f"m{label}_d{human(entry.train_tokens)}", model, label,
                               entry.train_tokens, entry.target))
        return _checked(out)
    if raw.generator == "fixed_model":
        model, label = _model(raw.model, f"{p}.model")
        return _checked([Setting(f"m{label}_d{human(t)}", model, label, t) for t in raw.tokens])
    out = []
    for i, spec in enumerate(raw.models):
        model, label = _model(spec, f"{p}.models[{i}]")
        if raw.generator == "fixed_data":
            tokens = raw.tokens[0]
        else:
            ratio = 20.0 if raw.tokens_per_param is None else raw.tokens_per_param
            tokens = parse_tokens(round(ratio * model.non_embedding_params), f"{p}.tokens_per_param x params")
        out.append(Setting(f"m{label}_d{human(tokens)}", model, label, tokens))
    return _checked(out)


def _checked(settings: list[Setting]) -> list[Setting]:
    if not settings:
        raise ConfigError("study.settings is empty")
    names = [s.name for s in settings]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"study.settings: two settings are named {dup}; give them distinct train_tokens or names")
    for s in settings:
        if s.tokens < 1:
            raise ConfigError(f"study.settings {s.name}: train_tokens must be >= 1")
    return settings


def reference_batch(cfg: StudyConfig) -> Optional[int]:
    """B0 of the paper's targets; None with explicit target losses."""
    if cfg.targets.losses:
        return None
    ref = cfg.targets.reference
    return ref.batch if ref and ref.batch else min(cfg.batch_sizes)


def _groups(cfg: StudyConfig, settings: list[Setting], decays: bool = False) -> list[list[Setting]]:
    """Settings that one sweep of runs serves: all budgets of one model (one_sweep), else each alone. Runs whose
    schedule decays (`decays`) never share: each horizon run ends at h x D of its own setting."""
    if not cfg.one_sweep or decays:
        return [[s] for s in settings]
    groups: dict[str, list[Setting]] = {}
    for s in settings:
        groups.setdefault(json.dumps(to_dict(s.model), sort_keys=True), []).append(s)
    return [sorted(g, key=lambda s: s.tokens) for g in groups.values()]


def plan(cfg: StudyConfig, study_dir: Path, data_dir: Path, data_parallel: int = 1,
         ranks: str = "--gpus-per-run 1") -> list[Run]:
    """Every run of the study, each with its validated pretrain config (`run.config`), every batch checked to
    split into micro-batches on the `data_parallel` ranks each run trains on (`ranks`: where that number comes
    from, for the message), so that no run fails at its start for it."""
    settings = expand_settings(cfg.settings)
    if cfg.method is StudyMethod.branched:
        runs = plan_branched(cfg, settings, study_dir, data_dir)
    else:
        _fill_explicit_targets(cfg, settings)
        runs = (plan_ramp if cfg.method is StudyMethod.ramp else plan_sweep)(cfg, settings, study_dir, data_dir)
    check_layouts(cfg, runs, data_parallel, ranks)
    return runs


def plan_sweep(cfg: StudyConfig, settings: list[Setting], study_dir: Path, data_dir: Path) -> list[Run]:
    """The paper's method: every setting group x batch x hyper-parameters x seed, one full run each."""
    b0 = reference_batch(cfg)
    variants = expand_variants(cfg) or [None]
    runs = []
    for variant in variants:
        runs += _sweep_runs(cfg, settings, b0, variant)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError("study: two runs get the same name; give settings distinct names")
    for r in runs:
        r.config = run_config(cfg, r, study_dir, data_dir)
    decaying = [v for v in variants if needs_horizons(_view(cfg, v).base.get("schedule"))]
    if cfg.horizons and not decaying:
        check_horizons(cfg.horizons, False, "constant")  # horizons on a constant schedule: refused
    for variant in variants:  # each variant's schedule, read off its first run
        first = next(r for r in runs if r.variant is variant)
        check_schedule(from_dict(PretrainConfig, json.loads(json.dumps(first.config)), "study.base"), settings,
                       cfg.horizons if variant in decaying else None, key=variant.key() if variant else "study.base")
    return runs


def _view(cfg: StudyConfig, variant: Optional[Variant]) -> StudyConfig:
    """The study as one variant's runs see it: the variant's keys merged over base and its hparams grid (the study
    itself without variants), for the rules each run follows (betas, EWA decays, schedule-free, micro-batch)."""
    if variant is None:
        return cfg
    return dataclasses.replace(cfg, base=variant.merged_base(cfg.base), hparams=variant.hparams)


def _sweep_runs(cfg: StudyConfig, settings: list[Setting], b0: Optional[int], variant: Optional[Variant]) -> list[Run]:
    """The runs of one variant (or of a study without variants): groups x batches x lr x beta2 x seeds, one run
    per horizon where the variant's schedule decays. Only the reference variant's runs at B0 are reference runs:
    the targets they set are shared by every variant."""
    view = _view(cfg, variant)
    decays = needs_horizons(view.base.get("schedule"))
    if decays and cfg.horizons and len(_groups(cfg, settings)) < len(settings):
        log.info("study: one_sweep does not apply to runs with horizons: each trains to h x D of its own setting")
    is_ref_variant = variant is None or variant.name == variant.reference
    runs = []
    for group in _groups(cfg, settings, decays):
        top = group[-1].tokens
        for batch in sorted(cfg.batch_sizes):
            for lr in view.hparams.lr:
                for beta2 in beta2_values(view, batch):
                    for seed in cfg.seeds:
                        run = _run(view, group, batch, lr, beta2, seed, is_ref_variant and batch == b0, top, variant)
                        runs += with_horizons(cfg, run, decays)
    return runs


def check_layouts(cfg: StudyConfig, runs: list[Run], data_parallel: int, ranks: str) -> None:
    """Refuse at plan time every batch a run would refuse at its start: each batch it trains at (a ramp's every
    stage) must split into the run's micro-batch x `data_parallel` ranks (cbs.batching, pretrain's own rule).
    Each variant's runs with its own micro-batch (a variant may set micro_batch_seqs)."""
    variants = {id(r.variant): r.variant for r in runs}
    for variant in variants.values():
        key = variant.key("micro_batch_seqs") if variant and "micro_batch_seqs" in variant.base else \
            "base.micro_batch_seqs"
        _check_layout(_view(cfg, variant), [r for r in runs if r.variant is variant], data_parallel, ranks, key)


def _check_layout(cfg: StudyConfig, runs: list[Run], data_parallel: int, ranks: str, key: str) -> None:
    micro = base_micro_batch(cfg)
    bad = sorted({b for r in runs for b in _batches(r) if not _splits(r, micro, data_parallel, b)})
    if not bad:
        return
    in_sizes = [b for b in bad if b in cfg.batch_sizes]
    where = f"study.batch_sizes {in_sizes}" if in_sizes else f"study.ramp's stage batches {bad}"
    if data_parallel == 1:
        raise ConfigError(f"{where} are not divisible by {key} ({micro}); use multiples of it "
                          f"(batches smaller than it use themselves as micro-batch)")
    given = f"{key} ({micro})" if micro else \
        f"{batching.DEFAULT_MICRO_BATCH_SEQS} sequences (the default; {key} is not set)"
    fits = [m for m in range(int(micro or batching.DEFAULT_MICRO_BATCH_SEQS) - 1, 0, -1)
            if all(_splits(r, m, data_parallel, b) for r in runs for b in _batches(r))]
    fix = (f"set {key}: {fits[0]}, " if fits else "") + \
        f"use batches that are multiples of {data_parallel} x the micro-batch, or train each run on fewer ranks"
    raise ConfigError(f"{where} cannot be split over {data_parallel} data-parallel ranks ({ranks}) with micro-batches "
                      f"of {given}: every rank trains the same whole micro-batches, so a batch must be a multiple "
                      f"of micro-batch x {data_parallel} (a batch smaller than the micro-batch is one micro-batch "
                      f"of itself); {fix}")


def base_micro_batch(cfg: StudyConfig) -> Optional[int]:
    """study.base.micro_batch_seqs as the integer pretrain reads it (YAML may give 4.0 or "4"), None if unset."""
    return _coerce(cfg.base.get("micro_batch_seqs"), Optional[int], "study.base.micro_batch_seqs")


def _batches(run: Run) -> list[int]:
    """Every global batch a run trains at: its batch, or its ramp's stages (the first is run.batch)."""
    return [st["batch"] for st in run.schedule["stages"]] if run.schedule else [run.batch]


def _splits(run: Run, micro: Optional[int], data_parallel: int, batch: int) -> bool:
    """Whether `batch` of `run` splits with base.micro_batch_seqs `micro` (clamped to the run's first batch)."""
    return batching.splits(batch, batching.micro_batch_for(run.batch, micro), data_parallel)


def with_horizons(cfg: StudyConfig, run: Run, decays: bool) -> list[Run]:
    """The run itself (a constant schedule), or one run per study.horizons h (a decaying one: `decays`, which is
    `needs_horizons` of the run's resolved schedule), each trained to the end of its schedule at h x D tokens."""
    if not decays or not cfg.horizons:  # a decaying schedule without horizons: refused by check_schedule
        return [run]
    return expand(run, cfg.horizons)


def _fill_explicit_targets(cfg: StudyConfig, settings: list[Setting]) -> None:
    """study.targets.losses: every setting's target, given; nothing with reference targets."""
    if cfg.targets.losses:
        missing = [s.name for s in settings if s.name not in cfg.targets.losses and s.target is None]
        if missing:
            raise ConfigError(f"study.targets.losses has no loss for {', '.join(missing)}")
        for s in settings:
            s.target = s.target if s.target is not None else float(cfg.targets.losses[s.name])


def run_path(study_dir: Path, name: str) -> Path:
    """STUDY_DIR/runs/<name>: the pretrain run directory of one run."""
    return Path(study_dir) / RUNS / name


def check_schedule(run: PretrainConfig, settings: list[Setting], horizons: Optional[list[float]] = None,
                   sweep: bool = True, key: str = "study.base") -> None:
    """Refuse what would make S(B) compare different things; warn about a long warmup.

    A study reads every batch's steps-to-target off runs trained for different lengths (the reference runs to
    the budget, the others up to max_tokens_factor x the budget), and one sweep reads several budgets off the
    same runs. A cosine or WSD schedule decays over each run's own length, so the runs would follow different
    LR curves: a sweep needs study.horizons for it (one run per horizon; `check_horizons`), the other methods
    refuse it. A target measured before the warmup ends is the loss of a run that never saw its peak LR.
    """
    schedule = run.schedule
    if sweep:
        check_horizons(horizons, needs_horizons(schedule), schedule.kind.value, key)
        if horizons:
            check_warmup(horizons, schedule.warmup_tokens, {s.name: s.tokens for s in settings})
    elif schedule.kind is not ScheduleKind.constant:
        raise ConfigError(
            f"{key}.schedule.kind is {schedule.kind.value}: a study needs a constant learning rate after "
            f"warmup (the paper's method, with EWA), because its runs train for different lengths (the reference "
            f"runs to the budget, the others up to max_tokens_factor x it) and a {schedule.kind.value} schedule "
            f"decays over each run's own length, so S(B) would compare different schedules; set "
            f"base.schedule.kind: constant")
    for s in settings:
        if schedule.warmup_tokens >= s.tokens:
            raise ConfigError(
                f"{key}.schedule.warmup_tokens ({schedule.warmup_tokens}) >= the budget of setting {s.name} "
                f"({s.tokens} tokens): its target would be measured before the warmup ends; warm up over at "
                f"most a fraction of the smallest budget (the paper: 25%)")
        if schedule.warmup_tokens > WARMUP_SHARE_WARNING * s.tokens:
            log.warning("study: the warmup (%d tokens) is %.0f%% of the budget of %s; the paper warms up over 25%%",
                        schedule.warmup_tokens, 100 * schedule.warmup_tokens / s.tokens, s.name)


def schedule_free(cfg: StudyConfig) -> bool:
    """base.optimizer.kind is schedule_free: the runs keep no EWA (its evaluated weights x already are an
    average), and targets, stops and the fit read their raw eval loss, which is x's."""
    return (cfg.base.get("optimizer") or {}).get("kind") == OptimizerKind.schedule_free.value


def ewa_taus(cfg: StudyConfig, batch: int) -> list[float]:
    """The EWA decays of a run at `batch`: hparams.ewa_taus, else the paper's; none for schedule-free runs."""
    if schedule_free(cfg):
        if cfg.hparams.ewa_taus:
            raise ConfigError(f"hparams.ewa_taus {cfg.hparams.ewa_taus} is given for runs whose optimizer.kind is "
                              f"schedule_free, whose evaluated weights already are an average: remove ewa_taus from "
                              f"study.hparams (or from the schedule-free variant's hparams)")
        return []
    # ewa_taus: [] trains without EWA weights (a variant's ablation); unset: the paper's tau for the batch
    return list(cfg.hparams.ewa_taus if cfg.hparams.ewa_taus is not None else [paper_value(PAPER_TAU, batch)])


def beta2_rule(cfg: StudyConfig) -> BetaRule:
    """The beta2 rule of a study's runs: hparams.beta2_rule, or fixed when hparams.beta2 is given, else paper; in
    a ramp study, study.ramp.beta2."""
    if cfg.method is StudyMethod.ramp:
        return cfg.ramp.beta2
    return cfg.hparams.beta2_rule or (BetaRule.fixed if cfg.hparams.beta2 else BetaRule.paper)


def beta2_values(cfg: StudyConfig, batch: int) -> list[float]:
    """The beta2 values tried at `batch`: hparams.beta2 (fixed), or the rule's one value (paper, half_life)."""
    rule = beta2_rule(cfg)
    if rule is BetaRule.fixed:
        return list(cfg.hparams.beta2)
    return [rule_beta(rule, "beta2", batch, 0.0, cfg.ramp.half_life if cfg.method is StudyMethod.ramp
                      else cfg.hparams.half_life)]


def beta1_value(cfg: StudyConfig, batch: int) -> float:
    """beta1 at `batch` under hparams.beta1_rule (fixed: base.optimizer.beta1, else OptimizerConfig's default)."""
    given = (cfg.base.get("optimizer") or {}).get("beta1", OptimizerConfig.beta1)
    return rule_beta(cfg.hparams.beta1_rule, "beta1", batch, given, cfg.hparams.half_life)


def beta_record(cfg: StudyConfig) -> dict:
    """What each run's config.yaml records of the rules (under `study.betas`; the values are in `optimizer`)."""
    rule2, rule1 = beta2_rule(cfg), cfg.hparams.beta1_rule
    half_life = cfg.ramp.half_life if cfg.method is StudyMethod.ramp else cfg.hparams.half_life
    out = {"beta1_rule": rule1.value, "beta2_rule": rule2.value}
    if BetaRule.half_life in (rule1, rule2):
        out["half_life"] = to_dict(half_life)
        out["formula"] = "; ".join(half_life.describe(n) for n, r in (("beta1", rule1), ("beta2", rule2))
                                   if r is BetaRule.half_life)
    return out


def _run(cfg: StudyConfig, group: list[Setting], batch: int, lr: float, beta2: float, seed: int, reference: bool,
         top: int, variant: Optional[Variant] = None) -> Run:
    """One run of `cfg` (the variant's view of the study: `_view`)."""
    name = _stem(group[0].model_label, top, batch, lr)
    if cfg.hparams.beta2 and len(cfg.hparams.beta2) > 1:
        name += f"_beta2{beta2:g}"
    if len(cfg.seeds) > 1:
        name += f"_s{seed}"
    if variant is not None:
        name += f"_{variant.name}"
    taus = ewa_taus(cfg, batch)
    tokens = top if reference else int(cfg.max_tokens_factor * top)
    return Run(name, group, batch, lr, beta2, list(taus), seed, reference, tokens, beta1=beta1_value(cfg, batch),
               variant=variant)


def _stem(model_label: str, tokens: int, batch: int, lr: float) -> str:
    """The start of a run's name: m<model>_d<tokens>_b<batch>_lr<lr>."""
    return f"m{model_label}_d{human(tokens)}_b{batch}_lr{lr:g}"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_config(cfg: StudyConfig, run: Run, study_dir: Path, data_dir: Path) -> dict:
    """The pretrain config of one run: the study's base, then what the study decides for this run."""
    view = _view(cfg, run.variant)
    base = view.base
    model = run.variant.model_of(run.settings[0].model) if run.variant else run.settings[0].model
    micro = batching.micro_batch_for(run.batch, base_micro_batch(view))  # pretrain's rule, made explicit
    targets = [s.target for s in run.settings if s.target is not None]
    over = {
        "data_dir": str(data_dir), "run_dir": str(run_path(study_dir, run.name)),
        "model": to_dict(model), "global_batch_seqs": run.batch, "micro_batch_seqs": micro,
        "train_tokens": run.train_tokens, "seed": run.seed,
        "optimizer": {"lr": run.lr, "beta2": run.beta2, **({"beta1": run.beta1} if run.beta1 is not None else {})},
        "ewa": {"taus": run.taus},
        "targets": targets, "stop_at_targets": bool(targets) and not run.reference and run.horizon is None,
        "stop_weights": "ewa" if run.taus else "any",
        "study": {"name": cfg.name, "method": cfg.method.value, "reference": run.reference, "settings": [
            {"name": s.name, "model_params": model.non_embedding_params, "tokens": s.tokens, "target_loss": s.target}
            for s in run.settings], "betas": beta_record(view), **study_keys(run)},
    }
    if run.variant is not None:  # how `cbs fit` knows a run's variant, their order and the reference one
        over["study"].update(run.variant.metadata())
    if run.schedule is not None:  # a ramp run: its stages instead of a fixed batch
        over.update(global_batch_seqs=None, batch_schedule=run.schedule)
    if run.reference and cfg.method in (StudyMethod.sweep, StudyMethod.ramp):
        over["eval"] = {"at_tokens": [s.tokens for s in run.settings]}
    merged = _merge(base, over)
    if "at_tokens" in over.get("eval", {}) and base.get("eval", {}).get("at_tokens"):
        merged["eval"]["at_tokens"] = sorted(set(base["eval"]["at_tokens"]) | {s.tokens for s in run.settings})
    try:  # every run validates now
        from_dict(PretrainConfig, json.loads(json.dumps(merged)), f"study run {run.name}")
    except ConfigError as e:
        error = _blame_base(e, run.name, base, over)
        raise (_blame_variant(error, run, over) if run.variant else error) from None
    return merged


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _blame_base(error: ConfigError, name: str, base: dict, over: dict) -> ConfigError:
    """An error in a key that came from study.base (a typo, a bad value) names it there, where the user wrote
    it, not under the run name that merged it; errors of what the study sets keep the run's name."""
    message, prefix = str(error), f"study run {name}."
    if not message.startswith(prefix):
        return error
    dotted = message[len(prefix):].split(" ", 1)[0].split("[", 1)[0]
    if _lookup(base, dotted) is None or _lookup(over, dotted) is not None:
        return error
    return ConfigError(message.replace(prefix, "study.base."))


def _blame_variant(error: ConfigError, run: Run, over: dict) -> ConfigError:
    """An error in a key a variant set (merged over base) names the variant's key, not study.base's."""
    message = str(error)
    for prefix in (f"study run {run.name}.", "study.base."):
        if message.startswith(prefix):
            dotted = message[len(prefix):].split(" ", 1)[0].split("[", 1)[0]
            if _lookup(run.variant.base, dotted) is not None and _lookup(over, dotted) is None:
                return ConfigError(message.replace(prefix, run.variant.key() + "."))
    return error


# ---------------------------------------------------------------------------------------------------- ramp


def plan_ramp(cfg: StudyConfig, settings: list[Setting], study_dir: Path, data_dir: Path) -> list[Run]:
    """Per group of settings (one model) and seed: the fixed run at the ramp's first batch b0 (the reference, when
    targets come from it), the fixed run at its largest batch (LR x scale(k), EWA tau^k: the ramp's last stage
    as a whole run) and the ramp run (study.ramp), the last two trained to the target."""
    from cbs.analysis.batch_schedule import stages_to_data

    ramp = cfg.ramp
    stages = ramp.parsed("study.ramp")
    b0, top_batch, lr = stages[0].batch, stages[-1].batch, cfg.hparams.lr[0]
    taus0 = ewa_taus(cfg, b0)
    reference = reference_batch(cfg) is not None
    runs = []
    for group in _groups(cfg, settings):
        top = group[-1].tokens
        for seed in cfg.seeds:
            for batch in sorted({b0, top_batch}):
                k = batch / b0
                beta2 = ramp.beta2_at(batch, (cfg.hparams.beta2 or [0.0])[0])
                taus = [round(tau ** k, 6) for tau in taus0]
                is_ref = reference and batch == b0
                runs.append(_seeded(cfg, Run(_stem(group[0].model_label, top, batch, lr), group, batch,
                                             lr * ramp.lr_factor(batch, b0), beta2, taus, seed, is_ref,
                                             top if is_ref else int(cfg.max_tokens_factor * top),
                                             beta1=beta1_value(cfg, b0))))
            name = f"m{group[0].model_label}_d{human(top)}_ramp{b0}-{top_batch}_lr{lr:g}"
            run = Run(name, group, b0, lr, ramp.beta2_at(b0, (cfg.hparams.beta2 or [0.0])[0]), list(taus0), seed,
                      False, int(cfg.max_tokens_factor * top), beta1=beta1_value(cfg, b0))
            run.schedule = {"stages": stages_to_data(stages), "lr_scaling": ramp.lr_scaling.value,
                            "beta2": ramp.beta2.value, "half_life": to_dict(ramp.half_life)}
            runs.append(_seeded(cfg, run))
    for r in runs:
        r.config = run_config(cfg, r, study_dir, data_dir)
    check_schedule(from_dict(PretrainConfig, json.loads(json.dumps(runs[0].config)), "study.base"), settings,
                   sweep=False)
    return runs


def _seeded(cfg: StudyConfig, run: Run) -> Run:
    if len(cfg.seeds) > 1:
        run.name += f"_s{run.seed}"
    return run


# ---------------------------------------------------------------------------------------------------- branched


LR_SCALE = {LrScaling.sqrt: lambda k: k ** 0.5, LrScaling.linear: lambda k: float(k), LrScaling.none: lambda k: 1.0}


def plan_branched(cfg: StudyConfig, settings: list[Setting], study_dir: Path, data_dir: Path) -> list[Run]:
    """One base run per setting at B = min(batch_sizes), checkpointed at each branch point t (a fraction of
    the budget D); from each, a branch per batch b >= B (k = b / B, LR x scale(k)) trains `branch_tokens`
    more tokens, continuing the base's optimizer state and data stream (pretrain's init_from). The base runs
    come first (`reference` marks them for the phases), then every branch."""
    b0, lr, seed = min(cfg.batch_sizes), cfg.hparams.lr[0], cfg.seeds[0]
    beta2 = beta2_values(cfg, b0)[0]  # the branches keep the base run's betas
    taus = ewa_taus(cfg, b0)
    runs = []
    for s in settings:
        stem = _stem(s.model_label, s.tokens, b0, lr)
        base = Run(f"{stem}_base", [s], b0, lr, beta2, list(taus), seed, True, s.tokens, beta1=beta1_value(cfg, b0))
        points = sorted({max(1, int(f * s.tokens)) for f in cfg.branched.at_fractions})
        base.config = run_config(cfg, base, study_dir, data_dir)
        base.config["checkpoint"] = {**base.config.get("checkpoint", {}), "at_tokens": points}
        runs.append(base)
        for tokens in points:
            runs += [_branch(cfg, base, f"{stem}_t{human(tokens)}_b{batch}", tokens, batch, study_dir, data_dir)
                     for batch in sorted(cfg.batch_sizes)]
    for r in runs:
        from_dict(PretrainConfig, json.loads(json.dumps(r.config)), f"study run {r.name}")
    check_schedule(from_dict(PretrainConfig, json.loads(json.dumps(runs[0].config)), "study.base"), settings,
                   sweep=False)
    warmup = runs[0].config.get("schedule", {}).get("warmup_tokens", 0)
    early = [r.branch["base_tokens"] for r in runs if r.branch and r.branch["base_tokens"] < warmup]
    if early:
        raise ConfigError(f"study.branched.at_fractions: branch points {sorted(set(early))} (tokens) fall inside the "
                          f"warmup ({warmup} tokens): a branch would start before the LR reached its peak; use "
                          f"fractions of the budget past the warmup")
    return runs


def _branch(cfg: StudyConfig, base: Run, name: str, tokens: int, batch: int, study_dir: Path,
            data_dir: Path) -> Run:
    """A branch of `base` (named `name`) from its checkpoint after `tokens` tokens, at `batch` sequences."""
    k = batch / base.batch
    seq_len = base.settings[0].model.seq_len
    step = steps_for(tokens, base.batch * seq_len)  # the checkpoint pretrain saves for checkpoint.at_tokens
    delta = cfg.branched.branch_tokens or max(1, base.train_tokens // 10)
    # EWA restarts at the branch; tau^k averages over the same tokens at every batch (k times fewer steps)
    taus = [round(tau ** k, 6) for tau in base.taus]
    run = Run(name, base.settings, batch,
              base.lr * LR_SCALE[cfg.branched.lr_scaling](k), base.beta2, taus, base.seed, False, delta,
              beta1=base.beta1)
    run.branch = {"setting": base.settings[0].name, "base_run": base.name, "base_batch": base.batch,
                  "base_tokens": step * base.batch * seq_len, "base_step": step, "multiplier": k,
                  "lr_scale": run.lr / base.lr, "tolerance": cfg.branched.tolerance,
                  "rule": cfg.branched.rule.value, "epsilon_nats": cfg.branched.epsilon_nats}
    run.config = run_config(cfg, run, study_dir, data_dir)
    steps = steps_for(delta, batch * seq_len)
    run.config.update(init_from={"run_dir": base.config["run_dir"], "step": step},
                      schedule={**run.config.get("schedule", {}), "kind": "constant", "warmup_tokens": 0},
                      eval={**run.config.get("eval", {}), "every_steps": steps, "growth": 0, "at_tokens": []})
    run.config["study"]["branch"] = run.branch
    return run


def plan_table(cfg: StudyConfig, runs: list[Run], b0: Optional[int]) -> str:
    lines = [f"study {cfg.name}: {len(runs)} runs"
             + (f"; reference batch B0 = {b0} (targets from its runs)" if b0 else "; explicit targets")]
    for r in runs:
        batch = "ramp " + "->".join(str(st["batch"]) for st in r.schedule["stages"]) if r.schedule else r.batch
        beta1 = r.beta1 if r.beta1 is not None else OptimizerConfig.beta1
        lines.append(f"  {r.name}: batch {batch}, lr {r.lr:g}, beta1 {beta1:g}, beta2 {r.beta2:g}, taus {r.taus}, "
                     + (f"{human(r.train_tokens)} tokens (horizon {r.horizon:g} x D, to the schedule's end)"
                        if r.horizon is not None else f"{human(r.train_tokens)} tokens max")
                     + f", serves {', '.join(s.name for s in r.settings)}"
                     + (" [reference]" if r.reference else ""))
    return "\n".join(lines)
