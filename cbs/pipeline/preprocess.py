"""preprocess: raw corpus -> SentencePiece tokenizer -> Megatron indexed-dataset shards + manifest.json.

Output (docs/architecture.md contract), written into a temp directory and renamed into `output_dir` at the end:
  tokenizer.model   SentencePiece model (trained here, lossless settings; or a copy of `tokenizer.model`)
  train.bin/.idx    megatron-core indexed dataset, one document per sequence, EOD (the tokenizer's eos) appended
  val.bin/.idx      the same for the validation split
  manifest.json     sources, documents and tokens per split, vocab size, eod id, tokenizer sha256, settings

Two passes over the corpus: the first feeds train-split text to SentencePiece's trainer (which keeps a bounded
uniform sample of `tokenizer.sample_sentences` chunks), the second tokenizes in `workers` processes. A document's
split is decided by a hash of its text alone, so adding documents never moves others between splits.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import re
import time
import warnings
from collections import deque
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from cbs import __version__
from cbs.pipeline.config import PreprocessConfig, to_dict
from cbs.pipeline.corpus import Reader, resolve
from cbs.pipeline.utils import atomic_write_json, log, progress, sha256_file, staged_directory

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
SPLITS = ("train", "val")
FORMAT_VERSION = 1
# Lossless SentencePiece: no NFKC, whitespace kept as is, no dummy prefix, unknown characters as bytes.
# Measured (docs/method.md): decode(encode(doc)) == doc for 485/485 documents, against 0/485 with the defaults.
LOSSLESS_TRAINER_OPTIONS = dict(
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    byte_fallback=True,
    allow_whitespace_only_pieces=True,
    character_coverage=0.9999,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
)
# Settings that do not change the output; a re-run that differs only in these reuses the data.
_NOT_IN_FINGERPRINT = ("output_dir", "workers", "documents_per_task")


class PreprocessError(ValueError):
    """The corpus or settings cannot produce a dataset; the message says why and what to change."""


def is_val(text: str, val_fraction: float) -> bool:
    """Stable split: the first 8 bytes of blake2b(text) as a fraction of 2^64, below val_fraction -> val."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0**64


def token_dtype(vocab_size: int):
    """uint16 when the vocabulary fits (as Megatron-LM's own tools choose), int32 otherwise."""
    return np.uint16 if vocab_size < 65500 else np.int32


def main(cfg: PreprocessConfig, force: bool = False) -> dict:
    """Run the stage; returns the manifest. Reuses an up-to-date output unless `force`."""
    out = Path(cfg.output_dir)
    sources = [resolve(s) for s in cfg.inputs]
    fingerprint = _fingerprint(cfg, sources)
    previous = _existing_manifest(out)
    if previous is not None and not force:
        if previous.get("fingerprint") == fingerprint:
            log.info("%s is up to date (same settings and inputs): reusing it; --force rebuilds", out)
            return previous
        raise PreprocessError(f"{out} holds data made from other settings or inputs "
                              f"({_what_changed(previous['settings'], to_dict(cfg))}); "
                              f"use --force to replace it, or choose another output_dir")
    started = time.time()
    with staged_directory(out) as tmp:
        reader = Reader(sources, cfg.text_field, cfg.on_error.value == "skip", cfg.max_documents)
        model_bytes, trained = _tokenizer(cfg, reader)
        (tmp / TOKENIZER).write_bytes(model_bytes)
        counts = _tokenize(cfg, reader, model_bytes, tmp)
        manifest = _manifest(cfg, sources, reader, counts, tmp / TOKENIZER, trained, fingerprint,
                             time.time() - started)
        atomic_write_json(tmp / MANIFEST, manifest)
    log.info("wrote %s: %d train / %d val documents, %d / %d tokens, %.0f tokens/s", out,
             counts["documents"]["train"], counts["documents"]["val"], counts["tokens"]["train"],
             counts["tokens"]["val"], manifest["tokens_per_second"])
    return manifest


# ---------------------------------------------------------------------------------------------------- reuse


def _fingerprint(cfg: PreprocessConfig, sources) -> str:
    settings = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_IN_FINGERPRINT}
    model = cfg.tokenizer.model
    key = {
        "format": FORMAT_VERSION,
        "settings": settings,
        "sources": [s.fingerprint() for s in sources],
        "tokenizer_sha256": sha256_file(model) if model and Path(model).is_file() else None,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _existing_manifest(out: Path) -> Optional[dict]:
    for parent in out.parents:  # a file where a parent directory should be: mkdir would fail with a traceback
        if parent.exists() and not parent.is_dir():
            raise PreprocessError(f"output_dir {out}: {parent} is a file, not a directory; choose another "
                                  f"output_dir")
    if not out.exists():
        return None
    if not out.is_dir():
        raise PreprocessError(f"output_dir {out} exists and is a file, not a directory; choose another output_dir")
    manifest = out / MANIFEST
    if not manifest.exists():
        if any(out.iterdir()):
            raise PreprocessError(f"output_dir {out} exists, is not empty and has no {MANIFEST}: it is not a cbs "
                                  f"data directory; choose a new or empty directory")
        return None
    try:
        return json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PreprocessError(f"{manifest} cannot be read ({e}); delete {out} or use --force") from None


def _what_changed(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if k not in _NOT_IN_FINGERPRINT and old.get(k) != new.get(k)]
    return "changed: " + ", ".join(keys) if keys else "the input files changed"


# ---------------------------------------------------------------------------------------------------- tokenizer


def _chunks(text: str, limit: int) -> Iterator[str]:
    """Cut a document at line ends into pieces of about `limit` characters (long lines are cut hard)."""
    buf, size = [], 0
    for line in text.splitlines(keepends=True):
        while len(line) > limit:
            if buf:
                yield "".join(buf)
                buf, size = [], 0
            yield line[:limit]
            line = line[limit:]
        if size + len(line) > limit and buf:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += len(line)
    if buf:
        yield "".join(buf)


def _tokenizer(cfg: PreprocessConfig, reader: Reader) -> tuple[bytes, bool]:
    """The tokenizer's model bytes, and whether it was trained here."""
    if cfg.tokenizer.model:
        path = Path(cfg.tokenizer.model)
        if not path.is_file():
            raise PreprocessError(f"preprocess.tokenizer.model {path} does not exist: check the path")
        data = path.read_bytes()
        _load_processor(data, f"preprocess.tokenizer.model {path}")
        return data, False
    return _train_tokenizer(cfg, reader), True


def _train_tokenizer(cfg: PreprocessConfig, reader: Reader) -> bytes:
    import sentencepiece as spm

    tok = cfg.tokenizer
    failure: list[BaseException] = []
    train_documents = 0
    bar = progress(desc="tokenizer: reading", unit="doc")

    def sentences() -> Iterator[str]:
        # SentencePiece calls this from C++: an exception raised here would surface as an opaque error, so it is
        # kept and re-raised after training stops.
        nonlocal train_documents
        try:
            for doc in reader:
                bar.update()
                if not is_val(doc.text, cfg.val_fraction):
                    train_documents += 1
                    yield from _chunks(doc.text, tok.chunk_chars)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after SentencePiece returns
            failure.append(e)

    model = io.BytesIO()
    spm.set_random_generator_seed(1234)  # the sample of sentences, and so the tokenizer, is reproducible
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=tok.vocab_size,
            model_type=tok.type.value, split_digits=tok.split_digits,
            input_sentence_size=tok.sample_sentences, shuffle_input_sentence=True,
            max_sentence_length=4 * tok.chunk_chars + 16, num_threads=cfg.num_workers,
            minloglevel=2, **LOSSLESS_TRAINER_OPTIONS)
    except RuntimeError as e:
        if failure:
            raise failure[0] from None
        raise _tokenizer_error(cfg, reader, train_documents, e) from None
    finally:
        bar.close()
    if failure:
        raise failure[0]
    return _without_thread_count(model.getvalue())


def _without_thread_count(model_bytes: bytes) -> bytes:
    """The model records the trainer's thread count; clear it so that the same corpus and settings give the same
    tokenizer bytes (and sha256) on any machine: the pieces do not depend on it."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    proto.trainer_spec.ClearField("num_threads")
    return proto.SerializeToString()


def _tokenizer_error(cfg: PreprocessConfig, reader: Reader, train_documents: int,
                     e: RuntimeError) -> PreprocessError:
    message = str(e)
    if reader.stats.documents == 0:
        return _empty_corpus_error(cfg, reader)
    if train_documents == 0:
        return _split_error(cfg, reader, "train")
    chars = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if chars:  # the corpus has more distinct characters than the vocabulary has pieces
        return PreprocessError(
            f"preprocess.tokenizer.vocab_size={cfg.tokenizer.vocab_size} is too small for this corpus: its "
            f"characters alone need {chars.group(2)} pieces; raise tokenizer.vocab_size")
    limit = re.search(r"<= (\d+)", message)
    if "Vocabulary size too high" in message or "vocab_size" in message.lower():
        most = f"at most {limit.group(1)} pieces" if limit else "fewer pieces"
        return PreprocessError(
            f"corpus too small for preprocess.tokenizer.vocab_size={cfg.tokenizer.vocab_size}: SentencePiece can "
            f"make {most} from its {train_documents} training documents; lower tokenizer.vocab_size or add data")
    return PreprocessError(f"SentencePiece training failed: {message}")


def _empty_corpus_error(cfg: PreprocessConfig, reader: Reader) -> PreprocessError:
    stats = reader.stats
    detail = f"{stats.empty_documents} empty documents, {stats.skipped_records} skipped records"
    return PreprocessError(f"empty corpus: no document with text in {', '.join(cfg.inputs)} ({detail}); give "
                           f"inputs with text")


def _split_error(cfg: PreprocessConfig, reader: Reader, split: str) -> PreprocessError:
    change = "raise" if split == "val" else "lower"
    return PreprocessError(f"no document fell in the {split} split ({reader.stats.documents} documents, "
                           f"val_fraction {cfg.val_fraction}): {change} preprocess.val_fraction or add documents")


def _load_processor(model_bytes: bytes, what: str = "tokenizer"):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_bytes)
    except (RuntimeError, OSError) as e:
        raise PreprocessError(f"{what} is not a SentencePiece model ({e}): give a .model file written by "
                              f"SentencePiece, or drop tokenizer.model to train one") from None
    if sp.eos_id() < 0:
        raise PreprocessError(f"{what} has no end-of-sequence piece, needed as the EOD token: train it with an eos "
                              f"piece (eos_id >= 0), or drop tokenizer.model to train one")
    return sp


# ---------------------------------------------------------------------------------------------------- tokenize

_worker_sp = None


def _init_worker(model_bytes: bytes) -> None:
    global _worker_sp
    _worker_sp = _load_processor(model_bytes)


def encode_documents(texts: list[str], val_fraction: float, sp=None) -> dict:
    """Tokenize documents; per split the concatenated ids (EOD after each document) and document lengths."""
    sp = sp or _worker_sp
    # one thread per process (the processes are the parallelism); numpy out: no per-token Python ints
    ids = sp.encode(texts, num_threads=1, return_type="numpy")
    eod = np.array([sp.eos_id()], dtype=np.int32)
    dtype = token_dtype(sp.get_piece_size())
    val = [is_val(t, val_fraction) for t in texts]
    out = {}
    for split, want in (("train", False), ("val", True)):
        docs = [d for d, v in zip(ids, val) if v == want]
        lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
        parts = [p for d in docs for p in (d, eod)]
        flat = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)
        out[split] = (flat, lengths)
    return out


def _batches(docs: Iterable, size: int) -> Iterator[list[str]]:
    batch = []
    for doc in docs:
        batch.append(doc.text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _ordered_map(pool, fn, tasks: Iterator, in_flight: int) -> Iterator:
    """pool.imap, but with at most `in_flight` tasks queued: imap reads its whole input ahead into memory."""
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, task))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _builders(tmp: Path, vocab_size: int) -> dict:
    with warnings.catch_warnings():  # megatron-core warns that Apex / Transformer Engine are absent: irrelevant
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    dtype = token_dtype(vocab_size)
    return {s: IndexedDatasetBuilder(str(tmp / f"{s}.bin"), dtype=dtype) for s in SPLITS}


def _tokenize(cfg: PreprocessConfig, reader: Reader, model_bytes: bytes, tmp: Path) -> dict:
    sp = _load_processor(model_bytes)
    builders = _builders(tmp, sp.get_piece_size())
    counts = {"documents": dict.fromkeys(SPLITS, 0), "tokens": dict.fromkeys(SPLITS, 0)}
    workers = cfg.num_workers
    bar = progress(desc="tokenize", unit="doc")
    started = time.time()
    # fork: workers start in milliseconds and share the parent's loaded modules; they touch no torch state.
    with get_context("fork").Pool(workers, initializer=_init_worker, initargs=(model_bytes,)) as pool:
        tasks = ((batch, cfg.val_fraction) for batch in _batches(reader, cfg.documents_per_task))
        for result in _ordered_map(pool, encode_documents, tasks, in_flight=4 * workers):
            for split, (flat, lengths) in result.items():
                _append(builders[split], flat, lengths)
                counts["documents"][split] += len(lengths)
                counts["tokens"][split] += len(flat)
            bar.update(sum(len(lengths) for _, lengths in result.values()))
            bar.set_postfix_str(f"{sum(counts['tokens'].values()) / (time.time() - started):,.0f} tok/s",
                                refresh=False)
    bar.close()
    if reader.stats.documents == 0:
        raise _empty_corpus_error(cfg, reader)
    for split in SPLITS:
        if counts["documents"][split] == 0:
            raise _split_error(cfg, reader, split)
        builders[split].finalize(str(tmp / f"{split}.idx"))
    counts["seconds"] = time.time() - started
    return counts


def _append(builder, flat: np.ndarray, lengths: np.ndarray) -> None:
    """Add documents to a megatron-core builder, one sequence per document (as Megatron-LM's tools write them)."""
    start = 0
    for n in lengths.tolist():
        builder.add_document(flat[start:start + n], [n])
        start += n


# ---------------------------------------------------------------------------------------------------- manifest


def _manifest(cfg, sources, reader, counts, tokenizer_path: Path, trained: bool, fingerprint: str,
              seconds: float) -> dict:
    sp = _load_processor(tokenizer_path.read_bytes())
    stats = reader.stats
    total_tokens = sum(counts["tokens"].values())
    return {
        "format": FORMAT_VERSION,
        "tool": f"cbs {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python_version": platform.python_version(),
        "sources": [{"input": s.spec, "kind": s.kind, "files": len(s.paths),
                     "documents": stats.per_source.get(s.spec, 0)} for s in sources],
        "documents": counts["documents"],
        "tokens": counts["tokens"],
        "vocab_size": sp.get_piece_size(),
        "eod_id": sp.eos_id(),
        "bos_id": sp.bos_id(),
        "unk_id": sp.unk_id(),
        "dtype": np.dtype(token_dtype(sp.get_piece_size())).name,
        "tokenizer": {"file": TOKENIZER, "sha256": sha256_file(tokenizer_path), "trained": trained,
                      "type": cfg.tokenizer.type.value if trained else None,
                      "source": None if trained else str(Path(cfg.tokenizer.model).resolve())},
        "skipped_records": stats.skipped_records,
        "skipped_examples": stats.first_skipped,
        "empty_documents": stats.empty_documents,
        "invalid_utf8_documents": stats.invalid_utf8_documents,
        "settings": to_dict(cfg),
        "fingerprint": fingerprint,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(total_tokens / max(counts["seconds"], 1e-9), 1),
    }
