"""study: planning (generators, names, per-batch defaults, bad input) and a small real study end to end."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline import study
from pipeline.config import ConfigError, StudyConfig, from_dict, load_config
from test_pretrain import ENV, ROOT, cli

BASE = {"micro_batch_seqs": 4, "eval": {"every_steps": 1000, "growth": 1.2, "eval_tokens": 512},
        "log": {"every_steps": 5}, "checkpoint": {"every_steps": 0}, "schedule": {"warmup_tokens": 2048}}


def study_cfg(**kw) -> StudyConfig:
    data = {"data": "unused", "batch_sizes": [4, 8, 16], "base": BASE,
            "settings": {"generator": "fixed_model", "model": {"preset": "tiny", "seq_len": 32},
                         "tokens": [20000, 60000]}}
    data.update(kw)
    return from_dict(StudyConfig, data, "study")


def test_generators_expand_settings():
    chin = study.expand_settings({"generator": "chinchilla", "models": ["85M", "151M"], "tokens_per_param": 20})
    assert [s.tokens for s in chin] == [20 * 12 * 12 * 768**2, 20 * 12 * 12 * 1024**2]
    assert [s.name for s in chin] == ["m85M_d1.7B", "m151M_d3.02B"]
    fixed_data = study.expand_settings({"generator": "fixed_data", "tokens": 1e9, "models": ["85M", "302M"]})
    assert {s.tokens for s in fixed_data} == {10**9} and len({s.model_params for s in fixed_data}) == 2
    explicit = study.expand_settings([{"model": {"preset": "tiny", "layers": 3}, "train_tokens": 5e5}])
    assert explicit[0].name == "mL3d128_d500K" and explicit[0].model.layers == 3


@pytest.mark.parametrize("raw, message", [
    ({"generator": "scaling"}, "generator must be one of fixed_model, fixed_data, chinchilla: got 'scaling'"),
    ({"generator": "fixed_model", "model": "tiny", "tokens": [1, 2], "oops": 1}, r"settings\.oops is not a key"),
    ([{"model": "huge", "train_tokens": 10}], r"preset must be one of"),
    ([{"model": "tiny"}], "must be a mapping with model and train_tokens"),
])
def test_bad_settings_are_named(raw, message):
    with pytest.raises(ConfigError, match=message):
        study.expand_settings(raw)


def test_plan_runs_names_and_paper_defaults(tmp_path):
    cfg = study_cfg(batch_sizes=[64, 4096], base={**BASE, "micro_batch_seqs": 32}, hparams={"lr": [1e-3, 3e-3]})
    runs = study.plan(cfg, tmp_path, tmp_path / "data")
    assert [r.name for r in runs] == ["mL2d128_d60K_b64_lr0.001", "mL2d128_d60K_b64_lr0.003",
                                      "mL2d128_d60K_b4096_lr0.001", "mL2d128_d60K_b4096_lr0.003"]
    b64, b4096 = runs[0], runs[2]
    assert (b64.beta2, b64.taus, b4096.beta2, b4096.taus) == (0.999, [0.9995], 0.95, [0.995])  # docs/method.md table
    assert b64.reference and not b4096.reference
    assert b64.config["eval"]["at_tokens"] == [20000, 60000] and b64.config["train_tokens"] == 60000
    assert b4096.config["stop_at_targets"] is False and b4096.config["train_tokens"] == 4 * 60000
    assert [s["name"] for s in b4096.config["study"]["settings"]] == ["mL2d128_d20K", "mL2d128_d60K"]
    assert b4096.config["micro_batch_seqs"] == 32 and b4096.config["run_dir"].endswith(b4096.name)


def test_plan_refuses_bad_batches_and_base_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"batch_sizes \[12\] are not divisible by base.micro_batch_seqs \(8\)"):
        study.plan(study_cfg(batch_sizes=[4, 8, 12], base={**BASE, "micro_batch_seqs": 8}), tmp_path, tmp_path)
    with pytest.raises(ConfigError, match=r"base\.global_batch_seqs is set by the study"):
        study_cfg(base={"global_batch_seqs": 8})
    with pytest.raises(ConfigError, match="targets.losses has no loss for mL2d128_d60K"):
        study.plan(study_cfg(targets={"losses": {"mL2d128_d20K": 5.0}}), tmp_path, tmp_path)


def test_small_study_end_to_end(stdlib_data, tmp_path):
    """Reference targets, 3 batch sizes x 2 LRs (one of which diverges), evaluate, fit; then resume and refuse."""
    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "name": "small", "data": str(stdlib_data), "batch_sizes": [4, 8, 16],
        "settings": {"generator": "fixed_model", "model": {"preset": "tiny", "seq_len": 32},
                     "tokens": [15000, 40000]},
        "hparams": {"lr": [3e-3, 40.0], "ewa_taus": [0.95]},
        "base": {**BASE, "optimizer": {"grad_clip": 0.0}}}))
    out = tmp_path / "s"
    proc = subprocess.run(cli("study", str(cfg_path), "--out", str(out), "--parallel", "2"), capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    targets = json.loads((out / "targets.json").read_text())
    assert set(targets) == {"mL2d128_d15K", "mL2d128_d40K"}
    assert targets["mL2d128_d40K"] < targets["mL2d128_d15K"]  # more data, lower loss
    statuses = {p.name: study.run_status(p) for p in (out / "runs").iterdir()}
    assert len(statuses) == 6
    assert all(s == "completed" for n, s in statuses.items() if "lr0.003" in n)
    assert any(s == "diverged" for n, s in statuses.items() if "lr40" in n)  # and the study went on
    for name in (n for n, s in statuses.items() if s == "completed" and "lr0.003" in n):
        result = json.loads((out / "runs" / name / "result.json").read_text())
        assert [t["loss"] for t in result["targets"]] == [targets["mL2d128_d15K"], targets["mL2d128_d40K"]]
        assert all(t["ewa"]["0.95"] is not None for t in result["targets"])  # every target reached
        assert (out / "runs" / name / "eval.json").is_file()
    steps = (out / "fit" / "steps.csv").read_text()
    assert "mL2d128_d15K" in steps and "mL2d128_d40K" in steps
    assert "mL2d128_d40K" in (out / "fit" / "report.md").read_text()
    table = subprocess.run(cli("status", str(out)), capture_output=True, text=True, env=ENV, cwd=ROOT).stdout
    assert "6 runs:" in table and "diverged" in table
    again = subprocess.run(cli("study", str(cfg_path), "--out", str(out)), capture_output=True, text=True, env=ENV,
                           cwd=ROOT, timeout=300)
    assert again.returncode == 0 and "to train" not in again.stdout  # nothing retrained
    other = cfg_path.read_text().replace("name: small", "name: other")
    cfg_path.write_text(other)
    refused = subprocess.run(cli("study", str(cfg_path), "--out", str(out)), capture_output=True, text=True,
                             env=ENV, cwd=ROOT)
    assert refused.returncode == 2 and "holds another study" in refused.stderr


def test_shipped_study_configs_validate_and_plan(tmp_path):
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if "batch_sizes" not in data:
            continue
        cfg = load_config(StudyConfig, path)
        runs = study.plan(cfg, tmp_path / path.stem, tmp_path / "data")
        assert len({r.batch for r in runs}) >= 5, path


def _tiny_study(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "data": str(data), "batch_sizes": [4, 8, 16],
        "settings": {"generator": "fixed_model", "model": {"preset": "tiny", "seq_len": 32}, "tokens": [12000]},
        "hparams": {"ewa_taus": [0.95]}, "base": BASE, "slurm": {"time": "00:30:00", "max_parallel": 2}}))
    return path


@pytest.mark.slurm
def test_study_on_a_real_slurm(stdlib_data, tmp_path, slurm_cluster):
    cfg_path, out = _tiny_study(tmp_path, stdlib_data), tmp_path / "s"
    proc = subprocess.run(cli("study", str(cfg_path), "--out", str(out), "--executor", "slurm"), capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "submitted reference" in proc.stdout and "submitted runs" in proc.stdout
    assert {study.run_status(p) for p in (out / "runs").iterdir()} == {"completed"}
    assert all((p / "eval.json").is_file() for p in (out / "runs").iterdir())
    assert (out / "fit" / "report.md").is_file() and "mL2d128_d12K" in (out / "fit" / "cbs.csv").read_text()
    assert sorted(p.name.split("-")[1] for p in (out / "slurm").glob("*.out")) == \
        ["evaluate", "fit", "reference", "runs", "runs"]  # one log per job and array task


def test_slurm_dry_run_and_missing_sbatch(stdlib_data, tmp_path):
    cfg_path = _tiny_study(tmp_path, stdlib_data)
    args = cli("study", str(cfg_path), "--out", str(tmp_path / "s"), "--executor", "slurm")
    no_slurm = {**ENV, "PATH": str(Path(ENV["PATH"].split(":")[0]))}  # the venv's bin: python, no sbatch
    proc = subprocess.run(args, capture_output=True, text=True, env=no_slurm, cwd=ROOT)
    assert proc.returncode == 2 and "sbatch not found on PATH" in proc.stderr and "--executor local" in proc.stderr
    assert not (tmp_path / "s").exists()
    if subprocess.run(["which", "sbatch"], capture_output=True).returncode:
        pytest.skip("no sbatch here for --dry-run: covered where Slurm is installed")
    dry = subprocess.run(args + ["--dry-run", "--partition", "gpu", "--gpus-per-node", "8"], capture_output=True,
                         text=True, env=ENV, cwd=ROOT)
    assert dry.returncode == 0, dry.stderr
    assert "--array=0-0%2" in dry.stdout and "--array=0-1%2" in dry.stdout  # reference, then the other runs
    assert "--gres=gpu:8" in dry.stdout and "--partition=gpu" in dry.stdout and "--time=00:30:00" in dry.stdout
    assert "#SBATCH" in dry.stdout  # the scripts are printed
    assert not (tmp_path / "s").exists()  # nothing written, nothing submitted
