"""`cbs fit` on ramp and fixed runs (cbs/analysis/ramp_compare.py), on hand-made run directories whose every number is
worked out in the comments: steps, tokens and seconds to the target, measured and predicted saving."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from cbs.analysis.cli import fit_main
from cbs.analysis.ramp_compare import read_ramp_runs, seconds_to


def write_run(root: Path, name: str, config: dict, crossing: dict | None, lines: list[dict]) -> None:
    run = root / "runs" / name
    run.mkdir(parents=True)
    base = {"model": {"seq_len": 10}, "targets": [3.0], "batch_schedule": None, "global_batch_seqs": None}
    (run / "config.yaml").write_text(yaml.safe_dump({**base, **config}))
    target = {"loss": 3.0, "raw": None, "ewa": {"0.9": crossing}}
    (run / "result.json").write_text(json.dumps({"status": "completed", "targets": [target]}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))


def make_study(root: Path) -> Path:
    # fixed batch 4 (T = 10): target at step 100 = 4000 tokens; 100 tokens/s: 40 s
    write_run(root, "fixed4", {"global_batch_seqs": 4}, {"step": 100, "tokens": 4000, "step_interp": 100.0,
              "tokens_interp": 4000.0}, [{"step": 50, "tokens": 2000, "perf/tokens_per_s": 100.0},
                                         {"step": 100, "tokens": 4000, "perf/tokens_per_s": 100.0,
                                          "eval/loss_ewa/0.9": 2.9}])
    # the ramp: batch 4 while < 1000 tokens (25 steps), then 8. Over the fixed run's 4000 tokens its schedule
    # takes 25 + ceil(3000 / 80) = 63 steps: predicted 1 - 63 / 100 = 37% saved. It reached the target at step
    # 70 (25 + 45 x 80 = 4600 tokens): 30% measured. Seconds: 2000 tokens at 100/s + 2600 at 200/s = 33
    stages = [{"batch": 4, "until_tokens": 1000}, {"batch": 8}]
    write_run(root, "ramp", {"batch_schedule": {"stages": stages}, "resolved": {"batch_stages": stages}},
              {"step": 70, "tokens": 4600, "step_interp": 70.0, "tokens_interp": 4600.0},
              [{"step": 50, "tokens": 2000, "perf/tokens_per_s": 100.0},
               {"step": 70, "tokens": 4600, "perf/tokens_per_s": 200.0, "eval/loss_ewa/0.9": 2.95},
               {"step": 80, "tokens": 5400, "perf/tokens_per_s": 200.0}])
    # fixed batch 8 never reached it
    write_run(root, "fixed8", {"global_batch_seqs": 8}, None, [{"step": 10, "tokens": 800, "perf/tokens_per_s": 1.0}])
    return root


def test_steps_tokens_seconds_and_savings_worked_by_hand(tmp_path):
    cmp = read_ramp_runs(make_study(tmp_path))
    runs = {r.name: r for r in cmp.runs}
    assert cmp.target == 3.0 and cmp.first.name == "fixed4"
    assert (runs["ramp"].steps, runs["ramp"].tokens, runs["ramp"].seconds) == (70.0, 4600.0, pytest.approx(33.0))
    assert runs["fixed4"].seconds == pytest.approx(40.0) and runs["fixed8"].steps is None
    measured, predicted = cmp.saving(runs["ramp"])
    assert measured == pytest.approx(0.30) and predicted == pytest.approx(0.37)


def test_seconds_to_a_count_inside_the_first_window():
    assert seconds_to(500, [{"tokens": 1000, "perf/tokens_per_s": 50.0}]) == pytest.approx(10.0)
    assert seconds_to(5000, [{"tokens": 1000, "perf/tokens_per_s": 50.0}]) is None  # past the log
    # a run that stopped at the target between two logs: the last throughput carried on up to what it trained
    assert seconds_to(1500, [{"tokens": 1000, "perf/tokens_per_s": 50.0}], trained=1600) == pytest.approx(30.0)
    assert seconds_to(1700, [{"tokens": 1000, "perf/tokens_per_s": 50.0}], trained=1600) is None


def test_cbs_fit_writes_the_table_report_and_figure(tmp_path, capsys):
    make_study(tmp_path / "study")
    assert fit_main([str(tmp_path / "study"), "--out", str(tmp_path / "fit")]) == 0
    rows = {r["run"]: r for r in csv.DictReader((tmp_path / "fit" / "ramp.csv").open())}
    assert rows["ramp"]["batches"] == "4->8" and rows["ramp"]["predicted_steps_saved"] == "0.37"
    assert rows["ramp"]["steps_saved_vs_first"] == "0.3" and rows["fixed8"]["reached"] == "0"
    report = (tmp_path / "fit" / "report.md").read_text()
    assert "| ramp | 4->8 | 70 | 4,600 | 33.0 | 30.0% / 37.0% |" in report
    assert (tmp_path / "fit" / "figures" / "ramp_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_several_seeds_pair_each_ramp_with_its_seed_and_report_the_spread(tmp_path):
    stages = [{"batch": 4, "until_tokens": 1000}, {"batch": 8}]
    ramp = {"batch_schedule": {"stages": stages}, "resolved": {"batch_stages": stages}}
    for seed, fixed_steps, ramp_steps in ((1, 100, 70), (2, 80, 60)):  # saved 30% and 25%
        write_run(tmp_path, f"fixed4_s{seed}", {"global_batch_seqs": 4, "seed": seed},
                  {"step": fixed_steps, "tokens": 40 * fixed_steps}, [])
        write_run(tmp_path, f"ramp_s{seed}", {**ramp, "seed": seed}, {"step": ramp_steps, "tokens": 5000}, [])
    cmp = read_ramp_runs(tmp_path)
    runs = {r.name: r for r in cmp.runs}
    assert cmp.saving(runs["ramp_s1"])[0] == pytest.approx(0.30) and cmp.saving(runs["ramp_s2"])[0] == \
        pytest.approx(0.25)
    # predicted for seed 2 from its own fixed run: 3200 tokens -> 25 + ceil(2200 / 80) = 53 of 80 steps
    assert cmp.saving(runs["ramp_s2"])[1] == pytest.approx(1 - 53 / 80)
    from cbs.analysis.ramp_compare import ramp_report

    # t_{1, 0.975} = 12.706, s = 0.0354: 27.5% -+ 12.706 x 0.0354 / sqrt(2) = -+ 31.8%
    assert ("Measured steps saved over 2 seeds: mean 27.5%, range 25.0% to 30.0%, 95% interval of the mean "
            "-4.3% to 59.3%.") in ramp_report(cmp)


def test_one_table_per_target_a_study_shares(tmp_path):
    """Two settings (targets 3.0 and 2.5): a table and ramp.csv rows for each, the first reached first."""
    for name, config in (("fixed4", {"global_batch_seqs": 4}), ("ramp", {"batch_schedule": {"stages": [{"batch": 4}]},
                                                                      "resolved": {"batch_stages": [{"batch": 4}]}})):
        run = tmp_path / "study" / "runs" / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"model": {"seq_len": 10}, "targets": [2.5, 3.0],
                                                         "batch_schedule": None, **config}))
        targets = [{"loss": loss, "ewa": {"0.9": {"step": step, "tokens": 40 * step}}}
                   for loss, step in ((2.5, 90), (3.0, 50))]
        (run / "result.json").write_text(json.dumps({"status": "completed", "targets": targets}))
    assert fit_main([str(tmp_path / "study"), "--out", str(tmp_path / "fit")]) == 0
    rows = list(csv.DictReader((tmp_path / "fit" / "ramp.csv").open()))
    assert [(r["target_loss"], r["run"], r["steps"]) for r in rows] == [
        ("3", "fixed4", "50"), ("3", "ramp", "50"), ("2.5", "fixed4", "90"), ("2.5", "ramp", "90")]
    report = (tmp_path / "fit" / "report.md").read_text()
    assert report.index("target loss 3 ") < report.index("target loss 2.5 ") and report.count("ramp_loss.png") == 1


def test_branched_only_flags_are_refused_on_a_ramp_study(tmp_path, capsys):
    """--rule, --compare and the like were silently ignored on a ramp study (its fit returned before the check)."""
    make_study(tmp_path / "study")
    assert fit_main([str(tmp_path / "study"), "--out", str(tmp_path / "fit"), "--rule", "relative"]) == 2
    assert "--rule is for a branched study" in capsys.readouterr().err
    assert not (tmp_path / "fit").exists()


def test_the_seed_interval_of_the_mean_covers_at_its_level():
    """Seeded draws of 4 seeds from N(0.3, 0.05): the 95% t interval covers the true mean in ~95% of them."""
    import numpy as np

    from cbs.analysis.ramp_compare import seed_interval

    rng = np.random.default_rng(0)
    covered = [lo <= 0.3 <= hi for lo, hi in (seed_interval(list(rng.normal(0.3, 0.05, 4))) for _ in range(2000))]
    assert 0.93 <= sum(covered) / len(covered) <= 0.97


def test_a_preempted_run_is_unfinished_not_a_run_that_missed_the_target(tmp_path):
    """A run stopped by a signal (result.json `preempted`, to be resumed) has not had its chance at the target.
    The ramp comparison read every run with a result.json, so a preempted fixed run showed as "not reached"; the
    sweep's fit already counted such a run as unfinished."""
    make_study(tmp_path)
    write_run(tmp_path, "fixed16", {"global_batch_seqs": 16}, None, [{"step": 5, "tokens": 800}])
    result = tmp_path / "runs" / "fixed16" / "result.json"
    result.write_text(json.dumps({**json.loads(result.read_text()), "status": "preempted"}))
    assert sorted(r.name for r in read_ramp_runs(tmp_path).runs) == ["fixed4", "fixed8", "ramp"]
