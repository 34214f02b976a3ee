"""cbs.analysis.api, the Python API for notebooks: README's example run as written on a study directory built to the
stage contract, and the API's answers checked against `cbs fit`'s files."""

from __future__ import annotations

import csv
import math
import re
import shlex
from pathlib import Path

import pytest
from test_analysis_cli import BUDGETS, MODELS, make_study

from cbs.analysis import InputError
from cbs.analysis.api import cbs_table, export, fit, forecast, ramp

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    section = README.read_text(encoding="utf-8").split("## Python API (notebooks)")[1].split("\n## ")[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api")
    make_study(root / "my_study")
    return root


def test_the_readme_example_runs_as_written(study, monkeypatch, capsys):
    monkeypatch.chdir(study)
    exec(compile(readme_example(), "README.md (Python API)", "exec"), {})
    out = capsys.readouterr().out
    for m in MODELS:
        for d in BUDGETS:
            assert re.search(rf"^{m}_{d}: CBS \d+ \[\d+, \d+\] sequences$", out, re.M)
    assert (study / "my_fit" / "scaling.json").is_file() and (study / "cbs_vs_tokens.svg").is_file()
    flags = next(ln for ln in out.splitlines() if ln.startswith("--global-batch-size"))
    batch = int(shlex.split(flags)[1])
    assert f"global batch {batch}" in out and batch % 32 == 0  # a multiple of 8 GPUs x micro-batch 4
    assert "BatchSizeSchedulerCallback(" in out


def test_api_answers_match_the_cli_files(study):
    result = fit(study / "my_study", out=study / "fit2", bootstrap=200, seed=3)
    with open(study / "fit2" / "cbs.csv", newline="") as f:
        written = {r["setting"]: r for r in csv.DictReader(f)}
    rows = cbs_table(result)
    assert {r["setting"] for r in rows} == set(written)
    for r in rows:
        assert float(written[r["setting"]]["cbs"]) == pytest.approx(r["cbs"], rel=1e-6)
        assert float(written[r["setting"]]["cbs_low"]) == pytest.approx(r["cbs_low"], rel=1e-6)
    plan = forecast(study / "fit2" / "scaling.json", tokens=2e10, gpus=2, micro_batch=3)
    assert plan.plan.global_batch_seqs <= plan.forecast.cbs < plan.plan.global_batch_seqs + 6
    assert plan.law == "tokens" and math.isfinite(plan.forecast.low)


def test_api_bad_input_raises_input_error(study):
    with pytest.raises(InputError, match="tolerance is for a branched study"):
        fit(study / "my_study", tolerance=0.01)
    with pytest.raises(InputError, match="ramp needs one of curve"):
        ramp(1e9)
    r = ramp(2e10, scaling=study / "fit2" / "scaling.json", gpus=2, micro_batch=3)
    with pytest.raises(InputError, match=r"must equal the ramp's unit 6"):
        export(r, "megatron", gpus=4, micro_batch=3)


def test_api_fits_a_branched_study_as_cbs_fit_does(tmp_path):
    """fit() passed a float where the branched fit takes the rule choice: every branched study crashed."""
    from test_analysis_branched import make_branched_study

    from cbs.analysis.cli import fit_main

    branched = make_branched_study(tmp_path / "branched")
    assert fit_main([str(branched), "--out", str(tmp_path / "cli"), "--rule", "relative", "--eval-noise", "0"]) == 0
    rows = cbs_table(fit(branched, out=tmp_path / "api", rule="relative", eval_noise=0))
    with open(tmp_path / "cli" / "cbs_curve.csv", newline="") as f:
        cli_rows = list(csv.DictReader(f))
    assert rows and [(r["setting"], r["tokens"]) for r in rows] == [(c["setting"], int(c["tokens"])) for c in cli_rows]
    assert (tmp_path / "api" / "cbs_curve.csv").read_text() == (tmp_path / "cli" / "cbs_curve.csv").read_text()
    with pytest.raises(InputError, match="--rule must be one of"):
        fit(branched, rule="median")
