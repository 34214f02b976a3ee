"""A study's plan: settings x batch sizes x hyper-parameters -> runs, each with its pretrain config.

Pure planning: nothing here trains, reads run directories or imports torch. `plan` checks the whole grid before
anything runs (every run's pretrain config validates), and refuses grids that would measure the wrong thing:
a learning-rate schedule that is not constant after warmup (one sweep reads every budget off runs of different
lengths; docs/method.md, "Target loss"), and a warmup that ends after a setting's budget (its target would be a
mid-warmup loss).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cbs.pipeline.config import (PAPER_BETA2, PAPER_TAU, ConfigError, LrScaling, ModelConfig, PretrainConfig,
                                 ScheduleKind, StudyConfig, StudyMethod, from_dict, paper_value, parse_tokens,
                                 steps_for, to_dict)
from cbs.pipeline.study_variants import Variant, expand_variants
from cbs.pipeline.utils import log

RUNS = "runs"
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
    variant: Optional[Variant] = None
    """study.variants: the recipe this run trains (its keys over study.base); None in a study without variants."""


def human(n: float) -> str:
    """300000 -> 300K, 1.7e9 -> 1.7B (names of settings and runs)."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def _model(spec: Any, key: str) -> tuple[ModelConfig, str]:
    model = from_dict(ModelConfig, ModelConfig.expand(spec, key), key)
    label = model.preset if (isinstance(spec, str) or (isinstance(spec, dict) and len(spec) == 1)) \
        and model.preset else f"L{model.layers}d{model.hidden}"
    return model, label


def expand_settings(raw: Any) -> list[Setting]:
    """The `settings` key -> settings: an explicit list, or a generator (fixed_model, fixed_data, chinchilla)."""
    p = "study.settings"
    if isinstance(raw, list):
        out = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or "model" not in item or "train_tokens" not in item:
                raise ConfigError(f"{p}[{i}] must be a mapping with model and train_tokens")
            unknown = set(item) - {"model", "train_tokens", "name", "target"}
            if unknown:
                raise ConfigError(f"{p}[{i}].{sorted(unknown)[0]} is not a known key (model, train_tokens, name, "
                                  f"target)")
            model, label = _model(item["model"], f"{p}[{i}].model")
            tokens = parse_tokens(item["train_tokens"], f"{p}[{i}].train_tokens")
            out.append(Setting(item.get("name") or f"m{label}_d{human(tokens)}", model, label, tokens,
                               item.get("target")))
        return _checked(out)
    if not isinstance(raw, dict) or "generator" not in raw:
        raise ConfigError(f"{p} must be a list of settings or a mapping with a generator "
                          f"(fixed_model, fixed_data, chinchilla)")
    gen = raw["generator"]
    keys = {"fixed_model": {"model", "tokens"}, "fixed_data": {"models", "tokens"},
            "chinchilla": {"models", "tokens_per_param"}}
    if gen not in keys:
        raise ConfigError(f"{p}.generator must be one of fixed_model, fixed_data, chinchilla: got {gen!r}")
    allowed = keys[gen] | {"generator"}
    extra = set(raw) - allowed
    if extra:
        raise ConfigError(f"{p}.{sorted(extra)[0]} is not a key of the {gen} generator ({', '.join(sorted(allowed))})")
    if gen == "fixed_model":
        model, label = _model(raw.get("model"), f"{p}.model")
        tokens = raw.get("tokens")
        tokens = [parse_tokens(t, f"{p}.tokens[{i}]") for i, t in
                  enumerate(tokens if isinstance(tokens, list) else [tokens])]
        return _checked([Setting(f"m{label}_d{human(t)}", model, label, t) for t in tokens])
    models = raw.get("models") or []
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{p}.models must list model presets or field mappings")
    out = []
    for i, spec in enumerate(models):
        model, label = _model(spec, f"{p}.models[{i}]")
        if gen == "fixed_data":
            tokens = parse_tokens(raw.get("tokens"), f"{p}.tokens")
        else:
            tokens = parse_tokens(round(_tokens_per_param(raw.get("tokens_per_param", 20), f"{p}.tokens_per_param")
                                        * model.non_embedding_params), f"{p}.tokens_per_param x params")
        out.append(Setting(f"m{label}_d{human(tokens)}", model, label, tokens))
    return _checked(out)


def _tokens_per_param(value: Any, key: str) -> float:
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        ratio = math.nan
    if isinstance(value, bool) or not (math.isfinite(ratio) and ratio > 0):
        raise ConfigError(f"{key} must be a number of tokens per parameter > 0 (Chinchilla: 20): got {value!r}")
    return ratio


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


def _groups(cfg: StudyConfig, settings: list[Setting]) -> list[list[Setting]]:
    """Settings that one sweep of runs serves: all budgets of one model (one_sweep), else each alone."""
    if not cfg.one_sweep:
        return [[s] for s in settings]
    groups: dict[str, list[Setting]] = {}
    for s in settings:
        groups.setdefault(json.dumps(to_dict(s.model), sort_keys=True), []).append(s)
    return [sorted(g, key=lambda s: s.tokens) for g in groups.values()]


def plan(cfg: StudyConfig, study_dir: Path, data_dir: Path) -> list[Run]:
    """Every run of the study, each with its validated pretrain config (`run.config`)."""
    settings = expand_settings(cfg.settings)
    if cfg.method is StudyMethod.branched:
        return plan_branched(cfg, settings, study_dir, data_dir)
    _fill_explicit_targets(cfg, settings)
    if cfg.method is StudyMethod.ramp:
        return plan_ramp(cfg, settings, study_dir, data_dir)
    b0 = reference_batch(cfg)
    variants = expand_variants(cfg) or [None]
    runs = []
    for variant in variants:
        _check_micro(cfg, variant)
        runs += _sweep_runs(cfg, settings, b0, variant)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError("study: two runs get the same name; give settings distinct names")
    for r in runs:
        r.config = run_config(cfg, r, study_dir, data_dir)
    for variant in variants:  # each variant's schedule, read off its first run
        first = next(r for r in runs if r.variant is variant)
        check_schedule(from_dict(PretrainConfig, json.loads(json.dumps(first.config)), "study.base"), settings,
                       variant.key("schedule") if variant else "study.base.schedule")
    return runs


def _check_micro(cfg: StudyConfig, variant: Optional[Variant]) -> None:
    """Every batch of the sweep splits into micro-batches of (the variant's, else base's) micro_batch_seqs."""
    micro = (variant.base if variant else {}).get("micro_batch_seqs") or cfg.base.get("micro_batch_seqs")
    if micro:
        bad = [b for b in cfg.batch_sizes if b % min(b, int(micro))]
        if bad:
            where = variant.key("micro_batch_seqs") if variant and variant.base.get("micro_batch_seqs") \
                else "base.micro_batch_seqs"
            raise ConfigError(f"study.batch_sizes {bad} are not divisible by {where} ({micro}); "
                              f"use multiples of it (batches smaller than it use themselves as micro-batch)")


def _sweep_runs(cfg: StudyConfig, settings: list[Setting], b0: Optional[int], variant: Optional[Variant]) -> list[Run]:
    """The runs of one variant (or of a study without variants): groups x batches x lr x beta2 x seeds. Only the
    reference variant's runs at B0 are reference runs: the targets they set are shared by every variant."""
    hparams = variant.hparams if variant else cfg.hparams
    is_ref_variant = variant is None or variant.name == variant.reference
    runs = []
    for group in _groups(cfg, settings):
        top = group[-1].tokens
        for batch in sorted(cfg.batch_sizes):
            for lr in hparams.lr:
                for beta2 in hparams.beta2 or [paper_value(PAPER_BETA2, batch)]:
                    for seed in cfg.seeds:
                        runs.append(_run(cfg, group, batch, lr, beta2, seed, is_ref_variant and batch == b0, top,
                                         variant))
    return runs


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


def check_schedule(run: PretrainConfig, settings: list[Setting], key: str = "study.base.schedule") -> None:
    """Refuse what would make S(B) compare different things; warn about a long warmup.

    A study reads every batch's steps-to-target off runs trained for different lengths (the reference runs to
    the budget, the others up to max_tokens_factor x the budget), and one sweep reads several budgets off the
    same runs. A cosine or WSD schedule decays over each run's own length, so the runs would follow different
    LR curves. A target measured before the warmup ends is the loss of a run that never saw its peak LR.
    """
    schedule = run.schedule
    if schedule.kind is not ScheduleKind.constant:
        raise ConfigError(
            f"{key}.kind is {schedule.kind.value}: a study needs a constant learning rate after "
            f"warmup (the paper's method, with EWA), because its runs train for different lengths (the reference "
            f"runs to the budget, the others up to max_tokens_factor x it) and a {schedule.kind.value} schedule "
            f"decays over each run's own length, so S(B) would compare different schedules; set "
            f"base.schedule.kind: constant")
    for s in settings:
        if schedule.warmup_tokens >= s.tokens:
            raise ConfigError(
                f"{key}.warmup_tokens ({schedule.warmup_tokens}) >= the budget of setting {s.name} "
                f"({s.tokens} tokens): its target would be measured before the warmup ends; warm up over at "
                f"most a fraction of the smallest budget (the paper: 25%)")
        if schedule.warmup_tokens > WARMUP_SHARE_WARNING * s.tokens:
            log.warning("study: the warmup (%d tokens) is %.0f%% of the budget of %s; the paper warms up over 25%%",
                        schedule.warmup_tokens, 100 * schedule.warmup_tokens / s.tokens, s.name)


def _run(cfg: StudyConfig, group: list[Setting], batch: int, lr: float, beta2: float, seed: int, reference: bool,
         top: int, variant: Optional[Variant] = None) -> Run:
    hparams = variant.hparams if variant else cfg.hparams
    name = _stem(group[0].model_label, top, batch, lr)
    if hparams.beta2 and len(hparams.beta2) > 1:
        name += f"_beta2{beta2:g}"
    if len(cfg.seeds) > 1:
        name += f"_s{seed}"
    if variant is not None:
        name += f"_{variant.name}"
    # ewa_taus: [] trains without EWA weights (a variant's ablation); unset: the paper's tau for the batch
    taus = hparams.ewa_taus if hparams.ewa_taus is not None else [paper_value(PAPER_TAU, batch)]
    tokens = top if reference else int(cfg.max_tokens_factor * top)
    return Run(name, group, batch, lr, beta2, list(taus), seed, reference, tokens, variant=variant)


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
    base = run.variant.merged_base(cfg.base) if run.variant else cfg.base
    model = run.variant.model_of(run.settings[0].model) if run.variant else run.settings[0].model
    micro = min(run.batch, int(base.get("micro_batch_seqs") or 8))
    targets = [s.target for s in run.settings if s.target is not None]
    over = {
        "data_dir": str(data_dir), "run_dir": str(run_path(study_dir, run.name)),
        "model": to_dict(model), "global_batch_seqs": run.batch, "micro_batch_seqs": micro,
        "train_tokens": run.train_tokens, "seed": run.seed,
        "optimizer": {"lr": run.lr, "beta2": run.beta2}, "ewa": {"taus": run.taus},
        "targets": targets, "stop_at_targets": bool(targets) and not run.reference,
        "stop_weights": "ewa" if run.taus else "any",
        "study": {"name": cfg.name, "method": cfg.method.value, "reference": run.reference, "settings": [
            {"name": s.name, "model_params": model.non_embedding_params, "tokens": s.tokens, "target_loss": s.target}
            for s in run.settings]},
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
    taus0 = cfg.hparams.ewa_taus or [paper_value(PAPER_TAU, b0)]
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
                                             top if is_ref else int(cfg.max_tokens_factor * top))))
            name = f"m{group[0].model_label}_d{human(top)}_ramp{b0}-{top_batch}_lr{lr:g}"
            run = Run(name, group, b0, lr, ramp.beta2_at(b0, (cfg.hparams.beta2 or [0.0])[0]), list(taus0), seed,
                      False, int(cfg.max_tokens_factor * top))
            run.schedule = {"stages": stages_to_data(stages), "lr_scaling": ramp.lr_scaling.value,
                            "beta2": ramp.beta2.value}
            runs.append(_seeded(cfg, run))
    for r in runs:
        r.config = run_config(cfg, r, study_dir, data_dir)
    check_schedule(from_dict(PretrainConfig, json.loads(json.dumps(runs[0].config)), "study.base"), settings)
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
    beta2 = (cfg.hparams.beta2 or [paper_value(PAPER_BETA2, b0)])[0]
    taus = cfg.hparams.ewa_taus or [paper_value(PAPER_TAU, b0)]
    runs = []
    for s in settings:
        stem = _stem(s.model_label, s.tokens, b0, lr)
        base = Run(f"{stem}_base", [s], b0, lr, beta2, list(taus), seed, True, s.tokens)
        points = sorted({max(1, int(f * s.tokens)) for f in cfg.branched.at_fractions})
        base.config = run_config(cfg, base, study_dir, data_dir)
        base.config["checkpoint"] = {**base.config.get("checkpoint", {}), "at_tokens": points}
        runs.append(base)
        for tokens in points:
            runs += [_branch(cfg, base, f"{stem}_t{human(tokens)}_b{batch}", tokens, batch, study_dir, data_dir)
                     for batch in sorted(cfg.batch_sizes)]
    for r in runs:
        from_dict(PretrainConfig, json.loads(json.dumps(r.config)), f"study run {r.name}")
    check_schedule(from_dict(PretrainConfig, json.loads(json.dumps(runs[0].config)), "study.base"), settings)
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
              base.lr * LR_SCALE[cfg.branched.lr_scaling](k), base.beta2, taus, base.seed, False, delta)
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
        lines.append(f"  {r.name}: batch {batch}, lr {r.lr:g}, beta2 {r.beta2:g}, taus {r.taus}, "
                     f"{human(r.train_tokens)} tokens max, serves {', '.join(s.name for s in r.settings)}"
                     + (" [reference]" if r.reference else ""))
    return "\n".join(lines)
