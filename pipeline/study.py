"""study: a study YAML -> settings x batch sizes x hyper-parameters -> runs -> evaluate -> fit -> report.

`cbs study STUDY.yaml --out STUDY_DIR [--executor local|slurm] [--parallel N] [--dry-run] [--force]`

Phases (each skips what is already done, so re-running the command resumes a study):
1. data: preprocess (or an existing data directory);
2. reference runs (the paper's targets): the runs at B0 train each model to its largest budget, evaluating
   at every budget; a setting's target is their best EWA loss after its budget's tokens (targets.json);
3. the other runs: trained until every target of their model is reached (or max_tokens_factor x the largest
   budget): one sweep serves every data budget of a model (docs/method.md);
4. evaluate every finished run's last checkpoint (eval.json); 5. fit -> STUDY_DIR/fit/ (report.md, figures).

Layout: STUDY_DIR/study.yaml (the resolved study; another study's directory is refused), data/,
runs/<name>/{run.yaml (the run's input), config.yaml, metrics.jsonl, tb/, checkpoints/, result.json,
eval.json, pretrain.log}, targets.json, fit/.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline.config import (PAPER_BETA2, PAPER_TAU, ConfigError, ModelConfig, PreprocessConfig, StudyConfig,
                             from_dict, paper_value, to_dict)
from pipeline.utils import atomic_write_json, atomic_write_text

STUDY_FILE = "study.yaml"
TARGETS_FILE = "targets.json"
# S(B) from the EWA weights (the paper's choice; the best tau of each run), which is also what the study's runs
# stop on. Mixing in raw weights biases S(B): raw beats a slow EWA only in the few steps of large-batch runs.
FIT_ARGS = ["--target-kind", "ewa"]


class StudyError(ValueError):
    """The study cannot be planned or run as asked; the message says why and what to change."""


# ---------------------------------------------------------------------------------------------------- planning


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
            tokens = int(float(item["train_tokens"]))
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
        tokens = tokens if isinstance(tokens, list) else [tokens]
        return _checked([Setting(f"m{label}_d{human(float(t))}", model, label, int(float(t))) for t in tokens])
    models = raw.get("models") or []
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{p}.models must list model presets or field mappings")
    out = []
    for i, spec in enumerate(models):
        model, label = _model(spec, f"{p}.models[{i}]")
        if gen == "fixed_data":
            tokens = int(float(raw["tokens"]))
        else:
            tokens = int(float(raw.get("tokens_per_param", 20)) * model.non_embedding_params)
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


def _groups(cfg: StudyConfig, settings: list[Setting]) -> list[list[Setting]]:
    """Settings that one sweep of runs serves: all budgets of one model (one_sweep), else each alone."""
    if not cfg.one_sweep:
        return [[s] for s in settings]
    groups: dict[str, list[Setting]] = {}
    for s in settings:
        groups.setdefault(json.dumps(to_dict(s.model), sort_keys=True), []).append(s)
    return [sorted(g, key=lambda s: s.tokens) for g in groups.values()]


def plan(cfg: StudyConfig, study_dir: Path, data_dir: Path) -> list[Run]:
    settings = expand_settings(cfg.settings)
    if cfg.targets.losses:
        missing = [s.name for s in settings if s.name not in cfg.targets.losses and s.target is None]
        if missing:
            raise ConfigError(f"study.targets.losses has no loss for {', '.join(missing)}")
        for s in settings:
            s.target = s.target if s.target is not None else float(cfg.targets.losses[s.name])
    b0 = reference_batch(cfg)
    micro = cfg.base.get("micro_batch_seqs")
    if micro:
        bad = [b for b in cfg.batch_sizes if b % min(b, int(micro))]
        if bad:
            raise ConfigError(f"study.batch_sizes {bad} are not divisible by base.micro_batch_seqs ({micro}); "
                              f"use multiples of it (batches smaller than it use themselves as micro-batch)")
    runs = []
    for group in _groups(cfg, settings):
        top = group[-1].tokens
        for batch in sorted(cfg.batch_sizes):
            for lr in cfg.hparams.lr:
                for beta2 in cfg.hparams.beta2 or [paper_value(PAPER_BETA2, batch)]:
                    for seed in cfg.seeds:
                        runs.append(_run(cfg, group, batch, lr, beta2, seed, reference=batch == b0, top=top))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError("study: two runs get the same name; give settings distinct names")
    for r in runs:
        r.config = run_config(cfg, r, study_dir, data_dir)
    return runs


def _run(cfg: StudyConfig, group: list[Setting], batch: int, lr: float, beta2: float, seed: int, reference: bool,
         top: int) -> Run:
    label = group[0].model_label
    name = f"m{label}_d{human(top)}_b{batch}_lr{lr:g}"
    if cfg.hparams.beta2 and len(cfg.hparams.beta2) > 1:
        name += f"_beta2{beta2:g}"
    if len(cfg.seeds) > 1:
        name += f"_s{seed}"
    taus = cfg.hparams.ewa_taus or [paper_value(PAPER_TAU, batch)]
    tokens = top if reference else int(cfg.max_tokens_factor * top)
    return Run(name, group, batch, lr, beta2, list(taus), seed, reference, tokens)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_config(cfg: StudyConfig, run: Run, study_dir: Path, data_dir: Path) -> dict:
    """The pretrain config of one run: the study's base, then what the study decides for this run."""
    base = cfg.base
    micro = min(run.batch, int(base.get("micro_batch_seqs") or 8))
    targets = [s.target for s in run.settings if s.target is not None]
    over = {
        "data_dir": str(data_dir), "run_dir": str(study_dir / "runs" / run.name),
        "model": to_dict(run.settings[0].model), "global_batch_seqs": run.batch, "micro_batch_seqs": micro,
        "train_tokens": run.train_tokens, "seed": run.seed,
        "optimizer": {"lr": run.lr, "beta2": run.beta2}, "ewa": {"taus": run.taus},
        "targets": targets, "stop_at_targets": bool(targets) and not run.reference, "stop_weights": "ewa",
        "study": {"name": cfg.name, "reference": run.reference, "settings": [
            {"name": s.name, "model_params": s.model_params, "tokens": s.tokens, "target_loss": s.target}
            for s in run.settings]},
    }
    if run.reference:
        over["eval"] = {"at_tokens": [s.tokens for s in run.settings]}
    merged = _merge(base, over)
    if run.reference and base.get("eval", {}).get("at_tokens"):
        merged["eval"]["at_tokens"] = sorted(set(base["eval"]["at_tokens"]) | {s.tokens for s in run.settings})
    from pipeline.config import PretrainConfig

    from_dict(PretrainConfig, json.loads(json.dumps(merged)), f"study run {run.name}")  # every run validates now
    return merged


# ---------------------------------------------------------------------------------------------------- state


def run_dir(study_dir: Path, run: Run) -> Path:
    return study_dir / "runs" / run.name


def run_status(path: Path) -> str:
    """pending | started | completed | diverged | failed."""
    result = path / "result.json"
    if result.is_file():
        try:
            return json.loads(result.read_text()).get("status", "failed")
        except json.JSONDecodeError:
            return "failed"
    return "started" if (path / "metrics.jsonl").exists() else "pending"


def _study_fingerprint(cfg: StudyConfig) -> str:
    data = to_dict(cfg)
    data.pop("slurm", None)  # where it runs does not change what it measures
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def claim_study_dir(cfg: StudyConfig, study_dir: Path, force: bool) -> None:
    """A study directory holds one study: refuse another study's directory unless --force."""
    saved = study_dir / STUDY_FILE
    fingerprint = _study_fingerprint(cfg)
    if saved.is_file():
        old = yaml.safe_load(saved.read_text()) or {}
        if old.get("fingerprint") != fingerprint and not force:
            raise StudyError(f"{study_dir} holds another study ({old.get('name', '?')}, made from other settings); "
                             f"use --force to run this study there anyway (finished runs whose settings still "
                             f"match are kept), or choose another --out")
    elif study_dir.exists() and any(study_dir.iterdir()) and not force:
        raise StudyError(f"{study_dir} exists, is not empty and holds no {STUDY_FILE}: choose a new --out")
    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, yaml.safe_dump({"name": cfg.name, "fingerprint": fingerprint, "config": to_dict(cfg)},
                                            sort_keys=False))


def prepare_data(cfg: StudyConfig, study_dir: Path, force: bool = False) -> Path:
    if isinstance(cfg.data, str):
        path = Path(cfg.data)
        if not (path / "manifest.json").is_file():
            raise StudyError(f"study.data {path} is not a preprocessed data directory (no manifest.json)")
        return path
    if not isinstance(cfg.data, dict):
        raise ConfigError("study.data must be a preprocess config (mapping) or a data directory path")
    from pipeline import preprocess

    data = dict(cfg.data)
    data.setdefault("output_dir", str(study_dir / "data"))
    pre = from_dict(PreprocessConfig, data, "study.data")
    preprocess.main(pre)
    return Path(pre.output_dir)


def write_run_inputs(runs: list[Run], study_dir: Path) -> None:
    for run in runs:
        path = run_dir(study_dir, run)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "run.yaml", yaml.safe_dump(run.config, sort_keys=False))


# ---------------------------------------------------------------------------------------------------- targets


def _eval_records(path: Path) -> list[dict]:
    """The run's eval events, in order: each holds every weights kind's loss at one step."""
    from pipeline.metrics import read_metrics

    return [m for m in read_metrics(path) if "eval/loss" in m]


def targets_reached(result: dict) -> tuple[int, int]:
    """(targets reached by some weights, targets) of a result.json."""
    targets = result.get("targets") or []
    return sum(1 for t in targets if t.get("raw") or any((t.get("ewa") or {}).values())), len(targets)


def reference_targets(runs: list[Run], study_dir: Path) -> dict[str, float]:
    """Each setting's target: the best EWA eval loss (over the reference runs at B0 and their taus) at the first
    eval having seen the setting's tokens (pretrain evaluates exactly there: eval.at_tokens)."""
    from pipeline.pretrain import eval_key

    targets: dict[str, float] = {}
    for run in (r for r in runs if r.reference):
        path = run_dir(study_dir, run)
        if run_status(path) != "completed":
            continue
        records = _eval_records(path)
        keys = [eval_key(f"ewa/{tau}") for tau in run.taus] or [eval_key("raw")]
        for s in run.settings:
            at = next((m for m in records if m["tokens"] >= s.tokens), None)
            for loss in (at.get(k) for k in keys) if at else ():
                if loss is not None and math.isfinite(loss):
                    targets[s.name] = min(targets.get(s.name, math.inf), loss)
    return targets


def apply_targets(runs: list[Run], targets: dict[str, float], study_dir: Path, data_dir: Path,
                  cfg: StudyConfig) -> None:
    """Fill the targets into every run's config; the finished reference runs get their crossings from their own
    eval curves (they were trained before the targets existed)."""
    from pipeline.pretrain import TargetTracker, eval_key


    missing = sorted({s.name for r in runs for s in r.settings} - set(targets))
    if missing:
        raise StudyError(f"no finished reference run gives a target for {', '.join(missing)}: see "
                         f"{study_dir / 'runs'}/*/pretrain.log")
    for run in runs:
        for s in run.settings:
            s.target = targets[s.name]
        run.config = run_config(cfg, run, study_dir, data_dir)
    write_run_inputs(runs, study_dir)
    for run in (r for r in runs if r.reference and run_status(run_dir(study_dir, r)) in ("completed", "diverged")):
        path = run_dir(study_dir, run)  # diverged too: the fit reads every run's targets (it is censored there)
        kinds = ["raw"] + [f"ewa/{t}" for t in run.taus]
        tracker = TargetTracker([s.target for s in run.settings], kinds)
        tps = run.batch * run.settings[0].model.seq_len
        for m in _eval_records(path):
            tracker.update(m["step"], tps, {k: m[eval_key(k)] for k in kinds if eval_key(k) in m})
        result = json.loads((path / "result.json").read_text())
        result["targets"] = tracker.to_json()
        atomic_write_json(path / "result.json", result)
        saved = yaml.safe_load((path / "config.yaml").read_text())
        saved["study"] = run.config["study"]
        saved["targets"] = run.config["targets"]
        atomic_write_text(path / "config.yaml", yaml.safe_dump(saved, sort_keys=False))


# ---------------------------------------------------------------------------------------------------- local executor


def _python_env(threads: int) -> dict:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["OMP_NUM_THREADS"] = str(threads)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # each run is its own process group
    return env


def run_local(runs: list[Run], study_dir: Path, parallel: int, label: str) -> dict[str, str]:
    """Run pretrain for each run not finished yet, `parallel` processes at a time; keep going after failures."""
    todo = [r for r in runs if run_status(run_dir(study_dir, r)) not in ("completed", "diverged")]
    done = len(runs) - len(todo)
    if not todo:
        return {r.name: run_status(run_dir(study_dir, r)) for r in runs}
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // min(parallel, len(todo)))  # a lone run (the reference) gets every core
    print(f"{label}: {len(todo)} run(s) to train ({done} already finished), {parallel} at a time", flush=True)
    pending, active, durations = list(todo), {}, []
    started_all = time.time()
    while pending or active:
        while pending and len(active) < parallel:
            run = pending.pop(0)
            path = run_dir(study_dir, run)
            logf = open(path / "pretrain.log", "a")
            cmd = [sys.executable, "-m", "pipeline.cli", "pretrain", str(path / "run.yaml")]
            active[run.name] = (subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                                 env=_python_env(threads)), time.time(), logf, run)
        time.sleep(0.2)
        for name, (proc, t0, logf, run) in list(active.items()):
            if proc.poll() is None:
                continue
            logf.close()
            del active[name]
            durations.append(time.time() - t0)
            done += 1
            status = run_status(run_dir(study_dir, run))
            left = len(pending) + len(active)
            eta = sum(durations) / len(durations) * left / parallel
            print(f"  [{done}/{len(runs)}] {name}: {status} in {durations[-1]:.0f} s"
                  f"{_result_note(run_dir(study_dir, run))}; ETA {eta / 60:.1f} min", flush=True)
    print(f"{label}: done in {(time.time() - started_all) / 60:.1f} min", flush=True)
    return {r.name: run_status(run_dir(study_dir, r)) for r in runs}


def _result_note(path: Path) -> str:
    try:
        result = json.loads((path / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return f" (no result.json; see {path / 'pretrain.log'})"
    if result.get("status") == "failed":
        return f" ({result.get('reason', '')[:120]}; see {path / 'pretrain.log'})"
    reached, total = targets_reached(result)
    return f", {result.get('steps')} steps, targets {reached}/{total}"


def evaluate_local(runs: list[Run], study_dir: Path) -> None:
    """One process evaluates every finished run's last checkpoint (one start-up instead of one per run)."""
    paths = [str(run_dir(study_dir, r)) for r in runs
             if run_status(run_dir(study_dir, r)) == "completed" and not (run_dir(study_dir, r) / "eval.json").exists()]
    if not paths:
        return
    print(f"evaluate: {len(paths)} run(s)", flush=True)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "evaluate", *paths], env=_python_env(
        len(os.sched_getaffinity(0))), capture_output=True, text=True)
    if proc.returncode:
        print(f"evaluate: some runs could not be evaluated:\n{proc.stderr[-2000:]}", file=sys.stderr)


def fit(study_dir: Path, b0: Optional[int]) -> int:
    from analysis.cli import fit_main

    args = [str(study_dir), "--out", str(study_dir / "fit"), *FIT_ARGS]
    if b0:
        args += ["--reference-batch", str(b0)]
    return fit_main(args)


# ---------------------------------------------------------------------------------------------------- status


def status_table(study_dir: Path) -> str:
    runs = sorted(p for p in (Path(study_dir) / "runs").glob("*") if p.is_dir())
    if not runs:
        raise StudyError(f"{study_dir} has no runs/ (not a study directory, or not started)")
    rows = [("run", "batch", "lr", "status", "steps", "tokens", "targets")]
    counts: dict[str, int] = {}
    for path in runs:
        cfg = yaml.safe_load((path / "run.yaml").read_text()) if (path / "run.yaml").exists() else {}
        status = run_status(path)
        counts[status] = counts.get(status, 0) + 1
        steps = tokens = targets = ""
        if (path / "result.json").exists():
            result = json.loads((path / "result.json").read_text())
            steps, tokens = str(result.get("steps", "")), human(result.get("tokens") or 0)
            reached, total = targets_reached(result)
            targets = f"{reached}/{total}" if total else "-"
        rows.append((path.name, str(cfg.get("global_batch_seqs", "")), f"{cfg.get('optimizer', {}).get('lr', '')}",
                     status, steps, tokens, targets))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return "\n".join(lines + [f"{len(runs)} runs: {summary}"])


# ---------------------------------------------------------------------------------------------------- entry


def main(cfg: StudyConfig, study_dir: str | Path, executor: str = "local", parallel: int = 1, dry_run: bool = False,
         force: bool = False, slurm_overrides: Optional[dict] = None) -> int:
    study_dir = Path(study_dir).resolve()
    b0 = reference_batch(cfg)
    data_dir = Path(cfg.data).resolve() if isinstance(cfg.data, str) else \
        Path(cfg.data.get("output_dir") or study_dir / "data").resolve()
    runs = plan(cfg, study_dir, data_dir)
    if executor == "slurm":
        from pipeline import study_slurm

        study_slurm.check_executor()
    if dry_run:
        print(plan_table(cfg, runs, b0))
        if executor == "slurm":
            study_slurm.dry_run(cfg, runs, study_dir, data_dir, b0, slurm_overrides or {})
        return 0
    claim_study_dir(cfg, study_dir, force)
    if executor == "slurm":
        return study_slurm.run(cfg, runs, study_dir, data_dir, b0, slurm_overrides or {})
    started = time.time()
    data_dir = prepare_data(cfg, study_dir)
    write_run_inputs(runs, study_dir)
    if b0 is not None:
        refs = [r for r in runs if r.reference]
        run_local(refs, study_dir, parallel, f"reference runs (B0 = {b0})")
        targets = reference_targets(runs, study_dir)
        atomic_write_json(study_dir / TARGETS_FILE, targets)
        apply_targets(runs, targets, study_dir, data_dir, cfg)
        print("targets: " + ", ".join(f"{k} {v:.4f}" for k, v in targets.items()), flush=True)
    run_local([r for r in runs if not r.reference or b0 is None], study_dir, parallel, "runs")
    evaluate_local(runs, study_dir)
    rc = fit(study_dir, b0)
    print(f"study {cfg.name}: {len(runs)} runs in {(time.time() - started) / 60:.1f} min; "
          f"report: {study_dir / 'fit' / 'report.md'}", flush=True)
    return rc


def plan_table(cfg: StudyConfig, runs: list[Run], b0: Optional[int]) -> str:
    lines = [f"study {cfg.name}: {len(runs)} runs"
             + (f"; reference batch B0 = {b0} (targets from its runs)" if b0 else "; explicit targets")]
    for r in runs:
        lines.append(f"  {r.name}: batch {r.batch}, lr {r.lr:g}, beta2 {r.beta2:g}, taus {r.taus}, "
                     f"{human(r.train_tokens)} tokens max, serves {', '.join(s.name for s in r.settings)}"
                     + (" [reference]" if r.reference else ""))
    return "\n".join(lines)
