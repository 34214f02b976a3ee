"""A real data directory of random token ids, for benchmarks: the shards, index and manifest.json that
`cbs preprocess` writes, without training a tokenizer (which a GPT-2-sized vocabulary of 50k pieces would need a
large corpus and minutes for). Throughput does not depend on which ids the tokens are; the data loader's work
(index, memory map, gather, copy) is the same as on real text."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from cbs.pipeline.preprocess import token_dtype
from cbs.pipeline.utils import sha256_file

DOC_TOKENS = 4096  # tokens per document: documents only matter to the index, not to training samples


def random_token_data(out: Path, vocab: int, seq_len: int, batch_seqs: int, steps: int = 64, seed: int = 0) -> Path:
    """Write `out` with a train split of at least `steps` batches of `batch_seqs` sequences (the sampler wraps
    around epochs beyond that) and a val split of a few sequences; returns `out`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = token_dtype(vocab)
    want = {"train": steps * batch_seqs * seq_len + 1, "val": 4 * (seq_len + 1)}
    documents, tokens = {}, {}
    for split, n in want.items():
        builder = IndexedDatasetBuilder(str(out / f"{split}.bin"), dtype=dtype)
        docs = -(-n // DOC_TOKENS)
        for _ in range(docs):
            builder.add_document(rng.integers(0, vocab, DOC_TOKENS, dtype=np.int64).astype(dtype), [DOC_TOKENS])
        builder.finalize(str(out / f"{split}.idx"))
        documents[split], tokens[split] = docs, docs * DOC_TOKENS
    tokenizer = out / "tokenizer.model"
    tokenizer.write_bytes(b"none: random token ids written by bench/bench_data.py\n")
    manifest = {"format": 1, "tool": "bench/bench_data.py", "sources": [{"input": "random token ids"}],
                "documents": documents, "tokens": tokens, "vocab_size": vocab, "eod_id": 0,
                "dtype": np.dtype(dtype).name,
                "tokenizer": {"file": tokenizer.name, "sha256": sha256_file(tokenizer), "trained": False}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out
