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
    study_fit.py  all of the above for one study, and its warnings
    figures.py    PNG figures
    report.py     report.md
    outputs.py    every output file, written as one staged directory
    forecast.py   scaling.json -> CBS forecast for a new budget, a batch plan and a time plan
    cli.py        `cbs fit` and `cbs forecast`
"""


class InputError(ValueError):
    """The input (CSV, study directory, scaling.json or a command-line value) is unusable; the message says why.

    The CLI turns it into one line on stderr and exit code 2.
    """
