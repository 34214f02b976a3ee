"""AdamW beta rules per batch for a study's runs and a ramp's stages: paper, fixed, half_life.

half_life: beta(B) = clip(ref ** (B / ref_batch), lo, hi) keeps the token half-life of the moment averages
constant across batches (Marek et al. 2025). Checked on known values, in the planned runs' configs (the value and
the rule each run records), in a ramp's stages, and on bad input through the CLI (exit 2, the key named).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import yaml

from cbs.pipeline import study, study_plan
from cbs.pipeline.config import (PAPER_BETA2, BatchScheduleConfig, ConfigError, HalfLifeBetas, PretrainConfig,
                                 from_dict, half_life_beta, paper_value)
from test_pretrain import ENV, ROOT
from test_study import BASE, study_cfg


def test_half_life_formula_known_values():
    assert half_life_beta(64, 0.999, 64, 0.95, 0.9999) == 0.999  # at the reference batch: the reference value
    assert half_life_beta(128, 0.999, 64, 0.0, 0.99999) == pytest.approx(0.999 ** 2)
    assert half_life_beta(32, 0.999, 64, 0.0, 0.99999) == pytest.approx(math.sqrt(0.999))
    assert half_life_beta(1, 0.999, 64, 0.95, 0.9999) == 0.9999  # clipped at hi
    assert half_life_beta(16384, 0.999, 64, 0.95, 0.9999) == 0.95  # 0.999^256 = 0.774, clipped at lo
    # the half-life in tokens, B T ln(1/2) / ln(beta), is the same at every unclipped batch
    T = 512
    half = [b * T * math.log(0.5) / math.log(half_life_beta(b, 0.999, 64, 0.0, 0.99999)) for b in (32, 64, 256, 1024)]
    assert max(half) == pytest.approx(min(half), rel=1e-9) and half[0] == pytest.approx(64 * T * 692.8, rel=1e-3)


def test_default_half_life_tracks_the_papers_table():
    h = HalfLifeBetas()
    assert [h.at("beta2", b) for b in (64, 128, 256, 512)] == [0.999, 0.998001, 0.996006, 0.992028]
    assert all(abs(h.at("beta2", b) - paper_value(PAPER_BETA2, b)) <= 0.006 for b in (64, 128, 256, 512, 1024))
    assert [h.at("beta1", b) for b in (16, 64, 512)] == [0.987259, 0.95, 0.9]
    assert h.describe("beta2") == "beta2(B) = clip(0.999^(B/64), 0.95, 0.9999)"


def _optim(run) -> tuple[float, float]:
    return run.config["optimizer"]["beta1"], run.config["optimizer"]["beta2"]


def test_each_run_records_its_betas_and_the_rule(tmp_path):
    half = {"ref_batch": 8, "beta2_ref": 0.99, "beta2_clip": [0.9, 0.999], "beta1_ref": 0.9, "beta1_clip": [0.8, 0.95]}
    cfg = study_cfg(hparams={"beta2_rule": "half_life", "beta1_rule": "half_life", "half_life": half})
    runs = {r.batch: r for r in study.plan(cfg, tmp_path, tmp_path / "data")}
    assert {b: _optim(r) for b, r in runs.items()} == {
        4: (0.948683, 0.994987), 8: (0.9, 0.99), 16: (0.81, 0.9801)}
    record = runs[16].config["study"]["betas"]
    assert record["beta1_rule"] == record["beta2_rule"] == "half_life" and record["half_life"] == half
    assert record["formula"] == ("beta1(B) = clip(0.9^(B/8), 0.8, 0.95); beta2(B) = clip(0.99^(B/8), 0.9, 0.999)")
    # the run's pretrain config validates with them, and its config.yaml is this dict
    assert from_dict(PretrainConfig, runs[16].config, "pretrain").optimizer.beta2 == 0.9801
    # the paper's rule (the default) and fixed values
    paper = {r.batch: r for r in study.plan(study_cfg(batch_sizes=[64, 512, 4096], base={**BASE,
                                                                                         "micro_batch_seqs": 32}),
                                            tmp_path, tmp_path / "data")}
    assert {b: _optim(r) for b, r in paper.items()} == {64: (0.95, 0.999), 512: (0.95, 0.99), 4096: (0.95, 0.95)}
    assert paper[64].config["study"]["betas"] == {"beta1_rule": "fixed", "beta2_rule": "paper"}
    fixed = study.plan(study_cfg(hparams={"beta2": [0.98, 0.99]}, base={**BASE, "optimizer": {"beta1": 0.9}}),
                       tmp_path, tmp_path / "data")
    assert {_optim(r) for r in fixed} == {(0.9, 0.98), (0.9, 0.99)}
    assert fixed[0].config["study"]["betas"] == {"beta1_rule": "fixed", "beta2_rule": "fixed"}
    assert "beta1 0.9, beta2 0.98" in study_plan.plan_table(cfg, fixed, 4)


def test_a_ramp_takes_the_half_life_beta2_at_each_stage(tmp_path):
    schedule = from_dict(BatchScheduleConfig, {"stages": [{"batch": 64, "until_tokens": 1000}, {"batch": 256}],
                                               "beta2": "half_life"}, "pretrain.batch_schedule")
    assert [schedule.beta2_at(b, 0.5) for b in (64, 256)] == [0.999, 0.996006]
    cfg = study_cfg(method="ramp", batch_sizes=[4, 16], ramp={"stages": [{"batch": 4, "until_tokens": 4096},
                                                                         {"batch": 16}], "beta2": "half_life"})
    runs = study.plan(cfg, tmp_path, tmp_path / "data")
    ramp = next(r for r in runs if r.schedule)
    assert ramp.config["batch_schedule"]["beta2"] == "half_life"
    assert {r.batch: r.beta2 for r in runs if not r.schedule} == {4: 0.9999, 16: 0.99975}  # 4: clipped at hi
    assert ramp.config["study"]["betas"]["beta2_rule"] == "half_life"


@pytest.mark.parametrize("hparams, message", [
    ({"beta2_rule": "table"}, r"study\.hparams\.beta2_rule must be one of 'paper', 'fixed', 'half_life': got "
                              r"'table'"),
    ({"beta1_rule": "adaptive"}, r"study\.hparams\.beta1_rule must be one of"),
    ({"half_life": {"beta2_clip": [0.95, 1.0]}}, r"study\.hparams\.half_life\.beta2_clip must be \[lo, hi\] with "
                                                 r"0 <= lo <= hi < 1: got \[0\.95, 1\.0\]"),
    ({"half_life": {"beta1_clip": [0.99, 0.9]}}, r"study\.hparams\.half_life\.beta1_clip must be \[lo, hi\]"),
    ({"half_life": {"beta2_ref": 1.0}}, r"study\.hparams\.half_life\.beta2_ref must be in \[0, 1\): got 1\.0"),
    ({"half_life": {"ref_batch": 0}}, r"study\.hparams\.half_life\.ref_batch must be a batch >= 1"),
    ({"beta2": [0.99], "beta2_rule": "half_life"}, r"study\.hparams\.beta2 is given but study\.hparams\.beta2_rule "
                                                   r"is half_life: remove hparams\.beta2, or set beta2_rule: fixed"),
    ({"beta2_rule": "fixed"}, r"study\.hparams\.beta2_rule is fixed: give the values in study\.hparams\.beta2"),
])
def test_bad_beta_rules_are_named(hparams, message):
    with pytest.raises(ConfigError, match=message):
        study_cfg(hparams=hparams)


def test_beta1_in_base_with_a_per_batch_rule_is_refused():
    with pytest.raises(ConfigError, match=r"study\.base\.optimizer\.beta1 is set but study\.hparams\.beta1_rule is "
                                          r"half_life.*set hparams\.beta1_rule: fixed"):
        study_cfg(hparams={"beta1_rule": "half_life"}, base={**BASE, "optimizer": {"beta1": 0.9}})


def test_bad_rule_through_the_cli_exits_2(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"data": str(tmp_path / "nodata"), "batch_sizes": [4, 8],
                                    "settings": [{"model": "tiny", "train_tokens": 20000}],
                                    "hparams": {"half_life": {"beta2_clip": [0.9, 1.5]}}}))
    proc = subprocess.run([sys.executable, "-m", "cbs.pipeline.cli", "study", str(path), "--out",
                           str(tmp_path / "out"), "--dry-run"], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert proc.returncode == 2 and "study.hparams.half_life.beta2_clip must be [lo, hi]" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_the_fit_report_states_the_rule_and_the_values(tmp_path):
    """The report's Method section reads each run's config.yaml: the rules and the betas per batch."""
    from pathlib import Path

    from cbs.analysis.report import _beta_lines
    from cbs.analysis.steps import RunInfo, StepsTable, _betas

    cfg = study_cfg(hparams={"beta2_rule": "half_life"})
    infos = [RunInfo(r.name, Path(r.name), r.batch, 1, (1,), betas=_betas(r.config))
             for r in study.plan(cfg, tmp_path, tmp_path / "data")]
    line, = _beta_lines(StepsTable(points=[], source="s", input_kind="study", runs=infos))
    assert line == ("- AdamW betas per batch: beta1 fixed, beta2 half_life (beta2(B) = clip(0.999^(B/64), 0.95, "
                    "0.9999)); beta1/beta2 at each batch: B 4: 0.95/0.9999, B 8: 0.95/0.999875, B 16: 0.95/0.99975.")
    assert _beta_lines(StepsTable(points=[], source="s", input_kind="study",
                                  runs=[RunInfo("old", Path("old"), 4, 1, (1,))])) == []


def test_a_ramp_sets_the_half_life_beta2_in_the_engine_at_each_stage(stdlib_data, tmp_path):
    """In a real DeepSpeed engine: each stage's optimizer groups get the half-life beta2 of its batch, and
    config.yaml's stages record it."""
    from cbs.pipeline import pretrain
    from cbs.pipeline.distributed import init_distributed
    from test_pretrain import SEQ, make_cfg

    stages = [{"batch": 4, "until_tokens": 4 * SEQ * 2}, {"batch": 16}]
    cfg = make_cfg(stdlib_data, tmp_path / "run", global_batch_seqs=None, micro_batch_seqs=4,
                   train_tokens=16 * SEQ * 4,
                   batch_schedule={"stages": stages, "beta2": "half_life", "half_life": {"ref_batch": 4,
                                                                                          "beta2_ref": 0.99}})
    trainer = pretrain.Trainer(cfg, init_distributed(cfg.seed))
    seen = {}
    for step in (0, 2):
        trainer.stages.sync(step)
        seen[trainer.stages.batch] = {g["betas"] for g in trainer.engine.optimizer.param_groups}
    assert seen == {4: {(0.95, 0.99)}, 16: {(0.95, 0.960596)}}  # 0.99^(16/4)
    assert [s["beta2"] for s in trainer.stages.describe()] == [0.99, 0.960596]
