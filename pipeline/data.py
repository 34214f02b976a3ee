"""Training and eval sequences from preprocessed shards, in a deterministic global order.

The train split's .bin is the documents one after another (each ending in EOD), so it is read as one flat
token stream and cut into samples of seq_len + 1 tokens (inputs and shifted labels), sample i starting at token
i * seq_len. Sample order is a seeded permutation per epoch. Global step t consumes positions
[t B, (t + 1) B) of that order (B = global batch in sequences), and data-parallel rank r takes the r-th contiguous
slice of them. So the sequences of a step are the same whatever the data-parallel size and micro-batch, and
the data position of a resumed run is its step alone (OLMo's "global data order").
"""

from __future__ import annotations

import json
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from pipeline.utils import log


class DataError(ValueError):
    """The data directory cannot feed this run; the message says why."""


def _open_split(data_dir: Path, split: str) -> np.ndarray:
    """The split's tokens as one flat read-only memmap, checked against megatron-core's index."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    prefix = data_dir / split
    if not (prefix.with_suffix(".bin").exists() and prefix.with_suffix(".idx").exists()):
        raise DataError(f"{data_dir} has no {split}.bin/{split}.idx: run `cbs preprocess` for it")
    index = IndexedDataset(str(prefix))
    n_tokens = int(index.sequence_lengths.sum())
    flat = np.memmap(prefix.with_suffix(".bin"), dtype=index.index.dtype, mode="r")
    if flat.size != n_tokens:
        raise DataError(f"{prefix}.bin holds {flat.size} tokens but its .idx says {n_tokens}: rebuild the data")
    return flat


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"data_dir {data_dir} is not a preprocessed data directory: no manifest.json "
                        f"(run `cbs preprocess` first)")
    return json.loads(path.read_text())


class TrainSamples:
    """Samples of seq_len + 1 tokens from the train split, in a seeded per-epoch order."""

    def __init__(self, data_dir: str | Path, seq_len: int, seed: int, offset_seqs: int = 0):
        self.tokens = _open_split(Path(data_dir), "train")
        self.seq_len = seq_len
        self.seed = seed
        self.offset_seqs = offset_seqs
        """Global order positions already consumed before this run's step 0 (a branch continues its base run's
        stream)."""
        self.per_epoch = (self.tokens.size - 1) // seq_len
        if self.per_epoch < 1:
            raise DataError(f"the train split has {self.tokens.size} tokens: fewer than one sequence of "
                            f"{seq_len + 1}; use more data or a shorter model.seq_len")

    @lru_cache(maxsize=2)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.per_epoch)

    def positions(self, start: int, count: int) -> np.ndarray:
        """Sample indices at global order positions [start, start + count)."""
        pos = np.arange(start, start + count)
        epochs = pos // self.per_epoch
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._order(int(epoch))[pos[sel] % self.per_epoch]
        return out

    def batch(self, start: int, count: int) -> torch.Tensor:
        """LongTensor [count, seq_len + 1] of the samples at global order positions [start, start + count)."""
        idx = self.positions(start, count) * self.seq_len
        window = np.arange(self.seq_len + 1)
        return torch.from_numpy(self.tokens[idx[:, None] + window].astype(np.int64))

    def step_batch(self, step: int, global_batch: int, rank: int, world: int) -> torch.Tensor:
        """This rank's share of global step `step` (0-based): [global_batch / world, seq_len + 1]."""
        per_rank = global_batch // world
        return self.batch(self.offset_seqs + step * global_batch + rank * per_rank, per_rank)

    def epochs_for(self, total_sequences: int) -> float:
        return total_sequences / self.per_epoch


def eval_sequences(data_dir: str | Path, seq_len: int, eval_tokens: int) -> torch.Tensor:
    """The fixed eval set: the first eval_tokens // seq_len non-overlapping sequences of the val split."""
    tokens = _open_split(Path(data_dir), "val")
    available = (tokens.size - 1) // seq_len
    want = max(1, eval_tokens // seq_len)
    if available < 1:
        raise DataError(f"the val split has {tokens.size} tokens: fewer than one sequence of {seq_len + 1}; "
                        f"raise preprocess.val_fraction")
    if available < want:
        log.warning("eval: the val split holds %d sequences of %d tokens, fewer than eval.eval_tokens asks "
                    "(%d); evaluating on all of them", available, seq_len, want)
    n = min(want, available)
    idx = np.arange(n) * seq_len
    return torch.from_numpy(tokens[idx[:, None] + np.arange(seq_len + 1)].astype(np.int64))
