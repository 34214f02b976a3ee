"""The study's Slurm executor: the same phases as the local one, as sbatch jobs chained with dependencies.

preprocess job -> reference array (afterok) -> [targets, computed here once the reference runs are done] ->
run array (one task per run, `%max_parallel` throttle) -> evaluate job (afterany) -> fit job (afterany).
This process submits, waits where it must (for the reference runs, and to the end to report), and prints
progress; it can be stopped and started again: finished runs are skipped, requeued tasks resume from their
checkpoints. Job logs go to STUDY_DIR/slurm/.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Optional

import yaml

from pipeline import slurm
from pipeline.config import PreprocessConfig, StudyConfig, from_dict
from pipeline.study import (FIT_ARGS, TARGETS_FILE, Run, StudyError, apply_targets, reference_targets, run_dir, run_status,
                            write_run_inputs)
from pipeline.utils import atomic_write_json, atomic_write_text

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def check_executor() -> None:
    try:
        slurm.require_sbatch()
    except slurm.SlurmError as e:
        raise StudyError(str(e)) from None


def resources(cfg: StudyConfig, overrides: dict) -> slurm.SlurmResources:
    fields = {**cfg.slurm, **overrides}
    try:
        return slurm.SlurmResources(**fields)
    except TypeError as e:
        raise StudyError(f"study.slurm: {e} (known: partition, account, nodes, gpus_per_node, cpus_per_task, "
                         f"time, max_parallel, extra)") from None
    except slurm.SlurmError as e:
        raise StudyError(str(e)) from None


class Submitter:
    def __init__(self, cfg: StudyConfig, study_dir: Path, res: slurm.SlurmResources, dry_run: bool):
        self.cfg, self.study_dir, self.res, self.dry_run = cfg, study_dir, res, dry_run
        # preprocess, evaluate and fit need no GPU and one node
        self.cpu = slurm.SlurmResources(partition=res.partition, account=res.account, time=res.time,
                                        cpus_per_task=res.cpus_per_task, extra=list(res.extra))
        self.logs = study_dir / "slurm"

    def submit(self, script: str, args: list[str], name: str, *, gpu: bool = False, array: Optional[str] = None,
               dependency: Optional[str] = None) -> str:
        out = slurm.submit(JOBS / script, args, self.res if gpu else self.cpu, job_name=f"{self.cfg.name}-{name}",
                           array=array, dependency=dependency, env={"CBS_JOBS_DIR": str(JOBS)}, log_dir=self.logs,
                           dry_run=self.dry_run)
        if self.dry_run:
            print("  " + shlex.join(out))
            return f"<{name}>"
        print(f"submitted {name}: job {out}", flush=True)
        return out

    def runs_array(self, runs: list[Run], name: str, dependency: Optional[str]) -> Optional[str]:
        if not runs:
            return None
        runs_file = self.study_dir / f"{name}.runs"
        lines = "".join(str(run_dir(self.study_dir, r) / "run.yaml") + "\n" for r in runs)
        if self.dry_run:
            print(f"  # {runs_file}:\n" + "".join(f"  #   {line}\n" for line in lines.splitlines()))
        else:
            atomic_write_text(runs_file, lines)
        return self.submit("pretrain.sbatch", [str(runs_file)], name, gpu=True, array=f"0-{len(runs) - 1}",
                           dependency=dependency)


def _wait(job_ids: list[str], what: str) -> dict[str, str]:
    last = [""]

    def report(states: dict[str, str]) -> None:
        counts: dict[str, int] = {}
        for s in states.values():
            counts[s] = counts.get(s, 0) + 1
        line = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        if line != last[0]:
            print(f"  {what}: {line}", flush=True)
            last[0] = line

    return slurm.wait(job_ids, poll_s=2.0, on_update=report)


def _preprocess_job(sub: Submitter, data_dir: Path) -> Optional[str]:
    if not isinstance(sub.cfg.data, dict) or (data_dir / "manifest.json").is_file():
        return None
    data = {**sub.cfg.data, "output_dir": str(data_dir)}
    from_dict(PreprocessConfig, data, "study.data")
    path = sub.study_dir / "preprocess.yaml"
    if not sub.dry_run:
        atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return sub.submit("preprocess.sbatch", [str(path)], "preprocess")


def _tail(sub: Submitter, runs: list[Run], b0: Optional[int], dependency: Optional[str]) -> list[str]:
    """Run array, evaluate and fit, chained; returns their job ids."""
    todo = [r for r in runs if (not r.reference or b0 is None)
            and run_status(run_dir(sub.study_dir, r)) not in ("completed", "diverged")]
    array = sub.runs_array(todo, "runs", dependency)
    after = f"afterany:{array}" if array else dependency
    evaluate = sub.submit("evaluate.sbatch", [str(run_dir(sub.study_dir, r)) for r in runs], "evaluate",
                          dependency=after)
    fit_args = [str(sub.study_dir), str(sub.study_dir / "fit"), *FIT_ARGS] + \
        (["--reference-batch", str(b0)] if b0 else [])
    fit = sub.submit("fit.sbatch", fit_args, "fit", dependency=f"afterany:{evaluate}")
    return [j for j in (array, evaluate, fit) if j]


def dry_run(cfg: StudyConfig, runs: list[Run], study_dir: Path, data_dir: Path, b0: Optional[int],
            overrides: dict) -> None:
    sub = Submitter(cfg, study_dir, resources(cfg, overrides), dry_run=True)
    print("sbatch commands (nothing is submitted):")
    pre = _preprocess_job(sub, data_dir)
    dependency = f"afterok:{pre}" if pre else None
    if b0 is not None:
        sub.runs_array([r for r in runs if r.reference], "reference", dependency)
        print("  # ...then, once the reference runs are done, the targets are set and the rest submitted:")
        dependency = None
    _tail(sub, runs, b0, dependency)
    for script in ("preprocess.sbatch", "pretrain.sbatch", "evaluate.sbatch", "fit.sbatch", "run_stage.sh"):
        print(f"\n# ---- {JOBS / script}\n{(JOBS / script).read_text()}")


def run(cfg: StudyConfig, runs: list[Run], study_dir: Path, data_dir: Path, b0: Optional[int],
        overrides: dict) -> int:
    started = time.time()
    sub = Submitter(cfg, study_dir, resources(cfg, overrides), dry_run=False)
    write_run_inputs(runs, study_dir)
    try:
        pre = _preprocess_job(sub, data_dir)
        dependency = f"afterok:{pre}" if pre else None
        if b0 is not None:
            refs = [r for r in runs if r.reference and run_status(run_dir(study_dir, r)) not in
                    ("completed", "diverged")]
            ref_job = sub.runs_array(refs, "reference", dependency)
            waiting = [j for j in (pre, ref_job) if j]
            if waiting:
                states = _wait(waiting, "preprocess + reference runs")
                if pre and states.get(pre) != "COMPLETED":
                    raise StudyError(f"the preprocess job {pre} ended {states.get(pre)}: see {sub.logs}")
            targets = reference_targets(runs, study_dir)
            atomic_write_json(study_dir / TARGETS_FILE, targets)
            apply_targets(runs, targets, study_dir, data_dir, cfg)
            print("targets: " + ", ".join(f"{k} {v:.4f}" for k, v in targets.items()), flush=True)
            dependency = None
        jobs = _tail(sub, runs, b0, dependency)
        states = _wait(jobs, "runs, evaluate, fit")
    except slurm.SlurmError as e:
        raise StudyError(str(e)) from None
    fit_state = states.get(jobs[-1])
    print(f"study {cfg.name}: {len(runs)} runs in {(time.time() - started) / 60:.1f} min on Slurm; fit job "
          f"{fit_state.lower() if fit_state else '?'}; report: {study_dir / 'fit' / 'report.md'}", flush=True)
    return 0 if fit_state == "COMPLETED" else 1
