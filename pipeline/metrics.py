"""Metrics behind a tiny interface: `log(metrics, step, tokens)` and `close()`, to TensorBoard and metrics.jsonl.

Rank 0 writes; other ranks get a tracker whose calls do nothing. Keys are namespaced (`train/loss`,
`eval/loss_ewa/0.999`, `perf/tokens_per_s`). On resume from step s, lines and events after s are dropped
(the JSONL is rewritten up to s, TensorBoard is opened with purge_step = s + 1), so a resumed run's logs equal
an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from pipeline.rundir import METRICS, TENSORBOARD
from pipeline.utils import atomic_write_text

NON_FINITE = ("nan", "inf", "-inf")
"""How a non-finite float is written (JSON has no NaN/inf); `read_metrics` turns them back into floats."""


class Tracker:
    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: Optional[int] = None):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        path = run_dir / METRICS
        if resume_step is not None and path.exists():
            _truncate_after(path, resume_step)
        elif resume_step is None and path.exists():
            path.unlink()  # a fresh start in a run directory without checkpoints: old metrics do not apply
        self._jsonl = open(path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(run_dir / TENSORBOARD), purge_step=purge)

    def log(self, metrics: dict, step: int, tokens: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "tokens": tokens}
        record.update({k: _plain(v) for k, v in metrics.items()})
        # one line per event, flushed: a crash loses at most the line being written
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them readable
    return v


def _truncate_after(path: Path, step: int) -> None:
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a line cut short by a crash ends the usable log
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every logged event of a run, in order, with "nan"/"inf"/"-inf" strings back as floats. A last line cut
    short by a kill is left out (the tracker flushes whole lines, so only the last can be partial)."""
    path = Path(run_dir) / METRICS
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        records.append({k: float(v) if isinstance(v, str) and v in NON_FINITE else v for k, v in record.items()})
    return records


def eval_records(run_dir: str | Path) -> list[dict]:
    """The run's eval events, in step order: each holds every weights kind's loss at one step."""
    return [m for m in read_metrics(run_dir) if "eval/loss" in m]
