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
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cbs.pipeline.utils import log, sha256_file

SPLITS = ("train", "val")


class DataError(ValueError):
    """The data directory cannot feed this run; the message names the file and says how to fix it."""


REBUILD = "rebuild the data directory with `cbs preprocess --force` (same config)"
# megatron-core's .idx layout (indexed_dataset.py): magic, version <Q, dtype code <B, sequence count <Q,
# document count <Q, then int32 lengths[S], int64 byte pointers[S], int64 document indices[D].
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")
_TOKEN_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
"""megatron-core's dtype codes that can hold token ids (6 and 7 are floats)."""


@dataclass(frozen=True)
class SplitIndex:
    """What a split's .idx says, after it was checked against its own size and its .bin's."""

    dtype: np.dtype
    sequences: int
    documents: int
    """Document-boundary entries (megatron-core writes documents + 1 of them, the first 0)."""
    tokens: int


def read_index(prefix: str | Path) -> SplitIndex:
    """Check PREFIX.idx and PREFIX.bin before trusting them: megatron-core's reader takes the header's counts as
    given and fails later with an AttributeError or a buffer error on a truncated or foreign file.

    Costs one pass over the sequence lengths (4 bytes per sequence); cached per file size and mtime."""
    prefix = Path(prefix)
    idx, bin_ = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
    for path in (idx, bin_):
        if not path.is_file():
            raise DataError(f"{path} is missing: {REBUILD}")
    return _read_index(str(idx), str(bin_), _stat(idx), _stat(bin_))


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@lru_cache(maxsize=16)
def _read_index(idx: str, bin_: str, idx_stat: tuple[int, int], bin_stat: tuple[int, int]) -> SplitIndex:
    idx_bytes, bin_bytes = idx_stat[0], bin_stat[0]
    with open(idx, "rb") as f:
        head = f.read(_IDX_HEADER.size)
    if len(head) < _IDX_HEADER.size or not head.startswith(_IDX_MAGIC):
        raise DataError(f"{idx} is not a megatron-core index (truncated header or wrong magic bytes): {REBUILD}")
    _, version, code, sequences, documents = _IDX_HEADER.unpack(head)
    if version != 1 or code not in _TOKEN_DTYPES:
        raise DataError(f"{idx} has index version {version} and dtype code {code}; only version 1 with an integer "
                        f"token dtype can be read: {REBUILD}")
    want = _IDX_HEADER.size + 12 * sequences + 8 * documents
    if idx_bytes != want:
        raise DataError(f"{idx} is {idx_bytes} bytes but its header ({sequences} sequences, {documents} document "
                        f"entries) needs {want}: the file is truncated or damaged; {REBUILD}")
    dtype = np.dtype(_TOKEN_DTYPES[code])
    # mapped, not read: a corpus of 10^8 documents has a 400 MB lengths array, and every rank does this
    lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=_IDX_HEADER.size, shape=(sequences,))
    bounds = np.memmap(idx, dtype=np.int64, mode="r", offset=_IDX_HEADER.size + 12 * sequences, shape=(documents,))
    if documents < 1 or bounds[0] != 0 or bounds[-1] != sequences or (sequences and lengths.min() < 0):
        raise DataError(f"{idx} holds negative lengths or document entries that do not span its {sequences} "
                        f"sequences: the file is damaged; {REBUILD}")
    tokens = int(lengths.sum(dtype=np.int64))
    if bin_bytes != tokens * dtype.itemsize:
        other = [d.name for d in map(np.dtype, set(_TOKEN_DTYPES.values()))
                 if d != dtype and bin_bytes == tokens * d.itemsize]
        why = (f"it holds {other[0]} tokens, the index says {dtype.name}" if other
               else "it is truncated, or the .idx belongs to another dataset")
        raise DataError(f"{bin_} is {bin_bytes} bytes but {idx} describes {tokens} {dtype.name} tokens "
                        f"({tokens * dtype.itemsize} bytes): {why}; {REBUILD}")
    return SplitIndex(dtype, sequences, documents, tokens)


def _open_split(data_dir: Path, split: str) -> np.ndarray:
    """The split's tokens as one flat read-only memmap, after read_index checked its files."""
    index = read_index(data_dir / split)
    bin_ = data_dir / f"{split}.bin"
    if index.tokens == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=index.dtype)
    return np.memmap(bin_, dtype=index.dtype, mode="r")


def read_manifest(data_dir: str | Path, seq_len: Optional[int] = None,
                  tokenizer_sha256: Optional[str] = None) -> dict:
    """manifest.json of a `cbs preprocess` output, after checking that the directory can feed a run.

    Checks: the manifest parses and has the fields the stages read; tokenizer.model is the file the shards were
    made with (its sha256 is the manifest's; and `tokenizer_sha256`'s, when a caller knows the tokenizer its
    model was trained with); each split's .idx/.bin are whole (read_index) and are the ones the manifest counted,
    in a dtype that holds every token id; with `seq_len`, each split holds at least one sequence of seq_len + 1
    tokens. Pretrain calls it as it starts, before it writes anything; evaluate should too, for `--data-dir`.
    Cost: hashing the tokenizer (a few MB) and one pass over each split's sequence lengths."""
    data_dir = Path(data_dir)
    manifest = _load_manifest(data_dir)
    _check_tokenizer(data_dir, manifest, tokenizer_sha256)
    for split in SPLITS:
        index = read_index(data_dir / split)
        _check_split(data_dir, split, manifest, index, seq_len)
    return manifest


def check_batch_fits(data_dir: str | Path, manifest: dict, seq_len: int, global_batch_seqs: int,
                     key: str = "pretrain.global_batch_seqs") -> None:
    """One global batch must not hold more sequences than the train split: a larger one repeats sequences within
    a step (and materialises an unbounded batch in memory) instead of measuring a larger batch."""
    per_epoch = (manifest["tokens"]["train"] - 1) // seq_len
    if global_batch_seqs > per_epoch:  # a ramp's largest batch, named by its key
        raise DataError(f"{key} {global_batch_seqs} is more than the {per_epoch:,} sequences of "
                        f"model.seq_len {seq_len} in the train split of {data_dir}: one batch would repeat data; "
                        f"lower {key.rsplit('.', 1)[-1]}, or add documents to the corpus")


def data_identity(data_dir: str | Path, manifest: dict) -> dict:
    """What makes a data directory the data a run trained on, whatever path names it: the manifest's fingerprint
    (preprocess settings and sources), the tokenizer's sha256, the tokens per split and each shard's size in
    bytes. A run resumed on data that differs in any of them would train its remaining steps on other
    sequences; a symlink re-pointed between a preemption and a resume changes them, the real path of the same
    data does not. Keys as stored under config.yaml's `resolved`."""
    return {
        "data_manifest_fingerprint": manifest.get("fingerprint"),
        "tokenizer_sha256": manifest["tokenizer"].get("sha256"),
        "data_tokens": {split: manifest["tokens"][split] for split in SPLITS},
        "data_shard_bytes": {f"{split}.{ext}": (Path(data_dir) / f"{split}.{ext}").stat().st_size
                             for split in SPLITS for ext in ("bin", "idx")},
    }


def _load_manifest(data_dir: Path) -> dict:
    path = data_dir / "manifest.json"
    if not data_dir.is_dir():
        raise DataError(f"data_dir {data_dir} does not exist or is not a directory: run `cbs preprocess` first and "
                        f"give its output_dir")
    if not path.is_file():
        raise DataError(f"data_dir {data_dir} is not a preprocessed data directory: no manifest.json "
                        f"(run `cbs preprocess` first and give its output_dir)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}): {REBUILD}") from None
    fields = {"vocab_size": int, "dtype": str, "tokens": dict, "documents": dict, "tokenizer": dict}
    bad = [k for k, kind in fields.items() if not isinstance(manifest, dict) or not isinstance(manifest.get(k), kind)]
    if not bad and not all(isinstance(manifest[k].get(s), int) for k in ("tokens", "documents") for s in SPLITS):
        bad = ["tokens/documents per split"]
    if bad:
        raise DataError(f"{path} lacks {', '.join(bad)} (or they have the wrong type): it was not written by "
                        f"`cbs preprocess` or was edited; {REBUILD}")
    return manifest


def _check_tokenizer(data_dir: Path, manifest: dict, run_sha256: Optional[str]) -> None:
    path = data_dir / "tokenizer.model"
    want = manifest["tokenizer"].get("sha256")
    if not path.is_file():
        raise DataError(f"{path} is missing: the shards cannot be decoded without it; restore it or {REBUILD}")
    got = sha256_file(path)
    if got != want:
        raise DataError(f"{path} is not the tokenizer the shards were made with (sha256 {got[:12]}..., "
                        f"manifest.json says {str(want)[:12]}...): put the original back, or {REBUILD}")
    if run_sha256 is not None and run_sha256 != got:
        raise DataError(f"data_dir {data_dir} was tokenized with another tokenizer than this run's model "
                        f"(sha256 {got[:12]}... vs {run_sha256[:12]}...): give a data directory made with the run's "
                        f"tokenizer (preprocess.tokenizer.model)")


def _check_split(data_dir: Path, split: str, manifest: dict, index: SplitIndex, seq_len: Optional[int]) -> None:
    idx = data_dir / f"{split}.idx"
    if index.dtype.name != manifest["dtype"]:
        raise DataError(f"{idx} holds {index.dtype.name} tokens but manifest.json says {manifest['dtype']}: "
                        f"the shards are not this directory's; {REBUILD}")
    if manifest["vocab_size"] - 1 > np.iinfo(index.dtype).max:
        raise DataError(f"{data_dir / 'manifest.json'} says vocab_size {manifest['vocab_size']}, but {idx} holds "
                        f"{index.dtype.name} tokens, which cannot store ids above {np.iinfo(index.dtype).max}; "
                        f"{REBUILD}")
    if index.tokens != manifest["tokens"][split] or index.documents - 1 != manifest["documents"][split]:
        raise DataError(f"{idx} holds {index.documents - 1} documents and {index.tokens} tokens but manifest.json "
                        f"counted {manifest['documents'][split]} and {manifest['tokens'][split]}: the shards are "
                        f"from another dataset; {REBUILD}")
    if seq_len is not None and index.tokens < seq_len + 1:
        fix = ("raise preprocess.val_fraction or add documents" if split == "val"
               else "add documents to the corpus")
        raise DataError(f"the {split} split of {data_dir} has {index.tokens} tokens: fewer than one sequence of "
                        f"model.seq_len + 1 = {seq_len + 1}; {fix}, or lower model.seq_len")


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
            raise DataError(f"the train split of {data_dir} has {self.tokens.size} tokens: fewer than one "
                            f"sequence of model.seq_len + 1 = {seq_len + 1}; add documents to the corpus, or "
                            f"lower model.seq_len")

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

    def step_batch(self, start_seqs: int, global_batch: int, rank: int, world: int) -> torch.Tensor:
        """This rank's share of the global batch of the step that starts `start_seqs` sequences into the run's
        stream (BatchSchedule.seqs_before(step); step x batch for a fixed batch): [global_batch / world, seq_len + 1].
        The global order does not depend on the batch: a ramp reads the same sequences as a fixed batch over the
        same tokens."""
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} does not split over {world} ranks")
        per_rank = global_batch // world
        return self.batch(self.offset_seqs + start_seqs + rank * per_rank, per_rank)


def eval_sequences(data_dir: str | Path, seq_len: int, eval_tokens: int) -> torch.Tensor:
    """The fixed eval set: the first eval_tokens // seq_len non-overlapping sequences of the val split."""
    tokens = _open_split(Path(data_dir), "val")
    available = (tokens.size - 1) // seq_len
    want = max(1, eval_tokens // seq_len)
    if available < 1:
        raise DataError(f"the val split of {data_dir} has {tokens.size} tokens: fewer than one sequence of "
                        f"model.seq_len + 1 = {seq_len + 1}; raise preprocess.val_fraction or add documents, or "
                        f"lower model.seq_len")
    if available < want:
        log.warning("eval: the val split holds %d sequences of %d tokens, fewer than eval.eval_tokens asks "
                    "(%d); evaluating on all of them", available, seq_len, want)
    n = min(want, available)
    idx = np.arange(n) * seq_len
    return torch.from_numpy(tokens[idx[:, None] + np.arange(seq_len + 1)].astype(np.int64))
