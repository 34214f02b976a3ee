"""The gradient noise scale B_simple read back from metrics.jsonl (written here by pretrain's own Tracker, so NaN and
inf arrive as the strings pretrain writes), and its place in `cbs fit` on a sweep study."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from analysis import run_metrics
from analysis.cli import fit_main
from analysis.noise_scale import read_noise_scale, value_near
from pipeline.metrics import Tracker

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


def reference_b_simple(step: int) -> float:
    """The reference run's EMA'd B_simple: NaN for the first logs, rising, NaN again after step 2900."""
    if step <= 200 or step > 2900:
        return math.nan
    return 20.0 + step * B0 * SEQ_LEN / 204800


OTHER_B_SIMPLE = {64: 50.0, 128: 60.0, 256: math.inf, 512: 80.0}


def _crossing(steps: float, tps: int) -> dict:
    return {"step": math.ceil(steps), "tokens": math.ceil(steps) * tps, "step_interp": steps,
            "tokens_interp": round(steps * tps, 1)}


def write_run(runs: Path, batch: int, noise) -> None:
    """config.yaml, metrics.jsonl (through pretrain's Tracker) and result.json of one run of the sweep; `noise`:
    step -> B_simple to log, or None for a run with one micro-batch on one rank (pretrain logs none)."""
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
        if noise is not None:
            metrics.update({"train/noise_scale": noise(step), "train/grad_sq_small": 0.02, "train/grad_sq_big": 0.01,
                            "train/noise_scale_batches": [8, batch]})
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
        noise = None
        if with_noise:
            noise = reference_b_simple if b == B0 else (lambda step, v=OTHER_B_SIMPLE[b]: v)
        write_run(root / "runs", b, noise)
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_reading_skips_nan_inf_and_a_line_cut_short(tmp_path):
    make_sweep(tmp_path)
    path = tmp_path / "runs" / "m85M_b32" / "metrics.jsonl"
    assert '"train/noise_scale": "nan"' in path.read_text()  # as pretrain writes a non-finite value
    with open(path, "a") as f:
        f.write('{"step": 4100, "tokens": 1, "train/noise_scale": 5')  # a kill mid-line
    points = read_noise_scale(path)
    assert [p.step for p in points] == list(range(100, 4001, 100))  # eval lines and the cut line left out
    assert math.isnan(points[0].b_simple) and points[0].batches == (8.0, 32.0) and points[0].grad_sq_big == 0.01
    tps = B0 * SEQ_LEN
    near = value_near(points, 1000 * tps)
    assert (near.step, near.b_simple) == (1000, pytest.approx(reference_b_simple(1000)))
    # near the end every value is NaN: the closest usable one (step 2900) is too far from 4000 steps (> 25%)...
    assert value_near(points, 4000 * tps) is None
    # ...but counts for 3600 steps (700 away, 19%)
    assert value_near(points, 3600 * tps).step == 2900
    inf_run = read_noise_scale(tmp_path / "runs" / "m85M_b256" / "metrics.jsonl")
    assert inf_run and all(math.isinf(p.b_simple) for p in inf_run) and value_near(inf_run, 1000 * tps) is None
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


def test_b_simple_per_setting_from_the_reference_run_or_the_model_median(noise_fit):
    rows = {r["setting"]: r for r in read_csv(noise_fit / "cbs.csv")}
    header = list(next(iter(rows.values())))
    assert header[-2:] == ["b_simple", "b_simple_source"] and header.index("warnings") == len(header) - 3
    # d1: the reference run's value at D1 = 1000 steps of B0
    assert float(rows["d1"]["b_simple"]) == pytest.approx(reference_b_simple(1000))
    assert rows["d1"]["b_simple_source"] == "reference"
    # d2: the reference run logged only NaN near D2; the other runs (stopped at their targets, all past D2)
    # logged 50, 60, inf, 80: the median of the usable ones
    assert (float(rows["d2"]["b_simple"]), rows["d2"]["b_simple_source"]) == (60.0, "median")
    assert float(rows["d1"]["b_noise"]) == pytest.approx(B_NOISE["d1"], rel=1e-3)  # the fit itself is unchanged


def test_report_section_and_figure_of_b_simple_against_the_fit(noise_fit):
    report = (noise_fit / "report.md").read_text()
    section = report.split("## Gradient noise scale")[1].split("\n## ")[0]
    assert "under-estimates the critical batch" in section and "never instead" in section
    assert "| d1 | 4,096,000 | 40 | reference runs (1), at 4,096,000 tokens | 96" in section
    assert "| d2 | 16,384,000 | 60 | median over the model (3), at 16,384,000 tokens | 160" in section
    assert "![B_simple vs the fit](figures/b_simple.png)" in report
    assert (noise_fit / "figures" / "b_simple.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_without_noise_scale_the_report_says_why_and_the_column_is_empty(tmp_path):
    study = make_sweep(tmp_path / "study", with_noise=False)
    assert fit_main([str(study), "--out", str(tmp_path / "fit"), "--bootstrap", "0"]) == 0
    assert all(r["b_simple"] == "" and r["b_simple_source"] == "" for r in read_csv(tmp_path / "fit" / "cbs.csv"))
    report = (tmp_path / "fit" / "report.md").read_text()
    assert "No run logged `train/noise_scale`" in report and ">= 2 micro-batches" in report
    assert not (tmp_path / "fit" / "figures" / "b_simple.png").exists()
