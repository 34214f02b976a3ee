"""The files of `cbs fit` on a study with variants: the single-recipe tables stacked with a `variant` column, the
CBS in tokens, scaling.json with every variant's laws, report.md (the comparison, then each variant's own
report) and the figures (each variant's under figures/<variant>/, and S(B) per variant per setting)."""

from __future__ import annotations

import json
import math

import numpy as np

from cbs.analysis.figures import (legend, new_axes, plain_log_axes_y, png_bytes, render_figures, setting_title,
                                  slug_names, ticks_at)
from cbs.analysis.outputs import (CBS_COLUMNS, DEGRADATION_COLUMNS, STEPS_COLUMNS, TIME_COLUMNS, cbs_rows, csv_bytes,
                                  degradation_rows, scaling_doc, steps_rows, time_table_rows)
from cbs.analysis.report import _with_ci, fmt, md_table, report_md
from cbs.analysis.study_fit import StudyFit, study_warnings
from cbs.analysis.variants import CSV_VARIANT_COLUMN, TOKEN_COLUMNS, Crossover, VariantsFit, slug

CROSSOVER_COLUMNS = ["setting", "reference", "variant", "crossover_batch", "faster_below", "faster_above",
                     "batch_min", "batch_max", "crossover_outside_sweep", "ratio_at_min", "ratio_at_max", "note"]
"""One row per (setting, variant other than the reference): `crossover_batch` where the fitted S(B) cross within
the swept batches (empty: they do not); `crossover_outside_sweep`: where the curves would cross outside them;
`ratio_at_*`: fitted S_variant / S_reference at the smallest and largest swept batch."""
SCALING_VARIANT_KEYS = ("seq_len", "settings_fitted", "laws", "laws_weighted", "laws_b_noise", "laws_s_min",
                        "excluded_settings", "excluded_settings_b_noise", "warnings")


def _with_variant(columns: list[str], rows_by_variant: dict[str, list[list]]) -> bytes:
    """The rows of each variant with a `variant` column after `setting`."""
    out = [[row[0], variant, *row[1:]] for variant, rows in rows_by_variant.items() for row in rows]
    return csv_bytes([columns[0], CSV_VARIANT_COLUMN, *columns[1:]], out)


def _cbs_token_rows(fit: StudyFit) -> list[list]:
    seq = fit.seq_len
    rows = []
    for row, e in zip(cbs_rows(fit), fit.estimates):
        tokens = [v * seq if seq and not math.isnan(v) else None for v in (e.cbs, *e.cbs_ci)]  # inf stays inf
        rows.append(row + [seq, *tokens])
    return rows


def variant_scaling_json(vfit: VariantsFit) -> bytes:
    """The reference variant's scaling.json (what `cbs forecast` reads), with `variant` naming it and `variants`
    holding every variant's laws."""
    doc = scaling_doc(vfit.fits[vfit.reference_variant])
    doc["variant"] = vfit.reference_variant
    doc["variants"] = {v: {k: d[k] for k in SCALING_VARIANT_KEYS}
                       for v, d in ((v, scaling_doc(f)) for v, f in vfit.fits.items())}
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def render_variant_outputs(vfit: VariantsFit) -> dict[str, bytes]:
    """Every output file of a fit with variants, relative path -> content."""
    fits = vfit.fits
    files = {
        "steps.csv": _with_variant(STEPS_COLUMNS, {v: steps_rows(f) for v, f in fits.items()}),
        "cbs.csv": _with_variant(CBS_COLUMNS + TOKEN_COLUMNS, {v: _cbs_token_rows(f) for v, f in fits.items()}),
        "degradation.csv": _with_variant(DEGRADATION_COLUMNS, {v: degradation_rows(f) for v, f in fits.items()}),
        "scaling.json": variant_scaling_json(vfit),
        "report.md": variants_report_md(vfit),
        "crossovers.csv": csv_bytes(CROSSOVER_COLUMNS, crossover_rows(vfit.crossovers)),
    }
    if any(f.times for f in fits.values()):
        files["time_to_target.csv"] = _with_variant(TIME_COLUMNS, {v: time_table_rows(f) for v, f in fits.items()})
    for v, f in fits.items():
        for path, data in render_figures(f.table, f.estimates, f.laws.cbs, f.laws.b_noise, f.overhead,
                                         f.b_simple).items():
            files[path.replace("figures/", f"figures/{slug(v)}/", 1)] = data
    paths = variant_figure_names(vfit)
    for name in paths:
        files[paths[name]] = png_bytes(figure_variants(vfit, name))
    return files


# ----------------------------------------------------------------------------------------------------------------
# figures


def variant_figure_names(vfit: VariantsFit) -> dict[str, str]:
    """Setting name -> figures/variants_<slug>.png, for every setting some variant measured."""
    names = list(dict.fromkeys(e.setting.name for f in vfit.fits.values() for e in f.estimates))
    return slug_names(names, "variants_")


def figure_variants(vfit: VariantsFit, setting: str):
    """S(B) of every variant for one setting (log-log): measured points, lower bounds, the fitted hyperbola, and
    where a variant's curve crosses the reference variant's."""
    fig, ax = new_axes()
    batches, shown, title_setting = set(), [], None
    for i, (variant, fit) in enumerate(vfit.fits.items()):
        points = fit.table.points_of(setting)
        est = next((e for e in fit.estimates if e.setting.name == setting), None)
        if not points or est is None:
            continue
        title_setting = title_setting or est.setting
        color = f"C{i % 10}"
        seq = f", {fit.seq_len} tokens/seq" if fit.seq_len else ""
        usable = [p for p in points if not p.censored]
        bounds = [p for p in points if p.lower_bound]
        ax.plot([p.batch_size for p in usable], [p.steps for p in usable], "o", color=color,
                label=f"{variant}{seq}" + (" (reference)" if variant == vfit.reference_variant else ""))
        if bounds:
            ax.plot([p.batch_size for p in bounds], [p.censored_at_steps for p in bounds], "^", color=color,
                    mfc="none", label=f"{variant}: S > steps trained")
        if est.fit is not None:
            b = [p.batch_size for p in points]
            grid = np.geomspace(min(b) / 1.3, max(b) * 1.3, 200)
            cbs = f", CBS {est.cbs:.3g}" if est.fitted else ""
            text = ("S ~ 1/B throughout (no saturation: B_noise at the search bound)" if est.fit.bound == 1 else
                    f"S_min {est.fit.s_min:.3g}, B_noise {est.fit.b_noise:.3g}{cbs}")
            ax.plot(grid, est.fit.steps(grid), "-", color=color, label=f"{variant} fit: {text}")
        batches.update(p.batch_size for p in points)
        shown += [p.steps for p in usable] + [p.censored_at_steps for p in bounds]
    for c in vfit.crossovers:
        if c.setting == setting and c.batch is not None:
            ax.axvline(c.batch, ls=":", color="0.3", label=f"{c.faster_above} overtakes {c.faster_below}: "
                                                           f"B = {c.batch:.3g}")
    target = title_setting.target_loss if title_setting else None
    goal = f"steps to the shared target loss {target:.4g}" if target is not None else "steps to the shared target"
    ax.set(xscale="log", yscale="log", xlabel="global batch B (sequences)", ylabel="steps to target S(B)",
           title=f"{setting_title(title_setting) if title_setting else setting}: {goal}, per variant")
    if shown:
        ax.set_ylim(min(shown) / 2, max(shown) * 2)
    ticks_at(ax.xaxis, batches)
    plain_log_axes_y(ax)
    legend(ax)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# report


def _side_by_side_lines(vfit: VariantsFit) -> list[str]:
    rows = []
    settings = list(dict.fromkeys(e.setting.name for f in vfit.fits.values() for e in f.estimates))
    for name in settings:
        for variant, fit in vfit.fits.items():
            e = next((x for x in fit.estimates if x.setting.name == name), None)
            if e is None:
                continue
            seq = fit.seq_len
            tokens = (_with_ci(e.cbs * seq, (e.cbs_ci[0] * seq, e.cbs_ci[1] * seq)) if seq and e.fitted else "")
            steps = {p.batch_size: p for p in fit.table.points_of(name)}
            reached = sum(not p.censored for p in steps.values())
            rows.append([name, variant + (" (reference)" if variant == vfit.reference_variant else ""),
                         str(seq or ""), f"{reached}/{len(steps)}", _with_ci(e.s_min, e.s_min_ci),
                         _with_ci(e.b_noise, e.b_noise_ci), _with_ci(e.cbs, e.cbs_ci), tokens, e.note])
    return ["## Variants side by side", "",
            "Per (setting, variant), with 95% intervals: S_min and B_noise of the fitted S(B) = S_min (1 + B_noise / "
            "B), and the CBS in sequences and in tokens (sequences x the variant's seq_len). `batches`: batches "
            "that reached the shared target / batches trained. Every variant chases the same target loss per "
            "setting, set by the reference variant's runs at B0, so their steps are comparable. Each variant's own "
            "report follows below.", "",
            *md_table(["setting", "variant", "seq_len", "batches", "S_min", "B_noise", "CBS (sequences)",
                       "CBS (tokens)", "note"], rows), ""]


def _crossover_lines(vfit: VariantsFit) -> list[str]:
    lines = ["## Where one variant overtakes another", "",
             "The fitted hyperbolas S_1(B) = a_1 + b_1/B and S_2(B) = a_2 + b_2/B (a = S_min, b = S_min B_noise) "
             "cross at B_x = (b_2 - b_1) / (a_1 - a_2), at most once: below B_x one variant needs fewer steps, above "
             "it the other. Each variant against the reference variant "
             f"({vfit.reference_variant}):", ""]
    if not vfit.crossovers:
        return lines + ["No setting was measured by two variants.", ""]
    lines += [f"- {c.sentence()}" for c in vfit.crossovers]
    paths = variant_figure_names(vfit)
    return lines + ["", *(f"- {name}: ![S(B) per variant]({path})" for name, path in paths.items()), ""]


def _law_lines(vfit: VariantsFit) -> list[str]:
    rows = []
    for variant, fit in vfit.fits.items():
        for family, laws in (("CBS", fit.laws.cbs), ("B_noise", fit.laws.b_noise)):
            for key in ("tokens", "model_params"):
                law = laws.get(key)
                if law is None or not law.identifiable:
                    continue
                lo, hi = law.param_ci(1)
                ci = f" [{lo:.3f}, {hi:.3f}]" if law.df_resid > 0 else " (exact)"
                rows.append([variant, family, f"{law.symbol}^{law.exponent:.3f}{ci}", str(law.n_points)])
    if not rows:
        return ["## Laws per variant", "", "No variant has a law: each needs settings with at least two values of D "
                "(or of N) whose CBS lies within the sweep.", ""]
    return ["## Laws per variant", "", "Exponents of the one-variable laws of each variant (95% t intervals); each "
            "variant's report below has all its laws.", "",
            *md_table(["variant", "Y", "law", "settings"], rows), ""]


def _variant_section(variant: str, fit: StudyFit, reference: str) -> list[str]:
    """A variant's own report.md, its headings one level down and its figure links into figures/<variant>/."""
    text = report_md(fit).decode("utf-8").replace("](figures/", f"](figures/{slug(variant)}/")
    lines = text.split("\n")
    out = [f"## Variant {variant}" + (" (reference)" if variant == reference else ""), ""]
    for line in lines[2:]:  # its own title (and the blank line after it) dropped
        out.append("#" + line if line.startswith("#") else line)
    return out + [""]


def variants_report_md(vfit: VariantsFit) -> bytes:
    t = vfit.table
    head = ["# Critical batch size report: variants", "",
            f"Input: study `{t.source}` with {len(vfit.fits)} variants ({', '.join(vfit.variants)}); the reference "
            f"variant {vfit.reference_variant}'s runs at B0 set every setting's target loss, shared by all. Each "
            "variant is fitted as a study of its own (pooled noise, laws); batch sizes are global batches in "
            "sequences. Tables: steps.csv, cbs.csv (with `cbs_tokens`), degradation.csv carry a `variant` column.",
            ""]
    parts = [head, _side_by_side_lines(vfit), _crossover_lines(vfit), _law_lines(vfit)]
    parts += [_variant_section(v, f, vfit.reference_variant) for v, f in vfit.fits.items()]
    return "\n".join(line for part in parts for line in part).encode("utf-8")


def variant_summary(vfit: VariantsFit) -> list[str]:
    """The lines `cbs fit` prints for a study with variants."""
    lines = [f"cbs fit: {len(vfit.fits)} variants ({', '.join(vfit.variants)}; reference {vfit.reference_variant})"]
    for variant, fit in vfit.fits.items():
        for e in fit.estimates:
            if not e.fitted:
                lines.append(f"  {e.setting.name} [{variant}]: {e.note}")
                continue
            ci = f" [{e.cbs_ci[0]:.4g}, {e.cbs_ci[1]:.4g}]" if math.isfinite(e.cbs_ci[0]) else ""
            tokens = f" = {fmt(e.cbs * fit.seq_len)} tokens" if fit.seq_len else ""
            lines.append(f"  {e.setting.name} [{variant}]: CBS {e.cbs:.4g}{ci} sequences{tokens}")
    lines += [f"  {c.sentence()}" for c in vfit.crossovers]
    warnings = sum(len(study_warnings(f)) for f in vfit.fits.values())
    if warnings:
        lines.append(f"  {warnings} warning(s): see report.md")
    return lines


def crossover_rows(crossovers: list[Crossover]) -> list[list]:
    return [[c.setting, c.reference, c.variant, c.batch, c.faster_below, c.faster_above, *c.swept, c.extrapolated,
             *c.ratio, c.note] for c in crossovers]
