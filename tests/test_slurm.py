"""The Slurm side on a real one-node Slurm (scripts/slurm_cluster.sh starts it): cbs.pipeline.slurm and jobs/*.sbatch.

No mocks: jobs are submitted with sbatch, followed with squeue/scontrol, and run the real stages (preprocess on
real text, a pretrain job array after it, 2-process pretrain through both launchers of jobs/run_stage.sh).
The cluster tests skip only where this machine cannot host the cluster (not root, or apt cannot install the
Debian packages); the command-line and PATH checks need no cluster.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import stdlib_texts, write_jsonl
from cbs.pipeline import rundir
from cbs.pipeline.metrics import read_metrics
from cbs.pipeline.slurm import SlurmError, SlurmResources, cancel, job_states, require_sbatch, submit, wait

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "scripts" / "slurm_cluster.sh"
JOBS = ROOT / "jobs"
POLL_S = 0.2


def script(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + body + "\n")
    path.chmod(0o755)
    return path


def job_times(job_id: str) -> tuple[str, str]:
    """StartTime and EndTime of a job or array task (ISO, 1 s resolution: compare as strings)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                         check=True).stdout
    return re.search(r"StartTime=(\S+)", out).group(1), re.search(r"EndTime=(\S+)", out).group(1)


def log_of(log_dir: Path, pattern: str) -> str:
    logs = sorted(log_dir.glob(pattern))
    return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in logs) or f"(no log {pattern} in {log_dir})"


# ---- without a cluster ---------------------------------------------------------------------------------------


def test_require_sbatch_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no sbatch
    with pytest.raises(SlurmError, match=r"sbatch not found on PATH.*--executor local.*Slurm module"):
        require_sbatch()
    with pytest.raises(SlurmError, match="sbatch not found on PATH"):
        submit(JOBS / "fit.sbatch", ["s", "o"], SlurmResources(), job_name="x", log_dir=tmp_path / "logs")


def test_dry_run_is_the_command_with_every_resource(tmp_path):
    res = SlurmResources(partition="gpu", account="proj42", nodes=2, gpus_per_node=8, cpus_per_task=16,
                         time="1-12:00:00", max_parallel=3, extra=["--qos=high"])
    cmd = submit(JOBS / "pretrain.sbatch", ["/s/runs.txt"], res, job_name="cbs-pretrain", array="0-9",
                 dependency="afterok:17", env={"CBS_STUDY": "s1", "LIST": "a,b"}, log_dir=tmp_path / "logs",
                 dry_run=True)
    assert cmd[:2] == ["sbatch", "--parsable"]
    assert cmd[-2:] == [str(JOBS / "pretrain.sbatch"), "/s/runs.txt"]
    for flag in ["--job-name=cbs-pretrain", f"--output={tmp_path / 'logs'}/%x-%A_%a.out", "--array=0-9%3",
                 "--dependency=afterok:17", "--partition=gpu", "--account=proj42", "--nodes=2", "--gres=gpu:8",
                 "--cpus-per-task=16", "--time=1-12:00:00", "--qos=high",
                 "--export=ALL,GPUS_PER_NODE=8,NNODES=2,CBS_STUDY=s1,LIST"]:  # a comma value goes by name
        assert flag in cmd
    assert not (tmp_path / "logs").exists()  # a dry run creates nothing

    plain = submit(JOBS / "fit.sbatch", ["s", "o"], SlurmResources(), job_name="cbs-fit", log_dir=tmp_path,
                   dry_run=True)
    assert f"--output={tmp_path}/%x-%j.out" in plain and "--nodes=1" in plain
    assert not any(f.startswith(("--gres", "--partition", "--account", "--time", "--array")) for f in plain)
    assert "--array=0-3%2" in submit(JOBS / "x", [], SlurmResources(max_parallel=5), job_name="x",
                                     array="0-3%2", log_dir=tmp_path, dry_run=True)  # an explicit % wins


@pytest.mark.parametrize("kw, key", [({"time": "2h"}, "slurm.time"), ({"nodes": 0}, "slurm.nodes"),
                                     ({"gpus_per_node": -1}, "slurm.gpus_per_node"),
                                     ({"max_parallel": 0}, "slurm.max_parallel"),
                                     ({"extra": "--qos=high"}, "slurm.extra"),
                                     ({"partition": "a b"}, "slurm.partition")])
def test_impossible_resources_are_refused(kw, key):
    with pytest.raises(SlurmError, match=re.escape(key)):
        SlurmResources(**kw)


# ---- on the cluster ------------------------------------------------------------------------------------------


@pytest.mark.slurm
def test_states_failures_and_dependencies(slurm_cluster, tmp_path):
    # up and serving (other jobs may hold the node: "mixed" or "allocated", never "drained" or "down")
    assert subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split() in \
        (["idle"], ["mixed"], ["allocated"])
    logs, res = tmp_path / "logs", SlurmResources()
    ok = submit(script(tmp_path / "ok.sh", 'echo "hello from $SLURM_JOB_ID: $1 $LIST $GPUS_PER_NODE/$NNODES"'),
                ["an arg"], res, job_name="ok", env={"LIST": "a,b"}, log_dir=logs)
    first = submit(script(tmp_path / "first.sh", "sleep 1.5; date +%s.%N > \"$1\"; exit 3"),
                   [str(tmp_path / "first_end")], res, job_name="first", log_dir=logs)
    after = submit(script(tmp_path / "after.sh", "date +%s.%N > \"$1\""), [str(tmp_path / "after_start")], res,
                   job_name="after", dependency=f"afterany:{first}", log_dir=logs)
    never = submit(script(tmp_path / "never.sh", "touch \"$1\""), [str(tmp_path / "never_ran")], res,
                   job_name="never", dependency=f"afterok:{first}", log_dir=logs)
    assert job_states([after])[after] == "PENDING"

    seen = []
    states = wait([ok, first, after, never], poll_s=POLL_S, timeout_s=60, on_update=seen.append)
    assert states[ok] == "COMPLETED" and states[first] == "FAILED" and states[after] == "COMPLETED"
    # our cluster cancels a job whose dependency can never be met; stock Slurm leaves it pending forever
    assert states[never] in ("CANCELLED", "DEPENDENCY_NEVER_SATISFIED")
    assert not (tmp_path / "never_ran").exists()
    assert float((tmp_path / "after_start").read_text()) >= float((tmp_path / "first_end").read_text())
    # the job's log in log_dir, its arguments, and the environment from `env` (a value with a comma too)
    assert (logs / f"ok-{ok}.out").read_text().strip() == f"hello from {ok}: an arg a,b 0/1"
    assert seen[-1] == states and len(seen) >= 2
    assert job_states(["987654321"]) == {"987654321": "UNKNOWN"}  # never existed (or purged)


@pytest.mark.slurm
def test_cancelled_array_reports_every_task(slurm_cluster, tmp_path):
    array = submit(script(tmp_path / "sleep.sh", "sleep 60"), [], SlurmResources(max_parallel=1), job_name="sleepy",
                   array="0-3", log_dir=tmp_path)
    tasks = [f"{array}_{t}" for t in range(4)]
    wait_for = time.monotonic() + 30
    while job_states([array]).get(tasks[0]) != "RUNNING":
        assert time.monotonic() < wait_for
        time.sleep(POLL_S)
    assert job_states([array]) == {tasks[0]: "RUNNING", **dict.fromkeys(tasks[1:], "PENDING")}
    cancel([array])
    # scontrol shows cancelled tasks as one record ("ArrayTaskId=0-3%1"): still one state per task
    assert wait([array], poll_s=POLL_S, timeout_s=30) == dict.fromkeys(tasks, "CANCELLED")


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_pretrain(data_dir: Path, run_dir: Path, global_batch: int, steps: int = 10) -> dict:
    return {"data_dir": str(data_dir), "run_dir": str(run_dir), "model": {"preset": "tiny", "seq_len": 32},
            "global_batch_seqs": global_batch, "micro_batch_seqs": 4, "train_tokens": global_batch * 32 * steps,
            "eval": {"every_steps": 5, "growth": 0, "eval_tokens": 256}, "checkpoint": {"every_steps": 5}}


def write_steps_csv(path: Path, batches: list[int]) -> Path:
    """Steps to target on McCandlish's hyperbola S = S_min (1 + B_noise / B), S_min 100, B_noise 64."""
    rows = [f"d1,1e6,2e7,{b},{round(100 * (1 + 64 / b))}" for b in batches]
    path.write_text("setting,model_params,tokens,batch_size,steps\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def study(slurm_cluster, tmp_path_factory):
    """Every stage's job script, submitted at once and chained as a study chains them:

    preprocess (real text) -> afterok: pretrain array of 2 runs (%1), one 2-process pretrain per launcher
    -> afterok: evaluate (the 2 runs and a bogus dir); fit on a good and on a bad steps table.
    """
    root = tmp_path_factory.mktemp("slurm_study")
    logs, data = root / "logs", root / "data"
    corpus = write_jsonl(root / "corpus.jsonl", stdlib_texts(60))
    prep_cfg = write_yaml(root / "preprocess.yaml", {"inputs": [str(corpus)], "output_dir": str(data),
                                                      "tokenizer": {"vocab_size": 400}, "val_fraction": 0.2})
    runs = [root / "study" / "runs" / f"b{b}" for b in (4, 8)]
    configs = [write_yaml(root / f"pretrain_b{b}.yaml", tiny_pretrain(data, run, b, steps=40 // b))
               for b, run in zip((4, 8), runs)]
    runs_file = root / "runs.txt"
    runs_file.write_text("".join(f"{c}\n" for c in configs))
    cpu = SlurmResources()
    jobs = {"prep": submit(JOBS / "preprocess.sbatch", [str(prep_cfg)], cpu, job_name="cbs-preprocess",
                           log_dir=logs)}
    after_prep = f"afterok:{jobs['prep']}"
    jobs["train"] = submit(JOBS / "pretrain.sbatch", [str(runs_file)], SlurmResources(max_parallel=1),
                           job_name="cbs-pretrain", array="0-1", dependency=after_prep, log_dir=logs)
    for launcher in ("deepspeed", "torchrun"):
        # 2 ranks on CPU: GPUS_PER_NODE=2 picks the multi-process launch without asking Slurm for GPUs
        cfg = write_yaml(root / f"{launcher}.yaml", tiny_pretrain(data, root / launcher, 8, steps=5))
        (root / f"{launcher}.runs").write_text(f"{cfg}\n")
        (root / f"tmp_{launcher}").mkdir()  # the job's TMPDIR: where the hostfile goes, and must not stay
        jobs[launcher] = submit(JOBS / "pretrain.sbatch", [str(root / f"{launcher}.runs")], cpu,
                                job_name=f"cbs-{launcher}", dependency=after_prep, log_dir=logs,
                                env={"GPUS_PER_NODE": "2", "LAUNCHER": launcher, "MASTER_PORT": "29511"
                                     if launcher == "torchrun" else "29512", "TMPDIR": str(root / f"tmp_{launcher}")})
    jobs["evaluate"] = submit(JOBS / "evaluate.sbatch", [*map(str, runs), str(root / "no_such_run")], cpu,
                              job_name="cbs-evaluate", dependency=f"afterok:{jobs['train']}", log_dir=logs)
    good = write_steps_csv(root / "steps.csv", [16, 32, 64, 128, 256])
    bad = write_steps_csv(root / "one_batch.csv", [64])
    jobs["fit"] = submit(JOBS / "fit.sbatch", [str(good), str(root / "fit"), "--bootstrap", "50"], cpu,
                         job_name="cbs-fit", log_dir=logs)
    jobs["fit_bad"] = submit(JOBS / "fit.sbatch", [str(bad), str(root / "fit_bad"), "--bootstrap", "0"], cpu,
                             job_name="cbs-fit-bad", log_dir=logs)
    seen: list[dict] = []
    states = wait(list(jobs.values()), poll_s=POLL_S, timeout_s=300, on_update=seen.append)
    return {"root": root, "logs": logs, "data": data, "runs": runs, "jobs": jobs, "states": states, "seen": seen}


def assert_state(study: dict, key: str, expected: str, log_glob: str) -> None:
    assert study["states"][key] == expected, log_of(study["logs"], log_glob)


@pytest.mark.slurm
def test_preprocess_job(study):
    assert_state(study, study["jobs"]["prep"], "COMPLETED", "cbs-preprocess-*.out")
    manifest = json.loads((study["data"] / "manifest.json").read_text())
    assert manifest["vocab_size"] == 400
    assert {"train.bin", "train.idx", "val.bin", "val.idx", "tokenizer.model"} <= \
        {p.name for p in study["data"].iterdir()}


@pytest.mark.slurm
def test_pretrain_array_after_preprocess(study):
    prep, train, states = study["jobs"]["prep"], study["jobs"]["train"], study["states"]
    tasks = [f"{train}_0", f"{train}_1"]
    assert {k: states[k] for k in tasks} == dict.fromkeys(tasks, "COMPLETED"), \
        log_of(study["logs"], "cbs-pretrain-*.out")
    assert train not in states  # one state per array task, none for the array id itself
    for run, batch in zip(study["runs"], (4, 8)):
        result = json.loads((run / "result.json").read_text())
        assert result["status"] == "completed" and result["steps"] == 40 // batch, result
        assert (run / "config.yaml").exists() and (run / "metrics.jsonl").exists()
    # afterok: training started only after preprocessing ended; %1: the second task after the first
    prep_end = job_times(prep)[1]
    (start0, end0), (start1, _) = job_times(tasks[0]), job_times(tasks[1])
    assert start0 >= prep_end and start1 >= end0
    assert not any(s.get(tasks[0]) == "RUNNING" and s.get(tasks[1]) == "RUNNING" for s in study["seen"])
    assert any(s.get(tasks[1]) == "PENDING" for s in study["seen"])  # pending tasks are listed one by one


@pytest.mark.slurm
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_two_process_pretrain_through_each_launcher(study, launcher):
    assert_state(study, study["jobs"][launcher], "COMPLETED", f"cbs-{launcher}-*.out")
    resolved = yaml.safe_load((study["root"] / launcher / "config.yaml").read_text())["resolved"]
    assert resolved["world_size"] == 2
    # same global batches as the 1-rank b8 run of the array: same losses
    one_rank = json.loads((study["runs"][1] / "result.json").read_text())
    two_ranks = json.loads((study["root"] / launcher / "result.json").read_text())
    assert two_ranks["status"] == "completed" and two_ranks["steps"] == one_rank["steps"] == 5
    assert two_ranks["final"]["eval/loss"] == pytest.approx(one_rank["final"]["eval/loss"], abs=1e-4)
    assert not list((study["root"] / f"tmp_{launcher}").glob("cbs-hostfile.*"))  # node-local, removed at exit


@pytest.mark.slurm
def test_evaluate_job_goes_on_past_a_bad_run_dir(study):
    assert_state(study, study["jobs"]["evaluate"], "FAILED", "cbs-evaluate-*.out")
    for run in study["runs"]:
        assert (run / "eval.json").is_file(), log_of(study["logs"], "cbs-evaluate-*.out")
    assert "no_such_run" in log_of(study["logs"], "cbs-evaluate-*.out")


@pytest.mark.slurm
def test_fit_jobs(study):
    assert_state(study, study["jobs"]["fit"], "COMPLETED", "cbs-fit-*.out")
    cbs = (study["root"] / "fit" / "cbs.csv").read_text().splitlines()
    header, row = cbs[0].split(","), dict(zip(cbs[0].split(","), cbs[1].split(",")))
    assert header[:3] == ["setting", "model_params", "tokens"]
    assert float(row["b_noise"]) == pytest.approx(64, rel=0.05)
    assert float(row["s_min"]) == pytest.approx(100, rel=0.05)
    # bad input: exit 2 with one clean line, nothing written
    assert_state(study, study["jobs"]["fit_bad"], "FAILED", "cbs-fit-bad-*.out")
    log = log_of(study["logs"], "cbs-fit-bad-*.out")
    assert "cbs fit: error:" in log and "Traceback" not in log
    assert not (study["root"] / "fit_bad").exists()
    out = subprocess.run(["scontrol", "show", "job", study["jobs"]["fit_bad"]], capture_output=True, text=True)
    assert "ExitCode=2:0" in out.stdout


@pytest.mark.slurm
def test_requeued_pretrain_task_resumes(study, tmp_path):
    """scontrol requeue kills a running task and starts it again: it resumes from its checkpoint and appends to
    its log. (Slurm holds a requeued job for 120 s, BeginTime; the test shortens that.)"""
    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "run.yaml", tiny_pretrain(study["data"], run, 4, steps=30))
    (tmp_path / "runs.txt").write_text(f"{cfg}\n")
    logs = tmp_path / "logs"
    job = submit(JOBS / "pretrain.sbatch", [str(tmp_path / "runs.txt")], SlurmResources(), job_name="cbs-requeue",
                 array="0", log_dir=logs)
    task = f"{job}_0"
    deadline = time.monotonic() + 90
    while not list((run / "checkpoints").glob("step*")):
        assert time.monotonic() < deadline and job_states([job])[task] in ("PENDING", "RUNNING"), \
            log_of(logs, "*.out")
        time.sleep(0.1)
    subprocess.run(["scontrol", "requeue", task], check=True)
    while job_states([job])[task] != "PENDING":  # killed, then queued again
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # slurmd refuses a relaunch in the second the old launch's credential was revoked ("Job credential revoked":
    # why Slurm holds requeued jobs); an update, unlike a later StartTime, makes slurmctld schedule at once
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=True)
    assert wait([job], poll_s=POLL_S, timeout_s=120) == {task: "COMPLETED"}, log_of(logs, "*.out")
    log = full_log(logs, "*.out")  # whole: log_of keeps only the tail
    assert log.count("run_stage: pretrain") == 2 and "DUE TO JOB REQUEUE" in log and "resumed from" in log, \
        log[-3000:]
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == 30
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in json.loads(line)]
    assert steps == sorted(set(steps))  # nothing logged twice


def preemptible(data: Path, run_dir: Path, steps: int, batch: int = 4) -> dict:
    """A run long enough to be signalled mid-way (~30 steps/s on one CPU); no periodic checkpoint, so a resume can
    only start from the one the stop saved. Every step logged, evals on a fixed grid: metrics to compare."""
    cfg = tiny_pretrain(data, run_dir, batch, steps=steps)
    return cfg | {"log": {"every_steps": 1}, "eval": {"every_steps": 50, "growth": 0, "eval_tokens": 256},
                  "checkpoint": {"every_steps": 100_000}}


def wait_for_step(run: Path, step: int, job: str, task: str, logs: Path, timeout_s: float = 180) -> None:
    """Until the run has logged `step` (the job's state only every 2 s: squeue and scontrol are slow to ask)."""
    deadline, asked = time.monotonic() + timeout_s, 0.0
    while not (run / "metrics.jsonl").exists() or \
            max((m["step"] for m in read_metrics(run)), default=0) < step:
        assert time.monotonic() < deadline, log_of(logs, "*.out")
        if time.monotonic() - asked > 2:
            assert job_states([job])[task] in ("PENDING", "RUNNING"), log_of(logs, "*.out")
            asked = time.monotonic()
        time.sleep(0.05)


def full_log(log_dir: Path, pattern: str) -> str:
    return "".join(p.read_text() for p in sorted(log_dir.glob(pattern)))


def scontrol_field(job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=True).stdout
    return re.search(rf"\b{name}=(\S*)", out).group(1)


@pytest.mark.slurm
@pytest.mark.slow
def test_usr1_before_the_time_limit_saves_requeues_and_resumes_exactly(slurm_cluster, stdlib_data, tmp_path):
    """What `#SBATCH --signal=B:USR1@300` does near the time limit, sent now (`scancel --signal=USR1 --batch`:
    the batch shell only, as B: does): the run saves after its step and exits 75 within seconds, the task requeues
    itself, starts again, resumes, completes, and logs exactly what an uninterrupted run of it logs."""
    steps, logs = 200, tmp_path / "logs"
    for name in ("cut", "whole"):
        cfg = write_yaml(tmp_path / f"{name}.yaml", preemptible(stdlib_data, tmp_path / name, steps))
        (tmp_path / f"{name}.txt").write_text(f"{cfg}\n")
    job = submit(JOBS / "pretrain.sbatch", [str(tmp_path / "cut.txt")], SlurmResources(), job_name="cbs-usr1",
                 array="0", log_dir=logs)
    whole = submit(JOBS / "pretrain.sbatch", [str(tmp_path / "whole.txt")], SlurmResources(), job_name="cbs-whole",
                   log_dir=logs)
    task = f"{job}_0"
    wait_for_step(tmp_path / "cut", 10, job, task, logs)
    signalled = time.monotonic()
    subprocess.run(["scancel", "--signal=USR1", "--batch", task], check=True)
    while job_states([job])[task] != "PENDING":  # saved, stopped, requeued by itself
        assert time.monotonic() - signalled < 30, log_of(logs, "cbs-usr1-*.out")
        time.sleep(0.1)
    stopped_s = time.monotonic() - signalled
    log = full_log(logs, "cbs-usr1-*.out")
    stop = re.search(r"stopped by SIGUSR1 after step (\d+)", log)
    assert stop and 10 <= int(stop.group(1)) < steps and f"requeued job {task}" in log, log[-3000:]
    assert json.loads((tmp_path / "cut" / "result.json").read_text())["status"] == "preempted"
    assert stopped_s < 15, f"{stopped_s:.1f} s from the signal to the requeue"
    assert scontrol_field(task, "Restarts") == "1"
    # Slurm holds a requeued job for 120 s (BeginTime); let it go now (see test_requeued_pretrain_task_resumes)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=True)
    states = wait([job, whole], poll_s=POLL_S, timeout_s=180)
    assert states == {task: "COMPLETED", whole: "COMPLETED"}, log_of(logs, "*.out")
    log = full_log(logs, "cbs-usr1-*.out")
    assert log.count("run_stage: pretrain") == 2 and "resumed from" in log, log[-3000:]
    result = json.loads((tmp_path / "cut" / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == steps
    cut, uncut = read_metrics(tmp_path / "cut"), read_metrics(tmp_path / "whole")
    assert [m["step"] for m in cut] == [m["step"] for m in uncut]  # each step once, none lost
    for a, b in zip(cut, uncut):
        assert a.keys() == b.keys()
        for key in a:
            if not key.startswith("perf/"):
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2], ids=["one-process", "deepspeed-2-ranks"])
def test_scancel_saves_the_run_but_never_requeues_it(ranks, slurm_cluster, stdlib_data, tmp_path):
    """scancel sends SIGTERM to every process of the job, launchers included: the run still saves and stops
    (status preempted; the launchers must not pass SIGTERM on to ranks that already have it), and the task stays
    cancelled: a requeue would undo what the user asked for."""
    cfg = write_yaml(tmp_path / "run.yaml", preemptible(stdlib_data, tmp_path / "run", 200, batch=4 * ranks))
    (tmp_path / "runs.txt").write_text(f"{cfg}\n")
    logs = tmp_path / "logs"
    env = {"GPUS_PER_NODE": "2", "MASTER_PORT": "29751"} if ranks == 2 else {}
    job = submit(JOBS / "pretrain.sbatch", [str(tmp_path / "runs.txt")], SlurmResources(), job_name="cbs-cancel",
                 array="0", log_dir=logs, env=env)
    task = f"{job}_0"
    wait_for_step(tmp_path / "run", 20, job, task, logs)
    subprocess.run(["scancel", task], check=True)
    assert wait([job], poll_s=POLL_S, timeout_s=60) == {task: "CANCELLED"}
    time.sleep(3)  # a requeue would show by now
    assert job_states([job]) == {task: "CANCELLED"} and scontrol_field(task, "Restarts") == "0"
    log = full_log(logs, "*.out")
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "preempted" and result["world_size"] == ranks, log[-3000:]
    assert rundir.tags(tmp_path / "run")[-1] == rundir.tag(result["steps"])
    assert "not requeued" in log, log[-3000:]
