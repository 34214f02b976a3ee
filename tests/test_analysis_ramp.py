"""The batch ramp from CBS(t): stages and saved steps on hand-made curves (every number worked out by hand in the
comments), `cbs forecast --ramp` on a curve file and on a scaling.json law, and the bad inputs of the new flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cbs.analysis.cli import fit_main, forecast_main
from cbs.analysis.laws import fit_scaling_law, law_to_json
from cbs.analysis.ramp import batch_ramp, curve_from_law, curve_from_points, ladder_floor

CURVE_HEADER = "setting,tokens,cbs,cbs_low,cbs_high,complete,seq_len\n"


def stages(ramp) -> list[tuple]:
    return [(s.batch, round(s.start_tokens, 2), round(s.end_tokens, 2), s.steps) for s in ramp.stages]


def test_ladder_floor_keeps_a_cbs_that_is_exactly_on_the_ladder():
    assert [ladder_floor(c, 4) for c in (3.9, 4.0, 7.99, 8.0, 16.0, 31.9)] == [4, 4, 4, 8, 16, 16]
    assert ladder_floor(48.0, 3) == 48 and ladder_floor(47.9, 3) == 24


def test_ramp_on_a_rising_curve():
    # CBS(t) through (100, 4) and (400, 16): log-log slope 1, so CBS = 8 at t = 200; flat 4 before 100, 16 after 400.
    # Unit 4, T = 1, D = 800: batch 4 to 200 (50 steps), 8 to 400 (200 / 8 = 25), 16 to 800 (400 / 16 = 25):
    # 100 steps; a fixed batch 4 takes 800 / 4 = 200; 50% saved
    ramp = batch_ramp(curve_from_points([(100, 4), (400, 16)], "hand"), 800, 4, 1)
    assert stages(ramp) == [(4, 0, 200, 50), (8, 200, 400, 25), (16, 400, 800, 25)]
    assert (ramp.steps, ramp.fixed_steps, ramp.saved) == (100, 200, 0.5)
    # against a fixed batch 8 instead: 800 / 8 = 100 steps, nothing saved
    assert batch_ramp(curve_from_points([(100, 4), (400, 16)], "hand"), 800, 4, 1, fixed_batch=8).saved == 0.0


def test_a_dip_in_cbs_holds_the_batch_instead_of_lowering_it():
    # (100, 4), (200, 16), (400, 8), (800, 32): CBS = 8 at t = 100 sqrt 2 = 141.42 (slope 2), 16 only at t = 200
    # and again at 400 sqrt 2 = 565.69 (slope 2). The ramp cannot use 16 at t = 200 and drop back to 8: it stays at
    # 8 from 141.42 to 565.69. Steps as training counts them (a stage starts where the one before ended; a boundary
    # u acts as ceil(u)): ceil(142 / 4) = 36 (to 144 tokens), ceil((566 - 144) / 8) = 53 (to 568),
    # ceil((800 - 568) / 16) = 15 (to 808), ceil((1000 - 808) / 32) = 6; 110 against ceil(1000 / 4) = 250
    curve = curve_from_points([(100, 4), (200, 16), (400, 8), (800, 32)], "hand")
    ramp = batch_ramp(curve, 1000, 4, 1)
    assert stages(ramp) == [(4, 0, 141.42, 36), (8, 141.42, 565.69, 53), (16, 565.69, 800, 15), (32, 800, 1000, 6)]
    assert ramp.steps == 110 and ramp.fixed_steps == 250 and ramp.saved == pytest.approx(1 - 110 / 250)
    for t in np.geomspace(1, 999, 400):  # never above CBS(t), never decreasing
        b = next(s.batch for s in ramp.stages if s.start_tokens <= t < s.end_tokens)
        assert b <= curve.at(t) + 1e-9
    assert [s.batch for s in ramp.stages] == sorted(s.batch for s in ramp.stages)


def test_ramp_from_a_power_law_starts_at_the_unit_below_it():
    # CBS = 0.5 t^0.5 crosses 3, 6, 12, 24 (unit 3) at t = 36, 144, 576, 2304; below 3 until t = 36 the ramp runs
    # at 3 anyway. T = 7, D = 5000, each stage from where the one before ended: ceil(144 / 21) = 7 (to 147),
    # ceil((576 - 147) / 42) = 11 (to 609), ceil((2304 - 609) / 84) = 21 (to 2373), ceil((5000 - 2373) / 168) = 16:
    # 55 steps against ceil(5000 / 21) = 239
    ramp = batch_ramp(curve_from_law(0.5, 0.5, "law"), 5000, 3, 7)
    assert stages(ramp) == [(3, 0, 144, 7), (6, 144, 576, 11), (12, 576, 2304, 21), (24, 2304, 5000, 16)]
    assert ramp.below_unit_until == pytest.approx(36) and (ramp.steps, ramp.fixed_steps) == (55, 239)


def test_a_flat_curve_gives_one_stage_and_saves_nothing():
    ramp = batch_ramp(curve_from_points([(1000, 20)], "one point"), 5000, 4, 2)
    assert stages(ramp) == [(16, 0, 5000, 157)] and ramp.saved == 0.0  # ceil(5000 / 32)


def _curve_file(tmp: Path, rows: str) -> Path:
    path = tmp / "cbs_curve.csv"
    path.write_text(CURVE_HEADER + rows)
    return path


def test_forecast_ramp_reads_a_curve_and_skips_points_without_a_cbs(tmp_path, capsys):
    # the incomplete point (empty cbs) at t = 250 would otherwise bend the curve; seq_len 1 comes from the file
    path = _curve_file(tmp_path, "s,100,4,4,8,1,1\ns,250,,4,,0,1\ns,400,16,16,inf,1,1\nother,100,64,64,128,1,1\n")
    assert forecast_main(["--ramp", "--curve", str(path), "--setting", "s", "--tokens", "800", "--gpus", "2",
                          "--micro-batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "stage 1: global batch 4 (accumulation 1) from 0 to 200 tokens: 50 steps" in out
    assert "stage 3: global batch 16 (accumulation 4) from 400 to 800 tokens: 25 steps" in out
    assert "total 100 steps vs 200 at the fixed batch 4: 50.0% fewer steps" in out
    assert "measured up to t = 400 tokens and held flat beyond" in out


def test_forecast_ramp_from_the_law_in_d(tmp_path, capsys):
    law = law_to_json(fit_scaling_law([36.0, 144.0, 576.0], [3.0, 6.0, 12.0], "tokens"))  # CBS = 0.5 D^0.5
    (tmp_path / "scaling.json").write_text(json.dumps({"version": 2, "seq_len": 7, "laws": {"tokens": law}}))
    assert forecast_main(["--ramp", "--scaling", str(tmp_path / "scaling.json"), "--tokens", "5000", "--gpus", "1",
                          "--micro-batch", "3", "--fixed-batch", "6"]) == 0
    out = capsys.readouterr().out
    assert "stage 4: global batch 24 (accumulation 8) from 2,304 to 5,000 tokens: 16 steps" in out
    # ceil(5000 / 42) = 120 steps at the fixed batch 6: 1 - 55 / 120 = 54.2%
    assert "total 55 steps vs 120 at the fixed batch 6: 54.2% fewer steps" in out
    assert "CBS(t) < 3 (one micro-batch on every GPU) up to 36 tokens" in out


@pytest.mark.parametrize("argv, message", [
    (["--ramp", "--tokens", "1e6"], "--ramp needs one of --curve"),
    (["--curve", "{curve}", "--tokens", "1e6"], "--curve goes with --ramp"),
    (["--tokens", "1e6"], "--scaling is required"),
    (["--ramp", "--curve", "{curve}", "--tokens", "1e6"], "holds settings a, b: choose one with --setting"),
    (["--ramp", "--curve", "{curve}", "--setting", "c", "--tokens", "1e6"], "--setting c: not in"),
    (["--ramp", "--curve", "{curve}", "--setting", "a", "--tokens", "1e6", "--fixed-batch", "0"],
     "--fixed-batch must be >= 1"),
    (["--ramp", "--curve", "{curve}", "--setting", "b", "--tokens", "1e6"], "no point with a CBS"),
    (["--ramp", "--curve", "{missing}", "--tokens", "1e6"], "no such file"),
])
def test_bad_ramp_input_exits_2_with_one_line(argv, message, tmp_path, capsys):
    curve = _curve_file(tmp_path, "a,100,4,4,8,1,1\nb,100,,,,0,1\n")
    argv = [a.format(curve=curve, missing=tmp_path / "nope.csv") for a in argv]
    assert forecast_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_branched_flags_are_refused_on_a_sweep_and_a_bad_tolerance(tmp_path, capsys):
    (tmp_path / "steps.csv").write_text("setting,model_params,tokens,batch_size,steps\n" +
                                        "".join(f"s,1000,5000,{b},{100 * (1 + 64 / b)}\n" for b in (8, 16, 32, 64)))
    assert fit_main([str(tmp_path / "steps.csv"), "--out", str(tmp_path / "fit"), "--compare", "x"]) == 2
    assert "--compare is for a branched study" in capsys.readouterr().err
    assert fit_main([str(tmp_path / "steps.csv"), "--out", str(tmp_path / "fit"), "--tolerance", "1.5"]) == 2
    assert "--tolerance must be a number in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "fit").exists()
