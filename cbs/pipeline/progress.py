"""Live progress of running runs, from the files they write (metrics.jsonl, config.yaml), for the study's console
and `cbs status`.

A run's progress is its last metrics.jsonl line (step, tokens, train loss) and its planned steps (config.yaml's
resolved.total_steps, written when training starts). Its speed is measured between two readings of the file by the
same observer, so the start-up (imports, data, the first compile) does not count as training time:

    steps/s = (step_now - step_first) / (t_now - t_first),   remaining = (total_steps - step_now) / (steps/s)

which is an upper bound for a run that stops early once it reached every target (`stop_at_targets`).

The study's ETA spreads the remaining work over the slots it can use (min(slots, runs left)): the running runs'
remaining time plus one mean run duration per pending run (the finished runs' mean, else the running runs'
elapsed + remaining), and is never less than the longest running run's remaining time. It exists as soon as
one running run's step has moved between two readings, long before any run finishes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from cbs.pipeline.study_plan import human
from cbs.runfiles import CONFIG, LOG, METRICS, RESULT, STEP, TRAIN_LOSS, parse_record

TAIL_BYTES = 64 * 1024
"""How much of the end of metrics.jsonl is read to find the last train line (eval and noise lines come between)."""


@dataclass(frozen=True)
class Snapshot:
    """What a run's files say now: the last logged step and tokens, its train loss there, its planned steps."""

    step: int
    tokens: int
    loss: Optional[float]
    total_steps: Optional[int]


def last_records(run_dir: Path) -> list[dict]:
    """The whole lines with a step at the end of RUN_DIR/metrics.jsonl, last first ([] when there is none yet).
    Reads only the file's tail: a long run's log is megabytes and this runs at every progress report."""
    path = Path(run_dir) / METRICS
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return []
    records = []
    for line in reversed(lines):
        record = parse_record(line)  # None: the line being written, or the first (cut) line of the tail
        if record is not None and isinstance(record.get(STEP), int):
            records.append(record)
    return records


def total_steps(run_dir: Path) -> Optional[int]:
    """config.yaml's resolved.total_steps (pretrain writes it when training starts); None before that."""
    try:
        resolved = (yaml.safe_load((Path(run_dir) / CONFIG).read_text()) or {}).get("resolved") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    steps = resolved.get("total_steps")
    return steps if isinstance(steps, int) else None


def snapshot(run_dir: Path) -> Optional[Snapshot]:
    """The last step and tokens logged, and the last train loss (an eval or noise line may come after it)."""
    records = last_records(run_dir)
    if not records:
        return None
    loss = next((r[TRAIN_LOSS] for r in records if isinstance(r.get(TRAIN_LOSS), (int, float))), None)
    return Snapshot(records[0]["step"], int(records[0].get("tokens") or 0),
                    float(loss) if loss is not None else None, total_steps(run_dir))


class RunWatch:
    """One running run seen by the study: its speed between the first and the latest reading of its log."""

    def __init__(self, run_dir: Path, started_s: float):
        self.run_dir, self.started_s = Path(run_dir), started_s
        self.first: Optional[tuple[float, int]] = None
        self.now: Optional[Snapshot] = None
        self.read_s = started_s

    def update(self, now_s: float) -> Optional[Snapshot]:
        snap = snapshot(self.run_dir)
        if snap is not None:
            if self.first is None or snap.step < self.first[1]:  # a resumed run rewrites its log
                self.first = (now_s, snap.step)
            self.now, self.read_s = snap, now_s
        return self.now

    def remaining_s(self) -> Optional[float]:
        """Seconds left at the measured speed; None until two readings have seen the step move."""
        if self.now is None or self.first is None or self.now.total_steps is None:
            return None
        t0, s0 = self.first
        if self.now.step <= s0 or self.read_s <= t0:
            return None
        rate = (self.now.step - s0) / (self.read_s - t0)
        return max(0, self.now.total_steps - self.now.step) / rate

    def line(self, name: str, now_s: float) -> str:
        snap = self.now
        elapsed = f"{(now_s - self.started_s) / 60:.1f} min"
        if snap is None:
            return f"    {name}: starting ({elapsed}; nothing logged yet; see {self.run_dir / LOG})"
        steps = f"step {snap.step}/{snap.total_steps}" if snap.total_steps else f"step {snap.step}"
        loss = f", loss {snap.loss:.3f}" if snap.loss is not None and math.isfinite(snap.loss) else ""
        left = self.remaining_s()
        eta = f", at most {left / 60:.1f} min left" if left is not None else ""
        return f"    {name}: {steps}, {human(snap.tokens)} tokens{loss}{eta} ({elapsed} so far)"


def study_eta_s(watches: list[RunWatch], now_s: float, finished_s: list[float], pending: int,
                slots: int) -> Optional[float]:
    """The module docstring's ETA of a phase: None while no run has a measured speed and none has finished."""
    left = [w.remaining_s() for w in watches]
    known = [(now_s - w.started_s) + r for w, r in zip(watches, left) if r is not None]
    if not finished_s and not known:
        return None
    mean_run_s = sum(finished_s) / len(finished_s) if finished_s else sum(known) / len(known)
    running = [r if r is not None else max(0.0, mean_run_s - (now_s - w.started_s)) for w, r in zip(watches, left)]
    usable = max(1, min(slots, len(watches) + pending))
    return max(max(running, default=0.0), (sum(running) + pending * mean_run_s) / usable)


class LogWatcher:
    """Progress of runs this process did not launch (a Slurm array, whose tasks start when the queue lets them):
    a run is watched from the first time its metrics.jsonl shows a step until its result.json appears."""

    def __init__(self, runs: dict[str, Path], every_s: float, now_s: float):
        self.runs, self.every_s, self.shown_s = runs, every_s, now_s
        self.watches: dict[str, RunWatch] = {}

    def poll(self, now_s: float) -> list[str]:
        """Every `every_s`: one line per running run (none in between, or while none has logged a step)."""
        if now_s - self.shown_s < self.every_s:
            return []
        self.shown_s = now_s
        lines = []
        for name, run_dir in self.runs.items():
            if (run_dir / RESULT).exists():
                self.watches.pop(name, None)
                continue
            watch = self.watches.get(name)
            if watch is None:
                if snapshot(run_dir) is None:
                    continue  # queued, or still starting
                watch = self.watches[name] = RunWatch(run_dir, now_s)
            watch.update(now_s)
            lines.append(watch.line(name, now_s))
        return lines
