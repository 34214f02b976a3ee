"""The local executor's device plan: which run gets which GPUs, with which command and environment.

A GPU host is not needed to check the plan: it is a pure function of the visible GPU ids. On a GPU host the
study used to force DS_ACCELERATOR=cpu on every run and let parallel runs share cuda:0.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from cbs.pipeline.executors import (RUN_STAGE, ExecutorError, LocalExecutor, Slot, device_slots, launch_command,
                                    slot_env, visible_gpus)

EIGHT = [str(i) for i in range(8)]


def test_gpus_are_partitioned_among_parallel_runs():
    assert [s.gpus for s in device_slots(None, 1, EIGHT)] == [(g,) for g in EIGHT]  # default: one run per GPU
    assert [s.gpus for s in device_slots(4, 2, EIGHT)] == [("0", "1"), ("2", "3"), ("4", "5"), ("6", "7")]
    assert [s.gpus for s in device_slots(None, 3, EIGHT)] == [("0", "1", "2"), ("3", "4", "5")]
    assert [s.gpus for s in device_slots(2, 1, ["4", "6", "7"])] == [("4",), ("6",)]  # ids as CUDA names them
    every = [g for s in device_slots(None, 2, EIGHT) for g in s.gpus]
    assert sorted(every) == EIGHT and len(set(every)) == 8  # no GPU shared, none idle


def test_more_one_gpu_runs_than_gpus_share_them_round_robin():
    assert [s.gpus for s in device_slots(4, 1, ["0"])] == [("0",)] * 4  # a small study on one GPU
    assert [s.gpus for s in device_slots(5, 1, ["2", "3"])] == [("2",), ("3",), ("2",), ("3",), ("2",)]
    assert len({s.index for s in device_slots(5, 1, ["2", "3"])}) == 5  # each run its own slot


def test_cpu_machines_get_cpu_slots():
    assert device_slots(None, 1, []) == [Slot(0)]
    assert device_slots(2, 1, []) == [Slot(0), Slot(1)]


@pytest.mark.parametrize("parallel, per_run, gpus, message", [
    (5, 2, EIGHT, r"--parallel 5 x --gpus-per-run 2 needs 10 GPUs, 8 are visible .*use --parallel 4"),
    (None, 16, EIGHT, r"--gpus-per-run 16 but only 8 GPU\(s\) are visible"),
    (None, 2, [], r"--gpus-per-run 2 but this machine has no GPU"),
    (0, 1, [], r"--parallel must be >= 1"),
    (None, 0, EIGHT, r"--gpus-per-run must be >= 1"),
])
def test_impossible_device_plans_are_refused(parallel, per_run, gpus, message):
    with pytest.raises(ExecutorError, match=message):
        device_slots(parallel, per_run, gpus)


def test_commands_and_environments():
    one, two, cpu = Slot(0, ("3",)), Slot(1, ("4", "5")), Slot(0)
    assert launch_command(one, ["pretrain", "r.yaml"], "py") == ["py", "-m", "cbs.pipeline.cli", "pretrain", "r.yaml"]
    # several GPUs: through run_stage.sh, which stops ranks without the 30 s SIGKILL torchrun would add
    assert launch_command(two, ["pretrain", "r.yaml"], "py") == ["bash", str(RUN_STAGE), "pretrain", "r.yaml"]
    host = {"DS_ACCELERATOR": "cpu", "RANK": "0", "MASTER_PORT": "1234", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5",
            "PATH": os.environ["PATH"]}
    env = slot_env(two, 4, host)
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5" and "DS_ACCELERATOR" not in env  # never the CPU on a GPU
    assert env["OMP_NUM_THREADS"] == "4" and "RANK" not in env and "MASTER_PORT" not in env
    assert (env["GPUS_PER_NODE"], env["LAUNCHER"], env["NNODES"]) == ("2", "torchrun", "1")
    dry = subprocess.run(launch_command(two, ["pretrain", "r.yaml"]), env={**env, "MASTER_PORT": "29611",
                                                                             "CBS_DRY_RUN": "1"},
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "torch.distributed.run --nnodes=1 --nproc_per_node=2" in dry.stdout and ":29611" in dry.stdout
    assert slot_env(cpu, 2, {})["DS_ACCELERATOR"] == "cpu"
    assert slot_env(cpu, 2, {"DS_ACCELERATOR": "xpu"})["DS_ACCELERATOR"] == "xpu"  # a user's choice stays


def test_visible_gpus_follow_cuda_visible_devices():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "4,5"}) == ["4", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    executor = LocalExecutor(parallel=None, gpus_per_run=1, gpus=["2", "3"])
    assert [s.gpus for s in executor.slots] == [("2",), ("3",)]
    assert "GPUs 2 | 3" in executor.describe()
