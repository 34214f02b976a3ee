"""Steps-to-target table: for each setting (model, data budget) and global batch size, S(B).

S(B) is the smallest number of optimizer steps after which the eval loss is <= the setting's target loss,
minimised over the runs (hyper-parameters) tried at that batch size (Zhang et al. 2025, arXiv 2410.21676, sec. 2).

What each run says (docs/method.md, "Steps to target" and "Censored fit"):
- a crossing recorded in result.json is an observation, whatever the run's status: pretrain stops updating
  crossings when a run diverges, so every recorded crossing precedes the divergence. A point whose best run
  diverged later is flagged (`diverged_after`), since its hyper-parameters sit at the edge of stability;
- a *completed* run that never crossed trained `steps` steps without reaching the target: S > steps. A batch
  where every run is like that is *censored* at the smallest such bound (S(B) is a min over runs), and enters
  the fit as a lower bound;
- a diverged or failed run without a crossing is no observation (it says nothing about the best run's S);
- a run without result.json, or whose status is `preempted` (stopped by a signal, to be resumed), is unfinished;
- runs with a horizon (`study.horizon` in config.yaml: a cosine/WSD schedule ending at h x D) are one observation
  per group of horizons (`study.horizon_group`), interpolated between their final losses (cbs/analysis/horizons.py):
  censored when the longest horizon misses the target, an upper bound (`upper_bound`) when the shortest reaches it.

Two inputs:
- a study directory: `runs/<run>/config.yaml` (`global_batch_seqs`, `study.settings`, `model.seq_len`,
  `resolved.world_size`) and `runs/<run>/result.json` (`status`, `steps`, `targets[].raw|ewa` crossings);
- a CSV with columns `setting,model_params,tokens,batch_size,steps` (optional: `censored`, `runs`, `best_run`,
  `censored_at_steps`, `diverged_after`, `lost_runs`, the model's `layers` and `hidden`, so a `steps.csv` written
  by `cbs fit` reads back), taken as given; repeated (setting, batch) rows are several runs and keep the min. A
  row that repeats another exactly (or names the same run twice) is refused as a duplicate.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from cbs.analysis import InputError, horizons, read_csv_lines
from cbs.runfiles import CONFIG, ENDED, RESULT, RESUMABLE, RUNS, Status, as_float, known_statuses

CSV_COLUMNS = ("setting", "model_params", "tokens", "batch_size", "steps")
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # safe_load's semantics; libyaml is ~10x faster
_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"", "0", "false", "no", "n", "f"}


class TargetKind(str, enum.Enum):
    """Which crossing of the target counts for a run."""

    RAW = "raw"  # the raw (last-iterate) weights' eval loss
    EWA = "ewa"  # the min over the EWA decays tau recorded (the paper's choice)
    BEST = "best"  # the min of both


@dataclass(frozen=True)
class Setting:
    """One (model, data budget) of a study; `target_loss` is None for CSV input."""

    name: str
    model_params: int
    """Non-embedding parameters N."""
    tokens: int
    """Data budget D in tokens."""
    target_loss: float | None = None
    layers: int | None = None
    """The model's depth L (`model.layers` of a run's config.yaml, or a CSV's optional column); None: unknown."""
    hidden: int | None = None
    """The model's width d (`model.hidden`, or the CSV column); None: unknown. With `layers` it tells models of one
    N apart by shape (cbs/analysis/shapes.py)."""
    variant: str = ""
    """The study variant (recipe) whose runs measured this setting (`study.variant` of their config.yaml, a
    `variant` column of a CSV); empty for a study without variants. Fits are per (setting, variant)."""

    @property
    def shape(self) -> tuple[int, int] | None:
        """(layers, hidden) when both are known."""
        return (self.layers, self.hidden) if self.layers and self.hidden else None

    @property
    def compute(self) -> float:
        """Training compute C = 6 N D in FLOPs (Kaplan et al. 2020, arXiv 2001.08361, sec. 2.1)."""
        return 6.0 * self.model_params * self.tokens


@dataclass(frozen=True)
class StepsPoint:
    """S(B) for one setting and one global batch size (in sequences)."""

    setting: Setting
    batch_size: int
    steps: float | None
    """Smallest steps-to-target over the runs at this batch; None when no run reached the target."""
    runs: int
    """Runs (hyper-parameter points) at this batch, censored, diverged and failed ones included."""
    best_run: str = ""
    censored_at_steps: float | None = None
    """When no run reached the target: the fewest steps a completed run trained without reaching it (S > this);
    None when unknown or when every run diverged or failed (no observation)."""
    diverged_after: bool = False
    """The run that gives `steps` diverged after it crossed the target."""
    lost_runs: int = 0
    """Runs that diverged or failed before reaching the target: no observation."""
    upper_bound: bool = False
    """S(B) <= steps: the best group of horizon runs reached the target already at its shortest horizon (steps is
    that horizon's; the true S may be smaller). Enters the fit at `steps`, flagged in the report."""

    @property
    def censored(self) -> bool:
        return self.steps is None

    @property
    def lower_bound(self) -> bool:
        """A censored point that enters the fit as S > censored_at_steps."""
        return self.steps is None and self.censored_at_steps is not None


@dataclass(frozen=True)
class RunInfo:
    """What the time/cost table needs to know about one finished run of a study."""

    name: str
    path: Path
    batch_size: int
    world_size: int | None
    """Data-parallel ranks (`resolved.world_size` in config.yaml); None when not recorded."""
    model_params: tuple[int, ...]
    """N of the settings the run serves (one model: normally one value)."""
    reference: bool = False
    """`study.reference` in config.yaml: a run at the reference batch B0, trained to the budget."""
    settings: tuple[str, ...] = ()
    """Names of the settings the run serves."""
    device: str | None = None
    """'cpu' or 'cuda' (`resolved.device` in config.yaml, without the index); None when not recorded."""
    betas: tuple = ()
    """(beta1, beta2, the rules as recorded in `study.betas`) of config.yaml; () when not recorded."""
    variant: str = ""
    """`study.variant` in config.yaml: the recipe the run trains (empty without variants)."""
    seq_len: int | None = None
    """`model.seq_len` in config.yaml: tokens per sequence (a variant may change it)."""
    has_ewa: bool = True
    """Whether the run kept EWA weights (`ewa.taus` not empty); one without counts its raw crossings."""


@dataclass
class StepsTable:
    """The table plus what the report needs to say about where it came from."""

    points: list[StepsPoint]
    source: str
    input_kind: str
    """'study' or 'csv'."""
    target_kind: str | None = None
    finished_runs: int = 0
    unfinished_runs: list[str] = field(default_factory=list)
    seq_len: int | None = None
    """Sequence length (tokens per sequence) when all runs agree; None for CSV input or a mixed study."""
    shared_runs: bool = False
    """True when some run serves several settings (one sweep read at several budgets)."""
    runs: list[RunInfo] = field(default_factory=list)
    """Finished runs of a study (empty for CSV input)."""
    variant_order: list[str] = field(default_factory=list)
    """The study's variants in the order it lists them (`study.variants` of the runs' config.yaml); empty for a
    study without variants (cbs/analysis/variants.py)."""
    reference_variant: str | None = None
    """The variant whose reference runs set the targets every variant shares."""

    @property
    def variants(self) -> list[str]:
        """The variants with points, in the study's order ([] for a study without variants)."""
        have = {p.setting.variant for p in self.points} - {""}
        return [v for v in self.variant_order if v in have] + sorted(have - set(self.variant_order))

    def of_variant(self, variant: str) -> "StepsTable":
        """The points and runs of one variant: a table the single-recipe fit reads as a study without variants."""
        runs = [r for r in self.runs if r.variant == variant]
        seq_lens = {r.seq_len for r in runs} - {None}
        kind = _kind_label(TargetKind(self.target_kind), runs) if self.target_kind in {k.value for k in TargetKind} \
            else self.target_kind
        return StepsTable(points=[p for p in self.points if p.setting.variant == variant], source=self.source,
                          input_kind=self.input_kind, target_kind=kind, finished_runs=len(runs),
                          unfinished_runs=self.unfinished_runs, seq_len=seq_lens.pop() if len(seq_lens) == 1 else
                          (self.seq_len if self.input_kind == "csv" else None), shared_runs=self.shared_runs,
                          runs=runs)

    def settings(self) -> list[Setting]:
        unique = {p.setting.name: p.setting for p in self.points}
        return sorted(unique.values(), key=lambda s: (s.model_params, s.tokens, s.name))

    def points_of(self, name: str) -> list[StepsPoint]:
        return sorted((p for p in self.points if p.setting.name == name), key=lambda p: p.batch_size)


@dataclass(frozen=True)
class _Observation:
    """One run's (or one CSV row's) steps-to-target for one setting."""

    setting: Setting
    batch_size: int
    steps: float | None
    """None: the run did not reach the target (see censored_at / lost)."""
    runs: int
    run_name: str
    censored_at: float | None = None
    """Steps trained without reaching the target (a completed run): S > censored_at."""
    diverged: bool = False
    """The run diverged (after its crossing, when `steps` is set)."""
    lost: int = 0
    """Runs behind this observation that diverged or failed without a crossing."""
    at_most: bool = False
    """`steps` is an upper bound (horizon runs whose shortest horizon already reached the target)."""


def load_steps(path: str | Path, target_kind: str | TargetKind = TargetKind.EWA) -> StepsTable:
    """Read a study directory or a steps CSV; raise InputError if nothing can be fitted."""
    path = Path(path)
    if path.is_dir():
        table = read_study(path, TargetKind(target_kind))
    elif path.is_file():
        table = read_steps_csv(path)
    else:
        raise InputError(f"{path}: no such file or directory; give a study directory or a steps CSV")
    _check_fittable(table)
    return table


def _check_fittable(table: StepsTable) -> None:
    usable = [p for p in table.points if not p.censored]
    if not usable:
        raise InputError(f"{table.source}: no batch size reached its target loss in any setting; nothing to fit "
                         "(train longer or use higher target losses)")
    if len({p.batch_size for p in usable}) < 2:
        only = usable[0].batch_size
        raise InputError(f"{table.source}: only one batch size ({only}) has steps-to-target; a fit needs several "
                         "(add runs at other batch sizes)")


# ----------------------------------------------------------------------------------------------------------------
# reduction: min over runs at each (setting, batch)


def reduce_observations(observations: Iterable[_Observation]) -> list[StepsPoint]:
    """S(B) = min over the runs at B of their steps-to-target.

    Without a crossing at B the point is censored at the smallest bound of the completed runs (S(B) = min_r S_r
    and S_r > cap_r, so S(B) > min_r cap_r); runs that diverged or failed without a crossing add no bound.
    """
    groups: dict[tuple[str, str, int], list[_Observation]] = {}
    for ob in observations:
        groups.setdefault((ob.setting.variant, ob.setting.name, ob.batch_size), []).append(ob)
    points = []
    for (_, _, batch), obs in sorted(groups.items()):
        reached = [o for o in obs if o.steps is not None]
        best = min(reached, key=lambda o: (o.steps, o.run_name)) if reached else None
        caps = [o.censored_at for o in obs if o.steps is None and o.censored_at is not None]
        points.append(StepsPoint(
            setting=obs[0].setting, batch_size=batch, steps=best.steps if best else None,
            runs=sum(o.runs for o in obs), best_run=best.run_name if best else "",
            censored_at_steps=min(caps) if caps and not best else None,
            diverged_after=bool(best and best.diverged), lost_runs=sum(o.lost for o in obs),
            upper_bound=bool(best and best.at_most)))
    return points


def _register(settings: dict, s: Setting, where: str) -> Setting:
    """Keep one Setting per (variant, name); the same name with other numbers is an error."""
    known = settings.setdefault((s.variant, s.name), s)
    same_target = (known.target_loss is None and s.target_loss is None) or (
        known.target_loss is not None and s.target_loss is not None
        and math.isclose(known.target_loss, s.target_loss, rel_tol=1e-9))
    if (known.model_params, known.tokens, known.shape) != (s.model_params, s.tokens, s.shape) or not same_target:
        raise InputError(f"{where}: setting {s.name!r} has model_params/tokens/target_loss/shape "
                         f"{s.model_params}/{s.tokens}/{s.target_loss}/{s.shape}, elsewhere "
                         f"{known.model_params}/{known.tokens}/{known.target_loss}/{known.shape}; one name must "
                         "mean one setting: rename one of them")
    return known


# ----------------------------------------------------------------------------------------------------------------
# numbers


MAX_INPUT = 1e18
"""No step count, token count, parameter count, batch or throughput of a real run comes near it; a value above it
(1e308 from a unit slip) overflows the fit's arithmetic into NaN."""


def positive_number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise InputError(f"{what} must be a positive number: got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a positive number: got {value!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise InputError(f"{what} must be a positive number: got {value!r}")
    if x > MAX_INPUT:
        raise InputError(f"{what} must be a positive number below {MAX_INPUT:g}: got {value!r}; check its unit")
    return x


def positive_int(value: Any, what: str) -> int:
    x = positive_number(value, what)
    if not x.is_integer():
        raise InputError(f"{what} must be a whole number: got {value!r}")
    return int(x)


def _count(value: Any, what: str) -> int:
    """A whole number >= 0 (empty: 0)."""
    if value in (None, ""):
        return 0
    if value in ("0", 0):
        return 0
    return positive_int(value, what)


# ----------------------------------------------------------------------------------------------------------------
# CSV input


def read_steps_csv(path: Path) -> StepsTable:
    """Rows `setting,model_params,tokens,batch_size,steps[,censored,runs,best_run,...]` -> table (taken as given)."""
    lines = read_csv_lines(path, str(path))
    header = [c.strip() for c in lines[0]] if lines else []
    if not any(header):
        raise InputError(f"{path}: empty file; expected a header {','.join(CSV_COLUMNS)}")
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(CSV_COLUMNS)}")
    rows = [(i + 1, cells) for i, cells in enumerate(lines) if i > 0 and any(c.strip() for c in cells)]
    if not rows:
        raise InputError(f"{path}: no data rows")
    settings: dict[str, Setting] = {}
    seen: dict[tuple, int] = {}
    observations = []
    for line, cells in rows:
        where = f"{path}, line {line}"
        if len(cells) != len(header):
            raise InputError(f"{where}: {len(cells)} cells, the header has {len(header)}; fix the row (a comma "
                             "inside a value needs quotes)")
        row = {k: v.strip() for k, v in zip(header, cells)}
        _check_duplicate(row, line, where, seen)
        observations.append(_csv_observation(row, where, settings))
    return StepsTable(points=reduce_observations(observations), source=str(path), input_kind="csv")


def _check_duplicate(row: dict, line: int, where: str, seen: dict[tuple, int]) -> None:
    """Two rows for the same run, or two identical rows, are one observation entered twice."""
    keys = [("row",) + tuple(sorted(row.items()))]
    if row.get("best_run"):
        keys.append(("run", row["setting"], row["batch_size"], row["best_run"]))
    for key in keys:
        if key in seen:
            what = "repeats" if key[0] == "row" else f"gives run {row['best_run']!r} again, after"
            raise InputError(f"{where}: {what} line {seen[key]} (setting {row['setting']!r}, batch "
                             f"{row['batch_size']}); remove the duplicate, or name the runs apart in best_run")
        seen[key] = line


def _csv_observation(row: dict, where: str, settings: dict[str, Setting]) -> _Observation:
    name = row["setting"]
    if not name:
        raise InputError(f"{where}: empty setting name")
    setting = _register(settings, Setting(name, positive_int(row["model_params"], f"{where}: model_params"),
                                          positive_int(row["tokens"], f"{where}: tokens"),
                                          layers=_optional_int(row.get("layers"), f"{where}: layers"),
                                          hidden=_optional_int(row.get("hidden"), f"{where}: hidden"),
                                          variant=row.get("variant") or ""), where)
    censored = _csv_bool(row.get("censored", ""), f"{where}: censored")
    if censored and row.get("steps"):
        raise InputError(f"{where}: censored is {row['censored']!r} but steps is {row['steps']!r}; a censored row "
                         "has empty steps (put the steps trained in censored_at_steps)")
    steps = None if censored else positive_number(row["steps"], f"{where}: steps")
    cap = row.get("censored_at_steps") or ""
    return _Observation(
        setting, positive_int(row["batch_size"], f"{where}: batch_size"), steps,
        positive_int(row["runs"], f"{where}: runs") if row.get("runs") else 1, row.get("best_run") or "",
        censored_at=positive_number(cap, f"{where}: censored_at_steps") if cap and censored else None,
        diverged=_csv_bool(row.get("diverged_after", ""), f"{where}: diverged_after"),
        lost=_count(row.get("lost_runs"), f"{where}: lost_runs"),
        at_most=_csv_bool(row.get("upper_bound", ""), f"{where}: upper_bound") and not censored)


def _optional_int(value: Any, what: str) -> int | None:
    """An optional whole number > 0 (a CSV cell or a config value): None when absent or empty."""
    return None if value in (None, "") else positive_int(value, what)


def _csv_bool(value: str, what: str) -> bool:
    v = (value or "").strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise InputError(f"{what} must be true/false (or 1/0): got {value!r}")


# ----------------------------------------------------------------------------------------------------------------
# study directory input


def _kind_label(target_kind: TargetKind, runs: list) -> str:
    """The crossing the table reports: --target-kind, or raw where no run kept EWA weights (each such run is read
    at its raw weights: schedule-free runs, `ewa_taus: []`)."""
    if target_kind is TargetKind.EWA and runs and not any(r.has_ewa for r in runs):
        return "raw (the runs keep no EWA weights)"
    return target_kind.value


def read_study(study_dir: Path, target_kind: TargetKind) -> StepsTable:
    """`runs/*/config.yaml` + `result.json` -> table; runs without a final result.json are counted as unfinished."""
    runs_dir = study_dir / RUNS
    if not runs_dir.is_dir():
        raise InputError(f"{study_dir}: not a study directory (no runs/ inside) and not a CSV file")
    run_dirs = sorted(p for p in runs_dir.iterdir() if p.is_dir())
    results = {p: read_json(p / RESULT) for p in run_dirs if (p / RESULT).is_file()}
    finished = [p for p in run_dirs if p in results and results[p].get("status") not in RESUMABLE]
    unfinished = [p.name for p in run_dirs if p not in finished]
    if not finished:
        raise InputError(f"{study_dir}: no finished runs ({len(unfinished)} run director(y/ies) without a final "
                         "result.json); run the study first")
    settings: dict[tuple, Setting] = {}
    observations, seq_lens, shared, infos, order = [], set(), False, [], {}
    groups: dict[str, list] = {}
    group_kinds: dict[str, TargetKind] = {}
    for run in finished:
        config = read_yaml(run / CONFIG)
        _check_sweep_run(config, run / CONFIG)
        variant = _variant(config, run / CONFIG)
        run_settings = _run_settings(config, run / CONFIG, settings, variant)
        shared |= len(run_settings) > 1
        seq_lens.add(seq_len_of(config))
        batch = positive_int(config.get("global_batch_seqs"), f"{run / CONFIG}: global_batch_seqs")
        kind = target_kind if target_kind is not TargetKind.EWA or _has_ewa(config) else TargetKind.RAW
        horizon = _horizon(config, run / CONFIG)
        if horizon is not None:
            groups.setdefault(horizon[1], []).append((run, batch, horizon[0], results[run], run_settings))
            group_kinds[horizon[1]] = kind
        else:
            observations += _run_observations(run, batch, results[run], run_settings, kind)
        infos.append(RunInfo(run.name, run, batch, _world_size(config),
                             tuple(sorted({s.model_params for s in run_settings})),
                             _study(config).get("reference") is True, tuple(s.name for s in run_settings),
                             _device(config), _betas(config), variant, seq_len_of(config), _has_ewa(config)))
        if variant:
            order.setdefault(tuple(_study(config).get("variants") or ()), _study(config).get("reference_variant"))
    observations += [_horizon_observation(name, members, group_kinds[name])
                     for name, members in sorted(groups.items())]
    seq_lens.discard(None)
    table = StepsTable(points=reduce_observations(observations), source=str(study_dir), input_kind="study",
                       target_kind=_kind_label(target_kind, infos), finished_runs=len(finished), unfinished_runs=unfinished,
                       seq_len=seq_lens.pop() if len(seq_lens) == 1 else None, shared_runs=shared, runs=infos)
    if order:
        table.variant_order, table.reference_variant = list(max(order, key=len)), order[max(order, key=len)]
    return table


def _variant(config: dict, where: Path) -> str:
    """`study.variant` of a run's config.yaml: the recipe it trains ('' without variants)."""
    variant = _study(config).get("variant")
    if variant is None:
        return ""
    if not isinstance(variant, str) or not variant:
        raise InputError(f"{where}: study.variant must be a variant name: got {variant!r}")
    return variant


def _has_ewa(config: dict) -> bool:
    """Whether the run kept EWA weights (`ewa.taus` in config.yaml). A run trained without them (a variant's
    ablation, `hparams.ewa_taus: []`) has only raw crossings, and --target-kind ewa reads those for it; a
    config.yaml without the key (hand-made) is taken to have them, as before."""
    ewa = config.get("ewa")
    return not (isinstance(ewa, dict) and isinstance(ewa.get("taus"), list) and not ewa["taus"])


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"{path}: cannot read YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a YAML mapping")
    return data


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read JSON: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def _study(config: dict) -> dict:
    study = config.get("study")
    return study if isinstance(study, dict) else {}


def study_method(config: dict) -> str:
    """`study.method` of a run's config.yaml: 'sweep' (the default, also for configs written before the key) or
    'branched'."""
    method = _study(config).get("method")
    return method if isinstance(method, str) and method else "sweep"


def _check_sweep_run(config: dict, where: Path) -> None:
    if study_method(config) != "sweep":
        raise InputError(f"{where}: study.method is {study_method(config)!r} in a directory read as a sweep study: "
                         "one study directory holds the runs of one study; move the other study's runs out")


def _run_settings(config: dict, where: Path, settings: dict, variant: str = "") -> list[Setting]:
    study = config.get("study")
    entries = study.get("settings") if isinstance(study, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{where}: study.settings must be a non-empty list of "
                         "{name, model_params, tokens, target_loss}")
    out = []
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    shape = {k: _optional_int(model.get(k), f"{where}: model.{k}") for k in ("layers", "hidden")}
    for i, e in enumerate(entries):
        key = f"{where}: study.settings[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"]:
            raise InputError(f"{key} must be a mapping with a name")
        s = Setting(e["name"], positive_int(e.get("model_params"), f"{key}.model_params"),
                    positive_int(e.get("tokens"), f"{key}.tokens"),
                    positive_number(e.get("target_loss"), f"{key}.target_loss"), variant=variant, **shape)
        out.append(_register(settings, s, str(where)))
    return out


def seq_len_of(config: dict) -> int | None:
    model = config.get("model")
    value = model.get("seq_len") if isinstance(model, dict) else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _world_size(config: dict) -> int | None:
    resolved = config.get("resolved")
    value = resolved.get("world_size") if isinstance(resolved, dict) else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _betas(config: dict) -> tuple:
    """(beta1, beta2, rules) of a run's config.yaml: its optimizer's values and `study.betas` (the rules a study
    chose them by; docs/method.md, "AdamW betas per batch"); () for configs written before the rules were."""
    optimizer, rules = config.get("optimizer"), _study(config).get("betas")
    if not isinstance(optimizer, dict) or not isinstance(rules, dict):
        return ()
    rule = f"beta1 {rules.get('beta1_rule')}, beta2 {rules.get('beta2_rule')}"
    return optimizer.get("beta1"), optimizer.get("beta2"), rule + (f" ({rules['formula']})" if rules.get("formula")
                                                                  else "")


def _device(config: dict) -> str | None:
    resolved = config.get("resolved")
    value = resolved.get("device") if isinstance(resolved, dict) else None
    return value.split(":")[0] if isinstance(value, str) and value else None


def check_status(result: dict, where: Path) -> Status:
    """result.json's status, one of runfiles.ENDED; InputError naming every status result.json may hold
    otherwise (callers set the RESUMABLE ones apart first)."""
    status = result.get("status")
    if status not in ENDED:
        raise InputError(f"{where}: status must be one of {known_statuses()}: got {status!r}")
    return Status(status)


def _run_observations(run: Path, batch: int, result: dict, run_settings: list[Setting],
                      kind: TargetKind) -> list[_Observation]:
    """One observation per setting the run serves (see the module docstring for what each status means)."""
    where = run / RESULT
    status = check_status(result, where)
    targets = result.get("targets") or []
    if not isinstance(targets, list):
        raise InputError(f"{where}: targets must be a list")
    trained = as_float(result.get("steps"))
    cap = trained if status == Status.COMPLETED and trained is not None and math.isfinite(trained) and trained > 0 \
        else None
    out = []
    for s in run_settings:
        try:
            target = _find_target(targets, s, required=status == Status.COMPLETED)
            steps = steps_to_target(target, kind) if target is not None else None
        except ValueError as e:
            raise InputError(f"{where}: {e}") from None
        lost = int(steps is None and status != Status.COMPLETED)
        out.append(_Observation(s, batch, steps, 1, run.name, censored_at=cap if steps is None else None,
                                diverged=status == Status.DIVERGED, lost=lost))
    return out


def _horizon(config: dict, where: Path) -> tuple[float, str] | None:
    try:
        return horizons.horizon_of(_study(config))
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None


def _horizon_observation(group: str, members: list, kind: TargetKind) -> _Observation:
    """One observation from the finished horizon runs of one group (cbs/analysis/horizons.py)."""
    run, batch, _, _, run_settings = members[0]
    if len(run_settings) != 1 or any((m[1], m[4]) != (batch, run_settings) for m in members):
        raise InputError(f"{run / CONFIG}: the runs of horizon group {group!r} must serve one setting at one "
                         "batch size; one study directory holds the runs of one study")
    setting, points, lost = run_settings[0], [], 0
    for path, _, h, result, _ in members:
        status = check_status(result, path / "result.json")
        loss = horizons.final_loss(result, kind.value)
        lost += int(loss is None and status != "completed")
        steps = as_float(result.get("steps"))
        if steps is not None and steps > 0:
            points.append(horizons.HorizonRun(path.name, h, steps, loss))
    est = horizons.estimate(points, setting.target_loss)
    return _Observation(setting, batch, est.steps, len(members), est.run_name or group,
                        censored_at=est.censored_at, lost=lost, at_most=est.upper_bound)


def _find_target(targets: list, s: Setting, required: bool) -> dict | None:
    for t in targets:
        if isinstance(t, dict) and isinstance(t.get("loss"), (int, float)) and math.isclose(
                float(t["loss"]), s.target_loss, rel_tol=1e-9):
            return t
    if not required:  # a diverged or failed run may stop before its targets were written
        return None
    raise ValueError(f"no entry in targets with loss {s.target_loss} (setting {s.name}); the run was trained for "
                     "other targets: rerun it with the study's config")


def steps_to_target(target: dict, kind: TargetKind) -> float | None:
    """Steps at which one run first reached one target: raw, min over EWA decays, or the min of both.

    A crossing counts `step_interp` (the eval curve interpolated to the target) when recorded, else `step`;
    None (never reached) is censoring; a recorded step that is not a positive number raises ValueError.
    """
    raw = _crossing_steps(target.get("raw"))
    ewa_map = target.get("ewa") or {}
    ewa_all = [_crossing_steps(c) for c in ewa_map.values()] if isinstance(ewa_map, dict) else []
    ewa = min((x for x in ewa_all if x is not None), default=None)
    choices = {TargetKind.RAW: [raw], TargetKind.EWA: [ewa], TargetKind.BEST: [raw, ewa]}[kind]
    return min((x for x in choices if x is not None), default=None)


def _crossing_steps(crossing: Any) -> float | None:
    if not isinstance(crossing, dict):
        return None
    for key in ("step_interp", "step"):
        value = crossing.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"crossing {key} must be a positive number: got {value!r}")
        return float(value)
    return None
