"""The files of `cbs fit` on a branched study: cbs_curve.csv, branches.csv, report.md and figures/*.png, rendered
in memory (relative path -> bytes) for outputs.write_outputs."""

from __future__ import annotations

import math

from cbs.analysis.branch_rules import Z
from cbs.analysis.branched_fit import BranchedFit, branched_warnings
from cbs.analysis.compare import MATCH
from cbs.analysis.branched_figures import render_branched_figures
from cbs.analysis.figures import slug_names
from cbs.analysis.noise_scale import NEAR
from cbs.analysis.outputs import csv_bytes
from cbs.analysis.ramp import batch_ramp, curve_from_points
from cbs.analysis.report import NO_NOISE, NOISE_CAVEAT, fmt, md_table
from cbs.runfiles import Status

CURVE_COLUMNS = ["setting", "tokens", "cbs", "cbs_low", "cbs_high", "model_params", "base_batch", "tolerance",
                 "complete", "n_branches", "b_simple", "seq_len", "note", "rule", "eval_noise",
                 "cbs_noise_low", "cbs_noise_high"]
BRANCH_COLUMNS = ["setting", "tokens", "batch", "run", "status", "loss", "verdict"]
VERDICT_MARKS = {"pass": "pass", "fail": "**fail**", Status.DIVERGED: "**diverged**", Status.FAILED: "**failed**",
                 Status.UNFINISHED: "unfinished", "pending": "pending", "not needed": "(not needed)"}


def cbs_curve_csv(fit: BranchedFit) -> bytes:
    rows = []
    for p in fit.points:
        noise = fit.b_simple_at(p)
        rows.append([p.setting.name, p.tokens, p.cbs, p.cbs_low, p.cbs_high, p.setting.model_params, p.base_batch,
                     p.tolerance, p.complete, len(p.verdicts), noise and noise.value, fit.study.seq_len, p.note, p.rule,
                     p.eval_noise, p.noise_low, p.noise_high])
    return csv_bytes(CURVE_COLUMNS, rows)


def branches_csv(fit: BranchedFit) -> bytes:
    rows = [[p.setting.name, p.tokens, v.batch, v.run, v.status, v.loss, v.verdict]
            for p in fit.points for v in p.verdicts]
    return csv_bytes(BRANCH_COLUMNS, rows)


def _cbs_cell(p) -> str:
    if not p.complete:
        return f">= {fmt(p.cbs_low)} (incomplete)" if math.isfinite(p.cbs_low) else "incomplete"
    if math.isnan(p.cbs):
        return "none"
    return fmt(p.cbs)


def _interval(p) -> str:
    if not p.complete or math.isnan(p.cbs):
        return ""
    return f"[{fmt(p.cbs)}, {fmt(p.cbs_high)})"


def _head(fit: BranchedFit) -> list[str]:
    s = fit.study
    done = sum(b.status != Status.UNFINISHED for b in s.branches)
    seq = f"; sequences of {s.seq_len} tokens" if s.seq_len else ""
    unfinished = f" ({len(s.unfinished)} unfinished: {', '.join(s.unfinished[:10])}" + \
        (" ...)" if len(s.unfinished) > 10 else ")") if s.unfinished else ""
    return ["# Local critical batch size report (branched study)", "",
            f"Input: branched study `{s.source}`: {len(s.settings)} setting(s), {len(s.base_runs)} base run(s), "
            f"{len(s.branches)} branch run(s), {done} finished{unfinished}; loss compared: {s.loss_kind}"
            f"{''.join(f' ({n})' for n in s.notes)}{seq}. "
            "Batch sizes are global batches in sequences; t is the tokens the base run had seen at the branch's "
            "checkpoint.", ""]


RULE_LINES = {
    "absolute": "- **Rule absolute (Merrill et al.): b_1 passes; b_j passes iff L(b_j) <= min_{i<j} L(b_i) + epsilon "
                f"+ {Z:g} sqrt(2) sigma min_{{i<j}} L(b_i)**, every batch judged (a failure by noise does not hide a "
                "larger batch that passes); sigma is the relative s.d. of a branch's eval loss, so a batch fails "
                "only when it is worse than a smaller one by more than epsilon and the excess is significant at the "
                "one-sided 5% level.",
    "relative": "- **Rule relative: b_1 passes; b_j passes iff b_{j-1} passed and L(b_j) <= (1 + tolerance) "
                "min_{i<j} L(b_i)**; the first failure ends the chain.",
}


NO_SIGMA = ("unknown (no base-run eval curve to estimate it from, and no --eval-noise): no allowance and no "
            "interval under eval noise")


def _rule_settings(fit: BranchedFit) -> str:
    rules = sorted({(p.rule, p.tolerance) for p in fit.points})
    noise = sorted({f"{p.eval_noise:.2%}" for p in fit.points if math.isfinite(p.eval_noise)})
    said = "; ".join(f"{r}, {'epsilon' if r == 'absolute' else 'tolerance'} {t:g}{' nats' if r == 'absolute' else ''}"
                     for r, t in rules)
    sigma = ", ".join(noise) if noise else NO_SIGMA
    return f"Used: {said}; eval noise sigma {sigma}."


def _method_lines(fit: BranchedFit) -> list[str]:
    return [
        "## Method", "",
        "- Branched local CBS (Merrill et al. 2025, arXiv 2505.23971): one base run at batch B is checkpointed at "
        "several token counts t; from each checkpoint, short branches at batches b = k B (k = 1, 2, 4, ...; the LR "
        "scaled as the study's `branched.lr_scaling` says) train the same number of tokens. L(b) is a branch's "
        f"final eval loss ({fit.study.loss_kind} weights) on the fixed held-out set.",
        *(RULE_LINES[r] for r in sorted({p.rule for p in fit.points})),
        "- The local CBS(t) is the largest passing batch; its interval runs to the next batch tried above it (inf "
        "when the largest batch passes: a lower bound). The interval under eval noise redraws every loss as "
        "L exp(sigma z) (2000 draws) and gives the 2.5-97.5% range of the CBS. sigma is estimated from the jitter of "
        "each base run's eval curve (`--eval-noise` sets it). " + _rule_settings(fit),
        "- A diverged or failed branch fails its batch and ends the search; a point with an unfinished branch "
        "before that is incomplete (no CBS; the lower bound passed so far is shown).",
        "- The local CBS says how large a batch can be from t on without losing loss; the sweep's CBS (Zhang et al. "
        "2025) is the batch to train a whole run of D tokens with. Formulas: docs/method.md, \"Branched local CBS\".",
        ""]


def _warning_lines(fit: BranchedFit) -> list[str]:
    warnings = branched_warnings(fit)
    return ["## Warnings", "", *(f"- {w}" for w in warnings or ["None."]), ""]


def _curve_lines(fit: BranchedFit) -> list[str]:
    rows = []
    for p in fit.points:
        noise = fit.b_simple_at(p)
        under_noise = f"[{fmt(p.noise_low)}, {fmt(p.noise_high)}]" if math.isfinite(p.noise_low) else ""
        rows.append([p.setting.name, f"{p.tokens:,}", _cbs_cell(p), _interval(p), under_noise,
                     fmt(noise.value) if noise else "", p.note])
    lines = ["## CBS(t)", "", *md_table(["setting", "t (tokens)", "CBS(t)", "interval", "95% under eval noise",
                                          "B_simple (base run)", "note"], rows), ""]
    for name in fit.study.settings:
        mine = [p for p in fit.points_of(name) if math.isfinite(p.cbs)]
        if len(mine) >= 2:
            first, last = mine[0], mine[-1]
            trend = "rises" if last.cbs > first.cbs else "falls" if last.cbs < first.cbs else "stays"
            lines.append(f"- {name}: CBS(t) {trend} from {fmt(first.cbs)} at t = {first.tokens:,} to "
                         f"{fmt(last.cbs)} at t = {last.tokens:,} tokens.")
    return lines + [""]


def _loss_lines(fit: BranchedFit) -> list[str]:
    lines = ["## Branch losses", "", "L(b) per branch point and batch, with its verdict (branches.csv has every "
             "branch).", ""]
    for name in fit.study.settings:
        points = fit.points_of(name)
        batches = sorted({v.batch for p in points for v in p.verdicts})
        rows = []
        for p in points:
            cells = {v.batch: (f"{v.loss:.4f} " if v.loss is not None and math.isfinite(v.loss) else "")
                     + VERDICT_MARKS[v.verdict] for v in p.verdicts}
            rows.append([f"{p.tokens:,}"] + [cells.get(b, "") for b in batches])
        lines += [f"{name}:", "", *md_table(["t (tokens)"] + [f"b={b}" for b in batches], rows), ""]
    return lines


def _noise_lines(fit: BranchedFit) -> list[str]:
    lines = ["## Gradient noise scale along training", ""]
    if not fit.noise_logged:
        return lines + [NO_NOISE.replace("every run here", "every base run here"), ""]
    return lines + ["B_simple of each base run is drawn along t on figures/cbs_curve.png, and the CBS(t) table gives "
                    "it at each t: the ratio of the summed per-step estimates of tr(Sigma) and |G|^2 over the readings "
                    f"within {NEAR:.0%} of t (docs/method.md, \"Gradient noise scale\").", "", NOISE_CAVEAT, ""]


def _compare_lines(fit: BranchedFit) -> list[str]:
    if not fit.sweep_source:
        return []
    lines = ["## Comparison with the sweep", "",
             f"Local CBS(t) of this study beside the CBS of the sweep fit `{fit.sweep_source}` for settings of the "
             f"same model (N) whose budget D is within {MATCH:.0%} of t. They are different quantities: the sweep's "
             "CBS = (1 + o) B0 + o B_noise is the batch to train a whole run of D tokens with (full runs per batch, "
             "steps to a target loss); the local CBS(t) is the largest batch to continue with from the state after "
             "t tokens without losing loss over a short branch. They agree when a fixed-batch run is limited by its "
             "late phase.", ""]
    if not fit.comparison:
        return lines + ["No sweep setting matches a branch point.", ""]
    rows = [[c.point.setting.name, f"{c.point.tokens:,}", fmt(c.point.cbs), _interval(c.point), c.sweep.setting,
             f"{c.sweep.tokens:,}", fmt(c.sweep.cbs) + (f" [{fmt(c.sweep.cbs_low)}, {fmt(c.sweep.cbs_high)}]"
                                                      if math.isfinite(c.sweep.cbs_low) else ""), fmt(c.ratio)]
            for c in fit.comparison]
    return lines + [*md_table(["setting", "t", "local CBS(t)", "interval", "sweep setting", "D", "sweep CBS",
                               "local / sweep"], rows), ""]


def _ramp_lines(fit: BranchedFit) -> list[str]:
    lines = ["## Batch ramp", ""]
    seq = fit.study.seq_len
    for name, setting in fit.study.settings.items():
        knots = [(p.tokens, p.cbs) for p in fit.points_of(name) if math.isfinite(p.cbs)]
        if not knots or not seq:
            continue
        unit = fit.points_of(name)[0].base_batch
        ramp = batch_ramp(curve_from_points(knots, name), setting.tokens, unit, seq)
        stages = "; ".join(f"{s.batch} up to {s.end_tokens:,.0f}" for s in ramp.stages)
        lines.append(f"- {name}, on the ladder {unit} x 2^j over D = {setting.tokens:,} tokens: {stages} tokens; "
                     f"{ramp.steps:,} steps vs {ramp.fixed_steps:,} at the fixed batch {ramp.fixed_batch} "
                     f"({100 * ramp.saved:.1f}% fewer).")
    if len(lines) == 2:
        return []
    return lines + ["", "For a cluster: `cbs forecast --ramp --curve OUT_DIR/cbs_curve.csv --tokens D --gpus G "
                    "--micro-batch M` (docs/method.md, \"Batch ramp\").", ""]


def _figure_lines(fit: BranchedFit) -> list[str]:
    paths = slug_names(list(fit.study.settings), "branches_")
    return ["## Figures", "", "![CBS(t)](figures/cbs_curve.png)", "",
            *(f"- {name}: ![{name}]({paths[name]})" for name in fit.study.settings), ""]


def branched_report_md(fit: BranchedFit) -> bytes:
    parts = [_head(fit), _method_lines(fit), _warning_lines(fit), _curve_lines(fit), _loss_lines(fit),
             _noise_lines(fit), _compare_lines(fit), _ramp_lines(fit), _figure_lines(fit)]
    return ("\n".join(line for part in parts for line in part)).encode("utf-8")


def render_branched_outputs(fit: BranchedFit) -> dict[str, bytes]:
    return {"cbs_curve.csv": cbs_curve_csv(fit), "branches.csv": branches_csv(fit),
            "report.md": branched_report_md(fit), **render_branched_figures(fit)}
