"""Pure-Python analysis of a critical-batch-size study: steps-to-target table, S(B) fits, CBS, scaling laws.

Reads files only (a study directory's `runs/*/config.yaml` + `result.json`, or a steps CSV) and never imports
torch, deepspeed, megatron or `pipeline`: fitting a study must work on a laptop with numpy, scipy, statsmodels,
matplotlib and pyyaml.

    steps.py     study directory / CSV -> steps-to-target table (censored points flagged)
    fit.py       S(B) = a + b/B fits, CBS with bootstrap intervals, scaling laws CBS = c X^alpha
    forecast.py  scaling.json -> CBS forecast for a new budget + a batch plan
    report.py    steps.csv, cbs.csv, scaling.json, report.md, figures/*.png, written as one staged directory
    cli.py       `cbs fit` and `cbs forecast`
"""


class InputError(ValueError):
    """The input (CSV, study directory, scaling.json or a command-line value) is unusable; the message says why.

    The CLI turns it into one line on stderr and exit code 2.
    """
