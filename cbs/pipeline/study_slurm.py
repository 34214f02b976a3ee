"""The Slurm executor of a study: each phase as sbatch jobs (cbs/pipeline/executors.py has the interface).

preprocess job -> reference runs (an array, one task per run, `%max_parallel` throttle) -> [targets, set by the
study once those are done] -> the other runs (an array) -> evaluate job -> fit job. This process submits each
phase, waits for it and prints progress; it can be stopped and started again: finished runs are skipped,
requeued tasks resume from their checkpoints. Job logs go to STUDY_DIR/slurm/. With dry_run it prints the sbatch
commands (and the runs files) instead of submitting anything.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Optional

from cbs.pipeline import slurm
from cbs.pipeline.executors import JOBS, PROGRESS_EVERY_S, ExecutorError, RunJob, unfinished
from cbs.pipeline.progress import LogWatcher
from cbs.pipeline.utils import atomic_write_text
SCRIPTS = ("preprocess.sbatch", "pretrain.sbatch", "evaluate.sbatch", "fit.sbatch", "run_stage.sh")


def resources(fields: dict) -> slurm.SlurmResources:
    try:
        return slurm.SlurmResources(**fields)
    except TypeError as e:
        raise ExecutorError(f"study.slurm: {e} (known: partition, account, nodes, gpus_per_node, cpus_per_task, "
                            f"time, max_parallel, extra)") from None
    except slurm.SlurmError as e:
        raise ExecutorError(str(e)) from None


class SlurmExecutor:
    def __init__(self, name: str, study_dir: Path, fields: dict, dry_run: bool = False):
        odd = [c for c in ("%", "\n", "\r") if c in str(study_dir)]
        if odd:  # sbatch expands %j, %x, ... in the log paths it is given; a newline splits the runs file's lines
            raise ExecutorError(f"--out {str(study_dir)!r} contains {' and '.join(map(repr, odd))}, which Slurm "
                                f"jobs cannot take in a path; choose another --out for --executor slurm")
        try:
            slurm.require_sbatch()
        except slurm.SlurmError as e:
            raise ExecutorError(str(e)) from None
        self.name, self.study_dir, self.dry_run = name, study_dir, dry_run
        self.res = resources(fields)
        # preprocess, evaluate and fit need no GPU and one node
        self.cpu = slurm.SlurmResources(partition=self.res.partition, account=self.res.account, time=self.res.time,
                                        cpus_per_task=self.res.cpus_per_task, extra=list(self.res.extra))
        self.logs = study_dir / "slurm"
        if dry_run:
            print("sbatch commands (nothing is submitted):")

    # ------------------------------------------------------------------------------------------- one job

    def _submit(self, script: str, args: list[str], label: str, *, gpu: bool = False,
                array: Optional[str] = None) -> Optional[str]:
        try:
            out = slurm.submit(JOBS / script, args, self.res if gpu else self.cpu, job_name=f"{self.name}-{label}",
                               array=array, env={"CBS_JOBS_DIR": str(JOBS)}, log_dir=self.logs,
                               dry_run=self.dry_run)
        except slurm.SlurmError as e:
            raise ExecutorError(str(e)) from None
        if self.dry_run:
            print("  " + shlex.join(out))
            return None
        print(f"submitted {label}: job {out}", flush=True)
        return out

    def _wait(self, job_id: Optional[str], what: str, runs: Optional[list[RunJob]] = None) -> dict[str, str]:
        """Wait for a job, printing its tasks' states as they change and, for training `runs`, their progress."""
        if job_id is None:
            return {}
        last = [""]
        watcher = LogWatcher({j.name: j.run_dir for j in runs or []}, PROGRESS_EVERY_S, time.time())

        def progress() -> None:
            lines = watcher.poll(time.time())
            if lines:
                print("\n".join(lines), flush=True)

        def report(states: dict[str, str]) -> None:
            counts: dict[str, int] = {}
            for s in states.values():
                counts[s] = counts.get(s, 0) + 1
            line = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
            if line != last[0]:
                print(f"  {what}: {line}", flush=True)
                last[0] = line

        try:
            return slurm.wait([job_id], poll_s=2.0, on_update=report, on_poll=progress)
        except slurm.SlurmError as e:
            raise ExecutorError(str(e)) from None

    # ------------------------------------------------------------------------------------------- phases

    def preprocess(self, config: Path) -> None:
        job = self._submit("preprocess.sbatch", [str(config)], "preprocess")
        state = self._wait(job, "preprocess").get(job) if job else "COMPLETED"
        if state != "COMPLETED":
            raise ExecutorError(f"the preprocess job {job} ended {state}: see {self.logs}")

    def train(self, jobs: list[RunJob], name: str, label: str) -> None:
        todo = jobs if self.dry_run else unfinished(jobs)
        if not todo:
            return
        runs_file = self.study_dir / f"{name}.runs"
        lines = "".join(f"{j.config}\n" for j in todo)
        if self.dry_run:
            print(f"  # {runs_file}:\n" + "".join(f"  #   {line}\n" for line in lines.splitlines()))
        else:
            atomic_write_text(runs_file, lines)
        job = self._submit("pretrain.sbatch", [str(runs_file)], name, gpu=True, array=f"0-{len(todo) - 1}")
        self._wait(job, name, todo)

    def evaluate(self, run_dirs: list[Path]) -> None:
        if run_dirs:
            self._wait(self._submit("evaluate.sbatch", [str(p) for p in run_dirs], "evaluate"), "evaluate")

    def fit(self, study_dir: Path, out: Path, args: list[str]) -> int:
        job = self._submit("fit.sbatch", [str(study_dir), str(out), *args], "fit")
        if self.dry_run:
            for script in SCRIPTS:
                print(f"\n# ---- {JOBS / script}\n{(JOBS / script).read_text()}")
            return 0
        state = self._wait(job, "fit").get(job)
        print(f"fit job {job}: {state.lower() if state else '?'}", flush=True)
        return 0 if state == "COMPLETED" else 1
