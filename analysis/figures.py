"""The figures of `cbs fit`, as PNG bytes: S(B) per setting, all settings normalised, CBS and B_noise vs D, N and
C with their laws, the degradation range and B_simple against the fit (a branched study's are in
branched_figures.py). matplotlib's object API on the Agg canvas (no pyplot, no global backend switch), so rendering
is headless and leaves no figures alive."""

from __future__ import annotations

import io
import math
import re

import numpy as np

from analysis.fit import CbsEstimate
from analysis.laws import SYMBOLS, VARIABLE_NAMES, PowerLaw
from analysis.noise_scale import BSimple
from analysis.steps import StepsPoint, StepsTable

MAX_LEGEND = 12


def new_axes(size=(5.6, 4.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    # fixed margins: a constrained layout draws every figure twice (~2x the render time, 0.3 vs 0.15 s here)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.92)
    return fig, fig.add_subplot()


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def figure_steps(est: CbsEstimate, points: list[StepsPoint], overhead: float) -> bytes:
    """Steps vs batch (log-log): measured S(B), lower bounds, the fit, linear scaling from B0, the CBS."""
    fig, ax = new_axes()
    usable = [p for p in points if not p.censored]
    ax.plot([p.batch_size for p in usable], [p.steps for p in usable], "o", color="C0", label="S(B), min over runs")
    flagged = [p for p in usable if p.diverged_after]
    if flagged:
        ax.plot([p.batch_size for p in flagged], [p.steps for p in flagged], "o", mfc="none", ms=11, color="C1",
                label="best run diverged later")
    bounds = [p for p in points if p.lower_bound]
    if bounds:
        ax.plot([p.batch_size for p in bounds], [p.censored_at_steps for p in bounds], "^", color="C2",
                label="censored: S > steps trained")
    for i, p in enumerate(p for p in points if p.censored and not p.lower_bound):
        ax.axvline(p.batch_size, ls=":", color="0.5", label="no observation" if i == 0 else None)
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
    shown = [p.steps for p in usable] + [p.censored_at_steps for p in bounds]
    if shown:  # keep the data in view; the linear-scaling line would otherwise stretch the axis by decades
        low = min(shown + ([est.fit.s_min] if est.fit else []))
        ax.set_ylim(low / 2, max(shown) * 2)
    ax.legend(fontsize=7)
    return png_bytes(fig)


def figure_normalized(table: StepsTable) -> bytes:
    """log2(S / S(B_min)) vs log2 B for all settings; slope -1 = perfect linear scaling."""
    fig, ax = new_axes((6.4, 4.4))
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
    return png_bytes(fig)


def _x_of(e: CbsEstimate, variable: str) -> float:
    return e.setting.compute if variable == "compute" else getattr(e.setting, variable)


def figure_law(cbs_law: PowerLaw, noise_law: PowerLaw | None, estimates: list[CbsEstimate]) -> bytes:
    """CBS and B_noise vs X (log-log): settings with their 95% intervals, each law and its 95% band."""
    fig, ax = new_axes()
    ok = [e for e in estimates if e.fitted]
    x = np.array([_x_of(e, cbs_law.variable) for e in ok], float)
    grid = np.geomspace(x.min() / 1.3, x.max() * 1.3, 100)
    for law, attr, color, name in ((cbs_law, "cbs", "C0", "CBS"), (noise_law, "b_noise", "C2", "B_noise")):
        if law is None:
            continue
        y = np.array([getattr(e, attr) for e in ok])
        ci = np.array([getattr(e, f"{attr}_ci") for e in ok]).reshape(len(ok), 2)
        has = np.isfinite(ci).all(axis=1)
        yerr = [y - np.where(has, ci[:, 0], y), np.where(has, ci[:, 1], y) - y]
        ax.errorbar(x, y, yerr=yerr, fmt="o", color=color, capsize=3, label=f"{name} per setting (95% interval)")
        mid, lo, hi = law.predict(grid, prediction=False)
        ax.plot(grid, mid, color=color, label=f"{name} = {law.coefficient:.3g} {law.symbol}^{law.exponent:.3f} "
                                              f"(R2={law.r2:.3f})")
        if law.df_resid > 0:
            ax.fill_between(grid, lo, hi, color=color, alpha=0.15)
    ax.set(xscale="log", yscale="log", xlabel=VARIABLE_NAMES[cbs_law.variable], ylabel="batch (sequences)",
           title=f"CBS and B_noise vs {SYMBOLS[cbs_law.variable]}")
    ax.legend(fontsize=7)
    return png_bytes(fig)


def figure_degradation(estimates: list[CbsEstimate]) -> bytes:
    """B(o) = (1 + o) B0 + o B_noise vs the overhead o, per setting, with 95% bands: the degradation range."""
    fig, ax = new_axes((6.4, 4.4))
    ok = [e for e in estimates if e.fitted and e.degradation]
    for i, e in enumerate(ok):
        o = [d.overhead for d in e.degradation]
        ax.plot(o, [d.batch for d in e.degradation], "o-", ms=3, color=f"C{i % 10}", label=e.setting.name)
        lo, hi = [d.low for d in e.degradation], [d.high for d in e.degradation]
        if all(math.isfinite(v) for v in lo + hi):
            ax.fill_between(o, lo, hi, color=f"C{i % 10}", alpha=0.12)
    ax.set(xscale="log", yscale="log", xlabel="overhead o (steps = (1+o) x linear scaling)",
           ylabel="batch B(o) (sequences)", title="Degradation range: batch at each overhead")
    if len(ok) <= MAX_LEGEND:
        ax.legend(fontsize=7)
    return png_bytes(fig)


def plain_log_axes(ax, batches: list[float] | None = None) -> None:
    """Log axes labelled with plain numbers at the major ticks only (matplotlib's minor labels on a short log axis
    overlap); `batches`: label the y axis at these batch sizes instead."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() == "log":
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
    if batches:
        ax.set_yticks(sorted(set(batches)))


def figure_b_simple(estimates: list[CbsEstimate], b_simple: dict[str, BSimple]) -> bytes:
    """B_simple (y) against the fitted B_noise and CBS (x) per setting, log-log, with y = x: how far the cheap
    predictor is from the measured critical batch (McCandlish et al. 2018, sec. 2.2 and appendix A.1)."""
    fig, ax = new_axes()
    ok = [e for e in estimates if e.fitted and e.setting.name in b_simple]
    y = np.array([b_simple[e.setting.name].value for e in ok])
    for attr, marker, color, name in (("b_noise", "o", "C2", "fitted B_noise"), ("cbs", "s", "C0", "fitted CBS")):
        x = np.array([getattr(e, attr) for e in ok])
        ci = np.array([getattr(e, f"{attr}_ci") for e in ok], float).reshape(len(ok), 2)
        has = np.isfinite(ci).all(axis=1)
        xerr = [x - np.where(has, ci[:, 0], x), np.where(has, ci[:, 1], x) - x]
        ax.errorbar(x, y, xerr=xerr, fmt=marker, color=color, capsize=3, label=f"{name} (95% interval)")
    values = np.concatenate([y] + [[getattr(e, a) for e in ok] for a in ("b_noise", "cbs")])
    lo, hi = values.min() / 2, values.max() * 2
    ax.plot([lo, hi], [lo, hi], ":", color="0.4", label="y = x")
    ax.set(xscale="log", yscale="log", xlabel="measured batch (sequences)", ylabel="B_simple (sequences)",
           title="Gradient noise scale vs the measured critical batch")
    plain_log_axes(ax)
    ax.legend(fontsize=7)
    return png_bytes(fig)


def slug_names(names: list[str], prefix: str) -> dict[str, str]:
    """Name -> figures/<prefix><slug>.png, unique even when two names share a slug."""
    out, used = {}, set()
    for name in names:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "setting"
        candidate, k = slug, 1
        while candidate.lower() in used:
            k += 1
            candidate = f"{slug}_{k}"
        used.add(candidate.lower())
        out[name] = f"figures/{prefix}{candidate}.png"
    return out


def figure_names(table: StepsTable) -> dict[str, str]:
    """Setting name -> figures/steps_<slug>.png, unique even when two names share a slug."""
    return slug_names([s.name for s in table.settings()], "steps_")


def law_figure_variables(cbs_laws: dict[str, PowerLaw]) -> list[str]:
    return [v for v in ("tokens", "model_params", "compute") if v in cbs_laws]


MAX_SETTING_FIGURES = 200
"""Per-setting S(B) figures drawn at most (the first settings in cbs.csv's order): a fit of 10,000 settings drew
a PNG each (1,255 PNGs, most of its 196 s) that nobody opens one by one; every setting stays in the tables."""


def setting_figures(estimates: list[CbsEstimate]) -> list[CbsEstimate]:
    """The settings that get their own figures/steps_<setting>.png."""
    return estimates[:MAX_SETTING_FIGURES]


def render_figures(table: StepsTable, estimates: list[CbsEstimate], cbs_laws: dict[str, PowerLaw],
                   noise_laws: dict[str, PowerLaw], overhead: float,
                   b_simple: dict[str, BSimple] | None = None) -> dict[str, bytes]:
    paths = figure_names(table)
    files = {paths[e.setting.name]: figure_steps(e, table.points_of(e.setting.name), overhead)
             for e in setting_figures(estimates)}
    files["figures/steps_normalized.png"] = figure_normalized(table)
    for v in law_figure_variables(cbs_laws):
        files[f"figures/cbs_vs_{v}.png"] = figure_law(cbs_laws[v], noise_laws.get(v), estimates)
    if has_degradation_figure(estimates):
        files["figures/degradation.png"] = figure_degradation(estimates)
    if has_b_simple_figure(estimates, b_simple):
        files["figures/b_simple.png"] = figure_b_simple(estimates, b_simple)
    return files


def has_degradation_figure(estimates: list[CbsEstimate]) -> bool:
    """Whether figures/degradation.png is drawn: some fitted setting has a degradation range."""
    return any(e.fitted and e.degradation for e in estimates)


def has_b_simple_figure(estimates: list[CbsEstimate], b_simple: dict[str, BSimple] | None) -> bool:
    return bool(b_simple) and any(e.fitted and e.setting.name in b_simple for e in estimates)
