"""evaluate: checkpoints of 1-rank ZeRO-1 and 2-rank ZeRO-3 runs give the eval losses pretrain logged."""

from __future__ import annotations

import json
import subprocess

import pytest

from cbs.pipeline import evaluate, pretrain
from test_pretrain import ENV, ROOT, SEQ, cli, make_cfg, run_subprocess, series, torchrun, write_cfg


def assert_matches_log(result: dict, run_dir, step: int) -> None:
    raw, ewa = series(run_dir, "eval/loss"), series(run_dir, "eval/loss_ewa/0.9")
    assert result["step"] == step
    assert result["weights"]["raw"]["loss"] == pytest.approx(raw[step], abs=1e-5)
    assert result["weights"]["ewa/0.9"]["loss"] == pytest.approx(ewa[step], abs=1e-5)
    assert abs(raw[step] - ewa[step]) > 1e-3  # the two weight sets really differ, so both are checked


def test_zero1_checkpoints_match_logged_eval(stdlib_data, tmp_path):
    run = tmp_path / "run"
    pretrain.main(make_cfg(stdlib_data, run, train_tokens=8 * SEQ * 20))
    latest = evaluate.main(run)
    assert_matches_log(latest, run, 20)
    assert json.loads((run / "eval.json").read_text()) == latest
    earlier = evaluate.main(run, checkpoint="10", out=tmp_path / "e10.json")
    assert_matches_log(earlier, run, 10)
    assert json.loads((tmp_path / "e10.json").read_text())["checkpoint"] == "step00000010"
    fewer = evaluate.main(run, eval_tokens=4 * SEQ, out=tmp_path / "few.json")
    assert fewer["eval_sequences"] == 4 and fewer["weights"]["raw"]["perplexity"] > 1


def test_zero3_two_rank_checkpoint_evaluates_in_one_process(stdlib_data, tmp_path):
    run = tmp_path / "run"
    cfg = make_cfg(stdlib_data, run, train_tokens=8 * SEQ * 20, deepspeed_config="zero3.json")
    run_subprocess(torchrun(2, "pretrain", str(write_cfg(cfg, tmp_path / "c.yaml"))))
    assert_matches_log(evaluate.main(run), run, 20)  # EWA shards of both ranks put back together


def test_bad_run_dir_and_checkpoint_are_clear_errors(stdlib_data, tmp_path):
    proc = subprocess.run(cli("evaluate", str(tmp_path / "nope")), capture_output=True, text=True, env=ENV,
                          cwd=ROOT)
    assert proc.returncode == 2 and "is not a pretrain run directory" in proc.stderr
    run = tmp_path / "run"
    pretrain.main(make_cfg(stdlib_data, run, train_tokens=8 * SEQ * 10))
    proc = subprocess.run(cli("evaluate", str(run), "--checkpoint", "7"), capture_output=True, text=True,
                          env=ENV, cwd=ROOT)
    assert proc.returncode == 2 and "no checkpoint at step 7 (steps saved: 10)" in proc.stderr
