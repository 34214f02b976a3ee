"""Loading of every stage's config: YAML plus dotted overrides, typed by the stage's dataclasses, validated on load.

`load_config(cls, path, overrides)` reads the YAML file, applies `--set a.b=c` overrides (values parsed as YAML
scalars), builds the dataclasses with type checks (`from_dict`) and calls each section's `validate()`. Every
problem is a `ConfigError` naming the full dotted key and how to fix it, e.g.
"preprocess.val_fraction must be in (0, 0.5): got 0.7".
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import types
import typing
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from cbs.analysis import parse_count


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or impossible; the message names the key."""


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return "a list"
    return getattr(tp, "__name__", str(tp))


TokenCount = typing.NewType("TokenCount", int)
"""A field of this type is a token count, read by `parse_tokens` (300K, 1e9, 10B)."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML value to the annotated type `tp`; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if len(args) < len(typing.get_args(tp)):
                return None
            raise ConfigError(f"{key} must not be empty: give {_type_name(args[0])}")
        return _coerce(value, _union_member(args, value), key)
    if tp is TokenCount:
        return parse_tokens(value, key)
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


def _union_member(args: list, value: Any) -> Any:
    """The member of a union a YAML value is read as, by its shape: a list as the list member, a mapping as the
    mapping (or dataclass) member, anything else as the first member that is no list (whose errors then say
    what is expected); a one-member union is that member."""
    def shape(tp: Any) -> Any:
        if typing.get_origin(tp) in (list, tuple):
            return list
        return dict if tp is dict or dataclasses.is_dataclass(tp) else None

    want = list if isinstance(value, list) else dict if isinstance(value, dict) else None
    return next((a for a in args if shape(a) is want), None) or \
        next((a for a in args if shape(a) is not list), args[0])


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
