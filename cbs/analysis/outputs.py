"""The files of `cbs fit`: steps.csv, cbs.csv, degradation.csv, time_to_target.csv, scaling.json, report.md and
figures/*.png, rendered in memory first (`render_outputs`: relative path -> bytes), then written into a temp
directory beside OUT_DIR that replaces OUT_DIR by rename (`write_outputs`): an error or a kill leaves the old
OUT_DIR or none, never a half-written one."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from cbs.analysis import InputError
from cbs.analysis.cost import fastest
from cbs.analysis.figures import render_figures
from cbs.analysis.laws import json_num, law_to_json
from cbs.analysis.report import report_md
from cbs.analysis.study_fit import StudyFit, study_warnings
from cbs.runfiles import atomic_write_bytes, staged_directory

SCALING_VERSION = 2
"""1: laws.tokens / laws.model_params only. 2: adds laws.compute, laws.joint, laws_weighted, laws_b_noise,
laws_s_min, collinearity, excluded settings, warnings and throughput; version 1 keys are unchanged."""
CBS_COLUMNS = ["setting", "model_params", "tokens", "s_min", "b_noise", "cbs", "cbs_low", "cbs_high",
               "s_min_low", "s_min_high", "b_noise_low", "b_noise_high", "reference_batch", "n_batches", "note",
               "n_censored", "residual_sd", "max_abs_residual", "r2", "b0_share", "in_laws", "in_b_noise_laws",
               "law_note", "lack_of_fit", "noise_sd", "noise_dof", "layers", "hidden", "warnings", "b_simple",
               "b_simple_source", "b_simple_unusable"]
"""`in_laws`: a point in the CBS laws; `in_b_noise_laws`: in the B_noise and S_min laws; `law_note`: why not (a
one-sided bound, lack of fit, no fit); `lack_of_fit`: the hyperbola does not describe the setting (why in
`warnings`); `noise_sd`, `noise_dof`: the residual scale of log S its intervals used (pooled over the study);
`layers`, `hidden`: the model's shape (empty when unknown)."""
STEPS_COLUMNS = ["setting", "model_params", "tokens", "batch_size", "steps", "censored", "runs", "best_run",
                 "censored_at_steps", "diverged_after", "lost_runs", "fitted_steps", "residual", "layers", "hidden",
                 "upper_bound"]
DEGRADATION_COLUMNS = ["setting", "overhead", "cbs", "cbs_low", "cbs_high"]
TIME_COLUMNS = ["setting", "batch_size", "gpus", "steps", "tokens_to_target", "tokens_per_s", "hours",
                "gpu_hours", "throughput", "fastest"]
FIT_MARKER = ".cbs-fit.json"
"""Written into every fit output: the relative paths of the files that fit wrote. A directory is replaced only if
it holds this marker and nothing else than those files."""
LEGACY_FILES = ("steps.csv", "cbs.csv", "degradation.csv", "time_to_target.csv", "scaling.json", "report.md",
                "cbs_curve.csv", "branches.csv", "ramp.csv")
"""What a fit wrote before the marker existed (besides figures/*.png): a directory of only these, holding one of
LEGACY_MAIN_TABLES, is a previous fit's output (a study made before the marker re-fits)."""
LEGACY_MAIN_TABLES = ("scaling.json", "cbs.csv", "cbs_curve.csv", "ramp.csv")
"""One per kind of fit (sweep, branched, ramp)."""


# ----------------------------------------------------------------------------------------------------------------
# tables


def _cell(v) -> str:
    """CSV cell: ints as ints, floats at full precision, NaN/None empty, inf as 'inf'."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return repr(v) if not v.is_integer() or abs(v) > 1e15 else str(int(v))
    return str(v)


def csv_bytes(columns: list[str], rows: list[list]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows([[_cell(v) for v in row] for row in rows])
    return buf.getvalue().encode("utf-8")


def steps_csv(fit: StudyFit) -> bytes:
    return csv_bytes(STEPS_COLUMNS, steps_rows(fit))


def steps_rows(fit: StudyFit) -> list[list]:
    """One row per (setting, batch); `fitted_steps` on the setting's curve, `residual` = log S - log fitted."""
    fits = {e.setting.name: e.fit for e in fit.estimates}
    rows = []
    for s in fit.table.settings():
        f = fits.get(s.name)
        for p in fit.table.points_of(s.name):
            fitted = float(f.steps(p.batch_size)) if f is not None else None
            residual = math.log(p.steps / fitted) if fitted and not p.censored else None
            rows.append([s.name, s.model_params, s.tokens, p.batch_size, p.steps, p.censored, p.runs, p.best_run,
                         p.censored_at_steps, p.diverged_after, p.lost_runs, fitted, residual, s.layers, s.hidden,
                         p.upper_bound])
    return rows


def cbs_csv(fit: StudyFit) -> bytes:
    return csv_bytes(CBS_COLUMNS, cbs_rows(fit))


def cbs_rows(fit: StudyFit) -> list[list]:
    """One row per setting, in CBS_COLUMNS order."""
    in_laws = set(next(iter(fit.laws.cbs.values())).settings) if fit.laws.cbs else set()
    in_noise_laws = set(next(iter(fit.laws.b_noise.values())).settings) if fit.laws.b_noise else set()
    rows = []
    for e in fit.estimates:
        d, noise = e.diagnostics, fit.b_simple.get(e.setting.name)
        rows.append([e.setting.name, e.setting.model_params, e.setting.tokens, e.s_min, e.b_noise, e.cbs,
                     *e.cbs_ci, *e.s_min_ci, *e.b_noise_ci, e.reference_batch, e.n_batches, e.note, e.n_censored,
                     d.residual_sd if d else None, d.max_abs_residual if d else None, d.r2 if d else None,
                     e.b0_share, e.setting.name in in_laws, e.setting.name in in_noise_laws,
                     e.cbs_exclusion or e.b_noise_exclusion, bool(e.lack_of_fit),
                     e.noise.sigma if e.noise else None, e.noise.dof if e.noise else None, e.setting.layers,
                     e.setting.hidden, " | ".join(e.warnings), noise and noise.value, noise and noise.source,
                     noise and noise.unusable])
    return rows


def degradation_csv(fit: StudyFit) -> bytes:
    return csv_bytes(DEGRADATION_COLUMNS, degradation_rows(fit))


def degradation_rows(fit: StudyFit) -> list[list]:
    return [[e.setting.name, d.overhead, d.batch, d.low, d.high] for e in fit.estimates for d in e.degradation]


def time_csv(fit: StudyFit) -> bytes:
    return csv_bytes(TIME_COLUMNS, time_table_rows(fit))


def time_table_rows(fit: StudyFit) -> list[list]:
    best = {name: fastest(fit.times_of(name)) for name in {r.setting for r in fit.times}}
    return [[r.setting, r.batch_size, r.gpus, r.steps, r.tokens, r.tokens_per_s, r.hours, r.gpu_hours,
             "measured" if r.measured else "modelled", r is best[r.setting]] for r in fit.times]


def scaling_json(fit: StudyFit) -> bytes:
    return (json.dumps(scaling_doc(fit), indent=2) + "\n").encode("utf-8")


def scaling_doc(fit: StudyFit) -> dict:
    """Laws keyed by variable ('tokens' = D, 'model_params' = N, 'compute' = C, 'joint' = (D, N)), plus what a
    forecast needs to plan a batch and its time."""
    laws = fit.laws
    coll = laws.collinearity
    doc = {
        "version": SCALING_VERSION,
        "cbs_unit": "sequences",
        "seq_len": fit.table.seq_len or fit.seq_len,
        "overhead": fit.overhead,
        "reference_batch": fit.reference_batch,
        "log": "natural",
        "source": fit.table.source,
        "settings_fitted": [e.setting.name for e in fit.estimates if e.fitted],
        "laws": {k: law_to_json(v) for k, v in laws.cbs.items()},
        "laws_weighted": {k: law_to_json(v) for k, v in laws.cbs_weighted.items()},
        "laws_b_noise": {k: law_to_json(v) for k, v in laws.b_noise.items()},
        "laws_s_min": {k: law_to_json(v) for k, v in laws.s_min.items()},
        "collinearity": None if coll is None else {
            "r2_log_tokens_on_log_params": json_num(coll.r2), "slope": json_num(coll.slope),
            "tokens_per_param": json_num(coll.ratio), "collinear": coll.collinear},
        "excluded_settings": [{"setting": s, "why": w} for s, w in laws.excluded],
        "excluded_settings_b_noise": [{"setting": s, "why": w} for s, w in laws.excluded_b_noise],
        "unweighted_settings": [{"setting": s, "why": w} for s, w in laws.unweighted],
        "weighted_laws_note": laws.weighted_note or None,
        "warnings": study_warnings(fit),
        "throughput": {"source": fit.throughput.source, "unit": "tokens_per_s", "points": [
            {"model_params": p.model_params, "batch_size": p.batch_size, "gpus": p.gpus,
             "tokens_per_s": p.tokens_per_s} for p in fit.throughput.points]},
    }
    return doc


def render_outputs(fit: StudyFit) -> dict[str, bytes]:
    """Every output file, relative path -> content; nothing touches the disk."""
    files = {"steps.csv": steps_csv(fit), "cbs.csv": cbs_csv(fit), "degradation.csv": degradation_csv(fit),
             "scaling.json": scaling_json(fit), "report.md": report_md(fit),
             **render_figures(fit.table, fit.estimates, fit.laws.cbs, fit.laws.b_noise, fit.overhead,
                              fit.b_simple)}
    if fit.times:
        files["time_to_target.csv"] = time_csv(fit)
    return files


# ----------------------------------------------------------------------------------------------------------------
# writing


def check_out_dir(out_dir: Path) -> None:
    """OUT_DIR may be absent, empty, or a previous `cbs fit` output holding only what that fit wrote (it is
    replaced); anything else is refused, naming files the fit did not write. A fit once replaced any directory
    holding a cbs.csv, and a paper draft beside a copied cbs.csv went with it."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: exists and is not a directory; choose another path")
    present = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if not p.is_dir())
    if not present:
        return
    foreign = [p for p in present if p != FIT_MARKER and p not in _fit_files(out_dir)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InputError(f"--out {out_dir}: holds files that `cbs fit` did not write ({shown}), and a fit replaces "
                         f"the whole directory; choose another --out, or move those files elsewhere")


def _fit_files(out_dir: Path) -> set[str]:
    """The files a previous fit wrote into out_dir, as its marker lists them; for an output written before the
    marker, the names a fit writes (only if it holds a fit's main table). Empty for anything else."""
    marker = out_dir / FIT_MARKER
    if marker.is_file():
        try:
            listed = json.loads(marker.read_text(encoding="utf-8")).get("files")
        except (ValueError, UnicodeDecodeError, AttributeError):
            listed = None
        return set(listed) if isinstance(listed, list) and all(isinstance(f, str) for f in listed) else set()
    if not any((out_dir / m).is_file() for m in LEGACY_MAIN_TABLES):
        return set()
    return set(LEGACY_FILES) | {str(p.relative_to(out_dir)) for p in out_dir.glob("figures/*.png")}


def write_outputs(out_dir: Path, files: dict[str, bytes]) -> None:
    """Write all files into a temp dir beside OUT_DIR, then swap it in (cbs/runfiles.py, staged_directory)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    with staged_directory(out_dir) as staging:
        for rel, data in {**files, FIT_MARKER: _marker(files)}.items():
            atomic_write_bytes(staging / rel, data)


def _marker(files: dict[str, bytes]) -> bytes:
    return (json.dumps({"written_by": "cbs fit", "files": sorted(files)}, indent=1) + "\n").encode()

