"""pretrain with a batch schedule (a batch ramp) on real text, end to end.

One ramp of three stages (batch 4 for 6 steps, 8 for 8, 16 for 6; micro 4): the batch, tokens, LR, noise-scale
batches and eval grid of every step as the schedule says (metrics.jsonl and TensorBoard); its first stage is
bitwise the fixed-batch run at the first batch; every step is one optimizer step over its whole batch across
accumulation changes; a SIGTERM in the middle of the first stage (the resume crosses a stage change) and another
in the middle of the second give exactly the uninterrupted curve; 2 ranks under ZeRO 1/2/3 match 1 rank; the
adaptive ramp follows its rule and resumes with the same decisions; bad schedules exit 2 naming the key.
"""

from __future__ import annotations

import json
import math
import re
import subprocess

import pytest
import torch
import yaml

from cbs.pipeline import pretrain
from cbs.pipeline.config import ConfigError, PretrainConfig, from_dict, to_dict
from cbs.pipeline.data import TrainSamples
from cbs.pipeline.metrics import read_metrics
from cbs.pipeline.optim import EWA
from cbs.pipeline.targets import TargetTracker
from test_pretrain import ENV, ROOT, SEQ, cli, make_cfg, run_subprocess, series, torchrun, write_cfg
from test_resilience import sigterm_after

# batch 4 while < 6 steps x 4 x 64 = 1536 tokens, 8 while < 1536 + 8 x 8 x 64 = 5632, then 16 for 6 steps
STAGES = [{"batch": 4, "until_tokens": 1536}, {"batch": 8, "until_tokens": 5632}, {"batch": 16}]
TOKENS = 5632 + 6 * 16 * SEQ  # 11776
BATCH_OF_STEP = {s: 4 if s <= 6 else 8 if s <= 14 else 16 for s in range(1, 21)}


def ramp_cfg(data, run_dir, **kw):
    return make_cfg(data, run_dir, global_batch_seqs=None, batch_schedule=STAGES, train_tokens=TOKENS, **kw)


@pytest.fixture(scope="module")
def whole(stdlib_data, tmp_path_factory):
    """The uninterrupted ramp, in a subprocess of one thread (the resumed and 2-rank runs compare with it)."""
    tmp = tmp_path_factory.mktemp("ramp")
    cfg = ramp_cfg(stdlib_data, tmp / "whole", checkpoint={"every_steps": 5, "keep": 2})
    run_subprocess(cli("pretrain", str(write_cfg(cfg, tmp / "whole.yaml"))))
    return tmp / "whole"


def test_every_step_trains_the_schedule(whole):
    metrics = read_metrics(whole)
    train = {m["step"]: m for m in metrics if "train/loss" in m}
    assert {s: m["batch_seqs"] for s, m in train.items()} == BATCH_OF_STEP
    tokens, seen = {}, 0
    for s in range(1, 21):
        seen += BATCH_OF_STEP[s] * SEQ
        tokens[s] = seen
    assert {s: m["tokens"] for s, m in train.items()} == tokens and tokens[20] == TOKENS
    # lr_scaling sqrt against the first batch 4 (constant schedule, lr 3e-3): x1, x sqrt 2, x 2
    for s, m in train.items():
        assert m["lr"] == pytest.approx(3e-3 * math.sqrt(BATCH_OF_STEP[s] / 4), rel=1e-12)
    # the noise scale needs >= 2 micro-batches: none at batch 4 (one micro-batch of 4), then B_big = the stage batch
    assert {s: tuple(m.get("train/noise_scale_batches", ())) for s, m in train.items()} == {
        s: () if b == 4 else (4, b) for s, b in BATCH_OF_STEP.items()}
    # the eval grid in tokens of the first batch: every 10 steps of 4 x 64 = 2560 tokens: 2560 -> step 8
    # (6 x 256 + 2 x 512), 5120 -> 13, 7680 -> 16 (5632 + 2 x 1024), 10240 -> 19; plus step 1 and the last, 20
    assert sorted(series(whole, "eval/loss")) == [1, 8, 13, 16, 19, 20]
    result = json.loads((whole / "result.json").read_text())
    assert result["status"] == "completed" and (result["steps"], result["tokens"]) == (20, TOKENS)
    stages = yaml.safe_load((whole / "config.yaml").read_text())["resolved"]["batch_stages"]
    assert [(s["start_step"], s["steps"], s["gradient_accumulation_steps"]) for s in stages] == \
        [(0, 6, 1), (6, 8, 2), (14, 6, 4)]
    assert series(whole, "eval/loss")[20] < series(whole, "eval/loss")[1] - 1.0  # it learns
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(whole / "tb"))
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("batch_seqs")} == BATCH_OF_STEP  # TensorBoard has it too


def test_the_first_stage_is_the_fixed_batch_run(stdlib_data, whole, tmp_path):
    """Same data order, LR, beta2 and accumulation as a fixed batch of 4 over the first 6 steps: equal losses."""
    fixed = make_cfg(stdlib_data, tmp_path / "fixed", global_batch_seqs=4, train_tokens=1536,
                     optimizer={"lr": 3e-3, "beta2": 0.999})  # the paper's beta2 at batch 4, as the ramp's
    run_subprocess(cli("pretrain", str(write_cfg(fixed, tmp_path / "fixed.yaml"))))
    ramp, got = series(whole, "train/loss"), series(tmp_path / "fixed", "train/loss")
    assert got == {s: ramp[s] for s in range(1, 7)}


def test_every_step_is_one_optimizer_step_across_accumulation_changes(stdlib_data, tmp_path):
    """Accumulation 1 for 3 steps, then 2: DeepSpeed counts micro-steps from the start modulo the accumulation,
    so after 3 single micro-steps it would step the optimizer after the first micro-batch of a 2-micro-batch
    step. The Trainer says each step's boundary: its weights after 5 steps are torch AdamW's over the same global
    batches (as test_step_is_clipped_adamw_and_reports_the_pre_clip_norm checks for a fixed batch)."""
    from cbs.pipeline.distributed import init_distributed
    from cbs.pipeline.model import build_model, forward_loss, seed_model_parallel
    from cbs.pipeline.optim import make_optimizer

    stages = [{"batch": 4, "until_tokens": 3 * 4 * SEQ}, {"batch": 8}]
    cfg = make_cfg(stdlib_data, tmp_path / "run", global_batch_seqs=None, train_tokens=12 * 64 * 16,
                   batch_schedule={"stages": stages, "lr_scaling": "none", "beta2": "fixed"})
    trainer = pretrain.Trainer(cfg, init_distributed(cfg.seed))
    seed_model_parallel(cfg.seed)
    ref = build_model(cfg.model, trainer.manifest["vocab_size"])
    ours = list(trainer.engine.module.parameters())
    start = [p.detach().clone() for p in ours]
    opt = make_optimizer(ref, cfg.optimizer)
    for step in range(5):
        batch = trainer.batches.batch_at(step)
        seqs = trainer.samples.step_batch(trainer.batches.seqs_before(step), batch, 0, 1)
        for micro in seqs.split(cfg.micro_batch):
            (forward_loss(ref, micro)[0] / (batch // cfg.micro_batch)).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.optimizer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        trainer.train_step()
    assert trainer.grad_accum == 2 and trainer.engine.global_steps == 5
    for p, q, p0 in zip(ours, ref.parameters(), start):  # 1e-3 of each update, as the fixed-batch check
        assert ((p - p0) - (q - p0)).norm() <= 1e-3 * (p - p0).norm()


def test_a_ramp_reads_the_fixed_batch_data_order(stdlib_data):
    from cbs.analysis.batch_schedule import BatchSchedule, Stage

    samples = TrainSamples(stdlib_data, SEQ, seed=7)
    schedule = BatchSchedule([Stage(4, 1536), Stage(8, 5632), Stage(16)], SEQ)
    got = torch.cat([samples.step_batch(schedule.seqs_before(s), schedule.batch_at(s), 0, 1) for s in range(20)])
    assert torch.equal(got, samples.batch(0, TOKENS // SEQ))  # the same sequences as any batch over these tokens


def test_sigterm_mid_stage_and_across_a_stage_change_resumes_exactly(stdlib_data, whole, tmp_path):
    cfg = ramp_cfg(stdlib_data, tmp_path / "cut", checkpoint={"every_steps": 5, "keep": 2})
    cut_yaml = write_cfg(cfg, tmp_path / "cut.yaml")
    stops = []
    for step in (3, 9):  # inside stage 1 (the restart crosses into stage 2), then inside stage 2
        code, _, stderr = sigterm_after(cut_yaml, tmp_path / "cut", step=step)
        assert code == pretrain.EXIT_PREEMPTED, stderr[-2000:]
        stops.append(json.loads((tmp_path / "cut" / "result.json").read_text())["steps"])
    assert stops[0] < 6 < stops[1] < 14, stops
    run_subprocess(cli("pretrain", str(cut_yaml)))
    a, b = read_metrics(whole), read_metrics(tmp_path / "cut")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if not k.startswith("perf/")} == \
            {k: v for k, v in y.items() if not k.startswith("perf/")}, x["step"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_match_one_rank(stdlib_data, whole, tmp_path, stage):
    """2 ranks x micro 2 x accumulation 1, 2, 4 against 1 rank x micro 4 x accumulation 1, 2, 4."""
    cfg = ramp_cfg(stdlib_data, tmp_path / "run", deepspeed_config=f"zero{stage}.json", micro_batch_seqs=2)
    run_subprocess(torchrun(2, "pretrain", str(write_cfg(cfg, tmp_path / "c.yaml"))))
    ref, got = series(whole, "train/loss"), series(tmp_path / "run", "train/loss")
    assert ref.keys() == got.keys() and max(abs(ref[s] - got[s]) for s in ref) < 1e-4
    assert series(tmp_path / "run", "batch_seqs") == series(whole, "batch_seqs")
    stages = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["resolved"]["batch_stages"]
    assert [s["gradient_accumulation_steps"] for s in stages] == [1, 2, 4]
    # 2 ranks: >= 2 micro-batches of 2 at every stage, batch 4 too; B_big follows the stage
    assert series(tmp_path / "run", "train/noise_scale_batches") == {s: [2, b] for s, b in BATCH_OF_STEP.items()}


BAD = [
    ({"batch_schedule": [{"batch": 8, "until_tokens": 512}, {"batch": 4}]},
     r"pretrain\.batch_schedule\.stages\[1\]\.batch \(4\) is below"),
    ({"batch_schedule": [{"batch": 4, "until_tokens": 512}, {"batch": 6}]},
     r"pretrain\.batch_schedule\.stages\[1\]\.batch \(6\) must be divisible by micro_batch_seqs \(4\)"),
    ({"batch_schedule": [{"batch": 4, "until_tokens": 99999}, {"batch": 8}]},
     r"pretrain\.batch_schedule\.stages\[0\]\.until_tokens \(99999\) is beyond the budget"),
    ({"batch_schedule": [{"batch": 4}], "global_batch_seqs": 8},
     r"exactly one of global_batch_seqs .* and batch_schedule"),
    ({"batch_schedule": {"adaptive": "gradient_norm", "ladder": [8, 16]}},
     r"pretrain\.batch_schedule\.adaptive must be one of noise_scale: got 'gradient_norm'"),
    ({"batch_schedule": {"adaptive": "noise_scale", "ladder": [4, 8]}},
     r"pretrain\.batch_schedule\.adaptive: noise_scale measures B_simple from >= 2 micro-batches"),
]


@pytest.mark.parametrize("change, words", BAD)
def test_bad_schedules_are_refused_naming_the_key(stdlib_data, tmp_path, change, words):
    """Before anything starts (pretrain.main's first checks); the CLI turns each into exit 2 (the last case runs
    through it)."""
    data = {k: v for k, v in to_dict(make_cfg(stdlib_data, tmp_path / "run", train_tokens=4096)).items()
            if k != "global_batch_seqs"}
    data.update(change)
    with pytest.raises(ConfigError, match=words):
        pretrain.main(from_dict(PretrainConfig, data, "pretrain"))
    assert not (tmp_path / "run").exists()
    if change == BAD[-1][0]:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(data))
        proc = subprocess.run(cli("pretrain", str(path)), capture_output=True, text=True, env=ENV, cwd=ROOT)
        assert proc.returncode == 2 and re.search(words, proc.stderr), proc.stderr[-2000:]


def test_a_schedule_file_is_read_and_a_bad_one_named(stdlib_data, tmp_path):
    from cbs.analysis.batch_schedule import Stage, write_schedule_file

    write_schedule_file(tmp_path / "ramp.yaml", [Stage(4, 1536), Stage(8)], {"tokens": 4096})
    cfg = make_cfg(stdlib_data, tmp_path / "run", global_batch_seqs=None, train_tokens=4096,
                   batch_schedule=str(tmp_path / "ramp.yaml"))
    assert [s.batch for s in cfg.batches.stages] == [4, 8] and cfg.total_steps == 6 + 5  # 1536 + 5 x 512 >= 4096
    (tmp_path / "bad.yaml").write_text("stages: [{batch: 4}]\n")
    with pytest.raises(ConfigError, match=r"pretrain\.batch_schedule\.file \(.*bad\.yaml\): .*cbs-batch-schedule/1"):
        make_cfg(stdlib_data, tmp_path / "run", global_batch_seqs=None, batch_schedule=str(tmp_path / "bad.yaml"))


ADAPTIVE = {"adaptive": "noise_scale", "ladder": [8, 16, 32], "noise_factor": 0.4}


def test_adaptive_ramp_follows_its_rule_and_resumes_with_the_same_decisions(stdlib_data, tmp_path):
    """B_simple x 0.4 reaching a higher rung of 8, 16, 32 moves the batch there from the next step; a run stopped
    by SIGTERM after the first decision and restarted makes the same decisions and logs the same curve."""
    def cfg(name):
        return write_cfg(make_cfg(stdlib_data, tmp_path / name, global_batch_seqs=None, batch_schedule=ADAPTIVE,
                                  train_tokens=8 * SEQ * 30, checkpoint={"every_steps": 3}), tmp_path / f"{name}.yaml")

    run_subprocess(cli("pretrain", str(cfg("whole"))))
    metrics = read_metrics(tmp_path / "whole")
    decisions = [m for m in metrics if "batch_decision" in m]
    noise = series(tmp_path / "whole", "train/noise_scale")
    batch = series(tmp_path / "whole", "batch_seqs")
    assert decisions, "no decision: the test needs B_simple x 0.4 to pass 16 on this data"
    current = 8
    for step in sorted(noise):  # the rule, replayed on the logged B_simple
        reach = max((b for b in (8, 16, 32) if b <= 0.4 * noise[step]), default=8)
        assert batch[step] == current, step
        if reach > current:
            assert [d["batch_decision"] for d in decisions if d["step"] == step] == [reach]
            current = reach
    resolved = yaml.safe_load((tmp_path / "whole" / "config.yaml").read_text())["resolved"]
    trained = sorted(set(batch.values()))
    assert [s["batch"] for s in resolved["batch_stages"]] == trained  # the stages decided, not the first rung alone
    assert resolved["total_steps"] == max(batch)
    cut_yaml = cfg("cut")
    first = decisions[0]["step"]
    code, _, stderr = sigterm_after(cut_yaml, tmp_path / "cut", step=first + 1)
    assert code == pretrain.EXIT_PREEMPTED, stderr[-2000:]
    run_subprocess(cli("pretrain", str(cut_yaml)))
    strip = [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in metrics]
    assert [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in read_metrics(tmp_path / "cut")] == strip


def test_ewa_at_k_times_the_batch_averages_the_same_tokens():
    """One step at scale k = 2 (decay tau^2) equals two steps at k = 1 on the same weights, and the bias
    correction makes a constant parameter's average the parameter itself whatever the scales."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    one, two = EWA([p], [0.9]), EWA([p], [0.9])
    for value in (1.0, 3.0):
        p.data.fill_(value)
        one.scale = 2.0
        one.update()
        two.update()
        two.update()
    assert torch.allclose(one.corrected(0.9)[0], two.corrected(0.9)[0], rtol=1e-6)
    assert one.tau_steps == two.tau_steps == 4.0
    constant = EWA([p], [0.99])
    for k in (1.0, 2.0, 4.0, 4.0):
        constant.scale = k
        constant.update()
    assert torch.allclose(constant.corrected(0.99)[0], p.data, rtol=1e-5)


def test_a_crossing_between_stages_interpolates_tokens_as_well_as_steps():
    tracker = TargetTracker([3.0], ["raw"])
    tracker.update(10, 1000, {"raw": 4.0})
    tracker.update(20, 3000, {"raw": 2.0})  # 10 steps later, at twice the batch
    crossing = tracker.to_json()[0]["raw"]
    frac = (math.log(4.0) - math.log(3.0)) / (math.log(4.0) - math.log(2.0))
    assert crossing["step_interp"] == pytest.approx(10 + 10 * frac, abs=1e-4)
    assert crossing["tokens_interp"] == pytest.approx(1000 + 2000 * frac, abs=0.1)
