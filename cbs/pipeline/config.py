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
import math
import os
import types
import typing
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Optional

import yaml

from cbs.analysis import parse_count
from cbs.analysis.batch_schedule import BatchSchedule


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
        if hasattr(tp, "expand"):  # e.g. a model preset name
            value = tp.expand(value, key)
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
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping: got {value!r}")
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
                number = parse_count(value)  # "1e9", "1_000" and "300K" (as cbs names budgets) as integers
                if number == number.to_integral_value():
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


def parse_tokens(value: Any, key: str, minimum: int = 1) -> int:
    """A token count from YAML or the command line, the one reader of every token count a config holds:
    an integer, a whole float (YAML reads 1e9 as one), or text with the suffixes cbs prints in names (300K,
    1.5M, 10B, 2T; cbs.analysis.parse_count). ConfigError naming `key` and the fix for anything else: text that is
    no count, NaN, infinity, a fraction of a token, a boolean, or a count below `minimum`."""
    fix = "write a whole number of tokens, e.g. 300000, 3e5 or 300K"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key} must be a token count: got {value!r}; {fix}")
    try:
        count = parse_count(value) if isinstance(value, str) else Decimal(value)
    except (ValueError, InvalidOperation):
        raise ConfigError(f"{key} must be a token count: got {value!r}; {fix}") from None
    if not count.is_finite() or count != count.to_integral_value() or count < minimum:
        raise ConfigError(f"{key} must be a whole number of tokens >= {minimum}: got {value!r}; {fix}")
    return int(count)


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
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                whole = ".".join(parts[:i + 1])
                raise ConfigError(f"override {item!r}: {whole} is not a mapping (it is {child!r}); set it whole: "
                                  f"--set {whole}=VALUE")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"{self.name}:{key_node.start_mark.line + 1}: {key} is given twice in one "
                                  f"mapping: keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML config file as a mapping; every problem is a ConfigError naming the file (and line) and the fix."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory: give the path of a YAML file")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}; check the path") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    loader = None
    try:
        loader = _UniqueKeyLoader(text)  # its reader refuses control characters (a NUL byte) here already
        loader.name = str(path)
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        started = (f"{e.context} that starts at line {e.context_mark.line + 1}: "
                   if e.context and e.context_mark and e.problem_mark else "")
        raise ConfigError(f"{where}: not valid YAML ({started}{e.problem or e.context}): fix the YAML "
                          f"there") from None
    except yaml.reader.ReaderError as e:  # a control character: no mark, only an offset into the text
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        raise ConfigError(f"{path}:{line}:{column}: not valid YAML (control character {chr(e.character)!r} is not "
                          f"allowed): remove it") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]}): fix the YAML") from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, not a {type(data).__name__}: write one "
                          f"`key: value` per line")
    return data


def _expand_shorthands(cls: type, data: dict) -> dict:
    """A scalar where a section with a shorthand (an `expand` hook) is expected stands for the section's first
    field: `model: tiny` -> `model: {preset: tiny}`. Done before overrides, so `--set model.seq_len=64` refines
    a shorthand instead of failing on it."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, value = hints[f.name], data.get(f.name)
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
        if not dataclasses.is_dataclass(tp) or value is None:
            continue
        if hasattr(tp, "expand") and isinstance(value, str):
            value = data[f.name] = {dataclasses.fields(tp)[0].name: value}
        if isinstance(value, dict):
            _expand_shorthands(tp, value)
    return data


def load_config(cls: type, path: str | os.PathLike | None, overrides: list[str] = (), prefix: str = "") -> Any:
    """YAML file (optional) + dotted overrides -> validated config of class `cls`."""
    prefix = prefix or cls.section
    data = _expand_shorthands(cls, read_yaml(path) if path is not None else {})
    apply_overrides(data, list(overrides))
    return from_dict(cls, data, prefix)


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


# ----------------------------------------------------------------------------------------------------------------
# pretrain


class PositionEmbedding(str, enum.Enum):
    rope = "rope"
    learned = "learned"


class Activation(str, enum.Enum):
    gelu = "gelu"
    swiglu = "swiglu"


class Norm(str, enum.Enum):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


# The paper's GPT sizes (non-embedding params N = 12 L d^2; docs/method.md) and small ones for CPU runs and tests.
# Paper recipe: RoPE, QK-layernorm, GELU MLP 4d, no biases, untied embeddings, context 512.
_PAPER = dict(seq_len=512, position_embedding="rope", qk_layernorm=True, activation="gelu", norm="layernorm",
              bias=False, tied_embeddings=False)
MODEL_PRESETS: dict[str, dict] = {
    "85M": dict(layers=12, hidden=768, heads=12, **_PAPER),
    "151M": dict(layers=12, hidden=1024, heads=16, **_PAPER),
    "302M": dict(layers=24, hidden=1024, heads=16, **_PAPER),
    "604M": dict(layers=12, hidden=2048, heads=16, **_PAPER),
    "1.2B": dict(layers=24, hidden=2048, heads=32, **_PAPER),
    # GPT-2 small shape, the throughput anchor of docs/method.md
    "gpt2-small": dict(layers=12, hidden=768, heads=12, seq_len=1024, position_embedding="learned",
                       qk_layernorm=False, activation="gelu", norm="layernorm", bias=True, tied_embeddings=True),
    # CPU scale: the probe model of docs/method.md (2 layers, d 128, seq 128) and a 4-layer one
    "tiny": dict(layers=2, hidden=128, heads=4, **{**_PAPER, "seq_len": 128}),
    "cpu-small": dict(layers=4, hidden=256, heads=4, **{**_PAPER, "seq_len": 256}),
}


@dataclass
class ModelConfig:
    """A GPT built from megatron-core layers. `preset` fills every field not given explicitly."""

    preset: Optional[str] = None
    """One of MODEL_PRESETS (85M 151M 302M 604M 1.2B gpt2-small tiny cpu-small); explicit fields override it.
    In YAML `model: 85M` is short for `model: {preset: 85M}`."""
    layers: int = 2
    """Transformer layers L."""
    hidden: int = 128
    """Model width d."""
    heads: int = 4
    """Attention heads; hidden must divide by it."""
    kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention; default: heads (plain multi-head attention)."""
    ffn_hidden: Optional[int] = None
    """MLP width; default 4 d for gelu, and 8/3 d rounded up to a multiple of 64 for swiglu (same parameters)."""
    seq_len: int = 128
    """Context length T in tokens: every training sequence has exactly this many."""
    position_embedding: PositionEmbedding = PositionEmbedding.rope
    """rope | learned."""
    rope_base: float = 10000.0
    """RoPE base frequency."""
    qk_layernorm: bool = True
    """Normalise queries and keys per head before attention (stabilises large learning rates)."""
    activation: Activation = Activation.gelu
    """gelu | swiglu."""
    norm: Norm = Norm.layernorm
    """layernorm | rmsnorm."""
    bias: bool = False
    """Biases in linear layers."""
    tied_embeddings: bool = False
    """Share the input embedding with the output layer."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init (output projections scaled by 1/sqrt(2L), as Megatron)."""

    @classmethod
    def expand(cls, data: Any, key: str) -> Any:
        """`model: NAME` or `model: {preset: NAME, ...}` -> the preset's fields, overridden by those given."""
        if isinstance(data, str):
            data = {"preset": data}
        if not isinstance(data, dict):
            raise ConfigError(f"{key} must be a preset name ({', '.join(MODEL_PRESETS)}) or a mapping of model "
                              f"fields: got {data!r}")
        if data.get("preset") is not None:
            name = str(data["preset"])
            if name not in MODEL_PRESETS:
                raise ConfigError(f"{key}.preset must be one of {', '.join(MODEL_PRESETS)}: got {name!r}")
            data = {**MODEL_PRESETS[name], **data}
        return data

    def validate(self, p: str) -> None:
        for name in ("layers", "hidden", "heads", "seq_len"):
            _check(getattr(self, name) >= 1, f"{p}.{name} must be >= 1: got {getattr(self, name)}")
        _check(self.hidden % self.heads == 0,
               f"{p}.hidden ({self.hidden}) must be divisible by {p}.heads ({self.heads})")
        kv = self.kv_heads or self.heads
        _check(kv >= 1 and self.heads % kv == 0, f"{p}.kv_heads ({kv}) must divide {p}.heads ({self.heads})")
        _check(self.ffn_hidden is None or self.ffn_hidden >= 1, f"{p}.ffn_hidden must be >= 1: got {self.ffn_hidden}")
        _check(self.init_std > 0, f"{p}.init_std must be > 0: got {self.init_std}")
        if self.position_embedding is PositionEmbedding.rope:
            _check((self.hidden // self.heads) % 2 == 0,
                   f"{p}: rope needs an even head size (hidden/heads = {self.hidden // self.heads})")

    @property
    def ffn(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.activation is Activation.swiglu:
            return -(-8 * self.hidden // 3 // 64) * 64
        return 4 * self.hidden

    @property
    def non_embedding_params(self) -> int:
        """N = 12 L d^2: the paper's (and Kaplan's) count of attention + MLP weights, without embeddings."""
        return 12 * self.layers * self.hidden**2


class ScheduleKind(str, enum.Enum):
    constant = "constant"
    cosine = "cosine"
    wsd = "wsd"


@dataclass
class OptimizerConfig:
    lr: float = 3.16e-3
    """Peak learning rate (the paper's ~3.16e-3)."""
    beta1: float = 0.95
    beta2: float = 0.99
    """AdamW beta2; the paper tunes it per batch size (docs/method.md table), studies fill it in."""
    eps: float = 1e-8
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices only (never norms, biases or embeddings)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""

    def validate(self, p: str) -> None:
        for name in ("lr", "eps", "weight_decay", "grad_clip"):  # .inf passes `> 0` and trains NaN weights
            _check(math.isfinite(getattr(self, name)), f"{p}.{name} must be a finite number: got "
                                                        f"{getattr(self, name)}")
        _check(self.lr > 0, f"{p}.lr must be > 0: got {self.lr}")
        for name in ("beta1", "beta2"):
            _check(0 <= getattr(self, name) < 1, f"{p}.{name} must be in [0, 1): got {getattr(self, name)}")
        _check(self.eps > 0, f"{p}.eps must be > 0: got {self.eps}")
        _check(self.weight_decay >= 0, f"{p}.weight_decay must be >= 0: got {self.weight_decay}")
        _check(self.grad_clip >= 0, f"{p}.grad_clip must be >= 0 (0 disables): got {self.grad_clip}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, defined in tokens so that runs at different batch sizes share it."""

    kind: ScheduleKind = ScheduleKind.constant
    """constant | cosine | wsd (warmup-stable-decay)."""
    warmup_tokens: int = 0
    """Linear warmup from warmup_start_factor x lr to lr over this many tokens."""
    warmup_start_factor: float = 0.1
    """LR at token 0, as a fraction of the peak (the paper starts at 0.1 lr)."""
    final_lr_factor: float = 0.0
    """cosine and wsd end at this fraction of the peak LR, at train_tokens."""
    decay_fraction: float = 0.2
    """wsd: the decay takes the last decay_fraction of train_tokens (linear to final_lr_factor)."""

    def validate(self, p: str) -> None:
        _check(self.warmup_tokens >= 0, f"{p}.warmup_tokens must be >= 0: got {self.warmup_tokens}")
        _check(0 <= self.warmup_start_factor <= 1,
               f"{p}.warmup_start_factor must be in [0, 1]: got {self.warmup_start_factor}")
        _check(0 <= self.final_lr_factor <= 1, f"{p}.final_lr_factor must be in [0, 1]: got {self.final_lr_factor}")
        _check(0 < self.decay_fraction <= 1, f"{p}.decay_fraction must be in (0, 1]: got {self.decay_fraction}")


@dataclass
class EwaConfig:
    taus: list[float] = field(default_factory=list)
    """Decays of the exponential weight averages kept at once (w <- tau w + (1 - tau) theta each step); empty
    disables EWA. The paper uses 0.99-0.9995 depending on the batch size."""

    def validate(self, p: str) -> None:
        for i, tau in enumerate(self.taus):
            _check(0 < tau < 1, f"{p}.taus[{i}] must be in (0, 1): got {tau}")
        _check(len(set(self.taus)) == len(self.taus), f"{p}.taus has duplicates: {self.taus}")


@dataclass
class EvalConfig:
    every_steps: int = 100
    """Evaluate every this many steps (plus step 1, the geometric grid, and the last step)."""
    growth: float = 1.1
    """Also evaluate on the geometric grid of steps 1, g, g^2, ... so that steps-to-target is resolved to about
    (growth - 1) at every scale; 0 disables the grid."""
    eval_tokens: int = 65536
    """Tokens of validation data evaluated each time (a fixed set of sequences: the first ones of val)."""
    micro_batch_seqs: Optional[int] = None
    """Sequences per eval forward pass; default: the training micro-batch."""
    at_tokens: list[int] = field(default_factory=list)
    """Also evaluate at the first step that has seen at least each of these token counts (a study measures its
    reference run's loss at every data budget this way)."""

    def validate(self, p: str) -> None:
        _check(self.every_steps >= 1, f"{p}.every_steps must be >= 1: got {self.every_steps}")
        _check(all(t >= 1 for t in self.at_tokens), f"{p}.at_tokens must be >= 1: got {self.at_tokens}")
        _check(self.growth == 0 or self.growth > 1, f"{p}.growth must be > 1 (or 0 to disable): got {self.growth}")
        _check(self.eval_tokens >= 1, f"{p}.eval_tokens must be >= 1: got {self.eval_tokens}")


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    """Save every this many steps (and at the end); 0 saves only at the end."""
    keep: int = 2
    """Keep the newest this many checkpoints (older are deleted after a save succeeds)."""
    at_tokens: list[int] = field(default_factory=list)
    """Also save at the first step that has seen at least each of these token counts, and keep those
    checkpoints whatever `keep` says (a branched study starts its branches from them)."""

    def validate(self, p: str) -> None:
        _check(self.every_steps >= 0, f"{p}.every_steps must be >= 0: got {self.every_steps}")
        _check(self.keep >= 1, f"{p}.keep must be >= 1: got {self.keep}")
        _check(all(t >= 1 for t in self.at_tokens), f"{p}.at_tokens must be >= 1: got {self.at_tokens}")


@dataclass
class InitFrom:
    """A checkpoint of another run to start from (a branch of it)."""

    run_dir: str
    """The run directory holding the checkpoint."""
    step: int
    """Its step: a complete checkpoint must exist there."""

    def validate(self, p: str) -> None:
        _check(self.step >= 1, f"{p}.step must be >= 1: got {self.step}")


class StopWeights(str, enum.Enum):
    any = "any"
    raw = "raw"
    ewa = "ewa"


class Precision(str, enum.Enum):
    auto = "auto"
    """bf16 on a GPU, fp32 on the CPU."""
    bf16 = "bf16"
    """bf16 weights and activations with fp32 master weights and optimizer state (DeepSpeed's bf16 mode); runs on
    DeepSpeed's CPU accelerator too, so the GPU's precision path can be tested without a GPU."""
    fp32 = "fp32"


class Resume(str, enum.Enum):
    auto = "auto"
    """Continue from the newest checkpoint in run_dir if there is one, else start."""
    never = "never"
    """Start afresh; refuse a run_dir that already holds checkpoints."""


class WandbMode(str, enum.Enum):
    online = "online"
    offline = "offline"
    """Written under RUN_DIR/wandb/ only; upload later with `wandb sync RUN_DIR/wandb/offline-run-*`."""
    disabled = "disabled"


@dataclass
class WandbConfig:
    """Weights & Biases logging beside metrics.jsonl and TensorBoard (cbs/pipeline/metrics.py), rank 0 only. Needs the
    optional package: `pip install -e '.[wandb]'`."""

    project: str
    """The W&B project."""
    entity: Optional[str] = None
    """The W&B team or user; default: your default entity."""
    group: Optional[str] = None
    """Default: the study's name, so that a study's runs group together (standalone runs: no group)."""
    mode: Optional[WandbMode] = None
    """online | offline | disabled; default: the WANDB_MODE environment variable, else online."""

    def validate(self, p: str) -> None:
        import importlib.util

        _check(bool(self.project), f"{p}.project must name a W&B project")
        _check(importlib.util.find_spec("wandb") is not None,
               f"{p} is set but the wandb package is not installed: `pip install -e '.[wandb]'`, or remove {p}")


@dataclass
class LogConfig:
    every_steps: int = 10
    """Train metrics (loss, lr, grad norm, tokens/s) every this many steps."""
    tensorboard: bool = True
    """TB scalars in RUN_DIR/tb (per step), loss against tokens in RUN_DIR/tb/by_tokens, hyper-parameters."""
    wandb: Optional[WandbConfig] = None
    """Also log to Weights & Biases (project, group = the study's name, run name = the run directory's name,
    config = the hyper-parameters); off by default."""

    def validate(self, p: str) -> None:
        _check(self.every_steps >= 1, f"{p}.every_steps must be >= 1: got {self.every_steps}")


@dataclass
class PretrainConfig:
    """`cbs pretrain`: train one GPT run and write the run-directory contract of docs/architecture.md."""

    section = "pretrain"

    data_dir: str
    """A directory made by `cbs preprocess` (manifest.json, train/val shards, tokenizer)."""
    run_dir: str
    """Where config.yaml, metrics.jsonl, tb/, checkpoints/ and result.json go."""
    train_tokens: int
    """Token budget: the run stops after ceil(train_tokens / tokens per step) steps."""
    global_batch_seqs: Optional[int] = None
    """The global batch in sequences: the independent variable of every study. Tokens per step =
    global_batch_seqs x model.seq_len. Gradient accumulation = global / (micro x data-parallel size). Give this or
    batch_schedule."""
    batch_schedule: Optional[BatchScheduleConfig] = None
    """A batch that grows with the tokens seen, instead of global_batch_seqs: a list of stages {batch,
    until_tokens}, or the path of a file `cbs forecast --ramp --out FILE` wrote (docs/method.md, "Batch ramp")."""
    micro_batch_seqs: Optional[int] = None
    """Sequences per forward/backward pass on each rank; default min(the first global batch, 8)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ewa: EwaConfig = field(default_factory=EwaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    targets: list[float] = field(default_factory=list)
    """Target eval losses: result.json records the first step and tokens at which each is reached."""
    stop_at_targets: bool = False
    """End the run once every target is reached by some weights (see stop_weights): saves compute in sweeps."""
    stop_weights: StopWeights = StopWeights.any
    """Which weights count for stop_at_targets: any (raw or an EWA), raw, or ewa (any EWA tau). A study sets ewa
    so that runs stop on the weights its fit reads."""
    deepspeed_config: str = "ds_configs/zero1.json"
    """ZeRO settings (a file in ds_configs/); batch, clipping and precision fields are written from this config."""
    precision: Precision = Precision.auto
    """auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32. EWA averages and the eval loss are fp32 either way."""
    compile: bool = False
    """torch.compile the model inside the DeepSpeed engine (`engine.compile()`, inductor): the forward and backward
    run as compiled kernels instead of op-by-op Python. Costs a compile at start (tens of seconds; cached across
    runs) and float-rounding-level differences from eager; off by default (docs/method.md, "Throughput and MFU")."""
    seed: int = 1234
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: Resume = Resume.auto
    log: LogConfig = field(default_factory=LogConfig)
    divergence_factor: float = 3.0
    """The run is `diverged` when the train loss is NaN/inf or exceeds this many times its first value."""
    init_from: Optional[InitFrom] = None
    """Start from another run's checkpoint: its weights and optimizer state (it must have the same model and
    number of ranks), continuing its data stream where it stopped; this run counts its own steps and tokens
    from 0 and starts its EWA afresh. A branched study sets it."""
    study: Optional[dict] = None
    """Written by `cbs study`: the settings (model, data budget, target) this run serves; passed through."""

    def validate(self, p: str) -> None:
        _check((self.global_batch_seqs is None) != (self.batch_schedule is None),
               f"{p}: give exactly one of global_batch_seqs (a fixed batch) and batch_schedule (a batch ramp)")
        _check(self.global_batch_seqs is None or self.global_batch_seqs >= 1,
               f"{p}.global_batch_seqs must be >= 1: got {self.global_batch_seqs}")
        if self.batch_schedule is not None:
            self.batch_schedule.check_budget(f"{p}.batch_schedule", self.train_tokens)
        _check(self.micro_batch_seqs is None or self.micro_batch_seqs >= 1,
               f"{p}.micro_batch_seqs must be >= 1: got {self.micro_batch_seqs}")
        _check(self.train_tokens >= 1, f"{p}.train_tokens must be >= 1: got {self.train_tokens}")
        if self.batch_schedule is not None:  # its stage boundaries are checked by check_budget, its first batch here
            first = self.batch_schedule.all_batches[0]
            _check(first * self.model.seq_len <= self.train_tokens,
                   f"{p}.batch_schedule's first batch {first} x model.seq_len {self.model.seq_len} = "
                   f"{first * self.model.seq_len:,} tokens per step is more than {p}.train_tokens "
                   f"({self.train_tokens:,}): one step would train past the budget; lower the first batch or raise "
                   f"train_tokens")
        else:
            _check(self.tokens_per_step <= self.train_tokens,
                   f"{p}.global_batch_seqs {self.global_batch_seqs} x model.seq_len {self.model.seq_len} = "
                   f"{self.tokens_per_step:,} tokens per step is more than {p}.train_tokens "
                   f"({self.train_tokens:,}): one step would train past the budget; lower global_batch_seqs to at "
                   f"most {max(self.train_tokens // self.model.seq_len, 1)} or raise train_tokens")
        for i, t in enumerate(self.targets):
            _check(t > 0, f"{p}.targets[{i}] must be a loss > 0: got {t}")
        _check(not self.stop_at_targets or self.targets, f"{p}.stop_at_targets needs {p}.targets")
        _check(self.stop_weights is not StopWeights.ewa or self.ewa.taus,
               f"{p}.stop_weights is ewa but {p}.ewa.taus is empty: give taus or stop_weights any")
        _check(self.divergence_factor > 1, f"{p}.divergence_factor must be > 1: got {self.divergence_factor}")

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_seqs or min(self.batches.first_batch, 8)

    @property
    def batches(self) -> BatchSchedule:
        """The batch of every step (one stage for a fixed batch): cbs/analysis/batch_schedule.py's arithmetic."""
        if self.batch_schedule is None:
            return BatchSchedule.fixed(self.global_batch_seqs, self.model.seq_len)
        return BatchSchedule(self.batch_schedule.parsed(), self.model.seq_len)

    @property
    def tokens_per_step(self) -> int:
        """Of a fixed batch (a ramp has one per stage: see `batches`)."""
        if self.batch_schedule is not None:
            raise ValueError("a batch schedule has no single tokens per step; use cfg.batches")
        return self.global_batch_seqs * self.model.seq_len

    @property
    def total_steps(self) -> int:
        return self.batches.total_steps(self.train_tokens)


def steps_for(tokens: int, tokens_per_step: int) -> int:
    """The first step that has seen at least `tokens` tokens: ceil(tokens / tokens_per_step)."""
    return -(-tokens // tokens_per_step)


def gradient_accumulation(global_batch_seqs: int, micro_batch_seqs: int, data_parallel: int,
                          key: str = "global_batch_seqs") -> int:
    """global = micro x data-parallel x accumulation, exactly; anything else is refused before a run starts."""
    per_step = micro_batch_seqs * data_parallel
    if global_batch_seqs % per_step:
        raise ConfigError(
            f"{key} ({global_batch_seqs}) must be divisible by micro_batch_seqs ({micro_batch_seqs}) x "
            f"data-parallel size ({data_parallel}) = {per_step}; change one of the three")
    return global_batch_seqs // per_step


# ----------------------------------------------------------------------------------------------------------------
# study

# The paper's near-optimal per-batch settings (docs/method.md; B in sequences); batches between or beyond the table
# take the nearest entry in log space.
PAPER_BETA2 = {64: .999, 128: .999, 256: .995, 512: .99, 1024: .99, 2048: .95, 4096: .95, 8192: .95, 16384: .95}
PAPER_TAU = {64: .9995, 128: .9995, 256: .9995, 512: .9995, 1024: .999, 2048: .998, 4096: .995, 8192: .99,
             16384: .99}


def paper_value(table: dict[int, float], batch: int) -> float:
    import math

    return table[min(table, key=lambda b: abs(math.log(b) - math.log(batch)))]


# Pretrain keys a study decides for each run, and where to set them instead; `base` may not hold them.
STUDY_SETS = {
    "data_dir": "from study.data", "run_dir": "STUDY_DIR/runs/<run>", "global_batch_seqs": "from batch_sizes",
    "train_tokens": "from settings and max_tokens_factor", "model": "from settings", "targets": "from targets",
    "study": "written by the study", "seed": "from seeds", "optimizer.lr": "from hparams.lr",
    "optimizer.beta2": "from hparams.beta2", "ewa.taus": "from hparams.ewa_taus",
    "stop_at_targets": "on for every run but the reference ones", "stop_weights": "ewa, the weights the fit reads",
    "batch_schedule": "from study.ramp (method: ramp)",
}


@dataclass
class HparamGrid:
    """Hyper-parameters tried at every batch size; steps-to-target is the minimum over them."""

    lr: list[float] = field(default_factory=lambda: [3.16e-3])
    """Peak learning rates."""
    beta2: Optional[list[float]] = None
    """AdamW beta2 values; default: the paper's per-batch value (docs/method.md table)."""
    ewa_taus: Optional[list[float]] = None
    """EWA decays kept at once in every run (the best is used); default: the paper's per-batch tau. Short CPU
    runs want smaller taus (0.98-0.995) than the paper's long runs (0.99-0.9995)."""

    def validate(self, p: str) -> None:
        _check(bool(self.lr) and all(x > 0 for x in self.lr), f"{p}.lr must list learning rates > 0: {self.lr}")
        _check(self.beta2 is None or all(0 <= b < 1 for b in self.beta2), f"{p}.beta2 must be in [0, 1)")
        _check(self.ewa_taus is None or all(0 < t < 1 for t in self.ewa_taus), f"{p}.ewa_taus must be in (0, 1)")


@dataclass
class ReferenceTargets:
    batch: Optional[int] = None
    """B0: the reference batch whose runs go first; a setting's target is their best EWA eval loss after the
    setting's budget of tokens. Default: the smallest of batch_sizes."""


@dataclass
class StudyTargets:
    reference: Optional[ReferenceTargets] = None
    """The paper's method (the default when losses is not given)."""
    losses: Optional[dict] = None
    """Explicit target loss per setting name (every setting needs one); no reference phase."""

    def validate(self, p: str) -> None:
        _check(not (self.reference and self.losses), f"{p}: give either reference or losses, not both")
        for name, loss in (self.losses or {}).items():
            _check(isinstance(loss, (int, float)) and loss > 0, f"{p}.losses.{name} must be a loss > 0: got {loss}")


class StudyMethod(str, enum.Enum):
    sweep = "sweep"
    """The paper's: a full run per batch size, steps-to-target fitted over them (docs/method.md)."""
    branched = "branched"
    """Merrill et al. 2025: short branches at k x B from checkpoints of one base run give CBS(t) along training
    (docs/method.md, "Branched local CBS")."""
    ramp = "ramp"
    """A batch ramp (study.ramp) beside the fixed batches it is compared with, its first and its largest, all to
    the same target: steps, tokens and wall-clock to the target, the saving predicted against the one measured."""


class BranchRule(str, enum.Enum):
    absolute = "absolute"
    """Merrill et al. 2025: the largest batch whose loss is within epsilon_nats (plus an allowance for eval noise)
    of every smaller batch's (docs/method.md, "Branched local CBS")."""
    relative = "relative"
    """A chain: each batch within (1 + tolerance) of the best smaller one, up to the first that is not."""


class LrScaling(str, enum.Enum):
    sqrt = "sqrt"
    """LR x sqrt(k) at k times the batch: the rule for Adam."""
    linear = "linear"
    """LR x k (SGD's rule)."""
    none = "none"


ADAPTIVE_SIGNALS = ("noise_scale",)


class Beta2Rule(str, enum.Enum):
    paper = "paper"
    """Each stage's beta2 is the paper's for its batch (PAPER_BETA2), as a study's runs without hparams.beta2."""
    fixed = "fixed"
    """optimizer.beta2 at every stage."""


@dataclass
class BatchScheduleConfig:
    """`pretrain.batch_schedule`: the global batch grows with the tokens seen (cbs/analysis/batch_schedule.py). In YAML
    a list is short for `{stages: LIST}` and a string for `{file: PATH}`."""

    file: Optional[str] = None
    """A batch schedule file written by `cbs forecast --ramp --out FILE`."""
    stages: Optional[list[Any]] = None
    """Stages {batch: B, until_tokens: T}: batch B while fewer than T tokens were seen; the last stage has no
    until_tokens (it runs to the budget). Batches never decrease."""
    lr_scaling: LrScaling = LrScaling.sqrt
    """How a stage at k times the first stage's batch scales optimizer.lr: sqrt (Adam), linear, none."""
    beta2: Beta2Rule = Beta2Rule.paper
    """paper (each stage's beta2 from the paper's per-batch table, the study's rule) | fixed (optimizer.beta2)."""
    adaptive: Optional[str] = None
    """noise_scale: instead of stages, raise the batch along `ladder` during training, at a log step where
    noise_factor x the logged B_simple (train/noise_scale) reaches a higher rung (the highest such rung; never
    down). The decisions are logged (`batch_decision`) and kept in checkpoints."""
    ladder: Optional[list[int]] = None
    """adaptive: the batches it may take, increasing; it starts at the first."""
    noise_factor: float = 1.0
    """adaptive: the multiple of B_simple compared with the ladder (B_simple estimates the critical batch up to
    a factor; McCandlish et al. 2018)."""

    @classmethod
    def expand(cls, data: Any, key: str) -> Any:
        if isinstance(data, list):
            return {"stages": data}
        return {"file": data} if isinstance(data, str) else data

    def validate(self, p: str) -> None:
        given = [k for k in ("file", "stages", "adaptive") if getattr(self, k) is not None]
        _check(len(given) == 1, f"{p}: give exactly one of file (a `cbs forecast --ramp --out` file), stages and "
                                f"adaptive: got {', '.join(given) or 'none'}")
        if self.adaptive is not None:
            _check(self.adaptive in ADAPTIVE_SIGNALS, f"{p}.adaptive must be one of {', '.join(ADAPTIVE_SIGNALS)}: "
                                                      f"got {self.adaptive!r}")
            ladder = self.ladder or []
            _check(len(ladder) >= 2 and all(b >= 1 for b in ladder) and ladder == sorted(set(ladder)),
                   f"{p}.ladder must list >= 2 increasing batches (the first is where training starts): got "
                   f"{self.ladder}")
            _check(self.noise_factor > 0, f"{p}.noise_factor must be > 0: got {self.noise_factor}")
        else:
            _check(self.ladder is None, f"{p}.ladder goes with adaptive: noise_scale")
        self.parsed(p)

    @property
    def all_batches(self) -> list[int]:
        """Every batch the run may train at (each must split into micro-batches on every rank)."""
        return list(self.ladder) if self.adaptive else [s.batch for s in self.parsed()]

    def parsed(self, p: str = "pretrain.batch_schedule", train_tokens: Optional[int] = None) -> list:
        """The stages, read (from the file) and checked; ConfigError naming the key."""
        from cbs.analysis.batch_schedule import ScheduleError, Stage, parse_stages, read_schedule_file

        if self.adaptive is not None:  # it starts at the ladder's first rung; the run decides the rest
            return [Stage(self.ladder[0])]
        try:
            if self.file is None:
                return parse_stages(self.stages, train_tokens)
            # read once per config: `batches` (the micro-batch default, every step's stage) asks often
            if getattr(self, "_file_stages", None) is None:
                self._file_stages = read_schedule_file(self.file)
            return parse_stages(self._file_stages, train_tokens)
        except ScheduleError as e:
            # every message starts with its key (stages[1].batch ...): prefixed, it names the full key
            raise ConfigError(f"{p}.file ({self.file}): {e}" if self.file is not None else f"{p}.{e}") from None

    def check_budget(self, p: str, train_tokens: int) -> None:
        self.parsed(p, train_tokens)

    def lr_factor(self, batch: int, first_batch: int) -> float:
        """LR multiplier of a stage at `batch`: (b / b0)^(1/2) for sqrt, b / b0 for linear, 1 for none."""
        k = batch / first_batch
        return {LrScaling.sqrt: k ** 0.5, LrScaling.linear: k, LrScaling.none: 1.0}[self.lr_scaling]

    def beta2_at(self, batch: int, fixed: float) -> float:
        return paper_value(PAPER_BETA2, batch) if self.beta2 is Beta2Rule.paper else fixed


@dataclass
class BranchedConfig:
    """Settings of `method: branched`. Each setting gets one base run at `batch_sizes`' smallest batch B,
    trained to the setting's budget D and checkpointed at every branch point t; from each, one branch per batch
    b of `batch_sizes` (k = b / B, B itself included) trains `branch_tokens` more tokens."""

    at_fractions: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])
    """Branch points t as fractions of each setting's budget D (after the warmup: t >= warmup_tokens)."""
    branch_tokens: Optional[int] = None
    """Tokens each branch trains (Delta); default: 10% of the setting's budget."""
    lr_scaling: LrScaling = LrScaling.sqrt
    """How a branch at k x B scales the base LR: sqrt (Adam), linear, none."""
    rule: BranchRule = BranchRule.absolute
    """How `cbs fit` turns a branch point's losses into the local CBS: absolute (Merrill et al.) or relative."""
    epsilon_nats: float = 0.01
    """absolute rule: a batch passes when its loss is within this many nats (plus the eval-noise allowance) of
    every smaller batch's."""
    tolerance: float = 0.01
    """relative rule: a batch passes when the smaller ones did and its loss is within this relative tolerance of
    the best loss of the branches at smaller batches."""

    def validate(self, p: str) -> None:
        _check(bool(self.at_fractions) and all(0 < f <= 1 for f in self.at_fractions),
               f"{p}.at_fractions must list fractions of the budget in (0, 1]: got {self.at_fractions}")
        _check(len(set(self.at_fractions)) == len(self.at_fractions), f"{p}.at_fractions has duplicates")
        _check(self.branch_tokens is None or self.branch_tokens >= 1,
               f"{p}.branch_tokens must be >= 1: got {self.branch_tokens}")
        _check(0 < self.tolerance < 1, f"{p}.tolerance must be in (0, 1): got {self.tolerance}")
        _check(0 <= self.epsilon_nats < 1, f"{p}.epsilon_nats must be in [0, 1) nats: got {self.epsilon_nats}")


@dataclass
class StudyConfig:
    """`cbs study`: settings x batch sizes x hyper-parameters -> runs -> evaluate -> fit."""

    section = "study"

    data: Any
    """A preprocess config (mapping; its output_dir defaults to STUDY_DIR/data) or an existing data directory."""
    settings: Any
    """A list of {model, train_tokens[, name, target]}, or a generator: {generator: fixed_model, model, tokens:
    [D...]}, {generator: fixed_data, tokens: D, models: [...]}, {generator: chinchilla, models: [...],
    tokens_per_param: 20} (D = 20 N)."""
    batch_sizes: list[int]
    """Global batch sizes in sequences (>= 3 of them for a fit; the paper sweeps 64 to 16384)."""
    name: str = "study"
    hparams: HparamGrid = field(default_factory=HparamGrid)
    seeds: list[int] = field(default_factory=lambda: [1234])
    targets: StudyTargets = field(default_factory=StudyTargets)
    base: dict = field(default_factory=dict)
    """Pretrain config keys shared by every run (micro_batch_seqs, schedule, eval, deepspeed_config, ...)."""
    one_sweep: bool = True
    """Runs of one model serve all of its data budgets: trained once to the largest budget's target, each
    budget's crossing read off the same eval curve (docs/method.md, "Target loss"). False: separate runs per setting."""
    max_tokens_factor: float = 4.0
    """Non-reference runs stop once every target is reached, or after this many times the largest budget of
    their model (a run that gets there without reaching a target is censored in the fit)."""
    slurm: dict = field(default_factory=dict)
    """Resources for --executor slurm: partition, account, nodes, gpus_per_node, cpus_per_task, time,
    max_parallel, extra (list of raw sbatch flags). Command-line flags override them."""
    method: StudyMethod = StudyMethod.sweep
    """sweep (the paper's full runs per batch size) | branched (CBS along training from one base run)."""
    branched: BranchedConfig = field(default_factory=BranchedConfig)
    """Settings of method: branched."""
    ramp: Optional[BatchScheduleConfig] = None
    """method: ramp: the batch schedule (stages or a `cbs forecast --ramp --out` file, lr_scaling, beta2) every
    setting's ramp run trains; batch_sizes are its first and largest batch (the fixed runs)."""
    variants: Optional[dict] = None
    """Recipes swept side by side over the same grid: {name: pretrain keys over base, `model` fields over each
    setting's model, `hparams` in place of study.hparams} (cbs/pipeline/study_variants.py)."""
    axes: Optional[dict] = None
    """Variants as a product: {axis: {value: keys}} -> one variant per combination, named value1-value2."""
    reference_variant: Optional[str] = None
    """The variant whose reference runs set the target losses every variant shares; default: the first."""

    def validate(self, p: str) -> None:
        _check(len(self.batch_sizes) >= 1 and all(b >= 1 for b in self.batch_sizes),
               f"{p}.batch_sizes must list batch sizes >= 1: got {self.batch_sizes}")
        _check(len(set(self.batch_sizes)) == len(self.batch_sizes), f"{p}.batch_sizes has duplicates")
        _check(len(self.seeds) >= 1, f"{p}.seeds must list at least one seed")
        _check(self.max_tokens_factor >= 1, f"{p}.max_tokens_factor must be >= 1: got {self.max_tokens_factor}")
        ref = self.targets.reference
        if ref and ref.batch is not None:
            _check(ref.batch in self.batch_sizes,
                   f"{p}.targets.reference.batch ({ref.batch}) must be one of batch_sizes {self.batch_sizes}")
        if self.method is StudyMethod.branched:
            _check(len(self.hparams.lr) == 1 and len(self.hparams.beta2 or [0]) == 1 and len(self.seeds) == 1,
                   f"{p}: method branched has one base run per setting: give one hparams.lr, hparams.beta2 and seed")
            _check(len(self.batch_sizes) >= 2, f"{p}.batch_sizes: method branched needs the base batch and at least "
                                               f"one larger one")
            _check(self.targets.losses is None and (self.targets.reference is None or self.targets.reference.batch
                                                    in (None, min(self.batch_sizes))),
                   f"{p}.targets: method branched has no target losses (it compares branch losses): remove targets")
        if self.method is StudyMethod.ramp:
            self._validate_ramp(p)
        _check(self.method is StudyMethod.sweep or self.hparams.ewa_taus != [],
               f"{p}.hparams.ewa_taus: [] (no EWA) is for method sweep; a {self.method.value} study keeps EWA weights: "
               f"give taus, or omit it for the paper's")
        if self.variants is not None or self.axes is not None or self.reference_variant is not None:
            from cbs.pipeline.study_variants import expand_variants  # it imports this module

            expand_variants(self)
        for dotted, where in STUDY_SETS.items():
            node = self.base
            for part in dotted.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            _check(node is None, f"{p}.base.{dotted} is set by the study for each run ({where}): remove it from base")

    def _validate_ramp(self, p: str) -> None:
        _check(self.ramp is not None, f"{p}.ramp is required with method ramp: give its stages (or a file of "
                                      f"`cbs forecast --ramp --out`)")
        _check(self.ramp.adaptive is None, f"{p}.ramp.adaptive: a ramp study compares a planned schedule (stages or "
                                           f"a file) with its fixed batches; train an adaptive ramp as one run "
                                           f"(pretrain.batch_schedule.adaptive)")
        stages = self.ramp.parsed(f"{p}.ramp")
        want = sorted({stages[0].batch, stages[-1].batch})
        _check(sorted(self.batch_sizes) == want, f"{p}.batch_sizes must be the ramp's first and largest batch "
                                                 f"{want} (the fixed runs it is compared with): got {self.batch_sizes}")
        _check(len(self.hparams.lr) == 1 and len(self.hparams.beta2 or [0]) == 1,
               f"{p}.hparams: method ramp compares one recipe: give one lr (and at most one beta2)")
        _check(self.hparams.beta2 is None or self.ramp.beta2 is Beta2Rule.fixed,
               f"{p}.ramp.beta2 is paper but hparams.beta2 is given: set ramp.beta2: fixed (the ramp then keeps "
               f"hparams.beta2, as the fixed runs do), or remove hparams.beta2")
        _check(self.ramp.beta2 is Beta2Rule.paper or self.hparams.beta2 is not None,
               f"{p}.ramp.beta2 is fixed: give the beta2 in hparams.beta2 (the fixed runs use it too)")
