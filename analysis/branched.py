"""Branched local CBS (Merrill et al. 2025, arXiv 2505.23971; docs/method.md, "Branched local CBS"): from
checkpoints of one base run at batch B taken after t tokens, short branches at batches b_1 < b_2 < ... train the
same number of tokens; the local CBS at t is the largest batch that loses nothing measurable against the smaller
ones.

    b_1 passes;  b_j passes  iff  b_{j-1} passed  and  L(b_j) <= (1 + tolerance) min_{i<j} L(b_i);
    CBS(t) = the largest passing batch,  interval [CBS(t), first failing batch)  (upper end inf when all pass).

L(b) is a branch's final eval loss (result.json `final`): the raw weights' `eval/loss`, or the min over its EWA
decays when every branch recorded them (`--target-kind`). What each branch says:
- completed with a finite loss: an observation;
- diverged or failed (or a non-finite loss): its batch fails (a larger batch that cannot train is past the CBS);
- no result.json, or status `preempted`: unfinished. A point whose pass/fail chain reaches an unfinished branch
  before it ends is *incomplete*: no CBS, only the lower bound passed so far, and the branch listed. Branches
  after the first failure are not needed (the chain has ended) and do not make a point incomplete.

Reads a study directory (`runs/<run>/config.yaml`, or `run.yaml` for a branch that has not started, and
`result.json`), whose runs carry `study.method: branched`: base runs `study.reference: true` with `study.base`,
branch runs `study.branch: {setting, base_run, base_batch, base_tokens, base_step, multiplier, lr_scale,
tolerance}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from analysis import InputError
from analysis.steps import (
    UNFINISHED_STATUSES, Setting, TargetKind, as_float, check_status, positive_int, read_json,
    read_yaml, seq_len_of, study_method,
)

RAW_LOSS_KEY = "eval/loss"
EWA_LOSS_PREFIX = "eval/loss_ewa/"
UNFINISHED = "unfinished"
NOT_NEEDED = "not needed"


@dataclass(frozen=True)
class Branch:
    """One branch run and what it reached."""

    run: str
    setting: str
    base_run: str
    base_batch: int
    base_tokens: int
    """t: tokens the base run had seen at the branch's checkpoint."""
    batch: int
    """The branch's global batch b = k x B, in sequences."""
    tolerance: float
    status: str
    """completed, diverged, failed, or 'unfinished' (no result.json, or preempted)."""
    raw_loss: float | None = None
    ewa_loss: float | None = None
    """Min over the EWA decays of the final eval loss; None when the branch recorded none."""


@dataclass(frozen=True)
class BranchVerdict:
    """One batch of one branch point, judged."""

    batch: int
    loss: float | None
    """The loss compared (None: no finite loss)."""
    status: str
    verdict: str
    """'pass', 'fail' (loss above the tolerance), 'diverged' / 'failed' (the run did: fails its batch),
    'unfinished' (the chain stops here: the point is incomplete) or 'not needed' (after the chain ended)."""
    run: str = ""


@dataclass(frozen=True)
class LocalCbs:
    """The local CBS of one setting at one branch point t."""

    setting: Setting
    tokens: int
    """t, tokens the base run had seen."""
    base_batch: int
    tolerance: float
    verdicts: tuple[BranchVerdict, ...]
    cbs: float
    """The largest passing batch; NaN when incomplete or when no batch passes."""
    cbs_low: float
    """= cbs; for an incomplete point the largest batch passed so far (a lower bound), NaN if none."""
    cbs_high: float
    """The first failing batch; inf when every batch passes; NaN when incomplete."""
    complete: bool
    note: str = ""

    @property
    def missing(self) -> list[str]:
        return [v.run for v in self.verdicts if v.status == UNFINISHED]


def local_cbs(outcomes: list[tuple[int, float | None, str]], tolerance: float) -> tuple[list[str], float, float,
                                                                                        float, bool]:
    """Judge (batch, loss, status) outcomes of one branch point (module docstring, exact definition).

    Returns (verdict per outcome in batch order, cbs, cbs_low, cbs_high, complete). `loss` None or non-finite
    with status completed counts as a failure, like a diverged run.
    """
    outcomes = sorted(outcomes, key=lambda o: o[0])
    verdicts, best, passed, high, state = [], math.inf, math.nan, math.nan, "open"
    for j, (batch, loss, status) in enumerate(outcomes):
        if state != "open":
            verdicts.append(NOT_NEEDED)
        elif status == UNFINISHED or status in UNFINISHED_STATUSES:
            verdicts.append("unfinished")
            state = "incomplete"
        elif loss is None or not math.isfinite(loss) or status != "completed":
            verdicts.append(status if status in ("diverged", "failed") else "diverged")
            high, state = float(batch), "closed"
        elif j == 0 or loss <= (1.0 + tolerance) * best:
            verdicts.append("pass")
            passed, best = float(batch), min(best, loss)
        else:
            verdicts.append("fail")
            high, state = float(batch), "closed"
    if state == "incomplete":
        return verdicts, math.nan, passed, math.nan, False
    return verdicts, passed, passed, (math.inf if state == "open" else high), True


# ----------------------------------------------------------------------------------------------------------------
# reading a branched study


@dataclass
class BranchedStudy:
    source: str
    settings: dict[str, Setting]
    base_runs: dict[str, Path]
    """Setting name -> its base run directory (for B_simple along t)."""
    branches: list[Branch]
    loss_kind: str
    """'raw', 'ewa' or 'best': the loss compared."""
    notes: list[str] = field(default_factory=list)
    seq_len: int | None = None

    @property
    def unfinished(self) -> list[str]:
        return [b.run for b in self.branches if b.status == UNFINISHED]


def is_branched(study_dir: Path) -> bool:
    """Whether a study directory holds a branched study (by its first run's config; readers check the rest)."""
    runs_dir = study_dir / "runs"
    if not runs_dir.is_dir():
        return False
    for run in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        config = _config_path(run)
        if config is not None:
            return study_method(read_yaml(config)) == "branched"
    return False


def _config_path(run: Path) -> Path | None:
    """config.yaml (written by pretrain when the run starts), else run.yaml (the study's input to it)."""
    for name in ("config.yaml", "run.yaml"):
        if (run / name).is_file():
            return run / name
    return None


def read_branched(study_dir: Path, target_kind: str | TargetKind = TargetKind.EWA) -> BranchedStudy:
    """Every base and branch run of a branched study directory; InputError when it is malformed or empty."""
    runs_dir = study_dir / "runs"
    if not runs_dir.is_dir():
        raise InputError(f"{study_dir}: not a study directory (no runs/ inside)")
    settings: dict[str, Setting] = {}
    bases, branches, seq_lens = {}, [], set()
    for run in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        path = _config_path(run)
        if path is None:
            continue
        config = read_yaml(path)
        if study_method(config) != "branched":
            raise InputError(f"{path}: study.method is {study_method(config)!r} in a branched study directory: one "
                             "study directory holds the runs of one study; move the other study's runs out")
        setting = _setting(config, path, settings)
        seq_lens.add(seq_len_of(config))
        study = config["study"]
        if study.get("reference") is True:
            bases[setting.name] = run
        elif isinstance(study.get("branch"), dict):
            branches.append(_branch(run, path, config, setting))
        else:
            raise InputError(f"{path}: a branched study's run has either study.reference: true (a base run) or a "
                             "study.branch mapping (a branch); this one has neither: rerun `cbs study` to rewrite it")
    if not any(b.status != UNFINISHED for b in branches):
        raise InputError(f"{study_dir}: no finished branch ({len(branches)} branch run(s) without a final "
                         "result.json); run the study first")
    _check_duplicates(branches)
    kind, notes = _loss_kind(branches, TargetKind(target_kind))
    seq_lens.discard(None)
    return BranchedStudy(str(study_dir), settings, bases, branches, kind, notes,
                         seq_lens.pop() if len(seq_lens) == 1 else None)


def _setting(config: dict, where: Path, settings: dict[str, Setting]) -> Setting:
    entries = config["study"].get("settings") if isinstance(config.get("study"), dict) else None
    if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], dict):
        raise InputError(f"{where}: study.settings must list the one setting of a branched run "
                         "({name, model_params, tokens})")
    e = entries[0]
    if not isinstance(e.get("name"), str) or not e["name"]:
        raise InputError(f"{where}: study.settings[0] must have a name")
    s = Setting(e["name"], positive_int(e.get("model_params"), f"{where}: study.settings[0].model_params"),
                positive_int(e.get("tokens"), f"{where}: study.settings[0].tokens"))
    known = settings.setdefault(s.name, s)
    if known != s:
        raise InputError(f"{where}: setting {s.name!r} has model_params/tokens {s.model_params}/{s.tokens}, elsewhere "
                         f"{known.model_params}/{known.tokens}; one name must mean one setting")
    return known


def _branch(run: Path, path: Path, config: dict, setting: Setting) -> Branch:
    b = config["study"]["branch"]
    key = f"{path}: study.branch"
    if b.get("setting") != setting.name:
        raise InputError(f"{key}.setting is {b.get('setting')!r}, study.settings names {setting.name!r}; rerun "
                         "`cbs study` to rewrite the run's config")
    tolerance = as_float(b.get("tolerance"))
    if tolerance is None or not (0 <= tolerance < 1):
        raise InputError(f"{key}.tolerance must be a number in [0, 1): got {b.get('tolerance')!r}")
    status, raw, ewa = UNFINISHED, None, None
    result_path = run / "result.json"
    if result_path.is_file():
        result = read_json(result_path)
        if result.get("status") in UNFINISHED_STATUSES:
            status = UNFINISHED
        else:
            status = check_status(result, result_path)
            raw, ewa = _final_losses(result, result_path)
    return Branch(run.name, setting.name, str(b.get("base_run") or ""),
                  positive_int(b.get("base_batch"), f"{key}.base_batch"),
                  positive_int(b.get("base_tokens"), f"{key}.base_tokens"),
                  positive_int(config.get("global_batch_seqs"), f"{path}: global_batch_seqs"), tolerance, status,
                  raw, ewa)


def _final_losses(result: dict, where: Path) -> tuple[float | None, float | None]:
    final = result.get("final") or {}
    if not isinstance(final, dict):
        raise InputError(f"{where}: final must be a mapping of eval losses")
    if result.get("status") == "completed" and RAW_LOSS_KEY not in final:
        raise InputError(f"{where}: a completed branch has no final {RAW_LOSS_KEY}; its last eval did not run: "
                         "rerun the branch (delete its directory and run `cbs study` again)")
    raw = as_float(final.get(RAW_LOSS_KEY))
    ewa = [as_float(v) for k, v in final.items() if k.startswith(EWA_LOSS_PREFIX)]
    finite = [v for v in ewa if v is not None and math.isfinite(v)]
    return raw, (min(finite) if finite else (math.nan if ewa else None))


def _check_duplicates(branches: list[Branch]) -> None:
    seen: dict[tuple, str] = {}
    for b in branches:
        key = (b.setting, b.base_tokens, b.batch)
        if key in seen:
            raise InputError(f"runs {seen[key]} and {b.run} are both the branch of {b.setting} at t = {b.base_tokens} "
                             f"tokens and batch {b.batch}: keep one (move the other out of runs/)")
        seen[key] = b.run


def _loss_kind(branches: list[Branch], kind: TargetKind) -> tuple[str, list[str]]:
    """EWA (or best) only when every finished branch recorded EWA losses; raw otherwise, saying why."""
    finished = [b for b in branches if b.status == "completed"]
    if kind is TargetKind.RAW:
        return "raw", []
    if finished and all(b.ewa_loss is not None for b in finished):
        return kind.value, []
    return "raw", [f"the branches recorded no EWA eval loss (no {EWA_LOSS_PREFIX}* in result.json final), so the "
                   f"raw weights' {RAW_LOSS_KEY} is compared although --target-kind is {kind.value}"]


def branch_loss(b: Branch, kind: str) -> float | None:
    if kind == "raw":
        return b.raw_loss
    if kind == "ewa":
        return b.ewa_loss
    candidates = [v for v in (b.raw_loss, b.ewa_loss) if v is not None and math.isfinite(v)]
    return min(candidates) if candidates else b.raw_loss


# ----------------------------------------------------------------------------------------------------------------
# the curve CBS(t)


def cbs_curve(study: BranchedStudy, tolerance: float | None = None) -> list[LocalCbs]:
    """The local CBS of every (setting, t), sorted by setting (N, D, name) and t."""
    groups: dict[tuple[str, int], list[Branch]] = {}
    for b in study.branches:
        groups.setdefault((b.setting, b.base_tokens), []).append(b)
    order = sorted(groups, key=lambda k: (study.settings[k[0]].model_params, study.settings[k[0]].tokens, k))
    return [_point(study, groups[key], tolerance) for key in order]


def _point(study: BranchedStudy, branches: list[Branch], override: float | None) -> LocalCbs:
    branches = sorted(branches, key=lambda b: b.batch)
    tolerances = {b.tolerance for b in branches}
    if override is None and len(tolerances) > 1:
        raise InputError(f"the branches of {branches[0].setting} at t = {branches[0].base_tokens} tokens have "
                         f"tolerances {sorted(tolerances)}: give --tolerance to choose one")
    tolerance = override if override is not None else tolerances.pop()
    losses = [branch_loss(b, study.loss_kind) for b in branches]
    verdicts, cbs, low, high, complete = local_cbs(
        [(b.batch, loss, b.status) for b, loss in zip(branches, losses)], tolerance)
    judged = tuple(BranchVerdict(b.batch, loss, b.status, v, b.run) for b, loss, v in zip(branches, losses, verdicts))
    return LocalCbs(study.settings[branches[0].setting], branches[0].base_tokens, branches[0].base_batch, tolerance,
                    judged, cbs, low, high, complete, _note(judged, cbs, high, complete))


def _note(verdicts: tuple[BranchVerdict, ...], cbs: float, high: float, complete: bool) -> str:
    if not complete:
        missing = [v.batch for v in verdicts if v.verdict == "unfinished"]
        return f"incomplete: the branch at batch {missing[0]} has not finished"
    if math.isnan(cbs):
        return f"no batch passes: the branch at the smallest batch ({verdicts[0].batch}) {verdicts[0].verdict}"
    if math.isinf(high):
        return "every batch passes: CBS(t) is at least the largest batch; add larger ones"
    return ""


def check_tolerance(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and 0 <= value < 1):
        raise InputError(f"--tolerance must be a number in [0, 1): got {value}")
    return value

