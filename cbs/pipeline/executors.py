"""How a study's phases run: the Executor interface and the local executor (the Slurm one: study_slurm.py).

The study (cbs/pipeline/study.py) decides *what* runs in which order: data, the reference runs, the targets, the
other runs, evaluate, fit. An executor decides *how*: here, subprocesses on this machine; on Slurm, sbatch jobs.
Each method blocks until its phase is over; the outcome is read from the run directories, not returned, so a
study re-run after a crash sees the same state as one that never stopped.

Devices (local): each parallel run gets a slot, a fixed set of `gpus_per_run` GPUs (CUDA_VISIBLE_DEVICES
partitioned among the slots), or the CPU where the machine has no GPU. A run on K > 1 GPUs is launched with
torchrun. The CPU accelerator is forced only where there is no GPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

from cbs import runfiles
from cbs.pipeline import rundir
from cbs.pipeline.progress import RunWatch, study_eta_s
from cbs.pipeline.slurm import RENDEZVOUS
from cbs.pipeline.targets import targets_reached
from cbs.pipeline.utils import free_port
from cbs.runfiles import SETTLED, Status

JOBS = Path(__file__).resolve().parents[2] / "jobs"
PROGRESS_EVERY_S = 20.0
"""How often the study prints the progress of its running runs: often enough to show it is alive, rarely enough
to stay readable (a run logs a line per log.every_steps to its own pretrain.log)."""
RUN_STAGE = JOBS / "run_stage.sh"


class ExecutorError(ValueError):
    """The executor cannot run as asked (devices, resources, missing Slurm); the message says what to change."""


class StudyInterrupted(RuntimeError):
    """SIGTERM/SIGINT reached the study: its running runs were asked to checkpoint, and did."""


@dataclass(frozen=True)
class RunJob:
    """One pretrain run to train: its name, run directory and config file (STUDY_DIR/runs/<name>/run.yaml)."""

    name: str
    run_dir: Path
    config: Path


class Executor(Protocol):
    def preprocess(self, config: Path) -> None:
        """Make the study's data from a preprocess config file."""

    def train(self, jobs: list[RunJob], name: str, label: str) -> None:
        """Train every job that is not finished; return once none is running. `name` is a word for files and
        job names (`reference`, `runs`); `label` says what the jobs are to a reader."""

    def evaluate(self, run_dirs: list[Path]) -> None:
        """Evaluate the last checkpoint of each run (writes RUN_DIR/eval.json)."""

    def fit(self, study_dir: Path, out: Path, args: list[str]) -> int:
        """`cbs fit STUDY_DIR --out OUT ARGS`; returns its exit code."""


def read_result(path: Path) -> Optional[dict]:
    """A run directory's result.json; None if there is none yet. One that cannot be read (cut short, edited) is
    a failed run's: {"status": "failed", "reason": ...}."""
    try:
        return runfiles.read_result(path)
    except runfiles.RunFileError as e:
        return {"status": Status.FAILED, "reason": str(e)}


def run_status(path: Path, result: Optional[dict] = None) -> str:
    """A Status from a run directory (or its `result`, already read with read_result): result.json's, else
    STARTED once metrics.jsonl exists, else PENDING. A result.json without one is a failed run's; one with a
    status cbs does not write is returned as it is."""
    result = result if result is not None else read_result(path)
    if result is not None:
        return result.get("status", Status.FAILED)
    return Status.STARTED if (path / runfiles.METRICS).exists() else Status.PENDING


def unfinished(jobs: list[RunJob]) -> list[RunJob]:
    """The jobs whose run is not SETTLED: never started, stopped, preempted or failed (trained again)."""
    return [j for j in jobs if run_status(j.run_dir) not in SETTLED]


def result_note(path: Path, result: Optional[dict]) -> str:
    """`, 120 steps, targets 2/2` or `(why it failed; see pretrain.log)`: one line of progress from read_result."""
    if result is None:
        return f" (no {runfiles.RESULT}; see {path / runfiles.LOG})"
    if result.get("status") == Status.FAILED:
        return f" ({result.get('reason', '')[:120]}; see {path / runfiles.LOG})"
    reached, total = targets_reached(result)
    if total:
        return f", {result.get('steps')} steps, targets {reached}/{total}"
    loss = (result.get("final") or {}).get(runfiles.EVAL_LOSS)  # a run without targets (a branch): its final loss
    return f", {result.get('steps')} steps" + (f", final eval loss {loss:.4f}" if isinstance(loss, float) else "")


def stopped_summary(jobs: list[RunJob]) -> str:
    """What the runs that were running when the study was stopped kept: only checkpoints that exist are claimed."""
    if not jobs:
        return "no run was running"
    kept = [j.name for j in jobs if rundir.usable_tags(j.run_dir)[0]]
    lost = [j.name for j in jobs if j.name not in kept]
    parts = [f"{len(kept)} of {len(jobs)} running run(s) have a checkpoint to continue from"]
    if lost:
        parts.append(f"{', '.join(lost)} had saved none (stopped before their first checkpoint) and will start "
                     f"over")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class Slot:
    """Where one run at a time trains: a set of GPU ids (as CUDA_VISIBLE_DEVICES names them), or none (CPU)."""

    index: int
    gpus: tuple[str, ...] = ()


def visible_gpus(env: Optional[dict] = None) -> list[str]:
    """The GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else every GPU `nvidia-smi -L` lists."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")] \
        if out.returncode == 0 else []


def device_slots(parallel: Optional[int], gpus_per_run: int, gpus: list[str]) -> list[Slot]:
    """Partition the GPUs among parallel runs: slot i gets gpus[i K : (i + 1) K]. Without GPUs: `parallel`
    CPU slots (default 1). With GPUs, `parallel` defaults to len(gpus) // K; it may exceed that only for K = 1,
    where runs then share GPUs round-robin (slot i on gpus[i mod len(gpus)])."""
    if gpus_per_run < 1:
        raise ExecutorError(f"--gpus-per-run must be >= 1: got {gpus_per_run}")
    if parallel is not None and parallel < 1:
        raise ExecutorError(f"--parallel must be >= 1: got {parallel}")
    if not gpus:
        if gpus_per_run > 1:
            raise ExecutorError(f"--gpus-per-run {gpus_per_run} but this machine has no GPU (CUDA_VISIBLE_DEVICES "
                                f"empty and nvidia-smi lists none): leave --gpus-per-run at 1 to train on the CPU")
        return [Slot(i) for i in range(parallel or 1)]
    fits = len(gpus) // gpus_per_run
    if fits < 1:
        raise ExecutorError(f"--gpus-per-run {gpus_per_run} but only {len(gpus)} GPU(s) are visible "
                            f"({','.join(gpus)}): use --gpus-per-run {len(gpus)} or less")
    if gpus_per_run == 1 and parallel is not None and parallel > fits:
        # more one-GPU runs than GPUs: they share, round-robin. A small model leaves most of a GPU idle (its step
        # is host-bound), so several runs on one GPU finish a study sooner; a big one would run out of memory,
        # which is why this happens only when asked for
        return [Slot(i, (gpus[i % len(gpus)],)) for i in range(parallel)]
    if parallel is not None and parallel > fits:
        raise ExecutorError(f"--parallel {parallel} x --gpus-per-run {gpus_per_run} needs {parallel * gpus_per_run} "
                            f"GPUs, {len(gpus)} are visible ({','.join(gpus)}): use --parallel {fits} or less")
    return [Slot(i, tuple(gpus[i * gpus_per_run:(i + 1) * gpus_per_run])) for i in range(parallel or fits)]


def launch_command(slot: Slot, stage_args: list[str], python: str = sys.executable) -> list[str]:
    """One process on the CPU or one GPU. A run on several GPUs goes through jobs/run_stage.sh (torchrun, one rank
    per GPU; slot_env sets its variables), which owns stopping ranks: it blocks SIGTERM in the launcher and
    passes one SIGUSR1 to the ranks, where torchrun would forward SIGTERM and kill the ranks 30 s later, maybe
    in the middle of their checkpoint save."""
    if len(slot.gpus) > 1:
        return ["bash", str(RUN_STAGE), *stage_args]
    return [python, "-m", "cbs.pipeline.cli", *stage_args]


def slot_env(slot: Slot, threads: int, base: Optional[dict] = None) -> dict:
    """The environment of a run in `slot`: its GPUs (or the CPU accelerator without any), its share of threads,
    and no inherited rendezvous (each run is its own process group)."""
    env = dict(os.environ if base is None else base)
    if slot.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(slot.gpus)
        if env.get("DS_ACCELERATOR") == "cpu":
            del env["DS_ACCELERATOR"]  # a GPU run must not be forced onto the CPU
    if len(slot.gpus) > 1:  # jobs/run_stage.sh's variables: one node, a rank per GPU, this python
        env.update(GPUS_PER_NODE=str(len(slot.gpus)), NNODES="1", LAUNCHER="torchrun", CBS_PYTHON=sys.executable)
    else:
        env.setdefault("DS_ACCELERATOR", "cpu")
    env["OMP_NUM_THREADS"] = str(threads)
    for var in RENDEZVOUS:  # the study's own, if it runs under a launcher: never its runs'
        env.pop(var, None)
    return env


# ---------------------------------------------------------------------------------------------------- local


class LocalExecutor:
    """Subprocesses on this machine, one run per device slot at a time; keeps going past failed runs."""

    def __init__(self, parallel: Optional[int] = None, gpus_per_run: int = 1, gpus: Optional[list[str]] = None,
                 progress_every_s: float = PROGRESS_EVERY_S):
        self.slots = device_slots(parallel, gpus_per_run, visible_gpus() if gpus is None else gpus)
        self.cores = len(os.sched_getaffinity(0))
        if not progress_every_s > 0:
            raise ExecutorError(f"--progress-every must be > 0 seconds: got {progress_every_s}")
        self.progress_every_s = progress_every_s

    def describe(self) -> str:
        if not self.slots[0].gpus:
            return f"{len(self.slots)} run(s) at a time on the CPU"
        return f"{len(self.slots)} run(s) at a time on GPUs " + " | ".join(",".join(s.gpus) for s in self.slots)

    def preprocess(self, config: Path) -> None:
        from cbs.pipeline import preprocess  # in this process; imported here: tokenizer libraries are slow to load
        from cbs.pipeline.config import PreprocessConfig, load_config

        preprocess.main(load_config(PreprocessConfig, config, prefix="study.data"))

    def train(self, jobs: list[RunJob], name: str, label: str) -> None:
        todo = unfinished(jobs)
        if not todo:
            return
        print(f"{label}: {len(todo)} run(s) to train ({len(jobs) - len(todo)} already finished), "
              f"{min(len(self.slots), len(todo))} at a time", flush=True)
        threads = max(1, self.cores // min(len(self.slots), len(todo)))  # a lone run gets every core
        pool = _Pool(self.slots, threads, self.progress_every_s)
        with _forward_stop_signals(pool):
            pool.run(todo, len(jobs) - len(todo), len(jobs))
        if pool.stopped:
            raise StudyInterrupted(f"{label}: stopped by a signal; {stopped_summary(pool.stopped_runs)}; run the "
                                   f"same command again to continue")

    def evaluate(self, run_dirs: list[Path]) -> None:
        """One process evaluates every run (one start-up instead of one per run), on the first slot's device."""
        if not run_dirs:
            return
        print(f"evaluate: {len(run_dirs)} run(s)", flush=True)
        slot = Slot(0, self.slots[0].gpus[:1])
        proc = subprocess.run(launch_command(slot, ["evaluate", *map(str, run_dirs)]),
                              env=slot_env(slot, self.cores), capture_output=True, text=True)
        if proc.returncode:
            print(f"evaluate: some runs could not be evaluated:\n{proc.stderr[-2000:]}", file=sys.stderr)

    def fit(self, study_dir: Path, out: Path, args: list[str]) -> int:
        from cbs.analysis.cli import fit_main  # statsmodels and matplotlib load in seconds: only when fitting

        return fit_main([str(study_dir), "--out", str(out), *args])


class _Pool:
    """Runs jobs on slots; `stop()` asks the running ones to checkpoint (SIGTERM) and launches no more. While they
    train it prints each running run's progress every `progress_every_s` (cbs/pipeline/progress.py)."""

    def __init__(self, slots: list[Slot], threads: int, progress_every_s: float):
        self.free = list(slots)
        self.slots = len(slots)
        self.threads = threads
        self.progress_every_s = progress_every_s
        self.active: dict[str, tuple[subprocess.Popen, object, RunJob, Slot, RunWatch]] = {}
        self.stopped = False
        self.stopped_runs: list[RunJob] = []
        """The runs that were running when stop() came."""

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.stopped_runs = [job for _, _, job, _, _ in self.active.values()]
        for proc, *_ in self.active.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def run(self, todo: list[RunJob], done: int, total: int) -> None:
        pending, durations, started = list(todo), [], time.time()
        shown = started
        while (pending and not self.stopped) or self.active:
            while pending and self.free and not self.stopped:
                self._launch(pending.pop(0))
            time.sleep(0.2)
            for name, (proc, logf, job, slot, watch) in list(self.active.items()):
                if proc.poll() is None:
                    continue
                logf.close()
                del self.active[name]
                self.free.append(slot)
                durations.append(time.time() - watch.started_s)
                done += 1
                result = read_result(job.run_dir)
                eta = self._eta(time.time(), durations, len(pending))
                print(f"  [{done}/{total}] {name}: {run_status(job.run_dir, result)} in {durations[-1]:.0f} s"
                      f"{result_note(job.run_dir, result)}" + (f"; ETA {eta}" if eta else ""), flush=True)
            if self.active and time.time() - shown >= self.progress_every_s:
                shown = time.time()
                self._show_progress(shown, durations, len(pending), done, total)
        print(f"  done in {(time.time() - started) / 60:.1f} min", flush=True)

    def _eta(self, now: float, durations: list[float], pending: int) -> str:
        if not pending and not self.active:
            return ""
        eta = study_eta_s([w for *_, w in self.active.values()], now, durations, pending, self.slots)
        if eta is None:
            return ""
        return f"{eta:.0f} s" if eta < 60 else f"{eta / 60:.1f} min"

    def _show_progress(self, now: float, durations: list[float], pending: int, done: int, total: int) -> None:
        for *_, watch in self.active.values():
            watch.update(now)
        lines = [watch.line(name, now) for name, (*_, watch) in self.active.items()]
        eta = self._eta(now, durations, pending)
        print(f"  {done}/{total} finished, {len(self.active)} running, {pending} waiting"
              + (f"; ETA {eta}" if eta else "; ETA once a run has logged two steps"), flush=True)
        print("\n".join(lines), flush=True)

    def _launch(self, job: RunJob) -> None:
        slot = self.free.pop(0)
        log_path = job.run_dir / runfiles.LOG
        logf = open(log_path, "a")
        env = slot_env(slot, self.threads)
        if len(slot.gpus) > 1:
            env["MASTER_PORT"] = str(free_port())  # a rendezvous of its own: parallel runs share the host
        # own session: a Ctrl-C reaches only the study, which forwards one SIGTERM; and if the study dies (even
        # by kill -9) its runs get SIGTERM from the kernel, save a checkpoint and stop instead of training on
        proc = subprocess.Popen(launch_command(slot, ["pretrain", str(job.config)]), stdout=logf,
                                stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_sigterm_when_parent_dies)
        watch = RunWatch(job.run_dir, time.time())
        watch.update(watch.started_s)  # a resumed run's log already has steps: its speed counts from here
        self.active[job.name] = (proc, logf, job, slot, watch)  # before anything is printed: stop() must see it
        print(f"  started {job.name} (log: {log_path})", flush=True)


def _sigterm_when_parent_dies() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGTERM) in the child (Linux); elsewhere nothing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _forward_stop_signals:
    """While training, SIGTERM/SIGINT to the study make its runs checkpoint and stop (pool.stop)."""

    def __init__(self, pool: _Pool):
        self.pool = pool

    def __enter__(self):
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.old[s] = signal.signal(s, lambda signum, frame: self.pool.stop())
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        return False
