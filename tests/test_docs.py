"""README's config tables against the config dataclasses, both ways: every field of PreprocessConfig,
PretrainConfig and StudyConfig (nested configs as `section.key`) has a row, and every key a row names exists.

The tables are the `| key | default | meaning |` tables under README's `### preprocess`, `### pretrain` and
`### study` headings. A key cell holds backticked keys, with `a.{b,c}` for a.b and a.c. A nested config's
fields are each documented by their dotted key; the section's own key (`model`, `log.wandb`) may have a row of its
own besides. The classes are found by importing them from cbs.pipeline.config, not by reading its source."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from cbs.pipeline.config import PreprocessConfig, PretrainConfig, StudyConfig

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = {"preprocess": PreprocessConfig, "pretrain": PretrainConfig, "study": StudyConfig}


def _nested(tp) -> type | None:
    """The dataclass a field's type holds (itself, or inside Optional); None for a plain value."""
    if dataclasses.is_dataclass(tp):
        return tp
    inner = [a for a in typing.get_args(tp) if a is not type(None)]
    return inner[0] if len(inner) == 1 and dataclasses.is_dataclass(inner[0]) else None


def config_keys(cls: type, prefix: str = "") -> tuple[set[str], set[str]]:
    """(leaf keys, section keys) of a config dataclass, dotted: a nested config's fields are leaves, its own name a
    section."""
    leaves, sections = set(), set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, inner = prefix + f.name, _nested(hints[f.name])
        if inner is None:
            leaves.add(key)
        else:
            sections.add(key)
            more_leaves, more_sections = config_keys(inner, key + ".")
            leaves |= more_leaves
            sections |= more_sections
    return leaves, sections


def expand(cell: str) -> list[str]:
    """`a.{b,c}`, `d` or `e.f` -> [a.b, a.c, d, e.f]: every backticked key of a key cell."""
    keys = []
    for token in re.findall(r"`([^`]+)`", cell):
        m = re.fullmatch(r"([\w.]*)\{([\w,\s]+)\}", token)
        keys += [m.group(1) + k.strip() for k in m.group(2).split(",")] if m else [token.strip()]
    return keys


def documented_keys(text: str) -> dict[str, list[str]]:
    """Section -> the keys its `| key | default | meaning |` tables name, in order."""
    out: dict[str, list[str]] = {s: [] for s in SECTIONS}
    section, in_table = None, False
    for line in text.splitlines():
        heading = re.match(r"### (\w+)", line)
        if heading:
            section = heading.group(1) if heading.group(1) in SECTIONS else None
        elif line.startswith("| key | default | meaning |"):
            in_table = section is not None
        elif in_table and line.startswith("| ") and not line.startswith("| ---"):
            out[section] += expand(line.split("|")[1])
        elif not line.startswith("|"):
            in_table = False
    return out


def test_expand_reads_the_key_cells_of_the_readme():
    assert expand(" `optimizer.{lr,beta1}`, `resume` ") == ["optimizer.lr", "optimizer.beta1", "resume"]
    assert expand(" `ramp.stages` or `ramp.file` ") == ["ramp.stages", "ramp.file"]


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_config_field_has_a_readme_row(section):
    leaves, _ = config_keys(SECTIONS[section])
    missing = sorted(leaves - set(documented_keys(README.read_text(encoding="utf-8"))[section]))
    assert not missing, f"README.md, ### {section}: no row documents {', '.join(missing)}; add a row per key " \
                        f"(`| \\`key\\` | default | meaning |`)"


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_readme_row_names_a_config_field(section):
    leaves, sections = config_keys(SECTIONS[section])
    rows = documented_keys(README.read_text(encoding="utf-8"))[section]
    unknown = [k for k in rows if k not in leaves | sections]
    assert rows and not unknown, f"README.md, ### {section}: rows name {', '.join(unknown)}, which " \
                                 f"{SECTIONS[section].__name__} has not (renamed or removed?)"
