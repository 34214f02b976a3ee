"""Does the learning-rate optimum transfer across widths? An LR sweep at two widths under SP and under muP.

    PYTHONPATH=. DS_ACCELERATOR=cpu python bench/mup_transfer.py [--data DIR] [--steps 60] [--widths 64 256]

Trains the 2-layer GPT of `model.preset: tiny` (seq 64) at each width and LR for a short budget on the stdlib
corpus (preprocessed into a temporary directory unless --data gives one) with AdamW (the pipeline's parameter
groups, muP's LR multipliers, gradient clipping at 1, a linear warmup over the first 10% of steps), then evaluates
the validation loss. Prints the loss table and the argmin LR per width and parametrisation. muP's base width is
the smallest width, where muP is SP itself (one set of runs serves both). Under muP the argmin should stay put;
under SP it moves to smaller LRs as the width grows (docs/method.md, "muP").
"""

from __future__ import annotations

import argparse
import math
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbs.pipeline import model as M  # noqa: E402
from cbs.pipeline.config import ModelConfig, MupConfig, OptimizerConfig  # noqa: E402
from cbs.pipeline.data import TrainSamples, eval_sequences, read_manifest  # noqa: E402
from cbs.pipeline.optim import make_optimizer  # noqa: E402

SEQ = 64


def setup() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1)


def stdlib_data(out: Path) -> Path:
    from cbs.pipeline import preprocess
    from cbs.pipeline.config import PreprocessConfig, TokenizerConfig

    preprocess.main(PreprocessConfig(inputs=["stdlib"], output_dir=str(out), tokenizer=TokenizerConfig(vocab_size=512)))
    return out


def run(data: Path, width: int, base: int | None, lr: float, steps: int, batch: int, seed: int) -> float:
    """Validation loss after `steps` steps at this width and peak LR (NaN if training diverged)."""
    cfg = ModelConfig(layers=2, hidden=width, heads=4, seq_len=SEQ, mup=MupConfig(base) if base else None)
    M.seed_model_parallel(seed)
    model = M.build_model(cfg, read_manifest(data, SEQ)["vocab_size"])
    opt = make_optimizer(model, OptimizerConfig(lr=lr))
    samples, warmup = TrainSamples(data, SEQ, seed), max(1, steps // 10)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * g.get("lr_mult", 1.0)
        loss, _ = M.forward_loss(model, samples.batch(step * batch, batch))
        if not math.isfinite(loss.item()):
            return math.nan
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    with torch.no_grad():
        val = eval_sequences(data, SEQ, 64 * SEQ)
        return float(torch.cat([M.forward_loss(model, v)[1].flatten() for v in val.split(16)]).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, help="a `cbs preprocess` directory (default: stdlib, preprocessed now)")
    p.add_argument("--widths", type=int, nargs=2, default=[64, 256])
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3, 4e-3, 8e-3])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    setup()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or stdlib_data(Path(tmp) / "data")
        small, large = args.widths
        started = time.perf_counter()
        rows = {}
        for lr in args.lrs:
            base = run(data, small, None, lr, args.steps, args.batch, args.seed)  # muP at its base width = SP
            rows[lr] = (base, run(data, large, None, lr, args.steps, args.batch, args.seed),
                        run(data, large, small, lr, args.steps, args.batch, args.seed))
            print(f"lr {lr:g}: {' '.join(f'{v:.4f}' for v in rows[lr])}", file=sys.stderr, flush=True)
    cols = [f"d={small} (SP = muP)", f"d={large} SP", f"d={large} muP (base {small})"]
    print(f"{args.steps} steps x {args.batch} x {SEQ} tokens, seed {args.seed}; validation loss "
          f"({time.perf_counter() - started:.0f} s)\n")
    print("| LR | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for lr, vals in rows.items():
        print(f"| {lr:g} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    best = [min(rows, key=lambda lr: (math.isnan(rows[lr][i]), rows[lr][i])) for i in range(len(cols))]
    print("| argmin | " + " | ".join(f"{b:g}" for b in best) + " |")


if __name__ == "__main__":
    main()
