"""Time and cost to target (cbs/analysis/cost.py) on hand-made numbers, and throughput read from files."""

from __future__ import annotations

import json
import math

import pytest

from cbs.analysis.cost import (
    ThroughputModel, ThroughputPoint, cheapest, fastest, gpu_counts, hours_to_target, plan_rows,
    read_throughput_csv, run_tokens_per_s, time_rows,
)

# per-GPU throughput grows with the local batch b = B/G up to b = 8 (t = 2000 b tokens/s), then saturates
SATURATING = ThroughputModel((ThroughputPoint(None, 2, 1, 4_000.0), ThroughputPoint(None, 8, 1, 16_000.0),
                              ThroughputPoint(None, 64, 1, 16_000.0)))
STEPS = {16: 3000.0, 64: 1000.0, 128: 600.0}  # S(B) of one setting
SEQ_LEN = 512


def test_hours_to_target_arithmetic():
    # 1000 steps x 64 sequences x 512 tokens = 32,768,000 tokens at 100,000 tokens/s = 327.68 s
    assert hours_to_target(1000, 64, 512, 1e5) == pytest.approx(327.68 / 3600)


def test_throughput_model_measured_interpolated_and_clamped():
    model = ThroughputModel((ThroughputPoint(100, 64, 8, 80_000.0), ThroughputPoint(100, 256, 8, 200_000.0)))
    assert model.tokens_per_s(100, 64, 8) == (80_000.0, True)
    tps, measured = model.tokens_per_s(100, 128, 8)  # local 16: halfway in log between 8 (10k/GPU) and 32 (25k/GPU)
    assert not measured and tps == pytest.approx(8 * 10_000 * math.sqrt(2.5))
    # local 4, half the smallest measured: a step takes as long as at local 8, so half the tokens/s per GPU
    assert model.tokens_per_s(100, 64, 16)[0] == pytest.approx(16 * 10_000 / 2)
    assert model.tokens_per_s(100, 1024, 8)[0] == pytest.approx(8 * 25_000)  # local 128: held at the largest
    # another model size (a forecast): the same FLOP/s per GPU, so tokens/s scale as N_measured / N
    assert model.tokens_per_s(200, 64, 8) == (pytest.approx(40_000.0), False)
    assert SATURATING.tokens_per_s(None, 32, 8)[0] == pytest.approx(8 * 8_000)  # b = 4: t = 2000 x 4


def test_time_rows_fastest_and_cheapest_on_hand_made_numbers():
    rows = time_rows("s", None, STEPS, SATURATING, SEQ_LEN, budget=8)
    at = {(r.batch_size, r.gpus): r for r in rows}
    assert sorted(at) == [(b, g) for b in (16, 64, 128) for g in (1, 2, 4, 8)]
    # B=16: 48,000 sequences x 512 tokens; on 1 GPU b = 16 -> 16k tokens/s: 1536 s; on 2, 4, 8 GPUs 32k: 768 s
    assert at[16, 1].hours * 3600 == pytest.approx(1536) and at[16, 1].tokens == 16 * 3000 * 512
    for g in (2, 4, 8):
        assert at[16, g].hours * 3600 == pytest.approx(768) and at[16, g].gpu_hours * 3600 == pytest.approx(768 * g)
    # B=64 on 8 GPUs: b = 8 -> 128k tokens/s, 64,000 x 512 / 128k = 256 s; B=128 on 8: 76,800 x 512 / 128k = 307.2 s
    assert at[64, 8].hours * 3600 == pytest.approx(256) and at[128, 8].hours * 3600 == pytest.approx(307.2)
    best, low = fastest(rows), cheapest(rows)
    assert (best.batch_size, best.gpus) == (64, 8)
    assert (low.batch_size, low.gpus, low.gpu_hours * 3600) == (16, 2, pytest.approx(1536))  # tie with 1 GPU: faster
    small = fastest(time_rows("s", None, STEPS, SATURATING, SEQ_LEN, budget=2))  # a budget of 2 GPUs
    assert (small.batch_size, small.gpus, small.hours * 3600) == (16, 2, pytest.approx(768))
    assert fastest([]) is None and time_rows("s", None, STEPS, ThroughputModel(()), SEQ_LEN, 8) == []


def test_gpu_counts():
    assert gpu_counts(8) == [1, 2, 4, 8] and gpu_counts(12, 48) == [1, 2, 4, 8, 12]
    assert gpu_counts(64, 16) == [1, 2, 4, 8, 16] and gpu_counts(8, 12, extra=(3, 6, 24)) == [1, 2, 3, 4, 6]


def test_plan_rows_use_the_fitted_curve():
    rows = plan_rows("f", 500.0, 200.0, None, SATURATING, SEQ_LEN, budget=4, micro_batch=2, max_batch=64)
    assert {r.batch_size for r in rows} == {2, 4, 8, 16, 32, 64}
    assert all(r.batch_size % (2 * r.gpus) == 0 for r in rows)
    r = next(r for r in rows if (r.batch_size, r.gpus) == (32, 4))
    assert r.steps == pytest.approx(500 * (1 + 200 / 32)) and r.tokens_per_s == pytest.approx(4 * 16_000)


def test_metrics_jsonl_non_finite_strings_are_floats_and_skipped(tmp_path):
    """metrics.jsonl writes NaN/inf as "nan"/"inf"/"-inf": they are read as floats and left out of the median."""
    lines = [{"step": 10, "tokens": 100, "train/loss": 3.2, "perf/tokens_per_s": 1000.0},
             {"step": 20, "tokens": 200, "train/loss": "nan", "perf/tokens_per_s": "nan"},
             {"step": 20, "tokens": 200, "eval/loss": "inf"},
             {"step": 30, "tokens": 300, "perf/tokens_per_s": "inf"},
             {"step": 40, "tokens": 400, "perf/tokens_per_s": 3000.0},
             {"step": 50, "tokens": 500, "perf/tokens_per_s": "-inf"},
             {"step": 60, "tokens": 600, "perf/tokens_per_s": 2000.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 70, "perf/tokens_per_s": 9')
    assert run_tokens_per_s(path) == 2000.0  # median of 1000, 3000, 2000; the cut last line is skipped
    path.write_text(json.dumps({"step": 1, "perf/tokens_per_s": "nan"}) + "\n")
    assert run_tokens_per_s(path) is None and run_tokens_per_s(tmp_path / "missing.jsonl") is None


def test_read_throughput_csv(tmp_path):
    path = tmp_path / "tp.csv"
    path.write_text("batch_size,gpus,tokens_per_s,model_params\n256,8,1.2e6,85000000\n512,16,2.3e6,\n")
    assert read_throughput_csv(path) == [ThroughputPoint(85_000_000, 256, 8, 1.2e6),
                                         ThroughputPoint(None, 512, 16, 2.3e6)]
