"""cbs/pipeline/data.py on real shards: index checks vs megatron-core's reader, the global data order (epochs, steps,
ranks), the eval set, and int32 shards of a vocabulary larger than uint16."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_split
from cbs.pipeline import preprocess
from cbs.pipeline.config import PreprocessConfig, TokenizerConfig
from cbs.pipeline.data import DataError, TrainSamples, eval_sequences, read_index, read_manifest


def make_small_data(out: Path, documents: int = 80, **kw) -> Path:
    """The first `documents` stdlib sources, preprocessed with a 400-piece tokenizer (a few seconds)."""
    kw.setdefault("tokenizer", TokenizerConfig(vocab_size=400))
    kw.setdefault("val_fraction", 0.1)
    preprocess.main(PreprocessConfig(inputs=["stdlib"], output_dir=str(out), max_documents=documents, **kw))
    return out


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return make_small_data(tmp_path_factory.mktemp("data") / "d")


def stream(data_dir: Path, split: str) -> np.ndarray:
    """The split's documents one after another, read with megatron-core's own reader."""
    ds = read_split(data_dir, split)
    return np.concatenate([np.array(ds[i], dtype=np.int64) for i in range(len(ds))])


def test_index_agrees_with_megatron_core(small_data):
    manifest = read_manifest(small_data, seq_len=64)
    for split in ("train", "val"):
        ds, index = read_split(small_data, split), read_index(small_data / split)
        assert index.dtype == ds.index.dtype == np.uint16
        assert index.sequences == len(ds) == manifest["documents"][split]
        assert index.documents == len(ds.document_indices)
        assert index.tokens == int(ds.sequence_lengths.sum()) == manifest["tokens"][split]
    samples = TrainSamples(small_data, 64, seed=0)
    assert np.array_equal(np.asarray(samples.tokens, dtype=np.int64), stream(small_data, "train"))


def test_each_epoch_is_a_permutation_and_positions_wrap_into_the_next(small_data):
    tokens = read_index(small_data / "train").tokens
    samples = TrainSamples(small_data, seq_len=(tokens - 1) // 7, seed=3)  # 7 samples per epoch
    n = samples.per_epoch
    assert n == 7
    epochs = [samples.positions(e * n, n) for e in range(4)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(n))
    assert len({tuple(o) for o in epochs}) > 1  # a new permutation per epoch, not the same one repeated
    flat = np.concatenate(epochs)
    for start, count in [(0, 28), (5, 4), (6, 9), (13, 1), (20, 8)]:  # windows across epoch boundaries
        assert np.array_equal(samples.positions(start, count), flat[start:start + count])


def test_seed_decides_the_order(small_data):
    a, b, c = (TrainSamples(small_data, 64, seed=s).positions(0, 200) for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_a_step_reads_the_positions_after_its_start(small_data):
    seq, batch = 64, 6
    samples = TrainSamples(small_data, seq, seed=5)
    tokens = stream(small_data, "train")
    for step in (0, 1, 17, samples.per_epoch // batch + 1):  # the last one crosses into epoch 1
        got = samples.step_batch(step * batch, batch, rank=0, world=1)
        assert got.shape == (batch, seq + 1) and got.dtype == torch.int64
        sample_ids = samples.positions(step * batch, batch)
        for row, i in zip(got, sample_ids):
            assert np.array_equal(row.numpy(), tokens[i * seq:i * seq + seq + 1])  # inputs + shifted labels
    consecutive = torch.cat([samples.step_batch(t * batch, batch, 0, 1) for t in range(5)])
    assert torch.equal(consecutive, samples.batch(0, 5 * batch))


@pytest.mark.parametrize("world", [2, 4, 8])
def test_ranks_split_each_step_in_order(small_data, world):
    samples = TrainSamples(small_data, 64, seed=11)
    for step in (0, 3, 100):
        whole = samples.step_batch(step * 16, 16, rank=0, world=1)
        shares = [samples.step_batch(step * 16, 16, rank=r, world=world) for r in range(world)]
        assert all(s.shape[0] == 16 // world for s in shares)
        assert torch.equal(torch.cat(shares), whole)


def test_eval_sequences_are_the_first_windows_of_val(small_data, caplog):
    seq = 32
    val = stream(small_data, "val")
    available = (len(val) - 1) // seq
    got = eval_sequences(small_data, seq, eval_tokens=5 * seq + 7)
    assert got.shape == (5, seq + 1)
    for i, row in enumerate(got):
        assert np.array_equal(row.numpy(), val[i * seq:i * seq + seq + 1])
    assert eval_sequences(small_data, seq, eval_tokens=1).shape == (1, seq + 1)  # at least one sequence
    with caplog.at_level(logging.WARNING, logger="cbs"):
        everything = eval_sequences(small_data, seq, eval_tokens=10**9)
    assert everything.shape == (available, seq + 1)
    assert int(everything[-1, -1]) == val[available * seq]  # the last window ends inside the split
    assert "fewer than eval.eval_tokens asks" in caplog.text
    too_long = len(val)  # seq_len + 1 tokens do not fit
    with pytest.raises(DataError, match=r"val split of .* has \d+ tokens: fewer than one sequence of model\.seq_len"):
        eval_sequences(small_data, too_long, eval_tokens=too_long)
    with pytest.raises(DataError, match=r"val split .* raise preprocess\.val_fraction"):
        read_manifest(small_data, seq_len=too_long)
    assert read_manifest(small_data, seq_len=too_long - 1)["tokens"]["val"] == len(val)


def big_vocab_model(base: Path, out: Path, pieces: int = 66_000) -> Path:
    """A real SentencePiece model with more pieces than uint16 holds: `base` plus user-defined pieces zqNNNNNq."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(base.read_bytes())
    for i in range(pieces):
        piece = proto.pieces.add()
        piece.piece, piece.type = f"zq{i:05d}q", pb.ModelProto.SentencePiece.USER_DEFINED
    out.write_bytes(proto.SerializeToString())
    return out


def test_vocabulary_larger_than_uint16_gets_int32_shards(small_data, tmp_path):
    from conftest import stdlib_texts, write_jsonl

    model = big_vocab_model(small_data / "tokenizer.model", tmp_path / "big.model")
    texts = [t + f"\nx = zq{65_990 + i % 10:05d}q\n" for i, t in enumerate(stdlib_texts(40))]
    corpus = write_jsonl(tmp_path / "docs.jsonl", texts)
    out = tmp_path / "d"
    preprocess.main(PreprocessConfig(inputs=[str(corpus)], output_dir=str(out), val_fraction=0.2,
                                     tokenizer=TokenizerConfig(model=str(model))))
    manifest = read_manifest(out, seq_len=64)
    assert manifest["vocab_size"] == 66_400 and manifest["dtype"] == "int32"
    assert read_index(out / "train").dtype == np.int32
    ids = TrainSamples(out, 64, seed=0).tokens
    assert ids.max() == 400 + 65_999 and (ids > 65_535).sum() >= 30  # ids above uint16 survive the round trip
    assert eval_sequences(out, 64, 10**6).max() > 65_535


def test_a_run_can_pin_its_tokenizer(small_data, tmp_path):
    manifest = read_manifest(small_data, tokenizer_sha256=read_manifest(small_data)["tokenizer"]["sha256"])
    assert manifest["vocab_size"] == 400
    other = make_small_data(tmp_path / "other", documents=60, tokenizer=TokenizerConfig(vocab_size=390))
    with pytest.raises(DataError, match="tokenized with another tokenizer than this run's model"):
        read_manifest(other, tokenizer_sha256=manifest["tokenizer"]["sha256"])


def test_index_cache_notices_a_replaced_file(small_data, tmp_path):
    data = Path(shutil.copytree(small_data, tmp_path / "d"))
    assert read_index(data / "train").tokens > 0
    whole = (data / "train.bin").read_bytes()
    (data / "train.bin").write_bytes(whole[:-2])  # one token short: a new size, so the cached answer is not reused
    with pytest.raises(DataError, match=r"train\.bin is \d+ bytes but .* it is truncated"):
        read_index(data / "train")
