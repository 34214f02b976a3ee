"""`make gpu-check` on the CPU: its dry run (every step printed, the wheel folder checked, exit 0), the wheel
requirement check on real wheels built here, and scripts/gpu_wheels.sh fetching the folder the GPU machine needs.

The GPU machine has another Python (3.12) and torch than CI, and reaches no registry: what can go wrong there
before a single GPU test runs is a wheel missing or of the wrong version, which is what these check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import wheel_check  # noqa: E402


def make_wheel(tmp: Path, name: str, version: str, requires: list[str]) -> Path:
    """A real wheel of an empty package, built by pip from a setup.cfg (offline: no build isolation)."""
    src = tmp / f"src-{name}-{version}"
    (src / name.replace("-", "_")).mkdir(parents=True)
    (src / name.replace("-", "_") / "__init__.py").write_text("")
    reqs = "".join(f"\n    {r}" for r in requires)
    (src / "setup.cfg").write_text(f"[metadata]\nname = {name}\nversion = {version}\n\n[options]\n"
                                   f"packages = {name.replace('-', '_')}\ninstall_requires ={reqs}\n")
    (src / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\n'
                                        'build-backend = "setuptools.build_meta"\n')
    out = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(out), str(src)], check=True, capture_output=True, timeout=120)
    return out


def dry_run(tmp: Path, wheel_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "OUT": str(tmp / "out"), "WHEEL_DIR": str(wheel_dir),
           "GPU_CHECK_WORK": str(tmp / "work"), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_dry_run_prints_every_part_and_runs_nothing(tmp_path):
    proc = dry_run(tmp_path, tmp_path / "no-wheels")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for part in ("setup", "tests", "study", "bench"):
        assert f"== {part} (limit " in proc.stdout, part
    assert "pip install -q --no-index --no-deps" in proc.stdout  # the setup function's own steps are shown
    assert "pytest -m gpu" in proc.stdout and "configs/gpu_check.yaml" in proc.stdout
    assert "no " in proc.stdout and "scripts/gpu_wheels.sh makes it" in proc.stdout
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "dry run done" in summary
    assert not (tmp_path / "work" / "study" / "runs").exists()  # planned, not trained


def test_dry_run_refuses_a_wheel_folder_with_an_unmet_requirement(tmp_path):
    wheels = make_wheel(tmp_path, "cbs-probe", "1.0", ["zzz-not-on-the-gpu-machine>=2"])
    proc = dry_run(tmp_path, wheels)
    assert proc.returncode == 1
    assert "cbs-probe 1.0 needs zzz-not-on-the-gpu-machine>=2" in proc.stderr, proc.stderr
    assert "leave requirements unmet" in proc.stderr


def test_wheel_check_finds_providers_versions_markers_and_duplicates(tmp_path):
    make_wheel(tmp_path, "probe-a", "1.0", ["probe-b>=2", 'probe-c; python_version < "3.12"',
                                             'probe-d; extra == "dev"', "numpy"])
    wheels = make_wheel(tmp_path, "probe-b", "2.1", [])
    assumed = {"numpy", "torch", "sentencepiece", "protobuf", "pyarrow", "tensorboard", "pyyaml", "scipy",
               "statsmodels", "matplotlib", "tqdm", "deepspeed", "megatron-core", "datasets", "schedulefree"}
    errors, warns, met = wheel_check.check(wheels, "3.12", assumed, set())
    assert errors == [] and warns == []
    assert any("probe-a 1.0 needs probe-b>=2: wheel probe-b 2.1" in m for m in met)
    assert not any("probe-c" in m or "probe-d" in m for m in met)  # another Python's, an extra's: not needed
    errors, _, _ = wheel_check.check(wheels, "3.11", assumed, set())  # on 3.11 probe-c is needed and missing
    assert errors == ["probe-a 1.0 needs probe-c; python_version < \"3.12\": probe-c is neither a wheel in the "
                      "folder nor installed"]
    make_wheel(tmp_path, "probe-b", "1.5", [])  # a second probe-b, too old for probe-a
    errors, _, _ = wheel_check.check(wheels, "3.12", assumed, set())
    assert any("two wheels of probe-b" in e for e in errors)
    errors, warns, _ = wheel_check.check(wheels, "3.12", assumed - {"numpy"}, {"probe-a"})
    assert any("probe-a 1.0 needs numpy" in w for w in warns)  # an optional wheel's need only warns
    assert not any("probe-a" in e for e in errors if "two wheels" not in e)


@pytest.mark.slow
def test_gpu_wheels_fetches_a_complete_folder_for_the_gpu_machine(tmp_path):
    """The real fetch (PyPI, as CI reaches it): the GPU image's packages plus the folder leave nothing unmet."""
    venv = ROOT / ".venv"
    if not (venv / "bin" / "python").exists():
        pytest.skip("no .venv: scripts/gpu_wheels.sh takes its versions from it (make setup)")
    env = {**os.environ, "WHEEL_DIR": str(tmp_path / "whl"), "VENV": str(venv)}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_wheels.sh")], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = {p.name.split("-")[0].lower() for p in (tmp_path / "whl").glob("*.whl")}
    assert {"deepspeed", "megatron_core", "datasets", "pydantic"} <= names and "torch" not in names
    assert "0 unmet" in proc.stdout
    assert sum(p.stat().st_size for p in (tmp_path / "whl").iterdir()) < 60 * 2**20
