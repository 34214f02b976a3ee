"""The one place that initialises torch.distributed, megatron-core's parallel_state and DeepSpeed.

A run works the same three ways: as a plain process (one rank; the rendezvous variables are set here), under
`torchrun`, and under the `deepspeed` launcher (both set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*). The backend
is nccl with CUDA, gloo on CPU (with DS_ACCELERATOR=cpu). Tensor and pipeline parallel sizes are 1: every rank is a
data-parallel replica (ZeRO shards optimizer state, gradients or parameters across them).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from cbs.pipeline.config import ConfigError, Precision, PretrainConfig
from cbs.pipeline.utils import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def uses_cuda() -> bool:
    """Whether this process trains on a GPU: CUDA is there and DeepSpeed's CPU accelerator is not forced
    (DS_ACCELERATOR=cpu means the CPU on a GPU machine too: a CUDA device with the CPU accelerator would mix
    devices and fail at the first collective)."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"


def init_distributed(seed: int) -> Dist:
    """Initialise (once) the process group, megatron-core's model-parallel state (TP = PP = 1) and its RNG."""
    import deepspeed
    import torch.distributed as dist

    own_rendezvous = {}
    if "RANK" not in os.environ:  # a plain process: one rank, our own rendezvous
        own_rendezvous = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        os.environ.update(own_rendezvous)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if uses_cuda():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device = torch.device("cpu")
    if not dist.is_initialized():
        if device.type == "cpu":
            skip_shm_comm_build()
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   verbose=False)
    # only the process group needed them: children (sbatch jobs, study runs) must not inherit a rendezvous that
    # points at this process. LOCAL_RANK stays: deepspeed.initialize reads it (and a launcher sets its own).
    for key in own_rendezvous.keys() - {"LOCAL_RANK"}:
        os.environ.pop(key, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core import parallel_state
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    from cbs.pipeline.model import seed_model_parallel

    seed_model_parallel(seed)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its `deepspeed_shm_comm` op when the process group is created on the CPU.

    DeepSpeed's TorchBackend builds that op (~1 min of C++) under a file lock in the shared
    ~/.cache/torch_extensions whenever the op counts as compatible. A process killed during the build leaves the
    lock behind, and every later process on the host then waits on it forever with no output. Training never uses
    the op: only `inference_all_reduce` (DeepSpeed inference's tensor parallelism) does, and it falls back to the
    gloo all_reduce without it; our gradients go through torch.distributed (gloo) either way. Marking the op
    incompatible in DeepSpeed's own table (`deepspeed.ops.__compatible_ops__`, cached per process and read by
    `build_shm_op`) removes the build, its compiler requirement and its lock."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def shutdown_distributed() -> None:
    """Destroy every process group (and megatron-core's model-parallel state) before the interpreter exits.

    Left to the interpreter's teardown, gloo's worker threads can outlive it and a rank aborts at exit
    ("terminate called without an active exception", SIGABRT; seen once in CI on a 2-rank ZeRO-3 run that had
    trained and saved): the launcher then reports a finished run as failed. Call it after a stage succeeded
    only: after a failure another rank may still be inside a collective, and a teardown would hang on it."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core import parallel_state
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def resolve_ds_path(path: str) -> Path:
    """A ds_config given as a path, or a name in the project's ds_configs/ (`zero1.json` or `zero1`)."""
    p = Path(path)
    for candidate in (p, PROJECT_ROOT / "ds_configs" / p.name, PROJECT_ROOT / "ds_configs" / f"{p.name}.json"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"pretrain.deepspeed_config {path} not found (looked in the working directory and in "
                      f"{PROJECT_ROOT / 'ds_configs'})")


def uses_bf16(precision: Precision, cuda: bool) -> bool:
    """`auto` is bf16 on a GPU and fp32 on the CPU (where bf16 matmuls are emulated and slower)."""
    return precision is Precision.bf16 or (precision is Precision.auto and cuda)


def deepspeed_config(cfg: PretrainConfig, world_size: int, cuda: bool) -> dict:
    """The full DeepSpeed config: ZeRO from the file; batch, clipping and precision fields from the run config."""
    path = resolve_ds_path(cfg.deepspeed_config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"pretrain.deepspeed_config {path} is not valid JSON: {e}") from None
    owned = [k for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                         "gradient_clipping", "optimizer", "scheduler") if k in ds]
    if owned:
        raise ConfigError(f"{path} sets {', '.join(owned)}: batch size, clipping, optimizer and schedule come from "
                          f"the pretrain config (global_batch_seqs, micro_batch_seqs, optimizer.*, schedule.*); "
                          f"remove them from the file")
    schedule = cfg.batch_schedule
    if schedule is not None and schedule.adaptive and schedule.ladder[0] <= cfg.micro_batch:
        raise ConfigError(f"pretrain.batch_schedule.adaptive: noise_scale measures B_simple from >= 2 "
                          f"micro-batches per step: ladder[0] ({schedule.ladder[0]}) must be above micro_batch_seqs "
                          f"({cfg.micro_batch}); lower micro_batch_seqs or raise ladder[0]")
    layout = cfg.layout(world_size)  # every batch of the run checked: it splits on every rank
    ds["train_batch_size"] = layout.global_batch_seqs  # the first stage's; Trainer sets each later stage's
    ds["train_micro_batch_size_per_gpu"] = layout.micro_batch_seqs
    ds["gradient_accumulation_steps"] = layout.gradient_accumulation
    ds["gradient_clipping"] = cfg.optimizer.grad_clip
    for kind in ("bf16", "fp16"):
        if ds.get(kind, {}).get("enabled", "auto") not in ("auto", False):
            raise ConfigError(f"{path} sets {kind}.enabled: the precision comes from pretrain.precision (auto, bf16 "
                              f"or fp32; fp16 is not supported); set \"{kind}\": {{\"enabled\": \"auto\"}} or "
                              f"remove it from the file")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": uses_bf16(cfg.precision, cuda)}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": False}
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**12)  # we log ourselves
    ds.setdefault("wall_clock_breakdown", False)
    return ds
