"""`preprocess` config: raw corpus -> SentencePiece tokenizer -> Megatron shards."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Optional

from cbs.pipeline.config.loader import _check


class TokenizerType(str, enum.Enum):
    bpe = "bpe"
    unigram = "unigram"


class OnError(str, enum.Enum):
    fail = "fail"
    """Stop at the first bad record with a message naming file and line; nothing is written."""
    skip = "skip"
    """Skip bad records (unparseable JSON line, record without the text field) and count them in the manifest."""


@dataclass
class TokenizerConfig:
    model: Optional[str] = None
    """Path of an existing SentencePiece model to use as is; when set, vocab_size and type are ignored."""
    vocab_size: int = 8192
    """Pieces of the tokenizer to train (including byte-fallback and control pieces)."""
    type: TokenizerType = TokenizerType.bpe
    """SentencePiece algorithm: bpe | unigram."""
    sample_sentences: int = 1_000_000
    """At most this many text chunks (uniformly sampled by SentencePiece) train the tokenizer: bounds its time."""
    chunk_chars: int = 2000
    """Documents are cut at line ends into chunks of about this many characters for training (SentencePiece
    drops training sentences longer than 4192 bytes)."""
    split_digits: bool = True
    """Split numbers into single digits (as LLaMA's tokenizer does)."""

    def validate(self, p: str) -> None:
        if self.model is None:
            _check(self.vocab_size >= 260, f"{p}.vocab_size must be >= 260 (256 byte pieces + control): "
                                           f"got {self.vocab_size}")
            _check(self.vocab_size <= 1_000_000, f"{p}.vocab_size must be <= 1000000: got {self.vocab_size}")
        _check(self.sample_sentences >= 1000, f"{p}.sample_sentences must be >= 1000: got {self.sample_sentences}")
        _check(100 <= self.chunk_chars <= 4000, f"{p}.chunk_chars must be in [100, 4000]: got {self.chunk_chars}")


@dataclass
class PreprocessConfig:
    """`cbs preprocess`: raw corpus -> SentencePiece tokenizer -> Megatron .bin/.idx shards + manifest.json."""

    section = "preprocess"

    inputs: list[str]
    """Sources, each one of: a file path or glob of .txt (one document per file), .jsonl / .jsonl.gz (one
    document per line) or .parquet files; `hf:NAME[:CONFIG][:SPLIT]` (a Hugging Face dataset, streamed);
    a directory written by `datasets.save_to_disk`; or the word `stdlib` (the embedded default corpus)."""
    output_dir: str
    """Directory that receives tokenizer.model, train/val .bin/.idx and manifest.json (written atomically)."""
    text_field: str = "text"
    """Field that holds the document text in jsonl / parquet / datasets records."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Train a tokenizer (vocab_size, type) or use an existing one (model)."""
    val_fraction: float = 0.01
    """Share of documents that go to the validation split, chosen by a stable hash of each document's text."""
    workers: Optional[int] = None
    """Tokenizer processes; default: all cores available to this process."""
    on_error: OnError = OnError.fail
    """fail | skip: what a bad record does."""
    max_documents: Optional[int] = None
    """Read at most this many documents (in input order); default: all."""
    documents_per_task: int = 64
    """Documents sent to a worker at a time; larger amortises overhead, smaller balances load."""

    def validate(self, p: str) -> None:
        _check(len(self.inputs) > 0, f"{p}.inputs must list at least one source (a path, glob, hf:NAME or stdlib)")
        _check(bool(self.output_dir), f"{p}.output_dir must be a directory path")
        _check(0.0 < self.val_fraction < 0.5, f"{p}.val_fraction must be in (0, 0.5): got {self.val_fraction}")
        _check(self.workers is None or self.workers >= 1, f"{p}.workers must be >= 1: got {self.workers}")
        _check(self.max_documents is None or self.max_documents >= 2,
               f"{p}.max_documents must be >= 2 (one train and one val document): got {self.max_documents}")
        _check(self.documents_per_task >= 1, f"{p}.documents_per_task must be >= 1: got {self.documents_per_task}")
        _check(bool(self.text_field), f"{p}.text_field must be a field name")

    @property
    def num_workers(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))
