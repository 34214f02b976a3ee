"""`cbs fit` / `cbs forecast` end to end on a CSV and on a study directory built here to the stage contract."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cbs.analysis.cli import fit_main, forecast_main
from cbs.analysis.fit import critical_batch_size

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
    marker = json.loads((out / ".cbs-fit.json").read_text())  # a figure an older fit wrote, of a setting now gone
    (out / "figures" / "gone.png").write_bytes(b"png")
    (out / ".cbs-fit.json").write_text(json.dumps({**marker, "files": marker["files"] + ["figures/gone.png"]}))
    assert run_fit(capsys, out / "steps.csv", "--out", out, "--bootstrap", "0")[0] == 0  # steps.csv reads back
    assert not (out / "figures" / "gone.png").exists() and (out / "report.md").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------------- bad inputs


CSV_HEADER = "setting,model_params,tokens,batch_size,steps\n"
GOOD_ROWS = "s,1000,2000,64,100\ns,1000,2000,128,60\ns,1000,2000,256,40\n"
GOOD_CSV = CSV_HEADER + GOOD_ROWS
TP_HEADER = "batch_size,gpus,tokens_per_s\n"


def _csv_input(text: str, *flags: str):
    def make(tmp: Path) -> list[str]:
        (tmp / "in.csv").write_text(text)
        return [str(tmp / "in.csv"), *flags]
    return make


def _throughput_input(text: str):
    def make(tmp: Path) -> list[str]:
        (tmp / "tp.csv").write_text(text)
        return _csv_input(GOOD_CSV)(tmp) + ["--throughput", str(tmp / "tp.csv"), "--seq-len", "128"]
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


def _bad_status(study: Path) -> None:
    path = next(study.glob("runs/*/result.json"))
    path.write_text(json.dumps({**json.loads(path.read_text()), "status": "exploded"}))


def _foreign_out(tmp: Path) -> list[str]:
    (tmp / "in.csv").write_text(GOOD_CSV)
    (tmp / "out").mkdir()
    (tmp / "out" / "precious.txt").write_text("keep me")
    return [str(tmp / "in.csv")]


def _paper_beside_a_copied_cbs_csv(tmp: Path) -> list[str]:
    """A folder a fit once counted as its own (it holds a cbs.csv) and replaced whole: a draft and its figures."""
    (tmp / "in.csv").write_text(GOOD_CSV)
    (tmp / "out" / "figures").mkdir(parents=True)
    (tmp / "out" / "cbs.csv").write_text("setting,cbs\ns,100\n")
    (tmp / "out" / "paper.tex").write_text("\\section{Results}")
    (tmp / "out" / "figures" / "fig1.pdf").write_bytes(b"%PDF")
    return [str(tmp / "in.csv")]


def _fit_output_with_a_note(tmp: Path) -> list[str]:
    """A real previous fit output (with its marker) into which a user saved a note."""
    (tmp / "in.csv").write_text(GOOD_CSV)
    with contextlib.redirect_stdout(io.StringIO()):  # its summary is not the refused fit's output
        assert fit_main([str(tmp / "in.csv"), "--out", str(tmp / "out"), "--bootstrap", "0"]) == 0
    (tmp / "out" / "notes.md").write_text("my reading of the fit")
    return [str(tmp / "in.csv")]


def _law(variable: str, x, y):
    from cbs.analysis.laws import fit_scaling_law, law_to_json

    return law_to_json(fit_scaling_law(x, y, variable))


def _scaling(doc, *flags: str):
    """A forecast on a scaling.json holding `doc` (a dict is JSON-encoded, a string written as is)."""
    def make(tmp: Path) -> list[str]:
        content = doc() if callable(doc) else doc
        (tmp / "scaling.json").write_text(content if isinstance(content, str) else json.dumps(content))
        return ["--scaling", str(tmp / "scaling.json"), *(flags or ("--tokens", "1e9"))]
    return make


def _v2():
    return {"version": 2, "laws": {"tokens": _law("tokens", [1e9, 2e9, 4e9], [100.0, 140.0, 190.0])}}


def _v1_with_d_and_n():
    return {"laws": {"tokens": _law("tokens", [1e9, 2e9, 4e9], [100.0, 140.0, 190.0]),
                     "model_params": _law("model_params", [1e8, 2e8, 4e8], [100.0, 110.0, 125.0])}}


def _forecast_throughput(text: str):
    def make(tmp: Path) -> list[str]:
        (tmp / "tp.csv").write_text(text)
        return _scaling(_v2)(tmp) + ["--throughput", str(tmp / "tp.csv")]
    return make


# (command, arguments, what the one error line must contain: the message, the file and line or key, the fix)
BAD_INPUTS = {
    "empty csv": ("fit", _csv_input(""), ["in.csv", "empty file", "expected a header"]),
    "header only": ("fit", _csv_input(CSV_HEADER), ["in.csv", "no data rows"]),
    "missing column": ("fit", _csv_input("setting,model_params,tokens,batch_size\ns,1,2,64\n"),
                       ["in.csv", "missing column(s) steps"]),
    "short row": ("fit", _csv_input(GOOD_CSV + "s,1000,2000,512\n"), ["in.csv, line 5", "4 cells, the header has 5"]),
    "long row": ("fit", _csv_input(GOOD_CSV + "s,1000,2000,512,30,7\n"), ["line 5", "6 cells", "quotes"]),
    "duplicate row": ("fit", _csv_input(GOOD_CSV + "s,1000,2000,128,60\n"),
                      ["in.csv, line 5", "repeats line 3", "remove the duplicate"]),
    "same run twice": ("fit", _csv_input(CSV_HEADER.strip() + ",best_run\n" + "".join(
        f"{r},r{i}\n" for i, r in enumerate(GOOD_ROWS.split())) + "s,1000,2000,128,55,r1\n"),
        ["line 5", "run 'r1' again", "line 3"]),
    "censored with steps": ("fit", _csv_input(CSV_HEADER.strip() + ",censored\n" + GOOD_ROWS.replace("\n", ",0\n")
                                              + "s,1000,2000,512,30,1\n"), ["line 5", "censored", "empty steps"]),
    "non-numeric": ("fit", _csv_input(GOOD_CSV + "s,1000,2000,512,abc\n"),
                    ["in.csv, line 5", "steps must be a positive number"]),
    "zero steps": ("fit", _csv_input(GOOD_CSV + "s,1000,2000,512,0\n"), ["line 5", "got '0'"]),
    "negative steps": ("fit", _csv_input(GOOD_CSV + "s,1000,2000,512,-3\n"), ["line 5", "got '-3'"]),
    "nan steps": ("fit", _csv_input(GOOD_CSV + "s,1000,2000,512,nan\n"), ["line 5", "got 'nan'"]),
    "fractional batch": ("fit", _csv_input(GOOD_CSV + "s,1000,2000,51.5,30\n"), ["line 5", "batch_size", "whole"]),
    "negative model_params": ("fit", _csv_input(GOOD_CSV + "s,-1000,2000,512,30\n"), ["line 5", "model_params"]),
    "one batch size": ("fit", _csv_input(CSV_HEADER + "s,1000,2000,64,100\nt,1000,4000,64,90\n"),
                       ["only one batch size", "add runs at other batch sizes"]),
    "contradicting setting": ("fit", _csv_input(GOOD_CSV + "s,1000,9999,512,30\n"),
                              ["line 5", "setting 's' has", "rename one"]),
    "no such path": ("fit", lambda tmp: [str(tmp / "missing.csv")], ["missing.csv", "no such file"]),
    "no finished runs": ("fit", _study_input(_unfinish_all), ["no finished runs", "run the study first"]),
    "all runs diverged": ("fit", _study_input(_diverge_all), ["no batch size reached its target"]),
    "corrupt result.json": ("fit", _study_input(_corrupt_one), ["result.json", "cannot read JSON"]),
    "unknown status": ("fit", _study_input(_bad_status), ["result.json", "status must be one of", "'exploded'"]),
    "not a study dir": ("fit", lambda tmp: [str(tmp)], ["not a study directory"]),
    "bad overhead": ("fit", _csv_input(GOOD_CSV, "--overhead", "0"), ["--overhead must be a positive number"]),
    "bad overheads": ("fit", _csv_input(GOOD_CSV, "--overheads", "0.1,x"), ["--overheads", "'0.1,x'"]),
    "negative overheads": ("fit", _csv_input(GOOD_CSV, "--overheads", "0.1,-1"), ["--overheads"]),
    "bad reference batch": ("fit", _csv_input(GOOD_CSV, "--reference-batch", "-5"), ["--reference-batch"]),
    "negative bootstrap": ("fit", _csv_input(GOOD_CSV, "--bootstrap", "-1"), ["--bootstrap must be >= 0"]),
    "zero gpus": ("fit", _csv_input(GOOD_CSV, "--gpus", "0"), ["--gpus must be >= 1"]),
    "zero seq len": ("fit", _csv_input(GOOD_CSV, "--seq-len", "0"), ["--seq-len must be >= 1"]),
    "bad target kind": ("fit", _csv_input(GOOD_CSV, "--target-kind", "x"), ["invalid choice"]),
    "steps 1e308": ("fit", _csv_input(CSV_HEADER + "s,1000,2000,64,1e308\n" + GOOD_ROWS.split("\n", 1)[1]),
                    ["in.csv, line 2", "steps must be a positive number below 1e+18", "check its unit"]),
    "foreign out dir": ("fit", _foreign_out, ["precious.txt", "did not write", "choose another"]),
    "paper beside a copied cbs.csv": ("fit", _paper_beside_a_copied_cbs_csv,
                                      ["did not write (figures/fig1.pdf, paper.tex)", "move those files"]),
    "fit output with a user's note": ("fit", _fit_output_with_a_note, ["did not write (notes.md)"]),
    "throughput missing": ("fit", lambda tmp: _csv_input(GOOD_CSV)(tmp) + ["--throughput", str(tmp / "no.csv")],
                           ["--throughput", "no.csv", "no such file"]),
    "throughput column": ("fit", _throughput_input("batch_size,tokens_per_s\n64,1e5\n"),
                          ["tp.csv", "missing column(s) gpus"]),
    "throughput nan": ("fit", _throughput_input(TP_HEADER + "64,8,1e5\n128,8,nan\n"),
                       ["tp.csv, line 3", "tokens_per_s must be a positive number", "'nan'"]),
    "throughput text": ("fit", _throughput_input(TP_HEADER + "64,8,fast\n"), ["tp.csv, line 2", "'fast'"]),
    "throughput gpus": ("fit", _throughput_input(TP_HEADER + "64,0,1e5\n"),
                        ["line 2", "gpus must be a positive whole"]),
    "throughput fraction": ("fit", _throughput_input(TP_HEADER + "64,1.5,1e5\n"), ["line 2", "gpus"]),
    "throughput split": ("fit", _throughput_input(TP_HEADER + "64,3,1e5\n"), ["line 2", "not a multiple of gpus 3"]),
    "throughput duplicate": ("fit", _throughput_input(TP_HEADER + "64,8,1e5\n64,8,2e5\n"),
                             ["tp.csv, line 3", "already on line 2", "average them"]),
    "throughput short row": ("fit", _throughput_input(TP_HEADER + "64,8\n"), ["line 2", "2 cells"]),
    "forecast no file": ("forecast", lambda tmp: ["--scaling", str(tmp / "nope.json"), "--tokens", "1e9"],
                         ["nope.json", "no such file", "cbs fit"]),
    "forecast not json": ("forecast", _scaling("{broken"), ["scaling.json", "cannot read JSON", "rewrite"]),
    "forecast no laws": ("forecast", _scaling({"version": 2}), ["scaling.json", "no 'laws' mapping"]),
    "forecast empty laws": ("forecast", _scaling({"laws": {}}), ["scaling.json", "no scaling law"]),
    "forecast malformed law": ("forecast", _scaling({"laws": {"tokens": {"variable": "tokens"}}}),
                               ["scaling.json", "laws.tokens is malformed", "KeyError"]),
    "forecast malformed b_noise law": ("forecast", _scaling(lambda: {**_v2(), "laws_b_noise": {"tokens": [1]}}),
                                       ["laws_b_noise.tokens is malformed"]),
    "forecast malformed joint": ("forecast", _scaling(lambda: {**_v2(), "laws": {
        **_v2()["laws"], "joint": {"variables": ["tokens", "params"], "exponents": {"tokens": 0.5}}}}),
        ["laws.joint is malformed"]),
    "forecast malformed throughput": ("forecast", _scaling(lambda: {**_v2(), "throughput": {"points": [{"gpus": 1}]}}),
                                      ["scaling.json", "throughput is malformed"]),
    "forecast old file without joint": ("forecast", _scaling(_v1_with_d_and_n, "--tokens", "1e9", "--model-params",
                                                             "2e8"),
                                        ["scaling.json", "version 1", "without a joint law", "re-run `cbs fit`"]),
    "forecast negative tokens": ("forecast", _scaling(_v2, "--tokens", "-1"), ["--tokens must be a positive"]),
    "forecast nan tokens": ("forecast", _scaling(_v2, "--tokens", "nan"), ["--tokens", "not a finite count",
                                                                            "write e.g. 1e10"]),
    "forecast text tokens": ("forecast", _scaling(_v2, "--tokens", "ten"), ["--tokens", "'ten' is not a count"]),
    "forecast zero params": ("forecast", _scaling(_v2, "--tokens", "1e9", "--model-params", "0"),
                             ["--model-params must be a positive"]),
    "forecast zero gpus": ("forecast", _scaling(_v2, "--tokens", "1e9", "--gpus", "0"), ["--gpus must be >= 1"]),
    "forecast zero micro": ("forecast", _scaling(_v2, "--tokens", "1e9", "--micro-batch", "0"),
                            ["--micro-batch must be >= 1"]),
    "forecast zero seq len": ("forecast", _scaling(_v2, "--tokens", "1e9", "--seq-len", "0"),
                              ["--seq-len must be >= 1"]),
    "forecast bad throughput": ("forecast", _forecast_throughput(TP_HEADER + "64,8,-5\n"),
                                ["--throughput", "tp.csv, line 2", "tokens_per_s"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_no_output(case, tmp_path, capsys):
    prog, make, expected = BAD_INPUTS[case]
    argv = make(tmp_path)
    out_before = _tree(tmp_path / "out")
    before = sorted(p.name for p in tmp_path.iterdir())
    if prog == "fit":
        rc, stdout, err = run_fit(capsys, "--out", tmp_path / "out", "--bootstrap", "20", *argv)  # argv's flags win
    else:
        rc = forecast_main(argv)
        stdout, err = capsys.readouterr()
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"cbs {prog}: error: ")
    for text in expected:
        assert text in err, (text, err)
    assert "Traceback" not in err and stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no staging left behind
    assert _tree(tmp_path / "out") == out_before  # an existing --out untouched


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_csv_with_a_utf8_bom_reads(tmp_path, capsys):
    """A spreadsheet's "CSV UTF-8" starts with a BOM: it was read into the first column's name ("missing
    column(s) setting")."""
    (tmp_path / "in.csv").write_bytes("\ufeff".encode() + GOOD_CSV.encode())
    rc, _, err = run_fit(capsys, tmp_path / "in.csv", "--out", tmp_path / "out", "--bootstrap", "0")
    assert rc == 0, err
    assert [r["setting"] for r in read_csv(tmp_path / "out" / "cbs.csv")] == ["s"]


def test_help_returns_0(capsys):
    assert fit_main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "STUDY_DIR_OR_CSV" in text
    assert "study's branched.tolerance" in text and "study.branch.tolerance" not in text  # the key a user sets
    assert forecast_main(["--help"]) == 0 and "--micro-batch" in capsys.readouterr().out


def test_forecast_with_only_an_n_law(tmp_path, capsys):
    from cbs.analysis.laws import fit_scaling_law, law_to_json

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
    from cbs.analysis.figures import figure_names
    from cbs.analysis.steps import Setting, StepsPoint, StepsTable

    settings = [Setting(n, 1, 1) for n in ("a/b", "a b", "A_B", "ok-1.5")]
    table = StepsTable([StepsPoint(s, 64, 10.0, 1) for s in settings], "x", "csv")
    names = figure_names(table)
    assert len(set(n.lower() for n in names.values())) == 4
    assert names["ok-1.5"] == "figures/steps_ok-1.5.png" and all("/" not in n[8:] for n in names.values())


# ------------------------------------------------------------------------------------------------------ isolation


def test_analysis_never_imports_the_training_stack():
    code = ("import sys, pkgutil, importlib, cbs.analysis\n"
            "for m in pkgutil.iter_modules(cbs.analysis.__path__):\n"
            "    importlib.import_module('cbs.analysis.' + m.name)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'megatron')\n"
            "       or m.split('.')[:2] == ['cbs', 'pipeline']]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ------------------------------------------------------------------- what each run says, from pretrain-shaped files


SWEEP_SETTINGS = [{"name": "m85M_d1", "model_params": 85_000_000, "tokens": 1_000_000_000, "target_loss": 3.5},
                  {"name": "m85M_d4", "model_params": 85_000_000, "tokens": 4_000_000_000, "target_loss": 3.3}]
SWEEP = [32, 64, 128, 256, 512, 1024]


def sweep_truth(batch: int, setting: int = 0) -> float:
    """S(B) of the first setting (B_noise 200) or the second (B_noise 400, twice the S_min)."""
    return round(5000 * (1 + setting) * (1 + 200 * (1 + setting) / batch), 2)


def _pretrain_crossing(steps: float, tokens_per_step: int) -> dict:
    """A crossing as pretrain's TargetTracker records it (README, "pretrain")."""
    return {"step": math.ceil(steps), "tokens": math.ceil(steps) * tokens_per_step, "step_interp": steps,
            "tokens_interp": round(steps * tokens_per_step, 1)}


def _pretrain_run(runs: Path, name: str, batch: int, status: str, steps_trained: int, crossed: list,
                  tokens_per_s: list | None = None, world_size: int = 2) -> None:
    """runs/<name>/config.yaml, result.json (and metrics.jsonl) with every key pretrain writes; `crossed`: the
    steps at which each setting's target was crossed (None: not reached)."""
    run = runs / name
    run.mkdir(parents=True)
    tps = batch * SEQ_LEN
    config = {"global_batch_seqs": batch, "micro_batch_seqs": 4, "model": {"seq_len": SEQ_LEN, "layers": 2},
              "study": {"settings": SWEEP_SETTINGS},
              "resolved": {"world_size": world_size, "tokens_per_step": tps, "gradient_accumulation_steps": 1}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    targets = []
    for s, steps in zip(SWEEP_SETTINGS, crossed):
        crossing = None if steps is None else _pretrain_crossing(steps, tps)
        targets.append({"loss": s["target_loss"], "raw": crossing, "ewa": {"0.999": crossing, "0.9995": None}})
    reason = {"completed": "token budget trained", "diverged": f"train loss nan at step {steps_trained}",
              "failed": "RuntimeError: NCCL timeout", "preempted": "SIGTERM"}[status]
    result = {"status": status, "reason": reason, "steps": steps_trained, "tokens": steps_trained * tps,
              "total_steps": 20_000, "wall_seconds": 12.5, "final": {"eval/loss": "nan"}, "targets": targets,
              "params": {"total": 100_000_000, "non_embedding": 85_000_000}, "world_size": world_size}
    (run / "result.json").write_text(json.dumps(result))
    if tokens_per_s is not None:
        lines = [{"step": 10 * (i + 1), "tokens": 10 * (i + 1) * tps, "train/loss": 3.9, "perf/tokens_per_s": v,
                  "perf/tokens_per_s_per_rank": v if isinstance(v, str) else v / world_size}
                 for i, v in enumerate(tokens_per_s)]
        lines.insert(1, {"step": 10, "tokens": 10 * tps, "eval/loss": "nan", "eval/loss_ewa/0.999": "inf"})
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def _run_speed(batch: int) -> float:
    return 1000.0 * batch ** 0.5  # whole-job tokens/s measured at this batch on 2 GPUs


def make_divergence_study(root: Path) -> Path:
    """One model, two data budgets (one sweep serves both), two LRs per batch. At B=1024 the high LR crossed the
    first target and diverged before the second; at B=512 it diverged before crossing; at B=2048 both runs trained
    3000 steps without crossing; at B=16 both diverged; one more run at B=64 was preempted."""
    runs = root / "runs"
    for b in SWEEP:
        best = [sweep_truth(b, 0), sweep_truth(b, 1)]
        noisy = [_run_speed(b) * 0.9, "nan", _run_speed(b), "inf", _run_speed(b) * 1.1, "-inf"]
        if b == 1024:
            _pretrain_run(runs, f"b{b}_lr_hi", b, "diverged", int(best[0]) + 400, [best[0], None], noisy)
            _pretrain_run(runs, f"b{b}_lr_lo", b, "completed", 20_000, [round(x * 1.25, 2) for x in best], noisy)
        elif b == 512:
            _pretrain_run(runs, f"b{b}_lr_hi", b, "diverged", 300, [None, None], noisy)
            _pretrain_run(runs, f"b{b}_lr_lo", b, "completed", 20_000, best, noisy)
        else:
            _pretrain_run(runs, f"b{b}_lr_hi", b, "completed", 20_000, [round(x * 1.1, 2) for x in best],
                          ["nan", "nan"] if b == 128 else noisy)  # a run that logged only NaN throughput
            _pretrain_run(runs, f"b{b}_lr_lo", b, "completed", 20_000, best, noisy)
    for name in ("b2048_lr_hi", "b2048_lr_lo"):
        _pretrain_run(runs, name, 2048, "completed", 3000, [None, None])
    for name in ("b16_lr_hi", "b16_lr_lo"):
        _pretrain_run(runs, name, 16, "diverged", 50, [None, None])
    _pretrain_run(runs, "b64_lr_mid", 64, "preempted", 700, [None, None])
    return root


@pytest.fixture(scope="module")
def divergence_fit(tmp_path_factory):
    root = tmp_path_factory.mktemp("diverge")
    study = make_divergence_study(root / "study")
    assert fit_main([str(study), "--out", str(root / "fit"), "--bootstrap", "100", "--gpus", "4"]) == 0
    return study, root / "fit"


def test_a_crossing_before_divergence_counts_and_is_flagged(divergence_fit):
    _, out = divergence_fit
    rows = {int(r["batch_size"]): r for r in read_csv(out / "steps.csv") if r["setting"] == "m85M_d1"}
    top = rows[1024]  # the diverged run's crossing is the best at this batch, not the slower completed run's
    assert float(top["steps"]) == pytest.approx(sweep_truth(1024))
    assert (top["best_run"], top["diverged_after"], top["censored"], top["lost_runs"]) == ("b1024_lr_hi", "1", "0",
                                                                                            "0")
    assert (rows[512]["diverged_after"], rows[512]["lost_runs"]) == ("0", "1")
    assert float(rows[512]["steps"]) == pytest.approx(sweep_truth(512))
    assert (rows[2048]["censored"], rows[2048]["censored_at_steps"], rows[2048]["runs"]) == ("1", "3000", "2")
    assert (rows[16]["censored"], rows[16]["censored_at_steps"], rows[16]["lost_runs"]) == ("1", "", "2")
    assert int(rows[64]["runs"]) == 2  # the preempted run is unfinished, not an observation
    report = (out / "report.md").read_text()
    assert "Points whose best run diverged after crossing the target" in report
    assert f"- m85M_d1, B=1024: S={sweep_truth(1024):.4g} from `b1024_lr_hi`" in report
    second = {int(r["batch_size"]): r for r in read_csv(out / "steps.csv") if r["setting"] == "m85M_d4"}
    assert second[1024]["diverged_after"] == "0" and second[1024]["best_run"] == "b1024_lr_lo"
    assert second[1024]["lost_runs"] == "1"  # diverged before this target: no observation
    assert "> 3000 (2)" in report and "no observation (2)" in report and "b64_lr_mid" in report
    cbs = read_csv(out / "cbs.csv")[0]
    assert cbs["n_censored"] == "1" and float(cbs["b_noise"]) == pytest.approx(200, rel=0.05)


def test_steps_csv_reads_back_with_its_new_columns(divergence_fit, tmp_path, capsys):
    _, out = divergence_fit
    rc, _, err = run_fit(capsys, out / "steps.csv", "--out", tmp_path / "again", "--bootstrap", "0")
    assert rc == 0, err
    keep = ["setting", "batch_size", "steps", "censored", "runs", "best_run", "censored_at_steps",
                         "diverged_after", "lost_runs"]
    first = [[r[k] for k in keep] for r in read_csv(out / "steps.csv")]
    assert [[r[k] for k in keep] for r in read_csv(tmp_path / "again" / "steps.csv")] == first
    assert "b1024_lr_hi" in (tmp_path / "again" / "report.md").read_text()


def test_time_and_cost_from_metrics_jsonl_with_nan_strings(divergence_fit):
    _, out = divergence_fit
    rows = read_csv(out / "time_to_target.csv")
    mine = [r for r in rows if r["setting"] == "m85M_d1"]
    for r in rows:
        assert all(math.isfinite(float(r[k])) and float(r[k]) > 0 for k in ("tokens_per_s", "hours", "gpu_hours"))
    at = {(int(r["batch_size"]), int(r["gpus"])): r for r in mine}
    assert {g for (b, g) in at if b == 64} == {1, 2, 4}  # powers of two up to --gpus 4
    r = at[64, 2]  # measured: the median of each run's finite values, over the runs at B=64
    assert r["throughput"] == "measured" and float(r["tokens_per_s"]) == pytest.approx(_run_speed(64))
    assert float(r["hours"]) == pytest.approx(sweep_truth(64) * 64 * SEQ_LEN / _run_speed(64) / 3600)
    assert float(r["gpu_hours"]) == pytest.approx(2 * float(r["hours"]))
    # B=128: one run logged only "nan"; the other's measurement stands
    assert at[128, 2]["throughput"] == "measured" and float(at[128, 2]["tokens_per_s"]) == pytest.approx(
        _run_speed(128))
    # B=64 on 1 GPU is not measured: 1 x the per-GPU throughput measured at local batch 64 (B=128 on 2 GPUs)
    assert at[64, 1]["throughput"] == "modelled"
    assert float(at[64, 1]["tokens_per_s"]) == pytest.approx(_run_speed(128) / 2)
    fastest = [r for r in mine if r["fastest"] == "1"]
    assert len(fastest) == 1 and float(fastest[0]["hours"]) == min(float(r["hours"]) for r in mine)
    report = (out / "report.md").read_text()
    assert "## Time and cost to target" in report and "fastest with <= 4 GPU(s)" in report
    tp = json.loads((out / "scaling.json").read_text())["throughput"]["points"]
    assert all(math.isfinite(p["tokens_per_s"]) for p in tp) and len(tp) == 2 * len(SWEEP) - 1
    assert {r["setting"] for r in rows} == {"m85M_d1", "m85M_d4"}


def _forecast_lines(capsys, *argv: str) -> list[str]:
    assert forecast_main(list(argv)) == 0
    return capsys.readouterr().out.splitlines()


def test_forecast_prints_the_fastest_plan_on_a_gpu_budget(divergence_fit, capsys, tmp_path):
    """It used to recommend a batch above the forecast CBS by default, and printed two step counts, unlabelled."""
    _, out = divergence_fit
    lines = _forecast_lines(capsys, "--scaling", str(out / "scaling.json"), "--tokens", "1e9", "--gpus", "4")
    cbs = float(lines[0].split(" = ")[1].split()[0])
    line = next(x for x in lines if x.startswith("fastest to the target with <= 4 GPU(s) at a batch <= the CBS:"))
    assert int(line.split("global batch ")[1].split()[0]) <= cbs and "wall-clock" in line and "GPU-hours" in line
    assert "steps to the target loss (S(B) = " in line
    assert any("steps to train the whole budget of 1e+09 tokens" in x for x in lines if x.startswith("batch plan"))
    plan = next(x for x in lines if x.startswith("the batch plan (global batch"))
    assert "steps to the target loss" in plan
    above = next(x for x in lines if x.startswith("note: above the CBS, global batch"))  # here it is faster
    assert int(above.split("global batch ")[1].split()[0]) > cbs and "--beyond-cbs" in above
    tp = tmp_path / "tp.csv"
    tp.write_text("batch_size,gpus,tokens_per_s\n256,4,1e6\n")
    lines = _forecast_lines(capsys, "--scaling", str(out / "scaling.json"), "--tokens", "1e9", "--gpus", "4",
                            "--throughput", str(tp), "--beyond-cbs")
    line = next(x for x in lines if x.startswith("fastest to the target with <= 4 GPU(s) at any batch up to"))
    assert "global batch 256 on 4 GPU(s)" in line and "throughput measured: 1,000,000 tokens/s" in line


def test_forecast_reads_budgets_as_cbs_names_them(divergence_fit, capsys):
    """`cbs forecast --tokens 10B` was refused as an invalid float."""
    _, out = divergence_fit
    scaling = str(out / "scaling.json")
    assert _forecast_lines(capsys, "--scaling", scaling, "--tokens", "10B", "--model-params", "85M") == \
        _forecast_lines(capsys, "--scaling", scaling, "--tokens", "1e10", "--model-params", "8.5e7")


def test_forecast_offers_the_b_noise_law_where_the_report_recommends_it(divergence_fit, capsys):
    """The report recommends the B_noise law when its exponent and the CBS law's differ; forecast offered only
    the CBS law. CBS = (1 + o) B0 + o B_noise(D), B0 the fit's (cbs.csv) or --reference-batch."""
    from cbs.analysis.forecast import load_scaling

    _, out = divergence_fit
    scaling = str(out / "scaling.json")
    assert any("the B_noise law's" in w for w in json.loads((out / "scaling.json").read_text())["warnings"])
    lines = _forecast_lines(capsys, "--scaling", scaling, "--tokens", "2e9")
    assert lines[1].startswith("the fit's report recommends the B_noise law here") and "--law b_noise" in lines[1]
    b_noise = float(load_scaling(scaling).b_noise["tokens"].predict(2e9)[0])
    b0s = {float(r["reference_batch"]) for r in read_csv(out / "cbs.csv") if r["in_laws"] == "1"}
    for flags, b0 in (((), b0s.pop()), (("--reference-batch", "32"), 32.0)):
        lines = _forecast_lines(capsys, "--scaling", scaling, "--tokens", "2e9", "--law", "b_noise", *flags)
        cbs = float(lines[0].split(" = ")[1].split()[0])
        assert cbs == pytest.approx(critical_batch_size(b_noise, b0, 0.2), abs=0.05), lines[0]
        assert f"x B0 {b0:g} + 0.2 x B_noise" in lines[0]
        plan = next(x for x in lines if x.startswith("batch plan"))
        assert int(plan.split("global batch ")[1].split()[0]) == math.floor(cbs)


def test_forecast_says_when_throughput_is_scaled_with_n(divergence_fit, capsys):
    """The time plan's throughput for another model size is the measured one x N_measured / N: say so."""
    _, out = divergence_fit
    measured = {p["model_params"] for p in json.loads((out / "scaling.json").read_text())["throughput"]["points"]}
    lines = _forecast_lines(capsys, "--scaling", str(out / "scaling.json"), "--tokens", "1e9", "--gpus", "4",
                            "--model-params", "5e8")
    line = next(x for x in lines if x.startswith("fastest to the target"))
    assert f"scaled with N from the N = {measured.pop():.3g} measured by N_measured / N" in line
    lines = _forecast_lines(capsys, "--scaling", str(out / "scaling.json"), "--tokens", "1e9", "--gpus", "4")
    assert not any("scaled with N" in x for x in lines)  # the measured model itself


# ------------------------------------------------------------------------------------------- the Chinchilla design


def test_chinchilla_design_says_d_and_n_cannot_be_separated(tmp_path, capsys):
    rng = np.random.default_rng(3)
    path = tmp_path / "chinchilla.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "model_params", "tokens", "batch_size", "steps"])
        for n in (85_000_000, 151_000_000, 302_000_000, 604_000_000):
            d = 20 * n
            b_noise = 0.02 * d ** 0.5
            for b in (64, 128, 256, 512, 1024, 2048, 4096):
                w.writerow([f"n{n}", n, d, b, 1e4 * (1 + b_noise / b) * math.exp(rng.normal(0, 0.02))])
    rc, stdout, err = run_fit(capsys, path, "--out", tmp_path / "fit", "--bootstrap", "100")
    assert rc == 0, err
    scaling = json.loads((tmp_path / "fit" / "scaling.json").read_text())
    joint = scaling["laws"]["joint"]
    assert joint["identifiable"] is False and "collinear" in joint["reason"]
    assert joint["exponents"] == {"tokens": None, "params": None} and scaling["collinearity"]["collinear"] is True
    report = (tmp_path / "fit" / "report.md").read_text()
    assert "cannot be separated" in report and "D = c D^a N^b" not in report
    assert "D^a N^b" not in stdout  # no meaningless split printed
    args = ["--scaling", str(tmp_path / "fit" / "scaling.json"), "--tokens", "1e10"]
    assert forecast_main(args + ["--model-params", "5e8"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("CBS(D=1e+10) = ") and "no joint law" in text and "collinear" in text
    assert "off the fitted design" not in text  # D = 20 N, as fitted
    assert forecast_main(args + ["--model-params", "1e8"]) == 0  # D = 100 N
    assert "off the fitted design" in capsys.readouterr().out


def test_a_fit_of_many_settings_says_what_it_does_and_caps_the_figures(tmp_path, capsys, monkeypatch):
    """A fit of 12,500 settings printed nothing for minutes and drew a PNG per setting (1,255 PNGs for 10k rows).
    The caps are lowered here so that the test stays fast; the code paths are the ones a large fit takes."""
    import cbs.analysis.cli
    import cbs.analysis.figures

    monkeypatch.setattr(cbs.analysis.figures, "MAX_SETTING_FIGURES", 4)
    monkeypatch.setattr(cbs.analysis.cli, "PROGRESS_SETTINGS", 5)
    (tmp_path / "in.csv").write_text(CSV_HEADER + "".join(
        f"s{i},1000,{2000 + i},{b},{100 * (1 + 40 / b) * (1.02 if b % 3 else 0.98):.3f}\n"
        for i in range(12) for b in (16, 32, 64, 128)))
    rc, stdout, err = run_fit(capsys, tmp_path / "in.csv", "--out", tmp_path / "out", "--bootstrap", "0")
    assert rc == 0, err
    assert "fitting 12 settings (48 batch points" in err and "fitted; rendering" in err
    steps_pngs = [p for p in (tmp_path / "out" / "figures").glob("steps_*.png") if p.name != "steps_normalized.png"]
    assert len(steps_pngs) == 4
    report = (tmp_path / "out" / "report.md").read_text()
    assert "8 more setting(s) without a figure of their own" in report
    assert len(read_csv(tmp_path / "out" / "cbs.csv")) == 12  # every setting still fitted
