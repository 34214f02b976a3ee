"""A Python API for notebooks: what `cbs fit` and `cbs forecast` compute, as objects instead of files.

    from cbs.analysis.api import fit, cbs_table, figures, forecast, ramp, export

    result = fit("studies/demo", out="fit")  # a sweep (StudyFit) or a branched study (BranchedFit); out: files
    rows = cbs_table(result)                 # one dict per setting (per branch point): pandas.DataFrame(rows)
    figs = figures(result)                   # "figures/cbs_vs_tokens.png" -> matplotlib Figure
    plan = forecast("fit/scaling.json", tokens=1e10, gpus=8, micro_batch=4)
    print(export(plan, "megatron"))          # or "torchtitan", "olmo-core"

Bad input raises cbs.analysis.InputError with the message the CLI prints. Nothing here writes files (`cbs fit --out`
does). Like the rest of cbs/analysis/, it never imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cbs.analysis import InputError
from cbs.analysis.branched import RuleChoice, check_rule_choice, is_branched, read_branched
from cbs.analysis.branched_figures import branched_figures
from cbs.analysis.branched_fit import BranchedFit, fit_branched
from cbs.analysis.branched_report import render_branched_outputs
from cbs.analysis.cost import ThroughputModel, study_throughput
from cbs.analysis.export import TrainerPlan, from_batch_plan, from_ramp
from cbs.analysis.export import export as _export
from cbs.analysis.figures import study_figures
from cbs.analysis.fit import LEVEL
from cbs.analysis.forecast import (
    DEFAULT_SEQ_LEN, BatchPlan, Forecast, batch_plan, choose_law, forecast_cbs, load_scaling,
)
from cbs.analysis.outputs import check_out_dir, render_outputs, write_outputs
from cbs.analysis.ramp import Ramp, batch_ramp, curve_from_law, read_curve
from cbs.analysis.run_metrics import MetricsReader
from cbs.analysis.steps import load_steps
from cbs.analysis.study_fit import StudyFit, fit_study
from cbs.analysis.variants import VariantsFit, fit_variants, slug
from cbs.analysis.variants_report import figure_variants, render_variant_outputs, variant_figure_names

__all__ = ["fit", "cbs_table", "figures", "forecast", "ramp", "export", "Planned", "InputError"]


def fit(path: str | Path, out: str | Path | None = None, target_kind: str = "ewa", overhead: float = 0.2,
        bootstrap: int = 1000, seed: int = 0, tolerance: float | None = None, rule: str | None = None,
        epsilon: float | None = None, eval_noise: float | None = None) -> StudyFit | BranchedFit:
    """`cbs fit PATH [--out OUT]`: a study directory (sweep or branched) or a steps CSV; with `out`, also every
    file `cbs fit --out` writes (scaling.json for `forecast`, report.md, figures/). The throughput is the runs'
    own perf/tokens_per_s (as `cbs fit` without --throughput). A branched study takes `rule`, `tolerance`,
    `epsilon` and `eval_noise` as `cbs fit`'s --rule, --tolerance, --epsilon and --eval-noise (None: what the
    branches recorded; eval noise estimated)."""
    path = Path(path)
    if out is not None:
        check_out_dir(Path(out))  # refused before the fitting, as the CLI does
    branched_args = {"rule": rule, "tolerance": tolerance, "epsilon": epsilon, "eval_noise": eval_noise}
    if path.is_dir() and is_branched(path):
        choice = check_rule_choice(RuleChoice(rule, tolerance, epsilon, eval_noise))
        result = fit_branched(read_branched(path, target_kind), choice)
    elif any(v is not None for v in branched_args.values()):
        given = ", ".join(k for k, v in branched_args.items() if v is not None)
        raise InputError(f"{given} is for a branched study (study.method: branched); {path} is not one")
    else:
        table = load_steps(str(path), target_kind)
        reader = MetricsReader()

        def fit_one(t):
            throughput = ThroughputModel(tuple(study_throughput(t.runs, reader)), "the runs' metrics.jsonl")
            return fit_study(t, overhead, None, bootstrap, seed, LEVEL, None, throughput, None, None, reader)

        result = fit_variants(table, fit_one) if table.variants else fit_one(table)
    if out is not None:
        render = {BranchedFit: render_branched_outputs, VariantsFit: render_variant_outputs}.get(type(result),
                                                                                                 render_outputs)
        write_outputs(Path(out), render(result))
    return result


def cbs_table(result: StudyFit | BranchedFit | VariantsFit) -> list[dict]:
    """One row per setting (a sweep: S_min, B_noise, CBS and its interval) or per branch point (a branched study:
    the local CBS(t) and its interval), in sequences; NaN where there is no estimate. A study with variants: one
    row per (setting, variant), with `variant` and the CBS in tokens."""
    if isinstance(result, VariantsFit):
        return [{**row, "variant": v, "seq_len": f.seq_len, "cbs_tokens": row["cbs"] * (f.seq_len or math.nan)}
                for v, f in result.fits.items() for row in cbs_table(f)]
    if isinstance(result, BranchedFit):
        return [{"setting": p.setting.name, "tokens": p.tokens, "cbs": p.cbs, "cbs_low": p.cbs_low,
                 "cbs_high": p.cbs_high, "complete": p.complete} for p in result.points]
    return [{"setting": e.setting.name, "model_params": e.setting.model_params, "tokens": e.setting.tokens,
             "target_loss": e.setting.target_loss, "s_min": e.s_min, "b_noise": e.b_noise, "cbs": e.cbs,
             "cbs_low": e.cbs_ci[0], "cbs_high": e.cbs_ci[1], "note": e.note} for e in result.estimates]


def figures(result: StudyFit | BranchedFit | VariantsFit) -> dict:
    """The figures `cbs fit` would write, as matplotlib Figures keyed by their path under --out."""
    if isinstance(result, BranchedFit):
        return branched_figures(result)
    if isinstance(result, VariantsFit):
        figs = {path.replace("figures/", f"figures/{slug(v)}/", 1): fig for v, f in result.fits.items()
                for path, fig in figures(f).items()}
        return {**figs, **{path: figure_variants(result, name)
                           for name, path in variant_figure_names(result).items()}}
    return study_figures(result.table, result.estimates, result.laws.cbs, result.laws.b_noise, result.overhead,
                         result.b_simple)


@dataclass(frozen=True)
class Planned:
    """A forecast and its batch plan (`cbs forecast` without --ramp)."""

    forecast: Forecast
    plan: BatchPlan
    tokens: float
    law: str
    """Which CBS law: 'joint', 'tokens', 'model_params' (forecast.choose_law)."""


def forecast(scaling: str | Path, tokens: float, model_params: float | None = None, gpus: int = 1,
             micro_batch: int = 1, seq_len: int | None = None) -> Planned:
    """CBS at (D[, N]) from a fit's scaling.json and the largest global batch <= CBS on `gpus` x `micro_batch`."""
    sf = load_scaling(scaling)
    choice = choose_law(sf, tokens, model_params)
    cbs = forecast_cbs(sf.laws[choice.key], choice.x)
    plan = batch_plan(cbs.cbs, gpus, micro_batch, seq_len or sf.seq_len or DEFAULT_SEQ_LEN)
    return Planned(cbs, plan, float(tokens), choice.key)


def ramp(tokens: float, curve: str | Path | None = None, setting: str | None = None,
         scaling: str | Path | None = None, gpus: int = 1, micro_batch: int = 1, seq_len: int | None = None,
         fixed_batch: int | None = None) -> Ramp:
    """`cbs forecast --ramp`: a batch schedule under CBS(t), from a branched fit's cbs_curve.csv (`curve`) or the
    CBS law in D of a scaling.json (`scaling`)."""
    if (curve is None) == (scaling is None):
        raise InputError("ramp needs one of curve (a branched fit's cbs_curve.csv) or scaling (the CBS law in D)")
    if curve is not None:
        cbs_t, _, file_seq_len = read_curve(curve, setting)
    else:
        sf = load_scaling(scaling)
        law = sf.laws.get("tokens")
        if law is None or not law.identifiable:
            raise InputError(f"{sf.path}: no CBS law in D; a ramp needs CBS(t) as a function of tokens")
        cbs_t, file_seq_len = curve_from_law(law.coefficient, law.exponent, f"the CBS law in D of {sf.path}"), \
            sf.seq_len
    return batch_ramp(cbs_t, tokens, gpus * micro_batch, seq_len or file_seq_len or DEFAULT_SEQ_LEN, fixed_batch)


def export(planned: Planned | Ramp, fmt: str, gpus: int | None = None, micro_batch: int | None = None) -> str:
    """The plan or ramp as Megatron-LM flags, torchtitan TOML or OLMo-core Python (cbs/analysis/export.py). A ramp does
    not record its GPUs and micro-batch separately: give them (their product is the ramp's unit)."""
    return _export(_trainer_plan(planned, gpus, micro_batch), fmt)


def _trainer_plan(planned: Planned | Ramp, gpus: int | None, micro_batch: int | None) -> TrainerPlan:
    if isinstance(planned, Planned):
        return from_batch_plan(planned.plan, planned.tokens, f"fixed batch plan <= CBS {planned.forecast.cbs:,.0f} "
                                                             f"(the {planned.law} CBS law)")
    gpus = gpus or (planned.unit // micro_batch if micro_batch else 1)
    micro_batch = micro_batch or planned.unit // gpus
    if gpus * micro_batch != planned.unit:
        raise InputError(f"gpus x micro_batch ({gpus} x {micro_batch}) must equal the ramp's unit {planned.unit}")
    return from_ramp(planned, gpus, micro_batch, "batch ramp (cbs.analysis.api.ramp)")
