"""`cbs forecast --format megatron|torchtitan|olmo-core`: the exports parse (argparse, tomllib, ast) and encode the
plan; Megatron-LM's own ramp calculator, run on the exported flags, never goes above the plan's batch."""

from __future__ import annotations

import argparse
import ast
import json
import shlex
import tomllib

import pytest

from cbs.analysis.cli import forecast_main
from cbs.analysis.export import (
    STAGE_SEPARATOR, from_batch_plan, from_ramp, megatron, megatron_batch, megatron_ramp, olmo_core, torchtitan,
)
from cbs.analysis.forecast import batch_plan
from cbs.analysis.laws import fit_scaling_law, law_to_json
from cbs.analysis.ramp import batch_ramp, curve_from_law

# CBS = 0.5 t^0.5, unit 3 (1 GPU x micro-batch 3), T = 7, D = 5000 (tests/test_analysis_ramp.py works it out):
# stages 3 to 144 tokens (7 steps), 6 to 576 (11), 12 to 2304 (21), 24 to 5000 (16: each stage starts where the one
# before really ended, 2,373 tokens in, as training counts it: analysis/batch_schedule.py)
RAMP = batch_ramp(curve_from_law(0.5, 0.5, "law"), 5000, 3, 7)
PLAN = from_ramp(RAMP, gpus=1, micro_batch_seqs=3, source="the law")


def megatron_flags(text: str) -> argparse.Namespace:
    """Megatron-LM's own spelling of the flags (megatron/training/arguments.py), parsed as it would."""
    p = argparse.ArgumentParser()
    p.add_argument("--global-batch-size", type=int)
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--seq-length", type=int)
    p.add_argument("--train-samples", type=int)
    p.add_argument("--rampup-batch-size", nargs="*", default=None)
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 1
    return p.parse_args(shlex.split(lines[0]))


def plan_batch_at_sample(sample: float) -> int:
    t = sample * PLAN.seq_len
    return next(s.batch for s in PLAN.stages if s.start_tokens <= t < s.end_tokens)


def test_megatron_flags_encode_the_ramp_and_never_exceed_the_plan():
    args = megatron_flags(megatron(PLAN))
    assert (args.global_batch_size, args.micro_batch_size, args.seq_length) == (24, 3, 7)
    assert args.train_samples == 715  # ceil(5000 / 7)
    start, inc, samples = (int(v) for v in args.rampup_batch_size)
    # levels 6, 9, ..., 24 (K = 7); level 4 (batch 15) must wait for the stage of 24 at 2304 / 7 = 329.1 samples:
    # SAMPLES = 7 x 329.1 / 4 = 576
    assert (start, inc, samples) == (3, 3, 576)
    ramp = megatron_ramp(PLAN)
    consumed, steps = 0, 0
    while consumed < PLAN.train_samples:
        b = megatron_batch(ramp, 24, consumed)
        assert b <= plan_batch_at_sample(consumed)
        consumed, steps = consumed + b, steps + 1
    assert steps == ramp.steps and f"takes {steps:,} steps instead of 55" in megatron(PLAN)


def test_megatron_lm_own_calculator_agrees_with_the_export():
    calc_mod = pytest.importorskip("megatron.core.num_microbatches_calculator")
    args = megatron_flags(megatron(PLAN))
    start, inc, samples = (int(v) for v in args.rampup_batch_size)
    calc = calc_mod.RampupBatchsizeNumMicroBatchesCalculator(
        global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size, data_parallel_size=1,
        decrease_batch_size_if_needed=False, rank=1, start_global_batch_size=start, batch_size_increment=inc,
        ramup_samples=samples)
    ramp = megatron_ramp(PLAN)
    consumed, steps = 0, 0
    while consumed < args.train_samples:
        calc.update(consumed, consistency_check=True)  # asserts that the batch divides into micro-batches
        b = calc.get_current_global_batch_size()
        assert b == megatron_batch(ramp, 24, consumed) and b <= plan_batch_at_sample(consumed)
        consumed, steps = consumed + b, steps + 1
    assert steps == ramp.steps


def test_torchtitan_toml_per_stage_with_steps_from_the_start():
    docs = [tomllib.loads(d) for d in torchtitan(PLAN).split(STAGE_SEPARATOR)]
    assert [d["training"]["global_batch_size"] for d in docs] == [3, 6, 12, 24]
    assert [d["training"]["steps"] for d in docs] == [7, 18, 39, 55]  # 7, +11, +21, +16
    assert all(d["training"]["local_batch_size"] == 3 and d["training"]["seq_len"] == 7 for d in docs)
    assert all(d["checkpoint"]["enable"] is True for d in docs)


def test_olmo_core_schedule_in_tokens_passes_the_callbacks_own_rules():
    tree = ast.parse(olmo_core(PLAN))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "BatchSizeSchedulerCallback")
    kw = {k.arg: k.value for k in call.keywords}
    sizes = ast.literal_eval(kw["batch_sizes"])
    starts = [(c.func.attr, ast.literal_eval(c.args[0])) for c in kw["schedule"].elts]
    assert sizes == [21, 42, 84, 168]  # sequences x seq_len 7: OLMo-core counts tokens
    assert starts == [("tokens", 0), ("tokens", 144), ("tokens", 576), ("tokens", 2304)]
    # OLMo-core's BatchSizeSchedulerCallback.__post_init__: starts at 0, increasing, integer factors
    assert all(b % a == 0 for a, b in zip(sizes, sizes[1:])) and starts == sorted(starts)
    assert "GLOBAL_BATCH_SIZE_TOKENS = 21" in olmo_core(PLAN)


def test_a_fixed_plan_exports_one_batch_without_a_ramp():
    fixed = from_batch_plan(batch_plan(100.0, gpus=4, micro_batch_seqs=2, seq_len=512), 1e8, "a law")
    args = megatron_flags(megatron(fixed))
    assert (args.global_batch_size, args.rampup_batch_size, args.train_samples) == (96, None, 195313)
    (doc,) = [tomllib.loads(d) for d in torchtitan(fixed).split(STAGE_SEPARATOR)]
    assert doc["training"] == {"global_batch_size": 96, "local_batch_size": 2, "seq_len": 512, "steps": 2035}
    assert "BatchSizeSchedulerCallback" not in olmo_core(fixed) and "= 49152" in olmo_core(fixed)


@pytest.fixture
def scaling(tmp_path):
    law = law_to_json(fit_scaling_law([36.0, 144.0, 576.0], [3.0, 6.0, 12.0], "tokens"))  # CBS = 0.5 D^0.5
    path = tmp_path / "scaling.json"
    path.write_text(json.dumps({"version": 2, "seq_len": 7, "laws": {"tokens": law}}))
    return path


def test_forecast_cli_formats(scaling, capsys):
    assert forecast_main(["--ramp", "--scaling", str(scaling), "--tokens", "5000", "--micro-batch", "3",
                          "--format", "megatron"]) == 0
    start, inc, samples = megatron_flags(capsys.readouterr().out).rampup_batch_size
    # the fitted law's coefficient is 0.5 to rounding: its crossing of 24 is 2304 + a hair, rounded up
    assert (start, inc) == ("3", "3") and int(samples) in (576, 577)
    # the fixed plan: CBS(5000) = 0.5 sqrt(5000) = 35.4 -> 33 (11 micro-batches of 3)
    assert forecast_main(["--scaling", str(scaling), "--tokens", "5000", "--micro-batch", "3",
                          "--format", "torchtitan"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["training"]["global_batch_size"] == 33
    assert forecast_main(["--scaling", str(scaling), "--tokens", "5000", "--format", "deepspeed"]) == 2
    assert "invalid choice: 'deepspeed'" in capsys.readouterr().err
