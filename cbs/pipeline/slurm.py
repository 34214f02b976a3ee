"""Slurm from Python: resources -> sbatch flags, submission, job states, waiting. Standard library only.

The study orchestrator submits `jobs/*.sbatch` through `submit()` and follows them with `wait()`. Choices that
come from measuring a real Slurm 22.05 (Debian 12 packages):
- `sbatch --wait` polls at 2 s, 10 s, 42 s (a 1 s job takes 10 s), so we poll `squeue` ourselves.
- There is no `sacct` without slurmdbd, so the final state of a finished job (gone from `squeue`) is read from
  `scontrol show job`, which keeps it for MinJobAge seconds (300 by default; our test cluster keeps 3600).
- Array tasks get their own state: keys are `"<array job id>_<task id>"` (what `squeue -r` prints as `%i`),
  plain jobs are keyed by their id.
- A requeued job (`scontrol requeue`, node failure, preemption, or a pretrain task that stopped on the SIGUSR1
  Slurm sends before its time limit and requeued itself: jobs/run_stage.sh) is PENDING with reason BeginTime for
  120 s before it runs again: `wait()` keeps waiting through that.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Union


class SlurmError(RuntimeError):
    """sbatch/squeue/scontrol are missing or failed, or a resource setting is impossible."""


#: States after which a job never runs again (besides a manual requeue). `UNKNOWN`: Slurm has forgotten the
#: job (older than MinJobAge). `DEPENDENCY_NEVER_SATISFIED`: pending on a dependency that failed, so it would
#: wait forever on a cluster without `DependencyParameters=kill_invalid_depend`; cancel it.
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "REVOKED", "UNKNOWN", "DEPENDENCY_NEVER_SATISFIED",
})

RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
              "MASTER_PORT")
"""torch.distributed's variables of the process that submits: never the job's."""

_TIME_RE = re.compile(r"^(\d+-)?\d+:\d{2}:\d{2}$")


@dataclass
class SlurmResources:
    """What one job asks for; `None` leaves the choice to the job script's `#SBATCH` lines and the cluster."""

    partition: Optional[str] = None
    """`--partition`; None: the cluster's default partition."""
    account: Optional[str] = None
    """`--account` to charge; None: the user's default account."""
    nodes: int = 1
    """`--nodes` per job (pretrain: data-parallel ranks = nodes x gpus_per_node)."""
    gpus_per_node: int = 0
    """`--gres=gpu:N` and the processes per node the launcher starts; 0: one CPU process."""
    cpus_per_task: Optional[int] = None
    """`--cpus-per-task` (each job runs one task per node, which starts the ranks of that node)."""
    time: Optional[str] = None
    """`--time` limit, "HH:MM:SS" or "D-HH:MM:SS"."""
    max_parallel: Optional[int] = None
    """At most this many tasks of an array run at once (the `%N` of `--array`); None: no limit."""
    extra: list[str] = field(default_factory=list)
    """Raw sbatch flags added last (so they win), e.g. ["--qos=high", "--constraint=h100"]."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str, value) -> SlurmError:
            return SlurmError(f"slurm.{name} {why}: got {value!r}")

        if not isinstance(self.nodes, int) or self.nodes < 1:
            raise bad("nodes", "must be an integer >= 1", self.nodes)
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 0:
            raise bad("gpus_per_node", "must be an integer >= 0", self.gpus_per_node)
        if self.cpus_per_task is not None and (not isinstance(self.cpus_per_task, int) or self.cpus_per_task < 1):
            raise bad("cpus_per_task", "must be an integer >= 1 (or unset)", self.cpus_per_task)
        if self.max_parallel is not None and (not isinstance(self.max_parallel, int) or self.max_parallel < 1):
            raise bad("max_parallel", "must be an integer >= 1 (or unset for no limit)", self.max_parallel)
        if self.time is not None and not _TIME_RE.match(str(self.time)):
            raise bad("time", 'must be "HH:MM:SS" or "D-HH:MM:SS", e.g. "04:00:00" or "1-12:00:00"', self.time)
        for name in ("partition", "account"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or any(c.isspace() for c in value)):
                raise bad(name, "must be a name without spaces (or unset)", value)
        if isinstance(self.extra, str) or not all(isinstance(f, str) and f.startswith("-") for f in self.extra):
            raise bad("extra", 'must be a list of sbatch flags such as ["--qos=high"]', self.extra)

    @property
    def processes(self) -> int:
        """Ranks of a pretrain job: one per GPU, or one CPU process."""
        return self.nodes * max(self.gpus_per_node, 1)

    def sbatch_flags(self) -> list[str]:
        """The sbatch flags for these resources (`max_parallel` goes into `--array`, see `submit`)."""
        flags = [f"--nodes={self.nodes}"]
        if self.partition:
            flags.append(f"--partition={self.partition}")
        if self.account:
            flags.append(f"--account={self.account}")
        if self.gpus_per_node:
            flags.append(f"--gres=gpu:{self.gpus_per_node}")
        if self.cpus_per_task:
            flags.append(f"--cpus-per-task={self.cpus_per_task}")
        if self.time:
            flags.append(f"--time={self.time}")
        return flags + list(self.extra)


def require_sbatch() -> None:
    """Raise SlurmError unless `sbatch` is on PATH (the study's Slurm executor needs it)."""
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch not found on PATH: this machine has no Slurm client. Run the study with "
                         "--executor local, or load your cluster's Slurm module (e.g. `module load slurm`) "
                         "and submit from a login node")


def _run(cmd: list[str], env: Optional[dict] = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} not found on PATH (needed for: {shlex.join(cmd)})") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{cmd[0]} did not answer within 120 s: {shlex.join(cmd)}") from None


def submit(script: Path, args: list[str], resources: SlurmResources, *, job_name: str,
           array: Optional[str] = None, dependency: Optional[str] = None, env: Optional[dict] = None,
           log_dir: Path, dry_run: bool = False) -> Union[str, list[str]]:
    """Submit `script args...` with `sbatch --parsable`; return the job id (an array's id for an array).

    array: task ids such as "0-9" (the `%max_parallel` throttle of `resources` is appended unless given).
    dependency: an sbatch dependency such as "afterok:123" or "afterany:123:124".
    env: extra variables for the job; GPUS_PER_NODE and NNODES are always exported (run_stage.sh reads them),
    on top of the submitter's environment (`--export=ALL`).
    log_dir: where the job's log goes: `%x-%j.out`, or `%x-%A_%a.out` for an array (created if missing).
    dry_run: submit nothing, create nothing; return the command (a list of arguments) instead.
    """
    variables = {"GPUS_PER_NODE": str(resources.gpus_per_node), "NNODES": str(resources.nodes)}
    variables.update({str(k): str(v) for k, v in (env or {}).items()})
    # --export splits at commas, so a value holding one travels in sbatch's own environment (ALL exports it)
    export = ",".join(["ALL"] + [k if "," in v else f"{k}={v}" for k, v in variables.items()])
    log_name = "%x-%A_%a.out" if array else "%x-%j.out"
    cmd = ["sbatch", "--parsable", f"--job-name={job_name}", f"--output={Path(log_dir) / log_name}"]
    if array:
        if resources.max_parallel and "%" not in array:
            array = f"{array}%{resources.max_parallel}"
        cmd.append(f"--array={array}")
    if dependency:
        cmd.append(f"--dependency={dependency}")
    cmd += resources.sbatch_flags() + [f"--export={export}", str(script)] + [str(a) for a in args]
    if dry_run:
        return cmd
    require_sbatch()
    Path(log_dir).mkdir(parents=True, exist_ok=True)  # Slurm does not create it: the job would fail silently
    # not the submitter's own rendezvous (a process that ran pretrain in-process keeps LOCAL_RANK): --export=ALL
    # would hand it to the job, whose launcher gives its ranks their own
    inherited = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    proc = _run(cmd, env={**inherited, **variables})
    if proc.returncode != 0:
        raise SlurmError(f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}\n"
                         f"  command: {shlex.join(cmd)}")
    job_id = proc.stdout.strip().splitlines()[-1].split(";")[0] if proc.stdout.strip() else ""
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed no job id (stdout {proc.stdout!r}); command: {shlex.join(cmd)}")
    return job_id


def cancel(job_ids: Iterable[str]) -> None:
    """`scancel` the jobs (array ids cancel every task); already finished ones are ignored."""
    ids = [str(j) for j in job_ids]
    if ids:
        proc = _run(["scancel", *ids])
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
            raise SlurmError(f"scancel failed (exit {proc.returncode}): {proc.stderr.strip()}")


def _expand_tasks(spec: str) -> list[str]:
    """Array task ids of a spec such as "0-3%1", "1,4-5" or "0-8:2"."""
    tasks: list[str] = []
    for part in spec.split("%")[0].split(","):
        rng, _, step = part.partition(":")
        lo, _, hi = rng.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            tasks += [str(t) for t in range(int(lo), int(hi or lo) + 1, int(step) if step.isdigit() else 1)]
    return tasks


def _state(state: str, reason: str) -> str:
    if state == "PENDING" and reason == "DependencyNeverSatisfied":
        return "DEPENDENCY_NEVER_SATISFIED"
    return state


def _squeue(ids: list[str]) -> dict[str, str]:
    """Live jobs (pending, running, completing...): one line per array task with -r; finished jobs are absent."""
    proc = _run(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i %T %r"])
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # every id is finished and forgotten: nothing live
            return {}
        raise SlurmError(f"squeue failed (exit {proc.returncode}): {proc.stderr.strip()}")
    states = {}
    for line in proc.stdout.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) >= 2:
            states[parts[0]] = _state(parts[1], parts[2].strip() if len(parts) > 2 else "")
    return states


def _field(record: str, name: str) -> str:
    m = re.search(rf"(?:^|\s){name}=(\S*)", record)
    return m.group(1) if m else ""


def _scontrol(job_id: str) -> dict[str, str]:
    """Every record Slurm still holds for the job (all tasks of an array), finished ones included."""
    proc = _run(["scontrol", "show", "job", "-o", job_id])
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # purged after MinJobAge (or never existed)
            return {job_id: "UNKNOWN"}
        raise SlurmError(f"scontrol show job {job_id} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    states = {}
    for record in proc.stdout.splitlines():
        state = _state(_field(record, "JobState"), _field(record, "Reason"))
        array_job, task = _field(record, "ArrayJobId"), _field(record, "ArrayTaskId")
        if not state:
            continue
        if array_job and task:
            # a single task, or the tasks not started yet as one record ("2-3%1")
            for t in ([task] if task.isdigit() else _expand_tasks(task)):
                states[f"{array_job}_{t}"] = state
        else:
            states[_field(record, "JobId")] = state
    return states


def job_states(job_ids: Iterable[str]) -> dict[str, str]:
    """Current state of each job (`"123"`) or array task (`"123_4"`), e.g. PENDING RUNNING COMPLETED FAILED.

    One `squeue` for everything that is live; then `scontrol show job` for each id that is not a live plain job
    (finished jobs, and arrays, whose finished tasks squeue no longer lists). An id Slurm forgot is `UNKNOWN`.
    """
    ids = list(dict.fromkeys(str(j) for j in job_ids))
    if not ids:
        return {}
    states = _squeue(ids)
    for job_id in ids:
        if job_id not in states:  # finished, or an array (squeue names its tasks, never the array id)
            # scontrol answers later than squeue, so it wins where both know a task
            states.update(_scontrol(job_id))
    return states


def is_final(state: str) -> bool:
    return state in FINAL_STATES


def wait(job_ids: Iterable[str], poll_s: float = 1.0, timeout_s: Optional[float] = None,
         on_update: Optional[Callable[[dict[str, str]], None]] = None,
         on_poll: Optional[Callable[[], None]] = None) -> dict[str, str]:
    """Poll until every job and array task is in a final state; return the states (keys as in job_states).

    on_update(states) is called whenever a state changed, on_poll() after every answered poll (live progress).
    A few failed polls in a row (slurmctld restarting) are retried; raises SlurmError after `timeout_s` with the
    states at that point.
    """
    ids = [str(j) for j in job_ids]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last: Optional[dict[str, str]] = None
    failures = 0
    while True:
        try:
            states = job_states(ids)
            failures = 0
        except SlurmError:
            failures += 1
            if failures >= 10:
                raise
        else:
            if states != last:
                last = states
                if on_update:
                    on_update(dict(states))
            if all(is_final(s) for s in states.values()):
                return states
            if on_poll:
                on_poll()
        if deadline is not None and time.monotonic() >= deadline:
            summary = ", ".join(f"{k}={v}" for k, v in sorted((last or {}).items())) or "no answer"
            raise SlurmError(f"jobs {','.join(ids)} not finished after {timeout_s:g} s: {summary}")
        time.sleep(poll_s)
