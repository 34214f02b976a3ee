"""Preemption and damaged checkpoints on real runs: nothing lost, nothing silent.

A SIGTERM'd run saves its step and exits 75 (`preempted`); a restart continues exactly. A newest checkpoint cut
short or damaged is skipped (a damaged one set aside), the previous one used, and the run still ends equal to an
uninterrupted one; a run whose every checkpoint is damaged is refused with exit 2, never restarted from step 0.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline import pretrain, rundir
from pipeline.metrics import read_metrics
from test_pretrain import ENV, ROOT, SEQ, cli, make_cfg, run_subprocess, torchrun, write_cfg

STEPS = 40


def assert_same_run(a: Path, b: Path) -> None:
    """Every logged value but timings, equal to 1e-6 (both runs one thread: the same float reductions)."""
    ma, mb = read_metrics(a), read_metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        assert x.keys() == y.keys()
        for key in x:
            if not key.startswith("perf/"):
                assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (x["step"], key)
    ra, rb = (json.loads((p / "result.json").read_text()) for p in (a, b))
    assert rb["status"] == "completed" and rb["steps"] == STEPS and ra["targets"] == rb["targets"]


def config(data: Path, run_dir: Path, tmp: Path) -> Path:
    cfg = make_cfg(data, run_dir, train_tokens=8 * SEQ * STEPS, checkpoint={"every_steps": 10, "keep": 3},
                   targets=[5.5])
    return write_cfg(cfg, tmp / f"{run_dir.name}.yaml")


@pytest.fixture(scope="module")
def runs(stdlib_data, tmp_path_factory):
    """An uninterrupted run, and one stopped by SIGTERM after step 12 (checkpoints at 10 and where it stopped)."""
    tmp = tmp_path_factory.mktemp("preempt")
    run_subprocess(cli("pretrain", str(config(stdlib_data, tmp / "whole", tmp))))
    cut_yaml = config(stdlib_data, tmp / "cut", tmp)
    code, exit_s, stderr = sigterm_after(cut_yaml, tmp / "cut", step=12)
    return {"tmp": tmp, "whole": tmp / "whole", "cut": tmp / "cut", "cut_yaml": cut_yaml, "code": code,
            "exit_s": exit_s, "stderr": stderr}


def sigterm_after(cfg_yaml: Path, run_dir: Path, step: int) -> tuple[int, float, str]:
    """Start `cbs pretrain`, SIGTERM it once it has logged `step`: (exit code, seconds to exit, stderr)."""
    proc = subprocess.Popen(cli("pretrain", str(cfg_yaml)), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and any(f'"step": {step},' in line for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be signalled"
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    return proc.returncode, time.time() - signalled, stderr


def copy_of(runs: dict, name: str) -> tuple[Path, Path]:
    """A copy of the preempted run (own run_dir in its config), to damage without touching the others."""
    run_dir = runs["tmp"] / name
    shutil.copytree(runs["cut"], run_dir)
    yaml_path = runs["tmp"] / f"{name}.yaml"
    yaml_path.write_text(runs["cut_yaml"].read_text().replace(str(runs["cut"]), str(run_dir)))
    return run_dir, yaml_path


@pytest.mark.slow
def test_sigterm_saves_the_step_and_a_restart_continues_exactly(runs):
    assert runs["code"] == pretrain.EXIT_PREEMPTED, runs["stderr"][-2000:]
    assert runs["exit_s"] < 30  # one step, one checkpoint save
    result = json.loads((runs["cut"] / "result.json").read_text())
    assert result["status"] == "preempted" and "SIGTERM" in result["reason"]
    stopped = result["steps"]
    assert 12 <= stopped < STEPS
    latest = (runs["cut"] / "checkpoints" / "latest").read_text().strip()
    assert latest == rundir.tag(stopped)  # the step it stopped at, not the last multiple of 10
    assert max(m["step"] for m in read_metrics(runs["cut"])) == stopped  # nothing logged past it
    run_dir, yaml_path = copy_of(runs, "resumed")
    run_subprocess(cli("pretrain", str(yaml_path)))
    assert_same_run(runs["whole"], run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["cut_short", "truncated", "garbage"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(runs, damage):
    run_dir, yaml_path = copy_of(runs, f"damaged_{damage}")
    newest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    model_file = newest / "mp_rank_00_model_states.pt"
    if damage == "cut_short":  # a kill during the save: every rank's files, but no complete.json
        (newest / rundir.COMPLETE).unlink()
    elif damage == "truncated":
        model_file.write_bytes(model_file.read_bytes()[:1000])
    else:  # same size, other bytes: only loading it can tell
        model_file.write_bytes(os.urandom(model_file.stat().st_size))
    proc = run_subprocess(cli("pretrain", str(yaml_path)))
    assert newest.name in proc.stderr  # reported, not silent
    assert_same_run(runs["whole"], run_dir)
    if damage == "garbage":
        assert (newest.parent / f"{newest.name}.damaged").is_dir()  # kept for inspection


@pytest.mark.slow
def test_every_checkpoint_damaged_is_refused_not_restarted(runs):
    run_dir, yaml_path = copy_of(runs, "all_damaged")
    for tag_dir in (run_dir / "checkpoints").glob("step*"):
        (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    before = (run_dir / "metrics.jsonl").read_text()
    proc = subprocess.run(cli("pretrain", str(yaml_path)), capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no usable checkpoint" in proc.stderr and "mp_rank_00_model_states.pt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing wiped


@pytest.mark.slow
def test_zero1_checkpoint_refuses_another_world_size(runs):
    run_dir, yaml_path = copy_of(runs, "two_ranks")
    proc = subprocess.run(torchrun(2, "pretrain", str(yaml_path)), capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert "written by 1 rank(s) under ZeRO-1" in proc.stderr and "resume with 1 rank(s)" in proc.stderr


def test_stop_at_targets_on_a_checkpoint_step_keeps_that_step(stdlib_data, tmp_path):
    """The loop stopped before the checkpoint hook of its last step, and the final save was skipped because the
    step was a multiple of checkpoint.every_steps: `latest` named an older step than result.json."""
    cfg = make_cfg(stdlib_data, tmp_path / "run", train_tokens=8 * SEQ * 200, targets=[5.6], stop_at_targets=True,
                   eval={"every_steps": 5}, checkpoint={"every_steps": 5})
    result = pretrain.main(cfg)
    assert result["reason"] == "every target reached" and result["steps"] % 5 == 0
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == rundir.tag(result["steps"])


def test_one_process_trains_a_run_directory_at_a_time(tmp_path):
    """A second trainer of the same run waits for the first, and is refused if it does not let go; the kernel
    drops the lock of a killed holder at once."""
    holder = subprocess.Popen([sys.executable, "-c", f"""
from pipeline import rundir
import time
with rundir.exclusive({str(tmp_path)!r}):
    print("held", flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(rundir.RunDirBusy, match=f"pid {holder.pid}"):
        with rundir.exclusive(tmp_path, wait_s=1):
            pass
    holder.kill()
    holder.wait()
    with rundir.exclusive(tmp_path, wait_s=5):
        pass


def _study_yaml(tmp: Path, data: Path) -> Path:
    from test_study import BASE

    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump({
        "name": "kill", "data": str(data), "batch_sizes": [4, 8, 16],
        "settings": {"generator": "fixed_model", "model": {"preset": "tiny", "seq_len": 32}, "tokens": [12000]},
        "hparams": {"ewa_taus": [0.95]}, "base": {**BASE, "checkpoint": {"every_steps": 20}}}))
    return path


@pytest.mark.slow
def test_a_study_killed_with_sigkill_ends_as_an_uninterrupted_one(stdlib_data, tmp_path):
    """kill -9 of the study process while it trains: its runs get SIGTERM from the kernel (they must not train on
    as orphans), checkpoint and stop; the same command then finishes the study with the same steps-to-target."""
    cfg = _study_yaml(tmp_path, stdlib_data)
    run_subprocess(cli("study", str(cfg), "--out", str(tmp_path / "whole"), "--parallel", "2"), timeout=600)
    proc = subprocess.Popen(cli("study", str(cfg), "--out", str(tmp_path / "cut"), "--parallel", "2"), env=ENV,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = tmp_path / "cut" / "runs"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:  # both non-reference runs training
        if sum(1 for m in runs.glob("*_b[18]*/metrics.jsonl") if m.read_text().count("train/loss") >= 3) == 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the study ended before it could be killed"
    proc.kill()
    proc.wait()
    deadline = time.time() + 120  # the orphaned runs save and exit by themselves
    while time.time() < deadline and any(f"{runs}" in _cmdline(pid) for pid in _pids()):
        time.sleep(0.2)
    assert not any(f"{runs}" in _cmdline(pid) for pid in _pids()), "runs kept training after the study died"
    statuses = [json.loads((p / "result.json").read_text())["status"] for p in runs.glob("*_b[18]*")]
    assert "preempted" in statuses and set(statuses) <= {"preempted", "completed"}  # one may have just finished
    run_subprocess(cli("study", str(cfg), "--out", str(tmp_path / "cut"), "--parallel", "2"), timeout=600)
    whole, cut = ((tmp_path / d / "fit" / "steps.csv").read_text() for d in ("whole", "cut"))
    assert cut == whole


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
