"""Metrics behind a tiny interface: `log(metrics, step, tokens)` and `close()`, to metrics.jsonl, TensorBoard and
(optionally) Weights & Biases.

Rank 0 writes; other ranks get a tracker whose calls do nothing. Keys are namespaced (`train/loss`,
`eval/loss_ewa/0.999`, `perf/tokens_per_s`). On resume from step s, lines and events after s are dropped
(the JSONL is rewritten up to s, TensorBoard is opened with purge_step = s + 1), so a resumed run's logs equal
an uninterrupted run's.

TensorBoard gets, besides each scalar against the step (RUN_DIR/tb):
- every loss against the tokens seen, in RUN_DIR/tb/by_tokens (`train/loss_vs_tokens`, `eval/loss_ewa_vs_tokens/0.999`),
  so that runs of different batch sizes overlay (filter TensorBoard's runs with `by_tokens`). A writer of its own,
  because a resume purges events by step number, and these steps are token counts (purged from the tokens of s);
- the run's hyper-parameters (HParams tab), with its study as a hyper-parameter, to compare runs side by side.

W&B (log.wandb): run name = the run directory's name, group = the study's name, config = the hyper-parameters,
and every metric plotted against `tokens`. If wandb.init fails (no API key, no network) the run trains on without
W&B and says so in its log: a logger must not cost the compute. The run id is kept in RUN_DIR/wandb_run_id so that a resumed run
continues the same W&B run; W&B cannot drop logged steps, so the steps between the checkpoint and a crash keep
their first values there (metrics.jsonl and TensorBoard are the exact record). WANDB_MODE=offline writes under
RUN_DIR/wandb/ only.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cbs.pipeline.utils import log
from cbs.runfiles import (EVAL_LOSS, METRICS, NON_FINITE, STEP, TENSORBOARD, TOKENS, TRAIN_LOSS, WANDB_RUN_ID,
                          atomic_write_text, metrics_records, parse_record, with_floats)

BY_TOKENS = "by_tokens"
WANDB_ID = WANDB_RUN_ID


@dataclass(frozen=True)
class RunIdentity:
    """Who a run is, for the trackers that group and compare runs (TensorBoard HParams, W&B)."""

    name: str
    group: Optional[str] = None
    hparams: dict = field(default_factory=dict)
    """Flat name -> int, float, str or bool."""


def run_identity(cfg) -> RunIdentity:
    """A PretrainConfig's run name (its directory's), study and the hyper-parameters a study varies or fixes."""
    m, o = cfg.model, cfg.optimizer
    study = cfg.study or {}
    batches = cfg.batches.stages  # a ramp: its first batch, and the whole schedule as text
    hparams = {
        "global_batch_seqs": batches[0].batch, "micro_batch_seqs": cfg.micro_batch,
        "tokens_per_step": batches[0].batch * m.seq_len, "train_tokens": cfg.train_tokens, "seq_len": m.seq_len,
        "batch_schedule": "->".join(str(s.batch) for s in batches) if cfg.batch_schedule is not None else "",
        "model": m.preset or f"L{m.layers}d{m.hidden}", "layers": m.layers, "hidden": m.hidden,
        "lr": o.lr, "beta1": o.beta1, "beta2": o.beta2, "weight_decay": o.weight_decay,
        "warmup_tokens": cfg.schedule.warmup_tokens, "schedule": _plain_enum(cfg.schedule.kind),
        "ewa_taus": ",".join(f"{t:g}" for t in cfg.ewa.taus), "seed": cfg.seed,
        "precision": _plain_enum(cfg.precision), "study": study.get("name", ""),
        "settings": ",".join(s.get("name", "") for s in study.get("settings", [])),
    }
    return RunIdentity(Path(cfg.run_dir).name, study.get("name"), hparams)


def _plain_enum(v):
    return getattr(v, "value", v)


class Tracker:
    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: Optional[int] = None, identity: Optional[RunIdentity] = None, wandb=None):
        """`wandb`: a WandbConfig (cbs/pipeline/config/pretrain.py) to also log there; None: not."""
        self.enabled = enabled
        self._jsonl = self._tb = self._tb_tokens = self._wandb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        path = run_dir / METRICS
        resume_tokens = None
        if resume_step is not None and path.exists():
            resume_tokens = _truncate_after(path, resume_step)
        elif resume_step is None and path.exists():
            path.unlink()  # a fresh start in a run directory without checkpoints: old metrics do not apply
        self._jsonl = open(path, "a", encoding="utf-8")
        identity = identity or RunIdentity(run_dir.name)
        if tensorboard:
            self._open_tensorboard(run_dir, resume_step, resume_tokens, identity)
        if wandb is not None:
            self._wandb = _open_wandb(run_dir, wandb, identity, resume_step is not None)

    def _open_tensorboard(self, run_dir: Path, resume_step, resume_tokens, identity: RunIdentity) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(str(run_dir / TENSORBOARD), purge_step=purge)
        purge_tokens = None if resume_step is None else (resume_tokens or 0) + 1
        self._tb_tokens = SummaryWriter(str(run_dir / TENSORBOARD / BY_TOKENS), purge_step=purge_tokens)
        if resume_step is None and identity.hparams:  # written once: a resume keeps the first run's
            _write_hparams(self._tb, identity.hparams)

    def log(self, metrics: dict, step: int, tokens: int) -> None:
        if not self.enabled:
            return
        record = {STEP: step, TOKENS: tokens}
        record.update({k: _plain(v) for k, v in metrics.items()})
        # one line per event, flushed: a crash loses at most the line being written
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        numbers = {k: float(v) for k, v in record.items() if k != STEP and _is_number(v)}
        if self._tb is not None:
            for key, value in numbers.items():
                if math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
                    if loss_key(key):
                        self._tb_tokens.add_scalar(loss_key(key), value, tokens)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in numbers.items()}, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        for name in ("_tb", "_tb_tokens"):
            if getattr(self, name) is not None:
                getattr(self, name).close()
                setattr(self, name, None)
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def loss_key(key: str) -> Optional[str]:
    """The token-axis tag of a loss ('train/loss' -> 'train/loss_vs_tokens', 'eval/loss_ewa/0.9' ->
    'eval/loss_ewa_vs_tokens/0.9'); None for other keys."""
    parts = key.split("/")
    if len(parts) < 2 or not parts[1].startswith("loss"):
        return None
    return "/".join([parts[0], parts[1] + "_vs_tokens", *parts[2:]])


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) or (isinstance(v, str) and v in NON_FINITE)


def _write_hparams(writer, hparams: dict) -> None:
    """The HParams tab's session (torch's SummaryWriter.add_hparams would open a second run directory)."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    metrics = {TRAIN_LOSS: math.nan, EVAL_LOSS: math.nan}  # the columns the tab shows beside the hparams
    for summary in hparams_summary(hparams, metrics):
        writer.file_writer.add_summary(summary)  # SummaryWriter's own event file


def _open_wandb(run_dir: Path, cfg, identity: RunIdentity, resuming: bool):
    """wandb.init for this run directory: the same W&B run id across resumes (RUN_DIR/wandb_run_id)."""
    import wandb

    id_file = run_dir / WANDB_ID
    run_id = id_file.read_text(encoding="utf-8").strip() if resuming and id_file.exists() else uuid.uuid4().hex[:12]
    atomic_write_text(id_file, run_id + "\n")
    mode = cfg.mode.value if cfg.mode is not None else None  # None: wandb reads WANDB_MODE
    try:
        run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group or identity.group,
                         name=identity.name, config=identity.hparams, dir=str(run_dir), id=run_id, resume="allow",
                         mode=mode,
                         # console="off": pretrain.log stays the record of stdout/stderr; no system-stats thread
                         # (x_disable_stats: wandb >= 0.19, setup.cfg)
                         settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
    except Exception as e:  # noqa: BLE001 -- W&B's errors have no common base; a logger must not end the training
        log.warning("log.wandb: not logging to W&B in this run (%s: %s); metrics.jsonl and tb/ still are. Fix: "
                    "`wandb login`, or log.wandb.mode: offline (or WANDB_MODE=offline) and `wandb sync` later",
                    type(e).__name__, e)
        return None
    run.define_metric("tokens")
    run.define_metric("*", step_metric="tokens")  # runs of different batch sizes overlay against tokens
    return run


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them readable
    return v


def _truncate_after(path: Path, step: int) -> Optional[int]:
    """Keep the lines up to `step`, as written; returns the tokens of the last one kept (None when none is). A
    line the readers skip (cut short by a kill: runfiles.metrics_records) is dropped."""
    keep, tokens = [], None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        record = parse_record(line)
        logged = record.get(STEP) if record is not None else None
        if isinstance(logged, (int, float)) and not isinstance(logged, bool) and logged <= step:
            keep.append(line)
            tokens = record.get(TOKENS, tokens)
    atomic_write_text(path, "".join(k + "\n" for k in keep))
    return tokens


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every logged event of a run, in order, with "nan"/"inf"/"-inf" strings back as floats (the one reader,
    runfiles.metrics_records: a line cut short by a kill is left out)."""
    return [with_floats(r) for r in metrics_records(Path(run_dir) / METRICS)]


def eval_records(run_dir: str | Path) -> list[dict]:
    """The run's eval events, in step order: each holds every weights kind's loss at one step."""
    return [with_floats(r) for r in metrics_records(Path(run_dir) / METRICS, keys=(EVAL_LOSS,)) if EVAL_LOSS in r]
