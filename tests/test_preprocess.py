"""preprocess on real text: round trip, split stability, manifest vs shards, megatron-core readability, bad input."""

from __future__ import annotations

import gzip
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from conftest import read_split, stdlib_texts, write_jsonl
from cbs.pipeline import preprocess
from cbs.pipeline.config import OnError, PreprocessConfig, TokenizerConfig
from cbs.pipeline.corpus import CorpusError, Reader, resolve
from cbs.pipeline.preprocess import PreprocessError, is_val


def run(inputs, out: Path, vocab: int = 400, **kw) -> dict:
    tok = kw.pop("tokenizer", None) or TokenizerConfig(vocab_size=vocab)
    force = kw.pop("force", False)
    kw.setdefault("val_fraction", 0.2)  # ~100-document corpora: 1% would leave the val split empty
    cfg = PreprocessConfig(inputs=[str(i) for i in inputs], output_dir=str(out), tokenizer=tok, **kw)
    return preprocess.main(cfg, force=force)


def decoded_documents(data_dir: Path, split: str) -> list[str]:
    sp = spm.SentencePieceProcessor(model_file=str(data_dir / "tokenizer.model"))
    eod = json.loads((data_dir / "manifest.json").read_text())["eod_id"]
    ds = read_split(data_dir, split)
    docs = []
    for i in range(len(ds)):
        ids = ds[i]
        assert ids[-1] == eod, f"{split} sequence {i} does not end with EOD"
        docs.append(sp.decode(ids[:-1].tolist()))
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    texts = stdlib_texts(120)
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", texts), texts


# ------------------------------------------------------------------------------------------- the default corpus


def test_stdlib_corpus_end_to_end(stdlib_data):
    manifest = json.loads((stdlib_data / "manifest.json").read_text())
    source_docs = [d.text for d in Reader([resolve("stdlib")])]
    assert manifest["python_version"] == platform.python_version()
    assert manifest["sources"][0]["documents"] == len(source_docs) > 1000
    assert manifest["vocab_size"] == 512 and manifest["dtype"] == "uint16"
    for split in ("train", "val"):
        ds = read_split(stdlib_data, split)  # megatron-core's IndexedDataset reads our shards
        assert len(ds) == manifest["documents"][split] > 0
        assert int(ds.sequence_lengths.sum()) == manifest["tokens"][split]
        assert len(ds.document_indices) == len(ds) + 1  # one document per sequence
    # round trip on a sample: shard documents decode to the source documents, in source order per split
    want = {"train": [t for t in source_docs if not is_val(t, 0.01)], "val": [t for t in source_docs if is_val(t, 0.01)]}
    sp = spm.SentencePieceProcessor(model_file=str(stdlib_data / "tokenizer.model"))
    for split, texts in want.items():
        ds = read_split(stdlib_data, split)
        assert len(ds) == len(texts)
        for i in random.Random(0).sample(range(len(texts)), min(40, len(texts))):
            assert sp.decode(ds[i][:-1].tolist()) == texts[i]


def test_manifest_records_tokenizer(stdlib_data):
    from cbs.pipeline.utils import sha256_file

    manifest = json.loads((stdlib_data / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == sha256_file(stdlib_data / "tokenizer.model")
    assert manifest["eod_id"] == spm.SentencePieceProcessor(model_file=str(stdlib_data / "tokenizer.model")).eos_id()


# ------------------------------------------------------------------------------------------- formats and splits


def test_round_trip_all_documents(corpus, tmp_path):
    path, texts = corpus
    run([path], tmp_path / "d", val_fraction=0.2)
    train, val = decoded_documents(tmp_path / "d", "train"), decoded_documents(tmp_path / "d", "val")
    assert train == [t for t in texts if not is_val(t, 0.2)]
    assert val == [t for t in texts if is_val(t, 0.2)]
    assert len(val) > 0 and len(train) > len(val)


def test_adding_documents_never_moves_others(corpus, tmp_path):
    path, texts = corpus
    model = tmp_path / "a" / "tokenizer.model"
    run([path], tmp_path / "a", val_fraction=0.2)
    more = write_jsonl(tmp_path / "more.jsonl", stdlib_texts(200)[120:])
    run([path, more], tmp_path / "b", val_fraction=0.2, tokenizer=TokenizerConfig(model=str(model)))
    for split in ("train", "val"):
        a, b = decoded_documents(tmp_path / "a", split), decoded_documents(tmp_path / "b", split)
        assert b[:len(a)] == a  # the old documents keep their split and their order
        assert all(t not in texts for t in b[len(a):])


def test_output_is_deterministic_and_independent_of_workers(corpus, tmp_path):
    path, _ = corpus
    run([path], tmp_path / "w1", workers=1, documents_per_task=7)
    run([path], tmp_path / "w2", workers=2, documents_per_task=64)
    for name in ("tokenizer.model", "train.bin", "train.idx", "val.bin", "val.idx"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_txt_parquet_and_saved_dataset_read_like_jsonl(corpus, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, texts = corpus
    texts = texts[:30]
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, t in enumerate(texts):
        (txt_dir / f"{i:03d}.txt").write_text(t)
    pq.write_table(pa.table({"content": texts}), tmp_path / "docs.parquet")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    gz = tmp_path / "docs.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode()))
    cases = {"txt": ([txt_dir / "*.txt"], {}), "parquet": ([tmp_path / "docs.parquet"], {"text_field": "content"}),
             "disk": ([tmp_path / "saved"], {}), "hf-local": ([f"hf:{tmp_path / 'saved_hub'}"], {}),
             "gz": ([gz], {})}
    (tmp_path / "saved_hub").mkdir()
    write_jsonl(tmp_path / "saved_hub" / "train.jsonl", texts)
    for name, (inputs, kw) in cases.items():
        docs = [d.text for d in Reader([resolve(str(i)) for i in inputs], **kw)]
        assert docs == texts, name


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    texts = stdlib_texts(40)
    for i, t in enumerate(texts):
        (tmp_path / f"{i:03d}.txt").write_bytes(t.encode() + (b"\xff\xfe bad bytes" if i % 10 == 0 else b""))
    manifest = run([tmp_path / "*.txt"], tmp_path / "d", val_fraction=0.2)
    assert manifest["invalid_utf8_documents"] == 4
    docs = decoded_documents(tmp_path / "d", "train") + decoded_documents(tmp_path / "d", "val")
    assert sum("\ufffd\ufffd bad bytes" in d for d in docs) == 4


# ------------------------------------------------------------------------------------------- reuse


def test_rerun_reuses_and_changed_settings_are_refused(corpus, tmp_path):
    path, _ = corpus
    first = run([path], tmp_path / "d")
    stamp = (tmp_path / "d" / "train.bin").stat().st_mtime_ns
    assert run([path], tmp_path / "d", workers=1) == first  # workers do not change the output
    assert (tmp_path / "d" / "train.bin").stat().st_mtime_ns == stamp
    with pytest.raises(PreprocessError, match="changed: val_fraction.*--force"):
        run([path], tmp_path / "d", val_fraction=0.3)
    cfg = PreprocessConfig(inputs=[str(path)], output_dir=str(tmp_path / "d"), val_fraction=0.3,
                           tokenizer=TokenizerConfig(vocab_size=400))
    rebuilt = preprocess.main(cfg, force=True)
    assert rebuilt["settings"]["val_fraction"] == 0.3
    assert rebuilt["documents"]["val"] > first["documents"]["val"]


def test_refuses_foreign_non_empty_output_dir(corpus, tmp_path):
    path, _ = corpus
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(PreprocessError, match="not a cbs data directory"):
        run([path], tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------- bad input


def _bad_inputs(tmp: Path) -> dict:
    good = stdlib_texts(60)
    lines = [json.dumps({"text": t}) for t in good]
    (tmp / "badjson.jsonl").write_text("\n".join(lines[:5] + ['{"text": "unterminated'] + lines[5:]) + "\n")
    (tmp / "nofield.jsonl").write_text("\n".join(lines[:3] + [json.dumps({"body": "x"})] + lines[3:]) + "\n")
    (tmp / "corrupt.jsonl.gz").write_bytes(b"this is not gzip data")
    (tmp / "empty.jsonl").write_text("\n\n")
    write_jsonl(tmp / "small.jsonl", ["tiny corpus one", "tiny corpus two", "and three"])
    return {
        "no match": ([tmp / "missing-*.jsonl"], {}, CorpusError, r"missing-\*\.jsonl' matched no file"),
        "bad json": ([tmp / "badjson.jsonl"], {}, CorpusError, r"badjson\.jsonl:6: invalid JSON"),
        "no field": ([tmp / "nofield.jsonl"], {}, CorpusError, r"nofield\.jsonl:4: record has no field 'text'"),
        "unreadable": ([tmp / "corrupt.jsonl.gz"], {}, CorpusError, r"corrupt\.jsonl\.gz: cannot read"),
        "empty": ([tmp / "empty.jsonl"], {}, PreprocessError, "empty corpus"),
        "too small": ([tmp / "small.jsonl"], {"val_fraction": 0.01}, PreprocessError,
                      r"corpus too small for preprocess\.tokenizer\.vocab_size=400: SentencePiece can make at most"),
        "vocab too small": ([tmp / "badjson.jsonl"], {"on_error": OnError.skip, "tokenizer":
                            TokenizerConfig(vocab_size=260)}, PreprocessError,
                            r"vocab_size=260 is too small for this corpus: its characters alone need \d+ pieces; "
                            r"raise tokenizer\.vocab_size"),
    }


@pytest.mark.parametrize("case", ["no match", "bad json", "no field", "unreadable", "empty", "too small",
                                  "vocab too small"])
def test_bad_input_is_named_and_leaves_no_output(tmp_path, case):
    inputs, kw, error, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        run(inputs, out, **kw)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dirs left behind


def test_on_error_skip_counts_bad_records(tmp_path):
    bad = _bad_inputs(tmp_path)
    manifest = run([bad["bad json"][0][0], bad["no field"][0][0]], tmp_path / "out", on_error=OnError.skip)
    assert manifest["skipped_records"] == 2
    assert "badjson.jsonl:6" in manifest["skipped_examples"][0]
    assert sum(manifest["documents"].values()) == 120


def test_cli_exit_codes_and_messages(corpus, tmp_path):
    path, _ = corpus
    cfg = tmp_path / "pre.yaml"
    cfg.write_text(f"inputs: [{path}]\noutput_dir: {tmp_path / 'out'}\ntokenizer: {{vocab_size: 400}}\n"
                   f"val_fraction: 0.2\n")
    cbs = [sys.executable, "-m", "cbs.pipeline.cli", "preprocess", str(cfg)]
    bad = subprocess.run(cbs + ["--set", "val_fraction=0.7"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "preprocess.val_fraction must be in (0, 0.5): got 0.7" in bad.stderr
    ok = subprocess.run(cbs + ["--set", "max_documents=50"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sum(manifest["documents"].values()) == 50
    again = subprocess.run(cbs + ["--set", "max_documents=50"], capture_output=True, text=True)
    assert again.returncode == 0 and "up to date" in again.stderr


def test_given_tokenizer_is_used_as_is(corpus, tmp_path, stdlib_data):
    path, _ = corpus
    manifest = run([path], tmp_path / "d", tokenizer=TokenizerConfig(model=str(stdlib_data / "tokenizer.model")))
    assert manifest["tokenizer"]["trained"] is False
    assert (tmp_path / "d" / "tokenizer.model").read_bytes() == (stdlib_data / "tokenizer.model").read_bytes()
    ds = read_split(tmp_path / "d", "train")  # keep it alive: its items are views into its mmap
    assert max(int(ds[i].max()) for i in range(len(ds))) < 512


# ------------------------------------------------------------------------------------------- kill -9


# wall-clock facts of a run, not of its output
MANIFEST_TIMING = ("created", "seconds", "tokens_per_second")


def output_files(out: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    manifest = json.loads(files.pop("manifest.json"))
    files["manifest.json"] = json.dumps({k: v for k, v in manifest.items() if k not in MANIFEST_TIMING}).encode()
    return files


@pytest.mark.slow
def test_kill_9_at_random_points_then_rerun_equals_an_uninterrupted_run(tmp_path):
    """`cbs preprocess` (a subprocess and its tokenizer workers, killed as a process group) at seeded random
    moments: during start-up or tokenizer training, during tokenization, and anywhere within a whole run's
    duration. The final path never holds a partial directory, and the run that finishes writes the same files
    as an uninterrupted one, leaving no temp directory behind."""
    out = tmp_path / "out"
    cfg = tmp_path / "pre.yaml"
    cfg.write_text(f"inputs: [stdlib]\noutput_dir: {out}\ntokenizer: {{vocab_size: 400}}\nval_fraction: 0.05\n"
                   f"max_documents: 300\nworkers: 2\ndocuments_per_task: 8\n")
    cbs = [sys.executable, "-m", "cbs.pipeline.cli", "preprocess", str(cfg)]
    started = time.monotonic()
    subprocess.run(cbs, check=True, capture_output=True)
    whole_s = time.monotonic() - started
    reference = output_files(out)
    shutil.rmtree(out)

    def tokenizing() -> bool:
        return any(p.name.startswith(".out.tmp-") and (p / "tokenizer.model").exists() for p in tmp_path.iterdir())

    rng = random.Random(20250101)
    early_s, tokenizing_s, anywhere_s = rng.uniform(0.3, 1.5), rng.uniform(0.0, 0.5), rng.uniform(0.5, whole_s)
    kill_points = [("start-up or tokenizer training", lambda t: t > early_s),
                   ("tokenization", lambda t: tokenizing()),
                   ("anywhere", lambda t: t > anywhere_s)]
    for what, due in kill_points:
        proc = subprocess.Popen(cbs, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        begun = time.monotonic()
        while proc.poll() is None and not due(time.monotonic() - begun):
            time.sleep(0.01)
        if what == "tokenization":
            time.sleep(tokenizing_s)
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage and its workers, as Slurm or the OOM killer would
        proc.wait()
        assert killed or what == "anywhere", f"the run ended before the kill point ({what})"
        assert not out.exists() or output_files(out) == reference, what  # never a partial directory
        if out.exists():
            shutil.rmtree(out)  # so that the next kill lands in a run that has work to do
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")], "the kills left temp directories"
    subprocess.run(cbs, check=True, capture_output=True)
    assert output_files(out) == reference
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # stale temp dirs removed
