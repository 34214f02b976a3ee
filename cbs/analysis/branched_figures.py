"""The figures of `cbs fit` on a branched study, as matplotlib Figures (`render_branched_figures` makes the PNGs):
CBS(t) with its intervals, the base run's B_simple along t and the sweep's CBS at matching D; and per setting, each
branch point's losses against the rule's threshold. Drawn as figures.py draws (module docstring there)."""

from __future__ import annotations

import math

from cbs.analysis.branched import LocalCbs
from cbs.analysis.branched_fit import BranchedFit
from cbs.runfiles import Status
from cbs.analysis.figures import (
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
        noise = fit.b_simple_along(name)
        if noise:
            ax.plot([t for t, _ in noise], [v for _, v in noise], "--", color=color, alpha=0.7,
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


def _excess(p: LocalCbs) -> tuple[list[tuple[int, float, bool]], list[int]]:
    """(batch, excess over the best smaller batch, failed) for the judged batches after the first, and the batches
    that could not train: the excess in % (relative rule) or in nats (absolute rule)."""
    best, points, broken = math.inf, [], []
    for v in p.verdicts:
        if v.verdict in (Status.DIVERGED, Status.FAILED):
            broken.append(v.batch)
        if v.verdict not in ("pass", "fail"):
            break
        if math.isfinite(best):
            excess = 100 * (v.loss / best - 1) if p.rule == "relative" else v.loss - best
            points.append((v.batch, excess, v.verdict == "fail"))
        best = min(best, v.loss)
    return points, broken


def figure_branch_losses(fit: BranchedFit, name: str):
    """Each branch point's excess loss over the best smaller batch against the batch, with the threshold: relative
    rule L(b_j) / min_{i<j} L(b_i) - 1 in %, absolute rule L(b_j) - min_{i<j} L(b_i) in nats (the eval-noise
    allowance comes on top of epsilon)."""
    fig, ax = new_axes()
    points = fit.points_of(name)
    relative = all(p.rule == "relative" for p in points)
    for i, p in enumerate(points):
        excess, broken = _excess(p)
        for batch in broken:
            ax.axvline(batch, ls=":", color=f"C{i % 10}")
        ax.plot([b for b, _, _ in excess], [y for _, y, _ in excess], "o-", ms=4, color=f"C{i % 10}",
                label=f"branch point t = {count_text(p.tokens)} tokens: CBS {_fmt_batch(p)}")
        fails = [(b, y) for b, y, failed in excess if failed]
        if fails:
            ax.plot(*zip(*fails), "x", ms=9, color=f"C{i % 10}")
    thresholds = sorted({p.tolerance for p in points})
    for t in thresholds:
        label = f"tolerance {100 * t:g}%" if relative else f"epsilon {t:g} nats"
        ax.axhline(100 * t if relative else t, ls="--", color="0.4", label=label if t == thresholds[0] else None)
    ylabel = "L(b) / best smaller-batch L - 1 (%)" if relative else "L(b) - best smaller-batch L (nats)"
    ax.set(xscale="log", xlabel="branch batch b (sequences)", ylabel=ylabel,
           title=f"{setting_title(fit.study.settings[name])}: branch losses against the smaller batches")
    ticks_at(ax.xaxis, [v.batch for p in points for v in p.verdicts])
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
