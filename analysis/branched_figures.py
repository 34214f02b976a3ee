"""The figures of `cbs fit` on a branched study, as matplotlib Figures (`render_branched_figures` makes the PNGs):
CBS(t) with its intervals, the base run's B_simple along t and the sweep's CBS at matching D; and per setting, each
branch point's losses against the tolerance. Drawn as figures.py draws (module docstring there)."""

from __future__ import annotations

import math

from analysis.branched import LocalCbs
from analysis.branched_fit import BranchedFit
from analysis.figures import (
    count_text, legend, new_axes, plain_log_axes, png_bytes, setting_title, slug_names, ticks_at,
)


def figure_cbs_curve(fit: BranchedFit):
    """CBS(t) per setting (log-log) with its interval up to the first failing batch, incomplete points' lower
    bounds, the base run's B_simple along t, and the sweep's CBS at matching D."""
    fig, ax = new_axes()
    for i, name in enumerate(fit.study.settings):
        color, mine = f"C{i % 10}", fit.points_of(name)
        label = setting_title(fit.study.settings[name])
        done = [p for p in mine if math.isfinite(p.cbs)]
        t, cbs = [p.tokens for p in done], [p.cbs for p in done]
        ax.plot(t, cbs, "o-", color=color, label=f"{label}: local CBS(t)")
        for j, p in enumerate(done):  # the interval [CBS, first failing batch); an open one ends in an arrow
            top = p.cbs_high if math.isfinite(p.cbs_high) else 2 * p.cbs
            ax.plot([p.tokens, p.tokens], [p.cbs, top], "-", color=color, alpha=0.4, lw=3,
                    label="up to the first failing batch" if i == 0 and j == 0 else None)
            if not math.isfinite(p.cbs_high):
                ax.plot([p.tokens], [top], "^", color=color, alpha=0.6)
        bounds = [p for p in mine if not p.complete and math.isfinite(p.cbs_low)]
        if bounds:
            ax.plot([p.tokens for p in bounds], [p.cbs_low for p in bounds], "^", mfc="none", color=color,
                    label=f"{label}: incomplete (lower bound)")
        noise = fit.noise.get(name, [])
        if noise:
            ax.plot([p.tokens for p in noise], [p.b_simple for p in noise], "--", color=color, alpha=0.7,
                    label=f"{label}: B_simple of the base run")
    pairs = {(c.sweep.setting, c.sweep.tokens, c.sweep.cbs, c.sweep.cbs_low, c.sweep.cbs_high)
             for c in fit.comparison}
    for j, (name, d, cbs, lo, hi) in enumerate(sorted(pairs)):
        err = [[cbs - lo], [hi - cbs]] if math.isfinite(lo) and math.isfinite(hi) else None
        ax.errorbar([d], [cbs], yerr=err, fmt="s", color="k", capsize=3,
                    label="sweep CBS at D (full runs)" if j == 0 else None)
    ax.set(xscale="log", yscale="log", xlabel="tokens t seen by the base run (branch points)",
           ylabel="batch (sequences)", title="Local critical batch size along training")
    plain_log_axes(ax, [v.batch for p in fit.points for v in p.verdicts])
    ticks_at(ax.xaxis, [p.tokens for p in fit.points] + [c.sweep.tokens for c in fit.comparison], count_text)
    legend(ax)
    return fig


def figure_branch_losses(fit: BranchedFit, name: str):
    """Each branch point's test L(b_j) / min_{i<j} L(b_i) - 1 against the batch, with the tolerance: a batch
    passes below the line while the smaller ones passed."""
    fig, ax = new_axes()
    for i, p in enumerate(fit.points_of(name)):
        best, xs, ys, fails = math.inf, [], [], []
        for v in p.verdicts:
            if v.loss is not None and math.isfinite(v.loss) and math.isfinite(best):
                xs.append(v.batch)
                ys.append(100 * (v.loss / best - 1))
                if v.verdict != "pass":
                    fails.append((v.batch, ys[-1]))
            if v.verdict != "pass":
                if v.verdict in ("diverged", "failed"):
                    ax.axvline(v.batch, ls=":", color=f"C{i % 10}")
                break
            best = min(best, v.loss)
        ax.plot(xs, ys, "o-", ms=4, color=f"C{i % 10}",
                label=f"branch point t = {count_text(p.tokens)} tokens: CBS {_fmt_batch(p)}")
        if fails:
            ax.plot(*zip(*fails), "x", ms=9, color=f"C{i % 10}")
    tolerances = sorted({p.tolerance for p in fit.points_of(name)})
    for tol in tolerances:
        ax.axhline(100 * tol, ls="--", color="0.4", label=f"tolerance {100 * tol:g}%" if tol == tolerances[0] else None)
    ax.set(xscale="log", xlabel="branch batch b (sequences)", ylabel="L(b) / best smaller-batch L - 1 (%)",
           title=f"{setting_title(fit.study.settings[name])}: branch losses against the smaller batches")
    ticks_at(ax.xaxis, [v.batch for p in fit.points_of(name) for v in p.verdicts])
    legend(ax)
    return fig


def _fmt_batch(p: LocalCbs) -> str:
    if not p.complete:
        return "incomplete"
    return "none" if math.isnan(p.cbs) else f"{p.cbs:g}" + ("+" if math.isinf(p.cbs_high) else "")


def branched_figures(fit: BranchedFit) -> dict:
    """Relative path -> matplotlib Figure, every figure of a branched study's fit."""
    figs = {"figures/cbs_curve.png": figure_cbs_curve(fit)}
    paths = slug_names(list(fit.study.settings), "branches_")
    figs.update({paths[name]: figure_branch_losses(fit, name) for name in fit.study.settings})
    return figs


def render_branched_figures(fit: BranchedFit) -> dict[str, bytes]:
    return {path: png_bytes(fig) for path, fig in branched_figures(fit).items()}
