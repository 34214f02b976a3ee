"""Small helpers shared by the stages: hashing, progress bars, logging. The atomic and staged writers are
cbs/runfiles.py's (re-exported here for the stages that import them from this module)."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys

from tqdm.auto import tqdm

from cbs.runfiles import atomic_write_bytes, atomic_write_json, atomic_write_text, staged_directory  # noqa: F401

log = logging.getLogger("cbs")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def progress(**kwargs) -> tqdm:
    """A tqdm bar on stderr; in a log file (no TTY) it updates every 30 s instead of every 0.1 s."""
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.2 if interactive else 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(**kwargs)


def free_port() -> int:
    """A TCP port free on this host now (the OS picks it): a rendezvous of one's own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
