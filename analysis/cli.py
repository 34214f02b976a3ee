"""`cbs fit` and `cbs forecast`: thin shells over analysis.steps / fit / report / forecast.

Both return 0 on success and 2 on bad input, with one line on stderr and no traceback; `cbs fit` writes nothing
unless everything was read, fitted and rendered (see report.write_outputs).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from analysis import InputError
from analysis.fit import LEVEL, StudyFit, fit_study
from analysis.forecast import DEFAULT_SEQ_LEN, batch_plan, describe, describe_plan, forecast_cbs, load_scaling
from analysis.report import check_out_dir, render_outputs, write_outputs
from analysis.steps import TargetKind, load_steps

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


# ----------------------------------------------------------------------------------------------------------------
# cbs fit


def fit_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cbs fit", description="Fit S(B) per setting, the critical batch size with bootstrap "
                "intervals, and its scaling laws in D and N; write steps.csv, cbs.csv, scaling.json, report.md, "
                "figures/.")
    p.add_argument("input", metavar="STUDY_DIR_OR_CSV",
                   help="a study directory (runs/*/config.yaml + result.json) or a CSV with columns "
                        "setting,model_params,tokens,batch_size,steps")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory (replaced if a previous fit)")
    p.add_argument("--overhead", type=float, default=0.2, help="o in B* = (1+o) B0 + o B_noise (default 0.2)")
    p.add_argument("--reference-batch", type=float, default=None, metavar="B0",
                   help="reference batch in sequences (default: each setting's smallest batch)")
    p.add_argument("--target-kind", choices=[k.value for k in TargetKind], default=TargetKind.EWA.value,
                   help="which crossing counts for a study: raw, ewa (min over EWA decays; default) or best")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples per setting (default 1000; 0: no intervals)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    return p


def _check_fit_args(args: argparse.Namespace) -> None:
    if not (math.isfinite(args.overhead) and args.overhead > 0):
        raise InputError(f"--overhead must be a positive number: got {args.overhead}")
    if args.reference_batch is not None and not (math.isfinite(args.reference_batch) and args.reference_batch > 0):
        raise InputError(f"--reference-batch must be a positive number of sequences: got {args.reference_batch}")
    if args.bootstrap < 0:
        raise InputError(f"--bootstrap must be >= 0: got {args.bootstrap}")
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0: got {args.seed}")


def _summary(fit: StudyFit, out: Path, n_files: int, seconds: float) -> list[str]:
    n_ok = sum(e.fitted for e in fit.estimates)
    censored = sum(p.censored for p in fit.table.points)
    lines = [f"cbs fit: {len(fit.estimates)} settings ({n_ok} fitted), {censored} censored batch point(s)"
             + (f", {len(fit.table.unfinished_runs)} unfinished run(s) skipped" if fit.table.unfinished_runs else "")]
    for e in fit.estimates[:MAX_SUMMARY_SETTINGS]:
        ci = f" [{e.cbs_ci[0]:.4g}, {e.cbs_ci[1]:.4g}]" if math.isfinite(e.cbs_ci[0]) else ""
        lines.append(f"  {e.setting.name}: CBS {e.cbs:.4g}{ci} sequences" if e.fitted
                     else f"  {e.setting.name}: {e.note}")
    if len(fit.estimates) > MAX_SUMMARY_SETTINGS:
        lines.append(f"  ... {len(fit.estimates) - MAX_SUMMARY_SETTINGS} more in cbs.csv")
    for law in fit.laws.values():
        lines.append(f"  law: CBS = {law.coefficient:.4g} * {law.symbol}^{law.exponent:.3f} "
                     f"(R^2 {law.r2:.3f}, {law.n_points} settings)")
    lines.append(f"wrote {out} ({n_files} files) in {seconds:.1f} s")
    return lines


def _fit(argv: list[str]) -> int:
    start = time.perf_counter()
    args = fit_parser().parse_args(argv)
    _check_fit_args(args)
    out = Path(args.out).expanduser().resolve()  # resolved: `--out .` must have a parent to stage beside
    check_out_dir(out)  # refuse early, before minutes of fitting; write_outputs checks again
    table = load_steps(args.input, args.target_kind)
    fit = fit_study(table, args.overhead, args.reference_batch, args.bootstrap, args.seed, LEVEL)
    files = render_outputs(fit)
    try:
        write_outputs(out, files)
    except OSError as e:  # permissions, disk full: write_outputs has already removed its staging directory
        raise InputError(f"cannot write {out}: {e}") from None
    print("\n".join(_summary(fit, out, len(files), time.perf_counter() - start)))
    return 0


def fit_main(argv: list[str] | None = None) -> int:
    """`cbs fit STUDY_DIR_OR_CSV --out OUT_DIR ...`; 0 on success, 2 on bad input."""
    return _run("cbs fit", _fit, argv)


# ----------------------------------------------------------------------------------------------------------------
# cbs forecast


def forecast_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cbs forecast", description="Forecast the critical batch size of a data budget from a "
                "fit's scaling.json, and plan a global batch <= CBS.")
    p.add_argument("--scaling", required=True, metavar="SCALING_JSON", help="OUT_DIR/scaling.json of `cbs fit`")
    p.add_argument("--tokens", required=True, type=float, metavar="D", help="data budget in tokens")
    p.add_argument("--model-params", type=float, default=None, metavar="N", help="non-embedding parameters")
    p.add_argument("--gpus", type=int, default=1, metavar="G", help="data-parallel GPUs (default 1)")
    p.add_argument("--micro-batch", type=int, default=1, metavar="M", help="sequences per GPU per micro-step")
    p.add_argument("--seq-len", type=int, default=None, metavar="T",
                   help=f"tokens per sequence (default: from scaling.json, else {DEFAULT_SEQ_LEN})")
    return p


def _check_forecast_args(args: argparse.Namespace) -> None:
    for flag, value in (("--tokens", args.tokens), ("--model-params", args.model_params)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise InputError(f"{flag} must be a positive number: got {value}")
    for flag, value in (("--gpus", args.gpus), ("--micro-batch", args.micro_batch), ("--seq-len", args.seq_len)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be >= 1: got {value}")


def _forecast(argv: list[str]) -> int:
    args = forecast_parser().parse_args(argv)
    _check_forecast_args(args)
    sf = load_scaling(args.scaling)
    lines = []
    if "tokens" in sf.laws:
        primary = forecast_cbs(sf.laws["tokens"], args.tokens)
        lines.append(describe(primary, sf.laws["tokens"]))
        if args.model_params and "model_params" in sf.laws:
            also = forecast_cbs(sf.laws["model_params"], args.model_params)
            lines.append("also, from the N law (the plan uses the D law): " + describe(also, sf.laws["model_params"]))
        elif args.model_params:
            lines.append("note: scaling.json has no N law (its settings had one model size); N is not used")
    elif "model_params" in sf.laws:
        if not args.model_params:
            raise InputError(f"{args.scaling}: has only an N law (its settings had one data budget); "
                             "give --model-params")
        primary = forecast_cbs(sf.laws["model_params"], args.model_params)
        lines.append(describe(primary, sf.laws["model_params"]))
    else:
        raise InputError(f"{args.scaling}: no scaling law (the fit had a single D and a single N); nothing to "
                         "forecast")
    seq_len = args.seq_len or sf.seq_len or DEFAULT_SEQ_LEN
    plan = batch_plan(primary.cbs, args.gpus, args.micro_batch, seq_len)
    print("\n".join(lines + describe_plan(plan, primary, args.tokens)))
    return 0


def forecast_main(argv: list[str] | None = None) -> int:
    """`cbs forecast --scaling OUT_DIR/scaling.json --tokens D ...`; 0 on success, 2 on bad input."""
    return _run("cbs forecast", _forecast, argv)
