"""The figures of `cbs fit`: S(B) per setting, all settings normalised, CBS and B_noise vs D, N and C with their
laws, the degradation range and B_simple against the fit (a branched study's are in branched_figures.py).

Each `figure_*` returns a matplotlib Figure (tests read its ticks and labels back); `render_figures` turns them into
PNG bytes. matplotlib's object API on the Agg canvas (no pyplot, no global backend switch), so rendering is headless
and leaves no figures alive. Made to be read at a glance: log axes ticked at the values tried (batch sizes, data
budgets), titles in model size and tokens rather than setting names, the target loss in each S(B) title, laws
through as many points as parameters labelled "exact through n points" (their R^2 = 1 says nothing), and the
constrained layout so that no label is cut at the edge.
"""

from __future__ import annotations

import io
import math
import re

import numpy as np

from cbs.analysis.fit import CbsEstimate
from cbs.analysis.laws import VARIABLE_NAMES, PowerLaw
from cbs.analysis.noise_scale import BSimple
from cbs.analysis.steps import Setting, StepsPoint, StepsTable

MAX_LEGEND = 12
FIGSIZE_IN = (8.0, 6.0)
DPI = 120
"""8 x 6 in at 120 dpi = 960 x 720 px: legible legends (9 pt) on a laptop screen and in a rendered report.md."""
LEGEND_PT = 9
MAX_TICKS = 12
"""More tick labels than this on one axis overlap: every other value is labelled instead."""


def new_axes(size=FIGSIZE_IN):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # constrained layout keeps every label and the outside legend inside the image; it draws twice (~0.3 s a
    # figure instead of ~0.15 s), the price of no label cut at the edge
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def png_bytes(fig) -> bytes:
    """The figure as PNG. Its constrained layout is computed once here and then frozen: savefig with a layout
    engine draws the figure twice (~2x the time of one draw)."""
    engine = fig.get_layout_engine()
    if engine is not None:
        fig.set_dpi(DPI)  # the layout depends on the text sizes in pixels
        engine.execute(fig)
        fig.set_layout_engine("none")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def legend(ax) -> None:
    """The legend below the axes, in two columns, so that it never hides data and leaves the plot its width."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.figure.legend(handles, labels, fontsize=LEGEND_PT, loc="outside lower center", ncols=2)


def count_text(v: float) -> str:
    """1234 -> '1.23K', 4e9 -> '4B', 85e6 -> '85M', 300 -> '300', 5.1e17 -> '5.1e17': counts of tokens,
    parameters, FLOPs (beyond 10^15 in powers of ten: '510000T' reads worse)."""
    if abs(v) >= 1e15:
        exponent = math.floor(math.log10(abs(v)))
        return f"{v / 10 ** exponent:.3g}e{exponent}"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:g}"


def batch_text(v: float) -> str:
    return f"{v:,.0f}" if v >= 1 else f"{v:g}"


def setting_title(s: Setting) -> str:
    """'85M-param model, 1B tokens' (the setting name when N or D is unknown)."""
    if not (s.model_params and s.tokens):
        return s.name
    return f"{count_text(s.model_params)}-param model, {count_text(s.tokens)} tokens"


def ticks_at(axis, values, text=batch_text) -> None:
    """Major ticks of a log axis at `values` (every other one when there are many), labelled with `text`;
    minor ticks unlabelled (matplotlib's minor labels on a short log axis overlap)."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

    values = sorted({float(v) for v in values if v > 0 and math.isfinite(v)})
    if not values:
        return
    step = math.ceil(len(values) / MAX_TICKS)
    values = values[::step]
    axis.set_major_locator(FixedLocator(values))
    axis.set_major_formatter(FixedFormatter([text(v) for v in values]))
    axis.set_minor_formatter(NullFormatter())


def plain_log_axes(ax, batches: list[float] | None = None) -> None:
    """Log axes ticked at 1, 2, 5 x 10^k and labelled with plain numbers; `batches`: tick the y axis at these
    batch sizes instead."""
    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() == "log":
            plain_log_axis(axis)
    if batches:
        ticks_at(ax.yaxis, batches)


def plain_log_axes_y(ax) -> None:
    plain_log_axis(ax.yaxis)


def plain_log_axis(axis) -> None:
    """A log axis ticked at 1, 2, 5 x 10^k with plain labels (matplotlib labels only the powers of ten, which a
    short axis may not even hold), minor ticks unlabelled."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: batch_text(v)))
    axis.set_minor_formatter(NullFormatter())


def law_text(name: str, law: PowerLaw) -> str:
    """'CBS = 0.019 D^0.452 (R2=0.97, n=4)'; a law through as many points as it has parameters fits them exactly
    (R^2 = 1 by construction, it says nothing), so that one reads 'exact through 2 points' instead."""
    quality = f"exact through {law.n_points} points" if law.df_resid <= 0 else f"R2={law.r2:.2f}, n={law.n_points}"
    return f"{name} = {law.coefficient:.3g} {law.symbol}^{law.exponent:.3f} ({quality})"


def not_shown_text(missing: list[str]) -> str:
    """A second x-label line naming what the figure leaves out and why ('' when nothing is)."""
    return "\nnot shown: " + "; ".join(missing) if missing else ""


def figure_steps(est: CbsEstimate, points: list[StepsPoint], overhead: float):
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
    at_most = [p for p in usable if p.upper_bound]
    if at_most:
        ax.plot([p.batch_size for p in at_most], [p.steps for p in at_most], "v", color="C3", ms=9,
                label="shortest horizon reached it: S <= steps")
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
    target = est.setting.target_loss
    goal = f"steps to the target loss {target:.4g}" if target is not None else "steps to the target loss"
    ax.set(xscale="log", yscale="log", xlabel="global batch B (sequences)", ylabel="steps to target S(B)",
           title=f"{setting_title(est.setting)}: {goal}")
    shown = [p.steps for p in usable] + [p.censored_at_steps for p in bounds]
    if shown:  # keep the data in view; the linear-scaling line would otherwise stretch the axis by decades
        low = min(shown + ([est.fit.s_min] if est.fit else []))
        ax.set_ylim(low / 2, max(shown) * 2)
    ticks_at(ax.xaxis, [p.batch_size for p in points])
    plain_log_axes_y(ax)
    legend(ax)
    return fig


def ratio_text(v: float) -> str:
    """Powers of two as '4', '1', '1/8'."""
    return f"{v:g}" if v >= 1 else f"1/{1 / v:g}"


def figure_normalized(table: StepsTable):
    """S(B) / S(B_1) vs B on log2 axes for all settings, B_1 the smallest batch a setting reached its target
    at; slope -1 = perfect linear scaling."""
    fig, ax = new_axes()
    settings = table.settings()
    starts, batches, ratios, missing = set(), set(), [1.0], []
    for i, s in enumerate(settings):
        usable = [p for p in table.points_of(s.name) if not p.censored]
        if len(usable) < 2:
            missing.append(f"{setting_title(s)} (target reached at {len(usable)} batch size)")
            continue
        b = [p.batch_size for p in usable]
        r = np.array([p.steps for p in usable]) / usable[0].steps
        target = f", target {s.target_loss:.3g}" if s.target_loss is not None else ""
        ax.plot(b, r, "o-", ms=3, color=f"C{i % 10}", label=setting_title(s) + target)
        starts.add((b[0], b[-1]))
        batches.update(b)
        ratios += list(r)
    for j, (b_first, b_last) in enumerate(sorted(starts)):
        ax.plot([b_first, b_last], [1, b_first / b_last], ":", color="0.4",
                label="perfect linear scaling" if j == 0 else None)
        ratios.append(b_first / b_last)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set(xlabel="global batch B (sequences)" + not_shown_text(missing),
           ylabel="steps relative to the smallest batch, S(B) / S(B_1)",
           title="Steps to each setting's target, relative to its smallest batch B_1")
    ticks_at(ax.xaxis, batches)
    ticks_at(ax.yaxis, [2.0 ** k for k in range(math.floor(math.log2(min(ratios))),
                                                 math.ceil(math.log2(max(ratios))) + 1)], ratio_text)
    if len(settings) <= MAX_LEGEND and starts:
        legend(ax)
    return fig


def _x_of(e: CbsEstimate, variable: str) -> float:
    return e.setting.compute if variable == "compute" else getattr(e.setting, variable)


def figure_law(cbs_law: PowerLaw, noise_law: PowerLaw | None, estimates: list[CbsEstimate]):
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
        ax.plot(grid, mid, color=color, label=law_text(name, law))
        if law.df_resid > 0:
            ax.fill_between(grid, lo, hi, color=color, alpha=0.15, label=f"{name} law, 95% band")
    name = VARIABLE_NAMES[cbs_law.variable]
    ax.set(xscale="log", yscale="log", xlabel=name, ylabel="batch (sequences)",
           title=f"Critical batch size and B_noise vs {name.replace(' (FLOPs)', '')}")
    ticks_at(ax.xaxis, x, count_text)
    plain_log_axes_y(ax)
    legend(ax)
    return fig


def figure_degradation(estimates: list[CbsEstimate]):
    """B(o) = (1 + o) B0 + o B_noise vs the overhead o, per setting, with 95% bands: the degradation range."""
    fig, ax = new_axes()
    ok = [e for e in estimates if e.fitted and e.degradation]
    for i, e in enumerate(ok):
        o = [d.overhead for d in e.degradation]
        ax.plot(o, [d.batch for d in e.degradation], "o-", ms=3, color=f"C{i % 10}", label=setting_title(e.setting))
        lo, hi = [d.low for d in e.degradation], [d.high for d in e.degradation]
        if all(math.isfinite(v) for v in lo + hi):
            ax.fill_between(o, lo, hi, color=f"C{i % 10}", alpha=0.12)
    ax.set(xscale="log", yscale="log", xlabel="overhead o (steps = (1+o) x linear scaling)",
           ylabel="batch B(o) (sequences)", title="Degradation range: the batch at each step overhead")
    ticks_at(ax.xaxis, [d.overhead for e in ok for d in e.degradation], lambda v: f"{v:g}")
    plain_log_axes_y(ax)
    if len(ok) <= MAX_LEGEND:
        legend(ax)
    return fig


def b_simple_missing(estimates: list[CbsEstimate], b_simple: dict[str, BSimple]) -> list[str]:
    """The settings figure_b_simple leaves out, each with why."""
    out = []
    for e in estimates:
        if not e.fitted:
            out.append(f"{setting_title(e.setting)} (no CBS fit{': ' + e.note if e.note else ''})")
        elif e.setting.name not in b_simple:
            out.append(f"{setting_title(e.setting)} (no B_simple logged near its {count_text(e.setting.tokens)} "
                       "tokens)")
    return out


def figure_b_simple(estimates: list[CbsEstimate], b_simple: dict[str, BSimple]):
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
    ax.set(xscale="log", yscale="log",
           xlabel="measured batch (sequences)" + not_shown_text(b_simple_missing(estimates, b_simple)),
           ylabel="B_simple (sequences)", title="Gradient noise scale B_simple vs the measured critical batch")
    plain_log_axes(ax)
    legend(ax)
    return fig


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


def study_figures(table: StepsTable, estimates: list[CbsEstimate], cbs_laws: dict[str, PowerLaw],
                  noise_laws: dict[str, PowerLaw], overhead: float, b_simple: dict[str, BSimple] | None = None):
    """Relative path -> matplotlib Figure, every figure of a sweep study's fit."""
    paths = figure_names(table)
    figs = {paths[e.setting.name]: figure_steps(e, table.points_of(e.setting.name), overhead)
            for e in setting_figures(estimates)}
    figs["figures/steps_normalized.png"] = figure_normalized(table)
    for v in law_figure_variables(cbs_laws):
        figs[f"figures/cbs_vs_{v}.png"] = figure_law(cbs_laws[v], noise_laws.get(v), estimates)
    if has_degradation_figure(estimates):
        figs["figures/degradation.png"] = figure_degradation(estimates)
    if has_b_simple_figure(estimates, b_simple):
        figs["figures/b_simple.png"] = figure_b_simple(estimates, b_simple)
    return figs


def render_figures(table: StepsTable, estimates: list[CbsEstimate], cbs_laws: dict[str, PowerLaw],
                   noise_laws: dict[str, PowerLaw], overhead: float,
                   b_simple: dict[str, BSimple] | None = None) -> dict[str, bytes]:
    figs = study_figures(table, estimates, cbs_laws, noise_laws, overhead, b_simple)
    return {path: png_bytes(fig) for path, fig in figs.items()}


def has_degradation_figure(estimates: list[CbsEstimate]) -> bool:
    """Whether figures/degradation.png is drawn: some fitted setting has a degradation range."""
    return any(e.fitted and e.degradation for e in estimates)


def has_b_simple_figure(estimates: list[CbsEstimate], b_simple: dict[str, BSimple] | None) -> bool:
    return bool(b_simple) and any(e.fitted and e.setting.name in b_simple for e in estimates)
