"""Preemption and damaged checkpoints on real runs: nothing lost, nothing silent.

A SIGTERM'd run saves its step and exits 75 (`preempted`); a restart continues exactly. A newest checkpoint cut
short or damaged is skipped (a damaged one set aside), the previous one used, and the run still ends equal to an
uninterrupted one; a run whose every checkpoint is damaged is refused with exit 2, never restarted from step 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cbs.pipeline import pretrain, rundir
from cbs.pipeline.config import ConfigError
from cbs.pipeline.metrics import read_metrics
from test_pretrain import ENV, ROOT, SEQ, cli, make_cfg, run_subprocess, series, torchrun, write_cfg

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


def sigterm_after(cfg_yaml: Path, run_dir: Path, step: int, env: dict | None = None) -> tuple[int, float, str]:
    """Start `cbs pretrain` (with `env`, default the CPU tests' ENV), SIGTERM it once it has logged `step`: (exit
    code, seconds to exit, stderr)."""
    proc = subprocess.Popen(cli("pretrain", str(cfg_yaml)), env=ENV if env is None else env, cwd=ROOT,
                            stdout=subprocess.DEVNULL,
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
    if damage == "cut_short":  # a kill during the save: every rank's files, no complete.json, `latest` not moved
        (newest / rundir.COMPLETE).unlink()
        (newest.parent / "latest").write_text(rundir.usable_tags(run_dir)[0][0])
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
def test_checkpoints_without_complete_json_that_latest_names_are_kept_and_refused(runs):
    """A run directory saved before cbs wrote complete.json: `latest` names a tag without the marker. Saves at or
    before `latest` finished (it moves last), so they are not cut-short ones: they used to be deleted as such, and
    the run trained again from step 0."""
    run_dir, yaml_path = copy_of(runs, "no_markers")
    tag_dirs = sorted((run_dir / "checkpoints").glob("step*"))
    for tag_dir in tag_dirs:
        (tag_dir / rundir.COMPLETE).unlink()
    before = (run_dir / "metrics.jsonl").read_text()
    proc = subprocess.run(cli("pretrain", str(yaml_path)), capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no usable checkpoint" in proc.stderr and "`latest` names it or a later step" in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing wiped, no step 0 again
    assert len(tag_dirs) == 2 and all((d.parent / f"{d.name}.damaged" / "mp_rank_00_model_states.pt").is_file()
                                      for d in tag_dirs)  # every finished save kept

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
from cbs.pipeline import rundir
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


def test_a_branch_at_the_same_batch_continues_its_base_run_exactly(stdlib_data, tmp_path):
    """init_from: the weights, the optimizer state and the data stream continue where the base checkpoint
    stopped, so a branch at the base batch and LR logs what the base run logged after that step."""
    base = make_cfg(stdlib_data, tmp_path / "base", train_tokens=8 * SEQ * 24, ewa={"taus": []},
                    checkpoint={"every_steps": 0, "keep": 1, "at_tokens": [8 * SEQ * 8]})
    pretrain.main(base)
    assert sorted(rundir.tags(tmp_path / "base")) == [rundir.tag(8), rundir.tag(24)]  # at_tokens kept
    branch = make_cfg(stdlib_data, tmp_path / "branch", train_tokens=8 * SEQ * 16, ewa={"taus": []},
                      init_from={"run_dir": str(tmp_path / "base"), "step": 8})
    pretrain.main(branch)
    base_loss = {s - 8: v for s, v in series(tmp_path / "base", "train/loss").items() if s > 8}
    assert series(tmp_path / "branch", "train/loss") == pytest.approx(base_loss, rel=1e-6)
    with pytest.raises(ConfigError, match=r"init_from: the checkpoint .*step00000012 cannot be used"):
        pretrain.main(make_cfg(stdlib_data, tmp_path / "other", init_from={"run_dir": str(tmp_path / "base"),
                                                                          "step": 12}))


def _kill_at(cmd: list[str], after_s: float) -> int:
    """Start `cmd`, SIGKILL it (and its children) `after_s` seconds later unless it ended; its return code."""
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        return proc.wait(timeout=after_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


@pytest.mark.slow
def test_kill_9_at_random_points_saves_included(stdlib_data, tmp_path):
    """A checkpoint every 2 steps, so that kills land in saves too: killed at seeded random points and started
    again, the run logs what an uninterrupted one logs; evaluate and fit killed mid-way leave no half file."""
    import random

    rng = random.Random(4)
    steps = 30

    def cfg(name: str) -> Path:
        c = make_cfg(stdlib_data, tmp_path / name, train_tokens=8 * SEQ * steps, checkpoint={"every_steps": 2})
        return write_cfg(c, tmp_path / f"{name}.yaml")

    run_subprocess(cli("pretrain", str(cfg("whole"))))
    cut = cfg("cut")
    started = time.time()
    run_subprocess(cli("pretrain", str(cut)))  # a first timing, then restart from scratch with kills
    full_s = time.time() - started
    shutil.rmtree(tmp_path / "cut")
    for _ in range(3):
        _kill_at(cli("pretrain", str(cut)), rng.uniform(0.3, 1.0) * full_s)
        latest = tmp_path / "cut" / "checkpoints" / "latest"  # none yet if killed inside the first save
        if latest.exists():  # never a `latest` at half a save
            assert rundir.checkpoint_problem(latest.parent / latest.read_text().strip()) is None
    run_subprocess(cli("pretrain", str(cut)))
    ma, mb = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut")
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        for key in x:
            if not key.startswith("perf/"):
                assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (x["step"], key)

    out = tmp_path / "eval.json"
    run_subprocess(cli("evaluate", str(tmp_path / "whole"), "--out", str(out)))
    whole_eval = json.loads(out.read_text())
    out.unlink()
    for after in (1.0, 3.0, 5.0):
        _kill_at(cli("evaluate", str(tmp_path / "whole"), "--out", str(out)), after)
        assert not out.exists() or json.loads(out.read_text())["weights"] == whole_eval["weights"]
    assert not list(tmp_path.glob(".eval.json.*"))  # no temp file left behind where it is read

    table = tmp_path / "steps.csv"  # S(B) = S_min (1 + B_noise / B) for three budgets
    table.write_text("setting,model_params,tokens,batch_size,steps\n" + "".join(
        f"d{d},1000000,{d},{b},{s_min * (1 + noise / b) * (1.03 if b % 3 else 0.97):.3f}\n"
        for d, s_min, noise in ((10**6, 100, 40), (4 * 10**6, 300, 90), (16 * 10**6, 900, 200))
        for b in (8, 16, 32, 64, 128, 256)))
    fit_out = tmp_path / "fit"
    for after in (0.5, 1.5, 2.5, 60):
        _kill_at(cli("fit", str(table), "--out", str(fit_out), "--bootstrap", "200"), after)
        assert not fit_out.exists() or (fit_out / "cbs.csv").is_file()  # the old directory or a whole new one
    assert (fit_out / "report.md").is_file() and not list(tmp_path.glob(".fit*"))  # the last one ran through


def test_a_fit_killed_while_writing_leaves_nothing_behind_the_next_one(tmp_path):
    """A fit killed between staging and swapping leaves `.OUT.tmp-HOST-PID-*`: the next fit removes it when that
    process is gone, and leaves a live one's (a concurrent fit) alone."""
    import socket

    from cbs.analysis.cli import fit_main

    table = tmp_path / "steps.csv"
    table.write_text("setting,model_params,tokens,batch_size,steps\n" + "".join(
        f"s,1000000,1000000,{b},{100 * (1 + 40 / b) * (1.02 if b % 3 else 0.98):.3f}\n" for b in (8, 16, 32, 64)))
    dead = next(pid for pid in range(4_000_000, 4_100_000) if not Path(f"/proc/{pid}").exists())
    host = socket.gethostname()
    stale = tmp_path / f".fit.tmp-{host}-{dead}-0a0b"
    live = tmp_path / f".fit.tmp-{host}-{os.getpid()}-0c0d"
    for d in (stale, live):
        d.mkdir()
        (d / "cbs.csv").write_text("half")
    assert fit_main([str(table), "--out", str(tmp_path / "fit"), "--bootstrap", "50"]) == 0
    assert not stale.exists() and live.exists() and (tmp_path / "fit" / "cbs.csv").is_file()


def _has_open(pid: int, path: Path) -> bool:
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        return any(os.path.realpath(fd) == str(path.resolve()) for fd in fd_dir.iterdir())
    except (FileNotFoundError, PermissionError):  # the process is gone, or an fd closed under us
        return False


def test_a_trainer_that_waited_for_the_lock_finds_the_run_finished_meanwhile(stdlib_data, tmp_path):
    """A second trainer of a run directory looks for result.json before the lock (cheap), waits for the holder,
    then must look again: the holder may have finished the run meanwhile. It used to resume the holder's last
    checkpoint instead: a run stopped at its targets was rewritten (result.json, metrics) by a trainer with
    nothing left to do."""
    cfg = make_cfg(stdlib_data, tmp_path / "run", train_tokens=8 * SEQ * 6, checkpoint={"every_steps": 3})
    yaml_path = write_cfg(cfg, tmp_path / "run.yaml")
    run_subprocess(cli("pretrain", str(yaml_path)))
    result, metrics = (tmp_path / "run" / rundir.RESULT), (tmp_path / "run" / "metrics.jsonl")
    before = result.read_bytes(), metrics.read_bytes()
    hidden = result.rename(tmp_path / "result.hidden")  # as it is while the holder still trains
    holder = subprocess.Popen([sys.executable, "-c", f"""
from cbs.pipeline import rundir
import sys
with rundir.exclusive({str(tmp_path / "run")!r}):
    print("held", flush=True)
    sys.stdin.readline()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    waiter = subprocess.Popen(cli("pretrain", str(yaml_path)), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not _has_open(waiter.pid, tmp_path / "run" / rundir.LOCK):  # past its first look, waiting for the lock
        assert waiter.poll() is None and time.time() < deadline, waiter.stderr.read()[-2000:]
        time.sleep(0.05)
    hidden.rename(result)  # the holder finishes the run, then lets go
    holder.communicate("\n", timeout=30)
    _, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err[-2000:]
    assert "already finished" in err
    assert (result.read_bytes(), metrics.read_bytes()) == before


def test_a_kill_during_the_first_start_never_makes_a_later_run_hang(stdlib_data, tmp_path):
    """DeepSpeed used to JIT-build its `deepspeed_shm_comm` op on the CPU at every process-group start, under
    torch's file lock in the extensions directory: a run killed during that build (~1 min of C++) left the lock,
    and every later run waited on it forever with no output. A first run is SIGKILLed in its start-up, a stale
    lock is left where that build would have held it, and the next run must still finish, in bounded time."""
    extensions = tmp_path / "torch_extensions"
    env = {**ENV, "TORCH_EXTENSIONS_DIR": str(extensions)}
    yaml_path = write_cfg(make_cfg(stdlib_data, tmp_path / "run", train_tokens=8 * SEQ * 4), tmp_path / "run.yaml")
    first = subprocess.Popen(cli("pretrain", str(yaml_path)), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    lock = extensions / "deepspeed_shm_comm" / "lock"
    while first.poll() is None and time.time() < deadline and not lock.exists() \
            and not (tmp_path / "run" / "metrics.jsonl").exists():  # killed in its build or right after start-up
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()  # what the kill leaves when it lands inside the build
    proc = subprocess.run(cli("pretrain", str(yaml_path)), env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "completed"
    assert [p.name for p in lock.parent.iterdir()] == ["lock"]  # nothing was built, the lock never waited on


def _cut_after(cfg, at_step: int) -> None:
    """Train `cfg` (a checkpoint every `at_step` steps) to its end, then leave the run directory as a kill just
    after step `at_step`'s save leaves it: `latest` at that step, no later checkpoint, no result.json."""
    pretrain.main(cfg)
    run_dir = Path(cfg.run_dir)
    for tag in rundir.tags(run_dir):
        if rundir.tag_step(tag) > at_step:
            shutil.rmtree(run_dir / "checkpoints" / tag)
    assert rundir.tag(at_step) in rundir.tags(run_dir), "checkpoint.keep pruned the step to cut at"
    (run_dir / "checkpoints" / "latest").write_text(rundir.tag(at_step))
    (run_dir / "result.json").unlink()


def test_a_resume_compares_the_data_not_the_data_dir_string(stdlib_data, tmp_path):
    """A run started through a symlink resumes when data_dir names the real path of the same data (it used to be
    refused as a changed data_dir); config.yaml keeps the data identity the run started with."""
    (tmp_path / "link").symlink_to(stdlib_data)
    cfg = make_cfg(tmp_path / "link", tmp_path / "run", train_tokens=8 * SEQ * 6, checkpoint={"every_steps": 3})
    _cut_after(cfg, 3)
    started = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["resolved"]
    resumed = make_cfg(stdlib_data, tmp_path / "run", train_tokens=8 * SEQ * 6, checkpoint={"every_steps": 3})
    assert pretrain.main(resumed)["steps"] == 6
    now = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert now["data_dir"] == str(stdlib_data)
    keys = ("data_manifest_fingerprint", "tokenizer_sha256", "data_tokens", "data_shard_bytes")
    assert all(now["resolved"][k] == started[k] is not None for k in keys)


def test_a_result_json_that_is_not_json_does_not_stop_a_resume(stdlib_data, tmp_path):
    """result.json damaged in a run with checkpoints: the run resumes from its newest checkpoint and writes it
    again (it used to end in a JSONDecodeError on every start until someone deleted the file by hand)."""
    cfg = make_cfg(stdlib_data, tmp_path / "run", train_tokens=8 * SEQ * 6, checkpoint={"every_steps": 3})
    _cut_after(cfg, 3)
    (tmp_path / "run" / "result.json").write_text('{"status": "comp')
    result = pretrain.main(cfg)
    assert result["status"] == "completed" and result["steps"] == 6
    assert json.loads((tmp_path / "run" / "result.json").read_text())["steps"] == 6


def test_a_stop_signal_ends_a_long_step_in_bounded_time(stdlib_data, tmp_path):
    """A step of 8192 micro-batches (about a minute here): SIGTERM used to wait for the whole step and its save,
    past any Slurm grace period. The step is abandoned STEP_STOP_GRACE_S after the signal; nothing half is saved,
    and result.json says the run resumes from its newest checkpoint (none yet: step 0)."""
    import threading

    batch = 8192
    cfg = make_cfg(stdlib_data, tmp_path / "run", global_batch_seqs=batch, micro_batch_seqs=1,
                   train_tokens=batch * SEQ * 2, ewa={"taus": []}, eval={"every_steps": 1000})
    proc = subprocess.Popen(cli("pretrain", str(write_cfg(cfg, tmp_path / "run.yaml"))), env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started, lines = threading.Event(), []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "steps of" in line:  # the run's first log line: training starts
                started.set()
    threading.Thread(target=read, daemon=True).start()
    assert started.wait(120), "".join(lines)[-2000:]
    time.sleep(1)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=180)
    exit_s = time.time() - signalled
    assert proc.returncode == pretrain.EXIT_PREEMPTED, "".join(lines)[-2000:]
    assert exit_s < pretrain.STEP_STOP_GRACE_S + 15
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "preempted" and result["steps"] == 0 and "abandoned" in result["reason"]
    assert not rundir.tags(tmp_path / "run")  # no checkpoint of half a step


def test_a_full_disk_during_a_checkpoint_save_names_it_and_loses_nothing(stdlib_data, tmp_path):
    """A 12 MiB file system holds one checkpoint of the tiny model (~8 MiB), not two: the second save fails. It
    used to end in torch's "enforce fail at inline_container.cc" traceback; now exit 2 says what happened and the
    fix, `latest` stays on the complete checkpoint, and once there is room the same command finishes the run."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        cfg = make_cfg(stdlib_data, mnt / "run", train_tokens=8 * SEQ * 6, checkpoint={"every_steps": 2, "keep": 3})
        yaml_path = write_cfg(cfg, tmp_path / "run.yaml")
        proc = subprocess.run(cli("pretrain", str(yaml_path)), capture_output=True, text=True, env=ENV, cwd=ROOT,
                              timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert re.search(r"saving checkpoint .*step00000004 failed .*MiB free on its file system: free disk space "
                         r".* resumes from its newest complete checkpoint \(step 2\)", proc.stderr), proc.stderr[-2000:]
        assert (mnt / "run" / "checkpoints" / "latest").read_text().strip() == rundir.tag(2)
        assert rundir.checkpoint_problem(mnt / "run" / "checkpoints" / rundir.tag(2)) is None
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        run_subprocess(cli("pretrain", str(yaml_path)))
        assert json.loads((mnt / "run" / "result.json").read_text())["steps"] == 6
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_resume_off_the_log_grid_logs_the_whole_window(stdlib_data, tmp_path):
    """Logged every 5 steps, resumed from step 3: the train loss at step 5 is the mean of steps 2-5, as in the
    uninterrupted run (it used to average steps 4-5 only)."""
    cfg = make_cfg(stdlib_data, tmp_path / "run", train_tokens=8 * SEQ * 10, log={"every_steps": 5},
                   checkpoint={"every_steps": 3, "keep": 4})
    _cut_after(cfg, 3)
    whole = series(tmp_path / "run", "train/loss")  # the uninterrupted run's, still in metrics.jsonl
    assert sorted(whole) == [1, 5, 10]
    pretrain.main(cfg)
    assert series(tmp_path / "run", "train/loss") == pytest.approx(whole, rel=1e-6)
