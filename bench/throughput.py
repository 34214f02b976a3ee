"""Training throughput of our pretrain step against a plain-PyTorch GPT of the same shape, in one process run.

    .venv/bin/python bench/throughput.py                          # CPU: tiny and cpu-small, ours vs plain
    .venv/bin/python bench/throughput.py --shapes host --accum 4  # CPU, one thread: per-step host overhead
    .venv/bin/python bench/throughput.py --shapes host --contenders ours-compile plain   # `compile: true` on CPU
    python bench/throughput.py --shapes gpt2-small 151M           # GPU: ours eager and compiled beside compiled
                                                                  # plain PyTorch (the default contenders there)

"ours" is the step `cbs pretrain` runs, timed as it runs there: a real `cbs.pipeline.pretrain.Trainer` (megatron-core
GPTModel with SDPA core attention inside a DeepSpeed engine, ZeRO-1 from ds_configs/zero1.json, bf16 on GPU,
fp32 on CPU, EWA) built for a bench (`Trainer.for_bench`: no run directory), and its own `train_step()`: the
batch read from the data directory's shards, micro-batch x accumulation, the EWA update. The shards hold random token ids (bench_data.py:
a real data directory, without a tokenizer to train), so the vocabulary can be the GPT-2-sized one of the shape.
`ours-compile` is the same with `pretrain.compile: true`. Not timed: the hooks of the loop (log, eval,
checkpoint, and the noise-scale's gradient hooks on logged steps), which run every `log.every_steps` steps.
"plain" is a compact PyTorch GPT with the same layers, widths, RoPE/QK-norm/bias/tying and vocabulary: SDPA
attention, AdamW (fused on GPU, foreach on CPU), on random tokens already on the device; `plain-compile` is it
under torch.compile. Prints tokens/s, wall and host CPU ms per step, on a GPU the device's busy ms per step
(kernel time from the profiler: busy / wall near 1 means the GPU never waits for the host), MFU (peak FLOP/s by
device name), peak memory, and each contender against the last one given (on GPU: compiled plain PyTorch).
Asserts nothing.

The steps are timed interleaved (ours, plain, ours, plain, ...; `--repeats` rounds of `--steps` steps each) and
the medians compared, so that load from other processes on a shared machine falls on all alike.

`host` is a shape with almost no arithmetic (12 layers, d 64, seq 32, micro-batch 1, vocab 512) run on one CPU
thread: its step time is what the framework costs per step on the host (Python, dispatch, DeepSpeed's per-step
work), the cost that makes a GPU step host-bound when the GPU work is short. `--layers` overrides the depth.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_data beside this file
from bench_data import random_token_data  # noqa: E402
from cbs.pipeline.config import ModelConfig, PretrainConfig, from_dict  # noqa: E402
from cbs.pipeline.model import flops_per_token, padded_vocab  # noqa: E402

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


def device_busy_s(step, steps: int = 3) -> float | None:
    """GPU kernel time per step (s): the sum of the kernels' own device times over `steps` profiled steps. Against
    the wall time per step it says how host-bound a step is (busy / wall near 1: the GPU never waits for the
    host). None where the profiler cannot read the device (no CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        total_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)
    except Exception as e:  # a bench that measured the rest should still print it
        print(f"  (device time not measured: {type(e).__name__}: {e})")
        return None
    return total_us / 1e6 / steps if total_us else None


def ours(m: ModelConfig, vocab: int, micro: int, accum: int, data_dir: Path, dist, args, compile_: bool):
    """The Trainer's own train_step, built for a bench (Trainer.for_bench: no run directory, hooks or checkpoints)
    on the shards of `data_dir`."""
    from cbs.pipeline.pretrain import Trainer

    steps_needed = (args.warmup + args.repeats * args.steps + 1) * 2
    trainer = Trainer.for_bench({
        "data_dir": str(data_dir), "model": dict(vars(m)), "global_batch_seqs": micro * accum,
        "micro_batch_seqs": micro, "train_tokens": steps_needed * micro * accum * m.seq_len,
        "deepspeed_config": args.deepspeed_config, "compile": compile_}, dist)
    return trainer.train_step


def plain(m: ModelConfig, vocab: int, micro: int, batch: torch.Tensor, dist, compile_: bool):
    model = PlainGPT(m, padded_vocab(vocab)).to(dist.device)
    if dist.cuda:
        model = model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dist.cuda, foreach=not dist.cuda)
    fwd = torch.compile(model) if compile_ else model

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


CONTENDERS = {"ours": "ours (Trainer.train_step)", "ours-compile": "ours + compile (Trainer, compile: true)",
              "plain": "plain PyTorch", "plain-compile": "plain PyTorch + torch.compile"}


def contender_steps(names: list[str], m: ModelConfig, vocab: int, micro: int, data_dir: Path, dist, args) -> dict:
    batch = torch.randint(0, vocab, (micro * args.accum, m.seq_len + 1), device=dist.device)
    steps = {}
    for name in names:
        if name.startswith("ours"):
            steps[name] = ours(m, vocab, micro, args.accum, data_dir, dist, args, name == "ours-compile")
        else:
            steps[name] = plain(m, vocab, micro, batch, dist, name == "plain-compile")
    return steps


def time_interleaved(steps_by_name: dict, args, device: torch.device) -> tuple[dict, dict, dict]:
    """Median wall and host CPU seconds per step of each contender over `repeats` interleaved rounds, and (GPU)
    the device's busy seconds per step."""
    for step in steps_by_name.values():  # warm-up: compile, allocator, DeepSpeed buckets
        for _ in range(args.warmup):
            step()
    wall, cpu = {n: [] for n in steps_by_name}, {n: [] for n in steps_by_name}
    for _ in range(args.repeats):
        for name, step in steps_by_name.items():
            w, c = timed(step, args.steps, device)
            wall[name].append(w)
            cpu[name].append(c)
    busy = {n: device_busy_s(step) for n, step in steps_by_name.items()} if device.type == "cuda" else {}
    return ({n: statistics.median(v) for n, v in wall.items()}, {n: statistics.median(v) for n, v in cpu.items()},
            busy)


def report_shape(shape: str, m: ModelConfig, micro: int, vocab: int, wall_s: dict, cpu_s: dict, busy_s: dict,
                 peak, dist, args) -> None:
    tokens = micro * args.accum * m.seq_len
    fpt = flops_per_token(m, vocab)
    for name in wall_s:
        tps = tokens / wall_s[name]
        mfu = f"{tps * fpt / peak:6.1%}" if peak else "   n/a"
        busy = f"  device busy {busy_s[name] * 1e3:8.2f} ms" if busy_s.get(name) else ""
        print(f"  {shape:10s} {CONTENDERS[name]:40s} {tps:12,.0f} tok/s  {wall_s[name] * 1e3:8.2f} ms/step  "
              f"(host CPU {cpu_s[name] * 1e3:8.2f} ms{busy})  MFU {mfu}", flush=True)
    print(f"  {shape:10s} peak memory {peak_memory(dist.device)} (all contenders)")
    anchor = list(wall_s)[-1]
    for name in list(wall_s)[:-1]:
        # tokens/s ratio (> 1: this one faster), then step-time ratios (> 1: slower), wall and host CPU
        print(f"  {shape:10s} {name} / {anchor} = {wall_s[anchor] / wall_s[name]:.2f}x tok/s, step time "
              f"{wall_s[name] / wall_s[anchor]:.2f}x (host CPU time {cpu_s[name] / cpu_s[anchor]:.2f}x)")
    print(f"  {shape:10s} (L{m.layers} d{m.hidden} seq {m.seq_len}, micro {micro} x accum {args.accum}, vocab "
          f"{vocab}, {torch.get_num_threads()} threads, median of {args.repeats} x {args.steps} steps)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES))
    ap.add_argument("--contenders", nargs="+", default=None, choices=list(CONTENDERS),
                    help="steps to time, the last one the anchor of the ratios (default: ours plain on CPU; "
                         "ours ours-compile plain-compile on GPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 20 on CPU, 30 on GPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds of timed steps (medians reported)")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's number of layers")
    ap.add_argument("--accum", type=int, default=1, help="gradient accumulation steps (global = micro x accum)")
    ap.add_argument("--micro", type=int, default=None, help="override the shape's micro-batch")
    ap.add_argument("--deepspeed-config", default="zero1.json")
    args = ap.parse_args()
    from cbs.pipeline.distributed import init_distributed
    from cbs.pipeline.pretrain import peak_flops

    dist = init_distributed(1234)
    shapes = args.shapes or (["gpt2-small", "151M"] if dist.cuda else ["tiny", "cpu-small"])
    names = args.contenders or (["ours", "ours-compile", "plain-compile"] if dist.cuda else ["ours", "plain"])
    args.steps = args.steps or (30 if dist.cuda else 20)
    peak = peak_flops(dist)
    device_name = torch.cuda.get_device_name(dist.device) if dist.cuda else "CPU"
    print(f"device: {device_name}; torch {torch.__version__}; {'bf16' if dist.cuda else 'fp32'}; "
          f"{args.repeats} x {args.steps} timed steps after {args.warmup} warm-up", flush=True)
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="cbs-bench-") as tmp:
        for shape in shapes:
            model_fields, micro, vocab, threads = SHAPES[shape]
            torch.set_num_threads(threads if threads and not dist.cuda else default_threads)
            micro = args.micro or micro
            fields = ModelConfig.expand(model_fields, "model")
            if args.layers:
                fields = {**fields, "layers": args.layers}
            m = from_dict(ModelConfig, fields, "model")
            data_dir = random_token_data(Path(tmp) / shape / "data", vocab, m.seq_len, micro * args.accum)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                steps_by_name = contender_steps(names, m, vocab, micro, data_dir, dist, args)
                wall_s, cpu_s, busy_s = time_interleaved(steps_by_name, args, dist.device)
            report_shape(shape, m, micro, vocab, wall_s, cpu_s, busy_s, peak, dist, args)
            del steps_by_name
            if dist.cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
