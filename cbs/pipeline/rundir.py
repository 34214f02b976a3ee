"""The checkpoints and the lock of a pretrain run directory (its file names and statuses: cbs/runfiles.py;
docs/architecture.md has the contract).

    RUN_DIR/config.yaml       the resolved config (written by pretrain)
    RUN_DIR/metrics.jsonl     one JSON object per logged event
    RUN_DIR/tb/               TensorBoard events
    RUN_DIR/result.json       status, steps, final losses, target crossings
    RUN_DIR/eval.json         written by `cbs evaluate`
    RUN_DIR/checkpoints/step00001000/   one checkpoint: DeepSpeed's files, ewa_rank<r>.pt, complete.json
    RUN_DIR/checkpoints/latest          the tag of the newest complete checkpoint

A checkpoint is complete once `complete.json` (the size of every file in it) is written, after every rank has
saved; `latest` is written after that. So a save cut short (kill -9, node failure) leaves a tag directory
without `complete.json`, never a `latest` pointing at half a checkpoint, and a file truncated or replaced later
shows as a size mismatch. Nothing here imports torch: the study and evaluate read run directories too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Optional

from cbs.runfiles import (CHECKPOINTS, COMPLETE, CONFIG, EVAL, LATEST, LOCK, METRICS,  # noqa: F401 (the layout)
                          RESULT, TENSORBOARD, atomic_write_json, atomic_write_text)

INCOMPLETE = "its save did not finish"

# What may differ between a run and its resumption: none of it changes the maths of the remaining steps.
RESUME_MAY_CHANGE = ("run_dir", "micro_batch_seqs", "checkpoint", "log", "resume", "stop_at_targets", "study",
                     "targets", "eval")


class CheckpointError(ValueError):
    """No usable checkpoint where one is needed; the message names the directory and what is wrong."""


class RunDirBusy(ValueError):
    """Another live process is training this run directory."""


def tag(step: int) -> str:
    """The checkpoint tag of a step: step00001000 (sorts by step as text)."""
    return f"step{step:08d}"


def tag_step(name: str) -> int:
    return int(name[4:])


def changed_settings(saved: dict, new: dict) -> list[str]:
    """Top-level config keys in which a run directory's config.yaml (`saved`) and a config (`new`, both as
    plain data) differ in a way that changes the run's maths (RESUME_MAY_CHANGE aside)."""
    saved = {k: v for k, v in saved.items() if k != "resolved"}
    return [k for k in sorted(set(saved) | set(new)) if k not in RESUME_MAY_CHANGE and saved.get(k) != new.get(k)]


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def ewa_file(tag_dir: Path, rank: int) -> Path:
    """A checkpoint's EWA state: rank 0's under ZeRO 1/2, every rank's shard under ZeRO-3."""
    return tag_dir / f"ewa_rank{rank}.pt"


def tags(run_dir: str | os.PathLike) -> list[str]:
    """Every checkpoint tag directory of a run, oldest first, complete or not."""
    ckpt = checkpoint_dir(run_dir)
    return sorted(p.name for p in ckpt.glob("step*") if p.is_dir() and p.name[4:].isdigit())


def has_checkpoints(run_dir: str | os.PathLike) -> bool:
    return (checkpoint_dir(run_dir) / LATEST).is_file() or bool(tags(run_dir))


def mark_complete(tag_dir: Path, meta: dict) -> None:
    """Record the size of every file of a finished save and `meta` (step, world_size, zero_stage), then point
    `latest` at it. Rank 0 calls it after a barrier that follows every rank's save."""
    files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != COMPLETE}
    atomic_write_json(tag_dir / COMPLETE, {**meta, "files": files})
    atomic_write_text(tag_dir.parent / LATEST, tag_dir.name)


def checkpoint_meta(tag_dir: Path) -> dict:
    """What mark_complete recorded (call only on a checkpoint without a `checkpoint_problem`)."""
    return json.loads((tag_dir / COMPLETE).read_text())


def set_aside(tag_dir: Path) -> Path:
    """Rename a damaged checkpoint to `<tag>.damaged` (kept for inspection, out of the way of new saves)."""
    target = tag_dir.with_name(f"{tag_dir.name}.damaged")
    n = 1
    while target.exists():
        n += 1
        target = tag_dir.with_name(f"{tag_dir.name}.damaged{n}")
    os.replace(tag_dir, target)
    return target


def checkpoint_problem(tag_dir: Path) -> Optional[str]:
    """Why a checkpoint cannot be used (None if it looks whole): no marker, or a file missing or resized."""
    marker = tag_dir / COMPLETE
    if not marker.is_file():
        latest = tag_dir.parent / LATEST
        named = latest.read_text().strip() if latest.is_file() else ""
        if named[4:].isdigit() and tag_step(tag_dir.name) <= tag_step(named):
            # `latest` moves after complete.json is written, so a save at or before it finished: a cbs that wrote
            # no complete.json made it (or the marker was deleted). It cannot be checked; it is kept, not removed.
            return (f"no {COMPLETE}, although `latest` names it or a later step (saved by a cbs that wrote no "
                    f"{COMPLETE}): it cannot be checked")
        return f"{INCOMPLETE} (no {COMPLETE})"
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{marker} is unreadable ({e})"
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path.name} is missing"
        if path.stat().st_size != size:
            return f"{path.name} has {path.stat().st_size} bytes, {size} when saved (truncated or overwritten)"
    return None


def usable_tags(run_dir: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """(complete checkpoint tags newest first, {tag: problem} for the others)."""
    ckpt = checkpoint_dir(run_dir)
    good, bad = [], {}
    for name in reversed(tags(run_dir)):
        problem = checkpoint_problem(ckpt / name)
        if problem is None:
            good.append(name)
        else:
            bad[name] = problem
    return good, bad


def describe_bad(bad: dict[str, str]) -> str:
    return "; ".join(f"{name}: {why}" for name, why in bad.items())


@contextlib.contextmanager
def exclusive(run_dir: str | os.PathLike, wait_s: float = 120.0):
    """Hold RUN_DIR/.lock (flock) for the block: one process trains a run at a time. A predecessor that is
    still saving its last checkpoint (a preempted or orphaned run) is waited for, up to `wait_s` seconds. The
    kernel drops the lock when its holder dies, so a killed run never leaves it stuck."""
    path = Path(run_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    f.seek(0)
                    holder = f.read().strip() or "?"
                    raise RunDirBusy(f"{run_dir} is being trained by another process (pid {holder}); wait for it "
                                     f"to finish or stop it, then start this again") from None
                time.sleep(0.5)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
