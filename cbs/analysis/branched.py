"""Branched local CBS (Merrill et al. 2025, arXiv 2505.23971; docs/method.md, "Branched local CBS"): from
checkpoints of one base run at batch B taken after t tokens, short branches at batches b_1 < b_2 < ... train the
same number of tokens; the local CBS at t is the largest batch that loses nothing measurable against the smaller
ones, by the rule the study chose (cbs/analysis/branch_rules.py): `absolute` (Merrill et al.'s, the default: the
largest batch within epsilon nats, plus an allowance for eval noise, of every smaller batch) or `relative` (a
chain: each batch within (1 + tolerance) of the best smaller one, up to the first that is not).

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
tolerance, rule, epsilon_nats}` (a branch without `rule` was planned under the relative rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from cbs.analysis import InputError
from cbs.analysis.branch_rules import NOT_NEEDED, RULES, UNFINISHED, Rule, judge, noise_interval  # noqa: F401
from cbs.analysis.steps import (
    Setting, TargetKind, as_float, check_status, positive_int, read_json, read_yaml, seq_len_of, study_method,
)
from cbs.runfiles import CONFIG, EVAL_LOSS, EVAL_LOSS_EWA_PREFIX, RESULT, RESUMABLE, RUN_INPUT, RUNS, Status

RAW_LOSS_KEY = EVAL_LOSS
"""result.json `final`'s raw eval loss."""
EWA_LOSS_PREFIX = EVAL_LOSS_EWA_PREFIX
DEFAULT_EPSILON_NATS = 0.01


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
    rule: str = "relative"
    epsilon_nats: float = DEFAULT_EPSILON_NATS


@dataclass(frozen=True)
class BranchVerdict:
    """One batch of one branch point, judged."""

    batch: int
    loss: float | None
    """The loss compared (None: no finite loss)."""
    status: str
    verdict: str
    """'pass', 'fail' (loss above the tolerance), 'diverged' / 'failed' (the run did: fails its batch),
    'unfinished' (the point is incomplete), 'pending' (waits on an unfinished smaller branch) or 'not needed'
    (after the search ended)."""
    run: str = ""


@dataclass(frozen=True)
class LocalCbs:
    """The local CBS of one setting at one branch point t."""

    setting: Setting
    tokens: int
    """t, tokens the base run had seen."""
    base_batch: int
    tolerance: float
    """The rule's threshold: epsilon in nats (absolute) or the relative tolerance."""
    verdicts: tuple[BranchVerdict, ...]
    cbs: float
    """The largest passing batch; NaN when incomplete or when no batch passes."""
    cbs_low: float
    """= cbs; for an incomplete point the largest batch passed so far (a lower bound), NaN if none."""
    cbs_high: float
    """The first failing batch; inf when every batch passes; NaN when incomplete."""
    complete: bool
    note: str = ""
    rule: str = "relative"
    eval_noise: float = math.nan
    """sigma, the relative s.d. of a branch's eval loss used (estimated or given; NaN: unknown)."""
    noise_low: float = math.nan
    noise_high: float = math.nan
    """The 95% interval of the CBS under eval noise (branch_rules.noise_interval); NaN without sigma."""

    @property
    def missing(self) -> list[str]:
        return [v.run for v in self.verdicts if v.status == UNFINISHED]


def local_cbs(outcomes: list[tuple[int, float | None, str]], tolerance: float) -> tuple[list[str], float, float,
                                                                                        float, bool]:
    """The relative rule on (batch, loss, status) outcomes of one branch point (branch_rules.judge).

    Returns (verdict per outcome in batch order, cbs, cbs_low, cbs_high, complete).
    """
    return judge(outcomes, Rule("relative", tolerance))


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
    runs_dir = study_dir / RUNS
    if not runs_dir.is_dir():
        return False
    for run in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        config = _config_path(run)
        if config is not None:
            return study_method(read_yaml(config)) == "branched"
    return False


def _config_path(run: Path) -> Path | None:
    """config.yaml (written by pretrain when the run starts), else run.yaml (the study's input to it)."""
    for name in (CONFIG, RUN_INPUT):
        if (run / name).is_file():
            return run / name
    return None


def read_branched(study_dir: Path, target_kind: str | TargetKind = TargetKind.EWA) -> BranchedStudy:
    """Every base and branch run of a branched study directory; InputError when it is malformed or empty."""
    runs_dir = study_dir / RUNS
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
    rule = b.get("rule", "relative")  # branches planned before the absolute rule existed
    if rule not in RULES:
        raise InputError(f"{key}.rule must be one of {', '.join(RULES)}: got {rule!r}")
    epsilon = as_float(b.get("epsilon_nats", DEFAULT_EPSILON_NATS))
    if epsilon is None or not (math.isfinite(epsilon) and epsilon >= 0):
        raise InputError(f"{key}.epsilon_nats must be a number >= 0: got {b.get('epsilon_nats')!r}")
    status, raw, ewa = UNFINISHED, None, None
    result_path = run / RESULT
    if result_path.is_file():
        result = read_json(result_path)
        if result.get("status") in RESUMABLE:
            status = UNFINISHED
        else:
            status = check_status(result, result_path)
            raw, ewa = _final_losses(result, result_path)
    return Branch(run.name, setting.name, str(b.get("base_run") or ""),
                  positive_int(b.get("base_batch"), f"{key}.base_batch"),
                  positive_int(b.get("base_tokens"), f"{key}.base_tokens"),
                  positive_int(config.get("global_batch_seqs"), f"{path}: global_batch_seqs"), tolerance, status,
                  raw, ewa, rule, epsilon)


def _final_losses(result: dict, where: Path) -> tuple[float | None, float | None]:
    final = result.get("final") or {}
    if not isinstance(final, dict):
        raise InputError(f"{where}: final must be a mapping of eval losses")
    if result.get("status") == Status.COMPLETED and RAW_LOSS_KEY not in final:
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
    finished = [b for b in branches if b.status == Status.COMPLETED]
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


@dataclass(frozen=True)
class RuleChoice:
    """What `cbs fit` was told (None: what the branches recorded; eval_noise None: estimated per setting)."""

    rule: str | None = None
    tolerance: float | None = None
    epsilon_nats: float | None = None
    eval_noise: float | None = None


def cbs_curve(study: BranchedStudy, choice: RuleChoice = RuleChoice(),
              eval_noise: dict[str, float] | None = None) -> list[LocalCbs]:
    """The local CBS of every (setting, t), sorted by setting (N, D, name) and t. `eval_noise`: setting name ->
    sigma estimated from its base run (branch_rules.eval_noise), used where choice.eval_noise is None."""
    groups: dict[tuple[str, int], list[Branch]] = {}
    for b in study.branches:
        groups.setdefault((b.setting, b.base_tokens), []).append(b)
    order = sorted(groups, key=lambda k: (study.settings[k[0]].model_params, study.settings[k[0]].tokens, k))
    noise = eval_noise or {}
    return [_point(study, groups[key], choice,
                   choice.eval_noise if choice.eval_noise is not None else noise.get(key[0], math.nan))
            for key in order]


def _agreed(branches: list[Branch], attr: str, given, flag: str):
    """The value every branch of a point recorded for `attr`, unless `flag` gave one."""
    if given is not None:
        return given
    values = {getattr(b, attr) for b in branches}
    if len(values) > 1:
        raise InputError(f"the branches of {branches[0].setting} at t = {branches[0].base_tokens} tokens have "
                         f"{attr} {sorted(values)}: give {flag} to choose one")
    return values.pop()


def point_rule(branches: list[Branch], choice: RuleChoice, sigma: float) -> Rule:
    """The rule of one branch point: --rule or the recorded one, with its threshold and the eval noise."""
    kind = _agreed(branches, "rule", choice.rule, "--rule")
    if kind == "relative":
        return Rule(kind, _agreed(branches, "tolerance", choice.tolerance, "--tolerance"), sigma)
    return Rule(kind, _agreed(branches, "epsilon_nats", choice.epsilon_nats, "--epsilon"), sigma)


def _point(study: BranchedStudy, branches: list[Branch], choice: RuleChoice, sigma: float) -> LocalCbs:
    branches = sorted(branches, key=lambda b: b.batch)
    rule = point_rule(branches, choice, sigma)
    losses = [branch_loss(b, study.loss_kind) for b in branches]
    outcomes = [(b.batch, loss, b.status) for b, loss in zip(branches, losses)]
    verdicts, cbs, low, high, complete = judge(outcomes, rule)
    noise_low, noise_high = noise_interval(outcomes, rule, sigma)
    judged = tuple(BranchVerdict(b.batch, loss, b.status, v, b.run) for b, loss, v in zip(branches, losses, verdicts))
    return LocalCbs(study.settings[branches[0].setting], branches[0].base_tokens, branches[0].base_batch,
                    rule.threshold, judged, cbs, low, high, complete, _note(judged, cbs, high, complete), rule.kind,
                    sigma, noise_low, noise_high)


def _note(verdicts: tuple[BranchVerdict, ...], cbs: float, high: float, complete: bool) -> str:
    if not complete:
        missing = [v.batch for v in verdicts if v.verdict == UNFINISHED]
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


def check_rule_choice(choice: RuleChoice) -> RuleChoice:
    """Exit-2 errors for --rule, --tolerance, --epsilon and --eval-noise out of range."""
    check_tolerance(choice.tolerance)
    if choice.rule is not None and choice.rule not in RULES:
        raise InputError(f"--rule must be one of {', '.join(RULES)}: got {choice.rule!r}")
    for flag, value in (("--epsilon", choice.epsilon_nats), ("--eval-noise", choice.eval_noise)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InputError(f"{flag} must be a number >= 0: got {value}")
    return choice

