"""Typed configs of every stage, loaded from YAML plus dotted overrides and validated on load.

Each stage has one dataclass tree. `load_config(cls, path, overrides)` reads the YAML file, applies
`--set a.b=c` overrides (values parsed as YAML scalars), builds the dataclasses with type checks and calls each
section's `validate()`. Every problem is a `ConfigError` naming the full dotted key and how to fix it, e.g.
"preprocess.val_fraction must be in (0, 0.5): got 0.7".

Field documentation is the string literal under each field (OLMo style); the README's tables follow them.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or impossible; the message names the key."""


# ----------------------------------------------------------------------------------------------------------------
# generic loading


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return "a list"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML value to the annotated type `tp`; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if len(args) < len(typing.get_args(tp)):
                return None
            raise ConfigError(f"{key} must not be empty: give {_type_name(args[0])}")
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields: got {value!r}")
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single item where a list is expected: the common YAML shorthand
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list: got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{key} must be {_type_name(tp)}: got {value!r}") from None
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false: got {value!r}")
    if tp is int:
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # 1e9 in YAML is a float; accept it where it is a whole number
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))  # "1e9" and "1_000" as integers
                if number.is_integer():
                    return int(number)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer: got {value!r}")
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "3e-3" (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number: got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string: got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def from_dict(cls: type, data: dict, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping; unknown keys, missing required keys and bad types are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), fields, n=1)
        hint = f"; did you mean {prefix}.{close[0]}?" if close else f"; known keys: {', '.join(fields)}"
        raise ConfigError(f"{prefix}.{k} is not a known key{hint}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key} is required: give it in the YAML file or with --set {name}=...")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-ready data (enums as their values) from a config dataclass tree."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides to a nested mapping; values are parsed as YAML (`x=[1,2]`, `y=null`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p} is not a mapping")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, not {type(data).__name__}")
    return data


def load_config(cls: type, path: str | os.PathLike | None, overrides: list[str] = (), prefix: str = "") -> Any:
    """YAML file (optional) + dotted overrides -> validated config of class `cls`."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides))
    return from_dict(cls, data, prefix or cls.section)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# ----------------------------------------------------------------------------------------------------------------
# preprocess


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
