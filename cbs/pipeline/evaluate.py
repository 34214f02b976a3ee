"""evaluate: a pretrain checkpoint -> held-out loss and perplexity of the raw and every EWA weight set.

`cbs evaluate RUN_DIR [--checkpoint latest|STEP] [--eval-tokens N] [--data-dir D] [--out FILE]` reads any
checkpoint pretrain wrote: any ZeRO stage, any world size, with or without the DeepSpeed launcher. Weights come
from DeepSpeed's own consolidation (`get_fp32_state_dict_from_zero_checkpoint`: the fp32 master weights); EWA
averages from our per-checkpoint files (rank 0's under ZeRO 1/2; under ZeRO-3 every rank's shard, put back
together with DeepSpeed's partition layout). The eval set and the loss are those of pretrain's periodic eval,
through the same function, so eval.json equals what pretrain logged at that step.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import yaml

from cbs.pipeline import rundir
from cbs.pipeline.config import ConfigError, PretrainConfig, from_dict
from cbs.pipeline.data import DataError, eval_sequences, read_manifest
from cbs.pipeline.utils import atomic_write_json, log

class EvaluateError(ValueError):
    """The run directory or checkpoint cannot be evaluated; the message says why."""


@torch.no_grad()
def sharded_eval_loss(model, sequences: torch.Tensor, micro: int, rank: int, world: int,
                      device: torch.device) -> float:
    """Mean token loss of `sequences` [n, T+1], split across ranks: rank r takes sequences r, r + world, ...,
    padded so every rank makes the same forward calls (ZeRO-3's gathers line up) with weight 0 on the padding;
    sums in float64, all-reduced. The value does not depend on the world size (up to float rounding)."""
    import torch.distributed as dist

    from cbs.pipeline.model import forward_loss

    n = len(sequences)
    per_rank = -(-n // world)
    idx = torch.arange(per_rank) * world + rank
    valid = idx < n
    idx[~valid] = 0
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for chunk, ok in zip(idx.split(micro), valid.split(micro)):
        _, per_token = forward_loss(model, sequences[chunk].to(device))
        weight = ok.to(device, torch.float64)[:, None]
        sums[0] += (per_token.double() * weight).sum()
        sums[1] += weight.sum() * per_token.shape[1]
    if world > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return (sums[0] / sums[1]).item()


def _run_config(run_dir: Path) -> tuple[PretrainConfig, dict]:
    path = run_dir / rundir.CONFIG
    if not path.is_file():
        raise EvaluateError(f"{run_dir} is not a pretrain run directory: no {rundir.CONFIG}")
    data = yaml.safe_load(path.read_text()) or {}
    resolved = data.pop("resolved", {})
    try:
        return from_dict(PretrainConfig, data, "pretrain"), resolved
    except ConfigError as e:
        raise EvaluateError(f"{path}: {e}") from None


def _run_tokenizer(cfg: PretrainConfig, resolved: dict) -> Optional[str]:
    """The sha256 of the tokenizer the run trained with: recorded in config.yaml, else its data dir's manifest."""
    if resolved.get("tokenizer_sha256"):
        return resolved["tokenizer_sha256"]
    try:
        return read_manifest(cfg.data_dir)["tokenizer"].get("sha256")
    except DataError:
        return None  # the training data is gone: nothing to compare with


def _checkpoint_tag(run_dir: Path, checkpoint: str) -> str:
    """`latest` (the newest complete checkpoint) or a step's; an incomplete or damaged one is refused."""
    good, bad = rundir.usable_tags(run_dir)
    saved = ", ".join(str(rundir.tag_step(t)) for t in sorted(good)) or "none"
    if checkpoint == "latest":
        if not good:
            why = f" ({rundir.describe_bad(bad)})" if bad else ""
            raise EvaluateError(f"{run_dir} has no complete checkpoint yet{why}")
        return good[0]
    try:
        name = rundir.tag(int(checkpoint))
    except ValueError:
        raise EvaluateError(f"--checkpoint must be latest or a step number: got {checkpoint!r}") from None
    if name in bad:
        raise EvaluateError(f"{run_dir}: the checkpoint at step {int(checkpoint)} is unusable: {bad[name]} "
                            f"(complete checkpoints: {saved})")
    if name not in good:
        raise EvaluateError(f"{run_dir} has no checkpoint at step {int(checkpoint)} (steps saved: {saved})")
    return name


def _consolidated_weights(ckpt_dir: Path, tag: str) -> dict:
    """fp32 weights of any ZeRO stage and world size, via DeepSpeed's zero_to_fp32 (quietly: it prints)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def _ewa_state(tag_dir: Path, params: list[torch.nn.Parameter], zero_stage: int, world_size: int) -> dict:
    """The EWA state with full-shape averages. Under ZeRO-3 rank r saved elements [r p, (r + 1) p) of each
    flattened parameter, p = ceil(numel / world) (DeepSpeed pads the last shard): concatenate, trim, reshape."""
    if zero_stage != 3:
        return torch.load(rundir.ewa_file(tag_dir, 0), map_location="cpu", weights_only=True)
    shards = [torch.load(rundir.ewa_file(tag_dir, r), map_location="cpu", weights_only=True)
              for r in range(world_size)]
    state = {"taus": shards[0]["taus"], "steps": shards[0]["steps"], "averages": {}}
    for tau, first in shards[0]["averages"].items():
        if len(first) != len(params):
            raise EvaluateError(f"{tag_dir}: EWA holds {len(first)} tensors, the model has {len(params)} parameters")
        state["averages"][tau] = [
            torch.cat([s["averages"][tau][i].reshape(-1) for s in shards])[:p.numel()].view(p.shape)
            for i, p in enumerate(params)]
    return state


def main(run_dir: str | Path, checkpoint: str = "latest", eval_tokens: Optional[int] = None,
         data_dir: Optional[str] = None, out: Optional[str | Path] = None) -> dict:
    """Evaluate one checkpoint of a run; writes and returns eval.json's content."""
    from cbs.pipeline.distributed import init_distributed
    from cbs.pipeline.model import build_model
    from cbs.pipeline.optim import EWA

    run_dir = Path(run_dir)
    cfg, resolved = _run_config(run_dir)
    tag = _checkpoint_tag(run_dir, checkpoint)
    tag_dir = rundir.checkpoint_dir(run_dir) / tag
    zero_stage = resolved.get("deepspeed", {}).get("zero_optimization", {}).get("stage", 0)
    world_size = resolved.get("world_size", 1)
    if eval_tokens is not None and eval_tokens < 1:
        raise EvaluateError(f"--eval-tokens must be >= 1: got {eval_tokens}")
    started = time.perf_counter()
    data_dir = data_dir or cfg.data_dir
    # the eval data must be whole and tokenized as the run's training data was (ids mean the same pieces)
    read_manifest(data_dir, cfg.model.seq_len, tokenizer_sha256=_run_tokenizer(cfg, resolved))
    dist = init_distributed(cfg.seed)
    vocab = resolved.get("vocab_size")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_model(cfg.model, vocab, device=dist.device)
    try:
        weights = _consolidated_weights(rundir.checkpoint_dir(run_dir), tag)
    except Exception as e:  # a file damaged without changing its size: torch's zip reader, pickle
        raise EvaluateError(f"{tag_dir} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}); evaluate "
                            f"an earlier checkpoint with --checkpoint STEP") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise EvaluateError(f"{tag_dir} does not match the run's model: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    if resolved.get("deepspeed", {}).get("bf16", {}).get("enabled"):
        # evaluate as trained: the bf16 rounding of the fp32 master weights is what the training model held
        model = model.to(torch.bfloat16)
    params = list(model.parameters())
    ewa = EWA(params, cfg.ewa.taus)
    if cfg.ewa.taus:
        try:
            ewa.load_state_dict(_ewa_state(tag_dir, params, zero_stage, world_size))
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise EvaluateError(f"{tag_dir}: its EWA state cannot be read ({type(e).__name__}: "
                                f"{str(e).splitlines()[0]}); evaluate an earlier checkpoint with --checkpoint STEP") \
                from None
    sequences = eval_sequences(data_dir, cfg.model.seq_len, eval_tokens or cfg.eval.eval_tokens)
    micro = cfg.eval.micro_batch_seqs or cfg.micro_batch
    model.eval()

    def loss() -> float:
        return sharded_eval_loss(model, sequences, micro, dist.rank, dist.world_size, dist.device)

    losses = {"raw": loss()}
    for tau in cfg.ewa.taus:
        with ewa.swapped_in(tau):
            losses[f"ewa/{tau}"] = loss()
    step = rundir.tag_step(tag)
    result = {
        "run_dir": str(run_dir), "checkpoint": tag, "step": step, "tokens": cfg.batches.tokens_before(step),
        "data_dir": str(data_dir), "eval_sequences": len(sequences), "eval_tokens": len(sequences) * cfg.model.seq_len,
        "weights": {k: {"loss": v, "perplexity": math.exp(v) if v < 700 else float("inf")} for k, v in losses.items()},
        "seconds": round(time.perf_counter() - started, 3),
    }
    if dist.is_main:
        target = Path(out) if out else run_dir / rundir.EVAL
        atomic_write_json(target, result)
        log.info("%s %s: %s -> %s", run_dir, tag,
                 "  ".join(f"{k} {v:.4f}" for k, v in losses.items()), target)
    return result
