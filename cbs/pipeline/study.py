"""study: the phases of a CBS study, written once, driven through an executor (local or Slurm).

`cbs study STUDY.yaml --out STUDY_DIR [--executor local|slurm] [--parallel N] [--gpus-per-run K] [--dry-run]
[--force]`

Phases (each skips what is already done, so re-running the command resumes a study):
1. data: preprocess (or an existing data directory);
2. reference runs (the paper's targets): the runs at B0 train each model to its largest budget, evaluating
   at every budget;
3. targets: a setting's target is the reference runs' best EWA loss after its budget's tokens. Once every
   setting has one they are frozen in targets.json: a later invocation never changes them;
4. the other runs: trained until every target of their model is reached (or max_tokens_factor x the largest
   budget): one sweep serves every data budget of a model (docs/method.md, "Target loss");
5. evaluate every finished run's last checkpoint (eval.json); 6. fit -> STUDY_DIR/fit/ (report.md, figures).
method branched: the base runs, then the branches in waves by batch, none that the study's branch rule calls not
needed (`train_branches`), then fit.
A finished run whose recorded crossings are not those of the frozen targets has them recomputed from its logged
eval curve, never reused by position.

Layout: STUDY_DIR/study.yaml (the resolved study; another study's directory is refused), data/, runs/<name>/
{run.yaml (the run's input), config.yaml, metrics.jsonl, tb/, checkpoints/, result.json, eval.json,
pretrain.log}, targets.json, fit/, stale/ (runs set aside by --force because their settings changed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import yaml

from cbs.analysis import InputError
from cbs.analysis.branched import NOT_NEEDED, UNFINISHED, cbs_curve, is_branched, read_branched
from cbs.pipeline import progress, rundir
from cbs.pipeline.config import (ConfigError, PreprocessConfig, PretrainConfig, StudyConfig, StudyMethod, from_dict,
                                 to_dict)
from cbs.pipeline.executors import (PROGRESS_EVERY_S, Executor, ExecutorError, LocalExecutor, RunJob, read_result,
                                    run_status)
from cbs.pipeline.metrics import eval_records
from cbs.pipeline.study_plan import Run, human, plan, plan_table, reference_batch, run_config, run_path
from cbs.pipeline.study_slurm import SlurmExecutor
from cbs.pipeline.targets import TargetTracker, crossings_match, eval_key, targets_reached, weight_kinds
from cbs.runfiles import (DATA, FIT, LOG, MANIFEST, PREPROCESS_FILE, RUN_INPUT, RUNS, SETTLED, STALE, STALE_RESULT,
                          STUDY_FILE, TARGETS_FILE, Status, atomic_write_json, atomic_write_text)

# S(B) from the EWA weights (the paper's choice; the best tau of each run), which is also what the study's runs
# stop on. Mixing in raw weights biases S(B): raw beats a slow EWA only in the few steps of large-batch runs.
FIT_ARGS = ["--target-kind", "ewa"]
NOT_JUDGED = (Status.PENDING, Status.STARTED, Status.PREEMPTED)
"""A branch in one of these has no outcome yet: the branch rule cannot judge it."""


class StudyError(ValueError):
    """The study cannot be planned or run as asked; the message says why and what to change."""


# ---------------------------------------------------------------------------------------------------- the directory


def _study_fingerprint(cfg: StudyConfig) -> str:
    data = to_dict(cfg)
    data.pop("slurm", None)  # where it runs does not change what it measures
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _same_study(saved_config, fingerprint: str) -> bool:
    """Whether a study.yaml written by an earlier cbs holds this study: its config read by this cbs (keys added
    since then take their defaults) has this fingerprint. Without it, every new key with a default would make a
    study made before it "another study", and its re-run (which should resume) would be refused."""
    try:
        return _study_fingerprint(from_dict(StudyConfig, saved_config, "study")) == fingerprint
    except (ConfigError, TypeError, ValueError, AttributeError):
        return False


def claim_study_dir(cfg: StudyConfig, study_dir: Path, force: bool) -> None:
    """A study directory holds one study: refuse another study's directory unless --force."""
    saved = study_dir / STUDY_FILE
    fingerprint = _study_fingerprint(cfg)
    if saved.is_file():
        old = yaml.safe_load(saved.read_text()) or {}
        if old.get("fingerprint") != fingerprint and not force and not _same_study(old.get("config"), fingerprint):
            raise StudyError(f"{study_dir} holds another study ({old.get('name', '?')}, made from other settings); "
                             f"use --force to run this study there anyway (finished runs whose settings still "
                             f"match are kept, the others moved to {study_dir / STALE}), or choose another --out")
    elif study_dir.exists() and any(study_dir.iterdir()) and not force:
        raise StudyError(f"{study_dir} exists, is not empty and holds no {STUDY_FILE}: choose a new --out")
    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, yaml.safe_dump({"name": cfg.name, "fingerprint": fingerprint, "config": to_dict(cfg)},
                                            sort_keys=False))


def data_dir_of(cfg: StudyConfig, study_dir: Path) -> Path:
    if isinstance(cfg.data, str):
        return Path(cfg.data).resolve()
    if not isinstance(cfg.data, dict):
        raise ConfigError("study.data must be a preprocess config (mapping) or a data directory path")
    return Path(cfg.data.get("output_dir") or study_dir / DATA).resolve()


def preprocess_config(cfg: StudyConfig, study_dir: Path, data_dir: Path, write: bool) -> Optional[Path]:
    """STUDY_DIR/preprocess.yaml for a study that makes its data (`run_phases` runs it only if the data is not
    there yet; a dry run shows it); None when study.data names a preprocessed directory."""
    if isinstance(cfg.data, str):
        if not (data_dir / MANIFEST).is_file():
            raise StudyError(f"study.data {data_dir} is not a preprocessed data directory (no {MANIFEST}): run "
                             f"`cbs preprocess` first and give its output_dir, or make study.data a preprocess "
                             f"config (mapping) for the study to run it")
        return None
    data = {**cfg.data, "output_dir": str(data_dir)}
    from_dict(PreprocessConfig, data, "study.data")  # refused now, before anything is submitted
    path = study_dir / PREPROCESS_FILE
    if write:
        atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def write_run_inputs(runs: list[Run], study_dir: Path) -> None:
    for run in runs:
        path = run_path(study_dir, run.name)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / RUN_INPUT, yaml.safe_dump(run.config, sort_keys=False))


def jobs_of(runs: list[Run], study_dir: Path) -> list[RunJob]:
    return [RunJob(r.name, run_path(study_dir, r.name), run_path(study_dir, r.name) / RUN_INPUT) for r in runs]


def stale_runs(runs: list[Run], study_dir: Path) -> dict[str, list[str]]:
    """Runs whose directory holds a run with other settings than the plan's: {name: the keys that differ}."""
    stale = {}
    for run in runs:
        saved = run_path(study_dir, run.name) / rundir.CONFIG
        if saved.is_file():
            new = to_dict(from_dict(PretrainConfig, json.loads(json.dumps(run.config)), f"study run {run.name}"))
            changed = rundir.changed_settings(yaml.safe_load(saved.read_text()) or {}, new)
            if changed:
                stale[run.name] = changed
    return stale


def set_aside_stale(runs: list[Run], study_dir: Path, force: bool) -> None:
    """Keep finished work only where it still measures what the plan asks; move the rest to STUDY_DIR/stale/."""
    stale = stale_runs(runs, study_dir)
    if not stale:
        return
    listing = "; ".join(f"{name} ({', '.join(keys)} differ)" for name, keys in stale.items())
    if not force:
        raise StudyError(f"{study_dir}: run directories hold runs with other settings than this study's: "
                         f"{listing}; use --force to move them to {study_dir / STALE} and train them again")
    for name in stale:
        target = study_dir / STALE / name
        n = 1
        while target.exists():
            n += 1
            target = study_dir / STALE / f"{name}.{n}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(run_path(study_dir, name), target)
        print(f"--force: {name} has other settings ({', '.join(stale[name])}); moved to {target}", flush=True)


# ---------------------------------------------------------------------------------------------------- targets


def _frozen(study_dir: Path) -> dict[str, dict]:
    """targets.json: {setting: {"loss": L, "run": the reference run it came from}}."""
    path = study_dir / TARGETS_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {k: v if isinstance(v, dict) else {"loss": v, "run": None} for k, v in data.items()}


def reference_targets(runs: list[Run], study_dir: Path) -> dict[str, dict]:
    """Each setting's target: the best EWA eval loss (over the reference runs at B0 and their taus) at the first
    eval having seen the setting's tokens (pretrain evaluates exactly there: eval.at_tokens). With study.horizons
    the reference runs are those at B0 of horizon 1, whose schedule ends at exactly D: that eval is their last,
    the final loss that the fit compares every horizon run's final loss with (docs/method.md, "Decaying
    schedules")."""
    targets: dict[str, dict] = {}
    for run in (r for r in runs if r.reference):
        path = run_path(study_dir, run.name)
        if run_status(path) != Status.COMPLETED:
            continue
        records = eval_records(path)
        keys = [eval_key(k) for k in weight_kinds(run.taus)[1:]] or [eval_key("raw")]  # the EWA kinds, else raw
        for s in run.settings:
            at = next((m for m in records if m["tokens"] >= s.tokens), None)
            for loss in (at.get(k) for k in keys) if at else ():
                if loss is not None and math.isfinite(loss) and loss < targets.get(s.name, {}).get("loss", math.inf):
                    targets[s.name] = {"loss": loss, "run": run.name}
    return targets


def freeze_targets(runs: list[Run], study_dir: Path) -> dict[str, float]:
    """The targets of every setting: the frozen ones, plus those computed now for settings without one
    (written once every setting has one; a target whose reference run was set aside as stale is dropped)."""
    settings = sorted({s.name for r in runs for s in r.settings})
    frozen = {k: v for k, v in _frozen(study_dir).items()
              if k in settings and (v["run"] is None or run_path(study_dir, v["run"]).is_dir())}
    missing = [s for s in settings if s not in frozen]
    if missing:
        computed = reference_targets(runs, study_dir)
        frozen.update({k: computed[k] for k in missing if k in computed})
        still = [s for s in settings if s not in frozen]
        if still:
            raise StudyError(f"no finished reference run gives a target for {', '.join(still)}: see "
                             f"{study_dir / RUNS}/*/{LOG}, then run the study again")
        atomic_write_json(study_dir / TARGETS_FILE, frozen)
    return {k: frozen[k]["loss"] for k in settings}


def apply_targets(runs: list[Run], targets: dict[str, float], study_dir: Path, data_dir: Path,
                  cfg: StudyConfig) -> None:
    """Fill the targets into every run's config and run.yaml."""
    for run in runs:
        for s in run.settings:
            s.target = targets[s.name]
        run.config = run_config(cfg, run, study_dir, data_dir)
    write_run_inputs(runs, study_dir)


def reconcile_finished(runs: list[Run], study_dir: Path) -> None:
    """A finished run whose result.json holds crossings of other targets than its config's (the reference runs,
    trained before the targets existed; any run after --force) gets them recomputed from its eval curve. One that
    stopped early at the old targets without reaching the new ones is reopened (result.json moved to
    result.stale.json), so that the run phase trains it on from its last checkpoint."""
    for run in runs:
        path = run_path(study_dir, run.name)
        targets = run.config["targets"]
        result = read_result(path)
        if run_status(path, result) not in SETTLED or not targets:
            continue
        if crossings_match(result, targets):
            continue
        saved = yaml.safe_load((path / rundir.CONFIG).read_text())
        tracker = TargetTracker(targets, weight_kinds(run.taus))
        tracker.replay(eval_records(path), saved["resolved"]["tokens_per_step"])
        result["targets"] = tracker.to_json()
        saved["study"], saved["targets"] = run.config["study"], targets
        atomic_write_text(path / rundir.CONFIG, yaml.safe_dump(saved, sort_keys=False))
        stopped_early = result.get("reason") == "every target reached" and result["steps"] < result["total_steps"]
        if stopped_early and not tracker.all_reached(run.config["stop_weights"]):
            atomic_write_json(path / STALE_RESULT, result)
            (path / rundir.RESULT).unlink()
            print(f"{run.name}: the targets changed since it stopped; it will train on", flush=True)
        else:
            atomic_write_json(path / rundir.RESULT, result)


# ---------------------------------------------------------------------------------------------------- phases


def run_phases(cfg: StudyConfig, runs: list[Run], study_dir: Path, data_dir: Path, executor: Executor,
               dry_run: bool = False) -> int:
    """data -> reference runs -> targets -> runs -> evaluate -> fit, through `executor`. Returns fit's code."""
    b0 = reference_batch(cfg)
    pre = preprocess_config(cfg, study_dir, data_dir, write=not dry_run)
    if pre is not None and (dry_run or not (data_dir / MANIFEST).is_file()):
        executor.preprocess(pre)
    if not dry_run:
        write_run_inputs(runs, study_dir)
    refs, rest = [r for r in runs if r.reference], [r for r in runs if not r.reference]
    if cfg.method is StudyMethod.branched:  # the base runs (marked reference), then the branches that are needed
        executor.train(jobs_of(refs, study_dir), "base", f"base runs (B = {min(cfg.batch_sizes)})")
        train_branches(rest, study_dir, executor, dry_run)
        return executor.fit(study_dir, study_dir / FIT, [])
    if refs:  # only a study with a reference batch B0 has them
        executor.train(jobs_of(refs, study_dir), "reference", f"reference runs (B0 = {b0})")
        if dry_run:
            print("  # ...then, once the reference runs are done, the targets are set and the rest submitted:")
        else:
            targets = freeze_targets(runs, study_dir)
            apply_targets(runs, targets, study_dir, data_dir, cfg)
            print("targets: " + ", ".join(f"{k} {v:.4f}" for k, v in targets.items()), flush=True)
    if not dry_run:
        reconcile_finished(runs, study_dir)
    executor.train(jobs_of(rest, study_dir), "runs", "runs")
    todo = [run_path(study_dir, r.name) for r in runs]
    if not dry_run:
        todo = [p for p in todo if run_status(p) == Status.COMPLETED and not (p / rundir.EVAL).exists()]
    executor.evaluate(todo)
    # runs without EWA weights (schedule-free: x already is an average) are read at their raw weights by the fit
    return executor.fit(study_dir, study_dir / FIT, FIT_ARGS + (["--reference-batch", str(b0)] if b0 else []))


# ---------------------------------------------------------------------------------------------------- branches


def next_branches(branches: list[Run], study_dir: Path) -> list[Run]:
    """The branches to train next: at every branch point whose pass/fail chain is still open, the first branch
    not yet judged, in batch order (docs/method.md, "Branched local CBS"). A branch after the first failing
    batch of its point is never needed (its verdict cannot change CBS(t)), so it is never returned.

    Judged by cbs/analysis/branched.py on what the finished branches left, with the loss the fit compares, so that
    the study trains exactly the branches the fit reads."""
    judged = [r for r in branches if run_status(run_path(study_dir, r.name)) not in NOT_JUDGED]
    if not judged:  # nothing to judge yet: the smallest batch of every point
        first: dict[tuple, Run] = {}
        for r in branches:
            key = (r.branch["setting"], r.branch["base_tokens"])
            if key not in first or r.batch < first[key].batch:
                first[key] = r
        return list(first.values())
    try:
        curve = cbs_curve(read_branched(study_dir))
    except InputError as e:
        raise StudyError(f"the branches cannot be judged: {e}") from None
    wanted = {v.run for point in curve for v in point.verdicts if v.verdict == UNFINISHED}
    return [r for r in branches if r.name in wanted]


def train_branches(branches: list[Run], study_dir: Path, executor: Executor, dry_run: bool) -> None:
    """Train the branches in waves, one batch of every open branch point per wave, until the study's branch rule
    has judged every point (docs/method.md, "Branched local CBS"). Under the relative rule a point ends at its
    first failing batch, and a sweep of every branch would train the batches above it for nothing (12 of the 20
    branches of configs/demo_branched.yaml with rule: relative); under the absolute rule only a branch that
    cannot train ends a point. Waves cost parallelism only between points, never within one."""
    tried: set[str] = set()
    wave = 1
    while True:
        todo = [r for r in next_branches(branches, study_dir) if r.name not in tried]  # a crash is not retried
        if not todo:
            break
        tried |= {r.name for r in todo}
        batches = ", ".join(str(b) for b in sorted({r.batch for r in todo}))
        executor.train(jobs_of(todo, study_dir), f"branches{wave}",
                       f"branches, wave {wave} (batch {batches}, {len(todo)} branch point(s) still open)")
        if dry_run:
            print("  # ...then, wave after wave, the next batch of every branch point whose losses still pass "
                  "(none that the branch rule calls not needed)")
            return
        wave += 1
    skipped = not_needed(study_dir)
    if skipped:
        print(f"branches: {len(skipped)} of {len(branches)} not trained (not needed: by the study's branch rule "
              f"none can change CBS(t))", flush=True)


def not_needed(study_dir: Path) -> set[str]:
    """The branches of a branched study never trained because their point's verdicts end at a smaller batch."""
    try:
        if not is_branched(study_dir):
            return set()
        curve = cbs_curve(read_branched(study_dir))
    except InputError:  # nothing finished yet, or a damaged run file: the caller names it with its own message
        return set()
    return {v.run for point in curve if point.complete for v in point.verdicts  # incomplete: they may be needed
            if v.verdict == NOT_NEEDED and run_status(run_path(study_dir, v.run)) == Status.PENDING}


def run_ranks(cfg: StudyConfig, executor: str, gpus_per_run: int, slurm_overrides: Optional[dict]) -> tuple[int, str]:
    """The data-parallel ranks each training run gets (so that the plan refuses a batch that would not split on
    them), and where that number comes from: --gpus-per-run locally, nodes x gpus_per_node under Slurm."""
    if executor == "slurm":
        fields = cfg.slurm.fields(slurm_overrides)
        nodes, gpus = fields.get("nodes") or 1, fields.get("gpus_per_node") or 0
        return max(nodes, 1) * max(gpus, 1), f"slurm nodes {nodes} x gpus_per_node {gpus}"
    return max(gpus_per_run, 1), f"--gpus-per-run {gpus_per_run}"  # < 1: the executor names it


def make_executor(cfg: StudyConfig, study_dir: Path, executor: str, parallel: Optional[int], gpus_per_run: int,
                  dry_run: bool, slurm_overrides: Optional[dict], progress_every_s: float) -> Executor:
    try:
        if executor == "slurm":
            return SlurmExecutor(cfg.name, study_dir, cfg.slurm.fields(slurm_overrides), dry_run)
        return LocalExecutor(parallel, gpus_per_run, progress_every_s=progress_every_s)
    except ExecutorError as e:
        raise StudyError(str(e)) from None


def main(cfg: StudyConfig, study_dir: str | Path, executor: str = "local", parallel: Optional[int] = None,
         dry_run: bool = False, force: bool = False, slurm_overrides: Optional[dict] = None,
         gpus_per_run: int = 1, progress_every_s: Optional[float] = None) -> int:
    study_dir = Path(study_dir).resolve()
    data_dir = data_dir_of(cfg, study_dir)
    runs = plan(cfg, study_dir, data_dir, *run_ranks(cfg, executor, gpus_per_run, slurm_overrides))
    every_s = PROGRESS_EVERY_S if progress_every_s is None else progress_every_s
    ex = make_executor(cfg, study_dir, executor, parallel, gpus_per_run, dry_run, slurm_overrides, every_s)
    if dry_run:
        print(plan_table(cfg, runs, reference_batch(cfg)))
        if executor == "slurm":
            run_phases(cfg, runs, study_dir, data_dir, ex, dry_run=True)
        return 0
    preprocess_config(cfg, study_dir, data_dir, write=False)  # a missing data directory: refused before study.yaml
    claim_study_dir(cfg, study_dir, force)
    set_aside_stale(runs, study_dir, force)
    started = time.time()
    if executor == "local":
        print(f"study {cfg.name}: {len(runs)} runs, {ex.describe()}", flush=True)
    rc = run_phases(cfg, runs, study_dir, data_dir, ex)
    print(f"study {cfg.name}: {len(runs)} runs in {(time.time() - started) / 60:.1f} min; "
          f"report: {study_dir / FIT / 'report.md'}", flush=True)
    return rc


# ---------------------------------------------------------------------------------------------------- status


def status_table(study_dir: Path) -> str:
    """One line per run, in batch order (then learning rate, then name): batch, lr, status, steps, targets."""
    paths = [p for p in (Path(study_dir) / RUNS).glob("*") if p.is_dir()]
    if not paths:
        raise StudyError(f"{study_dir} has no runs/ (not a study directory, or not started)")
    rows, counts, skipped = [], {}, not_needed(Path(study_dir))
    for path in paths:
        cfg = _readable_run(path)
        result = read_result(path)
        status = NOT_NEEDED if path.name in skipped else run_status(path, result)
        counts[status] = counts.get(status, 0) + 1
        steps = tokens = targets = ""
        if result is not None:
            steps, tokens = str(result.get("steps", "")), human(result.get("tokens") or 0)
            reached, total = targets_reached(result)
            targets = f"{reached}/{total}" if total else "-"
        elif (snap := progress.snapshot(path)) is not None:  # running (or stopped): what it has logged so far
            steps, tokens = f"{snap.step}/{snap.total_steps or '?'}", human(snap.tokens)
        (batch, batch_text), lr = _batch_of(cfg), (cfg.get("optimizer") or {}).get("lr") or 0
        rows.append(((batch, lr, path.name), (path.name, batch_text, f"{lr:g}" if lr else "", status, steps,
                                              tokens, targets)))
    table = [("run", "batch", "lr", "status", "steps", "tokens", "targets")] + [r for _, r in sorted(rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in table]
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return "\n".join(lines + [f"{len(paths)} runs: {summary}"])


def _batch_of(cfg: dict) -> tuple[int, str]:
    """A run's batch for the status table, from its run.yaml: (first batch to sort by, text). A batch ramp shows
    its stages, `8->16->32` (or its ladder, `8..32 adaptive`); a ramp from a file shows `file`."""
    if cfg.get("global_batch_seqs"):
        return cfg["global_batch_seqs"], str(cfg["global_batch_seqs"])
    schedule = cfg.get("batch_schedule")
    if isinstance(schedule, list):
        schedule = {"stages": schedule}
    if not isinstance(schedule, dict):
        return 0, "file" if schedule else ""
    stages = [s.get("batch") for s in schedule.get("stages") or [] if isinstance(s, dict)]
    if stages and all(isinstance(b, int) for b in stages):
        return stages[0], "->".join(map(str, stages))
    ladder = schedule.get("ladder") or []
    if ladder and all(isinstance(b, int) for b in ladder):
        return ladder[0], f"{ladder[0]}..{ladder[-1]} adaptive"
    return 0, "file" if schedule.get("file") else ""


def _readable_run(path: Path) -> dict:
    """run.yaml of a run directory (empty if not written yet), after checking that it and result.json parse: a
    damaged one is named with its fix (exit 2), not shown as a traceback or as a run that failed."""
    result = path / rundir.RESULT
    try:
        if result.exists():
            json.loads(result.read_bytes())
    except (ValueError, OSError) as e:
        raise StudyError(f"{result} cannot be read ({str(e).splitlines()[0]}): run the study command again; the run "
                         f"resumes from its newest checkpoint and writes it again") from None
    run_yaml = path / RUN_INPUT
    try:
        cfg = yaml.safe_load(run_yaml.read_bytes()) if run_yaml.exists() else {}
    except (yaml.YAMLError, OSError) as e:
        raise StudyError(f"{run_yaml} cannot be read ({str(e).splitlines()[0]}): run the study command again, "
                         f"which writes every run.yaml from the study config") from None
    if not isinstance(cfg, dict):
        raise StudyError(f"{run_yaml} is not a mapping of settings: run the study command again, which writes "
                         f"every run.yaml from the study config")
    return cfg
