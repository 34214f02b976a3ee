"""Small helpers shared by the stages: atomic file writes, hashing, progress bars, logging."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tqdm.auto import tqdm

log = logging.getLogger("cbs")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file in the same directory + rename: a crash leaves the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Yield a temp directory beside `final`; on success it replaces `final` by rename, on error it is removed.

    The swap is two renames (old aside, new in place) so a crash leaves either the old directory, or the new one,
    or the old one under a `.old-*` name next to it: never a half-written `final`. The temp names carry host and
    pid, so that the next call removes what a killed process (kill -9, a node failure) left behind on this host.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(final)
    owner = f"{socket.gethostname()}-{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-{owner}-"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the directory the mode mkdir would
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{owner}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_stages(final: Path) -> None:
    """Remove `.NAME.tmp-HOST-PID-*` / `.NAME.old-HOST-PID` siblings of `final` whose process is gone from this
    host. Another host's, or a live process's (a concurrent run), are left alone."""
    host = socket.gethostname()
    for kind, rest in (("tmp", r"(\d+)-[^-]+"), ("old", r"(\d+)")):  # mkdtemp's random part has no "-"
        prefix = f".{final.name}.{kind}-{host}-"
        for path in final.parent.glob(glob.escape(prefix) + "*"):
            match = re.fullmatch(rest, path.name[len(prefix):])  # not another host named HOST-something
            if match and not _alive(int(match.group(1))):
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


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
