"""study.horizons: a cosine/WSD study trains one run per horizon; S(B) is interpolated between final losses.

Plan level (runs, names, refusals), analysis level on synthetic run directories with a known answer (interpolation,
censoring on both sides), the interpolation's bias on a synthetic final-loss curve with a known truth, and one
small real study through `cbs study` (which runs `cbs fit`)."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml

from cbs.analysis import horizons
from cbs.analysis.steps import TargetKind, load_steps, read_study
from cbs.pipeline import study
from cbs.pipeline.config import ConfigError
from cbs.pipeline.study_horizons import needs_horizons
from test_pretrain import ENV, ROOT, cli
from test_study import BASE, study_cfg

COSINE = {**BASE, "schedule": {"kind": "cosine", "warmup_tokens": 2048}}


# ---------------------------------------------------------------------------------------------------- plan


def test_a_decaying_schedule_trains_one_run_per_horizon(tmp_path):
    cfg = study_cfg(batch_sizes=[4, 8], horizons=[0.5, 1, 2], base=COSINE, hparams={"ewa_taus": [0.9]})
    runs = study.plan(cfg, tmp_path, tmp_path / "data")
    # one_sweep (the default) does not apply: each horizon run ends at h x D of its own setting
    assert [r.name for r in runs[:3]] == [f"mL2d128_d20K_b4_lr0.00316_h{h}" for h in ("0.5", "1", "2")]
    assert len(runs) == 2 * 2 * 3 and all(len(r.settings) == 1 for r in runs)
    assert [r.train_tokens for r in runs if r.settings[0].tokens == 60000 and r.batch == 8] == [30000, 60000, 120000]
    assert [r.name for r in runs if r.reference] == ["mL2d128_d20K_b4_lr0.00316_h1", "mL2d128_d60K_b4_lr0.00316_h1"]
    for r in runs:  # trained to the end of the schedule (the final loss is the observation), never stopped early
        assert r.config["train_tokens"] == r.train_tokens and r.config["stop_at_targets"] is False
        assert r.config["schedule"]["kind"] == "cosine"
        assert r.config["study"]["horizon"] == r.horizon
        assert r.config["study"]["horizon_group"] == r.name.rsplit("_h", 1)[0]
    table = study.plan_table(cfg, runs, 4)
    assert "mL2d128_d20K_b4_lr0.00316_h0.5: batch 4" in table and "10K tokens (horizon 0.5 x D, to the sch" in table


def test_constant_runs_are_unchanged_and_decay_is_a_function_of_the_schedule(tmp_path):
    assert not needs_horizons(None) and not needs_horizons({"kind": "constant"})
    assert needs_horizons({"kind": "cosine"}) and needs_horizons({"kind": "wsd", "final_lr_factor": 0.1})
    assert not needs_horizons({"kind": "cosine", "final_lr_factor": 1.0})  # never decays
    runs = study.plan(study_cfg(), tmp_path, tmp_path / "data")
    assert all(r.horizon is None and "horizon" not in r.config["study"] for r in runs)
    assert runs[-1].name == "mL2d128_d60K_b16_lr0.00316" and len(runs[-1].settings) == 2  # one sweep


@pytest.mark.parametrize("kw, message", [
    ({"base": {**BASE, "schedule": {"kind": "wsd"}}},
     r"study\.base\.schedule\.kind is wsd: .* give study\.horizons \(e\.g\. \[0\.5, 1, 2, 4\]"),
    ({"horizons": [1, 2]}, r"study\.horizons is given but no run's schedule decays \(horizons on a constant"),
    ({"horizons": [1, 2, 2], "base": COSINE}, r"study\.horizons must be sorted and distinct"),
    ({"horizons": [2, 1], "base": COSINE}, r"study\.horizons must be sorted and distinct"),
    ({"horizons": [1], "base": COSINE}, r"study\.horizons must list at least 2 schedule lengths > 0"),
    ({"horizons": [-1, 1], "base": COSINE}, r"study\.horizons must list at least 2 schedule lengths > 0"),
    ({"horizons": [0.5, 2], "base": COSINE}, r"study\.horizons must hold 1 with reference targets"),
    ({"horizons": [0.1, 1], "base": COSINE}, r"shortest horizon \(0\.1 x D = 2000 tokens .* ends inside the warmup"),
    ({"horizons": [1, 2], "base": COSINE, "method": "branched"}, r"study\.horizons: method branched has no horizons"),
    ({"method": "branched", "base": COSINE}, r"schedule\.kind is cosine: a study needs a constant learning rate"),
])
def test_bad_horizons_are_refused_by_name(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        study.plan(study_cfg(**kw), tmp_path, tmp_path / "data")


def test_explicit_targets_need_no_horizon_1(tmp_path):
    cfg = study_cfg(horizons=[0.5, 2], base=COSINE, targets={"losses": {"mL2d128_d20K": 5.0, "mL2d128_d60K": 4.0}})
    runs = study.plan(cfg, tmp_path, tmp_path / "data")
    assert not any(r.reference for r in runs) and {r.horizon for r in runs} == {0.5, 2.0}


@pytest.mark.parametrize("args", [["--parallel", "1"]])
def test_the_cli_exits_2_naming_study_horizons(tmp_path, args):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"data": str(tmp_path), "batch_sizes": [4, 8], "base": BASE, "horizons": [1, 2],
                                    "settings": {"generator": "fixed_model", "model": "tiny", "tokens": [20000]}}))
    proc = subprocess.run(cli("study", str(path), "--out", str(tmp_path / "s"), "--dry-run", *args),
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "study.horizons is given but no run's schedule decays" in proc.stderr


# ---------------------------------------------------------------------------------------------------- analysis


def _horizon_run(study_dir: Path, name: str, batch: int, h: float, steps: int, loss: float | None, target: float,
                 status: str = "completed", tokens: int = 10000) -> None:
    """A finished horizon run as pretrain and the study leave it: config.yaml (study block) and result.json."""
    path = study_dir / "runs" / f"{name}_h{h:g}"
    path.mkdir(parents=True)
    setting = {"name": "m_d10K", "model_params": 1000, "tokens": tokens, "target_loss": target}
    (path / "config.yaml").write_text(yaml.safe_dump({
        "global_batch_seqs": batch, "model": {"seq_len": 32},
        "study": {"method": "sweep", "settings": [setting], "horizon": h, "horizon_group": name}}))
    final = {} if loss is None else {"eval/loss": loss + 0.5, "eval/loss_ewa/0.9": loss}
    (path / "result.json").write_text(json.dumps({"status": status, "steps": steps, "total_steps": steps,
                                                  "final": final, "targets": []}))


def test_steps_are_interpolated_in_log_steps_between_final_losses(tmp_path):
    target = 3.0
    # batch 4: h 0.5 misses (3.4), h 1 misses (3.2), h 2 reaches (2.9): S between 200 and 400 steps
    for h, steps, loss in ((0.5, 100, 3.4), (1, 200, 3.2), (2, 400, 2.9)):
        _horizon_run(tmp_path, "m_b4_lr1", 4, h, steps, loss, target)
    # batch 8 at two learning rates: the better one gives S(B) (min over hyper-parameters)
    for h, steps, loss in ((0.5, 50, 3.5), (1, 100, 3.1), (2, 200, 2.95)):
        _horizon_run(tmp_path, "m_b8_lr1", 8, h, steps, loss, target)
    for h, steps, loss in ((0.5, 50, 3.3), (1, 100, 2.9), (2, 200, 2.7)):
        _horizon_run(tmp_path, "m_b8_lr2", 8, h, steps, loss, target)
    table = read_study(tmp_path, TargetKind.EWA)
    p4, p8 = table.points_of("m_d10K")
    frac = (3.2 - 3.0) / (3.2 - 2.9)
    assert p4.steps == pytest.approx(math.exp(math.log(200) + frac * math.log(2)))
    assert p4.best_run == "m_b4_lr1_h2" and p4.runs == 3 and not p4.upper_bound
    assert p8.steps == pytest.approx(math.exp(math.log(50) + (3.3 - 3.0) / (3.3 - 2.9) * math.log(2)))
    assert p8.best_run == "m_b8_lr2_h1" and p8.runs == 6
    raw = read_study(tmp_path, TargetKind.RAW)  # the weights the fit reads: raw final losses are 0.5 higher
    assert [p.censored_at_steps for p in raw.points_of("m_d10K")] == [400, 200]
    best = read_study(tmp_path, TargetKind.BEST)
    assert [p.steps for p in best.points_of("m_d10K")] == [p4.steps, p8.steps]


def test_both_sides_of_the_horizon_grid_are_censored_or_flagged(tmp_path):
    target = 3.0
    for h, steps, loss in ((0.5, 100, 3.4), (1, 200, 3.2), (2, 400, 3.1)):  # even the longest misses
        _horizon_run(tmp_path, "m_b4_lr1", 4, h, steps, loss, target)
    for h, steps, loss in ((0.5, 50, 2.9), (1, 100, 2.8), (2, 200, 2.7)):  # the shortest already reaches it
        _horizon_run(tmp_path, "m_b8_lr1", 8, h, steps, loss, target)
    for h, steps, loss in ((0.5, 25, 3.2), (1, 50, None), (2, 100, 2.9)):  # h 1 diverged: skipped, and lost
        _horizon_run(tmp_path, "m_b16_lr1", 16, h, steps, loss, target,
                     status="diverged" if loss is None else "completed")
    table = read_study(tmp_path, TargetKind.EWA)
    p4, p8, p16 = table.points_of("m_d10K")
    assert p4.censored and p4.lower_bound and p4.censored_at_steps == 400  # S > the longest horizon's steps
    assert p8.steps == 50 and p8.upper_bound and not p8.censored  # S <= the shortest horizon's steps
    assert p16.steps == pytest.approx(math.exp(math.log(25) + (3.2 - 3.0) / (3.2 - 2.9) * math.log(4)))
    assert p16.lost_runs == 1
    fitted = load_steps(tmp_path)  # the rest of the fit reads the table as before
    assert {p.batch_size for p in fitted.points if not p.censored} == {8, 16}


def test_an_upper_bound_survives_steps_csv_and_is_said_in_the_report(tmp_path):
    """steps.csv written by `cbs fit` reads back with its upper_bound flag; the report marks the point `<= S`."""
    from cbs.analysis.api import fit

    study_dir = tmp_path / "study"
    for b, losses in ((4, (3.4, 3.2, 2.9)), (8, (3.5, 3.1, 2.95)), (16, (3.6, 3.3, 3.05)), (32, (2.9, 2.8, 2.7))):
        for h, loss in zip((0.5, 1, 2), losses):
            _horizon_run(study_dir, f"m_b{b}_lr1", b, h, int(400 * h / b * 4), loss, 3.0)
    result = fit(study_dir, tmp_path / "fit")
    p32 = result.table.points_of("m_d10K")[-1]
    assert p32.upper_bound and p32.steps == 25
    assert "<= 25 (3)" in (tmp_path / "fit" / "report.md").read_text()
    back = load_steps(tmp_path / "fit" / "steps.csv")
    assert [p.upper_bound for p in back.points_of("m_d10K")] == [False, False, False, True]


def test_a_horizon_run_that_stopped_before_its_schedule_ended_has_no_final_loss():
    stopped = {"status": "completed", "steps": 90, "total_steps": 100, "final": {"eval/loss": 2.0}}
    assert horizons.final_loss(stopped, "raw") is None
    done = {**stopped, "steps": 100, "final": {"eval/loss": 2.0, "eval/loss_ewa/0.9": "nan",
                                               "eval/loss_ewa/0.99": 2.1}}
    assert (horizons.final_loss(done, "raw"), horizons.final_loss(done, "ewa"),
            horizons.final_loss(done, "best")) == (2.0, 2.1, 2.0)


# ---------------------------------------------------------------------------------------------------- bias


def interpolation_bias(alpha: float, ratio: float, grid: int = 400) -> tuple[float, float]:
    """(min, max) over targets of S_interp / S_true - 1 for a final loss L(h) = L_inf + A (h D)^-alpha read on a
    horizon grid of constant ratio `ratio` (S proportional to h at a fixed batch). Scale-free: in u = log S, L is
    L_inf + c exp(-alpha u), so the bias depends on alpha log(ratio) only, not on A, D, L_inf or the grid's start."""
    l_inf, amp, d, steps_per_h = 2.0, 40.0, 1e6, 1000.0

    def loss(h):
        return l_inf + amp * (h * d) ** -alpha

    out = []
    for i in range(1, grid):
        h_lo, h_hi = 1.0, ratio
        h_true = h_lo * ratio ** (i / grid)
        target = loss(h_true)
        s = horizons.estimate([horizons.HorizonRun("lo", h_lo, h_lo * steps_per_h, loss(h_lo)),
                               horizons.HorizonRun("hi", h_hi, h_hi * steps_per_h, loss(h_hi))], target).steps
        out.append(s / (h_true * steps_per_h) - 1)
    return min(out), max(out)


def test_interpolation_bias_on_a_known_final_loss_curve():
    """The chord of a convex L(log S) overestimates S, never underestimates it; the bias grows with alpha and the
    grid's spacing as alpha log(ratio)^2 / 8: under 2% for the grid [0.5, 1, 2, 4] (ratio 2) at alpha <= 0.3, the
    data exponent of Chinchilla-like losses (Hoffmann et al. 2022: 0.28), 3% at alpha 0.5."""
    for alpha in (0.1, 0.3, 0.5, 1.0):
        lo, hi = interpolation_bias(alpha, 2.0)
        assert lo >= -1e-12 and hi > 0
        dense = interpolation_bias(alpha, 2 ** 0.5)[1]
        assert dense < hi / 3.5  # ~ alpha log(r)^2 / 8: halving log r quarters the bias
        assert hi == pytest.approx(alpha * math.log(2) ** 2 / 8, rel=0.1)
    assert interpolation_bias(0.3, 2.0)[1] < 0.02 and interpolation_bias(0.5, 2.0)[1] < 0.035
    # a whole grid [0.5, 1, 2, 4] against the truth at targets across it: same bound, never below the truth
    l_inf, amp, alpha, d = 2.0, 40.0, 0.3, 1e6
    runs = [horizons.HorizonRun(f"h{h}", h, 1000 * h, l_inf + amp * (h * d) ** -alpha) for h in (0.5, 1, 2, 4)]
    for h_true in (0.6, 0.9, 1.5, 3.0, 3.9):
        s = horizons.estimate(runs, l_inf + amp * (h_true * d) ** -alpha).steps
        assert 0 <= s / (1000 * h_true) - 1 < 0.02


# ---------------------------------------------------------------------------------------------------- end to end


def test_a_small_cosine_study_gives_steps_per_batch(stdlib_data, tmp_path):
    """`cbs study` with a cosine schedule, 2 batch sizes x 2 horizons (4 real runs), then its `cbs fit`: the
    target is the final loss of the B0 run of horizon 1, and each batch's steps come from its horizon runs."""
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "name": "cosine", "data": str(stdlib_data), "batch_sizes": [4, 8], "horizons": [1, 2],
        "settings": {"generator": "fixed_model", "model": {"preset": "tiny", "seq_len": 32}, "tokens": [8000]},
        "hparams": {"lr": [3e-3], "ewa_taus": [0.9]},
        "base": {**BASE, "schedule": {"kind": "cosine", "warmup_tokens": 1024}}}))
    out = tmp_path / "s"
    proc = subprocess.run(cli("study", str(path), "--out", str(out), "--parallel", "2"), capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {p.name: json.loads((p / "result.json").read_text()) for p in (out / "runs").iterdir()}
    stem = "mL2d128_d8K_b{}_lr0.003_h{}"
    assert set(runs) == {stem.format(b, h) for b in (4, 8) for h in (1, 2)}
    assert all(r["status"] == "completed" and r["steps"] == r["total_steps"] for r in runs.values())
    final = {name: r["final"]["eval/loss_ewa/0.9"] for name, r in runs.items()}
    target = json.loads((out / "targets.json").read_text())["mL2d128_d8K"]
    assert target == {"loss": final[stem.format(4, 1)], "run": stem.format(4, 1)}  # the D-token run's final loss
    rows = {int(r["batch_size"]): r for r in csv.DictReader(io.StringIO((out / "fit" / "steps.csv").read_text()))}
    assert float(rows[4]["steps"]) == runs[stem.format(4, 1)]["steps"] == math.ceil(8000 / (4 * 32))
    s1, s2 = runs[stem.format(8, 1)]["steps"], runs[stem.format(8, 2)]["steps"]
    l1, l2 = final[stem.format(8, 1)], final[stem.format(8, 2)]
    if l1 <= target["loss"]:  # the larger batch reached it already at D: an upper bound
        assert float(rows[8]["steps"]) == s1 and rows[8]["upper_bound"] == "1"
    elif l2 <= target["loss"]:
        frac = (l1 - target["loss"]) / (l1 - l2)
        assert float(rows[8]["steps"]) == pytest.approx(math.exp(math.log(s1) + frac * math.log(s2 / s1)))
    else:
        assert rows[8]["censored"] == "1" and float(rows[8]["censored_at_steps"]) == s2
    assert "mL2d128_d8K" in (out / "fit" / "report.md").read_text()
