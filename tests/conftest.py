"""Shared fixtures: real text (the Python standard library's own sources) and a preprocessed stdlib dataset."""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def stdlib_texts(n: int, max_chars: int = 20_000) -> list[str]:
    """The first `n` non-empty stdlib sources of at most `max_chars` characters: real code and prose."""
    from cbs.pipeline.corpus import stdlib_files

    texts = []
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip() and len(text) <= max_chars:
            texts.append(text)
            if len(texts) == n:
                return texts
    raise RuntimeError(f"the standard library has fewer than {n} sources under {max_chars} characters")


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, field: t}) + "\n")
    return path


def read_split(data_dir: Path, split: str):
    """megatron-core's own reader over our shards."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(str(data_dir / split))


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory) -> Path:
    """The whole `stdlib` corpus, preprocessed with a small vocabulary (the default corpus, end to end)."""
    from cbs.pipeline import preprocess
    from cbs.pipeline.config import PreprocessConfig, TokenizerConfig

    out = tmp_path_factory.mktemp("stdlib") / "data"
    preprocess.main(PreprocessConfig(inputs=["stdlib"], output_dir=str(out),
                                     tokenizer=TokenizerConfig(vocab_size=512)))
    return out


CLUSTER = Path(__file__).resolve().parent.parent / "scripts" / "slurm_cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node Slurm; stopped at the end if this fixture started it (a cluster already up stays)."""
    already_up = subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:  # the script's "cannot host a cluster here" (no root, apt cannot install)
        pytest.skip(f"no Slurm on this machine: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"scripts/slurm_cluster.sh up failed:\n{proc.stdout}{proc.stderr}"
    yield
    if not already_up:
        down = subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
