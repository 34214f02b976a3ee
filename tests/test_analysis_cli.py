"""`cbs fit` / `cbs forecast` end to end on a CSV and on a study directory built here to the stage contract."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from analysis.cli import fit_main, forecast_main
from analysis.fit import critical_batch_size

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODELS = {"m85M": 85_000_000, "m151M": 151_000_000}
BUDGETS = {"d1": 1_000_000_000, "d2": 4_000_000_000}
BATCHES = [32, 64, 128, 256, 512, 1024]
LR_FACTORS = {"lr1e-3": 1.3, "lr3e-3": 1.0, "lr1e-2": 1.15}  # steps multiplier of each LR: 3e-3 is the best
EWA_FACTORS = {"0.999": 1.0, "0.9995": 1.04}  # the best EWA decay crosses first
RAW_FACTOR = 1.1
CENSORED = ("m151M_d2", 32)  # no run at this (setting, batch) reaches the target
DIVERGED = ("m85M", 1024, "lr1e-2")
SEQ_LEN = 128
REQUIRED_CBS_COLUMNS = ["setting", "model_params", "tokens", "s_min", "b_noise", "cbs", "cbs_low", "cbs_high"]


def truth(model: str, budget: str) -> tuple[float, float]:
    """(S_min, B_noise) of a setting: B_noise grows with D (as D^0.5) and barely with N."""
    d, n = BUDGETS[budget], MODELS[model]
    b_noise = 100.0 * (d / 1e9) ** 0.5 * (n / 85e6) ** 0.05
    return d / (SEQ_LEN * 4 * b_noise), b_noise


def best_steps(model: str, budget: str, batch: int, noise: dict) -> float:
    """The true steps-to-target of the best LR with the best EWA decay (what `--target-kind ewa` must find)."""
    s_min, b_noise = truth(model, budget)
    return round(s_min * (1 + b_noise / batch) * noise[(model, budget, batch)], 2)


def _crossing(steps: float | None) -> dict | None:
    return None if steps is None else {"step": math.ceil(steps), "tokens": math.ceil(steps) * 7,
                                       "step_interp": steps}


def _write_run(runs: Path, model: str, batch: int, lr: str, noise: dict, finished: bool = True) -> None:
    """One run of the sweep: one model, batch and LR, serving both data budgets of its model."""
    run = runs / f"{model}_b{batch}_{lr}"
    run.mkdir(parents=True)
    settings = [{"name": f"{model}_{d}", "model_params": MODELS[model], "tokens": BUDGETS[d],
                 "target_loss": target_loss(model, d)} for d in BUDGETS]
    config = {"global_batch_seqs": batch, "model": {"seq_len": SEQ_LEN, "layers": 2},
              "optim": {"lr": float(lr[2:])}, "study": {"settings": settings}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    if not finished:
        return
    status = "diverged" if (model, batch, lr) == DIVERGED else "completed"
    targets = []
    for d in BUDGETS:
        reached = (f"{model}_{d}", batch) != CENSORED and status == "completed"
        base = best_steps(model, d, batch, noise) * LR_FACTORS[lr] if reached else None
        targets.append({
            "loss": target_loss(model, d),
            "raw": _crossing(base and round(base * RAW_FACTOR, 2)),
            "ewa": {tau: _crossing(base and round(base * f, 2)) for tau, f in EWA_FACTORS.items()}})
    result = {"status": status, "steps": 10_000, "tokens": 10_000 * batch * SEQ_LEN, "wall_seconds": 1.0,
              "targets": targets if status == "completed" else []}
    (run / "result.json").write_text(json.dumps(result))


def target_loss(model: str, budget: str) -> float:
    return round(4.0 - 0.3 * list(MODELS).index(model) - 0.2 * list(BUDGETS).index(budget), 6)


def make_study(root: Path, seed: int = 0) -> tuple[Path, dict]:
    """A study directory with 3 LRs per batch, a diverged run, a censored batch and 2 unfinished runs."""
    rng = np.random.default_rng(seed)
    noise = {(m, d, b): float(np.exp(rng.normal(0, 0.03))) for m in MODELS for d in BUDGETS for b in BATCHES}
    runs = root / "runs"
    for m in MODELS:
        for b in BATCHES:
            for lr in LR_FACTORS:
                _write_run(runs, m, b, lr, noise)
        _write_run(runs, m, 2048, "lr3e-3", noise, finished=False)
    return root, noise


def run_fit(capsys, *argv: str) -> tuple[int, str, str]:
    rc = fit_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -------------------------------------------------------------------------------------------- study directory


@pytest.fixture(scope="module")
def study_fit(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    study, noise = make_study(root / "study")
    out = root / "fit"
    rc = fit_main([str(study), "--out", str(out), "--bootstrap", "200", "--seed", "3"])
    assert rc == 0
    return study, noise, out


def test_study_steps_table_is_min_over_runs_with_censoring(study_fit):
    _, noise, out = study_fit
    rows = {(r["setting"], int(r["batch_size"])): r for r in read_csv(out / "steps.csv")}
    assert len(rows) == len(MODELS) * len(BUDGETS) * len(BATCHES)  # unfinished 2048 runs skipped
    for (setting, batch), r in rows.items():
        model, budget = setting.split("_")
        assert int(r["runs"]) == len(LR_FACTORS)
        if (setting, batch) == CENSORED:
            assert (r["censored"], r["steps"], r["best_run"]) == ("1", "", "")
            continue
        assert r["censored"] == "0"
        assert float(r["steps"]) == pytest.approx(best_steps(model, budget, batch, noise))
        assert r["best_run"] == f"{model}_b{batch}_lr3e-3"


def test_study_cbs_recovers_truth_and_laws(study_fit):
    _, _, out = study_fit
    with open(out / "cbs.csv", newline="") as f:
        assert next(csv.reader(f))[:8] == REQUIRED_CBS_COLUMNS
    rows = read_csv(out / "cbs.csv")
    assert {r["setting"] for r in rows} == {f"{m}_{d}" for m in MODELS for d in BUDGETS}
    for r in rows:
        model, budget = r["setting"].split("_")
        want = critical_batch_size(truth(model, budget)[1], 32, 0.2)  # B0 = the smallest batch, censored or not
        assert float(r["reference_batch"]) == 32
        assert float(r["cbs"]) == pytest.approx(want, rel=0.25)
        assert float(r["cbs_low"]) < float(r["cbs"]) < float(r["cbs_high"])
        assert int(r["n_batches"]) == len(BATCHES) - (r["setting"] == CENSORED[0])
    scaling = json.loads((out / "scaling.json").read_text())
    assert scaling["seq_len"] == SEQ_LEN and set(scaling["laws"]) == {"tokens", "model_params", "compute", "joint"}
    law = scaling["laws"]["tokens"]
    for key in ("variable", "coefficient", "coefficient_ci", "exponent", "exponent_ci", "r2", "n_points",
                "cov_log_coefficient_exponent", "residual_variance"):
        assert key in law
    assert law["n_points"] == 4 and law["pooled_over_other_variable"] is True
    assert 0.2 < law["exponent"] < 0.8


def test_study_report_and_figures(study_fit):
    _, _, out = study_fit
    report = (out / "report.md").read_text()
    for m in MODELS:
        for d in BUDGETS:
            assert f"{m}_{d}" in report
    assert "unfinished" in report and "several data budgets" in report and "N also varies" in report
    import matplotlib.image

    pngs = sorted((out / "figures").glob("*.png"))
    names = {p.name for p in pngs}
    assert {"steps_normalized.png", "cbs_vs_tokens.png", "cbs_vs_model_params.png", "cbs_vs_compute.png",
            "degradation.png"} <= names
    assert len(pngs) == 5 + len(MODELS) * len(BUDGETS)
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(p)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"]({p.relative_to(out)})" in report  # every figure is linked from the report


def test_target_kind_raw_reads_the_raw_crossing(tmp_path, capsys, study_fit):
    study, noise, _ = study_fit
    rc, out, _ = run_fit(capsys, study, "--out", tmp_path / "raw", "--target-kind", "raw", "--bootstrap", "0")
    assert rc == 0 and "cbs fit:" in out
    rows = read_csv(tmp_path / "raw" / "steps.csv")
    r = next(r for r in rows if r["setting"] == "m85M_d1" and r["batch_size"] == "64")
    assert float(r["steps"]) == pytest.approx(round(best_steps("m85M", "d1", 64, noise) * RAW_FACTOR, 2))
    assert read_csv(tmp_path / "raw" / "cbs.csv")[0]["cbs_low"] == ""  # --bootstrap 0: no interval


def test_forecast_from_the_fit(study_fit, capsys):
    _, _, out = study_fit
    rc = forecast_main(["--scaling", str(out / "scaling.json"), "--tokens", "2e9", "--model-params", "1e8",
                        "--gpus", "4", "--micro-batch", "2"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "CBS(D=2e+09)" in text and "prediction interval" in text and "from the N law" in text
    line = next(x for x in text.splitlines() if x.startswith("batch plan"))
    assert f"seq_len {SEQ_LEN}" in line and "4 GPU(s) x micro-batch 2" in line
    global_batch = int(line.split("global batch ")[1].split()[0])
    assert global_batch % 8 == 0 and f"gradient accumulation {global_batch // 8};" in line


# ------------------------------------------------------------------------------------------------------ CSV input


def test_csv_input_and_rerun_replaces_previous_output(tmp_path, capsys):
    rng = np.random.default_rng(1)
    path = tmp_path / "steps.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "model_params", "tokens", "batch_size", "steps"])
        for d, b_noise in ((1e9, 100.0), (2e9, 150.0), (4e9, 210.0)):
            for b in BATCHES:
                steps = 5000 * (1 + b_noise / b) * math.exp(rng.normal(0, 0.02))
                w.writerow([f"D{d:.0e}", 85_000_000, int(d), b, steps])
        w.writerows([["short", 85_000_000, int(8e9), 32, 900], ["short", 85_000_000, int(8e9), 64, 500]])
    out = tmp_path / "out"
    rc, stdout, err = run_fit(capsys, path, "--out", out, "--bootstrap", "100", "--reference-batch", "64")
    assert rc == 0, err
    assert "law: CBS" in stdout and "N^" not in stdout  # one model size: no N law
    rows = read_csv(out / "cbs.csv")
    assert [float(r["reference_batch"]) for r in rows] == [64.0] * 4
    assert float(rows[0]["cbs"]) == pytest.approx(1.2 * 64 + 0.2 * 100, rel=0.1)
    short = next(r for r in rows if r["setting"] == "short")  # 2 batch sizes: a row with a note, no estimate
    assert (short["cbs"], short["s_min"], short["n_batches"]) == ("", "", "2") and "insufficient" in short["note"]
    report = (out / "report.md").read_text()
    assert all(name in report for name in ("D1e+09", "D2e+09", "D4e+09", "short"))
    assert json.loads((out / "scaling.json").read_text())["laws"]["tokens"]["n_points"] == 3
    (out / "stale.txt").write_text("from an older fit")
    assert run_fit(capsys, out / "steps.csv", "--out", out, "--bootstrap", "0")[0] == 0  # steps.csv reads back
    assert not (out / "stale.txt").exists() and (out / "report.md").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------------- bad inputs


CSV_HEADER = "setting,model_params,tokens,batch_size,steps\n"
GOOD_ROWS = "s,1000,2000,64,100\ns,1000,2000,128,60\ns,1000,2000,256,40\n"


def _csv_input(text: str):
    def make(tmp: Path) -> list[str]:
        (tmp / "in.csv").write_text(text)
        return [str(tmp / "in.csv")]
    return make


def _study_input(edit):
    def make(tmp: Path) -> list[str]:
        study, _ = make_study(tmp / "study")
        edit(study)
        return [str(study)]
    return make


def _unfinish_all(study: Path) -> None:
    for r in study.glob("runs/*/result.json"):
        r.unlink()


def _diverge_all(study: Path) -> None:
    for r in study.glob("runs/*/result.json"):
        r.write_text(json.dumps({"status": "diverged", "steps": 3, "tokens": 9, "wall_seconds": 1.0, "targets": []}))


def _corrupt_one(study: Path) -> None:
    next(study.glob("runs/*/result.json")).write_text("{not json")


def _foreign_out(tmp: Path) -> list[str]:
    (tmp / "in.csv").write_text(CSV_HEADER + GOOD_ROWS)
    (tmp / "out").mkdir()
    (tmp / "out" / "precious.txt").write_text("keep me")
    return [str(tmp / "in.csv")]


BAD_INPUTS = {
    "empty csv": (_csv_input(""), "empty file"),
    "header only": (_csv_input(CSV_HEADER), "no data rows"),
    "missing column": (_csv_input("setting,model_params,tokens,batch_size\ns,1,2,64\n"), "missing column(s) steps"),
    "non-numeric": (_csv_input(CSV_HEADER + GOOD_ROWS + "s,1000,2000,512,abc\n"), "steps must be a positive number"),
    "zero steps": (_csv_input(CSV_HEADER + GOOD_ROWS + "s,1000,2000,512,0\n"), "got '0'"),
    "negative steps": (_csv_input(CSV_HEADER + GOOD_ROWS + "s,1000,2000,512,-3\n"), "got '-3'"),
    "nan steps": (_csv_input(CSV_HEADER + GOOD_ROWS + "s,1000,2000,512,nan\n"), "got 'nan'"),
    "one batch size": (_csv_input(CSV_HEADER + "s,1000,2000,64,100\nt,1000,4000,64,90\n"), "only one batch size"),
    "inconsistent setting": (_csv_input(CSV_HEADER + GOOD_ROWS + "s,1000,9999,512,30\n"), "setting 's' has"),
    "no such path": (lambda tmp: [str(tmp / "missing.csv")], "no such file"),
    "no finished runs": (_study_input(_unfinish_all), "no finished runs"),
    "all runs diverged": (_study_input(_diverge_all), "no batch size reached its target"),
    "corrupt result.json": (_study_input(_corrupt_one), "cannot read JSON"),
    "not a study dir": (lambda tmp: [str(tmp)], "not a study directory"),
    "bad overhead": (lambda tmp: _csv_input(CSV_HEADER + GOOD_ROWS)(tmp) + ["--overhead", "0"], "--overhead"),
    "bad target kind": (lambda tmp: _csv_input(CSV_HEADER + GOOD_ROWS)(tmp) + ["--target-kind", "x"],
                        "invalid choice"),
    "foreign out dir": (_foreign_out, "not a `cbs fit` output"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_no_output(case, tmp_path, capsys):
    make, message = BAD_INPUTS[case]
    argv = make(tmp_path)
    existed = (tmp_path / "out").exists()
    rc, stdout, err = run_fit(capsys, *argv, "--out", tmp_path / "out", "--bootstrap", "20")
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and message in err and err.startswith("cbs fit: error: ")
    assert "Traceback" not in err and stdout == ""
    if existed:
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["precious.txt"]
    else:
        assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_help_returns_0(capsys):
    assert fit_main(["--help"]) == 0 and "STUDY_DIR_OR_CSV" in capsys.readouterr().out
    assert forecast_main(["--help"]) == 0 and "--micro-batch" in capsys.readouterr().out


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    ("{broken", "cannot read JSON"),
    ('{"laws": {}}', "no scaling law"),
    ('{"laws": {"tokens": {"variable": "tokens"}}}', "malformed"),
])
def test_forecast_bad_scaling_file(tmp_path, capsys, content, message):
    path = tmp_path / "scaling.json"
    if content is not None:
        path.write_text(content)
    assert forecast_main(["--scaling", str(path), "--tokens", "1e9"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and err.startswith("cbs forecast: error: ")


def test_forecast_with_only_an_n_law(tmp_path, capsys):
    from analysis.laws import fit_scaling_law, law_to_json

    law = fit_scaling_law([1e8, 3e8, 1e9], [200.0, 240.0, 300.0], "model_params")
    path = tmp_path / "scaling.json"
    path.write_text(json.dumps({"laws": {"model_params": law_to_json(law)}, "seq_len": None}))
    assert forecast_main(["--scaling", str(path), "--tokens", "1e10"]) == 2
    assert "give --model-params" in capsys.readouterr().err
    assert forecast_main(["--scaling", str(path), "--tokens", "1e10", "--model-params", "5e8"]) == 0
    text = capsys.readouterr().out
    assert "CBS(N=5e+08)" in text and "seq_len 512" in text  # default sequence length when none recorded
    assert forecast_main(["--scaling", str(path), "--tokens", "1e10", "--gpus", "0"]) == 2
    assert "--gpus must be >= 1" in capsys.readouterr().err


def test_figure_names_are_unique_file_names():
    from analysis.figures import figure_names
    from analysis.steps import Setting, StepsPoint, StepsTable

    settings = [Setting(n, 1, 1) for n in ("a/b", "a b", "A_B", "ok-1.5")]
    table = StepsTable([StepsPoint(s, 64, 10.0, 1) for s in settings], "x", "csv")
    names = figure_names(table)
    assert len(set(n.lower() for n in names.values())) == 4
    assert names["ok-1.5"] == "figures/steps_ok-1.5.png" and all("/" not in n[8:] for n in names.values())


# ------------------------------------------------------------------------------------------------------ isolation


def test_analysis_never_imports_the_training_stack():
    code = ("import sys, analysis.cli, analysis.steps, analysis.fit, analysis.laws, analysis.cost, analysis.study_fit, "
            "analysis.figures, analysis.report, analysis.outputs, analysis.forecast\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'megatron', 'pipeline')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
