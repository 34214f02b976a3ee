"""A 2-node job on one machine: two network namespaces joined by a veth pair are the two hosts.

scripts/netns_hosts.sh makes cbs-n0 (10.77.0.1) and cbs-n1 (10.77.0.2), each with its own hostname. The launch is
the one jobs/run_stage.sh makes for a Slurm allocation of those 2 nodes x 1 rank (its dry run: what srun would
start on each node), and each node's command runs inside its namespace: torchrun with its c10d rendezvous on
cbs-n0, and the deepspeed launcher with --no_ssh --node_rank and the hostfile the script wrote. The ranks talk
gloo across the veth link, and the run must log what the same run logs on one node with 2 ranks.
Skipped only where namespaces cannot be made (not root, no iproute2): scripts/netns_hosts.sh exits 3 there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_launch import LAUNCH_VARS, RUN_STAGE, kill_tree, launch_of
from cbs.pipeline.metrics import read_metrics
from test_pretrain import SEQ, make_cfg, run_subprocess, series, torchrun, write_cfg

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
NETNS = ROOT / "scripts" / "netns_hosts.sh"
STEPS = 60


@pytest.fixture(scope="module")
def two_hosts():
    """The namespaces, up; taken down at the end if this fixture made them."""
    already = subprocess.run(["bash", str(NETNS), "status"], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", str(NETNS), "up"], capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"no network namespaces here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"scripts/netns_hosts.sh up failed:\n{proc.stderr}"
    yield ["cbs-n0", "cbs-n1"]
    if not already:
        down = subprocess.run(["bash", str(NETNS), "down"], capture_output=True, text=True, timeout=60)
        assert down.returncode == 0, down.stderr


def config(data: Path, run_dir: Path) -> Path:
    """2 ranks x micro 4, 60 steps, every step logged; eval of raw and EWA weights every 10 steps."""
    cfg = make_cfg(data, run_dir, train_tokens=8 * SEQ * STEPS)
    return write_cfg(cfg, run_dir.parent / f"{run_dir.name}.yaml")


@pytest.fixture(scope="module")
def one_node(stdlib_data, tmp_path_factory) -> Path:
    """The same run on one node: 2 ranks under torchrun --standalone."""
    run_dir = tmp_path_factory.mktemp("one_node") / "run"
    run_subprocess(torchrun(2, "pretrain", str(config(stdlib_data, run_dir))))
    return run_dir


def slurm_allocation(hosts: list[str], launcher: str, port: int) -> dict[str, str]:
    """What Slurm sets in a batch job on those 2 nodes (no GPUs: GPUS_PER_NODE=1 asks for one rank per node)."""
    return {"SLURM_JOB_ID": "31337", "SLURM_JOB_NODELIST": f"{hosts[0][:-1]}[0-1]", "SLURM_JOB_NUM_NODES": "2",
            "GPUS_PER_NODE": "1", "LAUNCHER": launcher, "MASTER_PORT": str(port)}


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_VARS)} | {"OMP_NUM_THREADS": "1"}


def wait_both(procs: dict[int, subprocess.Popen], logs: dict[int, Path], hosts: list[str]) -> dict[int, int]:
    """Until both end, or one fails (the other would wait for it at the rendezvous); their exit statuses."""
    try:
        deadline = time.monotonic() + 180
        while any(p.poll() is None for p in procs.values()) and not any(p.poll() not in (None, 0, 75)
                                                                         for p in procs.values()):
            assert time.monotonic() < deadline, "the 2-node run did not end within 180 s"
            time.sleep(0.2)
    finally:
        for proc in procs.values():
            kill_tree(proc)
    for n, proc in procs.items():
        assert proc.wait() in (0, 75), f"node {n} ({hosts[n]}) exited {proc.returncode}:\n{logs[n].read_text()[-3000:]}"
    return {n: p.returncode for n, p in procs.items()}


def run_on_two_hosts(hosts: list[str], launcher: str, port: int, cfg: Path, tmp_path: Path) -> dict[int, list]:
    env = slurm_allocation(hosts, launcher, port)
    top = launch_of(env, argv=["/bin/bash", str(RUN_STAGE), "pretrain", str(cfg)])
    assert top.run[0] == "srun" and sorted(top.nodes) == [0, 1]
    base = base_env() | top.env
    procs, commands = {}, {}
    for n, node in top.nodes.items():
        cmd = list(node.run)
        if node.hostfile:  # the file the script writes on the node (the dry run names its mktemp template)
            hostfile = tmp_path / f"hostfile{n}"
            hostfile.write_text("".join(f"{line}\n" for line in node.hostfile))
            cmd = [f"--hostfile={hostfile}" if a.startswith("--hostfile=") else a for a in cmd]
        commands[n] = cmd
        log = open(tmp_path / f"node{n}.log", "w")
        procs[n] = subprocess.Popen(["bash", str(NETNS), "exec", str(n), *cmd], env=base | node.env, cwd=tmp_path,
                                    stdout=log, stderr=subprocess.STDOUT)
    codes = wait_both(procs, {n: tmp_path / f"node{n}.log" for n in procs}, hosts)
    assert codes == {0: 0, 1: 0}
    return commands


def assert_same_run(one_node: Path, run_dir: Path) -> None:
    """Bitwise the same metrics: with 2 ranks either way, every all-reduce adds the same two numbers, and
    a + b == b + a in floating point whatever the transport (gloo over the veth, or one host's)."""
    ref, got = read_metrics(one_node), read_metrics(run_dir)
    assert [m["step"] for m in got] == [m["step"] for m in ref]
    assert len(series(run_dir, "train/loss")) == STEPS and sorted(series(run_dir, "eval/loss")) == [1, *range(10, STEPS + 1, 10)]
    for a, b in zip(ref, got):
        assert a.keys() == b.keys()
        assert {k: v for k, v in a.items() if not k.startswith("perf/")} == \
            {k: v for k, v in b.items() if not k.startswith("perf/")}, a["step"]
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())["resolved"]
    assert resolved["world_size"] == 2


def test_torchrun_rendezvous_across_two_hosts(two_hosts, one_node, stdlib_data, tmp_path):
    cfg = config(stdlib_data, tmp_path / "run")
    commands = run_on_two_hosts(two_hosts, "torchrun", 29731, cfg, tmp_path)
    assert commands[0] == commands[1] and "--rdzv_endpoint=cbs-n0:29731" in commands[0]
    assert_same_run(one_node, tmp_path / "run")


def test_deepspeed_launcher_without_ssh_across_two_hosts(two_hosts, one_node, stdlib_data, tmp_path):
    cfg = config(stdlib_data, tmp_path / "run")
    commands = run_on_two_hosts(two_hosts, "deepspeed", 29732, cfg, tmp_path)
    assert [(tmp_path / f"hostfile{n}").read_text() for n in (0, 1)] == ["cbs-n0 slots=1\ncbs-n1 slots=1\n"] * 2
    assert [a for a in commands[0] if a.startswith("--node_rank")] == ["--node_rank=0"]
    assert [a for a in commands[1] if a.startswith("--node_rank")] == ["--node_rank=1"]
    assert_same_run(one_node, tmp_path / "run")


def srun_tasks(hosts: list[str], cfg: Path, tmp_path: Path, name: str) -> tuple[dict, dict]:
    """What srun starts on each node (this script again, CBS_NODE_RANK from SLURM_NODEID), for real."""
    env = slurm_allocation(hosts, "torchrun", 29733)
    top = launch_of(env, argv=["/bin/bash", str(RUN_STAGE), "pretrain", str(cfg)])
    task = top.run[top.run.index("bash"):]
    procs, logs = {}, {}
    for n in (0, 1):
        logs[n] = tmp_path / f"{name}{n}.log"
        procs[n] = subprocess.Popen(["bash", str(NETNS), "exec", str(n), *task], stdout=open(logs[n], "w"),
                                    stderr=subprocess.STDOUT, env=base_env() | env | {"SLURM_NODEID": str(n), "CBS_PYTHON": sys.executable})
    return procs, logs


def test_srun_tasks_stop_on_usr1_and_resume_exactly(two_hosts, one_node, stdlib_data, tmp_path):
    """srun passes SIGUSR1 to each node's task: sent while the ranks still start (it would kill them), each
    node's script holds it until its rank handles it; both stop at one step, save and exit 75. Started again,
    the run continues and logs exactly what the 1-node run logs."""
    cfg = config(stdlib_data, tmp_path / "run")
    procs, logs = srun_tasks(two_hosts, cfg, tmp_path, "stop")
    deadline = time.monotonic() + 60
    while not all("run_stage: pretrain" in log.read_text() for log in logs.values()):  # their traps are set
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values()), \
            "".join(log.read_text() for log in logs.values())
        time.sleep(0.05)
    for proc in procs.values():
        proc.send_signal(signal.SIGUSR1)
    assert wait_both(procs, logs, two_hosts) == {0: 75, 1: 75}
    # each node's script passes it on once its rank handles it, unless the stop all-reduced from the other node's
    # rank got there first
    assert "passed SIGUSR1 on as SIGUSR1 to 1 of 1 rank process(es)" in logs[0].read_text() + logs[1].read_text()
    stopped = json.loads((tmp_path / "run" / "result.json").read_text())
    assert stopped["status"] == "preempted" and 1 <= stopped["steps"] < STEPS, stopped

    procs, logs = srun_tasks(two_hosts, cfg, tmp_path, "again")
    assert wait_both(procs, logs, two_hosts) == {0: 0, 1: 0}
    assert "resumed from" in logs[0].read_text() + logs[1].read_text()
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "completed"
    assert_same_run(one_node, tmp_path / "run")
