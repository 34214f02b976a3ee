"""Document readers: txt, jsonl(.gz), parquet, Hugging Face `datasets` (hub or save_to_disk) and `stdlib`.

A *source* is one entry of `preprocess.inputs`; it expands to files (or a dataset) and yields `Document`s in a
fixed order. Problems name the file and line (or row): a bad record raises `CorpusError` with `on_error: fail`
and is counted in `ReadStats.skipped_records` with `on_error: skip`. Invalid UTF-8 is decoded with U+FFFD
replacement and counted per document.

The embedded default corpus `stdlib` is the installed Python standard library's own .py files (one document
per file, sorted by relative path, `site-packages`/`dist-packages` excluded so the text does not depend on
what else is installed): ~1,800 files, ~31 MB of real text on every machine. Its text differs between Python
versions, so the manifest records the version.
"""

from __future__ import annotations

import difflib
import glob
import gzip
import json
import os
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
_EXCLUDED_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_BINARY_SNIFF_BYTES = 8192
"""A .txt file with a NUL byte in its first 8 KiB is binary (git's test): text never holds NUL."""


class CorpusError(ValueError):
    """An input cannot be read or holds a bad record; the message names the file and line or row."""


@dataclass
class Document:
    text: str
    origin: str
    """Where it came from, for messages: `path`, `path:LINE` or `hf:NAME#ROW`."""
    invalid_utf8: bool = False


@dataclass
class Source:
    spec: str
    """The entry of `inputs` as written."""
    kind: str
    """files | stdlib | hf | disk"""
    paths: list[Path] = field(default_factory=list)

    def fingerprint(self) -> dict:
        """What decides whether a saved result is still up to date (sizes and mtimes, not contents: cheap)."""
        fp: dict = {"spec": self.spec, "kind": self.kind}
        if self.kind in ("files", "stdlib", "disk"):
            fp["files"] = [_stat_key(p) for p in self.paths]
        if self.kind == "stdlib":
            fp["python"] = platform.python_version()
        return fp


@dataclass
class ReadStats:
    documents: int = 0
    empty_documents: int = 0
    skipped_records: int = 0
    invalid_utf8_documents: int = 0
    first_skipped: list[str] = field(default_factory=list)
    """The first few skip reasons, for the manifest and the log."""
    per_source: dict[str, int] = field(default_factory=dict)


def _stat_key(p: Path) -> list:
    st = p.stat()
    return [str(p), st.st_size, st.st_mtime_ns]


def _suffix_ok(p: Path) -> bool:
    return any(p.name.endswith(s) for s in FILE_SUFFIXES)


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted by path relative to the stdlib root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_STDLIB_DIRS)
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and any((p / n).exists() for n in ("dataset_dict.json", "dataset_info.json", "state.json"))


def resolve(spec: str) -> Source:
    """One `inputs` entry -> Source with its files; no match is an error naming the entry."""
    if spec == "stdlib":
        return Source(spec, "stdlib", stdlib_files())
    if spec.startswith("hf:"):
        if not spec[3:].split(":")[0]:
            raise CorpusError(f"input {spec!r}: give a dataset name, hf:NAME[:CONFIG][:SPLIT]")
        return Source(spec, "hf")
    path = Path(os.path.expanduser(spec))
    if _is_saved_dataset(path):
        return Source(spec, "disk", sorted(q for q in path.rglob("*") if q.is_file()))
    if path.is_dir():
        paths = sorted(q for q in path.rglob("*") if q.is_file() and _suffix_ok(q))
        if not paths:
            raise CorpusError(f"input {spec!r} holds no {', '.join(FILE_SUFFIXES)} files: give "
                              f"{', '.join(FILE_SUFFIXES)} files, a glob, hf:NAME or stdlib")
        return Source(spec, "files", paths)
    matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True))
    if not matches:
        close = difflib.get_close_matches(spec, ["stdlib"], n=1, cutoff=0.7)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise CorpusError(f"input {spec!r} matched no file: check the path or glob{hint}")
    files = [m for m in matches if m.is_file()]
    bad = [m for m in files if not _suffix_ok(m)]
    if bad:
        raise CorpusError(f"{bad[0]}: unsupported file type; inputs must be {', '.join(FILE_SUFFIXES)}")
    if not files:
        raise CorpusError(f"input {spec!r} matched only directories, no files")
    return Source(spec, "files", files)


class Reader:
    """Iterates the documents of all sources in order, applying the `on_error` policy and counting."""

    def __init__(self, sources: list[Source], text_field: str = "text", skip_bad: bool = False,
                 max_documents: Optional[int] = None):
        self.sources = sources
        self.text_field = text_field
        self.skip_bad = skip_bad
        self.max_documents = max_documents
        self.stats = ReadStats()

    def __iter__(self) -> Iterator[Document]:
        self.stats = ReadStats()
        for source in self.sources:
            self.stats.per_source[source.spec] = 0
            for doc in self._source_documents(source):
                if not doc.text:
                    self.stats.empty_documents += 1
                    continue
                self.stats.documents += 1
                self.stats.per_source[source.spec] += 1
                self.stats.invalid_utf8_documents += doc.invalid_utf8
                yield doc
                if self.max_documents is not None and self.stats.documents >= self.max_documents:
                    return

    def bad_record(self, where: str, why: str) -> None:
        message = f"{where}: {why}"
        if not self.skip_bad:
            raise CorpusError(message + " (set on_error: skip to skip such records)")
        self.stats.skipped_records += 1
        if len(self.stats.first_skipped) < 10:
            self.stats.first_skipped.append(message)

    def _source_documents(self, source: Source) -> Iterator[Document]:
        if source.kind == "hf":
            yield from self._records(_hf_rows(source.spec), source.spec + "#")
        elif source.kind == "disk":
            yield from self._records(_disk_rows(source.spec), source.spec + "#")
        else:
            for path in source.paths:
                yield from self._file_documents(path)

    def _file_documents(self, path: Path) -> Iterator[Document]:
        try:
            if path.name.endswith(".parquet"):
                yield from self._parquet(path)
            elif path.name.endswith((".jsonl", ".jsonl.gz")):
                yield from self._jsonl(path)
            else:
                raw = path.read_bytes()
                if b"\0" in raw[:_BINARY_SNIFF_BYTES]:
                    self.bad_record(str(path), "binary file (NUL bytes), not text; remove it from inputs")
                    return
                text, bad = _decode(raw)
                yield Document(text, str(path), bad)
        except (OSError, EOFError) as e:  # unreadable file, corrupt gzip, truncated parquet
            raise CorpusError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}; replace the file or "
                              f"remove it from inputs") from None

    def _jsonl(self, path: Path) -> Iterator[Document]:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                line, bad = _decode(raw)
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    self.bad_record(where, f"invalid JSON ({e.msg} at column {e.colno})")
                    continue
                text = self._text_of(record, where)
                if text is not None:
                    yield Document(text, where, bad)

    def _parquet(self, path: Path) -> Iterator[Document]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid (not OSError) for a file that is not parquet
            raise CorpusError(f"{path}: cannot read as parquet: {e}; replace the file or remove it from "
                              f"inputs") from None
        columns = pf.schema_arrow.names
        if self.text_field not in columns:
            raise CorpusError(f"{path}: no column {self.text_field!r} (columns: {', '.join(columns)}); "
                              f"set text_field")
        row = 0
        for batch in pf.iter_batches(columns=[self.text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                row += 1
                text = self._text_of({self.text_field: value}, f"{path}: row {row}")
                if text is not None:
                    yield Document(text, f"{path}#{row}")

    def _records(self, rows: Iterator[dict], prefix: str) -> Iterator[Document]:
        for i, record in enumerate(rows, 1):
            text = self._text_of(record, f"{prefix}{i}")
            if text is not None:
                yield Document(text, f"{prefix}{i}")

    def _text_of(self, record, where: str) -> Optional[str]:
        if not isinstance(record, dict):
            self.bad_record(where, f"record is a {type(record).__name__}, not an object with field "
                                   f"{self.text_field!r}")
            return None
        if self.text_field not in record:
            fields = ", ".join(map(str, list(record)[:8]))
            self.bad_record(where, f"record has no field {self.text_field!r} (fields: {fields}); set text_field")
            return None
        text = record[self.text_field]
        if not isinstance(text, str):
            self.bad_record(where, f"field {self.text_field!r} is {type(text).__name__}, not a string")
            return None
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # JSON allows lone surrogates ("\\ud800"): not encodable, so replace them
            text = text.encode("utf-8", errors="replace").decode("utf-8")
        return text


def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _hf_rows(spec: str) -> Iterator[dict]:
    """`hf:NAME[:CONFIG][:SPLIT]`, streamed (nothing is downloaded up front); NAME may be a local data dir."""
    import datasets

    name, config, split = (spec[3:].split(":") + [None, None])[:3]
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as e:  # hub errors, missing config, no network: all end here with the spec named
        raise CorpusError(f"input {spec!r}: cannot load the dataset: {type(e).__name__}: {e}") from None
    yield from ds


def _disk_rows(spec: str) -> Iterator[dict]:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (all splits, sorted)."""
    import datasets

    try:
        ds = datasets.load_from_disk(os.path.expanduser(spec))
    except Exception as e:
        raise CorpusError(f"input {spec!r}: cannot load the saved dataset: {type(e).__name__}: {e}") from None
    parts = [ds[k] for k in sorted(ds)] if isinstance(ds, datasets.DatasetDict) else [ds]
    for part in parts:
        yield from part
