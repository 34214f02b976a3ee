"""Pure-Python analysis of a critical-batch-size study: steps-to-target table, S(B) fits, CBS, scaling laws,
time and cost to target.

Reads files only (a study directory's `runs/*/config.yaml`, `result.json` and `metrics.jsonl`, or a steps CSV)
and never imports torch, deepspeed, megatron or `pipeline`: fitting a study must work on a laptop with numpy,
scipy, statsmodels, matplotlib and pyyaml.

    steps.py      study directory / CSV -> steps-to-target table (censored points and late divergences flagged)
    fit.py        S(B) = a + b/B fits (censored batches as lower bounds), CBS with bootstrap intervals,
                  degradation range, per-setting diagnostics
    laws.py       laws over settings: CBS, B_noise, S_min in D, N, C = 6ND and (D, N) jointly; weighted CBS laws
    cost.py       throughput (metrics.jsonl or a CSV) -> wall-clock and GPU-hours to target
    run_metrics.py  one pass over a run's metrics.jsonl: throughput and gradient noise scale
    noise_scale.py  the gradient noise scale B_simple logged in metrics.jsonl, per setting or along a run
    study_fit.py  all of the above for one study, and its warnings
    branched.py   a branched study (study.method: branched) -> local CBS(t) per branch point
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


class InputError(ValueError):
    """The input (CSV, study directory, scaling.json or a command-line value) is unusable; the message says why.

    The CLI turns it into one line on stderr and exit code 2.
    """


def read_csv_lines(path, what: str, not_found: str = "no such file") -> list[list[str]]:
    """Every line of a CSV file as cells; InputError `{what}: {not_found}` when it is missing, `{what}: cannot
    read as CSV` when it is unreadable (permissions, not UTF-8, a malformed quote)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.reader(f))
    except FileNotFoundError:
        raise InputError(f"{what}: {not_found}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{what}: cannot read as CSV: {e}") from None


def csv_float(text: str | None) -> float:
    """A CSV cell as a float; NaN when it is empty or missing."""
    return float(text) if text else math.nan


def csv_dicts(lines: list[list[str]]) -> list[dict]:
    """csv.DictReader's rows from read_csv_lines' lines (the first line is the header)."""
    if not lines:
        return []
    header = lines[0]  # as DictReader: blank lines skipped, missing cells None
    return [dict(zip(header, cells + [None] * (len(header) - len(cells)))) for cells in lines[1:] if cells]
