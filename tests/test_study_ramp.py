"""study method ramp: the plan (the ramp beside its first and largest fixed batch, to one target) and its bad
input; the study end to end is the CPU demo (configs/demo_ramp.yaml, README)."""

from __future__ import annotations

import pytest

from cbs.pipeline import study
from cbs.pipeline.config import ConfigError, PretrainConfig, from_dict
from test_study import BASE, study_cfg

STAGES = [{"batch": 4, "until_tokens": 8000}, {"batch": 8, "until_tokens": 20000}, {"batch": 16}]


def ramp_cfg(**kw):
    data = {"method": "ramp", "batch_sizes": [4, 16], "ramp": {"stages": STAGES},
            "hparams": {"lr": [2e-3], "ewa_taus": [0.9]}}
    return study_cfg(**{**data, **kw})


def test_the_ramp_runs_beside_its_first_and_largest_batch(tmp_path):
    runs = study.plan(ramp_cfg(), tmp_path, tmp_path / "data")
    # one model, budgets 20K and 60K served by one sweep: the largest budget names the runs
    assert [r.name for r in runs] == ["mL2d128_d60K_b4_lr0.002", "mL2d128_d60K_b16_lr0.002",
                                      "mL2d128_d60K_ramp4-16_lr0.002"]
    first, largest, ramp = runs
    assert first.reference and first.config["train_tokens"] == 60000 and first.config["eval"]["at_tokens"] == \
        [20000, 60000]
    # the largest batch as the ramp's last stage would run it: LR x sqrt(16 / 4), EWA tau^4
    assert largest.lr == pytest.approx(4e-3) and largest.taus == [round(0.9 ** 4, 6)]
    assert not largest.reference and largest.config["train_tokens"] == 240000  # to the target, set after the reference
    cfg = from_dict(PretrainConfig, ramp.config, "run")
    assert cfg.global_batch_seqs is None and [s.batch for s in cfg.batches.stages] == [4, 8, 16]
    assert (ramp.lr, ramp.taus, cfg.batch_schedule.lr_scaling.value) == (2e-3, [0.9], "sqrt")
    assert cfg.train_tokens == 240000


def test_explicit_targets_stop_every_run_but_the_reference_at_them(tmp_path):
    runs = study.plan(ramp_cfg(targets={"losses": {"mL2d128_d20K": 5.0, "mL2d128_d60K": 4.0}}), tmp_path, tmp_path)
    assert all(r.config["targets"] == [5.0, 4.0] and r.config["stop_at_targets"] for r in runs)


@pytest.mark.parametrize("change, words", [
    ({"ramp": None}, r"study\.ramp is required with method ramp"),
    ({"batch_sizes": [4, 8]}, r"study\.batch_sizes must be the ramp's first and largest batch \[4, 16\]"),
    ({"ramp": {"stages": [{"batch": 8, "until_tokens": 10}, {"batch": 4}]}},
     r"study\.ramp\.stages\[1\]\.batch \(4\) is below"),
    ({"hparams": {"lr": [1e-3, 2e-3]}}, r"one lr"),
    ({"hparams": {"lr": [1e-3], "beta2": [0.99]}}, r"ramp\.beta2 is paper but hparams\.beta2 is given"),
    ({"base": {**BASE, "batch_schedule": STAGES}}, r"study\.base\.batch_schedule is set by the study"),
    ({"ramp": {"adaptive": "noise_scale", "ladder": [4, 16]}}, r"study\.ramp\.adaptive: a ramp study compares a "
                                                                r"planned schedule"),
])
def test_bad_ramp_studies_name_the_key(change, words):
    with pytest.raises(ConfigError, match=words):
        ramp_cfg(**change)


def test_cbs_status_shows_a_ramp_runs_stages_as_its_batch(tmp_path):
    """The status table read global_batch_seqs, which a ramp run has not: its batch column was empty."""
    runs = study.plan(ramp_cfg(), tmp_path, tmp_path / "data")
    study.write_run_inputs(runs, tmp_path)
    rows = {line.split()[0]: line.split() for line in study.status_table(tmp_path).splitlines()[1:-1]}
    assert rows["mL2d128_d60K_ramp4-16_lr0.002"][1] == "4->8->16"
    assert rows["mL2d128_d60K_b16_lr0.002"][1] == "16"
    order = list(rows)
    assert order.index("mL2d128_d60K_b4_lr0.002") < order.index("mL2d128_d60K_ramp4-16_lr0.002") < \
        order.index("mL2d128_d60K_b16_lr0.002")  # sorted by the first batch, then the LR
