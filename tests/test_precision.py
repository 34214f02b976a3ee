"""The GPU's precision path on the CPU: DeepSpeed's bf16 mode runs on its CPU accelerator, so CI trains the
same bf16 run a GPU would: bf16 weights with fp32 masters, fp32 EWA averages, eval, checkpoint, exact resume,
and `cbs evaluate` (fp32 master weights cast to bf16) agreeing with what pretrain logged."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cbs.pipeline import evaluate, rundir
from cbs.pipeline.config import ConfigError
from cbs.pipeline.distributed import deepspeed_config
from test_pretrain import SEQ, cli, make_cfg, run_subprocess, series, write_cfg
from test_resilience import sigterm_after

STEPS = 30


def bf16_cfg(data, run_dir, **kw):
    return make_cfg(data, run_dir, train_tokens=8 * SEQ * STEPS, precision="bf16", targets=[5.8],
                    checkpoint={"every_steps": 10, "keep": 3}, **kw)


def test_precision_is_decided_by_the_run_config(stdlib_data, tmp_path):
    auto = make_cfg(stdlib_data, tmp_path / "r")
    assert deepspeed_config(auto, 1, cuda=False)["bf16"]["enabled"] is False  # auto: fp32 on the CPU
    assert deepspeed_config(auto, 1, cuda=True)["bf16"]["enabled"] is True  # and bf16 on a GPU
    assert deepspeed_config(make_cfg(stdlib_data, tmp_path / "r", precision="fp32"), 1, True)["bf16"]["enabled"] is False
    assert deepspeed_config(make_cfg(stdlib_data, tmp_path / "r", precision="bf16"), 1, False)["bf16"]["enabled"]
    with pytest.raises(ConfigError, match=r"precision must be one of 'auto', 'bf16', 'fp32': got 'fp16'"):
        make_cfg(stdlib_data, tmp_path / "r", precision="fp16")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match=r"ds\.json sets bf16\.enabled: the precision comes from pretrain\.precision"):
        deepspeed_config(make_cfg(stdlib_data, tmp_path / "r", deepspeed_config=str(ds)), 1, False)


@pytest.mark.slow
def test_bf16_run_trains_resumes_exactly_and_evaluates_as_logged(stdlib_data, tmp_path):
    whole = bf16_cfg(stdlib_data, tmp_path / "whole")
    run_subprocess(cli("pretrain", str(write_cfg(whole, tmp_path / "whole.yaml"))))
    losses = series(tmp_path / "whole", "eval/loss")
    assert losses[STEPS] < losses[1] - 0.8  # it learns in bf16
    resolved = yaml.safe_load((tmp_path / "whole" / "config.yaml").read_text())["resolved"]
    assert resolved["precision"] == "bf16" and resolved["deepspeed"]["bf16"]["enabled"] is True
    tag_dir = tmp_path / "whole" / "checkpoints" / rundir.tag(STEPS)
    module = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    weights = [v for v in module.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert weights and {v.dtype for v in weights} == {torch.bfloat16}  # bf16 weights
    ewa = torch.load(rundir.ewa_file(tag_dir, 0), map_location="cpu", weights_only=True)
    assert {a.dtype for a in ewa["averages"]["0.9"]} == {torch.float32}  # fp32 averages of the bf16 weights

    # cbs evaluate reads the fp32 master weights and casts them to bf16: the weights the run evaluated with.
    # Tolerance 2^-8 relative, one bf16 rounding step: both forwards are bf16 from the same bf16 weights, and
    # only the order of float reductions may differ between the engine and a bare module.
    out = evaluate.main(tmp_path / "whole")
    logged = {"raw": losses[STEPS], "ewa/0.9": series(tmp_path / "whole", "eval/loss_ewa/0.9")[STEPS]}
    for kind, value in logged.items():
        assert out["weights"][kind]["loss"] == pytest.approx(value, rel=2**-8), kind

    cut = bf16_cfg(stdlib_data, tmp_path / "cut")
    cut_yaml = write_cfg(cut, tmp_path / "cut.yaml")
    code, _, stderr = sigterm_after(cut_yaml, tmp_path / "cut", step=14)
    assert code == 75, stderr[-2000:]
    run_subprocess(cli("pretrain", str(cut_yaml)))
    for key in ("train/loss", "eval/loss", "eval/loss_ewa/0.9", "grad_norm"):
        assert series(tmp_path / "cut", key) == series(tmp_path / "whole", key), key  # bitwise: same bf16 maths
