"""optimizer.kind schedule_free on real text in a real DeepSpeed engine (CPU, gloo).

Schedule-free AdamW trains at y and is evaluated at its average x (Defazio et al. 2024): the loss falls; the
weights evaluated are x = (y - (1 - beta1) z) / beta1, not y; `cbs evaluate` of a checkpoint gives the loss
logged at its step; a run resumed from a checkpoint logs bitwise what the uninterrupted run logs (a checkpoint
with an eval at its step, and one without); ZeRO-1/2/3 on 2 ranks train and evaluate the 1-rank curve; a
decaying LR schedule or an EWA is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cbs.pipeline import evaluate, pretrain, rundir
from cbs.pipeline.config import ConfigError
from cbs.pipeline.metrics import read_metrics
from test_pretrain import SEQ, cli, make_cfg, run_subprocess, series, torchrun, write_cfg

SF = {"kind": "schedule_free", "lr": 3e-3}


def sf_cfg(data: Path, run_dir: Path, ds_config: Path | str = "ds_configs/zero1.json", **kw):
    return make_cfg(data, run_dir, optimizer=SF, ewa={"taus": []}, deepspeed_config=str(ds_config), **kw)


@pytest.fixture(scope="module")
def zero0(tmp_path_factory) -> Path:
    """A DeepSpeed config without ZeRO: the optimizer steps the model's own parameters (the reference the ZeRO
    stages are compared with; `cbs evaluate` reads ZeRO checkpoints, the project's configs)."""
    path = tmp_path_factory.mktemp("ds") / "zero0.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    return path


@pytest.fixture(scope="module")
def sf_reference(stdlib_data, zero0, tmp_path_factory) -> Path:
    """A 1-rank schedule-free run without ZeRO, 20 steps of 8 sequences, eval and checkpoint every 10."""
    run_dir = tmp_path_factory.mktemp("sf-ref") / "run"
    cfg = sf_cfg(stdlib_data, run_dir, zero0, train_tokens=8 * SEQ * 20)
    run_subprocess(cli("pretrain", str(write_cfg(cfg, run_dir.parent / "c.yaml"))))
    return run_dir


def test_schedule_free_lowers_the_loss_and_evaluates_x(stdlib_data, zero0, tmp_path):
    """The loss falls on real text; at an eval the model holds x, computed here from y and the optimizer's z;
    x and y give different losses (so the comparisons of eval losses tell them apart); the checkpoint at the
    last step holds x: `cbs evaluate` gives exactly the loss logged there."""
    from cbs.pipeline.distributed import init_distributed

    cfg = sf_cfg(stdlib_data, tmp_path / "run", zero0, train_tokens=8 * SEQ * 40, eval={"every_steps": 20})
    trainer = pretrain.Trainer(cfg, init_distributed(cfg.seed))
    trainer.tracker = None
    for _ in range(20):
        trainer.train_step()
    params = list(trainer.engine.module.parameters())
    opt = trainer.schedule_free.client
    y = [p.detach().clone() for p in params]
    loss_y = trainer.eval_hook.evaluate()
    trainer.schedule_free.eval()
    beta1 = opt.param_groups[0]["betas"][0]
    for p, p_y in zip(params, y):
        x = (p_y - (1 - beta1) * opt.state[p]["z"]) / beta1
        assert torch.allclose(p, x, rtol=1e-5, atol=1e-6)
    loss_x = trainer.eval_hook.evaluate()
    # measured 2.6e-3 apart after 20 steps: 26 times the 1e-4 within which the ZeRO runs must match, so a run
    # that evaluated y where x was due would fail there
    assert abs(loss_x - loss_y) > 1e-3, (loss_x, loss_y)
    trainer.schedule_free.train()
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(params, y))

    result = pretrain.main(sf_cfg(stdlib_data, tmp_path / "full", train_tokens=8 * SEQ * 40,
                                  eval={"every_steps": 20}))
    evals = series(tmp_path / "full", "eval/loss")
    assert sorted(evals) == [1, 20, 40] and result["status"] == "completed"
    assert evals[40] < evals[1] - 1.0  # real learning on real text
    assert evaluate.main(tmp_path / "full")["weights"]["raw"]["loss"] == pytest.approx(evals[40], abs=1e-6)


def _cut_back(run_dir: Path, step: int) -> None:
    """The run directory as a run killed after its checkpoint at `step` leaves it: later checkpoints gone,
    `latest` at it, no result."""
    ckpts = rundir.checkpoint_dir(run_dir)
    for tag in rundir.tags(run_dir):
        if rundir.tag_step(tag) > step:
            shutil.rmtree(ckpts / tag)
    (ckpts / rundir.LATEST).write_text(rundir.tag(step))
    (run_dir / rundir.RESULT).unlink()


@pytest.mark.parametrize("resume_at", [20, 25])
def test_resume_is_bitwise_exact(stdlib_data, tmp_path, resume_at):
    """Resumed from a checkpoint saved at an eval step (20) or between evals (25), the run (ZeRO-1) logs bitwise
    the train and eval losses of the uninterrupted one."""
    kw = dict(train_tokens=8 * SEQ * 40, checkpoint={"every_steps": 5, "keep": 10})
    pretrain.main(sf_cfg(stdlib_data, tmp_path / "whole", **kw))
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    _cut_back(tmp_path / "cut", resume_at)
    (tmp_path / "cut" / "config.yaml").write_text(
        (tmp_path / "cut" / "config.yaml").read_text().replace(str(tmp_path / "whole"), str(tmp_path / "cut")))
    result = pretrain.main(sf_cfg(stdlib_data, tmp_path / "cut", **kw))
    assert result["steps"] == 40
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for key in x:
            if not key.startswith("perf/"):
                assert x[key] == y[key], (x["step"], key)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_on_two_ranks_match_one_rank(stdlib_data, sf_reference, tmp_path, stage):
    """DeepSpeed's flat fp32 partitions (ZeRO-1/2) or shards (ZeRO-3) are what the optimizer steps and switches
    between y and x: 2 ranks train and evaluate the 1-rank run's curve (to float noise), and `cbs evaluate` of
    the last checkpoint gives the loss logged there."""
    run_dir = tmp_path / "run"
    cfg = make_cfg(stdlib_data, run_dir, optimizer=SF, ewa={"taus": []}, train_tokens=8 * SEQ * 20,
                   deepspeed_config=f"zero{stage}.json")
    run_subprocess(torchrun(2, "pretrain", str(write_cfg(cfg, tmp_path / "c.yaml"))))
    for key in ("train/loss", "eval/loss"):
        ref, got = series(sf_reference, key), series(run_dir, key)
        assert ref.keys() == got.keys() and max(abs(ref[s] - got[s]) for s in ref) < 1e-4, key
    logged = series(run_dir, "eval/loss")[20]
    assert evaluate.main(run_dir)["weights"]["raw"]["loss"] == pytest.approx(logged, abs=1e-5)


@pytest.mark.parametrize("kind", ["cosine", "wsd"])
def test_a_decaying_schedule_is_refused(stdlib_data, zero0, tmp_path, kind):
    with pytest.raises(ConfigError, match=r"pretrain\.schedule\.kind is .*schedule_free.*set pretrain\.schedule"
                                          r"\.kind: constant"):
        sf_cfg(stdlib_data, tmp_path / "run", zero0, schedule={"kind": kind})


def test_an_ewa_is_refused(stdlib_data, zero0, tmp_path):
    with pytest.raises(ConfigError, match=r"pretrain\.ewa\.taus is set .*schedule_free.*set ewa\.taus: \[\]"):
        make_cfg(stdlib_data, tmp_path / "run", optimizer=SF, deepspeed_config=str(zero0))


def test_zero3_two_ranks_resume_bitwise(stdlib_data, tmp_path):
    """ZeRO-3 on 2 ranks: each rank's fp32 shard holds x at the save; resumed from step 15 (a save between evals),
    the run logs bitwise what the uninterrupted one logs."""
    kw = dict(train_tokens=8 * SEQ * 20, checkpoint={"every_steps": 5, "keep": 10},
              deepspeed_config="zero3.json")
    whole = make_cfg(stdlib_data, tmp_path / "whole", optimizer=SF, ewa={"taus": []}, **kw)
    run_subprocess(torchrun(2, "pretrain", str(write_cfg(whole, tmp_path / "whole.yaml"))))
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    _cut_back(tmp_path / "cut", 15)
    (tmp_path / "cut" / "config.yaml").write_text(
        (tmp_path / "cut" / "config.yaml").read_text().replace(str(tmp_path / "whole"), str(tmp_path / "cut")))
    cut = make_cfg(stdlib_data, tmp_path / "cut", optimizer=SF, ewa={"taus": []}, **kw)
    run_subprocess(torchrun(2, "pretrain", str(write_cfg(cut, tmp_path / "cut.yaml"))))
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut")
    assert [m["step"] for m in a] == [m["step"] for m in b] and a[-1]["step"] == 20
    for x, y in zip(a, b):
        for key in x:
            if not key.startswith("perf/"):
                assert x[key] == y[key], (x["step"], key)


def test_bf16_trains_and_evaluates_as_logged(stdlib_data, tmp_path):
    """bf16 (a GPU's precision; DeepSpeed's bf16 optimizer keeps the fp32 masters under ZeRO-1): the switch acts
    on the masters and reaches the bf16 weights; `cbs evaluate` (masters cast to bf16) gives the logged loss to
    one bf16 rounding step, as for AdamW (tests/test_precision.py)."""
    run_dir = tmp_path / "run"
    result = pretrain.main(sf_cfg(stdlib_data, run_dir, train_tokens=8 * SEQ * 40, precision="bf16",
                                  eval={"every_steps": 20}))
    evals = series(run_dir, "eval/loss")
    assert result["status"] == "completed" and evals[40] < evals[1] - 0.8
    got = evaluate.main(run_dir)["weights"]["raw"]["loss"]
    assert got == pytest.approx(evals[40], rel=2 ** -8)


def test_a_study_of_schedule_free_runs_keeps_no_ewa(tmp_path):
    """base.optimizer.kind schedule_free: every planned run has no EWA and stops on its (x) raw weights; taus
    given for it are refused by name."""
    from cbs.pipeline import study
    from test_study import BASE, study_cfg

    base = {**BASE, "optimizer": {"kind": "schedule_free"}}
    runs = study.plan(study_cfg(base=base), tmp_path, tmp_path / "data")
    assert {(tuple(r.taus), r.config["stop_weights"], r.config["optimizer"]["kind"]) for r in runs} == {
        ((), "any", "schedule_free")}
    with pytest.raises(ConfigError, match=r"hparams\.ewa_taus \[0\.99\] is given for runs whose optimizer\.kind is "
                                          r"schedule_free.*remove ewa_taus from study\.hparams"):
        study.plan(study_cfg(base=base, hparams={"ewa_taus": [0.99]}), tmp_path, tmp_path / "data")


@pytest.mark.slow
def test_a_schedule_free_study_with_half_life_betas_end_to_end(stdlib_data, tmp_path):
    """A real tiny study: schedule-free runs at 3 batches with half-life beta2: targets from the reference runs'
    x weights, every run reaches them, the fit reads the raw crossings and its report states the beta rule."""
    import subprocess

    import yaml

    from test_pretrain import ENV, ROOT
    from test_study import BASE

    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "name": "sf", "data": str(stdlib_data), "batch_sizes": [4, 8, 16],
        "settings": [{"model": {"preset": "tiny", "seq_len": 32}, "train_tokens": 15000}],
        "hparams": {"lr": [3e-3], "beta2_rule": "half_life", "half_life": {"ref_batch": 4}},
        "base": {**BASE, "optimizer": {"kind": "schedule_free"}}}))
    out = tmp_path / "s"
    proc = subprocess.run(cli("study", str(cfg_path), "--out", str(out), "--parallel", "2"), capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 3
    for run in runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        batch = config["global_batch_seqs"]
        assert config["optimizer"]["beta2"] == round(max(0.999 ** (batch / 4), 0.95), 6)
        assert config["study"]["betas"]["beta2_rule"] == "half_life" and config["ewa"]["taus"] == []
        result = json.loads((run / "result.json").read_text())
        assert result["status"] == "completed" and result["targets"][0]["raw"] is not None
    steps = (out / "fit" / "steps.csv").read_text()
    assert steps.count("\n") >= 4  # a header and the three batches
    report = (out / "fit" / "report.md").read_text()
    assert "AdamW betas per batch: beta1 fixed, beta2 half_life (beta2(B) = clip(0.999^(B/4), 0.95, 0.9999))" \
        in report
    assert "target crossing: raw (the runs keep no EWA weights)" in report  # the fit reads x, their raw weights


def test_a_branch_must_keep_the_optimizer(stdlib_data, sf_reference, tmp_path):
    """init_from a schedule-free run with AdamW (whose state has no z, and no averaging weights) is refused."""
    from cbs.pipeline.distributed import init_distributed

    cfg = make_cfg(stdlib_data, tmp_path / "branch", init_from={"run_dir": str(sf_reference), "step": 10})
    with pytest.raises(ConfigError, match=r"init_from: .* trained with optimizer\.kind schedule_free, whose state "
                                          r"this run's adamw cannot continue"):
        pretrain.Trainer(cfg, init_distributed(cfg.seed))


def test_zero3_sub_groups_that_split_a_parameter_group_are_refused(stdlib_data, tmp_path):
    """Each parameter group counts its own averaging steps; ZeRO-3 sub-groups smaller than a group would step it
    more than once per step."""
    from cbs.pipeline.distributed import init_distributed

    ds = tmp_path / "zero3_small.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "sub_group_size": 1000,
                                                    "stage3_param_persistence_threshold": 0}}))
    cfg = sf_cfg(stdlib_data, tmp_path / "run", ds)
    with pytest.raises(ConfigError, match=r"under ZeRO-3 needs one sub-group per parameter group.*raise "
                                          r"zero_optimization\.sub_group_size"):
        pretrain.Trainer(cfg, init_distributed(cfg.seed))
