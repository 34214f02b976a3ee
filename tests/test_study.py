"""study: planning (generators, names, per-batch defaults, bad input) and a small real study end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cbs.pipeline import executors, rundir, study, study_plan
from cbs.pipeline.config import ConfigError, PretrainConfig, StudyConfig, from_dict, load_config, to_dict
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
    chin = study_plan.expand_settings({"generator": "chinchilla", "models": ["85M", "151M"], "tokens_per_param": 20})
    assert [s.tokens for s in chin] == [20 * 12 * 12 * 768**2, 20 * 12 * 12 * 1024**2]
    assert [s.name for s in chin] == ["m85M_d1.7B", "m151M_d3.02B"]
    fixed_data = study_plan.expand_settings({"generator": "fixed_data", "tokens": 1e9, "models": ["85M", "302M"]})
    assert {s.tokens for s in fixed_data} == {10**9} and len({s.model_params for s in fixed_data}) == 2
    explicit = study_plan.expand_settings([{"model": {"preset": "tiny", "layers": 3}, "train_tokens": 5e5}])
    assert explicit[0].name == "mL3d128_d500K" and explicit[0].model.layers == 3


@pytest.mark.parametrize("raw, message", [
    ({"generator": "scaling"}, "generator must be one of fixed_model, fixed_data, chinchilla: got 'scaling'"),
    ({"generator": "fixed_model", "model": "tiny", "tokens": [1, 2], "oops": 1}, r"settings\.oops is not a key"),
    ([{"model": "huge", "train_tokens": 10}], r"preset must be one of"),
    ([{"model": "tiny"}], "must be a mapping with model and train_tokens"),
])
def test_bad_settings_are_named(raw, message):
    with pytest.raises(ConfigError, match=message):
        study_plan.expand_settings(raw)


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
    proc = subprocess.run(cli("study", str(cfg_path), "--out", str(out), "--parallel", "2", "--progress-every", "1"),
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # live progress: where each run logs (before any finishes), its step, tokens and loss while it trains, ETAs
    # (test_a_phase_eta_comes_from_the_running_runs_speed_and_the_slots_it_can_use: one before any run finishes;
    # these runs train for a few seconds only, so whether a report falls before the first finish is up to timing)
    before_first_finish = proc.stdout.split("[1/")[0]
    assert re.search(r"started \S+ \(log: \S+/runs/\S+/pretrain\.log\)", before_first_finish), proc.stdout[-3000:]
    assert re.search(r"\S+: step \d+/\d+, [\d.]+K? tokens, loss [\d.]+", proc.stdout), proc.stdout[-3000:]
    assert re.search(r"; ETA [\d.]+ (min|s)", proc.stdout), proc.stdout[-3000:]
    frozen = json.loads((out / "targets.json").read_text())
    assert set(frozen) == {"mL2d128_d15K", "mL2d128_d40K"}
    assert all(v["run"] in {p.name for p in (out / "runs").iterdir()} for v in frozen.values())
    targets = {k: v["loss"] for k, v in frozen.items()}
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
        if cfg.method.value == "ramp":  # the ramp beside its first and largest batch
            assert len(runs) == 3 and sum(r.schedule is not None for r in runs) == 1, path
        else:
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
    eight = ["--dry-run", "--partition", "gpu", "--gpus-per-node", "8"]
    refused = subprocess.run(args + eight, capture_output=True, text=True, env=ENV, cwd=ROOT)  # 8 ranks per run:
    assert refused.returncode == 2 and "study.batch_sizes [4, 8, 16] cannot be split over 8" in refused.stderr
    split = ["--set", "batch_sizes=[8, 16, 32]", "--set", "base.micro_batch_seqs=1"]  # batches that split on 8
    dry = subprocess.run(args + eight + split, capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert dry.returncode == 0, dry.stderr
    assert "--array=0-0%2" in dry.stdout and "--array=0-1%2" in dry.stdout  # reference, then the other runs
    assert "--gres=gpu:8" in dry.stdout and "--partition=gpu" in dry.stdout and "--time=00:30:00" in dry.stdout
    assert "#SBATCH" in dry.stdout  # the scripts are printed
    assert not (tmp_path / "s").exists()  # nothing written, nothing submitted


# ---------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("base, message", [
    ({"optimizer": {"lr": 1e-3}}, r"base\.optimizer\.lr is set by the study for each run \(from hparams\.lr\)"),
    ({"optimizer": {"beta2": 0.9}}, r"base\.optimizer\.beta2 is set by the study"),
    ({"ewa": {"taus": [0.9]}}, r"base\.ewa\.taus is set by the study"),
    ({"seed": 3}, r"base\.seed is set by the study .*from seeds"),
    ({"stop_at_targets": False}, r"base\.stop_at_targets is set by the study"),
    ({"stop_weights": "raw"}, r"base\.stop_weights is set by the study"),
])
def test_base_keys_the_study_sets_are_refused_by_name(base, message):
    """They used to be overridden without a word, although the README said they were refused."""
    with pytest.raises(ConfigError, match=message):
        study_cfg(base={**BASE, **base})


def test_schedules_that_decay_are_refused_with_the_reason(tmp_path):
    """Runs of a study train for different lengths, so a cosine/WSD schedule would give them different LR
    curves: a cosine study used to run to the end without a word. Without study.horizons it is refused, and the
    message says how to measure it (tests/test_horizons.py)."""
    for kind in ("cosine", "wsd"):
        cfg = study_cfg(base={**BASE, "schedule": {"kind": kind, "warmup_tokens": 2048}})
        with pytest.raises(ConfigError, match=rf"schedule\.kind is {kind}: a {kind} schedule decays over each "
                                              rf"run's own length.*give study\.horizons"):
            study.plan(cfg, tmp_path, tmp_path / "data")


def test_a_budget_inside_the_warmup_is_refused(tmp_path, caplog):
    cfg = study_cfg(base={**BASE, "schedule": {"warmup_tokens": 30000}})  # budgets 20000 and 60000
    with pytest.raises(ConfigError, match=r"warmup_tokens \(30000\) >= the budget of setting mL2d128_d20K"):
        study.plan(cfg, tmp_path, tmp_path / "data")
    study.plan(study_cfg(base={**BASE, "schedule": {"warmup_tokens": 12000}}), tmp_path, tmp_path / "data")
    assert "60% of the budget of mL2d128_d20K" in caplog.text  # allowed, but said


# ---------------------------------------------------------------------------------------------------- targets


def fake_run(path: Path, run: study_plan.Run, evals: list[tuple[int, float]], status: str = "completed",
             targets: list[float] = (), reason: str = "token budget trained") -> None:
    """A run directory as pretrain leaves it: config.yaml, metrics.jsonl (eval lines), result.json."""
    from cbs.pipeline.targets import TargetTracker, weight_kinds

    path.mkdir(parents=True, exist_ok=True)
    tps = run.batch * run.settings[0].model.seq_len
    keys = ["eval/loss"] + [f"eval/loss_ewa/{t}" for t in run.taus]
    lines = [json.dumps({"step": s, "tokens": s * tps, **{k: loss for k in keys}}) for s, loss in evals]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    resolved = to_dict(from_dict(PretrainConfig, {**run.config, "targets": list(targets)}, "pretrain"))
    resolved["resolved"] = {"tokens_per_step": tps}
    (path / "config.yaml").write_text(yaml.safe_dump(resolved))  # as pretrain writes it: every default filled
    tracker = TargetTracker(list(targets), weight_kinds(run.taus))
    tracker.replay([json.loads(line) for line in lines], tps)
    steps = evals[-1][0]
    (path / "result.json").write_text(json.dumps({
        "status": status, "reason": reason, "steps": steps, "total_steps": run.train_tokens // tps,
        "targets": tracker.to_json()}))


def test_targets_are_frozen_once_every_setting_has_one(tmp_path):
    """A failed reference run used to be skipped, and a later invocation (once it finished) changed the targets
    under runs already trained to the old ones."""
    cfg = study_cfg(hparams={"lr": [1e-3, 3e-3], "ewa_taus": [0.9]})
    runs = study.plan(cfg, tmp_path, tmp_path / "data")
    ref_a, ref_b = [r for r in runs if r.reference]
    tps = ref_a.batch * 32
    fake_run(tmp_path / "runs" / ref_a.name, ref_a, [(1, 6.0), (20000 // tps + 1, 4.0), (60000 // tps + 1, 3.0)])
    fake_run(tmp_path / "runs" / ref_b.name, ref_b, [(1, 6.0)], status="failed")
    first = study.freeze_targets(runs, tmp_path)
    assert first == {"mL2d128_d20K": 4.0, "mL2d128_d60K": 3.0}
    fake_run(tmp_path / "runs" / ref_b.name, ref_b, [(1, 6.0), (20000 // tps + 1, 3.5), (60000 // tps + 1, 2.5)])
    assert study.freeze_targets(runs, tmp_path) == first  # frozen: ref_b's better losses come too late
    (tmp_path / "stale").mkdir()
    os.replace(tmp_path / "runs" / ref_a.name, tmp_path / "stale" / ref_a.name)  # --force set it aside
    assert study.freeze_targets(runs, tmp_path) == {"mL2d128_d20K": 3.5, "mL2d128_d60K": 2.5}


def test_nan_losses_in_metrics_do_not_stop_the_study(tmp_path):
    """metrics.jsonl writes NaN as "nan": the target phase crashed on it after the reference runs."""
    cfg = study_cfg(hparams={"ewa_taus": [0.9]})
    runs = study.plan(cfg, tmp_path, tmp_path / "data")
    ref = next(r for r in runs if r.reference)
    tps = ref.batch * 32
    fake_run(tmp_path / "runs" / ref.name, ref, [(1, 6.0), (20000 // tps + 1, 4.0), (60000 // tps + 1, 3.0)])
    metrics = tmp_path / "runs" / ref.name / "metrics.jsonl"
    first, second, third = metrics.read_text().splitlines()
    metrics.write_text("\n".join([first.replace("6.0", '"inf"'), second, third.replace("3.0", '"nan"')]) + "\n")
    assert study.reference_targets(runs, tmp_path) == {"mL2d128_d20K": {"loss": 4.0, "run": ref.name}}


def test_finished_runs_get_crossings_of_the_current_targets(tmp_path):
    """Crossings are recomputed from the eval curve by target value; a run that stopped early at other targets
    and has not reached the current ones is reopened to train on."""
    cfg = study_cfg(hparams={"ewa_taus": [0.9]})
    runs = study.plan(cfg, tmp_path, tmp_path / "data")
    done, early = [r for r in runs if not r.reference][:2]
    curve = [(1, 6.0), (10, 4.5), (20, 3.9), (40, 3.4)]
    fake_run(tmp_path / "runs" / done.name, done, curve, targets=[4.2, 3.5])
    fake_run(tmp_path / "runs" / early.name, early, curve[:3], targets=[4.0], reason="every target reached")
    study.apply_targets(runs, {"mL2d128_d20K": 3.5, "mL2d128_d60K": 4.0}, tmp_path, tmp_path / "data", cfg)
    study.reconcile_finished(runs, tmp_path)
    result = json.loads((tmp_path / "runs" / done.name / "result.json").read_text())
    assert [t["loss"] for t in result["targets"]] == [3.5, 4.0]
    assert result["targets"][0]["ewa"]["0.9"]["step"] == 40 and result["targets"][1]["ewa"]["0.9"]["step"] == 20
    assert study.run_status(tmp_path / "runs" / early.name) == "started"  # 3.5 not reached: trains on
    assert (tmp_path / "runs" / early.name / "result.stale.json").is_file()


def test_force_keeps_only_runs_whose_settings_still_match(tmp_path):
    cfg = study_cfg()
    runs = study.plan(cfg, tmp_path, tmp_path / "data")
    same, other = runs[0], runs[1]
    fake_run(tmp_path / "runs" / same.name, same, [(1, 6.0)])
    changed = dict(other.config, optimizer={**other.config.get("optimizer", {}), "lr": 0.5})
    fake_run(tmp_path / "runs" / other.name, dataclasses.replace(other, config=changed), [(1, 6.0)])
    with pytest.raises(study.StudyError, match=rf"{other.name} \(optimizer differ\).*--force"):
        study.set_aside_stale(runs, tmp_path, force=False)
    study.set_aside_stale(runs, tmp_path, force=True)
    assert (tmp_path / "runs" / same.name / "result.json").is_file()
    assert not (tmp_path / "runs" / other.name).exists() and (tmp_path / "stale" / other.name).is_dir()


def test_status_lists_runs_in_batch_order(tmp_path):
    cfg = study_cfg(batch_sizes=[16, 4, 8])
    runs = study.plan(cfg, tmp_path, tmp_path / "data")
    study.write_run_inputs(runs, tmp_path)
    rows = study.status_table(tmp_path).splitlines()[1:-1]
    assert [r.split()[0] for r in rows] == [r.name for r in runs]  # the plan's order: batch, then lr
    assert [int(r.split()[1]) for r in rows] == [4, 8, 16]  # not alphabetical (b16 < b4 < b8)


# ---------------------------------------------------------------------------------------------------- branched


def test_branched_plan_branches_every_batch_from_each_checkpoint_of_one_base_run(tmp_path):
    cfg = study_cfg(method="branched", settings={"generator": "fixed_model",
                                                 "model": {"preset": "tiny", "seq_len": 32}, "tokens": [64000]},
                    branched={"at_fractions": [0.25, 1.0], "branch_tokens": 4096})
    runs = study.plan(cfg, tmp_path, tmp_path / "data")
    base, branches = runs[0], runs[1:]
    assert base.reference and base.name == "mL2d128_d64K_b4_lr0.00316_base"
    assert base.config["checkpoint"]["at_tokens"] == [16000, 64000]
    assert [b.name for b in branches[:3]] == ["mL2d128_d64K_b4_lr0.00316_t16K_b4", "mL2d128_d64K_b4_lr0.00316_t16K_b8",
                                              "mL2d128_d64K_b4_lr0.00316_t16K_b16"]
    assert len(branches) == 2 * 3  # branch points x batch sizes (the base batch included: k = 1)
    b16 = branches[2]
    assert b16.config["init_from"] == {"run_dir": base.config["run_dir"], "step": 125}  # 16000 / (4 x 32)
    assert b16.config["optimizer"]["lr"] == pytest.approx(base.lr * 2)  # sqrt(16 / 4)
    assert b16.config["train_tokens"] == 4096
    assert b16.config["ewa"]["taus"] == [pytest.approx(base.taus[0] ** 4)]  # averages over the same tokens
    assert b16.config["schedule"]["warmup_tokens"] == 0 and b16.branch["multiplier"] == 4
    with pytest.raises(ConfigError, match=r"branch points \[1024\] \(tokens\) fall inside the warmup"):
        study.plan(study_cfg(method="branched", branched={"at_fractions": [0.05, 0.5]},
                             settings={"generator": "fixed_model", "model": {"preset": "tiny", "seq_len": 32},
                                       "tokens": [20000]}), tmp_path, tmp_path / "data")
    with pytest.raises(ConfigError, match="method branched has one base run per setting"):
        study_cfg(method="branched", hparams={"lr": [1e-3, 3e-3]})
    with pytest.raises(ConfigError, match="method branched has no target losses"):  # its base runs would be skipped
        study_cfg(method="branched", targets={"losses": {"mL2d128_d20K": 4.0, "mL2d128_d60K": 3.5}})


def test_branched_rule_defaults_to_merrill_and_is_recorded_in_each_branch(tmp_path):
    runs = study.plan(study_cfg(method="branched", branched={"at_fractions": [1.0]}), tmp_path, tmp_path / "data")
    assert {(r.branch["rule"], r.branch["epsilon_nats"]) for r in runs if r.branch} == {("absolute", 0.01)}
    runs = study.plan(study_cfg(method="branched", branched={"at_fractions": [1.0], "rule": "relative"}),
                      tmp_path / "rel", tmp_path / "data")
    assert {r.branch["rule"] for r in runs if r.branch} == {"relative"}
    with pytest.raises(ConfigError, match=r"study.branched.epsilon_nats must be in \[0, 1\) nats: got -0.1"):
        study_cfg(method="branched", branched={"epsilon_nats": -0.1})
    with pytest.raises(ConfigError, match="study.branched.rule"):
        study_cfg(method="branched", branched={"rule": "median"})


class _FinishAsPretrain:
    """An executor whose `train` leaves each run as pretrain would have (config.yaml, result.json) with the
    outcome `outcomes` gives its (branch point, batch): the study's decisions without minutes of training."""

    def __init__(self, runs, root: Path, outcomes: dict):
        self.by_name, self.root, self.outcomes, self.waves = {r.name: r for r in runs}, root, outcomes, []

    def train(self, jobs, name, label):
        from test_analysis_branched import _result, _write_started

        self.waves.append(sorted(j.name for j in jobs))
        for job in jobs:
            run = self.by_name[job.name]
            status, loss = self.outcomes[run.branch["base_tokens"]][run.batch]
            path = _write_started(run, self.root)
            steps = 4096 // (run.batch * 32)
            (path / "result.json").write_text(json.dumps(
                _result(status, steps, steps * run.batch * 32, {} if loss is None else {"eval/loss": loss})))


def test_branches_past_a_points_first_failing_batch_are_never_trained(tmp_path, capsys):
    """Every branch used to be trained although the fit calls those after a failing batch "not needed" (12 of
    the 20 branches of the branched demo); and their console lines said "targets 0/0"."""
    from cbs.analysis.branched import cbs_curve, read_branched
    from test_analysis_branched import OUTCOMES, make_branched_study, study_config

    runs = study.plan(study_config(), tmp_path, tmp_path / "data")
    study.write_run_inputs(runs, tmp_path)
    executor = _FinishAsPretrain(runs, tmp_path, OUTCOMES)
    make_branched_study(tmp_path / "all")  # the same study with every branch trained, for the fit's verdicts
    shutil.rmtree(tmp_path / "runs" / runs[0].name)  # the base run, trained
    shutil.copytree(tmp_path / "all" / "runs" / runs[0].name, tmp_path / "runs" / runs[0].name)
    branches = runs[1:]
    study.train_branches(branches, tmp_path, executor, dry_run=False)
    trained = [n for wave in executor.waves for n in wave]
    assert len(trained) == len(set(trained)) == 12 and len(executor.waves) == 4  # one wave per batch
    assert all({r.batch for r in branches if r.name in wave} == {b} for wave, b in zip(executor.waves, [4, 8, 16, 32]))
    skipped = {r.name for r in branches if r.name not in trained}
    t = {r.name: (r.branch["base_tokens"], r.batch) for r in branches}
    # t = 8064: 8 fails (16, 32 not needed); 16000: 16 fails (32); 32000: 16 preempted, so 32 waits for it
    assert {t[n] for n in skipped} == {(8064, 16), (8064, 32), (16000, 32), (32000, 32)}
    assert study.not_needed(tmp_path) == skipped - {n for n in skipped if t[n] == (32000, 32)}
    assert "3 of 16 not trained (not needed" in capsys.readouterr().out
    full = {(p.tokens, p.cbs, p.cbs_high, p.complete) for p in cbs_curve(read_branched(tmp_path / "all"))}
    assert {(p.tokens, p.cbs, p.cbs_high, p.complete) for p in cbs_curve(read_branched(tmp_path))} == full
    table = study.status_table(tmp_path)
    assert table.count("not needed") == 4 and "3 not needed" in table  # 3 rows, then the count
    executor.waves.clear()
    study.train_branches(branches, tmp_path, executor, dry_run=False)  # run again: only the preempted one
    assert [[t[n] for n in wave] for wave in executor.waves] == [[(32000, 16)]]
    branch = next(r for r in branches if t[r.name] == (16000, 8))
    path = study.run_path(tmp_path, branch.name)
    note = executors.result_note(path, executors.read_result(path))
    assert note == ", 16 steps, final eval loss 3.6100"  # not "targets 0/0": a branch has none


# ---------------------------------------------------------------------------------------------------- progress


def test_status_shows_the_steps_and_tokens_a_running_run_has_logged(tmp_path):
    """Mid-run, `cbs status` showed empty steps and tokens while metrics.jsonl was at step 350."""
    from cbs.pipeline.metrics import Tracker

    runs = study.plan(study_cfg(), tmp_path, tmp_path / "data")
    study.write_run_inputs(runs, tmp_path)
    run = runs[0]
    path, tps = study.run_path(tmp_path, run.name), run.batch * 32
    (path / "config.yaml").write_text(yaml.safe_dump({**run.config, "resolved": {"total_steps": 469}}))
    tracker = Tracker(path, tensorboard=False)
    for step in range(5, 351, 5):
        tracker.log({"train/loss": 4.0}, step, step * tps)
    tracker.log({"eval/loss": 4.1}, 350, 350 * tps)  # the last line is an eval
    tracker.close()
    row = next(r for r in study.status_table(tmp_path).splitlines() if r.startswith(run.name)).split()
    assert row[3:6] == ["started", "350/469", "44.8K"]  # 350 x 4 x 32 tokens


def _popen_study(tmp_path: Path, data: Path, *flags: str) -> tuple[subprocess.Popen, Path]:
    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "stop", "data": str(data), "batch_sizes": [4, 8],
        "settings": {"generator": "fixed_model", "model": {"preset": "tiny", "seq_len": 32}, "tokens": [40000]},
        "hparams": {"ewa_taus": [0.95]}, "base": BASE}))
    out = tmp_path / "s"
    proc = subprocess.Popen(cli("study", str(cfg), "--out", str(out), *flags), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    return proc, out


@pytest.mark.slow
def test_a_study_stopped_before_its_runs_trained_claims_no_checkpoint(stdlib_data, tmp_path):
    """After Ctrl-C the study said "2 running run(s) saved a checkpoint" when neither had started training."""
    import signal

    proc, out = _popen_study(tmp_path, stdlib_data, "--parallel", "2")
    try:
        seen = [proc.stdout.readline() for _ in range(3)]  # study ..., reference runs: ..., started <run> (log: ...)
        assert "started" in seen[-1] and "pretrain.log" in seen[-1], seen
        proc.send_signal(signal.SIGINT)  # the runs are still importing torch: none has trained a step
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "0 of 1 running run(s) have a checkpoint to continue from" in stderr, stderr
    assert "had saved none" in stderr and "saved a checkpoint" not in stderr
    assert not any(rundir.has_checkpoints(p) for p in (out / "runs").iterdir())


def test_a_phase_eta_comes_from_the_running_runs_speed_and_the_slots_it_can_use(tmp_path):
    """The ETA appeared only once a run had finished ("ETA 0.0 min" at the end); and it must not spread one
    run's remaining time over slots that have nothing to run."""
    from cbs.pipeline.metrics import Tracker
    from cbs.pipeline.progress import RunWatch, study_eta_s

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"resolved": {"total_steps": 100}}))
    tracker = Tracker(tmp_path, tensorboard=False)
    for step in range(1, 11):
        tracker.log({"train/loss": 5.0 - step / 100}, step, step * 128)
    tracker.close()
    watch = RunWatch(tmp_path, started_s=0.0)
    assert watch.update(10.0).step == 10 and watch.remaining_s() is None  # one reading: no speed yet
    assert study_eta_s([watch], 10.0, [], pending=3, slots=2) is None
    tracker = Tracker(tmp_path, tensorboard=False, resume_step=10)
    for step in range(11, 31):
        tracker.log({"train/loss": 5.0 - step / 100}, step, step * 128)
    tracker.log({"eval/loss": 4.9}, 30, 30 * 128)  # an eval line after the last train line
    tracker.close()
    watch.update(20.0)
    assert watch.remaining_s() == pytest.approx(35.0)  # 20 steps in 10 s, 70 to go
    assert study_eta_s([watch], 20.0, [], pending=0, slots=2) == pytest.approx(35.0)  # not 35 / 2
    # 2 waiting runs of the running one's expected length (20 s so far + 35 s), over 2 slots
    assert study_eta_s([watch], 20.0, [], pending=2, slots=2) == pytest.approx((35 + 2 * 55) / 2)
    assert study_eta_s([watch], 20.0, [40.0], pending=2, slots=2) == pytest.approx((35 + 2 * 40) / 2)
    line = watch.line("run", 20.0)
    assert "run: step 30/100, 3.84K tokens, loss 4.700, at most 0.6 min left" in line


def test_runs_of_a_slurm_array_show_progress_once_they_log(tmp_path):
    """On Slurm the console only counted task states; it now shows each running task's progress too."""
    from cbs.pipeline.metrics import Tracker
    from cbs.pipeline.progress import LogWatcher

    runs = {name: tmp_path / name for name in ("queued", "running", "finished")}
    for name, path in runs.items():
        path.mkdir()
    for name in ("running", "finished"):
        (runs[name] / "config.yaml").write_text(yaml.safe_dump({"resolved": {"total_steps": 50}}))
        tracker = Tracker(runs[name], tensorboard=False)
        tracker.log({"train/loss": 4.5}, 5, 640)
        tracker.close()
    (runs["finished"] / "result.json").write_text(json.dumps({"status": "completed", "steps": 50}))
    watcher = LogWatcher(runs, every_s=20.0, now_s=0.0)
    assert watcher.poll(10.0) == []  # not due yet
    assert [line.split(":")[0].strip() for line in watcher.poll(20.0)] == ["running"]
    assert "running: step 5/50, 640 tokens, loss 4.500" in watcher.poll(40.0)[0]
    (runs["running"] / "result.json").write_text(json.dumps({"status": "completed", "steps": 50}))
    assert watcher.poll(60.0) == []


def test_a_study_made_before_a_new_config_key_is_resumed_not_refused(tmp_path):
    """Keys added to the study schema since a study was made (ramp, branched.rule, ...) changed its fingerprint:
    the re-run of an unchanged study was refused as "another study" unless --force."""
    import hashlib

    cfg = study_cfg()
    older = to_dict(cfg)
    for key in ("ramp", "branched"):  # as a cbs without these keys wrote it
        older.pop(key, None)
    stored = {k: v for k, v in older.items() if k != "slurm"}
    old_fingerprint = hashlib.sha256(json.dumps(stored, sort_keys=True, default=str).encode()).hexdigest()[:16]
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / study.STUDY_FILE).write_text(yaml.safe_dump({"name": cfg.name, "fingerprint": old_fingerprint,
                                                            "config": older}))
    study.claim_study_dir(cfg, tmp_path, force=False)  # the same study: accepted
    other = study_cfg(batch_sizes=[4, 8, 32])
    (tmp_path / study.STUDY_FILE).write_text(yaml.safe_dump({"name": cfg.name, "fingerprint": old_fingerprint,
                                                            "config": older}))
    with pytest.raises(study.StudyError, match="holds another study"):
        study.claim_study_dir(other, tmp_path, force=False)


def test_a_study_yaml_of_the_untyped_schema_is_the_same_study(tmp_path):
    """study.yaml written before settings and slurm were typed holds them as given (a generator mapping, `slurm: {}`):
    its study is still this one, so a re-run resumes."""
    raw = {"data": "unused", "batch_sizes": [4, 8, 16], "base": BASE, "slurm": {},
           "settings": {"generator": "fixed_model", "model": {"preset": "tiny", "seq_len": 32},
                        "tokens": [20000, 60000]}}
    cfg = from_dict(StudyConfig, json.loads(json.dumps(raw)), "study")
    (tmp_path / study.STUDY_FILE).write_text(yaml.safe_dump({"name": cfg.name, "fingerprint": "0" * 16, "config": raw}))
    study.claim_study_dir(cfg, tmp_path, force=False)
    again = yaml.safe_load((tmp_path / study.STUDY_FILE).read_text())["config"]
    assert from_dict(StudyConfig, again, "study") == cfg  # what is written reads back as the same study


@pytest.mark.parametrize("settings, names", [
    ([{"model": "tiny", "train_tokens": "20K", "target": 4.5},
      {"model": {"preset": "tiny", "seq_len": 32}, "train_tokens": 6e4, "name": "short"}], ["mtiny_d20K", "short"]),
    ({"generator": "fixed_data", "models": ["tiny", {"layers": 3, "hidden": 64}], "tokens": "20K"},
     ["mtiny_d20K", "mL3d64_d20K"]),
    ({"generator": "chinchilla", "models": ["tiny"], "tokens_per_param": 0.05}, ["mtiny_d19.7K"]),
])
def test_typed_settings_plan_as_before(settings, names):
    """Settings are typed at load (config/study.py); the planner reads the same settings from the typed form and
    from the YAML data, with the names of before (run directories are named after them)."""
    cfg = study_cfg(settings=settings)
    typed = study_plan.expand_settings(cfg.settings)
    assert [dataclasses.asdict(s) for s in typed] == \
        [dataclasses.asdict(s) for s in study_plan.expand_settings(json.loads(json.dumps(settings)))]
    assert [s.name for s in typed] == names


def test_the_plan_refuses_batches_that_do_not_split_over_the_ranks_of_a_run(tmp_path):
    """--gpus-per-run K (or Slurm's nodes x gpus_per_node) makes K data-parallel ranks per run: a batch that does
    not split into whole micro-batches on each would fail at its run's start; the plan refuses it, with the fix."""
    cfg = study_cfg(batch_sizes=[4, 8, 16], base={**BASE, "micro_batch_seqs": 4})
    with pytest.raises(ConfigError, match=r"study\.batch_sizes \[4\] cannot be split over 2 data-parallel ranks "
                                          r"\(--gpus-per-run 2\) with micro-batches of base\.micro_batch_seqs \(4\).*"
                                          r"set base\.micro_batch_seqs: 2"):
        study.plan(cfg, tmp_path, tmp_path, 2, "--gpus-per-run 2")
    with pytest.raises(ConfigError, match=r"study\.batch_sizes \[4, 8, 16\] cannot be split over 8 .*use batches that "
                                          r"are multiples of 8 x the micro-batch, or train each run on fewer ranks"):
        study.plan(cfg, tmp_path, tmp_path, 8, "--gpus-per-run 8")
    runs = study.plan(study_cfg(batch_sizes=[4, 8, 16], base={**BASE, "micro_batch_seqs": 2}), tmp_path, tmp_path, 2)
    for run in runs:  # what the plan accepts, pretrain lays out the same way on those ranks
        layout = from_dict(PretrainConfig, json.loads(json.dumps(run.config)), "pretrain").layout(2)
        assert layout.micro_batch_seqs == run.config["micro_batch_seqs"] == 2
        assert layout.gradient_accumulation == run.batch // 4


def test_the_plan_and_pretrain_agree_on_a_micro_batch_larger_than_the_batch(tmp_path):
    """A batch below base.micro_batch_seqs trains as one micro-batch of itself in a study; pretrain given the same
    config directly used to refuse it. Both now read it with one rule (cbs.batching)."""
    runs = study.plan(study_cfg(batch_sizes=[4, 8, 16], base={**BASE, "micro_batch_seqs": 8}), tmp_path, tmp_path)
    b4 = next(r for r in runs if r.batch == 4)
    assert b4.config["micro_batch_seqs"] == 4
    direct = from_dict(PretrainConfig, {**json.loads(json.dumps(b4.config)), "micro_batch_seqs": 8}, "pretrain")
    assert (direct.micro_batch, direct.layout(1).gradient_accumulation) == (4, 1)


def test_a_ramp_stage_that_does_not_split_is_refused_at_plan_time(tmp_path):
    """A ramp's middle stage was checked only when its run started."""
    cfg = study_cfg(method="ramp", batch_sizes=[4, 16], hparams={"lr": [2e-3], "ewa_taus": [0.9]},
                    ramp={"stages": [{"batch": 4, "until_tokens": 8000}, {"batch": 6, "until_tokens": 20000},
                                     {"batch": 16}]})
    with pytest.raises(ConfigError, match=r"study\.ramp's stage batches \[6\] are not divisible by "
                                          r"base\.micro_batch_seqs \(4\)"):
        study.plan(cfg, tmp_path, tmp_path)
