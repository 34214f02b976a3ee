"""The run-directory contract between the pipeline (which writes run and study directories) and the analysis
(which reads them), written once: file names, run statuses, the metric keys the analysis reads, the shapes of
result.json and config.yaml, the metrics.jsonl reader and the atomic and staged writers.

Both `cbs.pipeline` and `cbs.analysis` import it; it imports neither, nor torch (stdlib only), so that a reader of
run directories never pays for a training stack.

    STUDY_DIR/study.yaml, targets.json, preprocess.yaml, data/, fit/, stale/
    STUDY_DIR/runs/<run>/            one run directory:
        run.yaml          the study's input to the run          config.yaml   the resolved config (pretrain)
        metrics.jsonl     one JSON object per logged event      tb/           TensorBoard events
        result.json       status, steps, final losses, crossings   eval.json  `cbs evaluate`
        checkpoints/<tag>/complete.json, checkpoints/latest      .lock         the trainer's flock
        pretrain.log      the run's stdout and stderr (local executor)
"""

from __future__ import annotations

import enum
import glob
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, TypedDict

# ---------------------------------------------------------------------------------------------------- file names

RUNS = "runs"
"""STUDY_DIR/runs/<run>/: one directory per run."""
STUDY_FILE = "study.yaml"
TARGETS_FILE = "targets.json"
PREPROCESS_FILE = "preprocess.yaml"
DATA = "data"
FIT = "fit"
STALE = "stale"
"""STUDY_DIR/stale/: runs set aside by `cbs study --force` because their settings changed."""
MANIFEST = "manifest.json"
"""A preprocessed data directory's description (shards, tokenizer, vocabulary)."""

RUN_INPUT = "run.yaml"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
RESULT = "result.json"
STALE_RESULT = "result.stale.json"
"""result.json of a run reopened because its targets changed (cbs/pipeline/study.py, reconcile_finished)."""
EVAL = "eval.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "complete.json"
LOCK = ".lock"
LOG = "pretrain.log"
WANDB_RUN_ID = "wandb_run_id"


# ---------------------------------------------------------------------------------------------------- statuses


class Status(str, enum.Enum):
    """A run's status. result.json holds one of COMPLETED, DIVERGED, FAILED, PREEMPTED; PENDING and STARTED are
    read from a run directory without result.json; UNFINISHED is the analysis's word for any run without an ended
    result. A member equals (and hashes as) its string, and prints as it."""

    COMPLETED = "completed"
    """Trained to its budget or its targets."""
    DIVERGED = "diverged"
    """Stopped because its loss diverged: an outcome of its hyper-parameters, not an accident."""
    FAILED = "failed"
    """An error ended it (or its result.json cannot be read): the study, run again, trains it again."""
    PREEMPTED = "preempted"
    """Stopped by a signal after a checkpoint: starting it again resumes it."""
    PENDING = "pending"
    """No result.json and nothing logged yet."""
    STARTED = "started"
    """No result.json, but metrics.jsonl exists: training, or stopped without a word."""
    UNFINISHED = "unfinished"
    """PENDING, STARTED or PREEMPTED, as the analysis reads it: no outcome yet."""

    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__


SETTLED = (Status.COMPLETED, Status.DIVERGED)
"""Training reached its outcome and would only repeat it: the study does not train the run again, `cbs pretrain`
exits 0 and a trainer started on it returns its result.json at once. FAILED is not settled: a study run again
retries it."""
ENDED = (Status.COMPLETED, Status.DIVERGED, Status.FAILED)
"""result.json statuses the fit reads as the run's last word (a failed run: an observation lost)."""
RESUMABLE = (Status.PREEMPTED,)
"""result.json statuses of a run that is to be resumed: the fit counts it as unfinished."""
IN_RESULT = ENDED + RESUMABLE
"""Every status result.json may hold. (Tuples, not sets: a status read from a damaged file may be unhashable.)"""


def known_statuses() -> str:
    """The statuses result.json may hold, for an error message: completed, diverged, failed, preempted."""
    return ", ".join(IN_RESULT)


# ---------------------------------------------------------------------------------------------------- metric keys

STEP = "step"
TOKENS = "tokens"
"""Every metrics.jsonl line has both: optimizer steps done and tokens seen."""
TRAIN_LOSS = "train/loss"
EVAL_LOSS = "eval/loss"
"""The raw (last-iterate) weights' eval loss; also result.json's `final` key for it."""
EVAL_LOSS_EWA_PREFIX = "eval/loss_ewa/"
"""+ tau: one EWA decay's eval loss (`eval/loss_ewa/0.999`); also in result.json's `final`."""
TOKENS_PER_S = "perf/tokens_per_s"
NOISE_SCALE = "train/noise_scale"
"""B_simple in sequences (cbs/analysis/noise_scale.py), with its two ingredients and the two batches they used:"""
GRAD_SQ_SMALL = "train/grad_sq_small"
GRAD_SQ_BIG = "train/grad_sq_big"
NOISE_SCALE_BATCHES = "train/noise_scale_batches"
NON_FINITE = ("nan", "inf", "-inf")
"""How metrics.jsonl writes a non-finite float (JSON has none): str(float)."""


# ---------------------------------------------------------------------------------------------------- shapes


class Crossing(TypedDict):
    """The first eval at which one kind of weights reached one target (cbs/pipeline/targets.py)."""

    step: int
    tokens: int
    step_interp: float
    """Interpolated in log-loss between that eval and the previous one."""
    tokens_interp: float


class TargetEntry(TypedDict):
    loss: float
    raw: Optional[Crossing]
    ewa: dict[str, Optional[Crossing]]
    """tau as text -> its crossing."""


class Result(TypedDict, total=False):
    """result.json. A failed run's holds only status, reason, wall_seconds, targets ([]) and final ({})."""

    status: str
    """A Status in IN_RESULT."""
    reason: str
    steps: int
    tokens: int
    total_steps: int
    wall_seconds: float
    final: dict[str, Any]
    """The last eval's losses by metric key (EVAL_LOSS, EVAL_LOSS_EWA_PREFIX + tau); non-finite as NON_FINITE."""
    targets: list[TargetEntry]
    params: dict[str, int]
    world_size: int


class StudySetting(TypedDict, total=False):
    name: str
    model_params: int
    tokens: int
    target_loss: float


class RunConfig(TypedDict, total=False):
    """The keys of config.yaml (a PretrainConfig as data, plus `resolved`) that readers outside the pipeline use."""

    global_batch_seqs: Optional[int]
    batch_schedule: Any
    model: dict
    """model.seq_len: tokens per sequence."""
    optimizer: dict
    study: dict
    """name, method ('sweep' | 'branched'), settings: list[StudySetting], reference: bool, branch: mapping."""
    targets: list[float]
    resolved: dict
    """Written when training starts: world_size, device, total_steps, tokens_per_step, batch_stages, ..."""


class RunFileError(ValueError):
    """A run file that exists but cannot be read as its shape; the message names the file and why."""


def read_result(run_dir: str | os.PathLike) -> Optional[Result]:
    """RUN_DIR/result.json as a mapping; None when there is none. RunFileError when it cannot be read (cut
    short, edited by hand) or is not a mapping."""
    path = Path(run_dir) / RESULT
    try:
        result = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RunFileError(f"{path} cannot be read ({e})") from None
    if not isinstance(result, dict):
        raise RunFileError(f"{path} is not a mapping")
    return result


# ---------------------------------------------------------------------------------------------------- metrics.jsonl


def as_float(value: Any) -> Optional[float]:
    """A JSON number, or one of the strings "nan", "inf", "-inf" that metrics.jsonl writes for non-finite floats
    (JSON has none); None for anything else (missing, bool, other strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return float(value.strip())
    return None


def parse_record(line: str) -> Optional[dict]:
    """One metrics.jsonl line's JSON object; None when it does not parse (a line cut short by a kill) or is not
    an object."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def metrics_records(path: str | os.PathLike, keys: Iterable[str] = ()) -> Iterator[dict]:
    """The records of a metrics.jsonl, in file order, values as written (non-finite floats as NON_FINITE
    strings: as_float reads them). A line that does not parse is skipped: the tracker flushes whole lines, so
    only the last can be cut short, by a kill. With `keys`, only the lines that name one of them are parsed (a
    substring test first: most lines are train events a reader of evals or throughput does not want). OSError
    when the file cannot be opened."""
    keys = tuple(keys)
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if keys and not any(k in line for k in keys):
                continue
            record = parse_record(line)
            if record is not None:
                yield record


def with_floats(record: dict) -> dict:
    """A record with its NON_FINITE strings back as floats."""
    return {k: float(v) if isinstance(v, str) and v in NON_FINITE else v for k, v in record.items()}


# ---------------------------------------------------------------------------------------------------- writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file in the same directory, fsync, rename: a crash or a reader sees the old file or the
    new one, never half of it. The file gets the mode open() would give it (mkstemp's is 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def staged_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside `final`; on success it replaces `final` by rename, on error it is removed.

    The swap is two renames (old aside, new in place; the old one is put back if the second fails), so a crash
    leaves the old directory, or the new one, or the old one under a `.NAME.old-HOST-PID` name beside it: never a
    half-written `final`. The temp names carry host and pid, so that the next call removes what a killed process
    (kill -9, a node failure) left behind on this host, and nothing of another host's or a live process's."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(final)
    owner = f"{socket.gethostname()}-{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-{owner}-"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the directory the mode mkdir would
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{owner}"
    moved_aside = False
    try:
        if final.exists():
            os.replace(final, old)
            moved_aside = True
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_aside and not final.exists():
            os.replace(old, final)
        raise
    if moved_aside:
        shutil.rmtree(old, ignore_errors=True)


_STAGE_PIDS = {"tmp": re.compile(r"(\d+)-[^-]+"), "old": re.compile(r"(\d+)(?:-[0-9a-f]{8})?")}
"""What follows `.NAME.KIND-HOST-` in a stage's name: the pid, then mkdtemp's random part (which has no "-");
an `old` name may end in 8 hex digits (cbs fit's, before it staged through here)."""


def _remove_stale_stages(final: Path) -> None:
    """Remove `.NAME.tmp-HOST-PID-*` / `.NAME.old-HOST-PID` siblings of `final` whose process is gone from this
    host. Another host's (one named HOST-something too: the whole rest of the name must fit), or a live
    process's (a concurrent run), are left alone."""
    host = socket.gethostname()
    for kind, rest in _STAGE_PIDS.items():
        prefix = f".{final.name}.{kind}-{host}-"
        for path in final.parent.glob(glob.escape(prefix) + "*"):
            match = rest.fullmatch(path.name[len(prefix):])
            if match and not _alive(int(match.group(1))):
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True

