"""`cbs fit` and `cbs forecast`: thin shells over cbs.analysis.steps / study_fit / outputs / forecast.

Both return 0 on success and 2 on bad input, with one line on stderr and no traceback; `cbs fit` writes nothing
unless everything was read, fitted and rendered (see outputs.write_outputs).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from cbs.analysis import InputError, parse_count
from cbs.analysis.batch_schedule import write_schedule_file
from cbs.analysis.branched import RuleChoice, check_rule_choice, is_branched, read_branched
from cbs.analysis.branched_fit import BranchedFit, branched_warnings, fit_branched
from cbs.analysis.branched_report import render_branched_outputs
from cbs.analysis.compare import read_sweep_cbs
from cbs.analysis.cost import ThroughputModel, read_throughput_csv, study_throughput
from cbs.analysis.export import FORMATS, export, from_batch_plan, from_ramp
from cbs.analysis.fit import DEGRADATION_OVERHEADS, LEVEL
from cbs.analysis.forecast import (
    DEFAULT_OVERHEAD, DEFAULT_SEQ_LEN, Forecast, also_lines, b_noise_gap, batch_plan, choose_law, describe,
    describe_noise, describe_plan, describe_time_plan, forecast_cbs, forecast_from_b_noise, load_scaling, time_plan,
)
from cbs.analysis.outputs import check_out_dir, csv_bytes, render_outputs, write_outputs
from cbs.analysis.ramp import batch_ramp, curve_from_law, describe_ramp, read_curve
from cbs.analysis.ramp_compare import (RAMP_COLUMNS, figure_ramp, is_ramp_dir, ramp_report, ramp_report_md, ramp_rows,
                                       read_ramp_targets)
from cbs.analysis.run_metrics import MetricsReader
from cbs.analysis.steps import StepsTable, TargetKind, load_steps
from cbs.analysis.study_fit import StudyFit, fit_study, study_warnings
from cbs.analysis.variants import fit_variants
from cbs.analysis.variants_report import render_variant_outputs, variant_summary

MAX_SUMMARY_SETTINGS = 20


class _Parser(argparse.ArgumentParser):
    """argparse that raises InputError instead of printing usage and exiting (one clean line, exit 2)."""

    def error(self, message: str):
        raise InputError(message)


def _run(prog: str, body, argv: list[str] | None) -> int:
    try:
        return body(sys.argv[1:] if argv is None else list(argv))
    except InputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0


def _count(text: str) -> float:
    """A command-line count such as --tokens 10B or --model-params 85M (cbs.analysis.parse_count)."""
    try:
        return float(parse_count(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}: write e.g. 1e10, 10000000000 or 10B") from None


def _overheads(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"--overheads must be comma-separated positive numbers: got {text!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"--overheads must be comma-separated positive numbers: got {text!r}")
    return values


# ----------------------------------------------------------------------------------------------------------------
# cbs fit


def fit_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cbs fit", description="Fit S(B) per setting, the critical batch size with bootstrap "
                "intervals and its degradation range, the scaling laws of CBS and B_noise in D, N, C and (D, N), "
                "and time and cost to target; write steps.csv, cbs.csv, degradation.csv, time_to_target.csv, "
                "scaling.json, report.md, figures/. On a branched study (study.method: branched): the local CBS(t) "
                "per branch point; write cbs_curve.csv, branches.csv, report.md, figures/.")
    p.add_argument("input", metavar="STUDY_DIR_OR_CSV",
                   help="a study directory (runs/*/config.yaml + result.json) or a CSV with columns "
                        "setting,model_params,tokens,batch_size,steps")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory (replaced if a previous fit)")
    p.add_argument("--overhead", type=float, default=0.2, help="o in B* = (1+o) B0 + o B_noise (default 0.2)")
    p.add_argument("--overheads", type=str, default=",".join(f"{o:g}" for o in DEGRADATION_OVERHEADS),
                   metavar="O1,O2,...", help="overheads of the degradation range (default 0.1,0.2,0.5,1)")
    p.add_argument("--reference-batch", type=float, default=None, metavar="B0",
                   help="reference batch in sequences (default: each setting's smallest batch)")
    p.add_argument("--target-kind", choices=[k.value for k in TargetKind], default=TargetKind.EWA.value,
                   help="which crossing counts for a study: raw, ewa (min over EWA decays; default) or best")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples per setting (default 1000; 0: no intervals)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--throughput", default=None, metavar="CSV",
                   help="measured throughput, columns batch_size,gpus,tokens_per_s[,model_params] (default: each "
                        "run's perf/tokens_per_s in metrics.jsonl)")
    p.add_argument("--gpus", type=int, default=None, metavar="G",
                   help="GPU budget of the time/cost table (default: the largest GPU count measured)")
    p.add_argument("--seq-len", type=int, default=None, metavar="T",
                   help="tokens per sequence, for time and cost (default: the runs' model.seq_len)")
    p.add_argument("--rule", choices=["absolute", "relative"], default=None,
                   help="branched study: absolute (Merrill et al.: the largest batch within --epsilon nats, plus "
                        "an allowance for eval noise, of every smaller batch) or relative (a chain within "
                        "--tolerance of the best smaller batch) (default: the study's branched.rule, recorded in each branch)")
    p.add_argument("--epsilon", type=float, default=None, metavar="NATS",
                   help="branched study, absolute rule: loss tolerance in nats (default: the study's "
                        "branched.epsilon_nats, recorded in each branch)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="branched study, relative rule: relative loss tolerance (default: the study's "
                        "branched.tolerance, recorded in each branch)")
    p.add_argument("--eval-noise", type=float, default=None, metavar="SIGMA",
                   help="branched study: relative s.d. of a branch's eval loss, for the absolute rule's allowance "
                        "and the CBS interval under eval noise (default: estimated from each base run's eval "
                        "curve; 0: none)")
    p.add_argument("--compare", default=None, metavar="SWEEP_FIT_DIR",
                   help="branched study: a sweep's `cbs fit` output (its cbs.csv) to put beside CBS(t)")
    return p


def _check_fit_args(args: argparse.Namespace) -> None:
    if not (math.isfinite(args.overhead) and args.overhead > 0):
        raise InputError(f"--overhead must be a positive number: got {args.overhead}")
    if args.reference_batch is not None and not (math.isfinite(args.reference_batch) and args.reference_batch > 0):
        raise InputError(f"--reference-batch must be a positive number of sequences: got {args.reference_batch}")
    for flag, value, least in (("--bootstrap", args.bootstrap, 0), ("--seed", args.seed, 0),
                               ("--gpus", args.gpus, 1), ("--seq-len", args.seq_len, 1)):
        if value is not None and value < least:
            raise InputError(f"{flag} must be >= {least}: got {value}")
    args.overheads = _overheads(args.overheads)


def _throughput(args: argparse.Namespace, table: StepsTable, reader: MetricsReader) -> ThroughputModel:
    if args.throughput:
        return ThroughputModel(tuple(read_throughput_csv(args.throughput)), str(args.throughput))
    return ThroughputModel(tuple(study_throughput(table.runs, reader)), "perf/tokens_per_s in the runs' metrics.jsonl")


def _summary(fit: StudyFit, out: Path, n_files: int, seconds: float) -> list[str]:
    n_ok = sum(e.fitted for e in fit.estimates)
    censored = sum(p.censored for p in fit.table.points)
    at_most = sum(p.upper_bound for p in fit.table.points)
    lines = [f"cbs fit: {len(fit.estimates)} settings ({n_ok} fitted), {censored} censored batch point(s)"
             + (f", {at_most} upper bound(s) (shortest horizon reached the target)" if at_most else "")
             + (f", {len(fit.table.unfinished_runs)} unfinished run(s) skipped" if fit.table.unfinished_runs else "")]
    for e in fit.estimates[:MAX_SUMMARY_SETTINGS]:
        ci = f" [{e.cbs_ci[0]:.4g}, {e.cbs_ci[1]:.4g}]" if math.isfinite(e.cbs_ci[0]) else ""
        lines.append(f"  {e.setting.name}: CBS {e.cbs:.4g}{ci} sequences" if e.fitted
                     else f"  {e.setting.name}: {e.note}")
    if len(fit.estimates) > MAX_SUMMARY_SETTINGS:
        lines.append(f"  ... {len(fit.estimates) - MAX_SUMMARY_SETTINGS} more in cbs.csv")
    for family, name in ((fit.laws.cbs, "CBS"), (fit.laws.b_noise, "B_noise")):
        for law in family.values():
            if not law.identifiable:
                continue
            lines.append(f"  law: {name} = {law.fitted_formula()} (R^2 {law.r2:.3f}, {law.n_points} settings)")
    warnings = study_warnings(fit)
    if warnings:
        lines.append(f"  {len(warnings)} warning(s): see report.md")
    lines.append(f"wrote {out} ({n_files} files) in {seconds:.1f} s")
    return lines


def _write(out: Path, files: dict[str, bytes]) -> None:
    try:
        write_outputs(out, files)
    except OSError as e:  # permissions, disk full: write_outputs has already removed its staging directory
        raise InputError(f"cannot write {out}: {e}") from None


def _branched_summary(fit: BranchedFit, out: Path, n_files: int, seconds: float) -> list[str]:
    complete = sum(p.complete for p in fit.points)
    lines = [f"cbs fit: branched study, {len(fit.study.settings)} setting(s), {len(fit.points)} branch point(s) "
             f"({complete} complete), loss compared: {fit.study.loss_kind}"]
    for p in fit.points[:MAX_SUMMARY_SETTINGS]:
        cbs = f"CBS {p.cbs:g} [{p.cbs_low:g}, {p.cbs_high:g})" if math.isfinite(p.cbs) else p.note
        lines.append(f"  {p.setting.name} at t = {p.tokens:,} tokens: {cbs}")
    if len(fit.points) > MAX_SUMMARY_SETTINGS:
        lines.append(f"  ... {len(fit.points) - MAX_SUMMARY_SETTINGS} more in cbs_curve.csv")
    warnings = branched_warnings(fit)
    if warnings:
        lines.append(f"  {len(warnings)} warning(s): see report.md")
    lines.append(f"wrote {out} ({n_files} files) in {seconds:.1f} s")
    return lines


def _fit_branched(args: argparse.Namespace, out: Path, start: float) -> int:
    study = read_branched(Path(args.input), args.target_kind)
    sweep, source = read_sweep_cbs(args.compare) if args.compare else ([], None)
    choice = RuleChoice(args.rule, args.tolerance, args.epsilon, args.eval_noise)
    fit = fit_branched(study, choice, sweep, source)
    files = render_branched_outputs(fit)
    _write(out, files)
    print("\n".join(_branched_summary(fit, out, len(files), time.perf_counter() - start)))
    return 0


def _fit_ramp(args: argparse.Namespace, out: Path) -> int:
    """A directory with batch-ramp runs: ramp against fixed batches at the target (cbs/analysis/ramp_compare.py)."""
    weights = "raw" if str(getattr(args.target_kind, "value", args.target_kind)) == "raw" else "ewa"
    comparisons = read_ramp_targets(Path(args.input), weights=weights)  # one per target (setting)
    rows = [row for cmp in comparisons for row in ramp_rows(cmp)]
    _write(out, {"ramp.csv": csv_bytes(RAMP_COLUMNS, rows), "report.md": ramp_report_md(comparisons).encode(),
                 "figures/ramp_loss.png": figure_ramp(comparisons[0], [c.target for c in comparisons])})
    print("\n".join(line for cmp in comparisons for line in ramp_report(cmp)[:len(cmp.runs) + 4]) +
          f"\nwrote {out}")
    return 0


def _fit(argv: list[str]) -> int:
    start = time.perf_counter()
    args = fit_parser().parse_args(argv)
    _check_fit_args(args)
    check_rule_choice(RuleChoice(args.rule, args.tolerance, args.epsilon, args.eval_noise))
    out = Path(args.out).expanduser().resolve()  # resolved: `--out .` must have a parent to stage beside
    check_out_dir(out)  # refuse early, before minutes of fitting; write_outputs checks again
    if Path(args.input).is_dir() and is_branched(Path(args.input)):
        return _fit_branched(args, out, start)
    for flag, value in (("--tolerance", args.tolerance), ("--rule", args.rule), ("--epsilon", args.epsilon),
                        ("--eval-noise", args.eval_noise), ("--compare", args.compare)):
        if value is not None:  # also for a ramp study, which would ignore them
            raise InputError(f"{flag} is for a branched study (study.method: branched); {args.input} is not one")
    if Path(args.input).is_dir() and is_ramp_dir(Path(args.input)):
        return _fit_ramp(args, out)
    table = load_steps(args.input, args.target_kind)
    _progress(table, args.bootstrap, start)
    reader = MetricsReader()  # one pass over each run's metrics.jsonl for the throughput and the noise scale
    if table.variants:
        return _fit_variants(args, table, reader, out, start)
    throughput = _throughput(args, table, reader)
    fit = fit_study(table, args.overhead, args.reference_batch, args.bootstrap, args.seed, LEVEL, args.overheads,
                    throughput, args.gpus, args.seq_len, reader)
    _progress(table, args.bootstrap, start, "fitted; rendering the tables, report and figures")
    files = render_outputs(fit)
    _write(out, files)
    print("\n".join(_summary(fit, out, len(files), time.perf_counter() - start)))
    return 0


def _fit_variants(args: argparse.Namespace, table: StepsTable, reader: MetricsReader, out: Path,
                  start: float) -> int:
    """A study with variants: each variant's table fitted as a study, then side by side (cbs/analysis/variants.py)."""
    def fit_one(sub: StepsTable) -> StudyFit:
        return fit_study(sub, args.overhead, args.reference_batch, args.bootstrap, args.seed, LEVEL, args.overheads,
                         _throughput(args, sub, reader), args.gpus, args.seq_len, reader)

    vfit = fit_variants(table, fit_one)
    files = render_variant_outputs(vfit)
    _write(out, files)
    print("\n".join(variant_summary(vfit) + [f"wrote {out} ({len(files)} files) in "
                                             f"{time.perf_counter() - start:.1f} s"]))
    return 0


PROGRESS_SETTINGS = 100
"""A fit of more settings than this says on stderr what it is doing (a fit of 12,500 settings takes minutes)."""


def _progress(table: StepsTable, bootstrap: int, start: float, done: str = "") -> None:
    n = len(table.settings())
    if n <= PROGRESS_SETTINGS:
        return
    what = done or f"fitting {n:,} settings ({len(table.points):,} batch points, {bootstrap} bootstrap resamples each)"
    print(f"cbs fit: {what} [{time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)


def fit_main(argv: list[str] | None = None) -> int:
    """`cbs fit STUDY_DIR_OR_CSV --out OUT_DIR ...`; 0 on success, 2 on bad input."""
    return _run("cbs fit", _fit, argv)


# ----------------------------------------------------------------------------------------------------------------
# cbs forecast


def forecast_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cbs forecast", description="Forecast the critical batch size of a data budget (and model "
                "size) from a fit's scaling.json, plan a global batch <= CBS, and with throughput the batch that "
                "reaches the target fastest on --gpus GPUs. With --ramp: a batch schedule that grows with the "
                "tokens seen, from a branched fit's CBS(t) (--curve) or the CBS law in D (--scaling).")
    p.add_argument("--scaling", default=None, metavar="SCALING_JSON", help="OUT_DIR/scaling.json of `cbs fit`")
    p.add_argument("--tokens", required=True, type=_count, metavar="D",
                   help="data budget in tokens: 1e10, 10000000000 or 10B (suffixes K, M, B, T)")
    p.add_argument("--model-params", type=_count, default=None, metavar="N",
                   help="non-embedding parameters (with --tokens: the joint law, when identifiable)")
    p.add_argument("--gpus", type=int, default=1, metavar="G", help="data-parallel GPUs, the budget (default 1)")
    p.add_argument("--micro-batch", type=int, default=1, metavar="M", help="sequences per GPU per micro-step")
    p.add_argument("--seq-len", type=int, default=None, metavar="T",
                   help=f"tokens per sequence (default: from scaling.json, else {DEFAULT_SEQ_LEN})")
    p.add_argument("--throughput", default=None, metavar="CSV",
                   help="throughput for the time plan, columns batch_size,gpus,tokens_per_s[,model_params] "
                        "(default: the one in scaling.json)")
    p.add_argument("--law", choices=("cbs", "b_noise"), default="cbs",
                   help="cbs (default): the CBS law; b_noise: CBS = (1 + o) B0 + o B_noise from the B_noise law, the "
                        "one the fit's report recommends when the two laws' exponents differ (the (1+o)B0 floor)")
    p.add_argument("--reference-batch", type=float, default=None, metavar="B0",
                   help="with --law b_noise: B0 in sequences (default: the fit's, from scaling.json or cbs.csv)")
    p.add_argument("--beyond-cbs", action="store_true",
                   help="let the time plan try batches above the CBS (faster on more GPUs, at more GPU-hours)")
    p.add_argument("--ramp", action="store_true",
                   help="propose a batch ramp (batch as a function of tokens seen) and the steps it saves")
    p.add_argument("--curve", default=None, metavar="CBS_CURVE_CSV",
                   help="with --ramp: OUT_DIR/cbs_curve.csv of `cbs fit` on a branched study")
    p.add_argument("--setting", default=None, help="with --curve: the setting to ramp (when the curve has several)")
    p.add_argument("--fixed-batch", type=int, default=None, metavar="B",
                   help="with --ramp: the fixed batch to count saved steps against (default: the ramp's first)")
    p.add_argument("--format", default="text", choices=("text", *FORMATS),
                   help="text (default), or the batch plan / ramp as Megatron-LM flags, torchtitan TOML or "
                        "OLMo-core Python (cbs/analysis/export.py)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="with --ramp: write the stages as a batch schedule file for pretrain.batch_schedule")
    return p


def _check_forecast_args(args: argparse.Namespace) -> None:
    for flag, value in (("--tokens", args.tokens), ("--model-params", args.model_params)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise InputError(f"{flag} must be a positive number: got {value}")
    for flag, value in (("--gpus", args.gpus), ("--micro-batch", args.micro_batch), ("--seq-len", args.seq_len)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be >= 1: got {value}")


def _check_ramp_args(args: argparse.Namespace) -> None:
    if not args.ramp:
        for flag, value in (("--curve", args.curve), ("--setting", args.setting), ("--fixed-batch", args.fixed_batch),
                            ("--out", args.out)):
            if value is not None:
                raise InputError(f"{flag} goes with --ramp")
        if args.scaling is None:
            raise InputError("--scaling is required (or --ramp --curve CBS_CURVE_CSV for a batch ramp)")
        return
    if (args.curve is None) == (args.scaling is None):
        raise InputError("--ramp needs one of --curve (a branched fit's cbs_curve.csv) or --scaling (the CBS law in D)")
    if args.setting is not None and args.curve is None:
        raise InputError("--setting goes with --curve")
    if args.fixed_batch is not None and args.fixed_batch < 1:
        raise InputError(f"--fixed-batch must be >= 1: got {args.fixed_batch}")


def _ramp(args: argparse.Namespace) -> list[str]:
    """--ramp: CBS(t) from the curve, or CBS(t) = the D law at t (cbs/analysis/ramp.py)."""
    if args.curve is not None:
        curve, _, seq_len = read_curve(args.curve, args.setting)
    else:
        sf = load_scaling(args.scaling)
        law = sf.laws.get("tokens")
        if law is None or not law.identifiable:
            raise InputError(f"{sf.path}: no CBS law in D (the fit's settings had one data budget); a ramp needs "
                             "CBS(t) as a function of tokens: fit a study with several budgets, or use --curve")
        curve = curve_from_law(law.coefficient, law.exponent, f"the CBS law in D of {sf.path} "
                               f"(CBS = {law.coefficient:.4g} D^{law.exponent:.3f})")
        seq_len = sf.seq_len
    seq_len = args.seq_len or seq_len or DEFAULT_SEQ_LEN
    ramp = batch_ramp(curve, args.tokens, args.gpus * args.micro_batch, seq_len, args.fixed_batch)
    wrote = []
    if args.out:
        write_schedule_file(args.out, ramp.schedule_stages(), {**ramp.planned(), "source": curve.source})
        wrote = [f"wrote {args.out}: train it with `pretrain.batch_schedule: {args.out}`"]
    if args.format != "text":  # stdout is the export alone; the note goes to stderr
        print(*wrote, file=sys.stderr)
        return [export(from_ramp(ramp, args.gpus, args.micro_batch, f"batch ramp from CBS(t) of {curve.source}"),
                       args.format).rstrip("\n")]
    return describe_ramp(ramp, curve, args.gpus, args.micro_batch) + wrote


def _headline(sf, choice, args: argparse.Namespace) -> tuple[list[str], Forecast]:
    """The CBS the plan uses (from the CBS law, or with --law b_noise from the B_noise law), and the B_noise
    law's CBS beside it where the fit's report recommends that law (forecast.b_noise_gap)."""
    overhead = sf.overhead if sf.overhead is not None else DEFAULT_OVERHEAD
    if args.law == "b_noise":
        nf = forecast_from_b_noise(sf, choice, args.reference_batch, overhead)
        return [describe_noise(nf, sf.b_noise[choice.key], "")], nf.cbs
    primary = forecast_cbs(sf.laws[choice.key], choice.x)
    lines = [describe(primary, sf.laws[choice.key])]
    gap = b_noise_gap(sf, choice.key)
    if gap:
        lead = f"the fit's report recommends the B_noise law here ({gap}); from it: "
        try:
            nf = forecast_from_b_noise(sf, choice, args.reference_batch, overhead)
            lines.append(describe_noise(nf, sf.b_noise[choice.key], lead) + "; plan with it: --law b_noise")
        except InputError as e:
            lines.append(f"{lead}{e}")
    return lines, primary


def _forecast(argv: list[str]) -> int:
    args = forecast_parser().parse_args(argv)
    _check_forecast_args(args)
    _check_ramp_args(args)
    if args.ramp:
        print("\n".join(_ramp(args)))
        return 0
    sf = load_scaling(args.scaling)
    throughput = (ThroughputModel(tuple(read_throughput_csv(args.throughput)), str(args.throughput))
                  if args.throughput else ThroughputModel(sf.throughput, "scaling.json"))
    choice = choose_law(sf, args.tokens, args.model_params)
    lines, primary = _headline(sf, choice, args)
    lines += [*choice.notes, *also_lines(sf, choice, args.tokens, args.model_params)]
    seq_len = args.seq_len or sf.seq_len or DEFAULT_SEQ_LEN
    plan = batch_plan(primary.cbs, args.gpus, args.micro_batch, seq_len)
    if args.format != "text":
        source = f"fixed batch plan <= CBS {primary.cbs:,.0f} (the {choice.key} CBS law of {sf.path})"
        print(export(from_batch_plan(plan, args.tokens, source), args.format), end="")
        return 0
    lines += describe_plan(plan, primary, args.tokens)
    lines += describe_time_plan(time_plan(sf, choice, args.model_params, throughput, plan, primary.cbs,
                                          args.beyond_cbs), args.micro_batch)
    print("\n".join(lines))
    return 0


def forecast_main(argv: list[str] | None = None) -> int:
    """`cbs forecast --scaling OUT_DIR/scaling.json --tokens D ...`; 0 on success, 2 on bad input."""
    return _run("cbs forecast", _forecast, argv)
