"""Study variants: the plan (run names, merged configs, the reference variant's shared targets), bad input named by
key, the fit per (setting, variant) on synthetic studies with a known truth (the crossing batch of two fitted
S(B)), and one small real study with two variants through `cbs study` and `cbs fit`."""

from __future__ import annotations

import csv
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from cbs.analysis.cli import fit_main
from cbs.analysis.outputs import CBS_COLUMNS, STEPS_COLUMNS
from cbs.analysis.variants import crossover_batch
from cbs.pipeline import study, study_plan
from cbs.pipeline.config import ConfigError, StudyConfig, from_dict
from test_pretrain import ENV, ROOT, cli

BASE = {"micro_batch_seqs": 4, "eval": {"every_steps": 1000, "growth": 1.2, "eval_tokens": 512},
        "log": {"every_steps": 5}, "checkpoint": {"every_steps": 0}, "schedule": {"warmup_tokens": 2048}}


def study_cfg(**kw) -> StudyConfig:
    data = {"data": "unused", "batch_sizes": [4, 8, 16], "base": BASE, "hparams": {"ewa_taus": [0.9]},
            "settings": {"generator": "fixed_model", "model": {"preset": "tiny", "seq_len": 32},
                         "tokens": [20000, 60000]}}
    data.update(kw)
    return from_dict(StudyConfig, data, "study")


VARIANTS = {"ewa": {}, "no_ewa": {"hparams": {"ewa_taus": []}},
            "s16": {"model": {"seq_len": 16}, "eval": {"growth": 1.5}}}


# ---------------------------------------------------------------------------------------------------- plan


def test_variants_sweep_the_same_grid_with_merged_configs(tmp_path):
    runs = study.plan(study_cfg(variants=VARIANTS), tmp_path, tmp_path / "data")
    assert len(runs) == 9
    by_name = {r.name: r for r in runs}
    assert sorted(by_name) == sorted(f"mL2d128_d60K_b{b}_lr0.00316_{v}" for b in (4, 8, 16) for v in VARIANTS)
    ewa, raw, s16 = (by_name[f"mL2d128_d60K_b8_lr0.00316_{v}"].config for v in VARIANTS)
    assert ewa["ewa"]["taus"] == [0.9] and ewa["stop_weights"] == "ewa"
    assert raw["ewa"]["taus"] == [] and raw["stop_weights"] == "any"  # no EWA: it stops on the raw weights
    assert s16["model"]["seq_len"] == 16 and ewa["model"]["seq_len"] == 32
    assert s16["eval"]["growth"] == 1.5 and s16["eval"]["eval_tokens"] == 512  # merged over base, key by key
    assert ewa["eval"]["growth"] == 1.2
    for config, name in ((ewa, "ewa"), (raw, "no_ewa"), (s16, "s16")):
        assert config["study"]["variant"] == name
        assert config["study"]["variants"] == list(VARIANTS) and config["study"]["reference_variant"] == "ewa"
        assert config["run_dir"].endswith(f"_{name}")
    # only the reference variant's runs at B0 are reference runs; the others chase its targets
    assert [r.name for r in runs if r.reference] == ["mL2d128_d60K_b4_lr0.00316_ewa"]
    assert by_name["mL2d128_d60K_b4_lr0.00316_no_ewa"].train_tokens == 4 * 60000


def test_a_study_without_variants_plans_as_before(tmp_path):
    runs = study.plan(study_cfg(), tmp_path, tmp_path / "data")
    assert [r.name for r in runs] == [f"mL2d128_d60K_b{b}_lr0.00316" for b in (4, 8, 16)]
    assert all("variant" not in r.config["study"] for r in runs)


def test_axes_name_the_product_of_their_values(tmp_path):
    cfg = study_cfg(axes={"avg": {"ewa": {}, "raw": {"hparams": {"ewa_taus": []}}},
                          "ctx": {"s16": {"model": {"seq_len": 16}}, "s32": {}}}, reference_variant="raw-s32")
    runs = study.plan(cfg, tmp_path, tmp_path / "data")
    variants = list(dict.fromkeys(r.variant.name for r in runs))
    assert variants == ["ewa-s16", "ewa-s32", "raw-s16", "raw-s32"]
    raw16 = next(r for r in runs if r.variant.name == "raw-s16")
    assert raw16.config["model"]["seq_len"] == 16 and raw16.config["ewa"]["taus"] == []
    assert [r.name for r in runs if r.reference] == ["mL2d128_d60K_b4_lr0.00316_raw-s32"]


def test_every_variant_shares_the_reference_variants_targets(tmp_path):
    """The reference runs of the reference variant set each setting's target; every variant's runs get that same
    loss and train until they reach it, so their steps to target compare."""
    from test_study import fake_run

    cfg = study_cfg(variants=VARIANTS, reference_variant="no_ewa")
    runs = study.plan(cfg, tmp_path, tmp_path / "data")
    (ref,) = [r for r in runs if r.reference]
    assert ref.variant.name == "no_ewa" and ref.taus == []
    tps = ref.batch * 32
    fake_run(tmp_path / "runs" / ref.name, ref, [(1, 6.0), (20000 // tps + 1, 4.0), (60000 // tps + 1, 3.0)])
    targets = study.freeze_targets(runs, tmp_path)
    assert targets == {"mL2d128_d20K": 4.0, "mL2d128_d60K": 3.0}  # the raw loss: the variant keeps no EWA
    study.apply_targets(runs, targets, tmp_path, tmp_path / "data", cfg)
    for r in runs:
        assert r.config["targets"] == [4.0, 3.0], r.name
        assert r.config["stop_at_targets"] is (r is not ref)
        assert yaml.safe_load((tmp_path / "runs" / r.name / "run.yaml").read_text())["targets"] == [4.0, 3.0]


@pytest.mark.parametrize("kw, message", [
    ({"variants": {"a": {"optimzer": {"beta1": 0.9}}}},
     r"study\.variants\.a\.optimzer is not a known key; did you mean study\.variants\.a\.optimizer\?"),
    ({"variants": {"a": {"eval": {"growth": "fast"}}}}, r"study\.variants\.a\.eval\.growth must be a number"),
    ({"variants": {"a": {"model": {"seq_len": 0}}}}, r"study\.variants\.a\.model\.seq_len must be >= 1"),
    ({"variants": {"a": {"model": {"preset": "85M"}}}}, r"study\.variants\.a\.model\.preset: a variant changes"),
    ({"variants": {"a": {"optimizer": {"lr": 1e-3}}}},
     r"study\.variants\.a\.optimizer\.lr is set by the study for each run \(from hparams\.lr\).*own hparams\.lr"),
    ({"variants": {"a": {"ewa": {"taus": [0.9]}}}},
     r"study\.variants\.a\.ewa\.taus is set by the study .*hparams\.ewa_taus \(\[\] for no EWA\)"),
    ({"variants": {"a": {"global_batch_seqs": 8}}}, r"study\.variants\.a\.global_batch_seqs is set by the study"),
    ({"variants": {"a": {"seed": 3}}}, r"study\.variants\.a\.seed is set by the study .*from seeds"),
    ({"variants": {"a": {"hparams": {"lrs": [1e-3]}}}}, r"study\.variants\.a\.hparams\.lrs is not a known key"),
    ({"variants": {"a/b": {}}}, r"study\.variants\.a/b: the name 'a/b' goes into run names"),
    ({"variants": {"a": 3}}, r"study\.variants\.a must be a mapping of pretrain keys"),
    ({"variants": {}}, r"study\.variants must map variant names to pretrain keys"),
    ({"variants": {"a": {}}, "reference_variant": "b"}, r"study\.reference_variant 'b' is not a variant: give one of a"),
    ({"reference_variant": "b"}, r"study\.reference_variant needs study\.variants or study\.axes"),
    ({"variants": {"a": {}}, "axes": {"x": {"a": {}}}}, r"study: give variants or axes, not both"),
    ({"axes": {"x": {"v": {"ewa": {"taus": [0.9]}}}}}, r"study\.axes\.x\.v\.ewa\.taus is set by the study"),
    ({"variants": {"a": {}}, "method": "branched", "hparams": {"lr": [1e-3]}},
     r"study\.variants: method branched is not supported with variants"),
    ({"method": "branched", "hparams": {"ewa_taus": []}}, r"study\.hparams\.ewa_taus: \[\] \(no EWA\) is for method sweep"),
])
def test_bad_variants_are_named_at_load(kw, message):
    with pytest.raises(ConfigError, match=message):
        study_cfg(**kw)



def test_each_variant_follows_its_own_beta_rules_and_optimizer(tmp_path):
    """A variant's hparams merge over the study's key by key (half_life constants too); its own beta2 rule drops
    the study's fixed beta2 values; a schedule-free variant keeps no EWA though the study's others do; the study's
    fit reads each run at the weights it kept."""
    cfg = study_cfg(hparams={"ewa_taus": [0.9], "beta2": [0.98]}, variants={
        "fixed": {},
        "hl": {"hparams": {"beta2_rule": "half_life", "half_life": {"ref_batch": 8}}},
        "sf": {"optimizer": {"kind": "schedule_free"}}})
    runs = {r.name: r for r in study.plan(cfg, tmp_path, tmp_path / "data")}
    at4 = {v: runs[f"mL2d128_d60K_b4_lr0.00316_{v}"].config for v in ("fixed", "hl", "sf")}
    assert at4["fixed"]["optimizer"]["beta2"] == 0.98 and at4["sf"]["optimizer"]["beta2"] == 0.98
    assert at4["hl"]["optimizer"]["beta2"] == pytest.approx(0.999 ** (4 / 8), abs=1e-6)  # ref_batch 8, ref 0.999
    assert at4["hl"]["study"]["betas"]["beta2_rule"] == "half_life"
    assert at4["sf"]["ewa"]["taus"] == [] and at4["sf"]["stop_weights"] == "any"
    assert at4["fixed"]["ewa"]["taus"] == [0.9]


@pytest.mark.parametrize("variants, key", [
    ({"a": {}, "b1": {"optimizer": {"beta1": 0.9}, "hparams": {"beta1_rule": "half_life"}}},
     r"study\.variants\.b1\.optimizer\.beta1 is 0\.9 but study\.variants\.b1\.hparams\.beta1_rule is half_life"),
    ({"a": {}, "b1": {"optimizer": {"beta1": 0.9}}},  # the study's rule would replace the variant's beta1
     r"study\.variants\.b1\.optimizer\.beta1 is 0\.9 but study\.variants\.b1\.hparams\.beta1_rule is paper"),
])
def test_a_variant_beta1_that_a_beta1_rule_would_replace_is_refused(variants, key):
    hparams = {"ewa_taus": [0.9]} if "hparams" in variants["b1"] else {"ewa_taus": [0.9], "beta1_rule": "paper"}
    with pytest.raises(ConfigError, match=key):
        study_cfg(hparams=hparams, variants=variants)

def test_a_variant_value_that_clashes_with_base_names_the_variant(tmp_path):
    """Checked alone a variant's keys are fine; merged over base into a run they may not be: the error names the
    variant's key, not study.base's or the run's."""
    cfg = study_cfg(variants={"a": {}, "cos": {"schedule": {"kind": "cosine"}}})
    with pytest.raises(ConfigError, match=r"study\.variants\.cos\.schedule\.kind is cosine: a cosine schedule decays"):
        study.plan(cfg, tmp_path, tmp_path / "data")
    cfg = study_cfg(variants={"a": {}, "m": {"micro_batch_seqs": 3}})
    with pytest.raises(ConfigError, match=r"batch_sizes \[4, 8, 16\] are not divisible by study\.variants\.m\.micro"):
        study.plan(cfg, tmp_path, tmp_path / "data")


def test_bad_variant_exits_2_through_the_cli_and_writes_nothing(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"data": str(tmp_path), "batch_sizes": [4, 8], "settings": [
        {"model": "tiny", "train_tokens": 100000}], "variants": {"a": {"optimizer": {"beta2": 0.9}}}}))
    proc = subprocess.run(cli("study", str(path), "--out", str(tmp_path / "s")), capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "study.variants.a.optimizer.beta2 is set by the study for each run" in proc.stderr
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------------------------- analysis


TRUTH = {"ewa": (1000.0, 100.0, 128), "plain": (700.0, 400.0, 64)}  # S_min, B_noise, seq_len
SWEEP = [16, 32, 64, 128, 256, 512, 1024]


def synthetic_study(root: Path, truth: dict, batches=SWEEP, reference: str = "ewa", sd: float = 0.01,
                    budgets: dict | None = None) -> Path:
    """A study directory as `cbs study` leaves one, with variants of known S(B) = S_min (1 + B_noise / B): runs
    of the `plain` variant keep no EWA weights (only raw crossings), as a `hparams.ewa_taus: []` variant.
    `budgets`: {setting: (tokens, {variant: (S_min, B_noise)})} served by the same runs (one sweep), instead of
    the one setting s1 of `truth`."""
    rng = np.random.default_rng(0)
    budgets = budgets or {"s1": (10**8, {v: t[:2] for v, t in truth.items()})}
    for variant, (_, _, seq_len) in truth.items():
        for b in batches:
            run = root / "runs" / f"m_b{b}_{variant}"
            run.mkdir(parents=True)
            has_ewa = variant != "plain"
            settings = [{"name": name, "model_params": 10**6, "tokens": tokens, "target_loss": 3.0 + i}
                        for i, (name, (tokens, _)) in enumerate(budgets.items())]
            (run / "config.yaml").write_text(yaml.safe_dump({
                "global_batch_seqs": b, "model": {"seq_len": seq_len}, "ewa": {"taus": [0.99] if has_ewa else []},
                "study": {"variant": variant, "variants": list(truth), "reference_variant": reference,
                          "settings": settings}}))
            targets = []
            for i, (tokens, fits) in enumerate(budgets.values()):
                s_min, b_noise = fits[variant]
                steps = round(s_min * (1 + b_noise / b) * math.exp(rng.normal(0, sd)), 3)
                crossing = {"step": math.ceil(steps), "tokens": 1, "step_interp": steps}
                targets.append({"loss": 3.0 + i, "raw": None if has_ewa else crossing,
                                "ewa": {"0.99": crossing} if has_ewa else {}})
            (run / "result.json").write_text(json.dumps({"status": "completed", "steps": 10**6, "targets": targets}))
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_crossover_batch_solves_the_two_hyperbolas():
    # a1 + b1/B = a2 + b2/B with a = S_min, b = S_min B_noise: (280000 - 100000) / (1000 - 700) = 600
    assert crossover_batch(1000, 100, 700, 400) == pytest.approx(600)
    assert crossover_batch(700, 400, 1000, 100) == pytest.approx(600)
    assert crossover_batch(1000, 100, 900, 50) is None  # the second is below at every B > 0
    assert crossover_batch(1000, 100, 1000, 200) is None  # same S_min: parallel in 1/B, never cross


def test_fit_per_variant_recovers_each_truth_and_the_crossing(tmp_path, capsys):
    study_dir = synthetic_study(tmp_path / "study", TRUTH)
    out = tmp_path / "fit"
    assert fit_main([str(study_dir), "--out", str(out), "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    cbs = {r["variant"]: r for r in read_csv(out / "cbs.csv")}
    assert list(cbs) == ["ewa", "plain"]
    for variant, (s_min, b_noise, seq_len) in TRUTH.items():
        row = cbs[variant]
        assert float(row["s_min"]) == pytest.approx(s_min, rel=0.05)
        assert float(row["b_noise"]) == pytest.approx(b_noise, rel=0.08)
        assert float(row["b_noise_low"]) < b_noise < float(row["b_noise_high"])
        assert int(row["seq_len"]) == seq_len
        assert float(row["cbs_tokens"]) == pytest.approx(float(row["cbs"]) * seq_len)
        assert float(row["cbs_tokens_low"]) == pytest.approx(float(row["cbs_low"]) * seq_len)
    (cross,) = read_csv(out / "crossovers.csv")
    assert (cross["reference"], cross["variant"]) == ("ewa", "plain")
    assert float(cross["crossover_batch"]) == pytest.approx(600, rel=0.1)
    assert (cross["faster_below"], cross["faster_above"]) == ("ewa", "plain")
    steps = read_csv(out / "steps.csv")
    assert {r["variant"] for r in steps} == {"ewa", "plain"} and len(steps) == 2 * len(SWEEP)
    report = (out / "report.md").read_text()
    assert "plain overtakes ewa at B = " in report and "## Variant plain" in report
    assert "target crossing: raw (the runs keep no EWA weights)" in report  # plain's runs: their raw crossings
    assert "(figures/plain/steps_s1.png)" in report and "(figures/variants_s1.png)" in report
    for path in ("figures/variants_s1.png", "figures/ewa/steps_s1.png", "figures/plain/steps_normalized.png"):
        assert (out / path).read_bytes().startswith(b"\x89PNG"), path
    assert "plain overtakes ewa at B = " in printed and "tokens" in printed
    scaling = json.loads((out / "scaling.json").read_text())
    assert scaling["variant"] == "ewa" and set(scaling["variants"]) == {"ewa", "plain"}
    assert scaling["variants"]["plain"]["seq_len"] == 64
    # the fit's own steps.csv reads back, variants and all
    assert fit_main([str(out / "steps.csv"), "--out", str(tmp_path / "again"), "--bootstrap", "0"]) == 0
    assert float(read_csv(tmp_path / "again" / "crossovers.csv")[0]["crossover_batch"]) == \
        pytest.approx(float(cross["crossover_batch"]), rel=1e-6)


def test_curves_that_do_not_cross_in_the_sweep_say_so(tmp_path, capsys):
    truth = {"ewa": (1000.0, 100.0, 128), "plain": (1100.0, 150.0, 128)}  # plain slower at every batch
    study_dir = synthetic_study(tmp_path / "study", truth)
    assert fit_main([str(study_dir), "--out", str(tmp_path / "fit"), "--bootstrap", "0"]) == 0
    (cross,) = read_csv(tmp_path / "fit" / "crossovers.csv")
    assert cross["crossover_batch"] == "" and cross["faster_below"] == cross["faster_above"] == "ewa"
    assert "no crossing of plain and ewa in the swept range (B = 16..1024): ewa needs fewer steps at every swept " \
           "batch" in (tmp_path / "fit" / "report.md").read_text()
    # the same hyperbolas, crossing beyond the sweep: the extrapolated crossing is named, never reported as one
    truth = {"ewa": (1000.0, 100.0, 128), "plain": (990.0, 130.0, 128)}  # cross at B = 28700 / 10 = 2870
    synthetic_study(tmp_path / "far", truth, sd=0.001)
    assert fit_main([str(tmp_path / "far"), "--out", str(tmp_path / "fit2"), "--bootstrap", "0"]) == 0
    (cross,) = read_csv(tmp_path / "fit2" / "crossovers.csv")
    assert cross["crossover_batch"] == "" and float(cross["crossover_outside_sweep"]) == pytest.approx(2870, rel=0.5)


def test_laws_per_variant_recover_each_variants_exponent(tmp_path):
    """B_noise ~ D^0.5 for ewa and D^0.25 for plain over three budgets: each variant's law has its own exponent."""
    budgets = {f"d{k}": (10**8 * 4 ** k, {"ewa": (1000.0 * 4 ** k, 50.0 * 2 ** k),
                                          "plain": (800.0 * 4 ** k, 60.0 * 2 ** (k / 2))}) for k in range(3)}
    study_dir = synthetic_study(tmp_path / "study", TRUTH, sd=0.002, budgets=budgets)
    assert fit_main([str(study_dir), "--out", str(tmp_path / "fit"), "--bootstrap", "100"]) == 0
    scaling = json.loads((tmp_path / "fit" / "scaling.json").read_text())
    for variant, exponent in (("ewa", 0.5), ("plain", 0.25)):
        law = scaling["variants"][variant]["laws_b_noise"]["tokens"]
        assert law["exponent"] == pytest.approx(exponent, abs=0.03), variant
    assert scaling["laws_b_noise"]["tokens"]["exponent"] == pytest.approx(0.5, abs=0.03)  # the reference's
    report = (tmp_path / "fit" / "report.md").read_text()
    assert "## Laws per variant" in report and "| plain | B_noise | D^0.2" in report
    crossings = read_csv(tmp_path / "fit" / "crossovers.csv")
    assert [c["setting"] for c in crossings] == ["d0", "d1", "d2"]


def test_a_study_without_variants_keeps_its_columns(tmp_path):
    study_dir = synthetic_study(tmp_path / "study", {"ewa": TRUTH["ewa"]})
    for config in (study_dir / "runs").glob("*/config.yaml"):  # as a study without variants writes them
        data = yaml.safe_load(config.read_text())
        for key in ("variant", "variants", "reference_variant"):
            del data["study"][key]
        config.write_text(yaml.safe_dump(data))
    assert fit_main([str(study_dir), "--out", str(tmp_path / "fit"), "--bootstrap", "0"]) == 0
    assert (tmp_path / "fit" / "steps.csv").read_text().splitlines()[0] == ",".join(STEPS_COLUMNS)
    assert (tmp_path / "fit" / "cbs.csv").read_text().splitlines()[0] == ",".join(CBS_COLUMNS)
    assert not (tmp_path / "fit" / "crossovers.csv").exists()


# ---------------------------------------------------------------------------------------------------- end to end


def test_two_variants_end_to_end(stdlib_data, tmp_path):
    """constant+EWA at context 32 beside raw weights at context 16 (the reference: its runs at B0 set the target
    both chase), 3 batches each, through `cbs study` (which runs `cbs fit`) on real data."""
    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "name": "variants", "data": str(stdlib_data), "batch_sizes": [4, 8, 16],
        "settings": {"generator": "fixed_model", "model": {"preset": "tiny", "seq_len": 32}, "tokens": [12000]},
        "hparams": {"ewa_taus": [0.9]}, "base": BASE, "max_tokens_factor": 3,
        "variants": {"ewa": {}, "raw16": {"model": {"seq_len": 16}, "hparams": {"ewa_taus": []}}},
        "reference_variant": "raw16"}))
    out = tmp_path / "s"
    proc = subprocess.run(cli("study", str(cfg_path), "--out", str(out), "--parallel", "2"), capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert names == sorted(f"mL2d128_d12K_b{b}_lr0.00316_{v}" for b in (4, 8, 16) for v in ("ewa", "raw16"))
    frozen = json.loads((out / "targets.json").read_text())
    assert frozen["mL2d128_d12K"]["run"] == "mL2d128_d12K_b4_lr0.00316_raw16"
    target = frozen["mL2d128_d12K"]["loss"]
    for name in names:
        config = yaml.safe_load((out / "runs" / name / "config.yaml").read_text())
        assert config["targets"] == [target] and config["study"]["variant"] == name.rsplit("_", 1)[1]
        assert config["model"]["seq_len"] == (16 if name.endswith("raw16") else 32)
    steps = read_csv(out / "fit" / "steps.csv")
    assert {(r["variant"], int(r["batch_size"])) for r in steps} == {(v, b) for v in ("ewa", "raw16")
                                                                     for b in (4, 8, 16)}
    for variant in ("ewa", "raw16"):  # each variant reached the shared target at some batch
        assert any(r["variant"] == variant and r["censored"] == "0" for r in steps), steps
    cbs = {r["variant"]: r for r in read_csv(out / "fit" / "cbs.csv")}
    assert (cbs["ewa"]["seq_len"], cbs["raw16"]["seq_len"]) == ("32", "16")
    assert (out / "fit" / "figures" / "variants_mL2d128_d12K.png").is_file()
    assert "## Variants side by side" in (out / "fit" / "report.md").read_text()
