"""The batch schedule's arithmetic (cbs/analysis/batch_schedule.py), worked out by hand, against a brute-force
step-by-step count, and its file as `cbs forecast --ramp --out` writes it and pretrain reads it."""

from __future__ import annotations

import itertools

import pytest

from cbs.analysis.batch_schedule import (BatchSchedule, ScheduleError, Stage, parse_stages, read_schedule_file,
                                         write_schedule_file)
from cbs.analysis.cli import forecast_main


def brute_force(stages: list[Stage], seq_len: int, steps: int) -> list[tuple[int, int]]:
    """(batch, tokens before) of each step, by walking the definition one step at a time."""
    out, tokens = [], 0
    for _ in range(steps):
        batch = next(s.batch for s in stages if s.until_tokens is None or tokens < s.until_tokens)
        out.append((batch, tokens))
        tokens += batch * seq_len
    return out


def test_hand_worked_ramp():
    # T = 10: batch 2 while < 45 tokens: steps at 0, 20, 40 (3 steps, to 60); batch 4 while < 100: 60 -> 100
    # (1 step); batch 8 to the end. 300 tokens: 100 + 80 k >= 300 -> k = 3: 7 steps
    s = BatchSchedule([Stage(2, 45), Stage(4, 100), Stage(8)], 10)
    assert [s.batch_at(i) for i in range(7)] == [2, 2, 2, 4, 8, 8, 8]
    assert [s.tokens_before(i) for i in range(8)] == [0, 20, 40, 60, 100, 180, 260, 340]
    assert s.total_steps(300) == 7 and s.stage_steps(300) == [3, 1, 3]
    assert [s.stage_of(i) for i in (0, 2, 3, 4, 9)] == [0, 0, 1, 2, 2]
    assert s.steps_for(0) == 0 and s.steps_for(1) == 1 and s.steps_for(60) == 3 and s.steps_for(61) == 4


def test_a_stage_skipped_when_the_one_before_overshoots_its_end():
    # batch 4 (T = 1) while < 3: one step to 4 tokens, already past stage 2's end (4): stage 2 trains 0 steps
    s = BatchSchedule([Stage(4, 3), Stage(6, 4), Stage(8)], 1)
    assert [s.batch_at(i) for i in range(3)] == [4, 8, 8] and s.stage_steps(20) == [1, 0, 2]


def test_fixed_batch_is_the_old_arithmetic():
    s = BatchSchedule.fixed(6, 16)
    for step, tokens in itertools.product(range(0, 50, 7), range(0, 5000, 333)):
        assert s.tokens_before(step) == step * 96 and s.batch_at(step) == 6
        assert s.steps_for(tokens) == -(-tokens // 96)


@pytest.mark.parametrize("stages, seq_len", [
    ([Stage(1, 7), Stage(3, 50), Stage(4, 51), Stage(16)], 3),
    ([Stage(5, 1), Stage(5, 99), Stage(10)], 1),
    ([Stage(2, 1000), Stage(64)], 8),
])
def test_against_a_step_by_step_walk(stages, seq_len):
    s, walk = BatchSchedule(stages, seq_len), brute_force(stages, seq_len, 80)
    assert [(s.batch_at(i), s.tokens_before(i)) for i in range(80)] == walk
    for tokens in range(0, walk[-1][1], 7):  # steps_for: the first step count with tokens_before >= tokens
        assert s.steps_for(tokens) == next(n for n in range(81) if s.tokens_before(n) >= tokens)
    assert sum(s.stage_steps(walk[-1][1])) == s.total_steps(walk[-1][1])


@pytest.mark.parametrize("data, key, words", [
    ([{"batch": 8, "until_tokens": 100}, {"batch": 4}], "stages[1].batch", "never decreases"),
    ([{"batch": 4}, {"batch": 8}], "stages[0].until_tokens", "only the last stage"),
    ([{"batch": 4, "until_tokens": 100}, {"batch": 8, "until_tokens": 90}, {"batch": 16}], "stages[1].until_tokens",
     "must be above"),
    ([{"batch": 4, "until_tokens": 1000}, {"batch": 8}], "stages[0].until_tokens", "beyond the budget"),
    ([{"batch": 0}], "stages[0].batch", ">= 1"),
    ([{"batch": 4, "until": 3}], "stages[0]", "mapping"),
    ([], "stages", "non-empty"),
])
def test_bad_stages_name_the_key(data, key, words):
    with pytest.raises(ScheduleError, match=words) as e:
        parse_stages(data, train_tokens=1000)
    assert e.value.key == key


def test_forecast_writes_the_file_pretrain_reads_with_the_steps_it_predicted(tmp_path, capsys):
    curve = tmp_path / "cbs_curve.csv"
    curve.write_text("setting,tokens,cbs,cbs_low,cbs_high,complete,seq_len\ns,100,4,4,8,1,1\ns,400,16,16,inf,1,1\n")
    out = tmp_path / "ramp.yaml"
    assert forecast_main(["--ramp", "--curve", str(curve), "--tokens", "800", "--micro-batch", "4",
                          "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    stages = parse_stages(read_schedule_file(out), train_tokens=800)
    assert stages == [Stage(4, 200), Stage(8, 400), Stage(16)]
    assert BatchSchedule(stages, 1).total_steps(800) == 100  # the 100 steps test_ramp_on_a_rising_curve plans


def test_a_file_that_is_not_a_schedule(tmp_path):
    (tmp_path / "x.yaml").write_text("stages: [{batch: 4}]\n")
    with pytest.raises(ScheduleError, match="format: cbs-batch-schedule/1"):
        read_schedule_file(tmp_path / "x.yaml")
    with pytest.raises(ScheduleError, match="cannot read"):
        read_schedule_file(tmp_path / "missing.yaml")
    write_schedule_file(tmp_path / "y.yaml", [Stage(2, 10), Stage(4, 99)], {"tokens": 99})
    assert read_schedule_file(tmp_path / "y.yaml") == [{"batch": 2, "until_tokens": 10}, {"batch": 4}]
