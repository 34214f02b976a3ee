"""The time/cost section of report.md names the devices the runs trained on: CPU runs are not counted in
GPU-hours."""

from __future__ import annotations

import yaml
from test_analysis_cli import make_divergence_study

from cbs.analysis.cli import fit_main


def _set_device(study, device_of) -> None:
    for path in sorted((study / "runs").glob("*/config.yaml")):
        config = yaml.safe_load(path.read_text())
        config["resolved"]["device"] = device_of(path.parent.name)
        path.write_text(yaml.safe_dump(config))


def _time_section(out) -> str:
    return (out / "report.md").read_text().split("## Time and cost to target")[1].split("\n## ")[0]


def test_cpu_runs_are_counted_in_cpu_hours(tmp_path):
    study = make_divergence_study(tmp_path / "study")
    _set_device(study, lambda name: "cpu")
    assert fit_main([str(study), "--out", str(tmp_path / "fit"), "--bootstrap", "0", "--gpus", "4"]) == 0
    section = _time_section(tmp_path / "fit")
    assert "CPU-hours" in section and "fastest with <= 4 CPU(s)" in section and " CPU-h" in section
    assert "GPU" not in section


def test_gpu_runs_and_mixed_devices(tmp_path):
    study = make_divergence_study(tmp_path / "study")
    _set_device(study, lambda name: "cuda:0")
    assert fit_main([str(study), "--out", str(tmp_path / "gpu"), "--bootstrap", "0", "--gpus", "4"]) == 0
    assert "fastest with <= 4 GPU(s)" in _time_section(tmp_path / "gpu")
    _set_device(study, lambda name: "cpu" if name.startswith("b64") else "cuda:1")
    assert fit_main([str(study), "--out", str(tmp_path / "mixed"), "--bootstrap", "0", "--gpus", "4"]) == 0
    section = _time_section(tmp_path / "mixed")
    assert "device-hours" in section and "GPU" not in section and "CPU" not in section
