"""The GPU tier (`pytest -m gpu`; `make gpu-check` runs it): what a CPU cannot check. Skipped without CUDA.

- a bf16 step with SDPA's flash kernel (forced: a mask or a layout that flash refuses fails here, not silently
  on the slower math kernel);
- a bf16 run on one GPU: trains, EWA, eval, checkpoints, an exact resume after SIGTERM, the noise scale, and
  `cbs evaluate` equal to what pretrain logged;
- the peak memory of the 50k-vocabulary loss at the 151M shape (printed; bounded);
- 2 ranks over NCCL against 1 rank (where the machine has >= 2 GPUs; skipped, saying so, on one);
- a local study on the GPU with --gpus-per-run, runs sharing the GPU.

Subprocesses run with DS_ACCELERATOR=cuda (the CPU tests force the CPU accelerator in theirs)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from cbs.pipeline import rundir
from test_model import VOCAB, build, megatron_process, preset, tokens  # noqa: F401 (autouse: parallel_state)
from test_pretrain import ROOT, SEQ, cli, make_cfg, series, torchrun, write_cfg
from test_resilience import sigterm_after
from test_study import _tiny_study

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check)")]
GPU_ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
GPU_ENV["DS_ACCELERATOR"] = "cuda"
STEPS = 30


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=GPU_ENV, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_bf16_step_runs_on_the_flash_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cbs.pipeline.model as M

    cfg = preset("tiny", seq_len=256)
    model = build(cfg, device="cuda", params_dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # only flash: raises if our call cannot use it
        loss, per_token = M.forward_loss(model, tokens(4, cfg).cuda())
        loss.backward()
    assert per_token.dtype == torch.float32 and per_token.shape == (4, cfg.seq_len)
    assert abs(loss.item() - math.log(M.padded_vocab(VOCAB))) < 0.5
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


def test_bf16_run_on_a_gpu_trains_resumes_exactly_and_evaluates_as_logged(stdlib_data, tmp_path):
    def cfg(name):
        return make_cfg(stdlib_data, tmp_path / name, train_tokens=8 * SEQ * STEPS, targets=[5.8],
                        checkpoint={"every_steps": 10, "keep": 3})  # precision auto: bf16 on a GPU

    run(cli("pretrain", str(write_cfg(cfg("whole"), tmp_path / "whole.yaml"))))
    resolved = yaml.safe_load((tmp_path / "whole" / "config.yaml").read_text())["resolved"]
    assert resolved["deepspeed"]["bf16"]["enabled"] is True
    losses = series(tmp_path / "whole", "eval/loss")
    assert losses[STEPS] < losses[1] - 0.8
    noise = [v for v in series(tmp_path / "whole", "train/noise_scale").values() if math.isfinite(v)]
    assert noise and all(v > 0 for v in noise)  # micro 4 x accumulation 2: B_simple is measured
    ewa = torch.load(rundir.ewa_file(tmp_path / "whole" / "checkpoints" / rundir.tag(STEPS), 0),
                     map_location="cpu", weights_only=True)
    assert {a.dtype for a in ewa["averages"]["0.9"]} == {torch.float32}

    run(cli("evaluate", str(tmp_path / "whole")))
    out = json.loads((tmp_path / "whole" / "eval.json").read_text())
    logged = {"raw": losses[STEPS], "ewa/0.9": series(tmp_path / "whole", "eval/loss_ewa/0.9")[STEPS]}
    for kind, value in logged.items():  # one bf16 rounding step (see test_precision)
        assert out["weights"][kind]["loss"] == pytest.approx(value, rel=2**-8), kind

    cut_yaml = write_cfg(cfg("cut"), tmp_path / "cut.yaml")
    code, _, stderr = sigterm_after(cut_yaml, tmp_path / "cut", step=14, env=GPU_ENV)
    assert code == 75, stderr[-3000:]
    run(cli("pretrain", str(cut_yaml)))
    for key in ("train/loss", "eval/loss", "eval/loss_ewa/0.9", "grad_norm"):
        assert series(tmp_path / "cut", key) == series(tmp_path / "whole", key), key  # bitwise on the GPU too


def _peak_train_step_bytes(vocab: int, micro: int) -> int:
    """Peak CUDA memory of one forward + backward of the 151M shape in bf16, above what the model holds."""
    import cbs.pipeline.model as M

    cfg = preset("151M")
    M.seed_model_parallel(0)
    model = M.build_model(cfg, vocab, device="cuda", params_dtype=torch.bfloat16)
    batch = torch.randint(0, vocab, (micro, cfg.seq_len + 1), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, _ = M.forward_loss(model, batch)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del model, batch, loss
    torch.cuda.empty_cache()
    return peak


def test_peak_memory_of_the_50k_vocabulary_loss_at_the_151M_shape():
    """The memory a 50k vocabulary adds to a step (LM head + fp32 cross entropy), against a 512-piece one with
    the same body, in units of one fp32 copy of the logits (tokens x padded vocab x 4 bytes). megatron's
    cross entropy keeps the bf16 logits, an fp32 copy and its exp/softmax for the backward: about 3-4 units; a
    loss that materialises more (an extra upcast, a one-hot target) shows up here."""
    import cbs.pipeline.model as M

    micro, seq = 4, preset("151M").seq_len
    extra = _peak_train_step_bytes(50257, micro) - _peak_train_step_bytes(512, micro)
    unit = micro * seq * M.padded_vocab(50257) * 4
    print(f"151M, micro {micro} x seq {seq}: the 50k vocabulary adds {extra / 2**30:.2f} GiB to a step's peak "
          f"= {extra / unit:.2f} fp32 logits copies ({unit / 2**30:.2f} GiB each)")
    assert 0 < extra < 5 * unit


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=f"2 ranks over NCCL need >= 2 GPUs: this machine has "
                                                          f"{torch.cuda.device_count()}")
def test_two_ranks_over_nccl_train_the_one_rank_curve(stdlib_data, tmp_path):
    def cfg(name):
        return make_cfg(stdlib_data, tmp_path / name, train_tokens=8 * SEQ * 20, log={"every_steps": 1},
                        precision="fp32", checkpoint={"every_steps": 0})

    run(cli("pretrain", str(write_cfg(cfg("one"), tmp_path / "one.yaml"))))
    run(torchrun(2, "pretrain", str(write_cfg(cfg("two"), tmp_path / "two.yaml"))))
    one, two = series(tmp_path / "one", "train/loss"), series(tmp_path / "two", "train/loss")
    assert one.keys() == two.keys() and abs(one[1] - two[1]) < 1e-4  # same batches, other reduction order
    assert max(abs(one[s] - two[s]) for s in one) < 1e-3  # TF32 off in fp32; drift stays small over 20 steps


def test_local_study_on_the_gpu_with_runs_sharing_it(stdlib_data, tmp_path):
    out = tmp_path / "s"
    proc = run([sys.executable, "-m", "cbs.pipeline.cli", "study", str(_tiny_study(tmp_path, stdlib_data)),
                "--out", str(out), "--gpus-per-run", "1", "--parallel", "3"], timeout=600)
    assert "3 run(s) at a time on GPUs" in proc.stdout, proc.stdout[-2000:]
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 3
    for run_dir in runs:
        assert json.loads((run_dir / "result.json").read_text())["status"] == "completed", run_dir.name
        resolved = yaml.safe_load((run_dir / "config.yaml").read_text())["resolved"]
        assert resolved["deepspeed"]["bf16"]["enabled"] is True  # trained on the GPU, in bf16
    assert (out / "fit" / "report.md").is_file()


def test_a_cpu_run_on_a_gpu_machine_stays_on_the_cpu(stdlib_data, tmp_path):
    """DS_ACCELERATOR=cpu (what the CPU tests and CPU studies set) trains on the CPU even where CUDA exists."""
    cfg = make_cfg(stdlib_data, tmp_path / "cpu", train_tokens=8 * SEQ * 5, checkpoint={"every_steps": 0})
    proc = subprocess.run(cli("pretrain", str(write_cfg(cfg, tmp_path / "cpu.yaml"))), capture_output=True,
                          text=True, env={**GPU_ENV, "DS_ACCELERATOR": "cpu"}, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = yaml.safe_load((tmp_path / "cpu" / "config.yaml").read_text())["resolved"]
    assert resolved["deepspeed"]["bf16"]["enabled"] is False  # precision auto: fp32, as on a CPU machine
