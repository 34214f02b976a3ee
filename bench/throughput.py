"""Training throughput of our pretrain step against a plain-PyTorch GPT of the same shape, in one process run.

    .venv/bin/python bench/throughput.py                          # CPU: tiny and cpu-small
    .venv/bin/python bench/throughput.py --shapes host --accum 4  # CPU, one thread: per-step host overhead
    .venv/bin/python bench/throughput.py --shapes host --compile-ours  # ours as `pretrain.compile: true` runs it
    python bench/throughput.py --shapes gpt2-small 151M --compile # GPU: the GPT-2-small and 151M shapes (bf16)

"ours" is the step `cbs pretrain` runs: megatron-core GPTModel (SDPA core attention) inside a DeepSpeed engine
(ZeRO-1 from ds_configs/zero1.json, bf16 on GPU, fp32 on CPU), micro-batch x accumulation, forward_loss.
"plain" is a compact PyTorch GPT with the same layers, widths, RoPE/QK-norm/bias/tying and vocabulary:
SDPA attention, AdamW (fused on GPU, foreach on CPU), optional torch.compile (`--compile`; `--compile-ours`
compiles our model inside the engine, as `pretrain.compile: true` does). Both train on the same random tokens.
Prints tokens/s, wall and CPU ms per step, MFU (GPU; peak FLOP/s by device name), peak memory and ours/plain.
Asserts nothing.

The two steps are timed interleaved (ours, plain, ours, plain, ...; `--repeats` rounds of `--steps` steps each)
and the medians compared, so that load from other processes on a shared machine falls on both alike.

`host` is a shape with almost no arithmetic (12 layers, d 64, seq 32, micro-batch 1, vocab 512) run on one CPU
thread: its step time is what the framework costs per step on the host (Python, dispatch, DeepSpeed's per-step
work), the cost that makes a GPU step host-bound when the GPU work is short. `--layers` overrides the depth.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

from pipeline.config import ModelConfig, PretrainConfig, from_dict  # noqa: E402
from pipeline.model import flops_per_token, padded_vocab  # noqa: E402

SHAPES = {  # name: (model preset or fields, micro-batch, vocab, CPU threads: None = torch's default)
    "tiny": ("tiny", 16, 4096, None), "cpu-small": ("cpu-small", 8, 4096, None),
    "gpt2-small": ("gpt2-small", 16, 50304, None), "151M": ("151M", 32, 50304, None),
    "host": ({"preset": "tiny", "layers": 12, "hidden": 64, "heads": 4, "seq_len": 32}, 1, 512, 1),
}


# ---------------------------------------------------------------------------------------------------- plain GPT


def rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding on [b, h, t, d] (rotate-half form, as megatron-core's non-interleaved RoPE)."""
    t, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = torch.outer(torch.arange(t, device=x.device, dtype=torch.float32), inv)
    cos, sin = torch.cat([ang, ang], -1).cos().to(x.dtype), torch.cat([ang, ang], -1).sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Block(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        d, self.h, self.m = m.hidden, m.heads, m
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=m.bias), nn.LayerNorm(d, bias=m.bias)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=m.bias), nn.Linear(d, d, bias=m.bias)
        self.fc1, self.fc2 = nn.Linear(d, m.ffn, bias=m.bias), nn.Linear(m.ffn, d, bias=m.bias)
        hd = d // m.heads
        self.qn = nn.LayerNorm(hd) if m.qk_layernorm else nn.Identity()
        self.kn = nn.LayerNorm(hd) if m.qk_layernorm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        q, k = self.qn(q), self.kn(k)
        if self.m.position_embedding.value == "rope":
            q, k = rope(q, self.m.rope_base), rope(k, self.m.rope_base)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    def __init__(self, m: ModelConfig, vocab: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, m.hidden)
        self.wpe = nn.Embedding(m.seq_len, m.hidden) if m.position_embedding.value == "learned" else None
        self.blocks = nn.ModuleList(Block(m) for _ in range(m.layers))
        self.ln = nn.LayerNorm(m.hidden, bias=m.bias)
        self.head = nn.Linear(m.hidden, vocab, bias=False)
        if m.tied_embeddings:
            self.head.weight = self.wte.weight
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=m.init_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        inp, labels = tokens[:, :-1], tokens[:, 1:]
        x = self.wte(inp)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(inp.shape[1], device=inp.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))


# ---------------------------------------------------------------------------------------------------- timing


def timed(step, steps: int, device: torch.device) -> tuple[float, float]:
    """Wall and process CPU seconds per step over `steps` steps (warm-up is the caller's). CPU time is the host's
    work: on a shared machine it is less disturbed by other processes than wall time; on a GPU, CPU time close to
    wall time means a host-bound step."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()  # note: the only sync point; the steps themselves run asynchronously
    return (time.perf_counter() - t) / steps, (time.process_time() - c) / steps


def ours(m: ModelConfig, vocab: int, micro: int, accum: int, batch: torch.Tensor, dist, args):
    import deepspeed

    from pipeline.distributed import deepspeed_config
    from pipeline.model import build_model, forward_loss
    from pipeline.optim import make_optimizer

    cfg = from_dict(PretrainConfig, {"data_dir": "-", "run_dir": "-", "model": {k: v for k, v in vars(m).items()},
                                     "global_batch_seqs": micro * accum, "micro_batch_seqs": micro,
                                     "train_tokens": 1, "deepspeed_config": args.deepspeed_config},
                    "pretrain")
    model = build_model(cfg.model, vocab, device=dist.device)
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, cfg.optimizer),
                                      config=deepspeed_config(cfg, 1, dist.cuda))
    if args.compile_ours:
        engine.compile()  # what Trainer does with pretrain.compile: true

    def step():
        for chunk in batch.split(micro):
            loss, _ = forward_loss(engine, chunk)
            engine.backward(loss)
            engine.step()

    return step


def plain(m: ModelConfig, vocab: int, micro: int, batch: torch.Tensor, dist, args):
    model = PlainGPT(m, padded_vocab(vocab)).to(dist.device)
    if dist.cuda:
        model = model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dist.cuda, foreach=not dist.cuda)
    fwd = torch.compile(model) if args.compile else model

    def step():
        for chunk in batch.split(micro):
            (fwd(chunk) / (len(batch) // micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        gib = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return f"{gib:.1f} GiB"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB rss"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 20 on CPU, 30 on GPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds of timed steps (medians reported)")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's number of layers")
    ap.add_argument("--accum", type=int, default=1, help="gradient accumulation steps (global = micro x accum)")
    ap.add_argument("--micro", type=int, default=None, help="override the shape's micro-batch")
    ap.add_argument("--compile", action="store_true", help="torch.compile the plain model (GPU anchor row)")
    ap.add_argument("--compile-ours", action="store_true",
                    help="torch.compile our model inside the engine (pretrain.compile: true)")
    ap.add_argument("--deepspeed-config", default="zero1.json")
    args = ap.parse_args()
    from pipeline.distributed import init_distributed
    from pipeline.pretrain import peak_flops

    dist = init_distributed(1234)
    shapes = args.shapes or (["gpt2-small", "151M"] if dist.cuda else ["tiny", "cpu-small"])
    steps = args.steps or (30 if dist.cuda else 20)
    peak = peak_flops(dist)
    device_name = torch.cuda.get_device_name(dist.device) if dist.cuda else "CPU"
    print(f"device: {device_name}; torch {torch.__version__}; {'bf16' if dist.cuda else 'fp32'}; "
          f"{args.repeats} x {steps} timed steps after {args.warmup} warm-up")
    default_threads = torch.get_num_threads()
    for name in shapes:
        model_fields, micro, vocab, threads = SHAPES[name]
        torch.set_num_threads(threads if threads and not dist.cuda else default_threads)
        micro = args.micro or micro
        fields = ModelConfig.expand(model_fields, "model")
        if args.layers:
            fields = {**fields, "layers": args.layers}
        m = from_dict(ModelConfig, fields, "model")
        batch = torch.randint(0, vocab, (micro * args.accum, m.seq_len + 1), device=dist.device)
        tokens = micro * args.accum * m.seq_len
        fpt = flops_per_token(m, vocab)
        labels = (f"ours (megatron-core + DeepSpeed){' + compile' if args.compile_ours else ''}",
                  f"plain PyTorch{' + compile' if args.compile else ''}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            steps_by_label = {labels[0]: ours(m, vocab, micro, args.accum, batch, dist, args),
                              labels[1]: plain(m, vocab, micro, batch, dist, args)}
            for step in steps_by_label.values():  # warm-up: compile, allocator, DeepSpeed buckets
                for _ in range(args.warmup):
                    step()
            wall, cpu = {label: [] for label in labels}, {label: [] for label in labels}
            for _ in range(args.repeats):
                for label, step in steps_by_label.items():
                    w, c = timed(step, steps, dist.device)
                    wall[label].append(w)
                    cpu[label].append(c)
        wall_s = {label: statistics.median(v) for label, v in wall.items()}
        cpu_s = {label: statistics.median(v) for label, v in cpu.items()}
        for label in labels:
            tps = tokens / wall_s[label]
            mfu = f"{tps * fpt / peak:6.1%}" if peak else "   n/a"
            print(f"  {name:10s} {label:44s} {tps:12,.0f} tok/s  {wall_s[label] * 1e3:8.2f} ms/step  "
                  f"(CPU {cpu_s[label] * 1e3:8.2f} ms)  MFU {mfu}")
        print(f"  {name:10s} peak memory {peak_memory(dist.device)} (both)")
        (ours_w, plain_w), (ours_c, plain_c) = wall_s.values(), cpu_s.values()
        # tokens/s ratio (> 1: ours faster), then step-time ratios (> 1: ours slower; the host target is stated in
        # the step time), wall and CPU
        print(f"  {name:10s} ours / plain = {plain_w / ours_w:.2f}x tok/s, step time ours / plain = "
              f"{ours_w / plain_w:.2f}x (CPU time {ours_c / plain_c:.2f}x)   (L{m.layers} d{m.hidden} seq {m.seq_len}, "
              f"micro {micro} x accum {args.accum}, vocab {vocab}, {torch.get_num_threads()} threads, median of "
              f"{args.repeats} x {steps} steps)")
        del steps_by_label


if __name__ == "__main__":
    main()
