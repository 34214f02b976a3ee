"""jobs/run_stage.sh's launch, read from its dry run (CBS_DRY_RUN=1) in the environments Slurm gives a job.

The variables are the ones Slurm sets (SLURM_JOB_NODELIST, SLURM_JOB_NUM_NODES, SLURM_GPUS_ON_NODE,
CUDA_VISIBLE_DEVICES, SLURM_CPUS_*); node lists are expanded by the real `scontrol show hostnames`, and by the
script's own expansion where there is no scontrol. What srun would run on each node is run here too (the
script's per-node dry run), so the `node N` lines are the script's real per-node behaviour. tests/test_multinode.py
runs these commands for real on two network namespaces; tests/test_slurm.py runs them under Slurm.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

from cbs.pipeline import rundir
from cbs.pipeline.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
RUN_STAGE = ROOT / "jobs" / "run_stage.sh"
PY = sys.executable
CONFIG = "/runs/b256/run.yaml"
# variables of the machine running the tests that would change the launch
LAUNCH_VARS = ("SLURM_", "CUDA_VISIBLE_DEVICES", "GPUS_PER_NODE", "NNODES", "LAUNCHER", "MASTER_ADDR", "MASTER_PORT",
               "CBS_", "OMP_NUM_THREADS", "PYTHONPATH", "DS_ACCELERATOR")


@dataclass
class Launch:
    env: dict[str, str] = field(default_factory=dict)
    hostfile: list[str] = field(default_factory=list)
    run: list[str] = field(default_factory=list)
    nodes: dict[int, "Launch"] = field(default_factory=dict)


def parse(out: str) -> Launch:
    """The dry run's lines: `env K=V`, `hostfile LINE`, `run CMD` (shell-quoted), `node N <line>`."""
    launch, per_node = Launch(), {}
    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "node":
            n, _, rest = rest.partition(" ")
            per_node.setdefault(int(n), []).append(rest)
        elif kind == "env":
            key, _, value = rest.partition("=")
            launch.env[key] = value
        elif kind == "hostfile":
            launch.hostfile.append(rest)
        elif kind == "run":
            assert not launch.run, f"two run lines:\n{out}"
            launch.run = shlex.split(rest)
        else:
            raise AssertionError(f"unknown dry-run line {line!r}")
    launch.nodes = {n: parse("\n".join(lines)) for n, lines in per_node.items()}
    return launch


def clean_env(**env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_VARS)}
    return {**base, "CBS_PYTHON": PY, "CBS_DRY_RUN": "1", **env}


def dry_run(env: dict[str, str], *args: str, stage: str = "pretrain", argv: list[str] | None = None,
            path: str | None = None) -> subprocess.CompletedProcess:
    env = clean_env(**env)
    if path is not None:
        env["PATH"] = path
    return subprocess.run(argv or ["/bin/bash", str(RUN_STAGE), stage, CONFIG, *args], env=env, capture_output=True,
                          text=True, timeout=60)


def launch_of(env: dict[str, str], *args: str, **kw) -> Launch:
    proc = dry_run(env, *args, **kw)
    assert proc.returncode == 0, proc.stderr
    return parse(proc.stdout)


def slurm_job(nodes: str, n: int, gpus: int, **more: str) -> dict[str, str]:
    """What Slurm sets in a batch job of `n` nodes with --gres=gpu:`gpus` (and a device cgroup: ids from 0)."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": nodes, "SLURM_JOB_NUM_NODES": str(n),
           "SLURM_CPUS_ON_NODE": "64"}
    if gpus:
        env |= {"SLURM_GPUS_ON_NODE": str(gpus), "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus)))}
    return env | more


def flag(cmd: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(f"{name}=")]
    assert len(values) == 1, (name, cmd)
    return values[0]


def launcher(cmd: list[str]) -> list[str]:
    """The launcher's command: after `setsid python -S -c <block SIGTERM, exec the rest>`."""
    assert cmd[:4] == ["setsid", PY, "-S", "-c"] and "SIG_BLOCK, {signal.SIGTERM}" in cmd[4], cmd
    return cmd[5:]


def deepspeed_cmd(launch: Launch) -> list[str]:
    cmd = launcher(launch.run)
    assert cmd[:3] == [PY, "-m", "deepspeed.launcher.runner"], cmd
    assert "--no_ssh" in cmd and "--no_local_rank" in cmd
    assert cmd[-4:] == ["--module", "cbs.pipeline.cli", "pretrain", CONFIG]
    assert flag(cmd, "--hostfile").startswith(os.environ.get("TMPDIR", "/tmp") + "/cbs-hostfile.")
    return cmd


def test_eight_gpus_on_one_node_use_the_deepspeed_launcher(tmp_path):
    env = slurm_job("gpu07", 1, 8, TMPDIR=str(tmp_path))
    launch = launch_of(env, "--set", "seed=3")
    cmd = launcher(launch.run)
    assert cmd[:3] == [PY, "-m", "deepspeed.launcher.runner"] and "srun" not in cmd
    assert launch.hostfile == ["gpu07 slots=8"]
    assert flag(cmd, "--include") == "gpu07:0,1,2,3,4,5,6,7"
    assert flag(cmd, "--hostfile") == f"{tmp_path}/cbs-hostfile.XXXXXX"
    assert (flag(cmd, "--master_addr"), flag(cmd, "--master_port"), flag(cmd, "--node_rank")) == ("gpu07", "29500", "0")
    assert cmd[-6:] == ["--module", "cbs.pipeline.cli", "pretrain", CONFIG, "--set", "seed=3"]
    # each of the 8 ranks gets its eighth of the node's 64 CPUs; the checkout comes first on the path
    assert launch.env["OMP_NUM_THREADS"] == "8" and launch.env["PYTHONPATH"] == str(ROOT)
    assert not launch.nodes
    assert list(tmp_path.iterdir()) == []  # a dry run writes no hostfile

    other = launch_of(env | {"MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29611"})
    assert (flag(other.run, "--master_addr"), flag(other.run, "--master_port")) == ("10.0.0.5", "29611")


def test_gpus_slurm_gave_by_id_are_the_ones_included():
    """Without a device cgroup Slurm hands out GPUs 4,5 of the node: DeepSpeed must use exactly those."""
    launch = launch_of(slurm_job("gpu07", 1, 2, CUDA_VISIBLE_DEVICES="4,5"))
    cmd = deepspeed_cmd(launch)
    assert launch.hostfile == ["gpu07 slots=6"]  # slots up to the highest id; --include picks 4 and 5
    assert flag(cmd, "--include") == "gpu07:4,5"
    assert launch.env["OMP_NUM_THREADS"] == "32"


def per_node_commands(top: Launch, env: dict[str, str]) -> dict[int, Launch]:
    """Run what srun runs on each node (its command after the srun flags, SLURM_NODEID set as srun sets it)."""
    srun = top.run
    task = srun[srun.index("bash"):]
    return {n: launch_of(env | {"SLURM_NODEID": str(n)}, argv=task) for n in top.nodes}


def test_two_nodes_run_one_deepspeed_launcher_per_node_under_srun():
    env = slurm_job("gpu[07-08]", 2, 8, SLURM_CPUS_PER_TASK="64")
    top = launch_of(env)
    srun = top.run
    assert srun[0] == "srun" and srun[1:6] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                                               "--kill-on-bad-exit=1", "--cpus-per-task=64"]
    assert srun[6:9] == ["bash", "-c", 'CBS_NODE_RANK=$SLURM_NODEID exec "$0" pretrain "$@"']
    assert srun[9:] == [str(RUN_STAGE), CONFIG] and not top.hostfile
    assert sorted(top.nodes) == [0, 1]
    for n, node in top.nodes.items():
        cmd = deepspeed_cmd(node)
        assert node.hostfile == ["gpu07 slots=8", "gpu08 slots=8"]
        assert flag(cmd, "--include") == "gpu07:0,1,2,3,4,5,6,7@gpu08:0,1,2,3,4,5,6,7"
        assert flag(cmd, "--node_rank") == str(n)
        assert (flag(cmd, "--master_addr"), flag(cmd, "--master_port")) == ("gpu07", "29500")
    # what srun really starts on each node prints the same launch
    real = per_node_commands(top, env)
    assert {n: (x.hostfile, x.run) for n, x in real.items()} == {n: (x.hostfile, x.run) for n, x in top.nodes.items()}


def test_two_nodes_with_torchrun_rendezvous_on_the_first_node():
    env = slurm_job("gpu[07-08]", 2, 8, LAUNCHER="torchrun", MASTER_PORT="29622")
    top = launch_of(env)
    assert top.run[0] == "srun" and "--nodes=2" in top.run and "--ntasks-per-node=1" in top.run
    assert "--cpus-per-task" not in " ".join(top.run)  # the job asked for none: srun gets none
    for node in list(top.nodes.values()) + list(per_node_commands(top, env).values()):
        cmd = launcher(node.run)
        assert cmd[:3] == [PY, "-m", "torch.distributed.run"] and not node.hostfile
        assert (flag(cmd, "--nnodes"), flag(cmd, "--nproc_per_node")) == ("2", "8")
        assert (flag(cmd, "--rdzv_backend"), flag(cmd, "--rdzv_endpoint"), flag(cmd, "--rdzv_id")) == \
            ("c10d", "gpu07:29622", "4242")
        assert cmd[-4:] == ["-m", "cbs.pipeline.cli", "pretrain", CONFIG]
    assert top.nodes[0].run == top.nodes[1].run  # torchrun's rendezvous gives the node ranks


def test_one_node_torchrun_needs_no_srun():
    launch = launch_of(slurm_job("gpu07", 1, 4, LAUNCHER="torchrun"))
    cmd = launcher(launch.run)
    assert cmd[:3] == [PY, "-m", "torch.distributed.run"]
    assert (flag(cmd, "--nnodes"), flag(cmd, "--rdzv_endpoint")) == ("1", "gpu07:29500")


@pytest.mark.parametrize("env", [{}, slurm_job("cpu[01-02]", 2, 0), {"GPUS_PER_NODE": "1"}],
                         ids=["by-hand", "slurm-cpu-nodes", "one-gpu"])
def test_no_gpus_or_one_is_one_plain_process(env):
    launch = launch_of(env)
    assert launch.run == ["setsid", PY, "-m", "cbs.pipeline.cli", "pretrain", CONFIG]
    assert not launch.hostfile and not launch.nodes


def test_other_stages_are_one_process():
    launch = launch_of(slurm_job("gpu[07-08]", 2, 8), stage="evaluate")
    assert launch.run == [PY, "-m", "cbs.pipeline.cli", "evaluate", CONFIG]
    assert launch.env["OMP_NUM_THREADS"] == "64"  # one process: all the node's CPUs


@pytest.mark.parametrize("env, says", [
    ({"NNODES": "0"}, "NNODES must be an integer >= 1: got '0'"),
    ({"GPUS_PER_NODE": "x"}, "GPUS_PER_NODE must be an integer >= 0"),
    ({"GPUS_PER_NODE": "-1"}, "GPUS_PER_NODE must be an integer >= 0"),
    (slurm_job("gpu07", 1, 8, GPUS_PER_NODE="4"), "CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7' holds 8 GPU(s) but "
                                                  "GPUS_PER_NODE=4"),
    ({"GPUS_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": ""}, "CUDA_VISIBLE_DEVICES='' holds 0 GPU(s) but GPUS_PER_NODE=2"),
    ({"LAUNCHER": "foo"}, "LAUNCHER must be deepspeed or torchrun: got 'foo'"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT must be a port number"),
    ({"CBS_PYTHON": "/no/such/python"}, "no python at /no/such/python"),
    (slurm_job("gpu07", 1, 8, NNODES="2"), "NNODES=2 but the job has 1 node(s): gpu07"),
    ({"NNODES": "2", "GPUS_PER_NODE": "8"}, "NNODES=2 needs a Slurm allocation"),
    ({"CBS_DRY_RUN": "yes"}, "CBS_DRY_RUN must be 0 or 1"),
], ids=lambda x: "" if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items() if not k.startswith("SLURM")))
def test_bad_environment_exits_2_naming_the_variable(env, says, tmp_path):
    proc = dry_run(env | {"TMPDIR": str(tmp_path)})
    assert proc.returncode == 2 and f"run_stage: error: {says}" in proc.stderr, proc.stderr
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []
    # the same checks hold for a real launch: refused before anything starts
    real = dry_run(env | {"TMPDIR": str(tmp_path), "CBS_DRY_RUN": "0"}) if "CBS_DRY_RUN" not in env else proc
    assert real.returncode == 2 and says in real.stderr and "run_stage: pretrain" not in real.stderr


LISTS = {"gpu[01-02,07],login1": ["gpu01", "gpu02", "gpu07", "login1"],
         "x[7,9-10],y": ["x7", "x9", "x10", "y"],
         "a008": ["a008"]}


def path_without_slurm(tmp_path: Path) -> str:
    """A PATH holding every command of this machine but Slurm's: a machine without Slurm."""
    farm = tmp_path / "bin"
    farm.mkdir()
    for d in ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        for tool in Path(d).glob("*") if Path(d).is_dir() else []:
            if tool.name not in {"scontrol", "srun", "sbatch", "squeue", "sinfo", "scancel", "salloc"} and \
                    not (farm / tool.name).exists():
                (farm / tool.name).symlink_to(tool)
    return str(farm)


@pytest.mark.parametrize("with_scontrol", [True, False], ids=["scontrol", "no-scontrol"])
def test_node_lists_expand_like_slurm(with_scontrol, tmp_path):
    if with_scontrol and shutil.which("scontrol") is None:
        pytest.skip("no scontrol on this machine (the no-scontrol case still runs)")
    path = None if with_scontrol else path_without_slurm(tmp_path)
    for nodelist, hosts in LISTS.items():
        env = slurm_job(nodelist, len(hosts), 2)
        if len(hosts) == 1:
            launch = launch_of(env, path=path)
            assert launch.hostfile == [f"{hosts[0]} slots=2"]
            continue
        top = launch_of(env, path=path)
        for node in top.nodes.values():
            assert [line.split()[0] for line in node.hostfile] == hosts
            assert flag(node.run, "--master_addr") == hosts[0]
    if not with_scontrol:  # a form Slurm knows but the script does not: say so, exit 2
        proc = dry_run(slurm_job("r[1-2]-n[1-2]", 4, 2), path=path)
        assert proc.returncode == 2 and "cannot expand node list 'r[1-2]-n[1-2]' without scontrol" in proc.stderr


# ---- stopping a launch: what Slurm's signals do to the ranks ----------------------------------------------------


def stoppable(data: Path, run_dir: Path, steps: int = 2000) -> Path:
    """A run far longer than the test waits (~30 steps/s), every step logged, no periodic checkpoint."""
    cfg = {"data_dir": str(data), "run_dir": str(run_dir), "model": {"preset": "tiny", "seq_len": 32},
           "global_batch_seqs": 4, "micro_batch_seqs": 2, "train_tokens": 4 * 32 * steps, "log": {"every_steps": 1},
           "eval": {"every_steps": 1000, "growth": 0, "eval_tokens": 256}, "checkpoint": {"every_steps": 100_000}}
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(cfg: Path, log: Path, **env: str) -> subprocess.Popen:
    # TMPDIR: the hostfile of a launch killed by the test's cleanup stays there, not in /tmp
    env = clean_env(CBS_DRY_RUN="0", OMP_NUM_THREADS="1", TMPDIR=str(log.parent), **env)
    return subprocess.Popen(["/bin/bash", str(RUN_STAGE), "pretrain", str(cfg)], env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a launch and every process under it (the launcher runs in its own session: it outlives a killed
    script; torchrun's workers have sessions of their own)."""
    try:
        procs = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, log: Path) -> None:
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() or max((m["step"] for m in read_metrics(run_dir)), default=0) < step:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_scancel_then_the_time_limit_signal_stop_every_rank_once(launcher, stdlib_data, tmp_path):
    """What scancel does (SIGTERM to every process of the job), then SIGUSR1 to the script: the launchers do not
    pass SIGTERM on (a rank would end at once on its second signal), each rank gets one SIGUSR1 from the script,
    all stop at one step and save, and the script exits 75 (torchrun reports its ranks' 75 as 1)."""
    run, log = tmp_path / "run", tmp_path / "log"
    proc = start(stoppable(stdlib_data, run), log, GPUS_PER_NODE="2", LAUNCHER=launcher,
                 MASTER_PORT="29741" if launcher == "torchrun" else "29742")
    try:
        wait_for_step(proc, run, 5, log)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len([p for p in tree if p.cmdline()[-3:-1] == ["cbs.pipeline.cli", "pretrain"]
                    and "LOCAL_RANK" in p.environ()]) == 2  # the two ranks, under their launcher
        for p in tree:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:  # ended by the SIGTERM of a process before it (it should not)
                pass
        time.sleep(0.5)  # bash may run one trap for two signals that come at the same instant
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=90) == 75, log.read_text()[-3000:]
    finally:
        kill_tree(proc)
    out = log.read_text()
    assert "passed SIGTERM on as SIGUSR1 to 2 of 2 rank process(es)" in out and "SIGUSR1 as well: dropped" in out
    assert "Signal 10" not in out and "Signal 15" not in out  # torchrun's report of a rank ended by a signal
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "preempted" and 5 <= result["steps"] < 2000, result
    assert rundir.tags(run)[-1] == rundir.tag(result["steps"])  # the checkpoint of the step it stopped at
    assert max(m["step"] for m in read_metrics(run)) == result["steps"]
    assert not list(tmp_path.glob("cbs-hostfile.*"))  # removed on the way out


@pytest.mark.slow
def test_a_signal_before_training_waits_for_the_rank(stdlib_data, tmp_path):
    """SIGUSR1 while python still starts (it would kill a process without the handler): held until the rank
    handles it, then passed on; the run stops after its first steps with a checkpoint."""
    run, log = tmp_path / "run", tmp_path / "log"
    proc = start(stoppable(stdlib_data, run), log)
    try:
        time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=120) == 75, log.read_text()[-3000:]
    finally:
        kill_tree(proc)
    out = log.read_text()
    assert out.index("run_stage: SIGUSR1") < out.index("passed SIGUSR1 on as SIGUSR1 to 1 of 1 python")
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "preempted" and 1 <= result["steps"] < 100, result
    assert rundir.tags(run) == [rundir.tag(result["steps"])]


@pytest.mark.slow
def test_a_rendezvous_left_in_the_environment_does_not_hide_the_ranks(stdlib_data, tmp_path):
    """A process that ran pretrain in-process keeps LOCAL_RANK=0 (DeepSpeed reads it), and sbatch --export=ALL
    passed it to the job: the launcher then looked like a rank, the stop went to it (it does not handle SIGUSR1)
    and the run trained on to the end (seen in CI: a scancel'd 2-rank job finished 'completed')."""
    run, log = tmp_path / "run", tmp_path / "log"
    proc = start(stoppable(stdlib_data, run), log, GPUS_PER_NODE="2", LAUNCHER="deepspeed", MASTER_PORT="29743",
                 LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")
    try:
        wait_for_step(proc, run, 3, log)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=90) == 75, log.read_text()[-3000:]
    finally:
        kill_tree(proc)
    assert "passed SIGUSR1 on as SIGUSR1 to 2 of 2 rank process(es)" in log.read_text()
    assert json.loads((run / "result.json").read_text())["status"] == "preempted"
