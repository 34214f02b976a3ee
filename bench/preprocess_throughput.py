"""Benchmark the preprocess stage's tokenize throughput against SentencePiece's single-process ceiling.

    .venv/bin/python bench/preprocess_throughput.py [--inputs stdlib] [--vocab-size 4096] [--repeat 1]

In one run, on the same text:
  ceiling   one process, `sp.encode(texts, num_threads=1)` over documents already in memory (no I/O, no
            writes): the best of list or numpy output, all documents in one call or in batches of 64
  stage/1   the stage's tokenize pass (read files, split, encode, write .bin/.idx) with 1 worker process
  stage/N   the same with N = all cores
Target (issue #2): stage/N >= 85% of N x ceiling. Prints the figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm

from cbs.pipeline import preprocess
from cbs.pipeline.config import PreprocessConfig, TokenizerConfig
from cbs.pipeline.corpus import Reader, resolve


def ceiling(model: str, texts: list[str], repeat: int) -> float:
    """SentencePiece's best single-process rate: the fastest of list/numpy output, one call or batches of 64."""
    sp = spm.SentencePieceProcessor(model_file=model)
    best = 0.0
    for _ in range(repeat):
        for return_type in (int, "numpy"):
            for batch in (len(texts), 64):
                t = time.perf_counter()
                tokens = sum(len(ids) for i in range(0, len(texts), batch)
                             for ids in sp.encode(texts[i:i + batch], num_threads=1, return_type=return_type))
                best = max(best, tokens / (time.perf_counter() - t))
    return best


def stage(inputs: list[str], model: str, workers: int, repeat: int) -> tuple[float, int]:
    best, tokens = 0.0, 0
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as out:
            cfg = PreprocessConfig(inputs=inputs, output_dir=str(Path(out) / "data"),
                                   tokenizer=TokenizerConfig(model=model), workers=workers)
            manifest = preprocess.main(cfg)
            best = max(best, manifest["tokens_per_second"])
            tokens = sum(manifest["tokens"].values())
    return best, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", nargs="+", default=["stdlib"])
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=1, help="best of N timings")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PreprocessConfig(inputs=args.inputs, output_dir=str(Path(tmp) / "tok"),
                               tokenizer=TokenizerConfig(vocab_size=args.vocab_size))
        t = time.perf_counter()
        preprocess.main(cfg)
        train_s = time.perf_counter() - t
        model = str(Path(tmp) / "tok" / preprocess.TOKENIZER)
        texts = [d.text for d in Reader([resolve(s) for s in args.inputs])]
        mb = sum(len(x.encode()) for x in texts) / 1e6
        ceil = ceiling(model, texts, args.repeat)
        one, tokens = stage(args.inputs, model, 1, args.repeat)
        many, _ = stage(args.inputs, model, cores, args.repeat)
    print(f"corpus: {', '.join(args.inputs)}: {len(texts)} documents, {mb:.1f} MB, {tokens:,} tokens "
          f"(vocab {args.vocab_size}); full stage incl. tokenizer training: {train_s:.1f} s")
    print(f"{'ceiling (1 process, encode only)':38s} {ceil:12,.0f} tok/s")
    print(f"{'stage, 1 worker':38s} {one:12,.0f} tok/s  {one / ceil:6.1%} of ceiling")
    print(f"{f'stage, {cores} workers':38s} {many:12,.0f} tok/s  {many / (cores * ceil):6.1%} of {cores} x ceiling"
          f"  (target >= 85%)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
