"""The gradient noise scale B_simple: its estimator against a known truth (low-rank Gaussian gradients), read back
from metrics.jsonl (written here by pretrain's own Tracker, so NaN and inf arrive as the strings pretrain writes),
and its place in `cbs fit` on a sweep study."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from cbs.analysis import run_metrics
from cbs.analysis.cli import fit_main
from cbs.analysis.noise_scale import b_simple_near, ratio_of_sums, read_noise_scale, readings_near, step_estimates
from cbs.pipeline.metrics import Tracker


# ------------------------------------------------------------------------------------------ the estimator itself

def low_rank_readings(rng: np.random.Generator, n: int, rank: int, b_simple: float, b_small: int,
                      accum: int) -> tuple[np.ndarray, np.ndarray]:
    """n steps' (|G_small|^2, |G_big|^2) as pretrain measures them, for per-example gradients G + e with e ~ N(0,
    Sigma), Sigma of `rank` equal eigenvalues (effective rank (tr Sigma)^2 / tr(Sigma^2) = rank) and |G|^2 =
    tr(Sigma) / b_simple: |G_small|^2 the mean over `accum` micro-batches of b_small examples, |G_big|^2 that of
    their mean. Only the `rank` noisy directions and G's (here one of them) matter, so they are all simulated."""
    g = np.zeros(rank)
    g[0] = math.sqrt(rank / b_simple)  # tr(Sigma) = rank
    micro = g + rng.standard_normal((n, accum, rank)) / math.sqrt(b_small)
    return np.square(micro).sum(-1).mean(-1), np.square(micro.mean(1)).sum(-1)


def pretrain_logged(grad_sq: np.ndarray, trace: np.ndarray, beta: float = 0.9) -> np.ndarray:
    """What pretrain logs as train/noise_scale (cbs/pipeline/noise.py): the ratio of EMAs, NaN where that of |G|^2
    is <= 0 (the bias corrections cancel in the ratio)."""
    ema_g = ema_s = 0.0
    out = []
    for g, s in zip(grad_sq, trace):
        ema_g, ema_s = beta * ema_g + (1 - beta) * g, beta * ema_s + (1 - beta) * s
        out.append(ema_s / ema_g if ema_g > 0 else math.nan)
    return np.array(out)


@pytest.mark.parametrize("rank, ratio", [(5, 8), (10, 16), (26, 16)])
def test_ratio_of_sums_is_unbiased_where_the_median_of_logged_values_is_low(rank, ratio):
    """Low-rank noise with B_simple 8-16x the global batch: 15-40% of the logged EMA ratios are NaN and the median of
    the others is biased low (what cbs fit did); the ratio of summed estimates over the same 200 readings is
    within 10% of the truth (median over seeded draws; a ratio of noisy sums has a heavy right tail, so its median
    is the bias that a point estimate shows)."""
    b_small, accum = 8, 4
    truth = ratio * b_small * accum
    rng = np.random.default_rng(rank)
    new, old, nan_share = [], [], []
    for _ in range(100):
        small, big = low_rank_readings(rng, 220, rank, truth, b_small, accum)
        grad_sq, trace = step_estimates(small, big, b_small, b_small * accum)
        logged = pretrain_logged(grad_sq, trace)[20:]  # after the EMA warms up
        usable = np.isfinite(logged) & (logged > 0)
        nan_share.append(1 - usable.mean())
        old.append(np.median(logged[usable]) / truth)
        new.append(ratio_of_sums(grad_sq[20:], trace[20:]) / truth)
    assert 0.15 <= np.mean(nan_share) <= 0.4
    assert np.median(old) < 0.9
    assert np.median(new) == pytest.approx(1.0, abs=0.1)


def test_ratio_of_sums_edge_cases():
    assert math.isnan(ratio_of_sums(np.array([]), np.array([])))
    assert ratio_of_sums(np.array([1.0, -2.0]), np.array([5.0, 5.0])) == math.inf  # unresolved, not dropped
    g, s = step_estimates(np.array([1.0 + 40 / 8]), np.array([1.0 + 40 / 32]), 8, 32)  # |G|^2 1, tr(Sigma) 40
    assert (g[0], s[0]) == (pytest.approx(1.0), pytest.approx(40.0))


# ------------------------------------------------------------------------------------------ a sweep's files

SEQ_LEN = 128
N = 85_000_000
B0 = 32
BATCHES = [32, 64, 128, 256, 512]
# D1 = 1000 steps of the reference batch, D2 = 4000; S(B) = S_min (1 + B_noise / B) through S(B0) = D / (B0 T)
SETTINGS = [{"name": "d1", "model_params": N, "tokens": 1000 * B0 * SEQ_LEN, "target_loss": 3.5},
            {"name": "d2", "model_params": N, "tokens": 4000 * B0 * SEQ_LEN, "target_loss": 3.3}]
B_NOISE = {"d1": 96.0, "d2": 160.0}
LOG_EVERY = 100


def steps_to_target(setting: str, batch: int) -> float:
    d = next(s["tokens"] for s in SETTINGS if s["name"] == setting)
    s_min = d / (B0 * SEQ_LEN) / (1 + B_NOISE[setting] / B0)
    return s_min * (1 + B_NOISE[setting] / batch)


def reference_b_simple(step: int) -> float | None:
    """The reference run's true B_simple at a log step: rising; no reading after step 2900 (as if the run had moved
    to a single micro-batch), so that D2 = 4000 steps falls back to the model's other runs."""
    return 20.0 + step * B0 * SEQ_LEN / 204800 if step <= 2900 else None


def reference_logged(step: int) -> float:
    """What the reference run logs as train/noise_scale: NaN (EMA of |G|^2 <= 0) at the first logs and at steps
    900 and 1100, inside D1's window: those readings are still in the sums."""
    return math.nan if step <= 200 or step in (900, 1100) else reference_b_simple(step)


OTHER_B_SIMPLE = {64: 50.0, 128: 60.0, 256: 120.0, 512: 80.0}
"""The other runs' constant B_simple; the run at 256 logs inf for each (its EMA of |G|^2 at 0): a large value that
the fit must keep."""


def _crossing(steps: float, tps: int) -> dict:
    return {"step": math.ceil(steps), "tokens": math.ceil(steps) * tps, "step_interp": steps,
            "tokens_interp": round(steps * tps, 1)}


def write_run(runs: Path, batch: int, with_noise: bool) -> None:
    """config.yaml, metrics.jsonl (through pretrain's Tracker) and result.json of one run of the sweep; without
    noise, a run with one micro-batch on one rank (pretrain logs no reading). A reading of true B_simple v logs
    |G_small|^2 = 1 + v / 8 and |G_big|^2 = 1 + v / batch: |G|^2 = 1, tr(Sigma) = v, without sampling noise."""
    reference = batch == B0
    run = runs / f"m85M_b{batch}"
    run.mkdir(parents=True)
    tps = batch * SEQ_LEN
    steps = 4000 if reference else math.ceil(steps_to_target("d2", batch))  # the others stop at their targets
    config = {"global_batch_seqs": batch, "micro_batch_seqs": 8, "model": {"seq_len": SEQ_LEN, "layers": 2},
              "study": {"name": "noise", "method": "sweep", "reference": reference, "settings": SETTINGS},
              "resolved": {"world_size": 1, "tokens_per_step": tps, "gradient_accumulation_steps": batch // 8}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    tracker = Tracker(run, tensorboard=False)
    for step in range(LOG_EVERY, steps + 1, LOG_EVERY):
        metrics = {"train/loss": 3.6, "lr": 3e-3}
        truth = (reference_b_simple(step) if reference else OTHER_B_SIMPLE[batch]) if with_noise else None
        if truth is not None:
            logged = reference_logged(step) if reference else (math.inf if batch == 256 else truth)
            metrics.update({"train/noise_scale": logged, "train/grad_sq_small": 1 + truth / 8,
                            "train/grad_sq_big": 1 + truth / batch, "train/noise_scale_batches": [8, batch]})
        tracker.log(metrics, step, step * tps)
        if step % 500 == 0:
            tracker.log({"eval/loss": 3.5, "eval/loss_ewa/0.999": 3.4}, step, step * tps)
    tracker.close()
    targets = [{"loss": s["target_loss"], "raw": _crossing(steps_to_target(s["name"], batch), tps),
                "ewa": {"0.999": _crossing(steps_to_target(s["name"], batch), tps)}} for s in SETTINGS]
    (run / "result.json").write_text(json.dumps({
        "status": "completed", "reason": "every target reached", "steps": steps, "tokens": steps * tps,
        "total_steps": steps, "wall_seconds": 3.0, "final": {"eval/loss": 3.3}, "targets": targets,
        "params": {"total": 100_000_000, "non_embedding": N}, "world_size": 1}))


def make_sweep(root: Path, with_noise: bool = True) -> Path:
    for b in BATCHES:
        write_run(root / "runs", b, with_noise)
    return root


def d2_expected(study: Path) -> tuple[float, int, float]:
    """(B_simple, readings, unusable share) of d2 from the other runs' readings within 25% of D2: with |G|^2 = 1
    in every reading, the ratio of sums is the mean of their true values, the 256 run's (logged inf) included."""
    d2 = SETTINGS[1]["tokens"]
    counts = {b: len(readings_near(read_noise_scale(study / "runs" / f"m85M_b{b}" / "metrics.jsonl"), d2))
              for b in OTHER_B_SIMPLE}
    n = sum(counts.values())
    return sum(OTHER_B_SIMPLE[b] * c for b, c in counts.items()) / n, n, counts[256] / n


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_reading_keeps_nan_and_inf_readings_and_skips_a_line_cut_short(tmp_path):
    make_sweep(tmp_path)
    path = tmp_path / "runs" / "m85M_b32" / "metrics.jsonl"
    assert '"train/noise_scale": "nan"' in path.read_text()  # as pretrain writes a non-finite value
    with open(path, "a") as f:
        f.write('{"step": 4100, "tokens": 1, "train/noise_scale": 5')  # a kill mid-line
    points = read_noise_scale(path)
    assert [p.step for p in points] == list(range(100, 2901, 100))  # eval lines and the cut line left out
    assert math.isnan(points[0].b_simple) and points[0].batches == (8.0, 32.0) and points[0].grad_sq_big == 1 + 22 / 32
    tps = B0 * SEQ_LEN
    near = b_simple_near([points], 1000 * tps, "reference")
    # the readings of steps 800..1200, the NaN-logged 900 and 1100 among them: their mean true value
    assert (near.value, near.readings, near.unusable) == (pytest.approx(reference_b_simple(1000)), 5, 0.4)
    # no reading within 25% of 4000 steps (the last is at 2900)...
    assert b_simple_near([points], 4000 * tps, "reference") is None
    # ...but 3600 steps (window 2700..4500) has 2700..2900
    assert b_simple_near([points], 3600 * tps, "reference").readings == 3
    inf_run = read_noise_scale(tmp_path / "runs" / "m85M_b256" / "metrics.jsonl")
    assert inf_run and all(math.isinf(p.b_simple) for p in inf_run)
    assert b_simple_near([inf_run], inf_run[-1].tokens, "model").value == pytest.approx(120.0)  # inf logged, kept
    assert read_noise_scale(tmp_path / "missing.jsonl") == []


def test_fit_reads_each_metrics_file_once(tmp_path, monkeypatch):
    """`cbs fit` takes a run's throughput and noise scale from one pass over its metrics.jsonl."""
    study = make_sweep(tmp_path / "study")
    calls, read = [], run_metrics.read_metrics
    monkeypatch.setattr(run_metrics, "read_metrics", lambda path: calls.append(path) or read(path))
    assert fit_main([str(study), "--out", str(tmp_path / "fit"), "--bootstrap", "0"]) == 0
    assert sorted(calls) == sorted(run / "metrics.jsonl" for run in (study / "runs").iterdir())


@pytest.fixture(scope="module")
def noise_fit(tmp_path_factory):
    root = tmp_path_factory.mktemp("noise")
    study = make_sweep(root / "study")
    assert fit_main([str(study), "--out", str(root / "fit"), "--bootstrap", "50"]) == 0
    return root / "fit"


def test_b_simple_per_setting_from_the_reference_run_or_the_model(noise_fit):
    rows = {r["setting"]: r for r in read_csv(noise_fit / "cbs.csv")}
    header = list(next(iter(rows.values())))
    assert header[-3:] == ["b_simple", "b_simple_source", "b_simple_unusable"]
    assert header.index("warnings") == len(header) - 4
    # d1: the reference run's readings within 25% of D1 = 1000 steps of B0
    assert float(rows["d1"]["b_simple"]) == pytest.approx(reference_b_simple(1000))
    assert (rows["d1"]["b_simple_source"], float(rows["d1"]["b_simple_unusable"])) == ("reference", 0.4)
    # d2: the reference run has no reading near D2; the other runs' (stopped at their targets, all past D2) pooled,
    # the 256 run's large value (logged inf) included
    value, _, unusable = d2_expected(noise_fit.parent / "study")
    assert float(rows["d2"]["b_simple"]) == pytest.approx(value) and rows["d2"]["b_simple_source"] == "model"
    assert float(rows["d2"]["b_simple_unusable"]) == pytest.approx(unusable) and 0 < unusable < 1
    assert value > 60  # the median of the usable 50, 60, 80 (what cbs fit gave before) drops the 120
    assert float(rows["d1"]["b_noise"]) == pytest.approx(B_NOISE["d1"], rel=1e-3)  # the fit itself is unchanged


def test_report_section_and_figure_of_b_simple_against_the_fit(noise_fit):
    report = (noise_fit / "report.md").read_text()
    section = report.split("## Gradient noise scale")[1].split("\n## ")[0]
    assert "under-estimates the critical batch" in section and "never instead" in section
    assert "| d1 | 4,096,000 | 40 | reference runs (1), 5 readings at 4,096,000 tokens | 40% | 96" in section
    value, n, unusable = d2_expected(noise_fit.parent / "study")
    assert f"| d2 | 16,384,000 | {value:.3g} | all runs of the model (4), {n} readings at " in section
    assert f" | {unusable:.0%} | 160" in section
    assert "![B_simple vs the fit](figures/b_simple.png)" in report
    assert (noise_fit / "figures" / "b_simple.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_without_noise_scale_the_report_says_why_and_the_column_is_empty(tmp_path):
    study = make_sweep(tmp_path / "study", with_noise=False)
    assert fit_main([str(study), "--out", str(tmp_path / "fit"), "--bootstrap", "0"]) == 0
    assert all(r["b_simple"] == r["b_simple_source"] == r["b_simple_unusable"] == ""
               for r in read_csv(tmp_path / "fit" / "cbs.csv"))
    report = (tmp_path / "fit" / "report.md").read_text()
    assert "No run logged `train/noise_scale`" in report and ">= 2 micro-batches" in report
    assert not (tmp_path / "fit" / "figures" / "b_simple.png").exists()
