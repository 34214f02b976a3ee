"""report.md of `cbs fit`: what was measured, how, the CBS per setting with diagnostics, the degradation range,
every law with its interval, what was left out and why, warnings, and time and cost to target."""

from __future__ import annotations

import math

from cbs.analysis.cost import cheapest, device_word, fastest, hours_text
from cbs.analysis.figures import (figure_names, has_b_simple_figure, has_degradation_figure, law_figure_variables,
                                  setting_figures)
from cbs.analysis.laws import JOINT, SYMBOLS, PowerLaw
from cbs.analysis.noise_scale import NEAR
from cbs.analysis.shapes import SAME_N_TOLERANCE, width_vs_depth
from cbs.analysis.steps import StepsTable
from cbs.analysis.study_fit import StudyFit, study_warnings

MAX_RESIDUAL_COLUMNS = 12


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if math.isinf(x):
        return "inf"
    return f"{x:,.0f}" if abs(x) >= 10 ** digits else f"{x:.{digits}g}"


def _with_ci(v: float, ci: tuple[float, float]) -> str:
    if math.isnan(v):
        return ""
    return f"{fmt(v)} [{fmt(ci[0])}, {fmt(ci[1])}]" if not math.isnan(ci[0]) else fmt(v)


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _input_lines(t: StepsTable) -> list[str]:
    if t.input_kind == "csv":
        return [f"Input: steps table `{t.source}` (steps to target taken as given)."]
    unfinished = ""
    if t.unfinished_runs:
        shown = ", ".join(t.unfinished_runs[:10]) + (" ..." if len(t.unfinished_runs) > 10 else "")
        unfinished = (f"; {len(t.unfinished_runs)} unfinished run(s) (no result.json, or preempted) skipped "
                      f"({shown})")
    seq = f"; sequences of {t.seq_len} tokens" if t.seq_len else ""
    return [f"Input: study `{t.source}`: {t.finished_runs} finished run(s){unfinished}; "
            f"target crossing: {t.target_kind}{seq}."]


def _method_lines(fit: StudyFit) -> list[str]:
    b0 = f"B0 = {fit.reference_batch:g}" if fit.reference_batch else "B0 = the smallest batch of each setting"
    o = fit.overhead
    lines = [
        "## Method", "",
        "- S(B): the fewest steps to the target loss over the runs at batch B (hyper-parameters differ). A crossing "
        "counts even when its run diverged later (flagged). A batch where no run reached the target is *censored*: "
        "S(B) > the steps its completed runs trained, a lower bound in the fit; runs that diverged or failed "
        "without a crossing are no observation.",
        "- Fit (McCandlish et al. 2018, arXiv 1812.06162): **S(B) = S_min (1 + B_noise / B)** = a + b/B, "
        "least squares on log S; with censored batches, the Tobit likelihood (each lower bound contributes "
        "log(1 - Phi((log cap - log S(B)) / s)), s the residual scale of log S).",
        f"- Critical batch size (Zhang et al. 2025, arXiv 2410.21676): **B\\* = (1 + o) B0 + o B_noise**, "
        f"o = {o:g}, {b0}: the batch at which training needs {1 + o:g}x the steps that perfect linear scaling "
        "from B0 would need; the degradation range gives the same at o = "
        f"{', '.join(f'{v:g}' for v in fit.overheads)}.",
    ]
    if fit.n_resamples > 0:
        lines.append(f"- Intervals ({fit.level:.0%}): parametric bootstrap at the study's pooled residual scale "
                     f"of log S ({fit.n_resamples} resamples, seed {fit.seed}), percentile interval of log S_min and "
                     "log B_noise expanded by t(dof)/z, dof those of the pooled scale; the CBS interval maps from "
                     "B_noise's.")
    else:
        lines.append("- Intervals: none per setting (--bootstrap 0), so no weighted laws.")
    lines.append("- Scaling laws: OLS of log Y on log D, log N, log C (C = 6ND) and jointly on (log D, log N) "
                 "over the settings whose CBS (for B_noise and S_min: whose B_noise) lies within the sweep and "
                 "whose S(B) the hyperbola describes (statsmodels), for Y = CBS, B_noise and S_min; t intervals. "
                 "The others are one-sided bounds or misfits, listed under Scaling laws. The weighted CBS laws use "
                 "WLS with weights 1/se^2, se the width of each setting's log CBS interval, when the intervals "
                 "share one pooled noise scale.")
    if fit.table.shared_runs:
        lines.append("- One sweep serves several data budgets: a run trained to the largest budget also gives the "
                     "crossings of the smaller budgets' targets. Only the warmup (a share of the reference run) "
                     "differs from training each budget separately.")
    return lines + _beta_lines(fit.table) + ["- Formulas and sources: docs/method.md.", ""]


def _beta_lines(t: StepsTable) -> list[str]:
    """The AdamW beta rules of the study's runs and the values they gave per batch."""
    recorded = [r for r in t.runs if r.betas]
    if not recorded:
        return []
    rules = sorted({r.betas[2] for r in recorded})
    per_batch = sorted({(r.batch_size, r.betas[0], r.betas[1]) for r in recorded})
    values = ", ".join(f"B {b}: {b1:g}/{b2:g}" for b, b1, b2 in per_batch)
    return [f"- AdamW betas per batch: {'; '.join(rules)}; beta1/beta2 at each batch: {values}."]


def _warning_lines(fit: StudyFit) -> list[str]:
    warnings = study_warnings(fit)
    if not warnings:
        return ["## Warnings", "", "None.", ""]
    return ["## Warnings", "", *(f"- {w}" for w in warnings), ""]


def _steps_table_lines(t: StepsTable) -> list[str]:
    batches = sorted({p.batch_size for p in t.points})
    rows = []
    for s in t.settings():
        cells = {}
        for p in t.points_of(s.name):
            if not p.censored:
                cells[p.batch_size] = (("<= " if p.upper_bound else "") + f"{fmt(p.steps, 4)} ({p.runs})"
                                       + (" †" if p.diverged_after else ""))
            elif p.lower_bound:
                cells[p.batch_size] = f"> {fmt(p.censored_at_steps, 4)} ({p.runs})"
            else:
                cells[p.batch_size] = f"no observation ({p.runs})"
        rows.append([s.name, fmt(s.model_params), fmt(s.tokens)] + [cells.get(b, "") for b in batches])
    lines = ["## Steps to target", "", "S(B) (runs at B) for each global batch B in sequences; `> S`: censored, no "
             "run reached the target within S steps; † the best run diverged after crossing the target"
             + ("; `<= S`: the shortest horizon already reached the target (S at most that)"
                if any(p.upper_bound for p in t.points) else "") + ".", "",
             *md_table(["setting", "N", "D"] + [f"B={b}" for b in batches], rows), ""]
    flagged = [p for p in t.points if p.diverged_after]
    if flagged:
        lines += ["Points whose best run diverged after crossing the target (its crossing counts):", "",
                  *(f"- {p.setting.name}, B={p.batch_size}: S={fmt(p.steps, 4)} from `{p.best_run}`" for p in flagged),
                  ""]
    return lines


def _cbs_table_lines(fit: StudyFit) -> list[str]:
    seq = fit.table.seq_len
    rows = []
    for e in fit.estimates:
        d = e.diagnostics
        quality = f"{fmt(d.residual_sd)} / {fmt(d.r2)}" if d else ""
        rows.append([e.setting.name, fmt(e.setting.model_params), fmt(e.setting.tokens), e.n_batches, e.n_censored,
                     _with_ci(e.s_min, e.s_min_ci), _with_ci(e.b_noise, e.b_noise_ci), _with_ci(e.cbs, e.cbs_ci)]
                    + ([fmt(e.cbs * seq) if e.fitted else ""] if seq else []) + [quality, e.note])
    header = ["setting", "N", "D", "batches", "lower bounds", "S_min", "B_noise", "CBS (sequences)"] + \
        (["CBS (tokens)"] if seq else []) + ["residual sd / R^2 (log S)", "note"]
    return ["## Critical batch size per setting", "", *md_table(header, rows), ""]


def _shape_lines(fit: StudyFit) -> list[str]:
    """Width vs depth: settings of one D whose models have (near-)equal N and another shape (cbs/analysis/shapes.py)."""
    pairs = width_vs_depth(fit.estimates)
    if not pairs:
        return []
    rows = [[fmt(c.wide.setting.tokens), c.wide.setting.name, f"{c.wide.setting.layers} x {c.wide.setting.hidden}",
             _with_ci(c.wide.cbs, c.wide.cbs_ci), c.deep.setting.name,
             f"{c.deep.setting.layers} x {c.deep.setting.hidden}", _with_ci(c.deep.cbs, c.deep.cbs_ci),
             _with_ci(c.ratio, c.ratio_ci)] for c in pairs]
    return ["## Width vs depth", "",
            f"Settings of one data budget whose models have the same non-embedding size (N within "
            f"{SAME_N_TOLERANCE:.0%}) but another shape (layers x width). Ratio = CBS of the wider model / CBS of the "
            f"deeper one; its {fit.level:.0%} interval combines the two CBS intervals as independent (MOVER on the "
            "log scale, Zou & Donner 2008; docs/method.md, \"Width vs depth\"). An interval that excludes 1 says the "
            "shape, not only N, sets the CBS.", "",
            *md_table(["D", "wider", "L x d", "CBS", "deeper", "L x d", "CBS", "ratio wider / deeper"], rows), ""]


def _residual_lines(fit: StudyFit) -> list[str]:
    with_fit = [e for e in fit.estimates if e.diagnostics is not None]
    if not with_fit:
        return []
    batches = sorted({b for e in with_fit for b in e.diagnostics.batches})[:MAX_RESIDUAL_COLUMNS]
    rows = []
    for e in with_fit:
        r = dict(zip(e.diagnostics.batches, e.diagnostics.residuals))
        rows.append([e.setting.name] + [f"{100 * r[b]:+.1f}%" if b in r else "" for b in batches]
                    + [f"{100 * e.diagnostics.max_abs_residual:.1f}%"])
    noise = next((e.noise for e in with_fit if e.noise is not None and not e.lack_of_fit), None)
    pooled = (f" The study's pooled residual s.d. of log S is {noise.describe()}; a setting whose S(B) rises with B "
              "or whose residuals are too large for it is flagged (lack of fit, Warnings) and left out of the laws."
              if noise is not None else "")
    return ["## Fit diagnostics", "", "Residuals of log S (measured over fitted, in %) at each batch; a trend "
            "across B means the hyperbola does not describe the setting. All residuals are in steps.csv." + pooled,
            "",
            *md_table(["setting"] + [f"B={b}" for b in batches] + ["max"], rows), ""]


def _degradation_lines(fit: StudyFit) -> list[str]:
    ok = [e for e in fit.estimates if e.fitted and e.degradation]
    if not ok:
        return []
    overheads = [d.overhead for d in ok[0].degradation]
    rows = [[e.setting.name] + [_with_ci(d.batch, (d.low, d.high)) for d in e.degradation] for e in ok]
    return ["## Degradation range", "",
            "There is no sharp critical batch: the steps lost to a larger batch grow smoothly, "
            "S(B) B / (S(B0) B0) = (B + B_noise) / (B0 + B_noise). B(o) is the batch at which training needs (1 + o)x "
            "the steps of perfect linear scaling from B0 (95% intervals; degradation.csv, "
            "figures/degradation.png).", "",
            *md_table(["setting"] + [f"o = {o:g}" for o in overheads], rows), ""]


def _law_row(family: str, law: PowerLaw) -> list[str]:
    ci = law.df_resid > 0
    exps = []
    for j, v in enumerate(law.variables):
        lo, hi = law.param_ci(j + 1)
        exps.append(f"{SYMBOLS[v]}: {law.params[j + 1]:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if ci else " (exact)"))
    c_lo, c_hi = law.coefficient_ci
    coef = f"{law.coefficient:.4g}" + (f" [{c_lo:.3g}, {c_hi:.3g}]" if ci else "")
    return [family, law.formula(), "; ".join(exps), coef, f"{law.r2:.3f}", str(law.n_points)]


FAMILY_NAMES = {"cbs": "CBS", "cbs_weighted": "CBS, weighted", "b_noise": "B_noise", "s_min": "S_min"}


def _law_lines(fit: StudyFit) -> list[str]:
    laws = fit.laws
    lines = ["## Scaling laws", ""]
    if not laws.cbs:
        return lines + ["No scaling law: the fitted settings take a single value of D and a single value of N.", ""]
    rows = [_law_row(FAMILY_NAMES[fam], law) for fam, group in laws.families().items()
            for key, law in group.items() if law.identifiable]
    lines += [f"Natural-log OLS (WLS for the weighted laws) over the fitted settings; exponents and coefficients "
              f"with {fit.level:.0%} t intervals (`exact`: as many settings as parameters, no interval).", "",
              *md_table(["Y", "law", "exponent(s)", "c", "R^2", "settings"], rows), ""]
    joint = laws.cbs.get("joint")
    if joint is not None and joint.identifiable:
        a, b = (joint.exponents[v] for v in JOINT)
        (a_lo, a_hi), (b_lo, b_hi) = (joint.exponents_ci[v] for v in JOINT)
        lines.append(f"- Joint law: **CBS = c D^a N^b** with a = {a:.3f} [{a_lo:.3f}, {a_hi:.3f}] and b = {b:.3f} "
                     f"[{b_lo:.3f}, {b_hi:.3f}]: the exponent of each with the other held fixed.")
    elif joint is not None:
        collinear = laws.collinearity is not None and laws.collinearity.collinear
        lines.append(f"- Joint law in (D, N): not identifiable: {joint.reason}."
                     + (" The D, N and C laws are then one line in different units, and `cbs forecast` uses the "
                        "D law." if collinear else ""))
    for key in ("tokens", "model_params"):
        law = laws.cbs.get(key)
        if law is not None and law.pooled:
            other = "N" if key == "tokens" else "D"
            lines.append(f"- {other} also varies across the settings of the {law.symbol} law: it pools them and "
                         f"mixes the effect of {other} into the exponent of {law.symbol}"
                         + (" (the joint law separates them)." if joint is not None and joint.identifiable else "."))
    lines.append("- B_noise laws: B\\* = (1 + o) B0 + o B_noise has a floor (1 + o) B0 that flattens the CBS "
                 "exponent when o B_noise is not much larger than it; B_noise has none, so its exponent is the one "
                 "that transfers to other B0.")
    lines += _left_out_lines(fit)
    return lines + [""]


def _left_out_lines(fit: StudyFit) -> list[str]:
    laws, lines = fit.laws, []
    if laws.excluded:
        lines.append("- Settings left out of the CBS laws (one-sided bounds, misfits, no fit; in cbs.csv `law_note`):")
        lines += [f"  - {name}: {why}" + (" (the largest-CBS settings: the laws are biased low without them)"
                                          if why.startswith("no saturation") or "lower bound" in why else "")
                  for name, why in laws.excluded]
    if laws.excluded_b_noise:
        lines.append("- Settings in the CBS laws but left out of the B_noise and S_min laws:")
        lines += [f"  - {name}: {why}" for name, why in laws.excluded_b_noise]
    if laws.weighted_note:
        lines.append(f"- No weighted laws: {laws.weighted_note}; the plain (OLS) laws stand.")
    if laws.unweighted:
        lines.append("- Settings with weight 0 in the weighted laws (in the plain ones):")
        lines += [f"  - {name}: {why}" for name, why in laws.unweighted]
    return lines


def _time_lines(fit: StudyFit) -> list[str]:
    lines = ["## Time and cost to target", ""]
    if not fit.times:
        return lines + [f"No time/cost table: {fit.time_note}.", ""]
    dev = device_word(fit.table.runs)  # CPU runs are not counted in GPU-hours (time_to_target.csv keeps its columns)
    lines += [f"Wall-clock hours and {dev}-hours to reach each setting's target at the measured S(B), with {dev} "
              f"counts up to the budget of {fit.gpu_budget} {dev}(s) (throughput: {fit.throughput.source}; a (B, G) "
              f"not measured is modelled as data parallelism at the measured per-{dev} throughput of its local "
              "batch, docs/method.md). Every row is in time_to_target.csv (its `gpus` and `gpu_hours` columns count "
              f"{dev}s). The CBS is about steps, not hours: the fastest batch also depends on how throughput grows "
              f"with the batch per {dev}, and above the CBS each step buys less than linear scaling promises, so the "
              f"same target costs more {dev}-hours.", ""]
    rows = []
    for s in fit.table.settings():
        mine = fit.times_of(s.name)
        best, low = fastest(mine), cheapest(mine)
        if best is None:
            rows.append([s.name, "no throughput for this model", "", ""])
            continue
        rows.append([s.name, f"B={best.batch_size} on {best.gpus} {dev}(s): {hours_text(best.hours)}, "
                             f"{fmt(best.gpu_hours)} {dev}-h", f"B={low.batch_size} on {low.gpus} {dev}(s): "
                             f"{hours_text(low.hours)}, {fmt(low.gpu_hours)} {dev}-h",
                     next((fmt(e.cbs) for e in fit.estimates if e.setting.name == s.name and e.fitted), "")])
    return lines + [*md_table(["setting", f"fastest with <= {fit.gpu_budget} {dev}(s)", f"fewest {dev}-hours",
                                "CBS"], rows), ""]


NOISE_CAVEAT = ("B_simple = tr(Sigma) / |G|^2 is read off single runs, without a sweep: McCandlish et al. 2018 (sec. "
                "2.2) obtain it from B_noise = tr(H Sigma) / (G^T H G) by taking the Hessian H as a multiple of the "
                "identity, and with an ill-conditioned Hessian it under-estimates the critical batch. It is reported "
                "beside the measured B_noise and CBS, never instead of them.")
NO_NOISE = ("No run logged `train/noise_scale`: pretrain measures it only when a step sees two batch sizes, i.e. "
            ">= 2 micro-batches (gradient accumulation) or >= 2 data-parallel ranks; every run here had a single "
            "micro-batch on a single rank.")


def _noise_lines(fit: StudyFit) -> list[str]:
    if fit.table.input_kind != "study":
        return []
    lines = ["## Gradient noise scale", ""]
    if not fit.noise_logged:
        return lines + [NO_NOISE, ""]
    rows = []
    for e in fit.estimates:
        b = fit.b_simple.get(e.setting.name)
        where = (f"{'reference runs' if b.source == 'reference' else 'all runs of the model'} ({b.runs}), "
                 f"{b.readings} readings at {fmt(b.tokens)} tokens") if b else f"none resolved within {NEAR:.0%} of D"
        ratio = fmt(b.value / e.b_noise) if b and e.fitted else ""
        rows.append([e.setting.name, fmt(e.setting.tokens), fmt(b.value) if b else "", where,
                     f"{b.unusable:.0%}" if b else "", _with_ci(e.b_noise, e.b_noise_ci), _with_ci(e.cbs, e.cbs_ci),
                     ratio])
    return lines + [
        "B_simple per setting (sequences): the ratio of the summed per-step estimates of tr(Sigma) and |G|^2 over "
        f"the readings the reference runs logged within {NEAR:.0%} of the setting's budget D (else those of every "
        "run of the model), beside the fitted B_noise and CBS (cbs.csv `b_simple`, `b_simple_source`). "
        "\"unusable\" is the share of those readings whose logged EMA ratio `train/noise_scale` is NaN or <= 0 "
        "(cbs.csv `b_simple_unusable`): they are kept in the sums, and a high share says the readings are noisy "
        "(B_simple well above the global batch).", "", NOISE_CAVEAT, "",
        *md_table(["setting", "D", "B_simple", "read from", "unusable", "B_noise", "CBS", "B_simple / B_noise"],
                  rows), ""]


def _meaning(fit: StudyFit) -> list[str]:
    o = fit.overhead
    text = ("S(B) falls almost as 1/B (perfect data parallelism) while B is well below B_noise, and flattens at "
            f"S_min once B is well above it. The critical batch size is where a larger batch stops paying: at B* "
            f"training needs {1 + o:g}x the steps linear scaling promises, and beyond it more data-parallel "
            "workers buy little wall-clock time for their compute.")
    ok = [e for e in fit.estimates if e.fitted]
    if ok:
        lo, hi = min(ok, key=lambda e: e.cbs), max(ok, key=lambda e: e.cbs)
        text += f" Here the CBS ranges from {fmt(lo.cbs)} ({lo.setting.name}) to {fmt(hi.cbs)} ({hi.setting.name})."
    law, noise = fit.laws.cbs.get("tokens"), fit.laws.b_noise.get("tokens")
    if law:
        text += (f" With the data budget it scales as D^{law.exponent:.2f}: doubling D multiplies the CBS by "
                 f"{2 ** law.exponent:.2f} (Zhang et al. report D^0.47 for compute-optimal runs)")
        text += f"; B_noise scales as D^{noise.exponent:.2f}." if noise else "."
    law = fit.laws.cbs.get("model_params")
    if law:
        text += (f" With model size it scales as N^{law.exponent:.2f}"
                 + (" (pooled over data budgets, see above)" if law.pooled else "")
                 + "; Zhang et al. find a near-zero exponent in N at fixed D.")
    return ["## What it means", "", text, ""]


def _figure_lines(fit: StudyFit) -> list[str]:
    paths = figure_names(fit.table)
    lines = ["## Figures", "", "![normalised steps](figures/steps_normalized.png)", ""]
    lines += [f"![CBS vs {SYMBOLS[v]}](figures/cbs_vs_{v}.png)" for v in law_figure_variables(fit.laws.cbs)]
    if has_degradation_figure(fit.estimates):
        lines.append("![degradation range](figures/degradation.png)")
    if has_b_simple_figure(fit.estimates, fit.b_simple):
        lines.append("![B_simple vs the fit](figures/b_simple.png)")
    drawn = setting_figures(fit.estimates)
    lines += ["", *(f"- {e.setting.name}: ![{e.setting.name}]({paths[e.setting.name]})" for e in drawn)]
    if len(drawn) < len(fit.estimates):
        lines.append(f"- ... {len(fit.estimates) - len(drawn)} more setting(s) without a figure of their own (the "
                     f"first {len(drawn)} are drawn): their S(B) is in steps.csv, their fit in cbs.csv")
    return lines + [""]


def report_md(fit: StudyFit) -> bytes:
    n_ok = sum(e.fitted for e in fit.estimates)
    head = ["# Critical batch size report", "", *_input_lines(fit.table),
            f"{len(fit.estimates)} setting(s): {n_ok} fitted, {len(fit.estimates) - n_ok} not. "
            "Batch sizes are global batches in sequences.", ""]
    parts = [head, _method_lines(fit), _warning_lines(fit), _steps_table_lines(fit.table), _cbs_table_lines(fit),
             _shape_lines(fit), _residual_lines(fit), _degradation_lines(fit), _law_lines(fit), _time_lines(fit),
             _noise_lines(fit), _meaning(fit),
             _figure_lines(fit)]
    return ("\n".join(line for part in parts for line in part)).encode("utf-8")


