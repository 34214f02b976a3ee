"""Pure-Python analysis of a critical-batch-size study: steps-to-target table, S(B) fits, CBS, scaling laws,
time and cost to target.

Reads files only (a study directory's `runs/*/config.yaml`, `result.json` and `metrics.jsonl`, or a steps CSV)
and never imports torch, deepspeed, megatron or `cbs.pipeline`: fitting a study must work on a laptop with numpy,
scipy, statsmodels, matplotlib and pyyaml.

    steps.py      study directory / CSV -> steps-to-target table (censored points and late divergences flagged)
    fit.py        S(B) = a + b/B fits (censored batches as lower bounds), CBS with bootstrap intervals,
                  degradation range, per-setting diagnostics
    laws.py       laws over settings: CBS, B_noise, S_min in D, N, C = 6ND and (D, N) jointly; weighted CBS laws
    cost.py       throughput (metrics.jsonl or a CSV) -> wall-clock and GPU-hours to target
    run_metrics.py  one pass over a run's metrics.jsonl: throughput, gradient noise scale and eval curve
    noise_scale.py  the gradient noise scale B_simple from metrics.jsonl's readings, per setting or along a run
    study_fit.py  all of the above for one study, and its warnings
    branched.py   a branched study (study.method: branched) -> local CBS(t) per branch point
    branch_rules.py  the local-CBS rules (absolute: Merrill et al.; relative) and the CBS interval under eval noise
    compare.py    a sweep fit's cbs.csv beside CBS(t) at matching D
    branched_fit.py  CBS(t), B_simple along t and the comparison for one branched study, and its warnings
    figures.py    PNG figures
    branched_figures.py  PNG figures of a branched study
    report.py     report.md
    branched_report.py  report.md, cbs_curve.csv and branches.csv of a branched study
    outputs.py    every output file, written as one staged directory
    forecast.py   scaling.json -> CBS forecast for a new budget, a batch plan and a time plan
    ramp.py       CBS(t) (a curve or the D law) -> a batch ramp and the steps it saves
    batch_schedule.py  a batch schedule's arithmetic (step -> batch, tokens) and file, shared with pretrain
    ramp_compare.py  ramp and fixed runs at one target: steps, tokens, seconds to it, saving predicted vs measured
    cli.py        `cbs fit` and `cbs forecast`
"""

import csv
import math
from decimal import Decimal, InvalidOperation

COUNT_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
"""Decimal suffixes of counts, as cbs writes them in setting and run names (300K, 1.7B): K = 1e3, ..., T = 1e12."""


class InputError(ValueError):
    """The input (CSV, study directory, scaling.json or a command-line value) is unusable; the message says why.

    The CLI turns it into one line on stderr and exit code 2.
    """


def read_csv_lines(path, what: str, not_found: str = "no such file") -> list[list[str]]:
    """Every line of a CSV file as cells; InputError `{what}: {not_found}` when it is missing, `{what}: cannot
    read as CSV` when it is unreadable (permissions, not UTF-8, a malformed quote)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's BOM is not in the header
            return list(csv.reader(f))
    except FileNotFoundError:
        raise InputError(f"{what}: {not_found}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{what}: cannot read as CSV: {e}") from None


def parse_count(text: str) -> Decimal:
    """A count written as a number with an optional suffix of COUNT_SUFFIXES: "300K" -> 300000, "1.5M",
    "10B", "1e9", "1_000_000". Exact (decimal arithmetic: "0.3K" is 300, not 300.00000000000006). ValueError
    when the text is not one, or is NaN or infinite; the caller checks the range and whether it is whole."""
    body = text.strip().replace("_", "")
    scale = COUNT_SUFFIXES.get(body[-1:].upper(), 1) if body else 1
    if scale != 1:
        body = body[:-1]
    try:
        value = Decimal(body) * scale
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a count (a number, optionally with K, M, B or T)") from None
    if not value.is_finite():
        raise ValueError(f"{text!r} is not a finite count")
    return value


def csv_float(text: str | None) -> float:
    """A CSV cell as a float; NaN when it is empty or missing."""
    return float(text) if text else math.nan


def csv_dicts(lines: list[list[str]]) -> list[dict]:
    """csv.DictReader's rows from read_csv_lines' lines (the first line is the header)."""
    if not lines:
        return []
    header = lines[0]  # as DictReader: blank lines skipped, missing cells None
    return [dict(zip(header, cells + [None] * (len(header) - len(cells)))) for cells in lines[1:] if cells]
