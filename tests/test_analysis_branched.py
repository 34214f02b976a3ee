"""Branched local CBS: the pass/fail arithmetic on hand-made outcomes, and `cbs fit` / `cbs forecast --ramp` on a
branched study directory planned by the real study planner, its files written as pretrain writes them."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from cbs.analysis.branched import local_cbs
from cbs.analysis.cli import fit_main, forecast_main
from cbs.analysis.outputs import CBS_COLUMNS
from cbs.pipeline import study as study_mod
from cbs.pipeline.config import PretrainConfig, StudyConfig, from_dict, to_dict
from cbs.pipeline.metrics import Tracker

PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- the arithmetic alone


def test_pass_chain_stops_at_the_first_batch_above_the_tolerance():
    # b8: 3.02 <= 1.01 x 3.00 passes; b16: 3.05 > 3.03 fails; b32 would pass against b4 but the chain has ended
    verdicts, cbs, low, high, complete = local_cbs(
        [(32, 2.9, "completed"), (4, 3.00, "completed"), (16, 3.05, "completed"), (8, 3.02, "completed")], 0.01)
    assert verdicts == ["pass", "pass", "fail", "not needed"]  # in batch order, whatever the input order
    assert (cbs, low, high, complete) == (8, 8, 16, True)


def test_each_batch_is_judged_against_the_best_smaller_batch_not_the_first():
    # b16: 2.93 is within 1% of b4's 3.0 but not of b8's 2.9 (2.929): it fails
    verdicts, cbs, _, high, _ = local_cbs([(4, 3.0, "completed"), (8, 2.9, "completed"), (16, 2.93, "completed")],
                                          0.01)
    assert verdicts == ["pass", "pass", "fail"] and (cbs, high) == (8, 16)


def test_a_loss_exactly_at_the_tolerance_passes_and_all_passing_leaves_the_interval_open():
    # 1.25 x 4.0 = 5.0 exactly: a tie passes (<=); every batch passes, so CBS >= 16 and the upper end is inf
    verdicts, cbs, low, high, complete = local_cbs(
        [(4, 4.0, "completed"), (8, 5.0, "completed"), (16, 5.0, "completed")], 0.25)
    assert verdicts == ["pass"] * 3 and (cbs, low, high, complete) == (16, 16, math.inf, True)
    assert local_cbs([(4, 3.0, "completed"), (8, 3.0, "completed")], 0.0)[1] == 8  # equal losses, tolerance 0


def test_a_diverged_branch_fails_its_batch_and_later_unfinished_ones_are_not_needed():
    verdicts, cbs, low, high, complete = local_cbs(
        [(4, 3.0, "completed"), (8, 3.01, "completed"), (16, None, "diverged"), (32, None, "unfinished")], 0.01)
    assert verdicts == ["pass", "pass", "diverged", "not needed"]
    assert (cbs, low, high, complete) == (8, 8, 16, True)
    # a completed branch whose final loss is NaN cannot have trained: it fails like a diverged one
    assert local_cbs([(4, 3.0, "completed"), (8, math.nan, "completed")], 0.01)[1:4] == (4, 4, 8)


def test_an_unfinished_branch_inside_the_chain_makes_the_point_incomplete():
    verdicts, cbs, low, high, complete = local_cbs(
        [(4, 3.0, "completed"), (8, None, "unfinished"), (16, 3.0, "completed")], 0.01)
    assert verdicts == ["pass", "unfinished", "not needed"] and not complete
    assert math.isnan(cbs) and low == 4 and math.isnan(high)  # only the lower bound passed so far


def test_a_diverged_smallest_batch_gives_no_cbs():
    verdicts, cbs, low, high, complete = local_cbs([(4, None, "diverged"), (8, 3.0, "completed")], 0.01)
    assert verdicts == ["diverged", "not needed"] and complete and math.isnan(cbs) and high == 4


# ----------------------------------------------------------------------------------- a study as pretrain leaves it


SEQ_LEN = 32
BATCHES = [4, 8, 16, 32]
TOKENS = 64000
# branch point t (tokens the base saw) -> {batch: (status, final eval/loss)}; CBS(t) = 4, 8, incomplete (>= 8), 16
OUTCOMES = {
    8064: {4: ("completed", 4.00), 8: ("completed", 4.10), 16: ("completed", 4.30), 32: ("completed", 4.60)},
    16000: {4: ("completed", 3.60), 8: ("completed", 3.61), 16: ("completed", 3.70), 32: ("completed", 3.90)},
    32000: {4: ("completed", 3.30), 8: ("completed", 3.31), 16: ("preempted", None), 32: ("completed", 3.32)},
    64000: {4: ("completed", 3.10), 8: ("completed", 3.08), 16: ("completed", 3.11), 32: ("diverged", None)},
}
LOG_EVERY = 5


def b_simple_true(step: int) -> float:
    """The base run's B_simple at a log step: rising."""
    return 2.0 + step * 4 * SEQ_LEN / 4000


def b_simple_logged(step: int) -> float | str:
    """What the base run logs as train/noise_scale: NaN until the EMAs settle, one inf, then the true value."""
    if step <= 10:
        return "nan"
    return "inf" if step == 125 else b_simple_true(step)


def b_simple_window(tokens: int) -> float:
    """What cbs fit reads at t: the readings within 25% of t have |G|^2 = 1 each (below), so their ratio of sums
    is the mean of their true values, the NaN- and inf-logged ones included."""
    tps = 4 * SEQ_LEN
    steps = [s for s in range(LOG_EVERY, TOKENS // tps + 1, LOG_EVERY) if abs(s * tps - tokens) <= 0.25 * tokens]
    return sum(map(b_simple_true, steps)) / len(steps)


def study_config(**branched) -> StudyConfig:
    return from_dict(StudyConfig, {
        "name": "branched_test", "method": "branched", "data": "unused", "batch_sizes": BATCHES,
        "base": {"micro_batch_seqs": 2, "eval": {"every_steps": 1000, "growth": 1.2, "eval_tokens": 512},
                 "log": {"every_steps": LOG_EVERY}, "checkpoint": {"every_steps": 0},
                 "schedule": {"warmup_tokens": 2048}},
        "settings": {"generator": "fixed_model", "model": {"preset": "tiny", "seq_len": SEQ_LEN}, "tokens": [TOKENS]},
        "branched": {"at_fractions": [0.125, 0.25, 0.5, 1.0], "branch_tokens": 4096, "tolerance": 0.01,
                     "rule": "relative", **branched},
    }, "study")


def _result(status: str, steps: int, tokens: int, final: dict) -> dict:
    """result.json with every key pretrain's Trainer.result writes."""
    reason = {"completed": "token budget trained", "diverged": "train loss nan at step 3",
              "preempted": "stopped by SIGTERM after step 3"}[status]
    return {"status": status, "reason": reason, "steps": steps, "tokens": tokens, "total_steps": steps,
            "wall_seconds": 1.5, "final": final, "targets": [],
            "params": {"total": 70_000, "non_embedding": 39_000}, "world_size": 1}


def _write_started(run, root: Path) -> Path:
    """config.yaml as pretrain writes it when the run starts: the validated config with every default filled."""
    path = study_mod.run_path(root, run.name)
    (path / "config.yaml").write_text(yaml.safe_dump(to_dict(from_dict(PretrainConfig, run.config, "pretrain"))))
    return path


def make_branched_study(root: Path, outcomes=OUTCOMES, ewa: dict | None = None, eval_sigma: float | None = None,
                        **branched) -> Path:
    """Plan with the real planner (run.yaml for every run), then finish runs as pretrain would: config.yaml,
    metrics.jsonl through the real Tracker (non-finite values as strings), result.json. `ewa`: (t, batch) ->
    final EWA loss, written as pretrain names it, for the branches that have one. `eval_sigma`: the base run also
    logs an eval curve (a power law) with this relative noise."""
    runs = study_mod.plan(study_config(**branched), root, root / "data")
    study_mod.write_run_inputs(runs, root)
    base = runs[0]
    path = _write_started(base, root)
    tracker = Tracker(path, tensorboard=False)
    tps = base.batch * SEQ_LEN
    for step in range(LOG_EVERY, TOKENS // tps + 1, LOG_EVERY):
        v = b_simple_true(step)  # |G|^2 = 1, tr(Sigma) = v at batches 2 and 4
        tracker.log({"train/loss": 3.0, "train/noise_scale": float(b_simple_logged(step)),
                     "train/grad_sq_small": 1 + v / 2, "train/grad_sq_big": 1 + v / 4,
                     "train/noise_scale_batches": [2, 4]},
                    step, step * tps)
    if eval_sigma is not None:
        rng = np.random.default_rng(0)
        for step in sorted({round(1.2 ** k) for k in range(35)} | set(range(10, TOKENS // tps + 1, 10))):
            loss = (2 + 5 * step ** -0.3) * math.exp(eval_sigma * rng.standard_normal())
            tracker.log({"eval/loss": loss}, step, step * tps)
    tracker.close()
    (path / "result.json").write_text(json.dumps(_result("completed", TOKENS // tps, TOKENS, {"eval/loss": 3.0})))
    for run in runs[1:]:
        t = run.branch["base_tokens"]
        status, loss = outcomes[t][run.batch]
        path = _write_started(run, root)
        final = {} if loss is None else {"eval/loss": loss}
        if ewa and (t, run.batch) in ewa:
            final[f"eval/loss_ewa/{run.taus[0] if run.taus else 0.95}"] = ewa[(t, run.batch)]
        steps = 4096 // (run.batch * SEQ_LEN)
        (path / "result.json").write_text(json.dumps(_result(status, steps, steps * run.batch * SEQ_LEN, final)))
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def branched_fit(tmp_path_factory):
    root = tmp_path_factory.mktemp("branched")
    study = make_branched_study(root / "study")
    assert fit_main([str(study), "--out", str(root / "fit")]) == 0
    return study, root / "fit"


def test_fit_recognises_a_branched_study_and_writes_cbs_t(branched_fit, capsys):
    _, out = branched_fit
    rows = read_csv(out / "cbs_curve.csv")
    assert list(rows[0])[:5] == ["setting", "tokens", "cbs", "cbs_low", "cbs_high"]
    got = [(int(r["tokens"]), r["cbs"], r["cbs_low"], r["cbs_high"], r["complete"]) for r in rows]
    assert got == [(8064, "4", "4", "8", "1"), (16000, "8", "8", "16", "1"), (32000, "", "8", "", "0"),
                   (64000, "16", "16", "32", "1")]
    assert {r["setting"] for r in rows} == {"mL2d128_d64K"} and rows[0]["tolerance"] == "0.01"
    assert "incomplete" in rows[2]["note"] and rows[0]["seq_len"] == str(SEQ_LEN)
    branches = read_csv(out / "branches.csv")
    assert [(b["batch"], b["verdict"]) for b in branches if b["tokens"] == "64000"] == [
        ("4", "pass"), ("8", "pass"), ("16", "pass"), ("32", "diverged")]


def test_b_simple_of_the_base_run_is_read_at_each_branch_point(branched_fit):
    _, out = branched_fit
    rows = {int(r["tokens"]): r for r in read_csv(out / "cbs_curve.csv")}
    # the readings within 25% of t (at t = 16000 tokens, step 125, one logged inf: kept)
    for t in (8064, 16000, 64000):
        assert float(rows[t]["b_simple"]) == pytest.approx(b_simple_window(t))


def test_branched_report_and_figures(branched_fit):
    study, out = branched_fit
    report = (out / "report.md").read_text()
    for heading in ("## Method", "## Warnings", "## CBS(t)", "## Branch losses", "## Gradient noise scale along "
                    "training", "## Batch ramp", "## Figures"):
        assert heading in report
    assert "CBS(t) rises from 4 at t = 8,064 to 16 at t = 64,000 tokens" in report
    assert "mL2d128_d64K_b4_lr0.00316_t32K_b16" in report  # the unfinished branch is named
    assert "no base run logged" not in report and "under-estimates" in report
    assert "## Comparison with the sweep" not in report  # only with --compare
    assert (out / "figures" / "cbs_curve.png").read_bytes().startswith(PNG)
    assert (out / "figures" / "branches_mL2d128_d64K.png").read_bytes().startswith(PNG)
    assert not (out / "scaling.json").exists() and not (out / "cbs.csv").exists()


def test_tolerance_flag_overrides_the_branches_tolerance(branched_fit, tmp_path):
    study, _ = branched_fit
    assert fit_main([str(study), "--out", str(tmp_path / "fit"), "--tolerance", "0.03"]) == 0
    rows = read_csv(tmp_path / "fit" / "cbs_curve.csv")
    # at t = 8064, 4.10 <= 1.03 x 4.00 now passes and 4.30 > 1.03 x 4.00 fails
    assert (rows[0]["cbs"], rows[0]["cbs_high"], rows[0]["tolerance"]) == ("8", "16", "0.03")


def test_ewa_losses_are_compared_when_every_branch_recorded_them(tmp_path):
    # the raw losses say CBS 4 at t = 8064; the EWA ones say 16 (b8 4.01, b16 4.02 within 1% of 4.00, b32 not)
    ewa = {(t, b): loss for t in OUTCOMES for b, loss in zip(BATCHES, [4.00, 4.01, 4.02, 4.10])}
    study = make_branched_study(tmp_path / "study", ewa=ewa)
    assert fit_main([str(study), "--out", str(tmp_path / "fit")]) == 0
    rows = read_csv(tmp_path / "fit" / "cbs_curve.csv")
    assert rows[0]["cbs"] == "16" and "loss compared: ewa" in (tmp_path / "fit" / "report.md").read_text()
    assert fit_main([str(study), "--out", str(tmp_path / "raw"), "--target-kind", "raw"]) == 0
    assert read_csv(tmp_path / "raw" / "cbs_curve.csv")[0]["cbs"] == "4"


def test_compare_puts_cbs_t_beside_the_sweep_at_matching_d(branched_fit, tmp_path, capsys):
    study, _ = branched_fit
    sweep = tmp_path / "sweep_fit"
    sweep.mkdir()
    rows = [  # a sweep fit's cbs.csv: same model at D = 62K (within 10% of t = 64000) and 16K; another model; D 40K
        {"setting": "a", "model_params": 393216, "tokens": 62000, "cbs": 20.5, "cbs_low": 15, "cbs_high": 30},
        {"setting": "b", "model_params": 393216, "tokens": 16500, "cbs": 6.0, "cbs_low": "", "cbs_high": ""},
        {"setting": "c", "model_params": 999, "tokens": 64000, "cbs": 50.0, "cbs_low": 40, "cbs_high": 60},
        {"setting": "d", "model_params": 393216, "tokens": 40000, "cbs": 12.0, "cbs_low": 10, "cbs_high": 14},
        {"setting": "e", "model_params": 393216, "tokens": 32000, "cbs": "", "cbs_low": "", "cbs_high": ""}]
    with open(sweep / "cbs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, CBS_COLUMNS, restval="")
        w.writeheader()
        w.writerows(rows)
    assert fit_main([str(study), "--out", str(tmp_path / "fit"), "--compare", str(sweep)]) == 0
    # the N of the tiny model as the planner computes it; settings of another N never match
    n = int(read_csv(tmp_path / "fit" / "cbs_curve.csv")[0]["model_params"])
    assert n == 393216
    report = (tmp_path / "fit" / "report.md").read_text()
    section = report.split("## Comparison with the sweep")[1].split("## ")[0]
    table = [line for line in section.splitlines() if line.startswith("| mL2d128")]
    assert len(table) == 2  # t = 16000 with b (D 16500), t = 64000 with a (D 62000); c: other N; d, e: no match
    assert "| 16,000 | 8 | [8, 16) | b | 16,500 | 6 | 1.33 |" in table[0]
    assert "| 64,000 | 16 | [16, 32) | a | 62,000 | 20.5 [15, 30] | 0.78 |" in table[1]
    assert "whole run of D tokens" in section  # what is compared with what


def test_forecast_ramp_from_the_fitted_curve(branched_fit, capsys):
    _, out = branched_fit
    capsys.readouterr()
    assert forecast_main(["--ramp", "--curve", str(out / "cbs_curve.csv"), "--tokens", "64000", "--gpus", "1",
                          "--micro-batch", "4"]) == 0
    text = capsys.readouterr().out
    # knots (8064, 4), (16000, 8), (64000, 16) (the incomplete point is skipped); CBS(t) crosses 8 at t = 16000,
    # 16 at 64000: batch 4 up to 16000 tokens (125 steps of 128), then 8 up to 64000 (48000 / 256 = 187.5 -> 188)
    assert "stage 1: global batch 4 (accumulation 1) from 0 to 16,000 tokens: 125 steps" in text
    assert "stage 2: global batch 8 (accumulation 2) from 16,000 to 64,000 tokens: 188 steps" in text
    assert "total 313 steps vs 500 at the fixed batch 4: 37.4% fewer steps" in text  # 1 - 313 / 500


def test_mixed_or_unfinished_branched_studies_exit_2_and_write_nothing(tmp_path, capsys):
    study = tmp_path / "study"
    runs = study_mod.plan(study_config(), study, study / "data")
    study_mod.write_run_inputs(runs, study)  # planned, nothing trained: only run.yaml files
    assert fit_main([str(study), "--out", str(tmp_path / "fit")]) == 2
    assert "no finished branch (16 branch run(s) without a final result.json)" in capsys.readouterr().err
    make_branched_study(tmp_path / "mixed")
    sweep_run = tmp_path / "mixed" / "runs" / "zz_sweep_run"
    sweep_run.mkdir()
    (sweep_run / "config.yaml").write_text(yaml.safe_dump({"global_batch_seqs": 4, "study": {"method": "sweep"}}))
    assert fit_main([str(tmp_path / "mixed"), "--out", str(tmp_path / "fit")]) == 2
    assert "zz_sweep_run/config.yaml: study.method is 'sweep' in a branched study directory" in \
        capsys.readouterr().err
    first = tmp_path / "mixed" / "runs" / "a_sweep_run"  # read first: the directory is taken for a sweep
    sweep_run.rename(first)
    assert fit_main([str(tmp_path / "mixed"), "--out", str(tmp_path / "fit")]) == 2
    assert "study.method is 'branched' in a directory read as a sweep study" in capsys.readouterr().err
    assert not (tmp_path / "fit").exists()


def test_merrill_rule_is_the_study_default_with_an_interval_under_eval_noise(tmp_path):
    """A study planned with the defaults records rule absolute and epsilon 0.01 nats; the fit estimates the eval
    noise from the base run's eval curve and gives the interval under it. At t = 64000, 3.11 is 0.03 nats above
    3.08: within 1% (the relative rule passes 16), not within 0.01 nats plus the allowance (2.4% x 0.2%)."""
    study = make_branched_study(tmp_path / "study", eval_sigma=0.002, rule="absolute")
    config = yaml.safe_load(next((study / "runs").glob("*_b16/run.yaml")).read_text())
    assert (config["study"]["branch"]["rule"], config["study"]["branch"]["epsilon_nats"]) == ("absolute", 0.01)
    assert fit_main([str(study), "--out", str(tmp_path / "fit")]) == 0
    rows = {int(r["tokens"]): r for r in read_csv(tmp_path / "fit" / "cbs_curve.csv")}
    got = {t: (r["cbs"], r["cbs_low"], r["cbs_high"], r["rule"]) for t, r in rows.items()}
    assert got == {8064: ("4", "4", "8", "absolute"), 16000: ("8", "8", "16", "absolute"),
                   32000: ("", "8", "", "absolute"), 64000: ("8", "8", "16", "absolute")}
    assert float(rows[64000]["eval_noise"]) == pytest.approx(0.002, rel=0.35)
    low, high = float(rows[16000]["cbs_noise_low"]), float(rows[16000]["cbs_noise_high"])
    assert low <= 8 <= high and rows[32000]["cbs_noise_low"] == ""  # an incomplete point has none
    branches = read_csv(tmp_path / "fit" / "branches.csv")
    assert [b["verdict"] for b in branches if b["tokens"] == "32000"] == ["pass", "pass", "unfinished", "pending"]
    report = (tmp_path / "fit" / "report.md").read_text()
    assert "Rule absolute (Merrill et al.)" in report and "95% under eval noise" in report
    # the relative rule stays selectable; --eval-noise 0 turns the allowance and the interval off
    assert fit_main([str(study), "--out", str(tmp_path / "rel"), "--rule", "relative", "--eval-noise", "0"]) == 0
    rows = {int(r["tokens"]): r for r in read_csv(tmp_path / "rel" / "cbs_curve.csv")}
    assert (rows[64000]["cbs"], rows[64000]["rule"], rows[64000]["cbs_noise_low"]) == ("16", "relative", "")


@pytest.mark.parametrize("flag, value", [("--epsilon", "-0.1"), ("--eval-noise", "nan")])
def test_bad_rule_options_exit_2_naming_the_flag(tmp_path, flag, value, capsys):
    study = make_branched_study(tmp_path / "study")
    assert fit_main([str(study), "--out", str(tmp_path / "fit"), flag, value]) == 2
    assert flag in capsys.readouterr().err
