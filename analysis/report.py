"""The outputs of `cbs fit`: steps.csv, cbs.csv, scaling.json, report.md, figures/*.png.

Everything is rendered in memory first (`render_outputs`: relative path -> bytes), then written into a temp
directory beside OUT_DIR that replaces OUT_DIR by rename (`write_outputs`): an error or a kill leaves the old
OUT_DIR or none, never a half-written one. Figures use matplotlib's object API on the Agg canvas (no pyplot, no
global backend switch), so rendering is headless and leaves no figures alive.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

import numpy as np

from analysis import InputError
from analysis.fit import CbsEstimate, ScalingLaw, StudyFit, law_to_json
from analysis.steps import StepsPoint, StepsTable

CBS_COLUMNS = ["setting", "model_params", "tokens", "s_min", "b_noise", "cbs", "cbs_low", "cbs_high",
               "s_min_low", "s_min_high", "b_noise_low", "b_noise_high", "reference_batch", "n_batches", "note"]
STEPS_COLUMNS = ["setting", "model_params", "tokens", "batch_size", "steps", "censored", "runs", "best_run"]
OUTPUT_MARKERS = ("scaling.json", "cbs.csv")
"""A directory holding one of these is a previous `cbs fit` output and may be replaced."""
MAX_LEGEND = 12


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


def _csv(columns: list[str], rows: list[list]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows([[_cell(v) for v in row] for row in rows])
    return buf.getvalue().encode("utf-8")


def steps_csv(table: StepsTable) -> bytes:
    rows = [[p.setting.name, p.setting.model_params, p.setting.tokens, p.batch_size, p.steps, p.censored, p.runs,
             p.best_run] for s in table.settings() for p in table.points_of(s.name)]
    return _csv(STEPS_COLUMNS, rows)


def cbs_csv(fit: StudyFit) -> bytes:
    rows = [[e.setting.name, e.setting.model_params, e.setting.tokens, e.s_min, e.b_noise, e.cbs, *e.cbs_ci,
             *e.s_min_ci, *e.b_noise_ci, e.reference_batch, e.n_batches, e.note] for e in fit.estimates]
    return _csv(CBS_COLUMNS, rows)


def scaling_json(fit: StudyFit) -> bytes:
    """Laws keyed by variable ('tokens' = D, 'model_params' = N), plus what a forecast needs to plan a batch."""
    doc = {
        "version": 1,
        "cbs_unit": "sequences",
        "seq_len": fit.table.seq_len,
        "overhead": fit.overhead,
        "reference_batch": fit.reference_batch,
        "log": "natural",
        "source": fit.table.source,
        "settings_fitted": [e.setting.name for e in fit.estimates if e.fitted],
        "laws": {name: law_to_json(law) for name, law in fit.laws.items()},
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


# ----------------------------------------------------------------------------------------------------------------
# figures


def _new_axes(size=(5.6, 4.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    # fixed margins: a constrained layout draws every figure twice (~2x the render time, 0.3 vs 0.15 s here)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.92)
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def figure_steps(est: CbsEstimate, points: list[StepsPoint], overhead: float) -> bytes:
    """Steps vs batch (log-log): measured S(B), the fit, linear scaling from B0, the CBS and its interval."""
    fig, ax = _new_axes()
    usable = [p for p in points if not p.censored]
    ax.plot([p.batch_size for p in usable], [p.steps for p in usable], "o", color="C0", label="S(B), min over runs")
    for i, p in enumerate(p for p in points if p.censored):
        ax.axvline(p.batch_size, ls=":", color="0.5", label="censored (no run reached target)" if i == 0 else None)
    if est.fit is not None:
        batches = [p.batch_size for p in points]
        top = max(batches + ([est.cbs] if est.fitted else []))
        grid = np.geomspace(min(batches) / 1.5, top * 1.5, 200)
        ax.plot(grid, est.fit.steps(grid), color="C0",
                label=f"fit: S_min={est.fit.s_min:.3g}, B_noise={est.fit.b_noise:.3g}")
        b0 = est.reference_batch
        ax.plot(grid, est.fit.steps(b0) * b0 / grid, "--", color="0.3", label=f"linear scaling from B0={b0:g}")
    if est.fitted:
        ax.plot([est.cbs], [est.fit.steps(est.cbs)], "*", ms=12, color="C3",
                label=f"CBS={est.cbs:.3g} (S = {1 + overhead:g} x linear)")
        lo, hi = est.cbs_ci
        if math.isfinite(lo):
            ax.axvspan(lo, min(hi, ax.get_xlim()[1]), color="C3", alpha=0.12, label="CBS 95% interval")
    ax.set(xscale="log", yscale="log", xlabel="global batch B (sequences)", ylabel="steps to target S(B)",
           title=est.setting.name)
    if usable:  # keep the data in view; the linear-scaling line would otherwise stretch the axis by decades
        low = min([p.steps for p in usable] + ([est.fit.s_min] if est.fit else []))
        ax.set_ylim(low / 2, max(p.steps for p in usable) * 2)
    ax.legend(fontsize=7)
    return _png(fig)


def figure_normalized(table: StepsTable) -> bytes:
    """log2(S / S(B_min)) vs log2 B for all settings; slope -1 = perfect linear scaling."""
    fig, ax = _new_axes((6.4, 4.4))
    settings = table.settings()
    starts = set()
    for i, s in enumerate(settings):
        usable = [p for p in table.points_of(s.name) if not p.censored]
        if len(usable) < 2:
            continue
        b = np.log2([p.batch_size for p in usable])
        ax.plot(b, np.log2(np.array([p.steps for p in usable]) / usable[0].steps), "o-", ms=3,
                color=f"C{i % 10}", label=s.name)
        starts.add((b[0], b[-1]))
    for j, (b_first, b_last) in enumerate(sorted(starts)):
        ax.plot([b_first, b_last], [0, b_first - b_last], ":", color="0.4",
                label="perfect linear scaling" if j == 0 else None)
    ax.set(xlabel="log2 global batch (sequences)", ylabel="log2 S(B) / S(B_min)", title="Steps to target, normalised")
    if len(settings) <= MAX_LEGEND:
        ax.legend(fontsize=7)
    return _png(fig)


def figure_law(law: ScalingLaw, estimates: list[CbsEstimate]) -> bytes:
    """CBS vs X (log-log): settings with their 95% intervals, the OLS law and its 95% band (mean line)."""
    fig, ax = _new_axes()
    ok = [e for e in estimates if e.fitted]
    x = np.array([getattr(e.setting, law.variable) for e in ok], float)
    y = np.array([e.cbs for e in ok])
    lo = np.array([e.cbs_ci[0] for e in ok])
    hi = np.array([e.cbs_ci[1] for e in ok])
    has_ci = np.isfinite(lo) & np.isfinite(hi)
    yerr = np.where(has_ci, [y - lo, hi - y], 0.0)
    ax.errorbar(x, y, yerr=yerr, fmt="o", color="C0", capsize=3, label="CBS per setting (95% interval)")
    grid = np.geomspace(x.min() / 1.3, x.max() * 1.3, 100)
    mid, band_lo, band_hi = law.predict(grid, prediction=False)
    ax.plot(grid, mid, color="C3",
            label=f"CBS = {law.coefficient:.3g} {law.symbol}^{law.exponent:.3f} (R2={law.r2:.3f})")
    if law.df_resid > 0:
        ax.fill_between(grid, band_lo, band_hi, color="C3", alpha=0.15, label="95% confidence band")
    name = {"tokens": "data tokens D", "model_params": "non-embedding parameters N"}[law.variable]
    ax.set(xscale="log", yscale="log", xlabel=name, ylabel="critical batch size (sequences)",
           title=f"CBS vs {law.symbol}")
    ax.legend(fontsize=7)
    return _png(fig)


def figure_names(table: StepsTable) -> dict[str, str]:
    """Setting name -> figures/steps_<slug>.png, unique even when two names share a slug."""
    names, used = {}, set()
    for s in table.settings():
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", s.name).strip("._") or "setting"
        candidate, k = slug, 1
        while candidate.lower() in used:
            k += 1
            candidate = f"{slug}_{k}"
        used.add(candidate.lower())
        names[s.name] = f"figures/steps_{candidate}.png"
    return names


def render_figures(fit: StudyFit) -> dict[str, bytes]:
    paths = figure_names(fit.table)
    files = {paths[e.setting.name]: figure_steps(e, fit.table.points_of(e.setting.name), fit.overhead)
             for e in fit.estimates}
    files["figures/steps_normalized.png"] = figure_normalized(fit.table)
    for variable, law in fit.laws.items():
        files[f"figures/cbs_vs_{variable}.png"] = figure_law(law, fit.estimates)
    return files


# ----------------------------------------------------------------------------------------------------------------
# report.md


def _g(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if math.isinf(x):
        return "inf"
    return f"{x:,.0f}" if abs(x) >= 10 ** digits else f"{x:.{digits}g}"


def _with_ci(v: float, ci: tuple[float, float]) -> str:
    if math.isnan(v):
        return ""
    return f"{_g(v)} [{_g(ci[0])}, {_g(ci[1])}]" if not math.isnan(ci[0]) else _g(v)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _input_lines(t: StepsTable) -> list[str]:
    if t.input_kind == "csv":
        return [f"Input: steps table `{t.source}` (steps to target taken as given)."]
    unfinished = ""
    if t.unfinished_runs:
        shown = ", ".join(t.unfinished_runs[:10]) + (" ..." if len(t.unfinished_runs) > 10 else "")
        unfinished = f"; {len(t.unfinished_runs)} unfinished run(s) without result.json skipped ({shown})"
    seq = f"; sequences of {t.seq_len} tokens" if t.seq_len else ""
    return [f"Input: study `{t.source}`: {t.finished_runs} finished run(s){unfinished}; "
            f"target crossing: {t.target_kind}{seq}."]


def _method_lines(fit: StudyFit) -> list[str]:
    b0 = f"B0 = {fit.reference_batch:g}" if fit.reference_batch else "B0 = the smallest batch of each setting"
    o = fit.overhead
    lines = [
        "## Method", "",
        "- S(B): the fewest steps to the target loss over the runs at batch B (hyper-parameters differ). A batch "
        "where no run reached the target is *censored*: listed, flagged, left out of the fit.",
        "- Fit (McCandlish et al. 2018, arXiv 1812.06162): **S(B) = S_min (1 + B_noise / B)** = a + b/B, "
        "least squares on log S.",
        f"- Critical batch size (Zhang et al. 2025, arXiv 2410.21676): **B\\* = (1 + o) B0 + o B_noise**, "
        f"o = {o:g}, {b0}: the batch at which training needs {1 + o:g}x the steps that perfect linear scaling "
        "from B0 would need.",
    ]
    if fit.n_resamples > 0:
        lines.append(f"- Intervals ({fit.level:.0%}): residual bootstrap over the batch points ({fit.n_resamples} "
                     f"resamples, seed {fit.seed}), percentile interval of log S_min and log B_noise expanded by "
                     "t(n-2)/z for the few points per setting; the CBS interval maps from B_noise's.")
    else:
        lines.append("- Intervals: none (--bootstrap 0).")
    lines.append("- Scaling laws: OLS of log B\\* on log D and on log N over the fitted settings (statsmodels); "
                 "t intervals.")
    b0s = sorted({e.reference_batch for e in fit.estimates if e.fitted})
    if len(b0s) > 1:
        lines.append(f"- **B0 differs across settings** ({', '.join(f'{b:g}' for b in b0s)}): their CBS are not on a "
                     "common reference and the scaling laws mix the two; rerun with --reference-batch.")
    if fit.table.shared_runs:
        lines.append("- One sweep serves several data budgets: a run trained to the largest budget also gives the "
                     "crossings of the smaller budgets' targets. Only the warmup (a share of the reference run) "
                     "differs from training each budget separately.")
    return lines + [""]


def _steps_table_lines(t: StepsTable) -> list[str]:
    batches = sorted({p.batch_size for p in t.points})
    rows = []
    for s in t.settings():
        cells = {p.batch_size: "censored" if p.censored else f"{_g(p.steps, 4)} ({p.runs})"
                 for p in t.points_of(s.name)}
        rows.append([s.name, _g(s.model_params), _g(s.tokens)] + [cells.get(b, "") for b in batches])
    return ["## Steps to target", "", "S(B) (runs at B) for each global batch B in sequences.", "",
            *_md_table(["setting", "N", "D"] + [f"B={b}" for b in batches], rows), ""]


def _cbs_table_lines(fit: StudyFit) -> list[str]:
    seq = fit.table.seq_len
    rows = [[e.setting.name, _g(e.setting.model_params), _g(e.setting.tokens), e.n_batches,
             _with_ci(e.s_min, e.s_min_ci), _with_ci(e.b_noise, e.b_noise_ci), _with_ci(e.cbs, e.cbs_ci)]
            + ([_g(e.cbs * seq) if e.fitted else ""] if seq else []) + [e.note] for e in fit.estimates]
    header = ["setting", "N", "D", "batches", "S_min", "B_noise", "CBS (sequences)"] + \
        (["CBS (tokens)"] if seq else []) + ["note"]
    return ["## Critical batch size per setting", "", *_md_table(header, rows), ""]


def _law_lines(fit: StudyFit) -> list[str]:
    lines = ["## Scaling laws", ""]
    if not fit.laws:
        return lines + ["No scaling law: the fitted settings take a single value of D and a single value of N.", ""]
    for law in fit.laws.values():
        c_lo, c_hi = law.coefficient_ci
        a_lo, a_hi = law.exponent_ci
        ci = (f"c = {law.coefficient:.4g} [{c_lo:.4g}, {c_hi:.4g}], alpha = {law.exponent:.3f} "
              f"[{a_lo:.3f}, {a_hi:.3f}] ({law.level:.0%})" if law.df_resid > 0
              else f"c = {law.coefficient:.4g}, alpha = {law.exponent:.3f} (2 points: exact line, no interval)")
        lines.append(f"- **CBS = c {law.symbol}^alpha**: {ci}; R^2 = {law.r2:.3f}, {law.n_points} settings.")
        if law.pooled:
            other = "N" if law.variable == "tokens" else "D"
            lines.append(f"  - {other} also varies across these settings: this law pools them and mixes the "
                         f"effect of {other} into the exponent of {law.symbol}.")
    return lines + [""]


def _meaning(fit: StudyFit) -> list[str]:
    o = fit.overhead
    text = ("S(B) falls almost as 1/B (perfect data parallelism) while B is well below B_noise, and flattens at "
            f"S_min once B is well above it. The critical batch size is where a larger batch stops paying: at B* "
            f"training needs {1 + o:g}x the steps linear scaling promises, and beyond it more data-parallel "
            "workers buy little wall-clock time for their compute.")
    ok = [e for e in fit.estimates if e.fitted]
    if ok:
        lo, hi = min(ok, key=lambda e: e.cbs), max(ok, key=lambda e: e.cbs)
        text += f" Here the CBS ranges from {_g(lo.cbs)} ({lo.setting.name}) to {_g(hi.cbs)} ({hi.setting.name})."
    law = fit.laws.get("tokens")
    if law:
        text += (f" With the data budget it scales as D^{law.exponent:.2f}: doubling D multiplies the CBS by "
                 f"{2 ** law.exponent:.2f} (Zhang et al. report D^0.47 for compute-optimal runs).")
    law = fit.laws.get("model_params")
    if law:
        text += (f" With model size it scales as N^{law.exponent:.2f}"
                 + (" (pooled over data budgets, see above)" if law.pooled else "")
                 + "; Zhang et al. find a near-zero exponent in N at fixed D.")
    return ["## What it means", "", text, ""]


def _figure_lines(fit: StudyFit) -> list[str]:
    paths = figure_names(fit.table)
    lines = ["## Figures", "", "![normalised steps](figures/steps_normalized.png)", ""]
    lines += [f"![CBS vs {law.symbol}](figures/cbs_vs_{v}.png)" for v, law in fit.laws.items()]
    lines += ["", *(f"- {e.setting.name}: ![{e.setting.name}]({paths[e.setting.name]})" for e in fit.estimates)]
    return lines + [""]


def report_md(fit: StudyFit) -> bytes:
    n_ok = sum(e.fitted for e in fit.estimates)
    head = ["# Critical batch size report", "", *_input_lines(fit.table),
            f"{len(fit.estimates)} setting(s): {n_ok} fitted, {len(fit.estimates) - n_ok} not. "
            "Batch sizes are global batches in sequences.", ""]
    parts = [head, _method_lines(fit), _steps_table_lines(fit.table), _cbs_table_lines(fit), _law_lines(fit),
             _meaning(fit), _figure_lines(fit)]
    return ("\n".join(line for part in parts for line in part)).encode("utf-8")


# ----------------------------------------------------------------------------------------------------------------
# writing


def render_outputs(fit: StudyFit) -> dict[str, bytes]:
    """Every output file, relative path -> content; nothing touches the disk."""
    return {"steps.csv": steps_csv(fit.table), "cbs.csv": cbs_csv(fit), "scaling.json": scaling_json(fit),
            "report.md": report_md(fit), **render_figures(fit)}


def check_out_dir(out_dir: Path) -> None:
    """OUT_DIR may be absent, empty, or a previous `cbs fit` output (which is replaced); anything else is refused."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: exists and is not a directory")
    if any(out_dir.iterdir()) and not any((out_dir / m).is_file() for m in OUTPUT_MARKERS):
        raise InputError(f"--out {out_dir}: exists and is not a `cbs fit` output directory; choose another or "
                         "remove it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes) -> None:
    """Temp file in the same directory + os.replace: a reader sees the old file or the new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are for everyone the umask allows
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(out_dir: Path, files: dict[str, bytes]) -> None:
    """Write all files into a temp dir beside OUT_DIR, then swap it in (old one aside, new in, old removed)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()  # not mkdtemp: its 0700 would become OUT_DIR's mode
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    moved_aside = False
    try:
        for rel, data in files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
        if out_dir.exists():
            os.replace(out_dir, old)
            moved_aside = True
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if moved_aside and not out_dir.exists():
            os.replace(old, out_dir)  # put the previous output back
        raise
    if moved_aside:
        shutil.rmtree(old, ignore_errors=True)
