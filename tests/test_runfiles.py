"""cbs/runfiles.py, the run-directory contract both packages share: the statuses and what their sets mean, the one
metrics.jsonl reader (the pipeline's readers and the fit's agree on a real Tracker's file), result.json's reader,
and the staged writer `cbs fit` and preprocess use (host guard, fsync)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cbs import runfiles
from cbs.analysis import run_metrics
from cbs.analysis.cli import fit_main
from cbs.pipeline import executors
from cbs.pipeline.metrics import Tracker, eval_records, read_metrics
from cbs.runfiles import ENDED, IN_RESULT, RESUMABLE, SETTLED, Status

ROOT = Path(__file__).resolve().parents[1]


def test_runfiles_imports_neither_package_nor_torch():
    code = ("import sys, cbs.runfiles; bad = [m for m in sys.modules if m.split('.')[0] == 'torch' or "
            "m.startswith(('cbs.pipeline', 'cbs.analysis'))]; print(bad); sys.exit(bool(bad))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_status_is_its_string_in_comparisons_dicts_files_and_messages():
    s = Status.COMPLETED
    assert s == "completed" and {"completed": 1}[s] == 1 and f"{s}" == str(s) == "completed"
    assert json.dumps({"status": Status.FAILED}) == '{"status": "failed"}'


def test_the_status_sets_say_what_they_mean():
    """SETTLED (not trained again) leaves FAILED out, which the study retries; ENDED (read by the fit as an
    outcome) holds it; PREEMPTED alone is resumed. result.json holds exactly ENDED and RESUMABLE."""
    assert set(SETTLED) == {"completed", "diverged"} and set(ENDED) == set(SETTLED) | {"failed"}
    assert set(RESUMABLE) == {"preempted"} and set(IN_RESULT) == set(ENDED) | set(RESUMABLE)
    assert not set(IN_RESULT) & {Status.PENDING, Status.STARTED, Status.UNFINISHED}
    assert runfiles.known_statuses() == "completed, diverged, failed, preempted"
    assert [] not in IN_RESULT  # a damaged result.json's list status is "not one of them", not a TypeError


def test_run_status_reads_a_run_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert executors.run_status(run) == Status.PENDING
    (run / runfiles.METRICS).write_text("")
    assert executors.run_status(run) == Status.STARTED
    (run / runfiles.RESULT).write_text('{"status": "diverged"}')
    assert executors.run_status(run) == Status.DIVERGED and runfiles.read_result(run) == {"status": "diverged"}
    (run / runfiles.RESULT).write_text('{"status": "compl')
    assert executors.run_status(run) == Status.FAILED
    assert executors.read_result(run)["reason"].startswith(f"{run / runfiles.RESULT} cannot be read (")
    with pytest.raises(runfiles.RunFileError, match="cannot be read"):
        runfiles.read_result(run)
    (run / runfiles.RESULT).write_text("[1]")
    assert executors.read_result(run) == {"status": "failed", "reason": f"{run / runfiles.RESULT} is not a mapping"}


def _tracked_run(run: Path) -> None:
    """A metrics.jsonl as pretrain writes it (its Tracker: NaN/inf as strings), killed while writing a line."""
    tracker = Tracker(run, tensorboard=False)
    tracker.log({"train/loss": 3.5, "perf/tokens_per_s": 1000.0}, step=1, tokens=64)
    tracker.log({"eval/loss": 3.4, "eval/loss_ewa/0.9": float("nan")}, step=1, tokens=64)
    tracker.log({"train/loss": float("inf"), "perf/tokens_per_s": 3000.0, "train/noise_scale": 12.0,
                 "train/grad_sq_small": 2.0, "train/grad_sq_big": 1.0, "train/noise_scale_batches": [4, 8]},
                step=2, tokens=128)
    tracker.log({"eval/loss": 3.1, "eval/loss_ewa/0.9": 3.0}, step=2, tokens=128)
    tracker.close()
    with open(run / runfiles.METRICS, "a") as f:
        f.write('{"step": 3, "tokens": 192, "train/lo')  # cut short by a kill


def test_the_pipeline_and_the_fit_read_one_metrics_file_alike(tmp_path):
    _tracked_run(tmp_path)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 1, 2, 2]  # the cut line left out
    assert records[2]["train/loss"] == float("inf") and records[1]["eval/loss_ewa/0.9"] != 0  # NaN back as float
    assert [(r["step"], r["eval/loss"]) for r in eval_records(tmp_path)] == [(1, 3.4), (2, 3.1)]
    fit_view = run_metrics.read_metrics(tmp_path / runfiles.METRICS)
    assert fit_view.tokens_per_s == 2000.0 and fit_view.evals == [(1, 3.4, None), (2, 3.1, 3.0)]
    assert [(p.step, p.tokens, p.b_simple, p.batches) for p in fit_view.noise] == [(2, 128, 12.0, (4.0, 8.0))]


def test_a_damaged_line_inside_metrics_jsonl_is_skipped_by_every_reader(tmp_path):
    """The study's eval records (its targets) and the fit's eval curve read the same file the same way. The
    pipeline's reader used to stop at the first line that did not parse and lose every eval after it, while the
    fit's skipped the line: the study set targets from fewer evals than the fit read."""
    _tracked_run(tmp_path)
    lines = (tmp_path / runfiles.METRICS).read_text().splitlines(keepends=True)
    lines.insert(2, '{"step": 1, "tok\x00\n')
    (tmp_path / runfiles.METRICS).write_text("".join(lines))
    assert [r["step"] for r in eval_records(tmp_path)] == [1, 2]
    assert [e[0] for e in run_metrics.read_metrics(tmp_path / runfiles.METRICS).evals] == [1, 2]


def _steps_csv(tmp_path: Path) -> Path:
    table = tmp_path / "steps.csv"
    table.write_text("setting,model_params,tokens,batch_size,steps\n" + "".join(
        f"s,1000000,1000000,{b},{100 * (1 + 40 / b) * (1.02 if b % 3 else 0.98):.3f}\n" for b in (8, 16, 32, 64)))
    return table


def test_a_fit_leaves_the_staging_of_a_host_whose_name_extends_this_ones_alone(tmp_path):
    """Host `h` and host `h-<digits>` share a name prefix: a fit on `h` read the digits of the other host's name as
    a pid of its own, found no such process, and removed the other host's live staging directory (preprocess's
    staging, the same writer, already matched the whole rest of the name)."""
    dead = next(pid for pid in range(4_000_000, 4_100_000) if not Path(f"/proc/{pid}").exists())
    other = tmp_path / f".fit.tmp-{socket.gethostname()}-{dead}-{os.getpid()}-0a0b1c2d"
    other.mkdir()
    assert fit_main([str(_steps_csv(tmp_path)), "--out", str(tmp_path / "fit"), "--bootstrap", "0"]) == 0
    assert other.is_dir() and (tmp_path / "fit" / "cbs.csv").is_file()


def test_a_fit_syncs_every_file_to_disk_before_it_swaps_the_directory_in(tmp_path, monkeypatch):
    """A power loss after the rename must not leave empty files under the new names (the pipeline's writer
    fsyncs; the fit's copy of it did not)."""
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    assert fit_main([str(_steps_csv(tmp_path)), "--out", str(tmp_path / "fit"), "--bootstrap", "0"]) == 0
    written = sorted(str(p.relative_to(tmp_path / "fit")) for p in (tmp_path / "fit").rglob("*") if p.is_file())
    assert len(synced) == len(written) and "cbs.csv" in written
