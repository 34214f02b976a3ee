"""pretrain end to end on real text: a tiny megatron-core GPT in a real DeepSpeed engine (CPU, gloo).

Loss falls; the run directory holds its contract (TensorBoard read back by tensorboard's own loader);
micro-batch x accumulation decompositions and 2-rank ZeRO 1/2/3 runs match the 1-rank run; a run killed with
SIGKILL and resumed logs exactly what the uninterrupted run logs; divergence and early stop at targets.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cbs.pipeline import pretrain
from cbs.pipeline.config import ConfigError, PretrainConfig, from_dict, to_dict
from cbs.pipeline.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
SEQ = 64


def make_cfg(data: Path, run_dir: Path, **kw) -> PretrainConfig:
    base = {
        "data_dir": str(data), "run_dir": str(run_dir), "model": {"preset": "tiny", "seq_len": SEQ},
        "global_batch_seqs": 8, "micro_batch_seqs": 4, "train_tokens": 8 * SEQ * 30, "seed": 7,
        "ewa": {"taus": [0.9]}, "eval": {"every_steps": 10, "growth": 0, "eval_tokens": 16 * SEQ},
        "log": {"every_steps": 1}, "checkpoint": {"every_steps": 10}, "optimizer": {"lr": 3e-3},
    }
    for key, value in kw.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return from_dict(PretrainConfig, base, "pretrain")


def write_cfg(cfg: PretrainConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


def series(run_dir: Path, key: str) -> dict[int, float]:
    return {m["step"]: m[key] for m in read_metrics(run_dir) if key in m}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cbs.pipeline.cli", *args]


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "cbs.pipeline.cli", *args]


ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def run_subprocess(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_curve(ref_dir: Path, run_dir: Path, steps: int = 20) -> None:
    """Same global batches, other decomposition: step 1 (identical weights) differs only by summation order;
    later steps drift by float noise that Adam amplifies (measured ~2e-5 over 20 steps), far below 1e-4."""
    ref, got = series(ref_dir, "train/loss"), series(run_dir, "train/loss")
    assert ref.keys() == got.keys() and len(ref) == steps
    assert abs(ref[1] - got[1]) < 1e-6
    assert max(abs(ref[s] - got[s]) for s in ref) < 1e-4


@pytest.fixture(scope="module")
def reference(stdlib_data, tmp_path_factory) -> Path:
    """A 1-rank run, micro 4 x accumulation 2, 20 steps, every step logged: the run others are compared with."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    cfg = make_cfg(stdlib_data, run_dir, train_tokens=8 * SEQ * 20)
    run_subprocess(cli("pretrain", str(write_cfg(cfg, run_dir.parent / "c.yaml"))))
    return run_dir


def test_loss_falls_and_run_directory_contract(stdlib_data, tmp_path):
    cfg = make_cfg(stdlib_data, tmp_path / "run", train_tokens=8 * SEQ * 60, targets=[6.0, 0.1],
                   eval={"every_steps": 20})
    result = pretrain.main(cfg)
    run = tmp_path / "run"
    evals = series(run, "eval/loss")
    assert sorted(evals) == [1, 20, 40, 60]
    assert evals[60] < evals[1] - 1.0  # real learning on real text
    assert series(run, "eval/loss_ewa/0.9")[60] < evals[1] - 1.0
    assert result["status"] == "completed" and result["steps"] == 60 and result["tokens"] == 60 * 8 * SEQ
    assert result == json.loads((run / "result.json").read_text())
    reached, never = result["targets"]
    assert reached["loss"] == 6.0 and reached["raw"]["step"] in evals and reached["raw"]["step_interp"] <= \
        reached["raw"]["step"]
    assert never["raw"] is None and never["ewa"]["0.9"] is None
    resolved = yaml.safe_load((run / "config.yaml").read_text())["resolved"]
    assert resolved["deepspeed"]["train_batch_size"] == 8
    assert resolved["deepspeed"]["gradient_accumulation_steps"] == 2
    assert resolved["deepspeed"]["zero_optimization"]["stage"] == 1
    # TensorBoard's own loader reads what we wrote
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"train/loss", "eval/loss", "eval/loss_ewa/0.9", "lr", "grad_norm"} <= set(acc.Tags()["scalars"])
    tb_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert tb_loss.keys() == series(run, "train/loss").keys()
    assert all(abs(tb_loss[s] - v) < 1e-5 for s, v in series(run, "train/loss").items())


def test_micro_batch_decompositions_match(stdlib_data, reference, tmp_path):
    cfg = make_cfg(stdlib_data, tmp_path / "run", train_tokens=8 * SEQ * 20, micro_batch_seqs=8)
    pretrain.main(cfg)  # micro 8 x accumulation 1 against the reference's micro 4 x accumulation 2
    assert_same_curve(reference, tmp_path / "run")


def test_step_is_clipped_adamw_and_reports_the_pre_clip_norm(stdlib_data, tmp_path):
    """The engine's step is AdamW (two groups: decay on matrices) on the gradient clipped to optimizer.grad_clip,
    and the norm it reports (log_hook's grad_norm) is the global norm before clipping: checked against torch's
    clip_grad_norm_ + AdamW on the same weights, batches and learning rates, with clipping active every step."""
    from cbs.pipeline.distributed import init_distributed
    from cbs.pipeline.model import build_model, forward_loss, seed_model_parallel
    from cbs.pipeline.optim import lr_at, make_optimizer

    cfg = make_cfg(stdlib_data, tmp_path / "run", optimizer={"lr": 3e-3, "grad_clip": 0.2, "weight_decay": 0.1})
    trainer = pretrain.Trainer(cfg, init_distributed(cfg.seed))
    seed_model_parallel(cfg.seed)
    ref = build_model(cfg.model, trainer.manifest["vocab_size"])
    ours = list(trainer.engine.module.parameters())
    assert all(torch.equal(p, q) for p, q in zip(ours, ref.parameters()))
    start = [p.detach().clone() for p in ours]
    opt = make_optimizer(ref, cfg.optimizer)
    for step in range(4):
        for group in opt.param_groups:
            group["lr"] = lr_at(step * cfg.tokens_per_step, cfg.optimizer.lr, cfg.train_tokens, cfg.schedule)
        for micro in trainer.samples.step_batch(step * cfg.global_batch_seqs, cfg.global_batch_seqs, 0, 1).split(cfg.micro_batch):
            (forward_loss(ref, micro)[0] / trainer.grad_accum).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.optimizer.grad_clip).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        trainer.train_step()
        assert norm > 2 * cfg.optimizer.grad_clip  # clipping changes this step
        assert float(trainer.engine.get_global_grad_norm()) == pytest.approx(norm, rel=1e-5)
    # each tensor's 4-step update agrees to 1e-3 of its size (measured 2e-4: Adam amplifies float noise where a
    # gradient is ~0); without the clip it is off by 0.13, without the weight decay by 3e-3
    for p, q, p0 in zip(ours, ref.parameters(), start):
        assert ((p - p0) - (q - p0)).norm() <= 1e-3 * (p - p0).norm()


@pytest.mark.slow
def test_compiled_model_trains_the_same_curve(stdlib_data, reference, tmp_path):
    """pretrain.compile: the engine's torch.compile'd model trains the reference's curve (to float rounding), and
    its checkpoints keep the GPTModel's names: `cbs evaluate` (eager) gives the eval losses it logged."""
    from cbs.pipeline import evaluate

    run_dir = tmp_path / "run"
    cfg = make_cfg(stdlib_data, run_dir, train_tokens=8 * SEQ * 20, compile=True)
    run_subprocess(cli("pretrain", str(write_cfg(cfg, tmp_path / "c.yaml"))), timeout=900)
    ref, got = series(reference, "train/loss"), series(run_dir, "train/loss")
    assert ref.keys() == got.keys() and max(abs(ref[s] - got[s]) for s in ref) < 1e-4
    ref_noise, got_noise = series(reference, "train/noise_scale"), series(run_dir, "train/noise_scale")
    assert ref_noise.keys() == got_noise.keys()  # the gradient hooks see the compiled backward too
    assert all(got_noise[s] == pytest.approx(ref_noise[s], rel=1e-2) for s in ref_noise)
    result = evaluate.main(run_dir)
    assert result["weights"]["raw"]["loss"] == pytest.approx(series(run_dir, "eval/loss")[20], abs=1e-5)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_match_one_rank(stdlib_data, reference, tmp_path, stage):
    cfg = make_cfg(stdlib_data, tmp_path / "run", train_tokens=8 * SEQ * 20,
                   deepspeed_config=f"zero{stage}.json")  # 2 ranks x micro 4 x accumulation 1
    run_subprocess(torchrun(2, "pretrain", str(write_cfg(cfg, tmp_path / "c.yaml"))))
    assert_same_curve(reference, tmp_path / "run")
    ref_eval, got_eval = series(reference, "eval/loss_ewa/0.9"), series(tmp_path / "run", "eval/loss_ewa/0.9")
    assert ref_eval.keys() == got_eval.keys() and max(abs(ref_eval[s] - got_eval[s]) for s in ref_eval) < 1e-4
    # the noise scale from the same two micro-batches of 4: on one rank in turn, or on two ranks at once
    ref_noise, got_noise = series(reference, "train/noise_scale"), series(tmp_path / "run", "train/noise_scale")
    assert ref_noise.keys() == got_noise.keys() and len(ref_noise) == 20
    assert all(got_noise[s] == pytest.approx(ref_noise[s], rel=1e-3) for s in ref_noise)
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["deepspeed"]["gradient_accumulation_steps"] == 1


def test_each_rank_tears_its_process_groups_down_before_exit(stdlib_data, tmp_path):
    """Groups left to the interpreter's teardown can abort a rank at exit (gloo: "terminate called without an
    active exception", SIGABRT after the last checkpoint was saved), failing a finished run: the pretrain and
    evaluate commands destroy them once the stage has succeeded."""
    cfg = make_cfg(stdlib_data, tmp_path / "run", train_tokens=8 * SEQ * 2, deepspeed_config="zero1.json")
    yaml_path = write_cfg(cfg, tmp_path / "c.yaml")
    script = tmp_path / "stage.py"
    # one os.write per rank: a write of a short line to a pipe is atomic, where print's pieces from two ranks
    # interleaved ("leftleft False 0False 0") and failed the count now and then
    script.write_text("import os, sys, torch.distributed as dist\nfrom cbs.pipeline import cli\n"
                      "code = cli.main(sys.argv[1:])\n"
                      "os.write(1, f'left {dist.is_initialized()} {code}\\n'.encode())\n")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = run_subprocess([*launch, "pretrain", str(yaml_path)])
    assert proc.stdout.count("left False 0") == 2, proc.stdout[-2000:]
    proc = run_subprocess([sys.executable, str(script), "evaluate", str(tmp_path / "run")])
    assert "left False 0" in proc.stdout, proc.stdout[-2000:]


def test_killed_run_resumes_exactly(stdlib_data, tmp_path):
    """SIGKILL after the step-30 checkpoint; `resume: auto` then logs what the uninterrupted run logs. All runs
    are subprocesses with one thread each: equal float reductions, so equality to 1e-6 is a fair demand."""
    steps = 60
    whole = make_cfg(stdlib_data, tmp_path / "whole", train_tokens=8 * SEQ * steps)
    run_subprocess(cli("pretrain", str(write_cfg(whole, tmp_path / "whole.yaml"))))
    cut = make_cfg(stdlib_data, tmp_path / "cut", train_tokens=8 * SEQ * steps)
    cut_yaml = write_cfg(cut, tmp_path / "cut.yaml")
    proc = subprocess.Popen(cli("pretrain", str(cut_yaml)), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = tmp_path / "cut" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step00000030":
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(m["step"] for m in read_metrics(tmp_path / "cut"))
    assert 30 <= killed_at < steps
    run_subprocess(cli("pretrain", str(cut_yaml)))  # resume: auto
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut")
    assert len(a) == len(b) and b[-1]["step"] == steps
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["step"] == y["step"]
        for key in x:
            if not key.startswith("perf/"):
                assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (x["step"], key)
    result_a = json.loads((tmp_path / "whole" / "result.json").read_text())
    result_b = json.loads((tmp_path / "cut" / "result.json").read_text())
    assert result_b["status"] == "completed" and result_b["steps"] == steps
    assert result_a["targets"] == result_b["targets"] and result_a["final"] == pytest.approx(result_b["final"])
    assert pretrain.main(cut)["steps"] == steps  # already finished: the saved result, nothing trained


def test_divergence_ends_the_run_with_a_result(stdlib_data, tmp_path):
    cfg = make_cfg(stdlib_data, tmp_path / "run", optimizer={"lr": 30.0, "grad_clip": 0.0})
    result = pretrain.main(cfg)
    assert result["status"] == "diverged" and result["steps"] < cfg.total_steps
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "diverged"


def test_stop_at_targets_saves_the_rest_of_the_budget(stdlib_data, tmp_path):
    cfg = make_cfg(stdlib_data, tmp_path / "run", train_tokens=8 * SEQ * 200, targets=[5.6],
                   stop_at_targets=True, eval={"every_steps": 5})  # 5.6: below the loss at init (~6.2)
    result = pretrain.main(cfg)
    assert result["status"] == "completed" and result["reason"] == "every target reached"
    assert 1 < result["steps"] < 200
    assert result["targets"][0]["raw"]["step"] == result["steps"] or \
        result["targets"][0]["ewa"]["0.9"]["step"] == result["steps"]


def test_bad_settings_are_refused_before_anything_starts(stdlib_data, tmp_path):
    cfg = make_cfg(stdlib_data, tmp_path / "run", global_batch_seqs=10, micro_batch_seqs=4)
    with pytest.raises(ConfigError, match=r"global_batch_seqs \(10\).*micro_batch_seqs \(4\)"):
        pretrain.main(cfg)
    assert not (tmp_path / "run").exists()
    proc = subprocess.run(cli("pretrain", str(write_cfg(cfg, tmp_path / "c.yaml"))), capture_output=True,
                          text=True, env=ENV, cwd=ROOT)
    assert proc.returncode == 2 and "global_batch_seqs (10)" in proc.stderr


def test_resume_refuses_a_run_with_other_settings(stdlib_data, reference, tmp_path):
    cfg = make_cfg(stdlib_data, reference, train_tokens=8 * SEQ * 20, optimizer={"lr": 1e-3})
    with pytest.raises(ConfigError, match="optimizer differ"):
        pretrain.main(cfg)
